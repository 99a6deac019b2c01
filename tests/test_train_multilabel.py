"""``--task multilabel`` with ``--tfkd-mode none`` and ``lsr``, trained on a tiny multi-label dataset written here in
the WebDataset layout timm's ``wds/`` reader reads (tar shards of ``.png`` + ``.json`` sidecar, ``_info.json``).

timm's multi-label targets come from readers whose records hold several labels: ``hfds/``, ``hfids/``, ``tfds/`` and
``wds/``, with ``--target-key`` naming a list of class indices (``--target-format indices``, the default), a multi-hot
vector (``multihot``) or comma separated binary fields; image folders give one class index per image. The runs
report timm's multi-label evaluator metrics (BCE loss, mAP, micro / macro / sample F1), checked here against a
computation written in the test from the saved model's outputs, and the run record, ``timm-tfkd evaluate`` and the
export card say the same. The losses are checked against float64 formulas (timm's BCE with its multi-label
smoothing towards 0.5, and with weights from ``--class-stats``). reg / self / kd refusals are rows of
test_train_bad_input.py.
"""
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from timm_tfkd.checkpoint_io import read_checkpoint
from timm_tfkd.cli import main as cli_main
from _train_helpers import (  # noqa: F401  (autouse fixture)
    TRAIN_SCRIPT, FixedLogits, build_in_trainer, build_task, once_per_key, read_run_info, read_summary, run_subprocess,
    summary_columns, train_in_process,
)

from _multilabel_data import IMG, K, SPLITS, labels_of as _labels, write_wds

METRICS = ('loss', 'map', 'micro_f1', 'macro_f1', 'sample_f1')
SUMMARY = ['epoch', 'train_loss', 'train_task_loss', 'train_kd_loss'] + [f'eval_{m}' for m in METRICS] + ['lr']


def _read_images(root: Path, split: str) -> torch.Tensor:
    """The split's images in shard order, as floats in [0, 1] (N, 3, H, W)."""
    images = []
    for shard in sorted(root.glob(f'{split}-*.tar')):
        with tarfile.open(shard) as tar:
            images += [np.asarray(Image.open(tar.extractfile(m)).convert('RGB')) for m in tar.getmembers()
                       if m.name.endswith('.png')]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double() / 255.0


def _multihot(labels: List[List[int]]) -> torch.Tensor:
    return torch.stack([F.one_hot(torch.tensor(row, dtype=torch.long), K).sum(0).clamp(max=1) if row else
                        torch.zeros(K, dtype=torch.long) for row in labels]).double()


