"""timm's NaFlex loader (``--naflex-loader``) with every Tf-KD mode: a tiny NaFlexViT trains and validates on batches
of patches; with self and kd the teacher gets the student's very batch, its patch values re-normalized per channel in
the loader's layout (P-P-C, and C-P-P with ``--naflex-patchify-channels-first``), checked against the saved teacher
network run by hand on patches re-normalized here; no checkpoint holds teacher weights; each batch's loss is scaled
as ``--naflex-loss-scale`` says, and under DDP by the rank's share of the global batch (two real gloo processes); a
Tf-KD-self NaFlex run under torchrun validates to the metrics of its saved model computed in one process."""
import math
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.data import create_dataset, create_naflex_loader

from timm_tfkd.checkpoint_io import read_checkpoint
from timm_tfkd.train.data import LossScale
from conftest import write_image_folder
from _train_helpers import (
    TRAIN_SCRIPT, assert_run_files, read_run_info, read_summary, run_subprocess, tiny_args, train_in_process,
)

MODEL = 'naflexvit_base_patch16_gap'
TINY = {'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'patch_size': 8}
BATCH = 8
# With --seed 42, 24 images and -b 8, the NaFlex schedule of sequence lengths 8 and 16 is two batches: 16 samples of
# 8 patches (8 x 16 tokens / 8) and 8 of 16 (timm rounds batch sizes down to multiples of 8).
SEQ_LENS = ('8', '16')
# The student normalizes with these; the teacher was trained with its model's default (0.5): re-normalization has
# a different gain and offset on every channel.
STUDENT_MEAN, STUDENT_STD = (0.4, 0.45, 0.55), (0.2, 0.25, 0.3)
LAYOUTS = {'P-P-C': True, 'C-P-P': False}  # name -> channels last


def naflex_args(data: Path, output: Path, experiment: str, *extra, layout: str = 'P-P-C',
                variable_patches: bool = False) -> List[str]:
    """A tiny NaFlexViT run on the NaFlex loader; ``variable_patches``: 4 and 8 px patches, which the model
    projects by interpolating its patch embedding."""
    channels_last = LAYOUTS[layout]
    kwargs = [f'{k}={v}' for k, v in TINY.items()] + ([] if channels_last else ['patchify_channels_last=False'])
    if variable_patches:
        kwargs.append('enable_patch_interpolator=True')
        extra = ('--naflex-patch-sizes', '4', '8', *extra)
    return tiny_args(data, output, experiment, '--model-kwargs', *kwargs, '--naflex-loader', '--naflex-train-seq-lens',
                     *SEQ_LENS, '--naflex-max-seq-len', '16', *([] if channels_last else
                                                            ['--naflex-patchify-channels-first']),
                     *extra, model=MODEL, img_size=32, batch_size=BATCH)


def tiny_naflexvit(layout: str, variable_patches: bool = False) -> torch.nn.Module:
    return timm.create_model(MODEL, num_classes=3, patchify_channels_last=LAYOUTS[layout],
                             enable_patch_interpolator=variable_patches, **TINY)


@pytest.fixture(scope='module')
def data32(workdir) -> Path:
    return write_image_folder(workdir / 'data32', size=32)


@pytest.fixture(scope='module')
def teachers(workdir, data32) -> Dict[str, Path]:
    """A plain cross-entropy NaFlex run per patch layout, and one on variable patch sizes: the frozen teachers."""
    runs = {layout: train_in_process(naflex_args(data32, workdir / 'out', f'teacher-{layout}', '--smoothing', '0',
                                                 '--seed', '1', layout=layout))
            for layout in LAYOUTS}
    runs['variable'] = train_in_process(naflex_args(data32, workdir / 'out', 'teacher-variable', '--smoothing', '0',
                                                    '--seed', '1', layout='C-P-P', variable_patches=True))
    return runs




def pixels_of(patches: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The patch values as (..., pixel, C): flattened P-P-C / C-P-P patches, or (Ph, Pw, C) / (C, Ph, Pw) grids."""
    if patches.ndim == 3:
        b, n, d = patches.shape
        return patches.view(b, n, d // 3, 3) if channels_last else patches.view(b, n, 3, d // 3).transpose(2, 3)
    return patches if channels_last else patches.movedim(2, -1)


def patches_of(pixels: torch.Tensor, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if like.ndim == 3:
        return (pixels if channels_last else pixels.transpose(2, 3)).reshape(like.shape)
    return pixels if channels_last else pixels.movedim(-1, 2)


def teacher_logits_by_hand(teacher_run: Path, batch: dict, layout: str, variable_patches: bool = False
                           ) -> torch.Tensor:
    """The saved teacher network on the student's patches re-normalized from the student's statistics to the
    teacher's, x_t = (x * std_s + mean_s - mean_t) / std_t per channel, in float64, channels found by layout."""
    model = tiny_naflexvit(layout, variable_patches)
    model.load_state_dict(read_checkpoint(str(teacher_run / 'model_best.pth.tar'))['state_dict'])
    model.eval()
    config = read_run_info(teacher_run)['data_config']
    patches = batch['patches'].double()
    mean_s, std_s = torch.tensor(STUDENT_MEAN, dtype=torch.float64), torch.tensor(STUDENT_STD, dtype=torch.float64)
    mean_t, std_t = (torch.tensor(config[k], dtype=torch.float64) for k in ('mean', 'std'))
    pixels = (pixels_of(patches, LAYOUTS[layout]) * std_s + mean_s - mean_t) / std_t
    with torch.inference_mode():
        return model({**batch, 'patches': patches_of(pixels, patches, LAYOUTS[layout]).float()})


def assert_checkpoint_is_the_student(run: Path, layout: str) -> None:
    checkpoint = read_checkpoint(str(run / 'last.pth.tar'))
    student = tiny_naflexvit(layout)
    assert set(checkpoint['state_dict']) == set(student.state_dict())
    assert not [key for key in checkpoint['state_dict'] if 'teacher' in key]
    optimized = sum(len(group['params']) for group in checkpoint['optimizer']['param_groups'])
    assert optimized == len(list(student.parameters()))


# mode -> (layout, extra flags); the modes also cover timm's Mixup for NaFlex and the loop without the prefetcher
# (which casts the patch values to the model's dtype).
MODES = {
    'none': ('P-P-C', ()),
    'lsr': ('P-P-C', ('--no-prefetcher', '--model-dtype', 'bfloat16')),
    'reg': ('P-P-C', ('--mixup', '0.5', '--cutmix', '0.5')),
    'self': ('P-P-C', ('--tfkd-alpha', '0.5', '--tfkd-temperature', '4')),
    'kd': ('C-P-P', ('--tfkd-teacher-model', MODEL, '--no-prefetcher')),
}


@pytest.mark.parametrize('mode', MODES)
def test_every_mode_trains_on_naflex_batches(mode, workdir, data32, teachers, teacher_uses):
    layout, extra = MODES[mode]
    teacher = ('--tfkd-teacher-checkpoint', teachers[layout]) if mode in ('self', 'kd') else ()
    run = train_in_process(naflex_args(data32, workdir / 'out', mode, '--tfkd-mode', mode, *teacher, '--mean',
                                       *STUDENT_MEAN, '--std', *STUDENT_STD, *extra, layout=layout))
    assert_run_files(run, 1)
    row = read_summary(run)[0]
    assert all(math.isfinite(value) for value in row.values()), row
    assert (row['train_kd_loss'] > 0) == (mode in ('reg', 'self', 'kd'))
    assert_checkpoint_is_the_student(run, layout)
    if mode in ('self', 'kd'):
        assert [use['input']['patches'].shape[:2] for use in teacher_uses] == [(8, 16), (16, 8)]
        for use in teacher_uses:
            torch.testing.assert_close(use['teacher_logits'], teacher_logits_by_hand(teachers[layout], use['input'],
                                                                                     layout), rtol=1e-4, atol=1e-5)


def test_self_on_variable_patch_sizes(workdir, data32, teachers, teacher_uses):
    """--naflex-patch-sizes keeps patches as (C, Ph, Pw) grids of 4 or 8 px (with --seed 44, one batch of each);
    the teacher re-normalizes those."""
    run = train_in_process(naflex_args(data32, workdir / 'out', 'self-variable', '--tfkd-mode', 'self',
                                       '--tfkd-teacher-checkpoint', teachers['variable'], '--mean', *STUDENT_MEAN,
                                       '--std', *STUDENT_STD, '--seed', '44', layout='C-P-P',
                                       variable_patches=True))
    assert all(math.isfinite(value) for value in read_summary(run)[0].values())
    assert {use['input']['patches'].shape[2:] for use in teacher_uses} == {(3, 4, 4), (3, 8, 8)}
    for use in teacher_uses:
        torch.testing.assert_close(use['teacher_logits'], teacher_logits_by_hand(
            teachers['variable'], use['input'], 'C-P-P', variable_patches=True), rtol=1e-4, atol=1e-5)


@pytest.fixture
def backward_losses(monkeypatch) -> List[float]:
    """The value of every tensor the training loop calls backward() on."""
    seen: List[float] = []
    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        seen.append(self.detach().item())
        return real_backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, 'backward', backward)
    return seen


@pytest.fixture
def step_losses(monkeypatch) -> List[tuple]:
    """(batch size, loss) of every training step of timm's classification task."""
    seen: List[tuple] = []
    real_forward = timm.task.ClassificationTask.forward

    def forward(self, input, target):
        result = real_forward(self, input, target)
        seen.append((input['patches'].shape[0], result['loss'].item()))
        return result

    monkeypatch.setattr(timm.task.ClassificationTask, 'forward', forward)
    return seen


@pytest.mark.parametrize('scale', ['none', 'sqrt', 'linear'])
def test_each_batch_loss_is_scaled_by_its_size(scale, workdir, data32, backward_losses, step_losses):
    train_in_process(naflex_args(data32, workdir / 'out', f'scale-{scale}', '--naflex-loss-scale', scale))
    assert [size for size, _ in step_losses] == [8, 16]
    factors = {'none': lambda b: 1.0, 'sqrt': lambda b: math.sqrt(b / BATCH), 'linear': lambda b: b / BATCH}[scale]
    assert backward_losses == pytest.approx([loss * factors(size) for size, loss in step_losses], rel=1e-6)


def _factor_on_rank(rank: int, port: int, batch_sizes, results) -> None:
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=len(batch_sizes))
    try:
        scale = LossScale('linear', reference=8.0, across_ranks=True)
        results[rank] = float(scale.factor(batch_sizes[rank], torch.device('cpu'), len(batch_sizes)))
    finally:
        dist.destroy_process_group()


