"""Model, criterion, task, optimizer and precision: everything built from the arguments before training starts."""
import argparse
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.loss import JsdCrossEntropy, create_classification_loss
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.task import TrainingTask
from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask
from timm.utils import NativeScaler, unwrap_model

from ..dtypes import DTYPES
from ..errors import UsageError
from ..factory import create_tfkd_task
from ..methods import get_method
from ..naflex import layout_name, reads_naflex_problem
from ..pretrained import pretrained_unavailable
from ..run_folder import architecture_kwargs
from .weights import LossWeights, pos_weight_value, resolve_loss_weights

_logger = logging.getLogger(__name__)


@dataclass
class Precision:
    """The model dtype and the AMP context / scaler that go with it."""
    model_dtype: Optional[torch.dtype]
    autocast: Callable
    loss_scaler: Optional[NativeScaler]


def available_device(name: str) -> torch.device:
    """The device ``name`` names, checked to exist on this machine (a tensor is made on it).

    Raises:
        UsageError: torch does not know it, or this machine lacks it.
    """
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError):
        raise UsageError(f"device '{name}' is not available here") from None
    return device


def create_precision(args: argparse.Namespace, device: torch.device) -> Precision:
    """AMP as timm does it: float16 with a grad scaler on CUDA, bfloat16 without one."""
    if args.model_dtype and args.model_dtype not in DTYPES:
        raise UsageError(f"--model-dtype must be one of {', '.join(DTYPES)}, got '{args.model_dtype}'")
    model_dtype = DTYPES[args.model_dtype] if args.model_dtype else None
    if not args.amp:
        return Precision(model_dtype, nullcontext, None)
    if args.amp_dtype not in ('float16', 'bfloat16'):
        raise UsageError(f"--amp-dtype must be float16 or bfloat16, got '{args.amp_dtype}'")
    if model_dtype not in (None, torch.float32):
        raise UsageError('--amp needs a float32 model (--model-dtype float32 or unset)')
    amp_dtype = DTYPES[args.amp_dtype]
    scaler = NativeScaler(device=device.type) if device.type == 'cuda' and amp_dtype == torch.float16 else None
    return Precision(model_dtype, partial(torch.autocast, device_type=device.type, dtype=amp_dtype), scaler)


def student_in_chans(args: argparse.Namespace) -> int:
    """Input channels as timm's ``train.py`` reads them: ``--in-chans``, else ``--input-size``'s, else 3."""
    return args.in_chans or (args.input_size[0] if args.input_size else 3)


def create_student(args: argparse.Namespace) -> nn.Module:
    """``timm.create_model`` with every model flag of timm's ``train.py``."""
    in_chans = student_in_chans(args)
    overlay = dict(args.pretrained_cfg_overlay or {})
    if args.pretrained_path:
        overlay = dict(file=args.pretrained_path, num_classes=-1, **overlay)  # -1: adapt the head
    if args.pretrained and 'file' not in overlay:
        problem = pretrained_unavailable(args.model)
        if problem:
            raise UsageError(f'--pretrained {args.model}: {problem}')
    if args.fast_norm:
        set_fast_norm()
    try:
        model = create_model(
            args.model,
            pretrained=args.pretrained,
            checkpoint_path=args.initial_checkpoint,
            **({'pretrained_cfg_overlay': overlay} if overlay else {}),
            **({'scriptable': True} if args.torchscript else {}),
            **architecture_kwargs(vars(args), args.num_classes, in_chans),
        )
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise UsageError(f"unknown model '{args.model}' (see timm.list_models())") from None
        raise UsageError(f"cannot create model '{args.model}': {e}") from None
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise UsageError(f"cannot create model '{args.model}': {e}") from None
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    return model


