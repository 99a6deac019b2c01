"""Scheduled-resolution training (timm's ``--train-img-sizes`` with ``--train-batch-sizes`` / ``--train-size-probs``):
batches come at each size with its batch size; the teacher of a self run sees each batch at the student's size and
its logits are the saved teacher network's on those images re-normalized by hand; the learning rate is scaled for
the schedule's average batch and ``--variable-batch-loss-scale`` scales each batch loss by its size over that
average; and, since this loader's sampler cannot skip trained batches, a run resumes exactly at an epoch boundary,
while a run stopped mid-epoch trains that epoch again from its start (with a warning) and still ends as an
uninterrupted run does."""
import math
from pathlib import Path
from typing import List

import pytest
import timm
import torch
from timm.data.scheduled_sampler import ScheduledBatchSampler
from torch.utils.data import RandomSampler

import timm_tfkd.train.main as trainer_main
from timm_tfkd.checkpoint_io import read_checkpoint
from _train_helpers import (
    assert_nested_equal, assert_run_files, call_main, read_run_info, read_summary, tiny_args, train_in_process,
)

SIZES = ('--train-img-sizes', '16', '24', '--train-batch-sizes', '8', '4', '--train-size-probs', '0.5', '0.5')
AVERAGE_BATCH = 0.5 * 8 + 0.5 * 4
BATCH_OF_SIZE = {16: 8, 24: 4}
STUDENT_MEAN, STUDENT_STD = (0.4, 0.45, 0.55), (0.2, 0.25, 0.3)
EPOCHS = 2
# Random erasing draws from the global RNGs, which a resume must restore.
SEED = 2  # its schedule of 24 images is ordered differently in epochs 0 and 1
COMMON = ('--seed', str(SEED), '--reprob', '0.25', '--smoothing', '0')


@pytest.fixture(scope='module')
def teacher(workdir, data_dir) -> Path:
    return train_in_process(tiny_args(data_dir, workdir / 'out', 'teacher', '--smoothing', '0', '--seed', '1'))


def self_args(data_dir: Path, output: Path, experiment: str, teacher: Path, *extra) -> List[str]:
    return tiny_args(data_dir, output, experiment, *SIZES, *COMMON, '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint',
                     teacher, '--tfkd-alpha', '0.5', '--tfkd-temperature', '4', '--mean', *STUDENT_MEAN, '--std',
                     *STUDENT_STD, *extra, epochs=EPOCHS)




def teacher_logits_by_hand(teacher_run: Path, images: torch.Tensor) -> torch.Tensor:
    model = timm.create_model('test_resnet', num_classes=3)
    model.load_state_dict(read_checkpoint(str(teacher_run / 'model_best.pth.tar'))['state_dict'])
    model.eval()
    config = read_run_info(teacher_run)['data_config']
    shape = (1, 3, 1, 1)
    mean_s, std_s = (torch.tensor(v, dtype=torch.float64).view(shape) for v in (STUDENT_MEAN, STUDENT_STD))
    mean_t, std_t = (torch.tensor(config[k], dtype=torch.float64).view(shape) for k in ('mean', 'std'))
    with torch.inference_mode():
        return model(((images.double() * std_s + mean_s - mean_t) / std_t).float())


def timm_batch_sizes(epoch: int) -> List[int]:
    """The batch sizes of an epoch as timm's sampler draws them for 24 images and these settings."""
    sampler = ScheduledBatchSampler(RandomSampler(range(24)), batch_sizes=(8, 4), choice_weights=(0.5, 0.5), seed=SEED)
    sampler.set_epoch(epoch)
    return [len(batch) for batch in sampler]


@pytest.fixture(scope='module')
def uninterrupted(workdir, data_dir, teacher) -> Path:
    return train_in_process(self_args(data_dir, workdir / 'out', 'whole', teacher, '--recovery-interval', '1'))