def test_under_ddp_each_rank_is_weighed_by_its_share_of_the_global_batch():
    """timm's train.py: a rank's loss times (world size x its batch / global batch), on top of the linear scale."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    batch_sizes = (16, 8)
    results = mp.Manager().dict()
    # Forked children inherit the imported modules (spawned ones would import torch and timm again, for seconds).
    mp.start_processes(_factor_on_rank, args=(port, batch_sizes, results), nprocs=2, join=True, start_method='fork')
    total = sum(batch_sizes)
    assert [results[rank] for rank in range(2)] == pytest.approx(
        [(b / 8) * (2 * b / total) for b in batch_sizes], rel=1e-6)


@pytest.fixture
def step_targets(monkeypatch) -> List[torch.Tensor]:
    """The targets of every training step of timm's classification task."""
    seen: List[torch.Tensor] = []
    real_forward = timm.task.ClassificationTask.forward

    def forward(self, input, target):
        seen.append(target.detach().clone())
        return real_forward(self, input, target)

    monkeypatch.setattr(timm.task.ClassificationTask, 'forward', forward)
    return seen


def timm_naflex_targets(data: Path, seed: int, epoch: int) -> List[List[int]]:
    """The labels of each training batch of an epoch as timm's own NaFlex loader orders them."""
    dataset = create_dataset('', root=str(data), split='train', is_training=True)
    loader = create_naflex_loader(dataset, patch_size=(8, 8), train_seq_lens=tuple(map(int, SEQ_LENS)),
                                  batch_size=BATCH, is_training=True, seed=seed, num_workers=0, use_prefetcher=False,
                                  pin_memory=False)
    loader.dataset.set_epoch(epoch)
    return [target.tolist() for _, target in loader]


