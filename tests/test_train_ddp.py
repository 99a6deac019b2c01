"""Two processes with torchrun on CPU (gloo): rank 0 alone writes (run folder and epoch loggers), validation metrics
reduce exactly (also when the ranks cannot split the validation set evenly and the sampler pads it), and the
Tf-KD-self teacher is never wrapped in DDP."""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import create_dataset, create_transform
from timm.models import create_model

from conftest import write_image_folder
from _train_helpers import (
    TRAIN_SCRIPT, load_state_dict, read_run_info, read_summary, run_subprocess, tensorboard_scalars,
    tiny_args, train_in_process, use_offline_wandb, wandb_records,
)

pytestmark = pytest.mark.slow

EPOCHS = 2
BATCH = 8
# 48 validation images: 2 ranks x 3 batches of 8, so the distributed sampler adds no padding.
PER_CLASS = 16
# 21 validation images: rank 0 gets 11, rank 1 gets 10 and one duplicate of image 0 as padding.
UNEVEN_PER_CLASS = 7
ECE_BINS = 15


@pytest.fixture(scope='module')
def data_dir(workdir) -> Path:
    data = write_image_folder(workdir / 'data', per_class=PER_CLASS)
    assert len(list((data / 'validation').rglob('*.png'))) % (2 * BATCH) == 0
    return data


@pytest.fixture(scope='module')
def teacher_run(workdir, data_dir) -> Path:
    return train_in_process(tiny_args(data_dir, workdir / 'teacher-out', 'teacher', '--tfkd-mode', 'reg'))


def _torchrun(argv):
    return run_subprocess([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           TRAIN_SCRIPT, *argv], timeout=300)


def _single_process_metrics(run_dir: Path, data_dir: Path) -> dict:
    """Validation metrics of the saved model by their definitions: one image at a time, in this process."""
    info = read_run_info(run_dir)
    config = info['data_config']
    model = create_model(info['model'], num_classes=info['num_classes'], in_chans=info['in_chans'])
    model.load_state_dict(load_state_dict(run_dir / 'last.pth.tar'))
    model.eval()
    transform = create_transform(tuple(config['input_size']), is_training=False,
                                 interpolation=config['interpolation'], mean=tuple(config['mean']),
                                 std=tuple(config['std']), crop_pct=config['crop_pct'], crop_mode=config['crop_mode'])
    dataset = create_dataset('', root=str(data_dir), split='validation', is_training=False)
    dataset.transform = transform
    nll = top1 = top5 = 0.0
    bins = {}  # bin -> [right, confidence sum], bin k = (k/15, (k+1)/15]
    with torch.inference_mode():
        for index in range(len(dataset)):
            image, label = dataset[index]
            log_probs = F.log_softmax(model(image.unsqueeze(0))[0].double(), dim=0)
            ranked = log_probs.argsort(descending=True).tolist()
            confidence = log_probs.max().exp().item()
            nll -= log_probs[label].item()
            top1 += ranked[0] == label
            top5 += label in ranked[:5]
            entry = bins.setdefault(min(max(math.ceil(confidence * ECE_BINS) - 1, 0), ECE_BINS - 1), [0, 0.0])
            entry[0] += ranked[0] == label
            entry[1] += confidence
    n = len(dataset)
    return {'loss': nll / n, 'nll': nll / n, 'top1': 100 * top1 / n, 'top5': 100 * top5 / n,
            'ece': 100 * sum(abs(right - confidence) for right, confidence in bins.values()) / n}


