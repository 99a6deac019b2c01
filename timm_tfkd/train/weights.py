"""Loss weights from timm's flags: ``--class-stats``, ``--loss-class-weight``, ``--loss-pos-weight`` (and
``--bce-pos-weight``), ``--loss-weight-power`` / ``-beta`` / ``-max``, resolved with timm's own helpers.

timm's ``class_weights.py`` writes the stats file (per-class positive counts and the sample count); a weight flag
takes explicit weights (a number, a comma separated list, a file) or a method that computes them from the stats:
``inv_freq`` / ``effective_num`` for ``--loss-class-weight``, ``neg_pos`` for ``--loss-pos-weight``. Plain timm
training hands them to timm's criterion (which takes them for BCE and multi-label ASL, as timm does); the Tf-KD
modes weight the cross-entropy part of their losses with ``--loss-class-weight``.
"""
import argparse
import json
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from timm.loss import CLASS_WEIGHT_METHOD_KINDS, load_class_stats, resolve_class_weights

from ..errors import UsageError

_logger = logging.getLogger(__name__)

ClassStats = Tuple[torch.Tensor, int]
Weight = Union[float, torch.Tensor]
DEFAULT_POWER = 1.0  # timm's compute_class_weights default, when --loss-weight-power is not given


@dataclass
class LossWeights:
    """The weights the criterion gets.

    Attributes:
        class_weight: Per-class weights (a float broadcasts over classes), or None.
        pos_weight: Weights of positive targets (BCE, multi-label ASL), or None.
        class_stats: (positive counts, sample count) from ``--class-stats`` (timm's 'db' loss reads them), or None.
    """
    class_weight: Optional[Weight] = None
    pos_weight: Optional[Weight] = None
    class_stats: Optional[ClassStats] = None

    def class_weight_vector(self, num_classes: int) -> Optional[torch.Tensor]:
        """``class_weight`` as one weight per class (a single value repeated), or None."""
        if self.class_weight is None or isinstance(self.class_weight, torch.Tensor):
            return self.class_weight
        return torch.full((num_classes,), float(self.class_weight))


def pos_weight_value(args: argparse.Namespace) -> Optional[str]:
    """``--loss-pos-weight``, else timm's older ``--bce-pos-weight`` (which timm's train.py folds into it)."""
    if args.loss_pos_weight is not None:
        return args.loss_pos_weight
    return None if args.bce_pos_weight is None else str(args.bce_pos_weight)


def _weight_options(args: argparse.Namespace) -> List[Tuple[str, str, Optional[str]]]:
    """(option, timm's kind, value) of each weight flag."""
    pos_option = '--loss-pos-weight' if args.loss_pos_weight is not None else '--bce-pos-weight'
    return [('--loss-class-weight', 'class_weight', args.loss_class_weight),
            (pos_option, 'pos_weight', pos_weight_value(args))]


def load_stats(args: argparse.Namespace) -> Optional[ClassStats]:
    """The ``--class-stats`` file read with timm's loader.

    Raises:
        UsageError: Missing, unreadable, not JSON, or without valid counts; one line naming the file.
    """
    path = args.class_stats
    if not path:
        return None
    try:
        return load_class_stats(path)
    except OSError as e:
        raise UsageError(f"--class-stats '{path}' cannot be read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--class-stats '{path}' is not valid JSON: {e}") from None
    except (ValueError, TypeError) as e:
        raise UsageError(f'--class-stats: {e}') from None


def _method(value: Optional[str]) -> Optional[str]:
    return value.strip() if isinstance(value, str) and value.strip() in CLASS_WEIGHT_METHOD_KINDS else None


def _resolve(option: str, kind: str, value: Optional[str], stats: Optional[ClassStats],
             args: argparse.Namespace) -> Optional[Weight]:
    try:
        return resolve_class_weights(
            value, kind=kind, class_stats=stats,
            power=DEFAULT_POWER if args.loss_weight_power is None else args.loss_weight_power,
            beta=args.loss_weight_beta, max_weight=args.loss_weight_max)
    except OSError as e:
        raise UsageError(f"{option} '{value}' cannot be read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{option} '{value}' is not valid JSON: {e}") from None
    except ValueError as e:
        if 'could not convert' in str(e):
            methods = [method for method, method_kind in CLASS_WEIGHT_METHOD_KINDS.items() if method_kind == kind]
            raise UsageError(f"{option} '{value}' is not a number, a comma separated list of numbers, an existing file "
                             f"or one of {', '.join(methods)}") from None
        raise UsageError(f"{option} {value}: {' '.join(str(e).split())}") from None


def check_loss_weights(args: argparse.Namespace) -> List[str]:
    """Read the stats file and resolve every weight flag once, before anything is built.

    Returns:
        Warnings for the log: a stats file or weight setting that nothing reads.

    Raises:
        UsageError: A file that cannot be read, a method without stats or of the other kind, bad weights.
    """
    stats = load_stats(args)
    options = _weight_options(args)
    for option, kind, value in options:
        _resolve(option, kind, value, stats, args)
    methods = [_method(value) for _, _, value in options]
    warnings = []
    if stats is not None and not any(methods) and args.loss != 'db':
        warnings.append(f"--class-stats '{args.class_stats}' is not read: no weight method (inv_freq, effective_num, "
                        f"neg_pos) and no --loss db asks for it")
    if args.loss_weight_power is not None and not {'inv_freq', 'neg_pos'} & set(methods):
        warnings.append('--loss-weight-power is ignored: it is the exponent of the inv_freq and neg_pos weights')
    return warnings


def _check_count(option: str, value: str, weight: Optional[Weight], num_classes: int, stats_path: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.numel() == num_classes:
        return
    source = f"--class-stats '{stats_path}'" if _method(value) else f'{option} {value}'
    raise UsageError(f'{source} has {weight.numel()} entries but the model has {num_classes} classes')


def resolve_loss_weights(args: argparse.Namespace, num_classes: int) -> LossWeights:
    """The weights of every weight flag, checked against the model's classes.

    Raises:
        UsageError: As :func:`check_loss_weights`, or a weight count other than ``num_classes``.
    """
    stats = load_stats(args)
    resolved = []
    for option, kind, value in _weight_options(args):
        weight = _resolve(option, kind, value, stats, args)
        _check_count(option, value, weight, num_classes, args.class_stats)
        resolved.append(weight)
    if stats is not None and stats[0].numel() != num_classes:
        raise UsageError(f"--class-stats '{args.class_stats}' has {stats[0].numel()} entries but the model has "
                         f"{num_classes} classes")
    return LossWeights(class_weight=resolved[0], pos_weight=resolved[1], class_stats=stats)