def test_every_epoch_has_the_order_of_timms_naflex_loader_for_the_seed(workdir, data32, step_targets):
    train_in_process(naflex_args(data32, workdir / 'out', 'order', '--seed', '5', '--epochs', '2'))
    per_epoch = [timm_naflex_targets(data32, 5, epoch) for epoch in range(2)]
    assert per_epoch[0] != per_epoch[1]
    assert [target.tolist() for target in step_targets] == per_epoch[0] + per_epoch[1]


def test_naflex_mixup_mixes_until_mixup_off_epoch(workdir, data32, step_targets):
    train_in_process(naflex_args(data32, workdir / 'out', 'mixup-off', '--mixup', '0.5', '--mixup-prob', '1',
                                 '--mixup-off-epoch', '1', '--smoothing', '0', '--epochs', '2'))
    assert all(target.shape == (len(target), 3) for target in step_targets)
    mixed = [bool((target.max(1).values < 1).any()) for target in step_targets]
    assert mixed == [True, True, False, False]  # two batches an epoch


def test_naflex_flags_without_the_loader_are_one_warning(workdir, data32, capsys):
    run = train_in_process(tiny_args(data32, workdir / 'out', 'no-naflex', '--naflex-max-seq-len', '64',
                                     '--naflex-loss-scale', 'sqrt'))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('WARNING')]
    assert warnings == [
        'WARNING: --naflex-max-seq-len, --naflex-loss-scale have no effect without --naflex-loader, as in timm']
    assert run.is_dir()


