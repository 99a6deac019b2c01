"""Where timm's --smoothing goes, and timm's own --kd-* distillation, in real trainer runs.

- With Mixup / CutMix, the trainer folds label smoothing into the soft targets exactly as timm's train.py does in
  mode none, not at all in lsr (its loss smooths), not at all in reg / self / kd unless --smoothing is given
  explicitly, and then with the value given: checked on a batch drawn from the loader (and Mixup object) that
  ``main`` built, whose targets must be ``lam * smooth(y) + (1 - lam) * smooth(y')`` with y' the batch reversed.
- Without Mixup, an explicit --smoothing in reg / self / kd is refused with one line and exit code 2.
- timm's --kd-model-name / --distill-loss-weight / --task-loss-weight / --kd-temperature train with --tfkd-mode
  none: the epoch's loss is the weighted sum of its parts, and the temperature changes the distillation term.
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from conftest import write_image_folder
from _train_helpers import (
    build_in_trainer, call_main, read_summary, tiny_args, train_in_process,
)

K = 5


@pytest.fixture(scope='module')
def paths(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp('smoothing')
    torch.manual_seed(0)
    save_file(timm.create_model('test_resnet', num_classes=K).state_dict(), root / 'teacher.safetensors')
    # timm's distillation teacher: 3 classes like tiny_args' runs, logits spread like a trained model's.
    kd_teacher = timm.create_model('test_resnet', num_classes=3).eval()
    with torch.no_grad():
        kd_teacher.get_classifier().weight.mul_(20.0)
    save_for_hf(kd_teacher, root / 'kd-teacher', safe_serialization=True)
    return SimpleNamespace(
        data=write_image_folder(root / 'data', classes=K, per_class=2),
        data3=write_image_folder(root / 'data3', classes=3, per_class=8),
        teacher=root / 'teacher.safetensors',
        kd_teacher=root / 'kd-teacher',
    )


def _teacher_flags(mode: str, paths: SimpleNamespace) -> list:
    return ['--tfkd-teacher-checkpoint', paths.teacher] if mode in ('self', 'kd') else []


# id -> (mode, flags, the smoothing the Mixup targets must carry)
TARGET_SMOOTHING = {
    'none-timm-default': ('none', [], 0.1),
    'none-explicit': ('none', ['--smoothing', '0.3'], 0.3),
    'lsr-explicit': ('lsr', ['--smoothing', '0.3'], 0.0),
    'reg-implicit': ('reg', [], 0.0),
    'reg-explicit': ('reg', ['--smoothing', '0.2'], 0.2),
    'reg-explicit-zero': ('reg', ['--smoothing', '0'], 0.0),
    'self-explicit': ('self', ['--smoothing', '0.15'], 0.15),
    'kd-explicit': ('kd', ['--smoothing', '0.25', '--tfkd-teacher-model', 'test_resnet'], 0.25),
}
# The prefetcher folds Mixup into the collate (FastCollateMixup); without it the loop applies a Mixup object.
LOADERS = {'prefetcher-mixup': ['--mixup', '1.0'], 'no-prefetcher-cutmix': ['--no-prefetcher', '--cutmix', '1.0']}


def _check_smoothed_mix(target: torch.Tensor, eps: float) -> None:
    """Rows are lam * smooth(y_i) + (1 - lam) * smooth(y_{B-1-i}), smooth(y) = (1 - eps) * onehot(y) + eps / K."""
    target = target.double()
    assert target.shape[1] == K
    torch.testing.assert_close(target.sum(1), torch.ones(target.shape[0], dtype=torch.float64))
    # Two labels per row leave at least K - 2 classes at eps / K.
    torch.testing.assert_close(target.min(1).values, torch.full((target.shape[0],), eps / K, dtype=torch.float64),
                               msg=lambda m: f'targets do not carry smoothing {eps:g}: {m}')
    mix = (target - eps / K) / (1 - eps)
    # A row and its mirror hold lam and 1 - lam of the same two labels: together, two whole one-hots.
    pairs = mix + mix.flip(0)
    torch.testing.assert_close(pairs, pairs.round(), atol=1e-5, rtol=0)
    assert set(pairs.round().unique().tolist()) <= {0.0, 1.0, 2.0}
    assert ((mix > 0.01) & (mix < 0.99)).any(), 'the batch was not mixed'


@pytest.mark.parametrize('loader', list(LOADERS))
@pytest.mark.parametrize('case', list(TARGET_SMOOTHING))
def test_mixup_targets_carry_the_smoothing_of_the_policy(case, loader, paths, tmp_path):
    mode, flags, eps = TARGET_SMOOTHING[case]
    argv = tiny_args(paths.data, tmp_path / 'out', 'mix', '--device', 'cpu', '--tfkd-mode', mode, *flags,
                     *_teacher_flags(mode, paths), *LOADERS[loader], num_classes=K)
    data, _ = build_in_trainer(argv)
    images, target = next(iter(data.loader_train))
    if data.mixup_fn is not None:  # what the training loop does with each batch
        images, target = data.mixup_fn(images, target)
    _check_smoothed_mix(target, eps)


@pytest.mark.parametrize('mode', ['reg', 'self', 'kd'])
@pytest.mark.parametrize('given', ['command-line', 'yaml'])
def test_explicit_smoothing_without_mixup_is_refused(mode, given, paths, tmp_path, capsys):
    extra = ['--tfkd-mode', mode, *_teacher_flags(mode, paths), '--tfkd-teacher-model', 'test_resnet']
    if given == 'yaml':
        config = tmp_path / 'config.yaml'
        config.write_text('smoothing: 0.2\n')
        argv = ['-c', config, *tiny_args(paths.data, tmp_path / 'out', 'refused', *extra, num_classes=K)]
    else:
        argv = tiny_args(paths.data, tmp_path / 'out', 'refused', '--smoothing', '0.2', *extra, num_classes=K)
    code = call_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in ('error:', '--smoothing 0.2', f'--tfkd-mode {mode}', '--mixup'):
        assert word in lines[0]
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------------------------
# timm's own distillation flags


def _timm_kd_run(paths: SimpleNamespace, output: Path, name: str, *flags) -> dict:
    argv = tiny_args(paths.data3, output, name, '--tfkd-mode', 'none', *flags)
    return read_summary(train_in_process(argv))[0]


def test_timm_kd_flags_train_with_mode_none(paths, tmp_path):
    teacher = ['--kd-model-name', f'local-dir:{paths.kd_teacher}']
    plain = _timm_kd_run(paths, tmp_path, 'plain')
    default = _timm_kd_run(paths, tmp_path, 'kd', *teacher)
    weighted = _timm_kd_run(paths, tmp_path, 'kd-weighted', *teacher, '--distill-loss-weight', '2.5')
    complementary = _timm_kd_run(paths, tmp_path, 'kd-complementary', *teacher, '--task-loss-weight', '0.3')
    cooler = _timm_kd_run(paths, tmp_path, 'kd-t1', *teacher, '--kd-temperature', '1')

    assert plain['train_kd_loss'] == 0.0  # no teacher, no distillation term
    for row in (default, weighted, complementary, cooler):
        assert row['train_kd_loss'] > 0.01
    # timm's weighting: both 1 by default; --distill-loss-weight alone keeps the task weight 1;
    # --task-loss-weight alone gives the distillation 1 - that weight.
    for row, task_weight, distill_weight in ((default, 1.0, 1.0), (cooler, 1.0, 1.0), (weighted, 1.0, 2.5),
                                             (complementary, 0.3, 0.7)):
        assert row['train_loss'] == pytest.approx(
            task_weight * row['train_task_loss'] + distill_weight * row['train_kd_loss'], rel=1e-5)
    assert abs(cooler['train_kd_loss'] - default['train_kd_loss']) > 0.05 * default['train_kd_loss']
    assert weighted['train_kd_loss'] != default['train_kd_loss']  # the weights trained the student differently
