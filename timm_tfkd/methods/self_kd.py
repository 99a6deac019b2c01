"""``--tfkd-mode self`` and ``kd``: a student taught by a frozen teacher through logit distillation.

Tf-KD-self's teacher is a trained copy of the student's own architecture (``--tfkd-teacher-model`` defaults to
``--model``); ``kd`` takes any teacher, for normal, reversed (Re-KD) and defective (De-KD) distillation.
"""
from ..losses import SelfDistillLoss
from ..tasks import TfKDSelfTask
from .base import Method
from .shared_flags import ALPHA, FORMULA, MULTIPLIER, TEMPERATURE
from .teacher_source import TEACHER_FLAGS, create_teacher_from_args


class TeacherDistillation(Method):
    """:class:`~timm_tfkd.tasks.TfKDSelfTask` with :class:`~timm_tfkd.losses.SelfDistillLoss` and the teacher of the
    ``--tfkd-teacher-*`` flags; on AugMix splits the teacher sees the clean split only, whose KL term it gives, and
    the cross-entropy is taken over all splits."""
    flags = (FORMULA, ALPHA, TEMPERATURE, MULTIPLIER) + TEACHER_FLAGS
    needs_teacher = True
    # The teacher architecture when neither --tfkd-teacher-model nor the checkpoint names it.
    teacher_is_student_architecture = False

    def check(self, args, num_classes=None):
        super().check(args, num_classes)
        if not args.tfkd_teacher_checkpoint:
            raise ValueError(f'--tfkd-mode {self.name} needs --tfkd-teacher-checkpoint (the trained teacher weights)')

    def create_loss(self, args, smoothing, class_weight=None):
        return SelfDistillLoss(args.tfkd_alpha, args.tfkd_temperature, args.tfkd_formula, args.tfkd_multiplier,
                               class_weight=class_weight)

    def create_task(self, args, model, context):
        teacher = context.teacher
        if teacher is None:
            default_model = getattr(args, 'model', None) if self.teacher_is_student_architecture else None
            teacher = create_teacher_from_args(args, model, context.data_config, device=context.device,
                                               default_model=default_model)
        return TfKDSelfTask(model, teacher, self.create_loss(args, context.smoothing, context.class_weight),
                            device=context.device, dtype=context.dtype, verbose=context.verbose,
                            num_splits=context.num_aug_splits)

    def describe(self, args):
        teacher = args.tfkd_teacher_model or (getattr(args, 'model', None) if self.teacher_is_student_architecture
                                              else None)
        return f"{super().describe(args)}, teacher={teacher or 'from checkpoint'}:{args.tfkd_teacher_checkpoint}"


class SelfDistillation(TeacherDistillation):
    name = 'self'
    description = 'Tf-KD-self, distillation from a trained copy of the same architecture'
    teacher_is_student_architecture = True


class KnowledgeDistillation(TeacherDistillation):
    name = 'kd'
    description = 'knowledge distillation from a separately trained teacher (normal, reversed or defective KD)'