# ---------------------------------------------------------------------------------------------------------------
# Metrics written out


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Non-interpolated AP of one class: the mean, over its positives, of the precision at each one's rank."""
    if positives.sum() == 0:
        return 0.0
    order = scores.argsort(descending=True)
    hits, precisions = 0, []
    for rank, index in enumerate(order.tolist(), start=1):
        if positives[index]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def f1(true_positive: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """2 TP / (predicted + actual), 0 where both are 0."""
    denominator = predicted + actual
    return torch.where(denominator > 0, 2 * true_positive / denominator.clamp(min=1), torch.zeros_like(denominator))


def expected_metrics(logits: torch.Tensor, target: torch.Tensor, threshold: float) -> Dict[str, float]:
    bce = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()
    predicted = (torch.sigmoid(logits) >= threshold).double()
    tp = predicted * target
    return {
        'loss': bce.item(),
        'map': 100 * float(np.mean([average_precision(logits[:, c], target[:, c]) for c in range(K)])),
        'micro_f1': 100 * f1(tp.sum(), predicted.sum(), target.sum()).item(),
        'macro_f1': 100 * f1(tp.sum(0), predicted.sum(0), target.sum(0)).mean().item(),
        'sample_f1': 100 * f1(tp.sum(1), predicted.sum(1), target.sum(1)).mean().item(),
    }


def model_outputs(run_dir: Path, data: Path) -> torch.Tensor:
    """The saved final model on the validation images, normalized with the run's statistics (crop 1: no resize)."""
    info = read_run_info(run_dir)
    model = timm.create_model(info['model'], num_classes=K)
    model.load_state_dict(read_checkpoint(str(run_dir / 'last.pth.tar'))['state_dict'])
    mean, std = (torch.tensor(info['data_config'][k], dtype=torch.float64).view(1, -1, 1, 1) for k in ('mean', 'std'))
    with torch.no_grad():
        return model.double().eval()((_read_images(data, 'validation') - mean) / std)


# ---------------------------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope='module')
def data(workdir) -> Path:
    return write_wds(workdir / 'wds')


def _common(data: Path, *extra) -> list:
    return ['--dataset', 'wds/tiny', '--data-dir', data, '--task', 'multilabel', '--num-classes', K,
            '--model', 'test_resnet', '--img-size', IMG, '--crop-pct', '1.0', '-b', 8, '-j', 0, '--lr', 0.1,
            '--warmup-epochs', 0, '--log-interval', 1000, *extra]


RUNS = {
    'none-indices': ['--target-key', 'labels', '--multilabel-threshold', '0.4'],
    'lsr-multihot-mixup': ['--target-key', 'multihot', '--target-format', 'multihot', '--tfkd-mode', 'lsr',
                           '--smoothing', '0.2', '--mixup', '0.4', '--model-ema'],
}


@pytest.fixture(scope='module')
def runs(data, workdir):
    return once_per_key(lambda name: train_in_process(
        [*_common(data, *RUNS[name]), '--epochs', 2, '--output', workdir / 'runs', '--experiment', name]))


def _threshold(name: str) -> float:
    flags = RUNS[name]
    return float(flags[flags.index('--multilabel-threshold') + 1]) if '--multilabel-threshold' in flags else 0.5


@pytest.mark.parametrize('name', list(RUNS))
def test_run_reports_timm_multilabel_metrics(name, runs, data):
    run_dir = runs(name)
    # As in timm, with an EMA eval_* are the EMA's metrics; the model's are eval_model_*.
    model_columns = [f'eval_model_{m}' for m in METRICS] if '--model-ema' in RUNS[name] else []
    assert summary_columns(run_dir) == SUMMARY[:-1] + model_columns + ['lr']
    assert not any('top1' in column or 'ece' in column for column in summary_columns(run_dir))
    rows = read_summary(run_dir)
    assert [row['epoch'] for row in rows] == [0, 1]
    info = read_run_info(run_dir)
    assert info['task'] == 'multilabel' and info['tfkd']['mode'] == name.split('-')[0]
    assert set(info['final_metrics']) == set(METRICS)
    prefix = 'eval_model_' if model_columns else 'eval_'
    assert info['final_metrics'] == pytest.approx({m: rows[-1][prefix + m] for m in METRICS}, rel=1e-12)
    expected = expected_metrics(model_outputs(run_dir, data), _multihot(_labels('validation')), _threshold(name))
    assert info['final_metrics'] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # mAP ranks the checkpoints (higher is better; the EMA's when it is validated), timm's default for multi-label.
    best = read_checkpoint(str(run_dir / 'model_best.pth.tar'))
    column = 'eval_map'
    assert best['metric'] == pytest.approx(rows[best['epoch']][column], rel=1e-12)
    assert rows[best['epoch']][column] == max(row[column] for row in rows)


@pytest.mark.parametrize('name', list(RUNS))
def test_evaluate_and_export_say_the_same(name, runs, data, tmp_path, capsys):
    run_dir = runs(name)
    final = read_run_info(run_dir)['final_metrics']
    assert cli_main(['evaluate', str(run_dir), '--data-dir', str(data), '--split', 'validation']) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {m: scored[m] for m in METRICS} == pytest.approx(final, rel=1e-5, abs=1e-6)
    assert cli_main(['export', str(run_dir), str(tmp_path / 'export')]) == 0
    meta = json.loads((tmp_path / 'export' / 'tfkd.json').read_text())
    assert meta['task'] == 'multilabel' and set(meta['export']['metrics']) == set(METRICS)
    card = (tmp_path / 'export' / 'README.md').read_text()
    assert '| Weights | Epoch | mAP | F1 micro | F1 macro | F1 sample | BCE loss |' in card
    assert f"| {final['map']:.2f} |" in card.split('final epoch, model')[1].splitlines()[0]


@pytest.mark.parametrize('target_flags', [['--target-key', 'labels'],
                                          ['--target-key', 'multihot', '--target-format', 'multihot']],
                         ids=['indices', 'multihot'])
def test_both_target_formats_give_the_multihot_labels(target_flags, data, tmp_path):
    train, task = build_in_trainer([*_common(data, *target_flags), '--output', tmp_path / 'out'])
    targets = torch.cat([target for _, target in train.loader_eval]).double()
    torch.testing.assert_close(targets, _multihot(_labels('validation')), rtol=0, atol=0)
    assert type(task).__name__ == 'MultiLabelClassificationTask'
    assert not (tmp_path / 'out').exists()


def _bce(z: torch.Tensor, t: torch.Tensor, weight=1.0, pos_weight=1.0) -> torch.Tensor:
    return -(weight * (pos_weight * t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z))).mean()




def _fixed_inputs():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(6, K, generator=g, dtype=torch.float64) * 2).requires_grad_()
    q = (torch.rand(6, K, generator=g, dtype=torch.float64) > 0.5).double()
    soft = 0.6 * q + 0.4 * q.roll(1, 0)  # what multi-label Mixup hands the loss
    return z, q, soft


def _loss_and_grad(task, z, target):
    task.trainable_module = FixedLogits(z)
    loss = task(torch.zeros(z.shape[0], 3, IMG, IMG), target)['loss']
    return loss, torch.autograd.grad(loss, z)[0]


