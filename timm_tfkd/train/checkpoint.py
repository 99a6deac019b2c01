"""Checkpoints in timm's layout, with what makes a resumed run match an uninterrupted one: the random state, the
progress of an interrupted epoch, and a checksum of the weights that catches a damaged file.
"""
import argparse
import dataclasses
import glob
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
from timm.models import clean_state_dict
from timm.task import TrainingTask
from timm.utils import CheckpointSaver, unwrap_model

from ..checkpoint_io import add_weights_checksums, describe_mismatch, read_checkpoint
from ..errors import UsageError
from ..run_folder import RECOVERY_PREFIX
from .engine import EpochProgress

_logger = logging.getLogger(__name__)

RNG_STATE_KEY = 'rng_state'
PROGRESS_KEY = 'epoch_progress'


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


class _TaskCheckpointState:
    """Hands timm's CheckpointSaver the task's checkpoint entries plus the random state, the checksum of the weights
    and, in a recovery checkpoint, the progress of the epoch (no _save override)."""

    def __init__(self, task: TrainingTask):
        self.task = task
        self.progress: Optional[EpochProgress] = None

    def get_checkpoint_state(self, ema: bool = False, **kwargs) -> Dict[str, Any]:
        state = self.task.get_checkpoint_state(ema=ema, **kwargs)
        add_weights_checksums(state)
        if not ema:
            state[RNG_STATE_KEY] = capture_rng_state()
            if self.progress is not None:
                state[PROGRESS_KEY] = dataclasses.asdict(self.progress)
        return state


class _AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver, with ``last`` (and recovery files) swapped in by one atomic rename, and recovery
    checkpoints that know how far their epoch got.

    timm unlinks the old file before renaming the new one over it (for Windows), which leaves a moment without any
    ``last.pth.tar``: a kill then would leave ``--resume auto`` nothing to resume. ``os.replace`` overwrites
    atomically on every platform.
    """

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def save_recovery(self, epoch: int, batch_idx: int = 0, progress: Optional[EpochProgress] = None) -> None:
        self.task.progress = progress
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self.task.progress = None

    def remove_recoveries_through(self, epoch: int) -> None:
        """Delete the recovery checkpoints of epochs up to ``epoch``, now that its epoch checkpoint supersedes them
        (timm keeps the last two, also those an interrupted run left)."""
        for path in glob.glob(os.path.join(self.recovery_dir, f'{RECOVERY_PREFIX}-*{self.extension}')):
            recovered_epoch = os.path.basename(path)[len(RECOVERY_PREFIX) + 1:].split('-')[0]
            if recovered_epoch.isdigit() and int(recovered_epoch) <= epoch:
                os.remove(path)


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
        task=_TaskCheckpointState(task),
    )


@dataclass
class ResumePoint:
    """A training checkpoint read once (its checksums verified) and where training continues from it.

    Attributes:
        path: The checkpoint file.
        checkpoint: Its contents.
        epoch: The epoch training continues with.
        progress: For a recovery checkpoint, the part of that epoch already trained.
    """
    path: str
    checkpoint: Dict[str, Any]
    epoch: int
    progress: Optional[EpochProgress]

    @property
    def rng_state(self) -> Optional[Dict[str, Any]]:
        return self.checkpoint.get(RNG_STATE_KEY)


def load_resume_point(path: str) -> ResumePoint:
    """Read a ``--resume`` checkpoint once, before anything is written.

    Raises:
        UsageError: The file is missing or not a training checkpoint.
        CheckpointError: It is corrupt, damaged or unsafe.
    """
    if not os.path.isfile(path):
        raise UsageError(f"--resume checkpoint '{path}' does not exist")
    checkpoint = read_checkpoint(path)
    if 'state_dict' not in checkpoint and 'model' not in checkpoint:
        raise UsageError(f"--resume checkpoint '{path}' is not a training checkpoint (no state_dict)")
    progress = checkpoint.get(PROGRESS_KEY)
    epoch = checkpoint.get('epoch', -1)
    if progress is None and checkpoint.get('version', 1) > 1:
        epoch += 1  # timm's version-2 checkpoints hold the epoch they finished
    return ResumePoint(path, checkpoint, max(epoch, 0), EpochProgress(**progress) if progress else None)


def restore_training_state(task: TrainingTask, point: ResumePoint, optimizer: Optional[torch.optim.Optimizer],
                           loss_scaler: Optional[Any]) -> None:
    """Load the weights, task state, optimizer and AMP scaler of a resume point, as timm's
    ``resume_task_checkpoint`` does, from the checkpoint already read (a large checkpoint is read and verified once).

    Raises:
        UsageError: The weights do not fit the model (another architecture or class count), naming the difference.
    """
    checkpoint = point.checkpoint
    state_dict = clean_state_dict(checkpoint['state_dict'] if 'state_dict' in checkpoint else checkpoint['model'])
    student = unwrap_model(task.get_trainable_module())
    try:
        task.load_checkpoint_state(state_dict, checkpoint.get('task_state'))
    except RuntimeError:
        raise UsageError(describe_mismatch(student, state_dict, getattr(student, 'default_cfg', {}).get(
            'architecture', type(student).__name__), f"--resume checkpoint '{point.path}'", 'the model')) from None
    if optimizer is not None and 'optimizer' in checkpoint:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    _logger.info(f"Resumed from '{point.path}' (epoch {checkpoint.get('epoch')})")


def restore_ema(task: TrainingTask, point: ResumePoint) -> None:
    """Load the EMA weights of a resume point, or start the EMA from its model weights when it has none (as timm's
    ``load_task_ema_checkpoint``)."""
    checkpoint = point.checkpoint
    key = next((k for k in ('state_dict_ema', 'model_ema', 'state_dict', 'model') if checkpoint.get(k) is not None))
    task_state = checkpoint.get('task_state_ema' if key == 'state_dict_ema' else 'task_state')
    task.load_checkpoint_state(clean_state_dict(checkpoint[key]), task_state, ema=True)