def check_naflex_student(args: argparse.Namespace, model: nn.Module) -> Optional[Tuple[int, int]]:
    """With ``--naflex-loader``: the student's patch size (the NaFlex loaders patchify at it), once the student is
    known to read the loader's batches (timm's train.py would fall back to 16 px patches and fail in the forward).

    Returns:
        The patch size, or None without ``--naflex-loader``.

    Raises:
        UsageError: The student is not a NaFlex model, or reads another layout or patch size than the loader makes.
    """
    if not args.naflex_loader:
        return None
    channels_last = not args.naflex_patchify_channels_first
    patch_size = tuple(model.get_patch_size()) if callable(getattr(model, 'get_patch_size', None)) else None
    sizes = [(size, size) for size in args.naflex_patch_sizes] if args.naflex_patch_sizes else [patch_size]
    problem = reads_naflex_problem(model, sizes, student_in_chans(args), channels_last,
                                   unflattened=bool(args.naflex_patch_sizes))
    if problem:
        raise UsageError(f"--naflex-loader: model '{args.model}' cannot train on its {layout_name(channels_last)} "
                         f"patch batches: {problem}")
    return patch_size


def place_model(args: argparse.Namespace, model: nn.Module, device: torch.device,
                model_dtype: Optional[torch.dtype]) -> nn.Module:
    """Split batch norms, the device and dtype, channels_last, SyncBatchNorm and TorchScript as asked, in timm's
    order."""
    if args.split_bn:
        # One batch norm per AugMix split (the clean split keeps the model's own); --resplit alone splits in two.
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        args.dist_bn = ''  # synchronized BN needs no epoch-end reduction
        model = convert_sync_batchnorm(model)
    if args.torchscript:
        try:
            model = torch.jit.script(model)
        except Exception as e:  # TorchScript's frontend raises many types, each with a source excerpt
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise UsageError(f'--torchscript: TorchScript cannot script {args.model}: {reason}') from None
    return model


def create_timm_criterion(args: argparse.Namespace, smoothing: float, mixup_active: bool,
                          weights: Optional[LossWeights] = None) -> nn.Module:
    """The criterion timm's ``train.py`` would use (Tf-KD off), through timm's loss factory; with ``--jsd-loss``
    timm's Jensen-Shannon loss over the AugMix splits, smoothed as timm smooths it (the policy refuses loss weights
    with it: it takes none).

    Raises:
        UsageError: timm's factory refuses the combination (e.g. class weights on softmax cross-entropy, which timm
            takes for BCE and multi-label ASL only).
    """
    if args.jsd_loss:
        return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=smoothing)
    weights = weights or LossWeights()
    loss_type = args.loss or ('bce' if args.bce_loss else None)
    stats = weights.class_stats if loss_type == 'db' else None
    try:
        return create_classification_loss(
            loss_type=loss_type,
            multi_label=args.task == 'multilabel',
            smoothing=smoothing,
            soft_targets=mixup_active,
            class_weight=weights.class_weight,
            pos_weight=weights.pos_weight,
            bce_target_thresh=args.bce_target_thresh,
            bce_sum=args.bce_sum,
            poly_epsilon=args.poly_epsilon,
            poly_gamma=args.poly_gamma,
            class_counts=None if stats is None else stats[0],
            num_samples=None if stats is None else stats[1],
        )
    except ValueError as e:
        raise UsageError(f"timm's criterion ({_loss_flags(args)}): {' '.join(str(e).split())}") from None


def _loss_flags(args: argparse.Namespace) -> str:
    """The flags that chose the criterion, for messages."""
    given = [f'--loss {args.loss}' if args.loss else ('--bce-loss' if args.bce_loss else 'cross-entropy')]
    if args.task == 'multilabel':
        given.append('--task multilabel')
    given += [f'{option} {value}' for option, value in (
        ('--loss-class-weight', args.loss_class_weight), ('--loss-pos-weight', pos_weight_value(args)))
        if value is not None]
    return ', '.join(given)