@pytest.mark.parametrize('mode,smoothing,mixup,folded,applied', [
    # timm: smoothing moves each label towards 0.5 in the loss, or in Mixup's targets when Mixup is on.
    ('none', 0.3, False, 0.0, 0.3),
    ('none', 0.3, True, 0.3, 0.0),
    # lsr: its epsilon is applied by the loss, with or without Mixup, and never folded into Mixup as well.
    ('lsr', 0.3, False, 0.0, 0.3),
    ('lsr', 0.25, True, 0.0, 0.25),
])
def test_multilabel_smoothing_goes_where_timm_puts_it(mode, smoothing, mixup, folded, applied, data, tmp_path):
    argv = _common(data, '--target-key', 'labels', '--tfkd-mode', mode, '--smoothing', smoothing, '--no-prefetcher',
                   '--output', tmp_path / 'out', *(['--mixup', '0.5'] if mixup else []))
    train, task = build_in_trainer(argv)
    if mixup:
        assert train.mixup_fn.multi_label and train.mixup_fn.label_smoothing == pytest.approx(folded)
    z, q, soft = _fixed_inputs()
    target = soft if mixup else q
    loss, grad = _loss_and_grad(task, z, target)
    expected = _bce(z, target * (1 - applied) + 0.5 * applied)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, z)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize('mode', ['none', 'lsr'])
def test_class_stats_weights_reach_the_multilabel_loss(mode, data, tmp_path):
    """timm's multi-label weighting: neg_pos positive weights and inv_freq class weights from the label counts."""
    counts = _multihot(_labels('train')).sum(0).tolist()
    samples = SPLITS['train']
    stats = tmp_path / 'stats.json'
    stats.write_text(json.dumps({'pos_counts': [int(c) for c in counts], 'num_samples': samples}))
    argv = _common(data, '--target-key', 'labels', '--tfkd-mode', mode, '--smoothing', '0', '--class-stats', stats,
                   '--loss-pos-weight', 'neg_pos', '--loss-class-weight', 'inv_freq', '--loss-weight-power', '0.5',
                   '--output', tmp_path / 'out')
    _, task = build_task(argv)
    n = torch.tensor(counts, dtype=torch.float64).clamp(min=1)
    pos_weight = ((samples - n) / n) ** 0.5
    class_weight = (samples / n) ** 0.5
    class_weight = class_weight / class_weight.mean()
    assert pos_weight.max() - pos_weight.min() > 0.1 and class_weight.max() - class_weight.min() > 0.1
    z, q, _ = _fixed_inputs()
    loss, grad = _loss_and_grad(task, z, q)
    expected = _bce(z, q, class_weight, pos_weight)
    # timm hands out its computed weights in float32.
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(expected, z)[0], rtol=1e-6, atol=1e-9)


def test_run_folder_names_the_metrics_timms_multilabel_evaluator_reports():
    from timm.task.evaluator import MultiLabelClassificationEvaluator
    from timm_tfkd.run_folder import MULTILABEL_METRIC_NAMES, MULTILABEL_TASK, headline_metric
    assert set(MULTILABEL_METRIC_NAMES) == set(MultiLabelClassificationEvaluator.metric_names)
    assert headline_metric(MULTILABEL_TASK) == MultiLabelClassificationEvaluator.default_metric


def _torchrun(argv) -> subprocess.CompletedProcess:
    return run_subprocess([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           TRAIN_SCRIPT, *argv], timeout=300)


@pytest.mark.slow
def test_ddp_validates_every_image_once(tmp_path):
    """Two ranks, two shards per split: each rank trains on its shard and the reduced metrics are the split's."""
    sharded = write_wds(tmp_path / 'wds', shards={'train': [12, 12], 'validation': [6, 6]})
    result = _torchrun([*_common(sharded, '--target-key', 'labels'), '--epochs', 2, '--output', tmp_path / 'out',
                        '--experiment', 'ddp'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Distributed training: 2 processes' in result.stderr
    run_dir = tmp_path / 'out' / 'ddp'
    expected = expected_metrics(model_outputs(run_dir, sharded), _multihot(_labels('validation')), 0.5)
    assert read_run_info(run_dir)['final_metrics'] == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('shards, words', [
    ({'train': [24]}, ["the 'train' split has 1 shard(s) for 2 processes x 1 loader worker(s)", 'wait']),
    ({'train': [12, 12], 'validation': [6, 3, 3]}, ["the 'validation' split's shards give", '[9, 3] images']),
], ids=['train-fewer-shards-than-workers', 'validation-shards-uneven'])
def test_ddp_refuses_shards_it_cannot_read_correctly(tmp_path, shards, words):
    data = write_wds(tmp_path / 'wds', shards=shards)
    output = tmp_path / 'out'
    result = _torchrun([*_common(data, '--target-key', 'labels'), '--epochs', 1, '--output', output])
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith('train_tfkd.py: error:')]
    assert len(ours) == 1 and all(word in ours[0] for word in words), result.stderr[-3000:]
    assert 'exitcode  : 2' in result.stderr  # torchrun's report of the rank's exit code
    assert not output.exists()
