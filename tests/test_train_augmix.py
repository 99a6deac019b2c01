"""timm's AugMix splits in the trainer: ``--aug-splits``, ``--split-bn``, ``--jsd-loss`` and ``--resplit``.

- The training batches are timm's AugMix layout: N views of each image in N blocks, the clean block first, the
  labels repeated; ``--resplit`` spares the clean block from random erasing.
- Each mode trains on the splits as README defines it, checked on logits the test controls against float64
  formulas written here: none and lsr take their loss over every view (or timm's JSD loss with ``--jsd-loss``);
  reg, self and kd take the cross-entropy over every view and the KD term over the clean views only, and the
  teacher of self / kd sees the clean views alone.
- Real tiny runs with each flag finish; ``--split-bn`` trains one batch norm per split, and its run is used
  downstream as the clean-split model (evaluate scores what the trainer validated; a self teacher reads it).
"""
import json
import math
from pathlib import Path
from typing import Dict, Optional

import pytest
import timm
import torch
import torch.nn.functional as F

from timm_tfkd.cli import main as cli_main
from conftest import write_image_folder
from _train_helpers import (
    FixedLogits, assert_run_files, build_in_trainer, load_state_dict, once_per_key, random_network, read_summary,
    tiny_args, train_in_process,
)

K = 5  # classes of the loss cases
B = 4  # images per split
SPLITS = 3
IMG = 16
JSD_WEIGHT = 12.0  # timm's JsdCrossEntropy weight of the Jensen-Shannon term (its default, as train.py uses it)


# ---------------------------------------------------------------------------------------------------------------
# The batches


@pytest.fixture(scope='module')
def data(workdir) -> Path:
    """3 classes, 8 images each: 24 training images, three batches of 8."""
    return write_image_folder(workdir / 'data')


def _first_batch(data: Path, out: Path, *flags) -> tuple:
    loaders, _ = build_in_trainer(tiny_args(data, out, 'batch', '--aug-splits', SPLITS, *flags))
    input, target = next(iter(loaders.loader_train))
    return input, target


@pytest.mark.parametrize('jitter', [0.0, 0.4])
def test_a_batch_holds_the_views_of_each_image_clean_first(data, tmp_path, jitter):
    """The views share the image and its crop (AugMixDataset's base transform); without an augmentation left for
    the augmented views (no colour jitter, no --aa) they equal the clean one."""
    input, target = _first_batch(data, tmp_path / 'out', '--color-jitter', jitter)
    assert input.shape == (SPLITS * 8, 3, IMG, IMG)
    views = input.view(SPLITS, 8, 3, IMG, IMG)
    assert torch.equal(target, target[:8].repeat(SPLITS))
    for view in views[1:]:
        assert torch.equal(view, views[0]) == (jitter == 0.0)


@pytest.mark.parametrize('resplit', [False, True])
def test_resplit_spares_the_clean_split_from_random_erasing(data, tmp_path, resplit):
    """Erasing fills with 0 (--remode const), a value no normalized pixel takes ((x - 127.5) / 127.5, x integer)."""
    flags = ['--reprob', '1', '--remode', 'const', '--color-jitter', '0'] + (['--resplit'] if resplit else [])
    input, _ = _first_batch(data, tmp_path / 'out', *flags)
    erased = (input == 0).flatten(1).any(dim=1).view(SPLITS, 8)
    assert erased[1:].all()
    assert not erased[0].any() if resplit else erased[0].all()


# ---------------------------------------------------------------------------------------------------------------
# The loss of each mode on the splits, float64


def _log_p(z: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z, 1)


