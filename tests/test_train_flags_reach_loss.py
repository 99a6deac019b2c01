"""Every Tf-KD flag reaches the loss the trainer trains with.

The run record copies the parsed arguments, so a flag dropped between the command line and the loss would pass
every test that reads ``args.yaml`` or ``run_info.json``. Here real command lines go through the trainer's own
steps (``build_task``) and through ``main`` itself (``build_in_trainer``); the task they build is run on fixed
float64 logits and targets, with the student's output under the test's control and the teacher (for self / kd) a
network saved to disk, and compared with float64 formulas written here. Each case gives non-default values, and a
test checks that each value given changes the expected loss, so a dropped flag cannot go unnoticed.
"""
import argparse
import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.utils import CheckpointSaver

from timm_tfkd import TFKD_MODES

from conftest import write_image_folder
from _train_helpers import FixedLogits, build_in_trainer, build_task, random_network  # noqa: F401  (autouse fixture)

K = 5  # classes
B = 6  # batch
IMG = 16
STUDENT = 'test_resnet'
STUDENT_STATS = ((0.5,) * 3, (0.5,) * 3)  # test_resnet's own normalization, which the student's input has
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# The documented defaults (README's flag table, timm's --smoothing), written here rather than read from the parser.
DEFAULTS = dict(formula='paper', alpha=0.1, temperature=20.0, correct_prob=0.99, multiplier=1.0, smoothing=0.1,
                convention='timm')
FLAGS = dict(formula='--tfkd-formula', alpha='--tfkd-alpha', temperature='--tfkd-temperature',
             correct_prob='--tfkd-correct-prob', multiplier='--tfkd-multiplier',
             convention='--tfkd-smoothing-convention', smoothing='--smoothing')
DISTILL_SETTINGS = ('formula', 'alpha', 'temperature', 'multiplier')


@dataclass(frozen=True)
class Case:
    """A command line (the mode and the flags given) and, read by the oracle, the same settings."""
    mode: str
    given: Dict[str, Any] = field(default_factory=dict)
    mixup: bool = False

    def setting(self, name: str) -> Any:
        return self.given.get(name, DEFAULTS[name])

    def argv(self) -> list:
        flags = ['--tfkd-mode', self.mode] + [a for name, value in self.given.items() for a in (FLAGS[name], value)]
        return flags + (['--mixup', '0.8'] if self.mixup else [])

    def loss_settings(self) -> Tuple[str, ...]:
        """The settings the loss of this case depends on (with Mixup, timm folds --smoothing into the targets)."""
        return {
            'none': () if self.mixup else ('smoothing',),
            'lsr': ('smoothing', 'convention'),
            'reg': DISTILL_SETTINGS + ('correct_prob',),
            'self': DISTILL_SETTINGS,
            'kd': DISTILL_SETTINGS,
        }[self.mode]


CASES = {
    # timm's criterion: label smoothing as timm's train.py would apply it.
    'none-default': Case('none'),
    'none-smoothing-0.3': Case('none', dict(smoothing=0.3)),
    'none-smoothing-0': Case('none', dict(smoothing=0.0)),
    'none-mixup': Case('none', dict(smoothing=0.25), mixup=True),
    # The label smoothing control, in both conventions; Tf-KD flags that do not apply are ignored.
    'lsr-default': Case('lsr'),
    'lsr-0.3-reference': Case('lsr', dict(smoothing=0.3, convention='reference')),
    'lsr-0.25-timm-mixup': Case('lsr', dict(smoothing=0.25, alpha=0.7, formula='official'),
                                mixup=True),
    'lsr-0.4-reference-mixup': Case('lsr', dict(smoothing=0.4, convention='reference'), mixup=True),
    # The virtual teacher; an explicit --smoothing with Mixup goes into the targets, not into the loss.
    'reg-default': Case('reg'),
    'reg-paper': Case('reg', dict(alpha=0.4, temperature=3.0, correct_prob=0.8, multiplier=2.5,
                                  convention='reference')),
    'reg-official': Case('reg', dict(formula='official', alpha=0.6, temperature=2.0, correct_prob=0.7,
                                     multiplier=30.0)),
    'reg-official-mixup': Case('reg', dict(formula='official', alpha=0.3, temperature=1.0, correct_prob=0.5,
                                           multiplier=10.0, smoothing=0.2), mixup=True),
    'reg-paper-mixup': Case('reg', dict(alpha=0.85, temperature=1.5, correct_prob=0.6,
                                        multiplier=0.5), mixup=True),
    # A frozen copy of the architecture (a timm run folder) and another architecture (a .safetensors file).
    'self-default': Case('self'),
    'self-paper': Case('self', dict(alpha=0.7, temperature=3.0, multiplier=2.0)),
    'self-official': Case('self', dict(formula='official', alpha=0.5, temperature=6.0, multiplier=40.0,
                                       correct_prob=0.6)),
    'self-official-mixup': Case('self', dict(formula='official', alpha=0.9, temperature=2.0, multiplier=5.0,
                                             smoothing=0.2), mixup=True),
    'kd-paper': Case('kd', dict(alpha=0.8, temperature=2.0, multiplier=3.0)),
    'kd-official-mixup': Case('kd', dict(formula='official', alpha=0.35, temperature=4.0, multiplier=7.0),
                              mixup=True),
    'kd-default': Case('kd'),
}


