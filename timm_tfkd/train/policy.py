"""What the trainer accepts: the checks of the whole configuration before anything is built, and the smoothing
policy of each method."""
import argparse
from typing import Set, Tuple

from ..errors import UsageError
from ..methods import SMOOTHING_EPSILON, SMOOTHING_EXPLICIT, SMOOTHING_TIMM, get_method
from .data import mixup_settings
from .flags import create_parser

# timm flags the trainer accepts (so timm commands parse) but refuses when set away from their default.
UNSUPPORTED_FLAGS = {
    'naflex_loader': 'NaFlex variable-resolution loader',
    'train_img_sizes': 'variable-resolution training',
    'train_batch_sizes': 'variable-resolution training',
    'train_size_probs': 'variable-resolution training',
    'aug_splits': 'AugMix splits',
    'split_bn': 'AugMix splits',
    'jsd_loss': 'AugMix splits',
    'torchscript': 'TorchScript',
    'fuser': 'TorchScript',
    'tta': 'test-time augmentation in validation',
    'save_images': 'saving input images',
    'class_stats': 'class statistics for loss weighting',
    'loss_weight_power': 'class statistics for loss weighting',
    'task': 'multi-label training',
    'target_format': 'multi-label training',
}


def _option_string(parser: argparse.ArgumentParser, dest: str) -> str:
    """The long option that stores into ``dest``, for messages."""
    return next(action.option_strings[-1] for action in parser._actions if action.dest == dest)


def check_supported(args: argparse.Namespace) -> None:
    """Refuse flags the trainer does not implement yet and method settings that cannot work.

    Args:
        args: Parsed arguments.

    Raises:
        UsageError: The first problem found, as one line.
    """
    parser = create_parser()
    for dest, reason in UNSUPPORTED_FLAGS.items():
        if getattr(args, dest) != parser.get_default(dest):
            raise UsageError(f"{_option_string(parser, dest)} is not supported by the Tf-KD trainer yet ({reason}); "
                             f"remove it or use timm's train.py")
    method = get_method(args.tfkd_mode)
    if not method.uses_timm_criterion:
        if args.kd_model_name is not None:
            raise UsageError(f"--kd-model-name (timm's distillation) and --tfkd-mode {method.name} are two different "
                             f"distillation methods; use one of them")
        if args.bce_loss or args.loss not in (None, 'ce'):
            loss = '--bce-loss' if args.bce_loss else f'--loss {args.loss}'
            raise UsageError(f'{loss} cannot be combined with --tfkd-mode {method.name}: Tf-KD losses are built on '
                             f'softmax cross-entropy')
    try:
        method.check(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if method.smoothing == SMOOTHING_EPSILON and not 0.0 <= args.smoothing < 1.0:
        raise UsageError(f'--tfkd-mode {method.name} needs --smoothing in [0, 1), got {args.smoothing:g}')


def resolve_smoothing(args: argparse.Namespace, explicit: Set[str]) -> Tuple[float, str]:
    """Label smoothing of the cross-entropy part of the loss, and why, for the start-of-run log.

    timm's default smoothing of 0.1 would silently stack a second regularizer on a method that already regularizes,
    so such methods drop it unless the user asked for it (and then it is folded into the Mixup / CutMix targets,
    see :func:`mixup_smoothing`).

    Args:
        args: Parsed arguments; left unchanged.
        explicit: Destinations the user set.

    Returns:
        The smoothing to use and a one-line explanation.
    """
    method = get_method(args.tfkd_mode)
    smoothing = float(args.smoothing)
    if method.smoothing == SMOOTHING_TIMM:
        return smoothing, f'label smoothing {smoothing:g} (timm --smoothing, Tf-KD off)'
    if method.smoothing == SMOOTHING_EPSILON:
        return smoothing, (f'label smoothing control: epsilon {smoothing:g} from --smoothing, '
                           f'{args.tfkd_smoothing_convention} convention')
    if 'smoothing' not in explicit:
        return 0.0, (f"label smoothing 0 on the cross-entropy part: Tf-KD {method.name} already regularizes, so "
                     f"timm's default --smoothing {smoothing:g} is not applied (give --smoothing to stack it)")
    if smoothing == 0:
        return smoothing, f'label smoothing 0 on the cross-entropy part, as set explicitly (Tf-KD {method.name})'
    return smoothing, (f'label smoothing {smoothing:g} on the cross-entropy part, as set explicitly: '
                       f'stacked on Tf-KD {method.name} on purpose')


def mixup_smoothing(args: argparse.Namespace, smoothing: float) -> float:
    """The smoothing folded into Mixup / CutMix targets: the method's epsilon is applied by its loss, anything else
    by Mixup (as timm does)."""
    return 0.0 if get_method(args.tfkd_mode).smoothing == SMOOTHING_EPSILON else smoothing


def check_smoothing(args: argparse.Namespace, smoothing: float) -> None:
    """Refuse a smoothing that only Mixup / CutMix could apply when neither is on.

    Raises:
        UsageError: One line.
    """
    method = get_method(args.tfkd_mode)
    if method.smoothing == SMOOTHING_EXPLICIT and smoothing > 0 and mixup_settings(args, 0.0) is None:
        raise UsageError(f'--smoothing {smoothing:g} with --tfkd-mode {method.name} is only supported with '
                         f'--mixup / --cutmix (folded into their targets); drop --smoothing or use --tfkd-mode lsr')
