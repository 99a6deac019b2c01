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

from .loss_settings import DEFAULT_ALPHA, DEFAULT_CORRECT_PROB, DEFAULT_TEMPERATURE
from .methods import SMOOTHING_EPSILON, SMOOTHING_EXPLICIT, Method, TaskContext, get_method, registered_flags
from .teacher import SelfTeacher

_logger = logging.getLogger(__name__)

TIMM_DEFAULT_SMOOTHING = 0.1  # timm's train.py --smoothing


def create_tfkd_loss(
        mode: str,
        alpha: float = DEFAULT_ALPHA,
        temperature: float = DEFAULT_TEMPERATURE,
        correct_prob: float = DEFAULT_CORRECT_PROB,
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


def mixup_active(args: argparse.Namespace) -> bool:
    """Whether timm's Mixup / CutMix flags turn either on."""
    return getattr(args, 'mixup', 0) > 0 or getattr(args, 'cutmix', 0) > 0 or \
        getattr(args, 'cutmix_minmax', None) is not None


def _account_for_mixup(args: argparse.Namespace, method: Method, smoothing: float, mixup_smoothing: Optional[float],
                       verbose: bool) -> float:
    """The smoothing the method's loss still has to apply, given what Mixup put into the targets."""
    told = mixup_smoothing is not None
    if not told:
        mixup_smoothing = smoothing if mixup_active(args) else 0.0
    if mixup_smoothing <= 0:
        return smoothing
    if method.smoothing == SMOOTHING_EPSILON:
        if getattr(args, 'tfkd_smoothing_convention', 'timm') != 'timm':
            raise ValueError(f'--tfkd-mode {method.name} with the reference smoothing convention cannot take Mixup / '
                             f"CutMix targets smoothed by timm's train.py (timm's convention): use train_tfkd.py, or "
                             f'--smoothing 0 on Mixup and the loss')
        if verbose:
            _logger.info(f'Tf-KD {method.name}: Mixup / CutMix already smooth the targets by {mixup_smoothing:g} '
                         f"(timm's convention); the loss does not smooth them again")
        return 0.0
    if method.smoothing == SMOOTHING_EXPLICIT and not told and verbose:
        _logger.warning(f"timm's train.py folds --smoothing {mixup_smoothing:g} into the Mixup / CutMix targets: it "
                        f'stacks on Tf-KD {method.name}; pass --smoothing 0 unless that is meant')
    return smoothing


def create_tfkd_task(
        args: argparse.Namespace,
        model: nn.Module,
        criterion: Optional[nn.Module] = None,
        smoothing: Optional[float] = None,
        data_config: Optional[Dict[str, Any]] = None,
        teacher: Optional[SelfTeacher] = None,
        num_train_samples: Optional[int] = None,
        train_targets: Optional[torch.Tensor] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: Optional[bool] = None,
        mixup_smoothing: Optional[float] = None,
        class_weight: Optional[torch.Tensor] = None,
        pos_weight: Optional[Union[float, torch.Tensor]] = None,
) -> TrainingTask:
    """Build the training task for ``args.tfkd_mode`` from arguments registered by :func:`add_tfkd_args`.

    Called from a copy of timm's ``train.py``, it accounts for what that script does around the task: Mixup /
    CutMix fold ``--smoothing`` into their targets, so ``lsr`` does not smooth them a second time, and a Tf-KD
    method whose targets are smoothed that way is told so in one log line; only rank 0 logs.

    With timm's ``--aug-splits`` in ``args`` the task trains on AugMix splits as the method defines it (its
    ``aug_splits``); the criterion of mode 'none' is then timm's as given (``JsdCrossEntropy`` with ``--jsd-loss``).

    Args:
        args: Parsed arguments (timm's ``train.py`` flags plus the Tf-KD group).
        model: The student.
        criterion: For mode 'none': the criterion timm's ``train.py`` built (``train_loss_fn``).
        smoothing: Label smoothing epsilon for mode 'lsr' (default ``args.smoothing``, else timm's default 0.1).
        data_config: The student's resolved data config (default: resolved from ``args`` and ``model``).
        teacher: A ready teacher for modes that learn from one (default: built from the ``--tfkd-teacher-*`` flags).
        num_train_samples: Size of the training set (``len(dataset_train)``), needed by methods that keep
            per-sample state.
        train_targets: The class index of every training sample (N,), for methods with ``needs_train_targets``.
        device: Device for the task and teacher.
        dtype: Dtype for task tensors.
        verbose: Log the set-up (default: on rank 0 only, from ``args.rank`` as timm's ``train.py`` sets it).
        mixup_smoothing: The label smoothing the caller's Mixup / CutMix already put into the targets (default: as
            timm's ``train.py`` builds them, ``smoothing`` when Mixup or CutMix is on, else 0).
        class_weight: Per-class weights (K,) of the cross-entropy part of a Tf-KD loss (e.g. timm's
            ``resolve_class_weights`` of ``--loss-class-weight``); the KD term is never weighted.
        pos_weight: Weights of positive targets, for multi-label BCE (``--task multilabel`` with lsr).

    Returns:
        The method's task: timm's ClassificationTask for 'none' / 'lsr', :class:`~timm_tfkd.tasks.TfKDRegTask` for
        'reg', :class:`~timm_tfkd.tasks.TfKDSelfTask` for 'self' / 'kd'.

    Raises:
        ValueError: Targets Mixup smoothed in timm's convention for ``lsr`` in the reference convention.
    """
    method = get_method(args.tfkd_mode)
    if verbose is None:
        verbose = getattr(args, 'rank', 0) == 0
    if verbose:
        _logger.info(method.describe(args))
    if smoothing is None:
        smoothing = getattr(args, 'smoothing', TIMM_DEFAULT_SMOOTHING)
    smoothing = _account_for_mixup(args, method, smoothing, mixup_smoothing, verbose)
    context = TaskContext(criterion=criterion, smoothing=smoothing, data_config=data_config, teacher=teacher,
                          num_train_samples=num_train_samples, train_targets=train_targets,
                          num_aug_splits=getattr(args, 'aug_splits', 0), device=device, dtype=dtype, verbose=verbose,
                          class_weight=class_weight, pos_weight=pos_weight)
    return method.create_task(args, model, context)
