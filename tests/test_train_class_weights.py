"""``--class-stats``, ``--loss-class-weight``, ``--loss-pos-weight`` and ``--loss-weight-power / -beta / -max``
reach the loss the trainer trains with, as real command lines.

Each case parses a command line, builds the task through the trainer's own steps (``build_task``) and through
``main`` itself (``build_in_trainer``), runs it on fixed float64 logits and compares the loss and its gradient with
float64 formulas written here, the weights computed by hand from the counts in the stats file (timm's
``inv_freq``: (N / n_c) ** p scaled to mean 1; ``effective_num``: (1 - b) / (1 - b ** n_c) scaled to mean 1, then
capped; ``neg_pos``: ((N - n_c) / n_c) ** p; a class without positives counts as one). Reg, self, kd and lsr weight
only their cross-entropy part; plain timm training weights timm's BCE.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import write_image_folder
from _train_helpers import FixedLogits, build_in_trainer, build_task  # noqa: F401  (autouse fixture)

K, B, IMG = 4, 6, 16
COUNTS, SAMPLES = [12, 3, 0, 5], 20  # class 2 has no positives: timm counts it as one


def inv_freq(power: float) -> torch.Tensor:
    raw = torch.tensor([(SAMPLES / max(n, 1)) ** power for n in COUNTS], dtype=torch.float64)
    return raw / raw.mean()


def effective_num(beta: float, cap: float) -> torch.Tensor:
    raw = torch.tensor([(1 - beta) / (1 - beta ** max(n, 1)) for n in COUNTS], dtype=torch.float64)
    return (raw / raw.mean()).clamp(max=cap)


def neg_pos(power: float) -> torch.Tensor:
    return torch.tensor([((SAMPLES - max(n, 1)) / max(n, 1)) ** power for n in COUNTS], dtype=torch.float64)


EXPLICIT = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
FILE_WEIGHTS = torch.tensor([1.5, 0.25, 2.0, 1.0], dtype=torch.float64)


@dataclass(frozen=True)
class Case:
    mode: str
    flags: List[str]
    class_weight: torch.Tensor  # what the oracle weighs the classes by (float64)
    pos_weight: torch.Tensor = None
    mixup: bool = False
    settings: Dict[str, float] = field(default_factory=dict)


CASES = {
    'reg-inv-freq-sqrt': Case('reg', ['--loss-class-weight', 'inv_freq', '--loss-weight-power', '0.5',
                                      '--tfkd-alpha', '0.4', '--tfkd-temperature', '3', '--tfkd-correct-prob', '0.8'],
                              inv_freq(0.5), settings=dict(alpha=0.4, tau=3.0, a=0.8)),
    'reg-inv-freq-mixup': Case('reg', ['--loss-class-weight', 'inv_freq', '--tfkd-alpha', '0.3'], inv_freq(1.0),
                               mixup=True, settings=dict(alpha=0.3, tau=20.0, a=0.99)),
    'self-effective-num-capped': Case('self', ['--loss-class-weight', 'effective_num', '--loss-weight-beta', '0.9',
                                               '--loss-weight-max', '1.3', '--tfkd-alpha', '0.6',
                                               '--tfkd-temperature', '4'],
                                      effective_num(0.9, 1.3), settings=dict(alpha=0.6, tau=4.0)),
    'kd-file-weights': Case('kd', ['--loss-class-weight', '{weights_file}', '--tfkd-alpha', '0.5',
                                   '--tfkd-temperature', '2'], FILE_WEIGHTS, mixup=True,
                            settings=dict(alpha=0.5, tau=2.0)),
    'lsr-explicit-list': Case('lsr', ['--loss-class-weight', '0.5,2,1,3', '--smoothing', '0.2'], EXPLICIT,
                              settings=dict(eps=0.2)),
    'lsr-explicit-mixup': Case('lsr', ['--loss-class-weight', '0.5,2,1,3', '--smoothing', '0.3'], EXPLICIT,
                               mixup=True, settings=dict(eps=0.3)),
    'none-bce-inv-freq-neg-pos': Case('none', ['--bce-loss', '--loss-class-weight', 'inv_freq',
                                               '--loss-pos-weight', 'neg_pos', '--loss-weight-power', '0.5',
                                               '--smoothing', '0.2'],
                                      inv_freq(0.5), neg_pos(0.5), settings=dict(eps=0.2)),
    'none-bce-single-weight-mixup': Case('none', ['--bce-loss', '--loss-class-weight', '2.5',
                                                  '--bce-pos-weight', '1.5'],
                                         torch.full((K,), 2.5, dtype=torch.float64),
                                         torch.full((K,), 1.5, dtype=torch.float64), mixup=True),
}


# ---------------------------------------------------------------------------------------------------------------
# Oracles, float64


def weighted_ce(z, t, w):
    return -(w * t * torch.log_softmax(z, 1)).sum(1).mean()


def kl_batchmean(t, log_s):
    return (torch.xlogy(t, t) - t * log_s).sum(1).mean()


def oracle(case: Case, z, q, teacher_logits):
    """The loss the case's command line asks for; q is the (soft) label the loss gets, dense."""
    s, w = case.settings, case.class_weight
    if case.mode == 'none':
        # timm's BinaryCrossEntropy: class indices become off = eps / K, on = 1 - eps + off; Mixup targets as given.
        t = q if case.mixup else q * (1 - s['eps']) + s['eps'] / K
        log_p, log_not_p = F.logsigmoid(z), F.logsigmoid(-z)
        return -(w * (case.pos_weight * t * log_p + (1 - t) * log_not_p)).mean()
    if case.mode == 'lsr':
        return weighted_ce(z, (1 - s['eps']) * q + s['eps'] / K, w)
    alpha, tau = s['alpha'], s['tau']
    if case.mode == 'reg':
        virtual = s['a'] * q + (1 - s['a']) / (K - 1) * (1 - q)
        kd = tau ** 2 * kl_batchmean(torch.softmax(virtual.log() / tau, 1), torch.log_softmax(z / tau, 1))
    else:
        kd = tau ** 2 * kl_batchmean(torch.softmax(teacher_logits / tau, 1), torch.log_softmax(z / tau, 1))
    return (1 - alpha) * weighted_ce(z, q, w) + alpha * kd


