"""``--tfkd-mode lsr``: label smoothing, the control Tf-KD is compared with, in timm's or the reference convention.

With ``--task multilabel`` it is timm's multi-label label smoothing: BCE against each binary label moved towards 0.5
by epsilon, ``t * (1 - eps) + eps / 2``, applied by the loss (never folded into Mixup targets as well).
"""
from timm.loss import JsdCrossEntropy, create_classification_loss
from timm.task import ClassificationTask, MultiLabelClassificationTask

from ..loss_settings import SMOOTHING_CONVENTIONS
from ..losses import LabelSmoothingLoss
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
    supports_multilabel = True

    def check(self, args, num_classes=None):
        super().check(args, num_classes)
        if getattr(args, 'jsd_loss', False) and args.tfkd_smoothing_convention != 'timm':
            raise ValueError("--jsd-loss smooths its cross-entropy in timm's convention only; drop "
                             "--tfkd-smoothing-convention reference or --jsd-loss")
        if getattr(args, 'task', 'classification') == 'multilabel' and args.tfkd_smoothing_convention != 'timm':
            raise ValueError(f'--tfkd-smoothing-convention {args.tfkd_smoothing_convention} is not defined for '
                             f"--task multilabel (binary labels are smoothed towards 0.5, timm's convention) and is "
                             f'refused until defined')

    def create_loss(self, args, smoothing, class_weight=None):
        if getattr(args, 'jsd_loss', False):  # the policy refuses class weights with it
            return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=smoothing)
        return LabelSmoothingLoss(smoothing, args.tfkd_smoothing_convention, class_weight=class_weight)

    def create_task(self, args, model, context):
        if getattr(args, 'task', 'classification') == 'multilabel':
            criterion = create_classification_loss(
                loss_type='bce', multi_label=True, smoothing=context.smoothing, soft_targets=False,
                class_weight=context.class_weight, pos_weight=context.pos_weight,
                bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum)
            return MultiLabelClassificationTask(model, criterion, threshold=args.multilabel_threshold,
                                                device=context.device, dtype=context.dtype, verbose=context.verbose)
        return ClassificationTask(model, self.create_loss(args, context.smoothing, context.class_weight),
                                  device=context.device, dtype=context.dtype, verbose=context.verbose)
