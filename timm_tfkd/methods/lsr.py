"""``--tfkd-mode lsr``: label smoothing, the control Tf-KD is compared with, in timm's or the reference convention."""
from timm.loss import JsdCrossEntropy
from timm.task import ClassificationTask

from ..losses import SMOOTHING_CONVENTIONS, LabelSmoothingLoss
from .base import AUG_SPLITS_ALL, SMOOTHING_EPSILON, Flag, Method

SMOOTHING_CONVENTION = Flag(
    '--tfkd-smoothing-convention', dict(
        default='timm', choices=SMOOTHING_CONVENTIONS,
        help="lsr: timm spreads epsilon/K over all classes; reference spreads epsilon/(K-1) over the wrong "
             "classes. The epsilon is timm's --smoothing. Default: timm."),
    label='Smoothing convention')


class LabelSmoothing(Method):
    """timm's ``ClassificationTask`` with :class:`~timm_tfkd.losses.LabelSmoothingLoss`; ``--smoothing`` is its
    epsilon and is applied by the loss (never folded into Mixup targets as well). With ``--jsd-loss`` the loss is
    timm's ``JsdCrossEntropy`` with that epsilon on its clean-split cross-entropy (timm's convention)."""
    name = 'lsr'
    description = "label smoothing regularization, the paper's control"
    flags = (SMOOTHING_CONVENTION,)
    smoothing = SMOOTHING_EPSILON
    aug_splits = AUG_SPLITS_ALL
    jsd_loss = True

    def check(self, args, num_classes=None):
        super().check(args, num_classes)
        if getattr(args, 'jsd_loss', False) and args.tfkd_smoothing_convention != 'timm':
            raise ValueError("--jsd-loss smooths its cross-entropy in timm's convention only; drop "
                             "--tfkd-smoothing-convention reference or --jsd-loss")

    def create_loss(self, args, smoothing):
        if getattr(args, 'jsd_loss', False):
            return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=smoothing)
        return LabelSmoothingLoss(smoothing, args.tfkd_smoothing_convention)

    def create_task(self, args, model, context):
        return ClassificationTask(model, self.create_loss(args, context.smoothing), device=context.device,
                                  dtype=context.dtype, verbose=context.verbose)
