"""Teacher-free Knowledge Distillation (Tf-KD) for timm.

Importing the package registers its timm models (``cifar_resnet18``, ...); ``create_tfkd_task`` builds a timm
``TrainingTask`` for any Tf-KD mode from arguments registered by ``add_tfkd_args``.
"""
from .version import __version__
from .args import TFKD_MODES, add_tfkd_args
from .checkpoint_io import CheckpointError
from .losses import (
    LabelSmoothingLoss, LossTerms, SelfDistillLoss, SmoothingEquivalence, VirtualTeacherLoss, create_tfkd_loss,
    effective_smoothing,
)
from .teacher import SelfTeacher, TeacherError, create_self_teacher, fold_batch_norms
from .tasks import TfKDRegTask, TfKDSelfTask, create_teacher_from_args, create_tfkd_task
from .hub import load_pretrained
from . import models

__all__ = [
    '__version__', 'TFKD_MODES', 'add_tfkd_args', 'CheckpointError',
    'LabelSmoothingLoss', 'LossTerms', 'SelfDistillLoss', 'SmoothingEquivalence', 'VirtualTeacherLoss',
    'create_tfkd_loss', 'effective_smoothing',
    'SelfTeacher', 'TeacherError', 'create_self_teacher', 'fold_batch_norms',
    'TfKDRegTask', 'TfKDSelfTask', 'create_teacher_from_args', 'create_tfkd_task',
    'load_pretrained', 'models',
]