def _check_ddp_run(result, output: Path, experiment: str, data_dir: Path, epochs: int = EPOCHS) -> Path:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert 'Traceback' not in result.stderr
    # As timm's train.py, rank 0 alone logs the run: its set-up and each epoch once.
    assert result.stderr.count('Distributed training: 2 processes') == 1
    assert result.stderr.count(f'Train: {epochs - 1} [') == result.stderr.count('Train: 0 [') > 0
    assert result.stdout.count('--result') == 1
    # Rank 0 alone wrote: one folder, one row per epoch, the files of one run and nothing else.
    assert sorted(os.listdir(output)) == [experiment]
    run = output / experiment
    expected = {'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'run_info.json',
                *(f'checkpoint-{epoch}.pth.tar' for epoch in range(epochs))}
    assert set(os.listdir(run)) == expected
    summary = read_summary(run)
    assert [row['epoch'] for row in summary] == list(range(epochs))

    # Metrics summed across ranks equal the metrics of the same model on the whole validation set in one process.
    reference = _single_process_metrics(run, data_dir)
    final = summary[-1]
    for name in ('top1', 'top5'):
        assert final[f'eval_{name}'] == pytest.approx(reference[name], rel=1e-12), name
    for name in ('loss', 'nll', 'ece'):
        assert final[f'eval_{name}'] == pytest.approx(reference[name], rel=1e-5, abs=1e-6), name
    assert read_run_info(run)['final_metrics'] == pytest.approx({k: final[f'eval_{k}'] for k in reference})

    keys = load_state_dict(run / 'last.pth.tar').keys()
    assert not any(key.startswith('module.') for key in keys)  # saved unwrapped
    return run


def test_ddp_self_with_teacher(workdir, data_dir, teacher_run):
    output = workdir / 'out-self'
    argv = tiny_args(data_dir, output, 'self', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint', teacher_run,
                     epochs=EPOCHS, batch_size=BATCH)
    run = _check_ddp_run(_torchrun(argv), output, 'self', data_dir)
    assert all(row['train_kd_loss'] > 0 for row in read_summary(run))
    # The frozen teacher is neither wrapped nor saved: the student's checkpoint has no teacher weights.
    assert not any('teacher' in key for key in load_state_dict(run / 'last.pth.tar'))
    assert read_run_info(run)['tfkd']['teacher']['source'] == teacher_run.name


def test_ddp_reg(workdir, data_dir, monkeypatch):
    output, log_dir = workdir / 'out-reg', workdir / 'tb-reg'
    wandb_root = use_offline_wandb(monkeypatch, workdir / 'wandb-reg')
    argv = tiny_args(data_dir, output, 'reg', '--tfkd-mode', 'reg', '--log-tensorboard', log_dir, '--log-wandb',
                     epochs=EPOCHS, batch_size=BATCH)
    run = _check_ddp_run(_torchrun(argv), output, 'reg', data_dir)
    summary = read_summary(run)
    assert all(row['train_kd_loss'] > 0 and math.isfinite(row['train_loss']) for row in summary)
    # Rank 0 alone logs: one event file and one W&B run, each holding summary.csv's rows once.
    assert len(list(log_dir.glob('events.out.tfevents.*'))) == 1
    assert tensorboard_scalars(log_dir)['eval_top1'] == {row['epoch']: float(np.float32(row['eval_top1']))
                                                         for row in summary}
    history = [record['history']['item'] for record in wandb_records(wandb_root) if record['type'] == 'history']
    assert [item['eval_nll'] for item in history] == [row['eval_nll'] for row in summary]


def test_ddp_metrics_count_each_image_once_when_the_sampler_pads(workdir):
    """21 images on 2 ranks: timm's sampler pads rank 1 with a duplicate, which must not be counted."""
    data_dir = write_image_folder(workdir / 'data-uneven', per_class=UNEVEN_PER_CLASS)
    images = len(list((data_dir / 'validation').rglob('*.png')))
    assert images % 2 and images % (2 * BATCH)
    output = workdir / 'out-uneven'
    argv = tiny_args(data_dir, output, 'uneven', '--tfkd-mode', 'reg', epochs=1, batch_size=BATCH)
    _check_ddp_run(_torchrun(argv), output, 'uneven', data_dir, epochs=1)