def test_batches_come_at_every_size_and_the_teacher_sees_them(workdir, data_dir, teacher, teacher_uses):
    run = train_in_process(self_args(data_dir, workdir / 'out', 'sizes', teacher))
    assert_run_files(run, EPOCHS)
    assert all(math.isfinite(v) for row in read_summary(run) for v in row.values())
    assert [use['input'].shape[0] for use in teacher_uses] == timm_batch_sizes(0) + timm_batch_sizes(1)
    assert timm_batch_sizes(0) != timm_batch_sizes(1)
    for use in teacher_uses:
        assert use['input'].shape[0] == BATCH_OF_SIZE[use['input'].shape[-1]]
        torch.testing.assert_close(use['teacher_logits'], teacher_logits_by_hand(teacher, use['input']),
                                   rtol=1e-4, atol=1e-5)


def test_learning_rate_and_loss_scale_follow_the_average_batch(workdir, data_dir, monkeypatch):
    argv = tiny_args(data_dir, workdir / 'out', 'scaled', *SIZES, '--variable-batch-loss-scale', 'linear',
                     '--lr-base', '0.1', '--lr-base-size', '256')
    argv.pop(argv.index('--lr') + 1)
    argv.remove('--lr')
    steps, backward = [], []
    real_forward, real_backward = timm.task.ClassificationTask.forward, torch.Tensor.backward

    def forward(self, input, target):
        result = real_forward(self, input, target)
        steps.append((input.shape[0], result['loss'].item()))
        return result

    def recording_backward(self, *args, **kwargs):
        backward.append(self.detach().item())
        return real_backward(self, *args, **kwargs)

    monkeypatch.setattr(timm.task.ClassificationTask, 'forward', forward)
    monkeypatch.setattr(torch.Tensor, 'backward', recording_backward)
    run = train_in_process(argv)
    assert read_summary(run)[0]['lr'] == pytest.approx(0.1 * AVERAGE_BATCH / 256)  # timm's linear scaling (SGD)
    assert {size for size, _ in steps} == {8, 4}
    assert backward == pytest.approx([loss * size / AVERAGE_BATCH for size, loss in steps], rel=1e-6)


def assert_same_end(run: Path, reference: Path) -> None:
    got, expected = read_checkpoint(str(run / 'last.pth.tar')), read_checkpoint(str(reference / 'last.pth.tar'))
    for key in ('epoch', 'state_dict', 'optimizer'):
        assert_nested_equal(got[key], expected[key], key)
    assert read_summary(run) == read_summary(reference)


def test_resume_at_an_epoch_boundary_matches_an_uninterrupted_run(workdir, data_dir, teacher, uninterrupted):
    argv = self_args(data_dir, workdir / 'out', 'stopped', teacher, '--recovery-interval', '1')
    run = train_in_process([*argv, '--stop-epoch', '1'])
    assert [row['epoch'] for row in read_summary(run)] == [0]
    train_in_process([*argv, '--resume', 'auto'])
    assert_same_end(run, uninterrupted)


def test_a_run_stopped_mid_epoch_trains_that_epoch_again(workdir, data_dir, teacher, uninterrupted, monkeypatch,
                                                        capsys):
    real_saver = trainer_main._recovery_saver

    def stop_after_first_recovery_of_epoch_1(saver, folder):
        save = real_saver(saver, folder)

        def save_then_stop(epoch, batch_idx, progress):
            save(epoch, batch_idx, progress)
            if epoch == 1:
                raise KeyboardInterrupt
        return save_then_stop

    argv = self_args(data_dir, workdir / 'out', 'interrupted', teacher, '--recovery-interval', '1')
    with monkeypatch.context() as patch:
        patch.setattr(trainer_main, '_recovery_saver', stop_after_first_recovery_of_epoch_1)
        assert call_main(argv) == 130
    run = Path(argv[argv.index('--output') + 1]) / 'interrupted'
    assert [p.name for p in run.glob('recovery-*')] == ['recovery-1-0.pth.tar']
    capsys.readouterr()
    train_in_process([*argv, '--resume', 'auto'])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('WARNING')]
    assert any('stopped part way through epoch 1' in line and 'trained again from its start' in line
               for line in warnings), warnings
    assert_same_end(run, uninterrupted)
