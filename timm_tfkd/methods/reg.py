"""``--tfkd-mode reg``: Tf-KD-reg, the student regularized by a hand-designed virtual teacher (no extra forward).

The virtual teacher puts probability ``a`` (``--tfkd-correct-prob``) on the true class and spreads the rest evenly;
:class:`~timm_tfkd.losses.VirtualTeacherLoss` computes it in the paper's or the reference code's formula.
"""
from timm.utils import unwrap_model

from ..loss_settings import DEFAULT_CORRECT_PROB, check_correct_prob
from ..losses import VirtualTeacherLoss
from ..tasks import TfKDRegTask
from .base import Flag, Method
from .shared_flags import ALPHA, FORMULA, MULTIPLIER, TEMPERATURE

CORRECT_PROB = Flag(
    '--tfkd-correct-prob', dict(
        type=float, default=DEFAULT_CORRECT_PROB, metavar='A',
        help=f'reg: probability the virtual teacher puts on the true class, in (1/K, 1]. Default: {DEFAULT_CORRECT_PROB}.'),
    check=check_correct_prob, public_key='a', label='a (virtual teacher probability of the true class)')


class VirtualTeacher(Method):
    """:class:`~timm_tfkd.tasks.TfKDRegTask` with :class:`~timm_tfkd.losses.VirtualTeacherLoss`; on AugMix splits the
    KL term is taken over the clean split, the cross-entropy over all of them."""
    name = 'reg'
    description = 'Tf-KD-reg, distillation from a manually designed virtual teacher'
    flags = (FORMULA, ALPHA, TEMPERATURE, MULTIPLIER, CORRECT_PROB)

    def check(self, args, num_classes=None):
        super().check(args, num_classes)
        check_correct_prob(CORRECT_PROB.option, args.tfkd_correct_prob, num_classes)

    def create_loss(self, args, smoothing, class_weight=None):
        return VirtualTeacherLoss(args.tfkd_alpha, args.tfkd_temperature, args.tfkd_correct_prob, args.tfkd_formula,
                                  args.tfkd_multiplier, class_weight=class_weight)

    def create_task(self, args, model, context):
        loss = self.create_loss(args, context.smoothing, context.class_weight)
        loss.softened_teacher(unwrap_model(model).num_classes)  # checks correct_prob > 1/K before training starts
        return TfKDRegTask(model, loss, device=context.device, dtype=context.dtype, verbose=context.verbose,
                           num_splits=context.num_aug_splits)
