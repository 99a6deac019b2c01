"""timm training tasks for Tf-KD, and the hooks a task implements when its method keeps state across steps.

The tasks are thin subclasses of timm's: model, DDP, compile, EMA and checkpoint handling stay timm's. Methods whose
loss needs more than ``(input, target)`` implement the protocols below; the trainer calls a hook only on a task
that has it, so timm's own tasks run unchanged. State that must survive a resume (a per-sample prediction table,
a class-by-class matrix) goes through timm's own ``TrainingTask.get_task_state`` / ``load_task_state``, which
timm's ``CheckpointSaver`` writes into every checkpoint and ``resume_task_checkpoint`` restores.
"""
import logging
from typing import Any, Dict, Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn
from timm.task import ClassificationTask, TrainingTask
from timm.utils import unwrap_model

from .losses import SelfDistillLoss, VirtualTeacherLoss, clean_split_size
from .teacher import SelfTeacher

_logger = logging.getLogger(__name__)


@runtime_checkable
class EpochHooks(Protocol):
    """A task that acts at epoch boundaries, e.g. a ramp of alpha, or a matrix accumulated during an epoch and
    swapped in at its end. Under DDP both hooks run on every rank (reduce across ranks in ``on_epoch_end``)."""

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Called before the first training batch of ``epoch`` (0-based) of ``num_epochs``."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after the last training batch of ``epoch``, before validation and the checkpoint."""


@runtime_checkable
class SampleIndexed(Protocol):
    """A task whose loss needs the training-set index of each sample of the batch, e.g. to read and update a
    per-sample table of predictions. The trainer records the indices its sampler draws and hands them over."""

    def set_sample_index(self, index: torch.Tensor) -> None:
        """Called with the dataset indices (B,) of the next training batch, right before ``task(input, target)``."""


@runtime_checkable
class EpochOrdered(Protocol):
    """A task that decides which training samples an epoch loads and in which order, e.g. each drawn sample followed
    by another of its class, so that every batch holds same-class pairs. The trainer hands it each epoch's seeded
    permutation (this rank's share under DDP) and timm's loader then batches what it returns, in that order."""

    def epoch_length(self, num_drawn: int) -> int:
        """How many indices :meth:`epoch_order` returns for a permutation of ``num_drawn`` samples (the loader's
        length, and with it the LR schedule, is fixed before an epoch starts)."""

    def epoch_order(self, drawn: torch.Tensor, epoch: int) -> torch.Tensor:
        """The dataset indices (int64, 1-D, :meth:`epoch_length` of them) to load in ``epoch``, from its permutation
        ``drawn``. Make it depend only on ``drawn``, ``epoch`` and the task's state (draw from a generator seeded by
        the epoch), so that an epoch resumed part way loads the same samples."""


def _result(output: torch.Tensor, terms) -> Dict[str, torch.Tensor]:
    return {'loss': terms.loss, 'output': output, 'task_loss': terms.task, 'kd_loss': terms.kd}


class TfKDRegTask(ClassificationTask):
    """Tf-KD-reg: the student alone, regularized by the virtual teacher; no extra forward.

    Model, DDP, compile, EMA and checkpoint handling are timm's ClassificationTask's.

    Args:
        model: The student.
        criterion: The virtual teacher loss.
        device: Device for task tensors.
        dtype: Dtype for task tensors.
        verbose: Log the set-up.
        num_splits: AugMix splits of each batch (timm's ``--aug-splits``, clean views first): the KL term is taken
            over the clean split, the CE over every split. 0 or 1: none.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: VirtualTeacherLoss,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            num_splits: int = 0,
    ):
        if not isinstance(criterion, VirtualTeacherLoss):
            raise TypeError(f'TfKDRegTask needs a VirtualTeacherLoss, got {type(criterion).__name__}')
        super().__init__(model, criterion, device=device, dtype=dtype, verbose=verbose)
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Student forward and the reg loss: ``loss``, ``output``, ``task_loss`` (CE) and ``kd_loss`` (scaled KL)."""
        output = self.trainable_module(input)
        return _result(output, self.criterion.terms(output, target, num_splits=self.num_splits))


def _without_teacher(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [key for key in state_dict if key.startswith(f'{prefix}teacher.')]:
        del state_dict[key]


def _teacher_not_expected(module: nn.Module, incompatible_keys: Any) -> None:
    missing = [key for key in incompatible_keys.missing_keys if '.teacher.' in f'.{key}']
    for key in missing:
        incompatible_keys.missing_keys.remove(key)


class TfKDSelfTask(TrainingTask):
    """Tf-KD-self (and normal / reversed / defective KD): a student taught by a frozen :class:`SelfTeacher`.

    Only the student is trainable: only it is DDP-wrapped, handed to the optimizer, copied by EMA and saved in
    checkpoints; the task's own ``state_dict`` leaves the teacher out too (it is rebuilt from its source). The teacher
    stays in eval mode when the task is switched to train.

    Args:
        model: The student.
        teacher: The frozen teacher.
        criterion: The distillation loss.
        device: Device for task tensors.
        dtype: Dtype for task tensors.
        verbose: Log the set-up.
        num_splits: AugMix splits of each batch (timm's ``--aug-splits``, clean views first): the teacher sees the
            clean split only and the KL term is taken over it, the CE over every split. 0 or 1: none.
    """

    def __init__(
            self,
            model: nn.Module,
            teacher: SelfTeacher,
            criterion: SelfDistillLoss,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            num_splits: int = 0,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(teacher, SelfTeacher):
            raise TypeError(f'TfKDSelfTask needs a SelfTeacher, got {type(teacher).__name__}')
        self.trainable_module = model
        self.teacher = teacher.to(self.device)
        self.criterion = criterion.to(self.device)  # its class weights, if any, live where the logits are
        self.num_splits = num_splits
        student_classes = unwrap_model(model).num_classes
        if teacher.num_classes != student_classes:
            raise ValueError(f'teacher has {teacher.num_classes} classes, the student {student_classes}')
        self.register_state_dict_post_hook(_without_teacher)
        self.register_load_state_dict_post_hook(_teacher_not_expected)
        if verbose:
            _logger.info(f'{type(self).__name__}: criterion={criterion}, teacher={teacher.identity}')

    def train(self, mode: bool = True) -> 'TfKDSelfTask':
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'TfKDSelfTask':
        """Wrap the student alone in DistributedDataParallel; the teacher needs no gradient sync."""
        from torch.nn.parallel import DistributedDataParallel
        self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the student (train and eval forward); the teacher is compiled by its own switch."""
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = self.trainable_module
        return self.trainable_module

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Student and teacher forward: ``loss``, ``output``, ``task_loss`` (CE) and ``kd_loss`` (scaled KL)."""
        output = self.trainable_module(input)
        if self.num_splits > 1:
            teacher_logits = self.teacher(input[:clean_split_size(input.shape[0], self.num_splits)])
        else:
            teacher_logits = self.teacher(input)
        return _result(output, self.criterion.terms(output, teacher_logits, target, num_splits=self.num_splits))