def _timm_distillation_task(args, model, criterion, device, model_dtype, verbose) -> TrainingTask:
    problem = pretrained_unavailable(args.kd_model_name)
    if problem:
        raise UsageError(f'--kd-model-name {args.kd_model_name}: {problem}')
    common = dict(student_model=model, teacher_model=args.kd_model_name, criterion=criterion,
                  distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight,
                  device=device, dtype=model_dtype, verbose=verbose)
    if args.kd_distill_type == 'logit':
        return LogitDistillationTask(loss_type=args.kd_loss_type, temperature=args.kd_temperature, **common)
    if args.kd_distill_type == 'feature':
        return FeatureDistillationTask(student_feature_dim=args.kd_student_feature_dim,
                                       teacher_feature_dim=args.kd_teacher_feature_dim, **common)
    return TokenDistillationTask(distill_type=args.kd_token_distill_type, temperature=args.kd_temperature, **common)


def create_task(
        args: argparse.Namespace,
        model: nn.Module,
        smoothing: float,
        mixup_smoothing: Optional[float],
        data_config: Dict[str, Any],
        num_train_samples: Optional[int],
        device: torch.device,
        model_dtype: Optional[torch.dtype],
        verbose: bool,
        train_targets: Optional[torch.Tensor] = None,
) -> TrainingTask:
    """The task of ``--tfkd-mode`` (for plain timm training: timm's classification or ``--kd-*`` distillation).

    Args:
        smoothing: Label smoothing of the cross-entropy part (after the smoothing policy).
        mixup_smoothing: The smoothing the run's Mixup / CutMix fold into their targets; None when both are off.
        train_targets: The class index of every training sample, for methods with ``needs_train_targets``.

    Raises:
        UsageError: Loss weights that do not fit the model's classes, or a criterion timm refuses.
    """
    criterion = None
    weights = resolve_loss_weights(args, unwrap_model(model).num_classes)
    if verbose and weights.class_weight is not None:
        shown = torch.as_tensor(weights.class_weight).flatten()
        _logger.info(f'Class weights from --loss-class-weight {args.loss_class_weight}: '
                     + ', '.join(f'{float(w):.4g}' for w in shown[:10]) + (' ...' if shown.numel() > 10 else ''))
    if get_method(args.tfkd_mode).uses_timm_criterion:
        criterion = create_timm_criterion(args, smoothing, mixup_smoothing is not None, weights).to(device)
        if args.kd_model_name is not None:
            try:
                return _timm_distillation_task(args, model, criterion, device, model_dtype, verbose)
            except UsageError:
                raise
            except Exception as e:  # timm, torch and huggingface_hub errors of the teacher's creation or download
                detail = ' '.join(str(e).split())[:300]
                raise UsageError(f"cannot create timm distillation teacher '{args.kd_model_name}': "
                                 f"{type(e).__name__}: {detail}") from None
    return create_tfkd_task(args, model, criterion, smoothing=smoothing, data_config=data_config,
                            num_train_samples=num_train_samples, train_targets=train_targets, device=device,
                            dtype=model_dtype, verbose=verbose,
                            mixup_smoothing=mixup_smoothing or 0.0,
                            class_weight=weights.class_weight_vector(unwrap_model(model).num_classes),
                            pos_weight=weights.pos_weight)


def resolve_lr(args: argparse.Namespace, batches_per_step: float) -> None:
    """Scale ``--lr-base`` to the global batch when ``--lr`` is not given, as timm's ``train.py`` does."""
    if args.lr:
        return
    global_batch = batches_per_step * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        ratio = ratio ** 0.5
    args.lr = args.lr_base * ratio
    _logger.info(f'Learning rate ({args.lr:g}) from base learning rate ({args.lr_base:g}) and global batch size '
                 f'({global_batch:g}), {args.lr_base_scale} scaling')


def create_optimizer(args: argparse.Namespace, task: TrainingTask) -> torch.optim.Optimizer:
    """timm's optimizer over the task's trainable module only (never a teacher)."""
    try:
        return create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    except (AssertionError, ValueError, TypeError) as e:
        raise UsageError(f"cannot create optimizer '{args.opt}': {e}") from None
