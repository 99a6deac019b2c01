"""End-to-end throughput of ``train_tfkd.py`` (CE, reg, self) against timm's own ``train.py`` on the same data.

Each configuration runs as a real training process on two training sets of different size (same images,
``--short`` and ``--long`` batches per epoch); the difference of the two wall times divided by the difference in
steps is the steady-state step time, free of start-up (imports, model creation, folder scan). Configurations are
interleaved round by round and the medians over rounds are reported.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]


def _subset_folder(source: Path, target: Path, images: int) -> Path:
    """Link the first ``images`` training images (class-balanced, sorted) of an image folder into a new folder."""
    classes = sorted(d.name for d in (source / 'train').iterdir() if d.is_dir())
    per_class = images // len(classes)
    for name in classes:
        (target / 'train' / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / 'train' / name).iterdir())[:per_class]:
            os.link(path, target / 'train' / name / path.name)
    return target


def _run(command: Sequence[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, 'w') as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"'{' '.join(command)}' failed (exit {result.returncode}); see {log}")
    return elapsed


def e2e_rows(
        data_dir: str,
        timm_train: Optional[str],
        model: str = 'resnet18',
        img_size: int = 32,
        batch: int = 128,
        workers: int = 2,
        short: int = 8,
        long: int = 32,
        rounds: int = 3,
        num_classes: int = 10,
) -> Tuple[List[Tuple[str, float, float]], List[str]]:
    """Measure steady-state step time per configuration.

    Args:
        data_dir: An image folder with a ``train`` split (e.g. from ``timm-tfkd fashion-mnist``).
        timm_train: Path to timm's ``train.py`` from a checkout; its row is skipped without one.
        model: timm model name.
        img_size: Input size (images are resized; 3 channels as timm's loader converts them).
        batch: Batch size.
        workers: Data loader workers (both scripts use ``--no-prefetcher``).
        short: Batches per epoch of the short run.
        long: Batches per epoch of the long run.
        rounds: Interleaved repetitions.
        num_classes: Classes of the data.

    Returns:
        Rows (configuration, median step seconds, images per second) and notes.
    """
    work = Path(tempfile.mkdtemp(prefix='tfkd-e2e-'))
    try:
        folders = {n: _subset_folder(Path(data_dir), work / f'data{n}', n * batch) for n in (short, long)}
        common = ['--model', model, '--num-classes', str(num_classes), '--img-size', str(img_size), '-b', str(batch),
                  '--no-prefetcher', '-j', str(workers), '--epochs', '1', '--val-split', '', '--smoothing', '0',
                  '--log-interval', '1000', '--device', 'cpu', '--lr', '0.05', '--warmup-epochs', '0']
        ours = [sys.executable, str(ROOT / 'train_tfkd.py')]
        teacher = work / 'out' / 'teacher'
        _run(ours + common + ['--data-dir', str(folders[short]), '--output', str(work / 'out'),
                              '--experiment', 'teacher'], work / 'teacher.log')
        configs: Dict[str, List[str]] = {}
        if timm_train:
            configs["timm train.py (CE)"] = [sys.executable, timm_train]
        configs['train_tfkd.py CE (--tfkd-mode none)'] = ours + ['--tfkd-mode', 'none']
        configs['train_tfkd.py reg'] = ours + ['--tfkd-mode', 'reg']
        configs['train_tfkd.py self'] = ours + ['--tfkd-mode', 'self', '--tfkd-teacher-checkpoint', str(teacher)]
        step_times: Dict[str, List[float]] = {name: [] for name in configs}
        for round_index in range(rounds):
            for index, (name, command) in enumerate(configs.items()):
                walls = {}
                for n in (short, long):
                    out = work / 'out' / f'r{round_index}c{index}n{n}'
                    walls[n] = _run(command + common + ['--data-dir', str(folders[n]), '--output', str(out.parent),
                                                        '--experiment', out.name], work / f'{out.name}.log')
                    shutil.rmtree(out, ignore_errors=True)
                step_times[name].append((walls[long] - walls[short]) / (long - short))
        rows = [(name, statistics.median(times), batch / statistics.median(times)) for name, times in
                step_times.items()]
        notes = [f'{model} {img_size}x{img_size} batch {batch}, --no-prefetcher -j {workers}, CPU fp32; step time = '
                 f'(wall({long} batches) - wall({short} batches)) / {long - short}, median of {rounds} interleaved '
                 f'rounds; start-up cancels out']
        if not timm_train:
            notes.append("timm train.py row skipped: pass --timm-train PATH (timm's train.py is not in its wheel)")
        return rows, notes
    finally:
        shutil.rmtree(work, ignore_errors=True)
