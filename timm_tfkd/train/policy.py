"""What the trainer accepts: the checks of the whole configuration before anything is built, and the smoothing
policy of each method."""
import argparse
import math
import os
import tempfile
from typing import List, Set, Tuple

from timm.data.readers.targets import TARGET_FORMATS

from ..errors import UsageError
from ..hub import is_export
from ..methods import (
    AUG_SPLITS_ALL, SMOOTHING_EPSILON, SMOOTHING_EXPLICIT, SMOOTHING_TIMM, get_method, registered_flags,
)
from ..run_folder import MULTILABEL_TASK, headline_metric
from .data import mixup_settings
from .flags import create_parser
from .loggers import check_logging_args
from .publish import check_hub_args
from .splits import MULTILABEL_READERS
from .values import DEFAULT_EVAL_METRIC, check_values, option_string
from .weights import check_loss_weights, pos_weight_value

DEFAULT_OUTPUT = './output/train'  # timm's train.py default for --output
# The TorchScript fusers of timm's set_jit_fuser that torch still has ('' leaves torch's default); its 'nvfuser' /
# 'nvf' switch a fuser torch 2 removed from TorchScript (torch warns that it is a no-op).
JIT_FUSERS = ('te', 'old', 'legacy')

# The flags of each variable-resolution loader mode, which the other modes do not read (timm ignores them there).
SCHEDULED_FLAGS = ('train_batch_sizes', 'train_size_probs', 'train_size_schedule', 'train_size_schedule_spread',
                   'train_size_random_mix', 'train_batches_per_epoch', 'variable_batch_loss_scale')
NAFLEX_FLAGS = ('naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs',
                'naflex_loss_scale', 'naflex_patchify_channels_first')


def _check_choice_lengths(parser: argparse.ArgumentParser, choices: str, values: str, args) -> None:
    """One value of ``values`` (weights or batch sizes) for each of ``choices``; weights that can be normalized."""
    given = getattr(args, values)
    if given is None:
        return
    count = len(getattr(args, choices))
    if len(given) != count:
        raise UsageError(f'{option_string(parser, values)} needs one value for each of the {count} '
                         f'{option_string(parser, choices)}, got {len(given)}')
    if values.endswith('probs') and not (math.isfinite(sum(given)) and sum(given) > 0):
        raise UsageError(f"{option_string(parser, values)} must have a finite, positive sum, got "
                         f"{' '.join(f'{v:g}' for v in given)}")


def check_loader_mode(args: argparse.Namespace) -> List[str]:
    """Refuse what timm's variable-resolution loaders cannot take (the combinations timm's train.py refuses, and
    those its loaders fail on); warn of loader flags the chosen mode does not read.

    Returns:
        Warnings for the log.

    Raises:
        UsageError: The first problem found, as one line.
    """
    parser = create_parser()
    if args.naflex_loader and args.train_img_sizes is not None:
        raise UsageError('--naflex-loader and --train-img-sizes are alternative loader modes; use one of them')
    if args.use_multi_epochs_loader and (args.naflex_loader or args.train_img_sizes is not None):
        mode = '--naflex-loader' if args.naflex_loader else '--train-img-sizes'
        raise UsageError(f'--use-multi-epochs-loader cannot be combined with {mode} (timm does not support it)')
    if args.naflex_loader and args.aug_splits > 1:
        raise UsageError("--aug-splits cannot be combined with --naflex-loader (timm's NaFlex loader has no AugMix "
                         "splits)")
    if args.naflex_loader and args.save_images:
        raise UsageError('--save-images cannot be combined with --naflex-loader: its batches are patch sequences, '
                         'not images')
    if args.naflex_loader and args.aug_repeats:
        raise UsageError("--aug-repeats cannot be combined with --naflex-loader (timm's NaFlex loader does not "
                         "support repeated augmentation)")
    if args.train_img_sizes is not None:
        _check_choice_lengths(parser, 'train_img_sizes', 'train_batch_sizes', args)
        _check_choice_lengths(parser, 'train_img_sizes', 'train_size_probs', args)
        if args.train_size_schedule == 'progressive' and len(args.train_img_sizes) < 2:
            raise UsageError('--train-size-schedule progressive needs at least two --train-img-sizes, got '
                             f'{len(args.train_img_sizes)}')
    if args.naflex_patch_sizes is not None:
        _check_choice_lengths(parser, 'naflex_patch_sizes', 'naflex_patch_size_probs', args)
    unread = [
        (SCHEDULED_FLAGS if args.train_img_sizes is None else (), 'without --train-img-sizes'),
        (NAFLEX_FLAGS if not args.naflex_loader else (), 'without --naflex-loader'),
        (('naflex_patch_size_probs',) if args.naflex_loader and args.naflex_patch_sizes is None else (),
         'without --naflex-patch-sizes'),
        (('mixup_mode', 'cutmix_minmax') if args.naflex_loader else (), 'with --naflex-loader (NaFlex Mixup has '
                                                                         'neither)'),
    ]
    warnings = []
    for dests, where in unread:
        options = [option_string(parser, dest) for dest in dests if getattr(args, dest) != parser.get_default(dest)]
        if options:
            warnings.append(f"{', '.join(options)} {'has' if len(options) == 1 else 'have'} no effect {where}, as in "
                            f"timm")
    return warnings


