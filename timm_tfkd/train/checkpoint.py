"""Checkpoints in timm's layout, with the random state that makes a resumed run match an uninterrupted one."""
import argparse
import logging
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch
from timm.task import TrainingTask
from timm.utils import CheckpointSaver, unwrap_model

from ..checkpoint_io import read_checkpoint
from ..errors import UsageError

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
