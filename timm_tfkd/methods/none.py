"""``--tfkd-mode none``: plain timm training, with the criterion timm's ``train.py`` built."""
from timm.task import ClassificationTask, MultiLabelClassificationTask

from .base import AUG_SPLITS_ALL, SMOOTHING_TIMM, Method


class PlainTimm(Method):
    """timm's own ``ClassificationTask`` (``MultiLabelClassificationTask`` with ``--task multilabel``) and criterion:
    ``--smoothing``, ``--bce-loss``, ``--loss``, the loss weights and timm's ``--kd-*`` distillation apply exactly as
    in timm, and so do AugMix splits and ``--jsd-loss``."""
    name = 'none'
    description = 'plain timm training, no distillation term'
    uses_timm_criterion = True
    smoothing = SMOOTHING_TIMM
    aug_splits = AUG_SPLITS_ALL
    jsd_loss = True
    supports_multilabel = True

    def create_task(self, args, model, context):
        if getattr(args, 'task', 'classification') == 'multilabel':
            return MultiLabelClassificationTask(model, context.criterion, threshold=args.multilabel_threshold,
                                                device=context.device, dtype=context.dtype, verbose=context.verbose)
        return ClassificationTask(model, context.criterion, device=context.device, dtype=context.dtype,
                                  verbose=context.verbose)

    def describe(self, args):
        return 'Tf-KD: off (plain timm training)'