def check_supported(args: argparse.Namespace) -> None:
    """Refuse what the chosen method does not support: targets that do not fit ``--task``, timm losses and
    distillation beside a Tf-KD loss, and the method's own settings that cannot work.

    Args:
        args: Parsed arguments.

    Raises:
        UsageError: The first problem found, as one line.
    """
    method = get_method(args.tfkd_mode)
    check_task(args)
    if not method.uses_timm_criterion:
        if args.kd_model_name is not None:
            raise UsageError(f"--kd-model-name (timm's distillation) and --tfkd-mode {method.name} are two different "
                             f"distillation methods; use one of them")
        multilabel = args.task == 'multilabel'
        own_loss = 'bce' if multilabel else 'ce'
        if (args.bce_loss and own_loss != 'bce') or args.loss not in (None, own_loss):
            loss = f'--loss {args.loss}' if args.loss not in (None, own_loss) else '--bce-loss'
            why = ('its multi-label loss is BCE' if multilabel else
                   'Tf-KD losses are built on softmax cross-entropy')
            raise UsageError(f'{loss} cannot be combined with --tfkd-mode {method.name}: {why}')
        if not multilabel and pos_weight_value(args) is not None:
            option = '--loss-pos-weight' if args.loss_pos_weight is not None else '--bce-pos-weight'
            raise UsageError(f'{option} cannot be combined with --tfkd-mode {method.name}: it weighs the positive '
                             f'targets of BCE losses, and Tf-KD losses are softmax cross-entropy (use '
                             f'--loss-class-weight)')
    try:
        method.check(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if method.smoothing == SMOOTHING_EPSILON and not 0.0 <= args.smoothing < 1.0:
        raise UsageError(f'--tfkd-mode {method.name} needs --smoothing in [0, 1), got {args.smoothing:g}')


def check_aug_splits(args: argparse.Namespace) -> None:
    """Refuse AugMix split settings that timm asserts against, or that cannot work together.

    The settings each method refuses (``--jsd-loss`` with a Tf-KD loss) are refused by its ``check``.

    Raises:
        UsageError: One line.
    """
    splits = args.aug_splits > 1
    if args.split_bn and not (splits or args.resplit):
        raise UsageError('--split-bn needs --aug-splits N (one batch norm per split) or --resplit (two halves)')
    if args.split_bn and not splits and args.batch_size % 2:
        raise UsageError(f'--split-bn with --resplit splits each batch in two halves: --batch-size must be even, '
                         f'got {args.batch_size}')
    if args.split_bn and args.sync_bn:
        raise UsageError('--split-bn cannot be combined with --sync-bn (synchronized batch norms would replace the '
                         'split ones)')
    if args.jsd_loss and not splits:
        raise UsageError('--jsd-loss compares the AugMix splits: it needs --aug-splits N with N >= 2')
    if args.jsd_loss and (args.bce_loss or args.loss not in (None, 'ce')):
        loss = '--bce-loss' if args.bce_loss else f'--loss {args.loss}'
        raise UsageError(f"--jsd-loss is timm's cross-entropy + Jensen-Shannon loss; it cannot be combined with {loss}")
    if args.jsd_loss and args.task == MULTILABEL_TASK:
        raise UsageError('--jsd-loss compares softmax predictions of one class; it cannot be combined with '
                         '--task multilabel')
    if args.jsd_loss and args.loss_class_weight is not None:
        raise UsageError("--jsd-loss takes no class weights (timm's JsdCrossEntropy has none); drop "
                         "--loss-class-weight or --jsd-loss")
    if not splits:
        return
    if mixup_settings(args, 0.0) is not None:
        raise UsageError('--aug-splits cannot be combined with --mixup / --cutmix (they would mix views across '
                         'splits)')
    if args.no_aug:
        raise UsageError('--aug-splits augments each split: it cannot be combined with --no-aug')


def aug_splits_note(args: argparse.Namespace) -> str:
    """The start-of-run line saying how the method trains on the AugMix splits of ``--aug-splits N``."""
    method = get_method(args.tfkd_mode)
    if args.jsd_loss:
        how = "timm's JSD loss: cross-entropy on the clean split + Jensen-Shannon consistency of all splits"
    elif method.aug_splits == AUG_SPLITS_ALL:
        how = 'its loss over all splits'
    else:
        how = 'cross-entropy over all splits, the KD term over the clean split only' + (
            ', the only one the teacher sees' if method.needs_teacher else '')
    return f'AugMix: {args.aug_splits} splits per batch, the clean one first; --tfkd-mode {method.name}: {how}'


def check_scripting(args: argparse.Namespace) -> None:
    """Refuse TorchScript settings timm asserts against, and models TorchScript cannot script.

    Raises:
        UsageError: One line.
    """
    if args.fuser in ('nvfuser', 'nvf'):
        raise UsageError(f"--fuser {args.fuser}: this torch's TorchScript has no nvfuser any more; use te or old")
    if args.fuser and args.fuser not in JIT_FUSERS:
        raise UsageError(f"--fuser must be one of {', '.join(JIT_FUSERS)}, got '{args.fuser}'")
    if not args.torchscript:
        return
    if args.torchcompile:
        raise UsageError('--torchscript and --torchcompile exclude each other; choose one')
    if args.sync_bn:
        raise UsageError('--torchscript cannot be combined with --sync-bn (timm refuses it too)')
    if args.split_bn:
        raise UsageError("--torchscript cannot script --split-bn's split batch norms; drop one of them")


def check_task(args: argparse.Namespace) -> None:
    """Refuse target settings that do not fit ``--task``, as timm's ``train.py`` does.

    Raises:
        UsageError: One line.
    """
    if args.target_format is not None and args.target_format not in TARGET_FORMATS:
        raise UsageError(f"--target-format must be one of {', '.join(TARGET_FORMATS)}, got '{args.target_format}'")
    if args.task != 'multilabel':
        if args.target_format == 'multihot':
            raise UsageError('--target-format multihot needs --task multilabel')
        return
    if not (args.dataset or '').lower().startswith(MULTILABEL_READERS):
        kinds = ', '.join(MULTILABEL_READERS)
        raise UsageError(f"--task multilabel needs a dataset whose records hold several labels ({kinds} with "
                         f"--target-key); '{args.dataset or 'folder'}' gives one class index per image")
    if args.num_classes is None:
        raise UsageError('--task multilabel needs --num-classes (multi-label datasets do not always name their '
                         'classes)')
    if args.kd_model_name is not None:
        raise UsageError("--kd-model-name (timm's distillation, a softmax over the classes) is not defined for "
                         "--task multilabel and is refused until defined")


def resolve_eval_metric(args: argparse.Namespace, explicit: Set[str]) -> None:
    """timm's default ``--eval-metric top1`` means the task's default metric: mAP for multi-label training."""
    if args.task == 'multilabel' and 'eval_metric' not in explicit and args.eval_metric == DEFAULT_EVAL_METRIC:
        args.eval_metric = headline_metric(MULTILABEL_TASK)


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


def ignored_tfkd_flags(args: argparse.Namespace, explicit: Set[str]) -> List[str]:
    """The ``--tfkd-*`` flags the user gave that the chosen method does not read."""
    read = {flag.dest for flag in get_method(args.tfkd_mode).flags}
    return [flag.option for flag in registered_flags() if flag.dest in explicit and flag.dest not in read]


def check_writable_folder(path: str, option: str) -> None:
    """Refuse a folder the run could not create or write: a file in its place, or a place where nothing can be
    created (no permission, a read-only or pseudo file system).

    Raises:
        UsageError: One line naming the option.
    """
    if not path:
        raise UsageError(f'{option} needs a folder, got an empty string')
    target = os.path.abspath(path)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = '' if existing == target else f" ('{existing}' is a file in its way)"
        raise UsageError(f"{option} '{path}' is not a folder{where}")
    try:  # permissions alone do not tell (root, read-only mounts, pseudo file systems): make and remove a folder
        os.rmdir(tempfile.mkdtemp(prefix='.tfkd-write-check-', dir=existing))
    except OSError as e:
        raise UsageError(f"{option} '{path}' cannot be written: {e.strerror} in '{existing}'") from None


def check_config(args: argparse.Namespace, explicit: Set[str]) -> List[str]:
    """The whole command line checked before anything is built or written.

    Returns:
        Warnings for the log, one line each (e.g. flags the chosen method ignores).

    Raises:
        UsageError: The first problem found, as one line.
    """
    resolve_eval_metric(args, explicit)
    check_supported(args)
    check_values(args)
    check_aug_splits(args)
    check_scripting(args)
    warnings = check_loss_weights(args) + check_loader_mode(args)
    check_hub_args(args)
    check_logging_args(args)
    check_writable_folder(args.output or DEFAULT_OUTPUT, '--output')
    if args.log_tensorboard is not None:
        check_writable_folder(args.log_tensorboard, '--log-tensorboard')
    if args.export_dir is not None:
        check_writable_folder(args.export_dir, '--export-dir')
        if os.path.isdir(args.export_dir) and os.listdir(args.export_dir) and not is_export(args.export_dir):
            raise UsageError(f"--export-dir '{args.export_dir}' is not empty and is not a previous timm-tfkd export; "
                             f"choose a new or empty folder")
    ignored = ignored_tfkd_flags(args, explicit)
    if ignored:
        warnings.append(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored by --tfkd-mode "
                        f"{args.tfkd_mode}, which does not read {'it' if len(ignored) == 1 else 'them'}")
    return warnings