# ---------------------------------------------------------------------------------------------------------------
# Inputs and the run's files


def _inputs(case: Case):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(B, K, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y1, y2 = torch.randint(0, K, (B,), generator=g), torch.randint(0, K, (B,), generator=g)
    images = torch.randn(B, 3, IMG, IMG, generator=g)
    if not case.mixup:
        return z, y1, F.one_hot(y1, K).double(), images
    q = 0.7 * F.one_hot(y1, K).double() + 0.3 * F.one_hot(y2, K).double()
    return z, q, q, images


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp('class-weights')
    stats = root / 'stats.json'
    stats.write_text(json.dumps({'num_samples': SAMPLES, 'pos_counts': COUNTS, 'task': 'classification'}))
    weights = root / 'weights.json'
    weights.write_text(json.dumps({'class_weight': FILE_WEIGHTS.tolist()}))
    torch.manual_seed(1)
    teacher = timm.create_model('test_resnet', num_classes=K)
    torch.save({'epoch': 0, 'arch': 'test_resnet', 'state_dict': teacher.state_dict()}, root / 'teacher.pth.tar')
    return {'stats': stats, 'weights_file': weights, 'teacher': root / 'teacher.pth.tar',
            'data': write_image_folder(root / 'data', classes=K, per_class=2)}




def _argv(case: Case, files: Dict[str, Path]) -> list:
    flags = [flag.format(**files) for flag in case.flags]
    teacher = ['--tfkd-teacher-checkpoint', files['teacher'], '--tfkd-teacher-model', 'test_resnet'] \
        if case.mode in ('self', 'kd') else []
    return ['--model', 'test_resnet', '--num-classes', K, '--img-size', IMG, '--tfkd-mode', case.mode,
            '--class-stats', files['stats'], *flags, *teacher, *(['--mixup', '0.5'] if case.mixup else [])]


def _check(task, case: Case) -> None:
    z, target, q, images = _inputs(case)
    teacher = getattr(task, 'teacher', None)
    # The teacher's own correctness is test_train_flags_reach_loss.py's; here it only feeds the KD term.
    teacher_logits = teacher(images).double() if teacher is not None else None
    task.trainable_module = FixedLogits(z)
    result = task(images, target)
    expected = oracle(case, z, q, teacher_logits)
    # timm hands out its computed weights in float32 (and a float32 teacher feeds self / kd): agreement to ~1e-7.
    tolerance = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result['loss'].double(), expected.detach(), **tolerance)
    grad, = torch.autograd.grad(result['loss'], z)
    grad_expected, = torch.autograd.grad(expected, z)
    torch.testing.assert_close(grad.double(), grad_expected, **tolerance)


# ---------------------------------------------------------------------------------------------------------------
# The tests


def test_hand_weights_are_uneven():
    """Weights of one would let a dropped flag pass unnoticed."""
    for weights in (inv_freq(0.5), inv_freq(1.0), effective_num(0.9, 1.3), neg_pos(0.5), EXPLICIT, FILE_WEIGHTS):
        assert weights.max() - weights.min() > 0.2


@pytest.mark.parametrize('case_id', list(CASES))
def test_weights_reach_the_loss_of_the_trainer_steps(case_id, files):
    case = CASES[case_id]
    _, task = build_task(_argv(case, files))
    _check(task, case)


@pytest.mark.parametrize('case_id', ['reg-inv-freq-sqrt', 'lsr-explicit-mixup', 'none-bce-inv-freq-neg-pos'])
def test_weights_reach_the_loss_main_builds(case_id, files, tmp_path):
    case = CASES[case_id]
    argv = [*_argv(case, files), '--data-dir', files['data'], '--device', 'cpu', '-j', '0', '-b', 4,
            '--output', tmp_path / 'out']
    _, task = build_in_trainer(argv)
    _check(task, case)
    assert not (tmp_path / 'out').exists()


def test_weights_change_the_loss(files):
    """The same command line without the weight flag trains a different loss (the oracle tells them apart)."""
    case = CASES['reg-inv-freq-sqrt']
    z, target, q, _ = _inputs(case)
    weighted = oracle(case, z, q, None).item()
    plain = oracle(Case('reg', [], torch.ones(K, dtype=torch.float64), settings=case.settings), z, q, None).item()
    assert abs(weighted - plain) > 1e-2 * abs(plain)


def test_kd_term_is_not_weighted(files):
    """Weights move the CE part only: the task's kd_loss is the unweighted KD term, its task_loss the weighted CE."""
    case = CASES['reg-inv-freq-sqrt']
    _, task = build_task(_argv(case, files))
    z, target, q, images = _inputs(case)
    task.trainable_module = FixedLogits(z)
    result = task(images, target)
    s = case.settings
    virtual = s['a'] * q + (1 - s['a']) / (K - 1) * (1 - q)
    kd = s['tau'] ** 2 * kl_batchmean(torch.softmax(virtual.log() / s['tau'], 1), torch.log_softmax(z / s['tau'], 1))
    torch.testing.assert_close(result['kd_loss'], kd.detach(), rtol=0, atol=1e-10)
    # The weights are timm's float32 values.
    torch.testing.assert_close(result['task_loss'], weighted_ce(z, q, case.class_weight).detach(), rtol=1e-6, atol=0)
