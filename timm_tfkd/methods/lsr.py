"""``--tfkd-mode lsr``: label smoothing, the control Tf-KD is compared with, in timm's or the reference convention."""
from timm.task import ClassificationTask

from ..losses import SMOOTHING_CONVENTIONS, LabelSmoothingLoss
from .base import SMOOTHING_EPSILON, Flag, Method

SMOOTHING_CONVENTION = Flag(
    '--tfkd-smoothing-convention', dict(
        default='timm', choices=SMOOTHING_CONVENTIONS,
        help="lsr: timm spreads epsilon/K over all classes; reference spreads epsilon/(K-1) over the wrong "
             "classes. The epsilon is timm's --smoothing. Default: timm."),
    label='Smoothing convention')


class LabelSmoothing(Method):
    """timm's ``ClassificationTask`` with :class:`~timm_tfkd.losses.LabelSmoothingLoss`; ``--smoothing`` is its
    epsilon and is applied by the loss (never folded into Mixup targets as well)."""
    name = 'lsr'
    description = "label smoothing regularization, the paper's control"
    flags = (SMOOTHING_CONVENTION,)
    smoothing = SMOOTHING_EPSILON

    def create_loss(self, args, smoothing):
        return LabelSmoothingLoss(smoothing, args.tfkd_smoothing_convention)

    def create_task(self, args, model, context):
        return ClassificationTask(model, self.create_loss(args, context.smoothing), device=context.device,
                                  dtype=context.dtype, verbose=context.verbose)
