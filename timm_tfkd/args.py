"""The Tf-KD command line group, for any timm-style argparse parser."""
import argparse
from typing import Optional

TFKD_MODES = ('none', 'lsr', 'reg', 'self', 'kd')
FORMULAS = ('paper', 'official')
SMOOTHING_CONVENTIONS = ('timm', 'reference')
TEACHER_DTYPES = ('float32', 'bfloat16', 'float16')


def add_tfkd_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Register the "Tf-KD parameters" group on a parser.

    Every destination starts with ``tfkd_``, so the group never collides with timm's own flags.

    Args:
        parser: A parser, e.g. a copy of timm's ``train.py`` parser.

    Returns:
        The argument group, for callers that want to add to it.
    """
    group = parser.add_argument_group('Tf-KD parameters')
    group.add_argument(
        '--tfkd-mode', default='none', choices=TFKD_MODES,
        help='none: plain timm training; lsr: label smoothing control; reg: virtual teacher (Tf-KD-reg); '
             'self: frozen copy of the student architecture as teacher (Tf-KD-self); kd: any frozen teacher '
             '(normal, reversed or defective KD). Default: none.')
    group.add_argument(
        '--tfkd-alpha', type=float, default=0.1, metavar='ALPHA',
        help='Weight of the distillation term: (1 - alpha) * CE + alpha * KD, in [0, 1]. Default: 0.1.')
    group.add_argument(
        '--tfkd-temperature', type=float, default=20.0, metavar='TAU',
        help='Softmax temperature of the distillation term, > 0. Default: 20.')
    group.add_argument(
        '--tfkd-correct-prob', type=float, default=0.99, metavar='A',
        help='reg: probability the virtual teacher puts on the true class, in (1/K, 1]. Default: 0.99.')
    group.add_argument(
        '--tfkd-formula', default='paper', choices=FORMULAS,
        help="paper: the equations of the paper (batch-mean KL, tau^2); official: exactly what the reference "
             "code computes (KL mean over batch x classes, reg without student temperature). Default: paper.")
    group.add_argument(
        '--tfkd-multiplier', type=float, default=1.0, metavar='M',
        help="Extra factor on the distillation term (the reference code's 'multiplier'), > 0. Default: 1.")
    group.add_argument(
        '--tfkd-smoothing-convention', default='timm', choices=SMOOTHING_CONVENTIONS,
        help="lsr: timm spreads epsilon/K over all classes; reference spreads epsilon/(K-1) over the wrong "
             "classes. The epsilon is timm's --smoothing. Default: timm.")
    group.add_argument(
        '--tfkd-teacher-model', default=None, metavar='NAME',
        help='Teacher architecture (self: defaults to --model; kd: required unless the checkpoint names it).')
    group.add_argument(
        '--tfkd-teacher-checkpoint', default=None, metavar='PATH',
        help="Teacher weights: a timm training checkpoint, .safetensors or .pth file, a training output folder, "
             "'hf-hub:org/name', 'local-dir:/path', or 'pretrained' / 'pretrained:TAG' for timm's weights.")
    group.add_argument(
        '--tfkd-teacher-channels-last', action='store_true',
        help='Run the teacher in channels_last memory format.')
    group.add_argument(
        '--tfkd-teacher-fuse-bn', action='store_true',
        help="Fold the teacher's batch norms into the preceding convolutions (same logits, less work).")
    group.add_argument(
        '--tfkd-teacher-dtype', default='float32', choices=TEACHER_DTYPES,
        help='Precision of the teacher forward (lower precision changes logits slightly). Default: float32.')
    group.add_argument(
        '--tfkd-teacher-compile', action='store_true',
        help='torch.compile the teacher forward.')
    return group


def tfkd_args_summary(args: argparse.Namespace) -> str:
    """One line naming the Tf-KD settings that matter for the chosen mode, for logs."""
    mode = args.tfkd_mode
    if mode == 'none':
        return 'Tf-KD: off (plain timm training)'
    if mode == 'lsr':
        return f'Tf-KD: lsr (label smoothing control, convention={args.tfkd_smoothing_convention})'
    parts = [f'mode={mode}', f'formula={args.tfkd_formula}', f'alpha={args.tfkd_alpha:g}',
             f'temperature={args.tfkd_temperature:g}', f'multiplier={args.tfkd_multiplier:g}']
    if mode == 'reg':
        parts.append(f'correct_prob={args.tfkd_correct_prob:g}')
    else:
        parts.append(f'teacher={teacher_model_name(args) or "?"}:{args.tfkd_teacher_checkpoint}')
    return 'Tf-KD: ' + ', '.join(parts)


def teacher_model_name(args: argparse.Namespace) -> Optional[str]:
    """The teacher architecture: the explicit flag, else the student's for Tf-KD-self."""
    if args.tfkd_teacher_model:
        return args.tfkd_teacher_model
    if args.tfkd_mode == 'self':
        return getattr(args, 'model', None)
    return None
