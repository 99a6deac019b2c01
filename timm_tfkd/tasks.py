"""timm training tasks for Tf-KD, and the factory that builds one from parsed arguments."""
import argparse
import logging
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.task import ClassificationTask, TrainingTask
from timm.utils import unwrap_model

from .args import teacher_model_name, tfkd_args_summary
from .losses import SelfDistillLoss, VirtualTeacherLoss, create_tfkd_loss
from .teacher import SelfTeacher, TeacherError, channel_stats, create_self_teacher

_logger = logging.getLogger(__name__)


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
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: VirtualTeacherLoss,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        if not isinstance(criterion, VirtualTeacherLoss):
            raise TypeError(f'TfKDRegTask needs a VirtualTeacherLoss, got {type(criterion).__name__}')
        super().__init__(model, criterion, device=device, dtype=dtype, verbose=verbose)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Student forward and the reg loss: ``loss``, ``output``, ``task_loss`` (CE) and ``kd_loss`` (scaled KL)."""
        output = self.trainable_module(input)
        return _result(output, self.criterion.terms(output, target))


class TfKDSelfTask(TrainingTask):
    """Tf-KD-self (and normal / reversed / defective KD): a student taught by a frozen :class:`SelfTeacher`.

    Only the student is trainable: only it is DDP-wrapped, handed to the optimizer, copied by EMA and saved in
    checkpoints. The teacher stays in eval mode when the task is switched to train.

    Args:
        model: The student.
        teacher: The frozen teacher.
        criterion: The distillation loss.
        device: Device for task tensors.
        dtype: Dtype for task tensors.
        verbose: Log the set-up.
    """

    def __init__(
            self,
            model: nn.Module,
            teacher: SelfTeacher,
            criterion: SelfDistillLoss,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(teacher, SelfTeacher):
            raise TypeError(f'TfKDSelfTask needs a SelfTeacher, got {type(teacher).__name__}')
        self.trainable_module = model
        self.teacher = teacher.to(self.device)
        self.criterion = criterion
        student_classes = unwrap_model(model).num_classes
        if teacher.num_classes != student_classes:
            raise ValueError(f'teacher has {teacher.num_classes} classes, the student {student_classes}')
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
        teacher_logits = self.teacher(input)
        return _result(output, self.criterion.terms(output, teacher_logits, target))


def _student_stats(args: argparse.Namespace, model: nn.Module, data_config: Optional[Dict[str, Any]]):
    config = data_config or resolve_data_config(vars(args), model=model)
    channels = unwrap_model(model).in_chans
    return channel_stats(config['mean'], channels, 'mean'), channel_stats(config['std'], channels, 'std'), config


def create_teacher_from_args(
        args: argparse.Namespace,
        model: nn.Module,
        data_config: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
) -> SelfTeacher:
    """Build the frozen teacher the ``--tfkd-teacher-*`` flags describe, with its speed-ups applied."""
    if not args.tfkd_teacher_checkpoint:
        raise TeacherError(f'--tfkd-mode {args.tfkd_mode} needs --tfkd-teacher-checkpoint (the trained teacher '
                           f'weights) or a ready teacher')
    student = unwrap_model(model)
    mean, std, config = _student_stats(args, model, data_config)
    teacher = create_self_teacher(
        args.tfkd_teacher_checkpoint,
        teacher_model_name(args),
        num_classes=student.num_classes,
        in_chans=student.in_chans,
        student_mean=mean,
        student_std=std,
        device=device,
    )
    if args.tfkd_teacher_channels_last or args.tfkd_teacher_fuse_bn or args.tfkd_teacher_dtype != 'float32' \
            or args.tfkd_teacher_compile:
        example = torch.randn(2, *config['input_size'], generator=torch.Generator().manual_seed(0)).to(device)
        teacher.speed_up(
            example,
            channels_last=args.tfkd_teacher_channels_last,
            fuse_bn=args.tfkd_teacher_fuse_bn,
            dtype=args.tfkd_teacher_dtype,
            compile=args.tfkd_teacher_compile,
        )
    return teacher


def create_tfkd_task(
        args: argparse.Namespace,
        model: nn.Module,
        criterion: Optional[nn.Module] = None,
        smoothing: Optional[float] = None,
        data_config: Optional[Dict[str, Any]] = None,
        teacher: Optional[SelfTeacher] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
) -> TrainingTask:
    """Build the training task for ``args.tfkd_mode`` from arguments registered by :func:`add_tfkd_args`.

    Args:
        args: Parsed arguments (timm's ``train.py`` flags plus the Tf-KD group).
        model: The student.
        criterion: For mode 'none': the criterion timm's ``train.py`` built (``train_loss_fn``).
        smoothing: Label smoothing epsilon for mode 'lsr' (default ``args.smoothing``).
        data_config: The student's resolved data config (default: resolved from ``args`` and ``model``).
        teacher: A ready teacher for modes 'self' / 'kd' (default: built from the ``--tfkd-teacher-*`` flags).
        device: Device for the task and teacher.
        dtype: Dtype for task tensors.
        verbose: Log the set-up.

    Returns:
        ClassificationTask for 'none' / 'lsr', :class:`TfKDRegTask` for 'reg', :class:`TfKDSelfTask` for
        'self' / 'kd'.
    """
    mode = args.tfkd_mode
    if verbose:
        _logger.info(tfkd_args_summary(args))
    if mode == 'none':
        return ClassificationTask(model, criterion, device=device, dtype=dtype, verbose=verbose)
    loss = create_tfkd_loss(
        mode,
        alpha=args.tfkd_alpha,
        temperature=args.tfkd_temperature,
        correct_prob=args.tfkd_correct_prob,
        formula=args.tfkd_formula,
        multiplier=args.tfkd_multiplier,
        smoothing=args.smoothing if smoothing is None else smoothing,
        smoothing_convention=args.tfkd_smoothing_convention,
    )
    if mode == 'lsr':
        return ClassificationTask(model, loss, device=device, dtype=dtype, verbose=verbose)
    if mode == 'reg':
        loss.softened_teacher(unwrap_model(model).num_classes)  # checks correct_prob > 1/K before training starts
        return TfKDRegTask(model, loss, device=device, dtype=dtype, verbose=verbose)
    if teacher is None:
        teacher = create_teacher_from_args(args, model, data_config, device=device)
    return TfKDSelfTask(model, teacher, loss, device=device, dtype=dtype, verbose=verbose)
