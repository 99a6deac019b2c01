"""The ``--tfkd-teacher-*`` flags and the frozen teacher they describe, for every method that learns from one."""
import argparse
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.utils import unwrap_model

from ..data_config import resolve_student_data_config
from ..dtypes import DTYPES
from ..errors import TeacherError
from ..naflex import layout_name, reads_naflex_problem
from ..teacher import SelfTeacher, create_self_teacher
from .base import Flag

TEACHER_MODEL = Flag(
    '--tfkd-teacher-model', dict(
        default=None, metavar='NAME',
        help='Teacher architecture (self: defaults to --model; kd: required unless the checkpoint names it).'),
    key=None)
TEACHER_CHECKPOINT = Flag(
    '--tfkd-teacher-checkpoint', dict(
        default=None, metavar='PATH',
        help="Teacher weights: a timm training checkpoint, .safetensors or .pth file, a training output folder, "
             "'hf-hub:org/name', 'local-dir:/path', or 'pretrained' / 'pretrained:TAG' for timm's weights."),
    key=None)
TEACHER_CHANNELS_LAST = Flag(
    '--tfkd-teacher-channels-last', dict(action='store_true', help='Run the teacher in channels_last memory format.'),
    key=None)
TEACHER_FUSE_BN = Flag(
    '--tfkd-teacher-fuse-bn', dict(
        action='store_true', help="Fold the teacher's batch norms into the preceding convolutions (same logits, less "
                                  "work)."),
    key=None)
TEACHER_DTYPE = Flag(
    '--tfkd-teacher-dtype', dict(
        default='float32', choices=tuple(DTYPES),
        help='Precision of the teacher forward (lower precision changes logits slightly). Default: float32.'),
    key=None)
TEACHER_COMPILE = Flag(
    '--tfkd-teacher-compile', dict(action='store_true', help='torch.compile the teacher forward.'), key=None)

TEACHER_FLAGS = (TEACHER_MODEL, TEACHER_CHECKPOINT, TEACHER_CHANNELS_LAST, TEACHER_FUSE_BN, TEACHER_DTYPE,
                 TEACHER_COMPILE)


def create_teacher_from_args(
        args: argparse.Namespace,
        model: nn.Module,
        data_config: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        default_model: Optional[str] = None,
) -> SelfTeacher:
    """Build the frozen teacher the ``--tfkd-teacher-*`` flags describe, with its speed-ups applied.

    Args:
        args: Parsed arguments with the teacher flags.
        model: The student: the teacher must match its classes and input channels, and is fed its input.
        data_config: The student's resolved data config (default: resolved from ``args`` and ``model``).
        device: Where the teacher runs.
        default_model: Teacher architecture when ``--tfkd-teacher-model`` is not given and the checkpoint does not
            name one (Tf-KD-self: the student's).

    Raises:
        TeacherError: No checkpoint given, or the teacher cannot be built or does not fit the student.
    """
    if not args.tfkd_teacher_checkpoint:
        raise TeacherError(f'--tfkd-mode {args.tfkd_mode} needs --tfkd-teacher-checkpoint (the trained teacher '
                           f'weights) or a ready teacher')
    student = unwrap_model(model)
    config = data_config or resolve_student_data_config(vars(args), student)
    teacher = create_self_teacher(
        args.tfkd_teacher_checkpoint,
        args.tfkd_teacher_model or default_model,
        num_classes=student.num_classes,
        in_chans=student.in_chans,
        student_mean=config['mean'],
        student_std=config['std'],
        device=device,
    )
    if getattr(args, 'naflex_loader', False):
        _check_reads_student_patches(args, teacher, student, device)
    for size in getattr(args, 'train_img_sizes', None) or ():
        _check_takes_image_size(args, teacher, student.in_chans, size, device)
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


def _check_reads_student_patches(args: argparse.Namespace, teacher: SelfTeacher, student: nn.Module,
                                 device: Optional[torch.device]) -> None:
    """With timm's NaFlex loader the teacher is fed the student's patches (made at the student's patch size, in the
    loader's layout) and re-normalizes their values in that layout: it must be a NaFlex model that reads them.

    Raises:
        TeacherError: It is not, or it reads another patch size or layout.
    """
    channels_last = not args.naflex_patchify_channels_first
    teacher.patch_channels_last = channels_last
    sizes = [(size, size) for size in args.naflex_patch_sizes] if args.naflex_patch_sizes else \
        [tuple(student.get_patch_size())]
    problem = reads_naflex_problem(teacher.model, sizes, student.in_chans, channels_last,
                                   unflattened=bool(args.naflex_patch_sizes), device=device)
    if problem:
        raise TeacherError(f"teacher '{teacher.identity.get('model')}' cannot learn beside the student on "
                           f"--naflex-loader batches ({layout_name(channels_last)} patches): {problem}")


def _check_takes_image_size(args: argparse.Namespace, teacher: SelfTeacher, channels: int, size: int,
                            device: Optional[torch.device]) -> None:
    """With --train-img-sizes the teacher sees each batch at the student's size of that batch: it must take them all.

    Raises:
        TeacherError: Its forward fails at ``size``.
    """
    try:
        teacher(torch.zeros(1, channels, size, size, device=device))
    except Exception as e:  # any failure of the forward: the teacher cannot take this size
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TeacherError(f"teacher '{teacher.identity.get('model')}' cannot take the {size}x{size} images of "
                           f"--train-img-sizes ({detail})") from None
