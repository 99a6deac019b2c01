"""The per-flag value checks of the trainer: every numeric timm flag whose value timm or torch would take unchecked,
the per-channel statistics and the metric that ranks checkpoints."""
import argparse
import math
from typing import Any, Callable, Dict, Optional

from ..errors import UsageError
from ..run_folder import MULTILABEL_METRIC_NAMES, MULTILABEL_TASK
from .build import student_in_chans
from .flags import create_parser

# A rule returns what is wrong with a value ("must be >= 1"), or None. Written as `not (inside)` so NaN fails too.
Rule = Callable[[Any], Optional[str]]


def _at_least(low: float) -> Rule:
    return lambda value: None if value >= low else f'must be >= {low:g}'


def _above(low: float) -> Rule:
    return lambda value: None if value > low else f'must be > {low:g}'


def _within(low: float, high: float, include_high: bool = True) -> Rule:
    def rule(value):
        if low <= value <= high and (include_high or value < high):
            return None
        return f"must be in [{low:g}, {high:g}{']' if include_high else ')'}"
    return rule


def _zero_or_at_least(low: float) -> Rule:
    return lambda value: None if value == 0 or value >= low else f'must be 0 or >= {low:g}'


def _optional(rule: Rule) -> Rule:
    return lambda value: None if value is None else rule(value)


def _each(rule: Rule) -> Rule:
    def check(values):
        return next((f'values {problem}' for problem in map(rule, values) if problem), None)
    return check


def _range_pair(low: float, high: float) -> Rule:
    """Two values low < a <= b <= high (random resized crop scale / ratio)."""
    def rule(values):
        if len(values) == 2 and low < values[0] <= values[1] <= high:
            return None
        return f'must be two values a <= b in ({low:g}, {high:g}]'
    return rule


PROBABILITY = _within(0.0, 1.0)
DROP_RATE = _within(0.0, 1.0, include_high=False)
NON_NEGATIVE = _at_least(0)
POSITIVE = _above(0)
COUNT = _at_least(1)

