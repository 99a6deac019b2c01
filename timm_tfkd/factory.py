"""A method's loss and timm training task from parsed arguments: the library side of ``add_tfkd_args``.

In a copy of timm's ``train.py``, ``add_tfkd_args(parser)`` adds the flags and ``create_tfkd_task(args, model, ...)``
replaces the line that builds timm's ``ClassificationTask``.
"""
import argparse
import logging
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.task import TrainingTask

from .methods import TaskContext, get_method, registered_flags
from .teacher import SelfTeacher

_logger = logging.getLogger(__name__)

TIMM_DEFAULT_SMOOTHING = 0.1  # timm's train.py --smoothing


def create_tfkd_loss(
        mode: str,
        alpha: float = 0.1,
        temperature: float = 20.0,
        correct_prob: float = 0.99,
        formula: str = 'paper',
        multiplier: float = 1.0,
        smoothing: float = 0.1,
        smoothing_convention: str = 'timm',
        class_weight: Optional[torch.Tensor] = None,
) -> Optional[nn.Module]:
    """The criterion of a Tf-KD mode from keyword settings (None for 'none', which keeps timm's criterion).

    Each keyword is the setting of the ``--tfkd-*`` flag of the same name; a mode ignores the ones it does not read.
    ``class_weight`` (K,) weights the cross-entropy part per class (see :mod:`timm_tfkd.losses`).
    """
    settings = dict(alpha=alpha, temperature=temperature, correct_prob=correct_prob, formula=formula,
                    multiplier=multiplier, smoothing_convention=smoothing_convention)
    args = argparse.Namespace(**{flag.dest: flag.default for flag in registered_flags()})
    for key, value in settings.items():
        setattr(args, f'tfkd_{key}', value)
    args.tfkd_mode = mode
    return get_method(mode).create_loss(args, smoothing, class_weight)


def create_tfkd_task(
        args: argparse.Namespace,
        model: nn.Module,
        criterion: Optional[nn.Module] = None,
        smoothing: Optional[float] = None,
        data_config: Optional[Dict[str, Any]] = None,
        teacher: Optional[SelfTeacher] = None,
        num_train_samples: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
        class_weight: Optional[torch.Tensor] = None,
        pos_weight: Optional[Union[float, torch.Tensor]] = None,
) -> TrainingTask:
    """Build the training task for ``args.tfkd_mode`` from arguments registered by :func:`add_tfkd_args`.

    Args:
        args: Parsed arguments (timm's ``train.py`` flags plus the Tf-KD group).
        model: The student.
        criterion: For mode 'none': the criterion timm's ``train.py`` built (``train_loss_fn``).
        smoothing: Label smoothing epsilon for mode 'lsr' (default ``args.smoothing``, else timm's default 0.1).
        data_config: The student's resolved data config (default: resolved from ``args`` and ``model``).
        teacher: A ready teacher for modes that learn from one (default: built from the ``--tfkd-teacher-*`` flags).
        num_train_samples: Size of the training set (``len(dataset_train)``), needed by methods that keep
            per-sample state.
        device: Device for the task and teacher.
        dtype: Dtype for task tensors.
        verbose: Log the set-up.
        class_weight: Per-class weights (K,) of the cross-entropy part of a Tf-KD loss (e.g. timm's
            ``resolve_class_weights`` of ``--loss-class-weight``); the KD term is never weighted.
        pos_weight: Weights of positive targets, for multi-label BCE (``--task multilabel`` with lsr).

    Returns:
        The method's task: timm's ClassificationTask for 'none' / 'lsr', :class:`~timm_tfkd.tasks.TfKDRegTask` for
        'reg', :class:`~timm_tfkd.tasks.TfKDSelfTask` for 'self' / 'kd'.
    """
    method = get_method(args.tfkd_mode)
    if verbose:
        _logger.info(method.describe(args))
    if smoothing is None:
        smoothing = getattr(args, 'smoothing', TIMM_DEFAULT_SMOOTHING)
    context = TaskContext(criterion=criterion, smoothing=smoothing, data_config=data_config, teacher=teacher,
                          num_train_samples=num_train_samples, device=device, dtype=dtype, verbose=verbose,
                          class_weight=class_weight, pos_weight=pos_weight)
    return method.create_task(args, model, context)
