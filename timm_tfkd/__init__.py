"""Teacher-free Knowledge Distillation (Tf-KD) for timm."""
from .version import __version__
from .args import add_tfkd_args
from .losses import (
    LabelSmoothingLoss, LossTerms, SelfDistillLoss, SmoothingEquivalence, VirtualTeacherLoss, create_tfkd_loss,
    effective_smoothing,
)