# Every numeric flag of timm's train.py whose value timm or torch would take unchecked (and fail on, often after an
# epoch, or train wrongly): destination -> rule.
VALUE_RULES: Dict[str, Rule] = {
    'epochs': COUNT, 'stop_epoch': _optional(COUNT), 'start_epoch': _optional(NON_NEGATIVE),
    'batch_size': COUNT, 'validation_batch_size': _optional(COUNT), 'grad_accum_steps': COUNT,
    'img_size': _optional(COUNT), 'input_size': _optional(_each(COUNT)), 'in_chans': _optional(COUNT),
    'num_classes': _optional(COUNT), 'crop_pct': _optional(POSITIVE), 'std': _optional(_each(POSITIVE)),
    'workers': NON_NEGATIVE, 'log_interval': COUNT, 'val_interval': COUNT, 'recovery_interval': NON_NEGATIVE,
    'checkpoint_hist': COUNT, 'save_epochs': _optional(_each(COUNT)), 'train_num_samples': _optional(COUNT),
    'val_num_samples': _optional(COUNT), 'train_batches_per_epoch': _optional(COUNT),
    'lr': _optional(POSITIVE), 'lr_base': POSITIVE, 'lr_base_size': COUNT, 'warmup_lr': NON_NEGATIVE,
    'min_lr': NON_NEGATIVE, 'warmup_epochs': NON_NEGATIVE, 'cooldown_epochs': NON_NEGATIVE,
    'patience_epochs': NON_NEGATIVE, 'decay_epochs': POSITIVE, 'decay_milestones': _each(NON_NEGATIVE),
    'decay_rate': POSITIVE, 'lr_cycle_mul': POSITIVE, 'lr_cycle_decay': POSITIVE, 'lr_cycle_limit': COUNT,
    'lr_k_decay': POSITIVE, 'lr_noise_pct': NON_NEGATIVE, 'lr_noise_std': NON_NEGATIVE,
    'weight_decay': NON_NEGATIVE, 'momentum': PROBABILITY, 'opt_eps': _optional(POSITIVE),
    'opt_betas': _optional(_each(_within(0.0, 1.0, include_high=False))), 'clip_grad': _optional(POSITIVE),
    'layer_decay': _optional(POSITIVE), 'smoothing': DROP_RATE, 'mixup': NON_NEGATIVE, 'cutmix': NON_NEGATIVE,
    'cutmix_minmax': _optional(_range_pair(0.0, 1.0)), 'mixup_prob': PROBABILITY,
    'mixup_switch_prob': PROBABILITY, 'mixup_off_epoch': NON_NEGATIVE, 'reprob': PROBABILITY, 'recount': COUNT,
    'hflip': PROBABILITY, 'vflip': PROBABILITY, 'color_jitter': NON_NEGATIVE,
    'color_jitter_prob': _optional(PROBABILITY), 'grayscale_prob': _optional(PROBABILITY),
    'gaussian_blur_prob': _optional(PROBABILITY), 'scale': _range_pair(0.0, 1.0), 'ratio': _range_pair(0.0, math.inf),
    'aug_repeats': NON_NEGATIVE, 'epoch_repeats': NON_NEGATIVE, 'drop': DROP_RATE,
    'drop_connect': _optional(DROP_RATE), 'drop_path': _optional(DROP_RATE), 'drop_block': _optional(DROP_RATE),
    'bn_momentum': _optional(_within(0.0, 1.0)), 'bn_eps': _optional(POSITIVE), 'model_ema_decay': PROBABILITY,
    'kd_temperature': POSITIVE, 'distill_loss_weight': _optional(NON_NEGATIVE),
    'task_loss_weight': _optional(NON_NEGATIVE), 'tta': NON_NEGATIVE, 'aug_splits': _zero_or_at_least(2),
    'multilabel_threshold': _within(0.0, 1.0, include_high=False),
    'loss_weight_power': _optional(NON_NEGATIVE), 'loss_weight_beta': _within(0.0, 1.0, include_high=False),
    'loss_weight_max': _optional(POSITIVE),
    'train_img_sizes': _optional(_each(COUNT)), 'train_batch_sizes': _optional(_each(COUNT)),
    'train_size_probs': _optional(_each(NON_NEGATIVE)), 'train_size_schedule_spread': NON_NEGATIVE,
    'train_size_random_mix': PROBABILITY, 'naflex_train_seq_lens': _each(COUNT), 'naflex_max_seq_len': COUNT,
    'naflex_patch_sizes': _optional(_each(COUNT)), 'naflex_patch_size_probs': _optional(_each(NON_NEGATIVE)),
}
# Metrics the trainer's validation reports, by which --eval-metric may rank checkpoints (multi-label: timm's
# multi-label evaluator's, which ranks by mAP by default).
EVAL_METRICS = ('top1', 'top5', 'loss', 'nll', 'ece')
DEFAULT_EVAL_METRIC = 'top1'  # timm's --eval-metric default


def check_values(args: argparse.Namespace) -> None:
    """Refuse numeric values that cannot work and per-channel statistics that do not fit the channels.

    Raises:
        UsageError: The first problem, as one line naming the flag.
    """
    parser = create_parser()
    for dest, rule in VALUE_RULES.items():
        value = getattr(args, dest)
        problem = rule(value)
        if problem:
            shown = ' '.join(f'{v:g}' for v in value) if isinstance(value, list) else f'{value:g}'
            raise UsageError(f'{option_string(parser, dest)} {problem}, got {shown}')
    channels = student_in_chans(args)
    for dest in ('mean', 'std'):
        values = getattr(args, dest)
        if values is not None and len(values) not in (1, channels):
            raise UsageError(f'--{dest} needs 1 or {channels} values (one per input channel), got {len(values)}')
    allowed = MULTILABEL_METRIC_NAMES if args.task == MULTILABEL_TASK else EVAL_METRICS
    if args.eval_metric not in allowed:
        task = ' with --task multilabel' if args.task == 'multilabel' else ''
        raise UsageError(f"--eval-metric must be one of {', '.join(allowed)}{task}, got '{args.eval_metric}'")


def option_string(parser: argparse.ArgumentParser, dest: str) -> str:
    """The long option that stores into ``dest``, for messages."""
    return next(action.option_strings[-1] for action in parser._actions if action.dest == dest)