def _ce(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return -(q * _log_p(z)).sum(1).mean()


def _kl_rows(t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    return (t * (torch.log(t) - log_s)).sum(1)


def _jsd_loss(z: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Cross-entropy (smoothed eps / K on every class) on the clean split + 12 x the Jensen-Shannon divergence of
    the splits' softmaxes from their mixture (clamped at 1e-7), KL summed over classes and averaged over images."""
    clean = _ce(z[:B], (1 - eps) * F.one_hot(labels, K).double() + eps / K)
    probs = torch.softmax(z, 1).view(SPLITS, B, K)
    mixture = probs.mean(0).clamp(1e-7, 1)
    divergence = sum((p * (p.log() - mixture.log())).sum() / B for p in probs) / SPLITS
    return clean + JSD_WEIGHT * divergence


def oracle(mode: str, s: Dict, z: torch.Tensor, labels: torch.Tensor,
           teacher_logits: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """What README defines for ``mode`` with settings ``s`` on logits ``z`` of SPLITS x B views of B images."""
    q = F.one_hot(labels.repeat(SPLITS), K).double()  # every view has its image's label
    if s.get('jsd'):
        return {'loss': _jsd_loss(z, labels, s['eps'])}
    if mode in ('none', 'lsr'):
        eps = s['eps']
        if s.get('convention', 'timm') == 'timm':  # eps / K on every class
            smoothed = (1 - eps) * q + eps / K
        else:  # eps / (K - 1) on the wrong classes
            smoothed = (1 - eps) * q + eps / (K - 1) * (1 - q)
        return {'loss': _ce(z, smoothed)}
    alpha, tau, m, paper = s['alpha'], s['tau'], s['m'], s['formula'] == 'paper'
    clean, q_clean = z[:B], q[:B]
    if mode == 'reg':
        a = s['a']
        virtual = a * q_clean + (1 - a) / (K - 1) * (1 - q_clean)
        if paper:
            kd = tau ** 2 * m * _kl_rows(torch.softmax(virtual.log() / tau, 1), _log_p(clean / tau)).mean()
        else:
            kd = m * _kl_rows(torch.softmax(virtual / tau, 1), _log_p(clean)).sum() / clean.numel()
    else:
        rows = _kl_rows(torch.softmax(teacher_logits / tau, 1), _log_p(clean / tau))
        kd = tau ** 2 * m * (rows.mean() if paper else rows.sum() / clean.numel())
    ce = _ce(z, q)  # over every view
    return {'loss': (1 - alpha) * ce + alpha * kd, 'task_loss': ce, 'kd_loss': kd}


DISTILL = dict(alpha=0.1, tau=20.0, m=1.0, formula='paper', a=0.99)
# id -> (mode, flags, the settings the oracle reads)
LOSS_CASES = {
    'none': ('none', ['--smoothing', '0.2'], dict(eps=0.2)),
    'none-jsd': ('none', ['--jsd-loss', '--smoothing', '0.2'], dict(jsd=True, eps=0.2)),
    'none-jsd-unsmoothed': ('none', ['--jsd-loss', '--smoothing', '0'], dict(jsd=True, eps=0.0)),
    'lsr': ('lsr', ['--smoothing', '0.3'], dict(eps=0.3)),
    'lsr-reference': ('lsr', ['--smoothing', '0.3', '--tfkd-smoothing-convention', 'reference'],
                      dict(eps=0.3, convention='reference')),
    'lsr-jsd': ('lsr', ['--jsd-loss', '--smoothing', '0.3'], dict(jsd=True, eps=0.3)),
    'reg': ('reg', ['--tfkd-alpha', '0.3', '--tfkd-temperature', '4', '--tfkd-correct-prob', '0.8'],
            dict(DISTILL, alpha=0.3, tau=4.0, a=0.8)),
    'reg-official': ('reg', ['--tfkd-formula', 'official', '--tfkd-alpha', '0.4', '--tfkd-temperature', '2',
                             '--tfkd-multiplier', '3'], dict(DISTILL, formula='official', alpha=0.4, tau=2.0, m=3.0)),
    'self': ('self', ['--tfkd-alpha', '0.6', '--tfkd-temperature', '3'], dict(DISTILL, alpha=0.6, tau=3.0)),
    'kd-official': ('kd', ['--tfkd-formula', 'official', '--tfkd-alpha', '0.5', '--tfkd-temperature', '2',
                           '--tfkd-multiplier', '2'], dict(DISTILL, formula='official', alpha=0.5, tau=2.0, m=2.0)),
}




@pytest.fixture(scope='module')
def teacher(workdir):
    """A saved test_resnet (the student's architecture and normalization, so the teacher sees the input as is)."""
    network = random_network('test_resnet', K, seed=1)
    path = workdir / 'teacher.pth.tar'
    torch.save({'arch': 'test_resnet', 'state_dict': network.state_dict()}, path)
    return path, network.double()


@pytest.fixture(scope='module')
def loss_data(workdir) -> Path:
    return write_image_folder(workdir / 'data5', classes=K, per_class=2)




@pytest.mark.parametrize('case_id', list(LOSS_CASES))
def test_each_mode_trains_on_the_splits_as_defined(case_id, teacher, loss_data, tmp_path):
    mode, flags, settings = LOSS_CASES[case_id]
    teacher_path, teacher_network = teacher
    teacher_flags = ['--tfkd-teacher-checkpoint', teacher_path] if mode in ('self', 'kd') else []
    teacher_flags += ['--tfkd-teacher-model', 'test_resnet'] if mode == 'kd' else []
    argv = tiny_args(loss_data, tmp_path / 'out', 'loss', '--tfkd-mode', mode, '--aug-splits', SPLITS, *flags,
                     *teacher_flags, num_classes=K, batch_size=B)
    _, task = build_in_trainer(argv)

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(SPLITS * B, K, generator=g, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, K, (B,), generator=g)
    images = torch.randn(SPLITS * B, 3, IMG, IMG, generator=g)
    task.trainable_module = FixedLogits(z)
    task.train()
    seen = []
    if mode in ('self', 'kd'):
        task.teacher.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[0]))
    result = task(images, labels.repeat(SPLITS))

    teacher_logits = None
    if mode in ('self', 'kd'):
        assert seen == [B], 'the teacher must see the clean split only'
        with torch.no_grad():
            teacher_logits = teacher_network(images[:B].double())
    expected = oracle(mode, settings, z, labels, teacher_logits)
    tolerance = dict(rtol=1e-5, atol=1e-6) if teacher_logits is not None else dict(rtol=1e-7, atol=1e-9)
    for key, value in expected.items():
        torch.testing.assert_close(result[key].double(), value.detach(), **tolerance, msg=lambda m: f'{key}: {m}')
    grad, = torch.autograd.grad(result['loss'], z)
    grad_expected, = torch.autograd.grad(expected['loss'], z)
    torch.testing.assert_close(grad.double(), grad_expected, **tolerance)


def test_the_oracle_tells_clean_split_kd_from_kd_on_every_view():
    """The cases could not fail if the KD term were the same on every view: it is not, for these logits."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(SPLITS * B, K, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, K, (B,), generator=g)
    settings = LOSS_CASES['reg'][2]
    on_clean = oracle('reg', settings, z, labels, None)['kd_loss']
    tau, a = settings['tau'], settings['a']
    q = F.one_hot(labels.repeat(SPLITS), K).double()
    virtual = torch.softmax((a * q + (1 - a) / (K - 1) * (1 - q)).log() / tau, 1)
    on_all = tau ** 2 * _kl_rows(virtual, _log_p(z / tau)).mean()
    assert abs(on_all - on_clean) > 0.05 * on_clean


# ---------------------------------------------------------------------------------------------------------------
# Real runs


RUNS = {
    'splits': ['--aug-splits', '3'],
    'splits-jsd-split-bn': ['--aug-splits', '3', '--jsd-loss', '--split-bn'],
    'no-prefetcher': ['--aug-splits', '2', '--split-bn', '--no-prefetcher'],  # the loss needs every view's label
    'split-bn-resplit': ['--split-bn', '--resplit', '--reprob', '0.5'],
    'reg': ['--tfkd-mode', 'reg', '--aug-splits', '2', '--split-bn'],
    'lsr-jsd': ['--tfkd-mode', 'lsr', '--aug-splits', '2', '--jsd-loss'],
}
# Batch norms per split of each --split-bn run: one for the clean split plus auxiliary ones.
SPLIT_BN = {'splits-jsd-split-bn': 3, 'no-prefetcher': 2, 'split-bn-resplit': 2, 'reg': 2}


@pytest.fixture(scope='module')
def runs(data, workdir):
    return once_per_key(lambda name: train_in_process(tiny_args(data, workdir / 'runs', name, *RUNS[name])))


@pytest.mark.parametrize('name', list(RUNS))
def test_runs_with_each_flag_finish(name, runs):
    run = runs(name)
    assert_run_files(run, epochs=1)
    row, = read_summary(run)
    assert math.isfinite(row['train_loss']) and math.isfinite(row['eval_nll'])


@pytest.mark.parametrize('name', list(SPLIT_BN))
def test_split_bn_trains_one_batch_norm_per_split(name, runs):
    weights = load_state_dict(runs(name) / 'last.pth.tar')
    plain = timm.create_model('test_resnet', num_classes=3).state_dict()
    norms = [key[:-len('.running_mean')] for key in plain if key.endswith('.running_mean')]
    for norm in norms:
        auxiliary = [f'{norm}.aux_bn.{i}' for i in range(SPLIT_BN[name] - 1)]
        assert all(f'{aux}.running_mean' in weights for aux in auxiliary)
        assert f'{norm}.aux_bn.{SPLIT_BN[name] - 1}.running_mean' not in weights
    # The auxiliary norms normalized other images than the clean split's: their statistics moved apart.
    first = norms[0]
    assert not torch.allclose(weights[f'{first}.aux_bn.0.running_mean'], weights[f'{first}.running_mean'])


def test_a_split_bn_run_is_its_clean_split_model_downstream(runs, data, workdir, capsys):
    """evaluate scores what the trainer validated (timm's split norm evaluates with the clean split's), and the
    run serves as a Tf-KD-self teacher, also on AugMix splits."""
    run = runs('splits-jsd-split-bn')
    capsys.readouterr()
    assert cli_main(['evaluate', str(run), '--data-dir', str(data), '--split', 'validation']) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row, = read_summary(run)
    assert scored['top1'] == pytest.approx(row['eval_top1']) and scored['nll'] == pytest.approx(row['eval_nll'])
    student = train_in_process(tiny_args(data, workdir / 'runs', 'self-from-split-bn', '--tfkd-mode', 'self',
                                         '--aug-splits', '2', '--tfkd-teacher-checkpoint', run))
    row, = read_summary(student)
    assert math.isfinite(row['train_kd_loss']) and row['train_kd_loss'] > 0