# ---------------------------------------------------------------------------------------------------------------
# Oracles, float64


def _ce(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return -(q * torch.log_softmax(z, 1)).sum(1).mean()


def _kl_rows(t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """sum_k t_k (log t_k - log s_k)."""
    return (t * (torch.log(t) - log_s)).sum(1)


def oracle(case: Case, z: torch.Tensor, q: torch.Tensor, teacher_logits: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The loss (and, for the distillation modes, its CE and KD parts) the case's command line asks for."""
    s = case.setting
    classes = z.shape[1]
    if case.mode == 'none':
        eps = 0.0 if case.mixup else s('smoothing')
        return {'loss': _ce(z, (1 - eps) * q + eps / classes)}
    if case.mode == 'lsr':
        eps = s('smoothing')
        if s('convention') == 'timm':
            smoothed = (1 - eps) * q + eps / classes
        else:
            smoothed = (1 - eps) * q + eps / (classes - 1) * (1 - q)
        return {'loss': _ce(z, smoothed)}
    alpha, tau, m, paper = s('alpha'), s('temperature'), s('multiplier'), s('formula') == 'paper'
    if case.mode == 'reg':
        a = s('correct_prob')
        virtual = a * q + (1 - a) / (classes - 1) * (1 - q)  # p^d; for soft q the mix of the class teachers
        if paper:  # Eq. 9: teacher softmax(log p^d / tau), student softmax(z / tau), batch mean, tau^2
            kd = tau ** 2 * m * _kl_rows(torch.softmax(virtual.log() / tau, 1), torch.log_softmax(z / tau, 1)).mean()
        else:  # reference code: KLDivLoss-mean(softmax(p^d / T) || log_softmax(z)) times m
            kd = m * _kl_rows(torch.softmax(virtual / tau, 1), torch.log_softmax(z, 1)).sum() / z.numel()
    else:
        rows = _kl_rows(torch.softmax(teacher_logits / tau, 1), torch.log_softmax(z / tau, 1))
        kd = tau ** 2 * m * (rows.mean() if paper else rows.sum() / z.numel())
    ce = _ce(z, q)
    return {'loss': (1 - alpha) * ce + alpha * kd, 'task_loss': ce, 'kd_loss': kd}


# ---------------------------------------------------------------------------------------------------------------
# Fixed inputs, teachers on disk


def _inputs(case: Case):
    """Student logits (float64, the loss input), the target the task gets, its dense form, and images."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(B, K, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y1, y2 = torch.randint(0, K, (B,), generator=g), torch.randint(0, K, (B,), generator=g)
    images = torch.randn(B, 3, IMG, IMG, generator=g)
    if not case.mixup:
        return z, y1, F.one_hot(y1, K).double(), images
    # What Mixup hands the loss: a mix of two smoothed label sets.
    smooth = lambda y: 0.9 * F.one_hot(y, K).double() + 0.1 / K  # noqa: E731
    q = 0.7 * smooth(y1) + 0.3 * smooth(y2)
    return z, q, q, images




@dataclass
class Teacher:
    flags: list
    network: nn.Module  # the saved network, as a float64 copy for the oracle
    stats: Tuple[Tuple[float, ...], Tuple[float, ...]]  # what it was trained to see

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The saved network on the student's images, re-normalized from the student's statistics to its own."""
        (s_mean, s_std), (t_mean, t_std) = STUDENT_STATS, self.stats
        view = lambda v: torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)  # noqa: E731
        pixels = images.double() * view(s_std) + view(s_mean)
        with torch.no_grad():
            return self.network((pixels - view(t_mean)) / view(t_std))


@pytest.fixture(scope='module')
def teachers(tmp_path_factory) -> Dict[str, Teacher]:
    root = tmp_path_factory.mktemp('teachers')
    own = random_network(STUDENT, K, seed=1)
    run = root / 'teacher-run'
    run.mkdir()
    # A timm training run folder: the trainer picks its model_best.pth.tar.
    saver = CheckpointSaver(own, torch.optim.SGD(own.parameters(), lr=0.1), args=argparse.Namespace(model=STUDENT),
                            checkpoint_dir=str(run), recovery_dir=str(run))
    saver.save_checkpoint(0, metric=1.0)
    other = random_network('test_efficientnet', K, seed=2)
    save_file(other.state_dict(), root / 'effnet.safetensors')
    return {
        'self': Teacher(['--tfkd-teacher-checkpoint', run], copy.deepcopy(own).double(), STUDENT_STATS),
        'kd': Teacher(['--tfkd-teacher-model', 'test_efficientnet', '--tfkd-teacher-checkpoint',
                       root / 'effnet.safetensors'], copy.deepcopy(other).double(), IMAGENET_STATS),
    }


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp('flags') / 'data', classes=K, per_class=2)




def _argv(case: Case, teachers: Dict[str, Teacher]) -> list:
    teacher = teachers[case.mode].flags if case.mode in teachers else []
    return ['--model', STUDENT, '--num-classes', K, '--img-size', IMG, *case.argv(), *teacher]


def _check_task(task, case: Case, teachers: Dict[str, Teacher]) -> None:
    z, target, q, images = _inputs(case)
    teacher_logits = teachers[case.mode].logits(images) if case.mode in teachers else None
    task.trainable_module = FixedLogits(z)
    task.train()  # as the training loop has it: a teacher must stay in eval mode regardless
    result = task(images, target)
    expected = oracle(case, z, q, teacher_logits)
    # A float32 teacher against the float64 copy: its logits agree to ~1e-6 relative, the loss as closely.
    tolerance = dict(rtol=1e-5, atol=1e-6) if teacher_logits is not None else dict(rtol=0, atol=1e-10)
    assert result['output'] is z
    for key, value in expected.items():
        torch.testing.assert_close(result[key], value.detach(), **tolerance, msg=lambda m: f'{key}: {m}')
    grad, = torch.autograd.grad(result['loss'], z)
    grad_expected, = torch.autograd.grad(expected['loss'], z)
    torch.testing.assert_close(grad, grad_expected, **tolerance)


# ---------------------------------------------------------------------------------------------------------------
# The tests


def test_cases_cover_every_mode():
    """A mode added later fails here until it has cases."""
    assert {case.mode for case in CASES.values()} == set(TFKD_MODES)


@pytest.mark.parametrize('mode', TFKD_MODES)
def test_every_loss_setting_of_a_mode_takes_several_non_default_values(mode):
    """Numbers take at least two values other than the default; choices take their other value."""
    cases = [case for case in CASES.values() if case.mode == mode]
    for name in {name for case in cases for name in case.loss_settings()}:
        values = {case.given[name] for case in cases if name in case.loss_settings() and name in case.given}
        needed = 1 if isinstance(DEFAULTS[name], str) else 2
        assert len(values - {DEFAULTS[name]}) >= needed, f'{mode}: {FLAGS[name]} takes {sorted(values)}'


@pytest.mark.parametrize('case_id', list(CASES))
def test_each_flag_given_changes_the_expected_loss(case_id):
    """A dropped flag falls back to its default; the oracle must tell the two apart, or the case proves nothing."""
    case = CASES[case_id]
    z, _, q, images = _inputs(case)
    teacher_logits = random_network(STUDENT, K, seed=3).double()(images.double()).detach()
    expected = oracle(case, z, q, teacher_logits)['loss'].item()
    for name in case.loss_settings():
        if name not in case.given:
            continue
        dropped = replace(case, given={k: v for k, v in case.given.items() if k != name})
        other = oracle(dropped, z, q, teacher_logits)['loss'].item()
        assert abs(other - expected) > 1e-3 * abs(expected), f'{FLAGS[name]} {case.given[name]} does not matter'


@pytest.mark.parametrize('case_id', list(CASES))
def test_flags_reach_the_loss_of_the_trainer_steps(case_id, teachers):
    case = CASES[case_id]
    _, task = build_task(_argv(case, teachers))
    _check_task(task, case, teachers)


@pytest.mark.parametrize('case_id', list(CASES))
def test_flags_reach_the_loss_main_builds(case_id, teachers, data_dir, tmp_path):
    case = CASES[case_id]
    argv = [*_argv(case, teachers), '--data-dir', data_dir, '--device', 'cpu', '-j', '0', '-b', 4,
            '--output', tmp_path / 'out']
    _, task = build_in_trainer(argv)
    _check_task(task, case, teachers)
    assert not (tmp_path / 'out').exists()
