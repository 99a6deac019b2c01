"""Teacher-free Knowledge Distillation (Tf-KD) for timm.

Importing the package registers its timm models (``cifar_resnet18``, ...); ``create_tfkd_task`` builds a timm
``TrainingTask`` for any Tf-KD mode from arguments registered by ``add_tfkd_args``.
"""
from .version import __version__
from .errors import CheckpointError, TeacherError, TfKDError
from .losses import LabelSmoothingLoss, LossTerms, SelfDistillLoss, SmoothingEquivalence, VirtualTeacherLoss, \
    effective_smoothing
from .teacher import SelfTeacher, create_self_teacher, fold_batch_norms
from .tasks import EpochHooks, EpochOrdered, SampleIndexed, TfKDRegTask, TfKDSelfTask
from .methods import get_method, register_method
from .methods.teacher_source import create_teacher_from_args
from .args import TFKD_MODES, add_tfkd_args
from .factory import create_tfkd_loss, create_tfkd_task
from .hub import load_pretrained
from . import models

__all__ = [
    '__version__', 'TFKD_MODES', 'add_tfkd_args', 'CheckpointError', 'TfKDError',
    'LabelSmoothingLoss', 'LossTerms', 'SelfDistillLoss', 'SmoothingEquivalence', 'VirtualTeacherLoss',
    'create_tfkd_loss', 'effective_smoothing',
    'SelfTeacher', 'TeacherError', 'create_self_teacher', 'fold_batch_norms',
    'TfKDRegTask', 'TfKDSelfTask', 'EpochHooks', 'EpochOrdered', 'SampleIndexed', 'create_teacher_from_args',
    'create_tfkd_task',
    'get_method', 'register_method',
    'load_pretrained', 'models',
]