def test_naflex_validation_patchifies_at_max_seq_len(workdir, data32, monkeypatch):
    """Validation batches have --naflex-max-seq-len patches per image (32 px at 8 px patches: 16 valid ones)."""
    shapes = []
    real_forward = timm.models.naflexvit.NaFlexVit.forward

    def forward(self, x, *args, **kwargs):
        if not self.training and isinstance(x, dict) and x['patches'].shape[0] > 1:
            shapes.append((tuple(x['patches'].shape), x['patch_valid'].sum(1).tolist()))
        return real_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(timm.models.naflexvit.NaFlexVit, 'forward', forward)
    train_in_process(naflex_args(data32, workdir / 'out', 'validation-shapes', '-vb', '12'))
    assert shapes == [((12, 16, 192), [16] * 12)] * 2


def naflex_validation_by_hand(run: Path, data: Path) -> Dict[str, float]:
    """Top-1 and NLL of the run's saved model over timm's NaFlex validation batches, in this one process."""
    info = read_run_info(run)
    model = tiny_naflexvit('P-P-C')
    model.load_state_dict(read_checkpoint(str(run / 'last.pth.tar'))['state_dict'])
    model.eval()
    dataset = create_dataset('', root=str(data), split='validation', is_training=False)
    loader = create_naflex_loader(dataset, patch_size=(8, 8), max_seq_len=16, batch_size=5, is_training=False,
                                  mean=tuple(info['data_config']['mean']), std=tuple(info['data_config']['std']),
                                  num_workers=0, use_prefetcher=False, pin_memory=False)
    right = nll = 0.0
    with torch.inference_mode():
        for batch, target in loader:
            log_probs = F.log_softmax(model(batch).double(), dim=1)
            right += (log_probs.argmax(1) == target).sum().item()
            nll -= log_probs.gather(1, target[:, None]).sum().item()
    return {'top1': 100 * right / len(dataset), 'nll': nll / len(dataset)}


@pytest.mark.slow
def test_self_on_naflex_batches_under_torchrun(workdir, data32, teachers):
    argv = naflex_args(data32, workdir / 'ddp', 'self', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint',
                       teachers['P-P-C'])
    result = run_subprocess([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             TRAIN_SCRIPT, *argv], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = workdir / 'ddp' / 'self'
    assert sorted(p.name for p in (workdir / 'ddp').iterdir()) == ['self']
    assert_run_files(run, 1)
    row = read_summary(run)[0]
    assert all(math.isfinite(value) for value in row.values()), row
    expected = naflex_validation_by_hand(run, data32)
    assert row['eval_top1'] == pytest.approx(expected['top1'])
    assert row['eval_nll'] == pytest.approx(expected['nll'], rel=1e-5)
    assert_checkpoint_is_the_student(run, 'P-P-C')
