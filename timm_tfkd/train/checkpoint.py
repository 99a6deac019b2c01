"""Checkpoints in timm's layout, with the random state that makes a resumed run match an uninterrupted one."""
import argparse
import csv
import glob
import json
import logging
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch
from timm.task import TrainingTask
from timm.utils import CheckpointSaver, unwrap_model

from ..checkpoint_io import read_checkpoint
from .args import UsageError

_logger = logging.getLogger(__name__)

RNG_STATE_KEY = 'rng_state'


def capture_rng_state() -> Dict[str, Any]:
    """Python, numpy and torch CPU generator states, as tensors and plain containers (``weights_only``-safe)."""
    numpy_state = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        'torch': torch.get_rng_state(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'])


class _TaskWithRngState:
    """Hands timm's CheckpointSaver the task's checkpoint entries plus the random state (no _save override)."""

    def __init__(self, task: TrainingTask):
        self.task = task

    def get_checkpoint_state(self, ema: bool = False, **kwargs) -> Dict[str, Any]:
        state = self.task.get_checkpoint_state(ema=ema, **kwargs)
        if not ema:
            state[RNG_STATE_KEY] = capture_rng_state()
        return state


class _AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver, with ``last`` (and recovery files) swapped in by one atomic rename.

    timm unlinks the old file before renaming the new one over it (for Windows), which leaves a moment without any
    ``last.pth.tar``: a kill then would leave ``--resume auto`` nothing to resume. ``os.replace`` overwrites
    atomically on every platform.
    """

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)


def create_saver(
        task: TrainingTask,
        optimizer: torch.optim.Optimizer,
        args: argparse.Namespace,
        output_dir: str,
        loss_scaler: Optional[Any],
        decreasing: bool,
) -> CheckpointSaver:
    """timm's CheckpointSaver (``last`` written to a temporary file and renamed over the old one in one step, so a
    kill never corrupts it nor leaves the folder without it)."""
    return _AtomicCheckpointSaver(
        model=task.get_trainable_module(),
        optimizer=optimizer,
        args=args,
        amp_scaler=loss_scaler,
        checkpoint_dir=output_dir,
        recovery_dir=output_dir,
        decreasing=decreasing,
        max_history=args.checkpoint_hist,
        unwrap_fn=unwrap_model,
        task=_TaskWithRngState(task),
    )


def find_resume_checkpoint(output_dir: Optional[str]) -> Optional[str]:
    """The newest of ``last.pth.tar`` and ``recovery-*.pth.tar`` in a run folder, for ``--resume auto``."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    candidates = glob.glob(os.path.join(output_dir, 'recovery-*.pth.tar'))
    last = os.path.join(output_dir, 'last.pth.tar')
    if os.path.isfile(last):
        candidates.append(last)
    return max(candidates, key=os.path.getmtime) if candidates else None


def check_resume_path(path: str) -> None:
    """Refuse a ``--resume`` file that is missing or not a readable training checkpoint, before any output."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume checkpoint '{path}' does not exist")
    checkpoint = read_checkpoint(path)
    if 'state_dict' not in checkpoint and 'model' not in checkpoint:
        raise UsageError(f"--resume checkpoint '{path}' is not a training checkpoint (no state_dict)")


def load_rng_state(path: str) -> Optional[Dict[str, Any]]:
    """The random state saved with a checkpoint, if any."""
    return read_checkpoint(path).get(RNG_STATE_KEY)


def write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp_path = f'{path}.tmp'
    with open(tmp_path, 'w') as f:
        json.dump(data, f, indent=2)
        f.write('\n')
    os.replace(tmp_path, path)


def drop_summary_rows_from(path: str, start_epoch: int) -> None:
    """Keep only the ``summary.csv`` rows of epochs before ``start_epoch`` (rewritten atomically).

    A run killed after writing an epoch's row but before saving that epoch's checkpoint trains the epoch again when
    resumed; without this the file would list it twice (or keep a half-written row).
    """
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and row[0].isdigit() and int(row[0]) < start_epoch]
    if len(kept) == len(rows):
        return
    tmp_path = f'{path}.tmp'
    with open(tmp_path, 'w', newline='') as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp_path, path)
    _logger.info(f'{path}: dropped {len(rows) - len(kept)} row(s) of epochs trained again from epoch {start_epoch}')
