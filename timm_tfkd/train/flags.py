"""The mirror of timm's ``train.py`` command line: every flag with timm's option strings, destinations, defaults,
types and groups (so any timm training command or ``args.yaml`` works unchanged), then the Tf-KD, Hub and Logging
groups.

Declarations only: reading ``-c`` YAML files and parsing live in :mod:`.config`, the checks in :mod:`.policy`.
"""
import argparse
import ast
from typing import Optional, Sequence

from timm.loss import LOSS_TYPES

from ..args import add_tfkd_args
from .loggers import add_logging_args
from .publish import add_hub_args

# Flags that timm 1.0.31 added after the train.py snapshot in tests/data/timm_train_args.json.
TIMM_1_0_31_FLAGS = (
    '--stop-epoch',
    '--save-epochs',
    '--lr-decay-fn',
    '--lr-stable-timescale',
    '--task',
    '--loss',
    '--loss-pos-weight',
    '--loss-class-weight',
    '--loss-weight-power',
    '--loss-weight-beta',
    '--loss-weight-max',
    '--class-stats',
    '--poly-gamma',
    '--poly-epsilon',
    '--target-format',
    '--multilabel-threshold',
    '--pretrained-cfg-overlay',
)


class _OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2, without argparse's usage block (over a
    hundred lines for this parser; ``--help`` still prints it)."""

    def error(self, message: str) -> None:
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


class ParseKwargs(argparse.Action):
    """Collect ``key=value`` words into a dict, reading each value as a Python literal when it is one."""

    def __call__(
            self,
            parser: argparse.ArgumentParser,
            namespace: argparse.Namespace,
            values: Sequence[str],
            option_string: Optional[str] = None,
    ) -> None:
        kwargs = {}
        for item in values:
            key, sep, raw = item.partition('=')
            if not sep or not key:
                raise argparse.ArgumentError(self, f"expected key=value, got '{item}'")
            try:
                kwargs[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                # Bare words such as `act_layer=gelu` are meant as strings.
                kwargs[key] = raw
        setattr(namespace, self.dest, kwargs)


def create_parser() -> argparse.ArgumentParser:
    """Build the trainer's parser: timm 1.0.31's ``train.py`` flags followed by the Tf-KD, Hub and Logging groups.

    Returns:
        A parser without ``-c/--config``; :func:`~timm_tfkd.train.config.parse_args` reads the config file first.
    """
    parser = _OneLineErrorParser(
        description='Train a timm model with Teacher-free Knowledge Distillation. Accepts every flag of timm\'s '
                    'train.py. Defaults can also come from a YAML file given first with -c/--config FILE, whose '
                    'keys are option destinations (e.g. batch_size); the command line overrides them.')
    _add_distillation_args(parser)
    _add_dataset_args(parser)
    _add_model_args(parser)
    _add_device_args(parser)
    _add_optimizer_args(parser)
    _add_schedule_args(parser)
    _add_augmentation_args(parser)
    _add_loss_args(parser)
    _add_batch_norm_args(parser)
    _add_ema_args(parser)
    _add_misc_args(parser)
    add_tfkd_args(parser)
    add_hub_args(parser)
    add_logging_args(parser)
    return parser


def _add_distillation_args(parser: argparse.ArgumentParser) -> None:
    """timm's own teacher distillation flags, which timm registers on the parser itself rather than in a group."""
    parser.add_argument(
        '--kd-model-name', default=None, type=str, metavar='NAME',
        help="Teacher for timm's built-in distillation; refused together with a Tf-KD mode.")
    parser.add_argument(
        '--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'],
        help="What timm's distillation matches between teacher and student.")
    parser.add_argument(
        '--kd-loss-type', default='kl', type=str, metavar='NAME',
        help="Loss of timm's logit distillation.")
    parser.add_argument(
        '--distill-loss-weight', default=None, type=float, metavar='W',
        help="Weight of timm's distillation loss.")
    parser.add_argument(
        '--task-loss-weight', default=None, type=float, metavar='W',
        help="Weight of the label loss under timm's distillation.")
    parser.add_argument(
        '--kd-temperature', default=4.0, type=float, metavar='T',
        help="Softmax temperature of timm's logit distillation.")
    parser.add_argument(
        '--kd-student-feature-dim', default=None, type=int, metavar='N',
        help="Student feature width for timm's feature distillation (default: inferred).")
    parser.add_argument(
        '--kd-teacher-feature-dim', default=None, type=int, metavar='N',
        help="Teacher feature width for timm's feature distillation (default: inferred).")
    parser.add_argument(
        '--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'],
        help="Soft or hard targets for timm's distillation-token training.")


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    # Positional, so it cannot live in the group; timm keeps it only for old command lines.
    parser.add_argument(
        'data', nargs='?', metavar='DIR', const=None,
        help='Deprecated spelling of --data-dir.')
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument(
        '--data-dir', metavar='DIR',
        help='Dataset root folder.')
    group.add_argument(
        '--dataset', metavar='NAME', default='',
        help="Dataset kind and name, e.g. 'torch/cifar10' or 'hfds/org/name' (empty: image folder).")
    group.add_argument(
        '--train-split', metavar='NAME', default='train',
        help='Split to train on.')
    group.add_argument(
        '--val-split', metavar='NAME', default='validation',
        help='Split to validate on.')
    group.add_argument(
        '--train-num-samples', default=None, type=int, metavar='N',
        help='Train set size, needed by iterable datasets.')
    group.add_argument(
        '--val-num-samples', default=None, type=int, metavar='N',
        help='Validation set size, needed by iterable datasets.')
    group.add_argument(
        '--dataset-download', action='store_true', default=False,
        help='Let datasets that can download themselves do so.')
    group.add_argument(
        '--class-map', default='', type=str, metavar='FILE',
        help='File mapping class names to indices.')
    group.add_argument(
        '--input-img-mode', default=None, type=str, metavar='MODE',
        help="PIL mode the images are converted to, e.g. 'RGB' or 'L'.")
    group.add_argument(
        '--input-key', default=None, type=str, metavar='KEY',
        help='Record field holding the image, for dict-like datasets.')
    group.add_argument(
        '--target-key', default=None, type=str, metavar='KEY',
        help='Record field(s) holding the label, for dict-like datasets.')
    group.add_argument(
        '--dataset-trust-remote-code', action='store_true', default=False,
        help='Allow Hugging Face datasets to run code shipped with the dataset.')
    group.add_argument(
        '--task', default='classification', type=str, choices=['classification', 'multilabel'],
        help='Single-label or multi-label classification (multilabel: --tfkd-mode none or lsr).')
    group.add_argument(
        '--target-format', default=None, type=str, metavar='FORMAT',
        help="How multi-label targets are stored: 'indices' (lists of class indices, default) or 'multihot' "
             "(one value per class).")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model parameters')
    group.add_argument(
        '--model', default='resnet50', type=str, metavar='MODEL',
        help='Student architecture, any timm model name.')
    group.add_argument(
        '--pretrained', action='store_true', default=False,
        help="Start the student from timm's pretrained weights.")
    group.add_argument(
        '--pretrained-path', default=None, type=str, metavar='PATH',
        help='Load the pretrained weights from this file instead of the Hub.')
    group.add_argument(
        '--pretrained-cfg-overlay', default={}, nargs='*', action=ParseKwargs, metavar='KEY=VALUE',
        help='Override fields of the pretrained config, e.g. file=/path/weights.safetensors.')
    group.add_argument(
        '--initial-checkpoint', default='', type=str, metavar='PATH',
        help='Initialise the student from this checkpoint (weights only).')
    group.add_argument(
        '--resume', default='', type=str, metavar='PATH',
        help="Resume model and optimizer from this checkpoint; 'auto' picks the newest checkpoint in the "
             "output folder.")
    group.add_argument(
        '--no-resume-opt', action='store_true', default=False,
        help='When resuming, leave the optimizer state behind.')
    group.add_argument(
        '--num-classes', default=None, type=int, metavar='N',
        help='Number of classes (default: the model\'s).')
    group.add_argument(
        '--gp', default=None, type=str, metavar='POOL',
        help="Global pooling, e.g. 'avg', 'max', 'avgmax' (default: the model's).")
    group.add_argument(
        '--img-size', default=None, type=int, metavar='N',
        help='Square input side (default: the model\'s).')
    group.add_argument(
        '--in-chans', default=None, type=int, metavar='N',
        help='Input channels (default: 3).')
    group.add_argument(
        '--input-size', default=None, nargs=3, type=int, metavar='N',
        help='Full input shape C H W, e.g. 3 224 224 (default: the model\'s).')
    group.add_argument(
        '--crop-pct', default=None, type=float, metavar='PCT',
        help='Centre crop fraction for validation.')
    group.add_argument(
        '--mean', default=None, nargs='+', type=float, metavar='MEAN',
        help='Per-channel normalisation mean (default: the model\'s).')
    group.add_argument(
        '--std', default=None, nargs='+', type=float, metavar='STD',
        help='Per-channel normalisation std (default: the model\'s).')
    group.add_argument(
        '--interpolation', default='', type=str, metavar='NAME',
        help='Resize interpolation for validation (default: the model\'s).')
    group.add_argument(
        '-b', '--batch-size', default=128, type=int, metavar='N',
        help='Training batch size per process.')
    group.add_argument(
        '-vb', '--validation-batch-size', default=None, type=int, metavar='N',
        help='Validation batch size (default: the training one).')
    group.add_argument(
        '--channels-last', action='store_true', default=False,
        help='Run the student in channels_last memory format.')
    group.add_argument(
        '--fuser', default='', type=str, metavar='NAME',
        help="TorchScript fuser: 'te' or 'old' / 'legacy' (timm's set_jit_fuser).")
    group.add_argument(
        '--grad-accum-steps', default=1, type=int, metavar='N',
        help='Batches whose gradients are summed before each optimizer step.')
    group.add_argument(
        '--grad-checkpointing', action='store_true', default=False,
        help='Trade compute for memory by recomputing activations in the backward pass.')
    group.add_argument(
        '--fast-norm', action='store_true', default=False,
        help="Use timm's faster, lower-precision normalisation layers.")
    group.add_argument(
        '--model-kwargs', default={}, nargs='*', action=ParseKwargs, metavar='KEY=VALUE',
        help='Extra keyword arguments for create_model, e.g. drop_rate=0.1 act_layer=gelu.')
    group.add_argument(
        '--head-init-scale', default=None, type=float, metavar='SCALE',
        help='Multiply the freshly initialised classifier weights by this.')
    group.add_argument(
        '--head-init-bias', default=None, type=float, metavar='BIAS',
        help='Fill the freshly initialised classifier bias with this.')
    group.add_argument(
        '--torchcompile-mode', default=None, type=str, metavar='MODE',
        help="torch.compile mode, e.g. 'max-autotune'.")
    # timm refuses --torchscript together with --torchcompile.
    scripting = group.add_mutually_exclusive_group()
    scripting.add_argument(
        '--torchscript', action='store_true', default=False,
        help='Script the student with TorchScript (torch.jit.script).')
    scripting.add_argument(
        '--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
        help="torch.compile the student with this backend ('inductor' when given without one).")


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Device parameters')
    group.add_argument(
        '--device', default='cuda', type=str, metavar='DEVICE',
        help="Device to train on, e.g. 'cuda', 'cpu', 'mps'.")
    group.add_argument(
        '--amp', action='store_true', default=False,
        help='Train under automatic mixed precision.')
    group.add_argument(
        '--amp-dtype', default='float16', type=str, metavar='DTYPE',
        help="Lower precision used by --amp: 'float16' or 'bfloat16'.")
    group.add_argument(
        '--model-dtype', default=None, type=str, metavar='DTYPE',
        help='Store the model in this dtype (default: float32).')
    group.add_argument(
        '--no-ddp-bb', action='store_true', default=False,
        help="Turn off DistributedDataParallel's buffer broadcast.")
    group.add_argument(
        '--synchronize-step', action='store_true', default=False,
        help='Synchronise the device after every step (more accurate timings).')
    group.add_argument(
        '--local_rank', default=0, type=int,
        help='Process rank on this node, set by old distributed launchers.')
    group.add_argument(
        '--device-modules', default=None, nargs='+', type=str, metavar='MODULE',
        help='Python modules to import first so that extra device types register themselves.')


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument(
        '--opt', default='sgd', type=str, metavar='OPTIMIZER',
        help="Optimizer name from timm.optim, e.g. 'sgd', 'adamw', 'lamb'.")
    group.add_argument(
        '--opt-eps', default=None, type=float, metavar='EPS',
        help="Optimizer epsilon (default: the optimizer's).")
    group.add_argument(
        '--opt-betas', default=None, nargs='+', type=float, metavar='BETA',
        help="Optimizer betas (default: the optimizer's).")
    group.add_argument(
        '--momentum', default=0.9, type=float, metavar='M',
        help='Momentum of SGD-like optimizers.')
    group.add_argument(
        '--weight-decay', default=2e-5, type=float, metavar='WD',
        help='Weight decay.')
    group.add_argument(
        '--clip-grad', default=None, type=float, metavar='NORM',
        help='Gradient clipping threshold (default: no clipping).')
    group.add_argument(
        '--clip-mode', default='norm', type=str, metavar='MODE',
        help="How gradients are clipped: 'norm', 'value' or 'agc'.")
    group.add_argument(
        '--layer-decay', default=None, type=float, metavar='RATE',
        help='Layer-wise learning rate decay factor.')
    group.add_argument(
        '--layer-decay-min-scale', default=0, type=float, metavar='SCALE',
        help='Smallest learning rate scale layer decay may reach.')
    group.add_argument(
        '--layer-decay-no-opt-scale', default=None, type=float, metavar='SCALE',
        help='Freeze layers whose layer-decay scale falls below this.')
    group.add_argument(
        '--opt-kwargs', default={}, nargs='*', action=ParseKwargs, metavar='KEY=VALUE',
        help='Extra keyword arguments for the optimizer, e.g. caution=True.')


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument(
        '--sched', default='cosine', type=str, metavar='SCHEDULER',
        help="Learning rate schedule, e.g. 'cosine', 'step', 'multistep', 'plateau', 'poly', 'wsd'.")
    group.add_argument(
        '--sched-on-updates', action='store_true', default=False,
        help='Step the schedule on every optimizer update instead of every epoch.')
    group.add_argument(
        '--lr', default=None, type=float, metavar='LR',
        help='Learning rate (default: --lr-base scaled to the global batch size).')
    group.add_argument(
        '--lr-base', default=0.1, type=float, metavar='LR',
        help='Learning rate at --lr-base-size, used when --lr is not given.')
    group.add_argument(
        '--lr-base-size', default=256, type=int, metavar='N',
        help='Global batch size at which --lr-base applies.')
    group.add_argument(
        '--lr-base-scale', default='', type=str, metavar='SCALE',
        help="How --lr-base follows the batch size: 'linear' or 'sqrt' (default: by optimizer).")
    group.add_argument(
        '--lr-noise', default=None, nargs='+', type=float, metavar='PCT',
        help='Epoch fractions between which the learning rate gets noise.')
    group.add_argument(
        '--lr-noise-pct', default=0.67, type=float, metavar='PCT',
        help='Bound on the relative learning rate noise.')
    group.add_argument(
        '--lr-noise-std', default=1.0, type=float, metavar='STD',
        help='Standard deviation of the learning rate noise.')
    group.add_argument(
        '--lr-cycle-mul', default=1.0, type=float, metavar='MULT',
        help='Growth of each restart cycle length.')
    group.add_argument(
        '--lr-cycle-decay', default=0.5, type=float, metavar='MULT',
        help='Peak learning rate factor from one cycle to the next.')
    group.add_argument(
        '--lr-cycle-limit', default=1, type=int, metavar='N',
        help='Number of restart cycles.')
    group.add_argument(
        '--lr-k-decay', default=1.0, type=float, metavar='K',
        help='k-decay exponent of the cosine and poly schedules.')
    group.add_argument(
        '--lr-decay-fn', default=None, type=str, metavar='NAME',
        help="Shape of the final decay of the 'wsd' schedule (default: the scheduler's).")
    group.add_argument(
        '--lr-stable-timescale', default=None, type=float, metavar='T',
        help="Time scale of the stable phase of the 'wsd' schedule (default: the scheduler's).")
    group.add_argument(
        '--warmup-lr', default=1e-5, type=float, metavar='LR',
        help='Learning rate at the start of warmup.')
    group.add_argument(
        '--min-lr', default=0, type=float, metavar='LR',
        help='Floor of the decaying schedules.')
    group.add_argument(
        '--epochs', default=300, type=int, metavar='N',
        help='Length of the schedule in epochs.')
    group.add_argument(
        '--stop-epoch', default=None, type=int, metavar='N',
        help='Stop training at this epoch while keeping the schedule of --epochs.')
    group.add_argument(
        '--epoch-repeats', default=0., type=float, metavar='N',
        help='Passes over the dataset per epoch.')
    group.add_argument(
        '--start-epoch', default=None, type=int, metavar='N',
        help='Epoch to start counting from (default: 0, or the resumed one).')
    group.add_argument(
        '--decay-milestones', default=[90, 180, 270], nargs='+', type=int, metavar='EPOCH',
        help="Epochs at which 'multistep' decays the learning rate.")
    group.add_argument(
        '--decay-epochs', default=90, type=float, metavar='N',
        help="Epochs between decays of the 'step' schedule.")
    group.add_argument(
        '--warmup-epochs', default=5, type=int, metavar='N',
        help='Epochs of learning rate warmup.')
    group.add_argument(
        '--warmup-prefix', action='store_true', default=False,
        help='Run warmup before the schedule rather than inside it.')
    group.add_argument(
        '--cooldown-epochs', default=0, type=int, metavar='N',
        help='Epochs at the minimum learning rate after the schedule ends.')
    group.add_argument(
        '--patience-epochs', default=10, type=int, metavar='N',
        help="Epochs without improvement before 'plateau' decays.")
    group.add_argument(
        '--decay-rate', '--dr', default=0.1, type=float, metavar='RATE',
        help='Factor applied at each learning rate decay.')


def _add_augmentation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument(
        '--no-aug', action='store_true', default=False,
        help='Train without augmentation, whatever the other flags say.')
    group.add_argument(
        '--train-crop-mode', default=None, type=str, metavar='MODE',
        help='Random crop flavour for training.')
    group.add_argument(
        '--scale', default=[0.08, 1.0], nargs='+', type=float, metavar='PCT',
        help='Area range of random resized crops.')
    group.add_argument(
        '--ratio', default=[3. / 4., 4. / 3.], nargs='+', type=float, metavar='RATIO',
        help='Aspect ratio range of random resized crops.')
    group.add_argument(
        '--hflip', default=0.5, type=float, metavar='PROB',
        help='Horizontal flip probability.')
    group.add_argument(
        '--vflip', default=0., type=float, metavar='PROB',
        help='Vertical flip probability.')
    group.add_argument(
        '--color-jitter', default=0.4, type=float, metavar='PCT',
        help='Colour jitter strength.')
    group.add_argument(
        '--color-jitter-prob', default=None, type=float, metavar='PROB',
        help='Probability of colour jitter (default: always).')
    group.add_argument(
        '--grayscale-prob', default=None, type=float, metavar='PROB',
        help='Probability of converting to greyscale.')
    group.add_argument(
        '--gaussian-blur-prob', default=None, type=float, metavar='PROB',
        help='Probability of Gaussian blur.')
    group.add_argument(
        '--aa', default=None, type=str, metavar='POLICY',
        help="Automatic augmentation policy, e.g. 'rand-m9-mstd0.5' or 'trivial'.")
    group.add_argument(
        '--aug-repeats', default=0, type=float, metavar='N',
        help='Repeated augmentation count (distributed training only).')
    group.add_argument(
        '--aug-splits', default=0, type=int, metavar='N',
        help='AugMix splits: each image as its clean view and N - 1 augmented ones, N = 0 (off) or >= 2.')
    group.add_argument(
        '--jsd-loss', action='store_true', default=False,
        help="timm's Jensen-Shannon + cross-entropy loss over the AugMix splits (--tfkd-mode none, lsr).")
    group.add_argument(
        '--bce-loss', action='store_true', default=False,
        help='Use binary cross-entropy instead of cross-entropy.')
    group.add_argument(
        '--bce-sum', action='store_true', default=False,
        help='Sum the binary cross-entropy over classes instead of averaging.')
    group.add_argument(
        '--bce-target-thresh', default=None, type=float, metavar='THRESH',
        help='Binarise soft BCE targets at this threshold.')
    group.add_argument(
        '--bce-pos-weight', default=None, type=float, metavar='W',
        help='Weight of positive targets in the BCE loss.')
    group.add_argument(
        '--reprob', default=0., type=float, metavar='PROB',
        help='Random erasing probability.')
    group.add_argument(
        '--remode', default='pixel', type=str, metavar='MODE',
        help="What random erasing fills with: 'const', 'rand' or 'pixel'.")
    group.add_argument(
        '--recount', default=1, type=int, metavar='N',
        help='Rectangles erased per image.')
    group.add_argument(
        '--resplit', action='store_true', default=False,
        help='Spare the first AugMix split from random erasing.')
    group.add_argument(
        '--mixup', default=0.0, type=float, metavar='ALPHA',
        help='Mixup alpha; mixup is on when above 0.')
    group.add_argument(
        '--cutmix', default=0.0, type=float, metavar='ALPHA',
        help='CutMix alpha; CutMix is on when above 0.')
    group.add_argument(
        '--cutmix-minmax', default=None, nargs='+', type=float, metavar='RATIO',
        help='CutMix box size range; replaces --cutmix alpha when given.')
    group.add_argument(
        '--mixup-prob', default=1.0, type=float, metavar='PROB',
        help='Probability of mixing a batch when mixup or CutMix is on.')
    group.add_argument(
        '--mixup-switch-prob', default=0.5, type=float, metavar='PROB',
        help='Probability of CutMix rather than mixup when both are on.')
    group.add_argument(
        '--mixup-mode', default='batch', type=str, metavar='MODE',
        help="Granularity of mixing: 'batch', 'pair' or 'elem'.")
    group.add_argument(
        '--mixup-off-epoch', default=0, type=int, metavar='N',
        help='Epoch at which mixing stops (0: never).')
    group.add_argument(
        '--smoothing', default=0.1, type=float, metavar='EPS',
        help='Label smoothing. Tf-KD modes reg/self/kd use 0 unless this flag is given explicitly; '
             'lsr uses it as its epsilon.')
    group.add_argument(
        '--train-interpolation', default='random', type=str, metavar='NAME',
        help='Resize interpolation for training.')
    group.add_argument(
        '--drop', default=0.0, type=float, metavar='PCT',
        help='Dropout before the classifier.')
    group.add_argument(
        '--drop-connect', default=None, type=float, metavar='PCT',
        help='Old name of --drop-path.')
    group.add_argument(
        '--drop-path', default=None, type=float, metavar='PCT',
        help='Stochastic depth rate.')
    group.add_argument(
        '--drop-block', default=None, type=float, metavar='PCT',
        help='DropBlock rate.')


def _add_loss_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Loss parameters')
    group.add_argument(
        '--loss', default=None, type=str, choices=LOSS_TYPES,
        help='Task loss (default: chosen from --task and the mixing and BCE flags).')
    group.add_argument(
        '--loss-pos-weight', default=None, type=str, metavar='W',
        help="Weights of positive targets (BCE, multi-label ASL): a number, a comma separated list, a file, or "
             "'neg_pos' (from --class-stats).")
    group.add_argument(
        '--loss-class-weight', default=None, type=str, metavar='W',
        help="Per-class loss weights: a number, a comma separated list, a file, or 'inv_freq' / 'effective_num' "
             "(from --class-stats). Tf-KD modes weight their cross-entropy part with them.")
    group.add_argument(
        '--loss-weight-power', default=None, type=float, metavar='P',
        help="Exponent of the 'neg_pos' and 'inv_freq' weights, >= 0 (default: 1).")
    group.add_argument(
        '--loss-weight-beta', default=0.999, type=float, metavar='BETA',
        help="Beta of the 'effective_num' weights, in (0, 1).")
    group.add_argument(
        '--loss-weight-max', default=None, type=float, metavar='W',
        help='Cap on weights computed from --class-stats.')
    group.add_argument(
        '--class-stats', default=None, type=str, metavar='FILE',
        help="JSON of per-class positive counts and the sample count (timm's class_weights.py) for the weight "
             "methods and the 'db' loss.")
    group.add_argument(
        '--poly-gamma', default=0.0, type=float, metavar='GAMMA',
        help="Focal exponent of the 'poly' loss.")
    group.add_argument(
        '--poly-epsilon', default=2.0, type=float, metavar='EPS',
        help="Weight of the polynomial term of the 'poly' loss.")


def _add_batch_norm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Batch norm parameters')
    group.add_argument(
        '--bn-momentum', default=None, type=float, metavar='M',
        help='Batch norm momentum override.')
    group.add_argument(
        '--bn-eps', default=None, type=float, metavar='EPS',
        help='Batch norm epsilon override.')
    group.add_argument(
        '--sync-bn', action='store_true', default=False,
        help='Synchronise batch norm statistics across processes.')
    group.add_argument(
        '--dist-bn', default='reduce', type=str, metavar='MODE',
        help="How batch norm buffers are shared after each epoch: 'broadcast', 'reduce' or ''.")
    group.add_argument(
        '--split-bn', action='store_true', default=False,
        help='A separate batch norm per AugMix split (two halves with --resplit alone).')


def _add_ema_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument(
        '--model-ema', action='store_true', default=False,
        help='Keep an exponential moving average of the student weights.')
    group.add_argument(
        '--model-ema-force-cpu', action='store_true', default=False,
        help='Keep the average on the CPU and validate it there.')
    group.add_argument(
        '--model-ema-decay', default=0.9998, type=float, metavar='DECAY',
        help='Decay of the weight average.')
    group.add_argument(
        '--model-ema-warmup', action='store_true', default=False,
        help='Ramp the decay up over the first steps.')


def _add_misc_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument(
        '--seed', default=42, type=int, metavar='S',
        help='Random seed.')
    group.add_argument(
        '--worker-seeding', default='all', type=str, metavar='MODE',
        help='How data loader workers are seeded.')
    group.add_argument(
        '--log-interval', default=50, type=int, metavar='N',
        help='Batches between training log lines.')
    group.add_argument(
        '--val-interval', default=1, type=int, metavar='N',
        help='Epochs between validations.')
    group.add_argument(
        '--recovery-interval', default=0, type=int, metavar='N',
        help='Batches between recovery checkpoints (0: none).')
    group.add_argument(
        '--checkpoint-hist', default=10, type=int, metavar='N',
        help='Best checkpoints kept.')
    group.add_argument(
        '--save-epochs', default=None, nargs='+', type=int, metavar='EPOCH',
        help='Epochs whose checkpoint is also kept as a milestone.')
    group.add_argument(
        '-j', '--workers', default=4, type=int, metavar='N',
        help='Data loader processes.')
    group.add_argument(
        '--save-images', action='store_true', default=False,
        help='Write the training batch of each logged step as an image into the run folder.')
    group.add_argument(
        '--pin-mem', action='store_true', default=False,
        help='Pin host memory in the data loader.')
    group.add_argument(
        '--no-prefetcher', action='store_true', default=False,
        help="Turn off timm's device-side prefetcher and normalisation.")
    group.add_argument(
        '--output', default='', type=str, metavar='DIR',
        help='Parent folder of the run folder (default: ./output/train).')
    group.add_argument(
        '--experiment', default='', type=str, metavar='NAME',
        help='Run folder name (default: date, model and image size).')
    group.add_argument(
        '--eval-metric', default='top1', type=str, metavar='METRIC',
        help='Validation metric that selects the best checkpoint.')
    group.add_argument(
        '--multilabel-threshold', default=0.5, type=float, metavar='THRESH',
        help='Decision threshold of the multi-label F1 metrics.')
    group.add_argument(
        '--tta', default=0, type=int, metavar='N',
        help='Average the predictions of each N consecutive validation images (N augmented copies of one).')
    group.add_argument(
        '--use-multi-epochs-loader', action='store_true', default=False,
        help='Keep loader workers alive across epochs.')
    group.add_argument(
        '--log-wandb', action='store_true', default=False,
        help="Log each epoch's summary.csv row to Weights & Biases (rank 0). Needs the wandb package.")
    group.add_argument(
        '--wandb-project', default=None, type=str, metavar='NAME',
        help='Weights & Biases project.')
    group.add_argument(
        '--wandb-tags', default=[], nargs='+', type=str, metavar='TAG',
        help='Weights & Biases tags.')
    group.add_argument(
        '--wandb-resume-id', default='', type=str, metavar='ID',
        help='Weights & Biases run to resume (needs --resume).')
    group.add_argument(
        '--train-img-sizes', default=None, nargs='+', type=int, metavar='N',
        help='Square image sizes for scheduled-resolution training: each batch has one of them.')
    group.add_argument(
        '--train-batch-sizes', default=None, nargs='+', type=int, metavar='N',
        help='Batch size for each of --train-img-sizes (default: --batch-size for every size).')
    group.add_argument(
        '--train-size-probs', default=None, nargs='+', type=float, metavar='PROB',
        help='Sampling weight of each of --train-img-sizes (default: uniform).')
    group.add_argument(
        '--train-size-schedule', default='constant', type=str, choices=['constant', 'progressive'],
        help='How variable-resolution sampling evolves over training.')
    group.add_argument(
        '--train-size-schedule-spread', default=0.65, type=float, metavar='SPREAD',
        help='Spread of the progressive size schedule.')
    group.add_argument(
        '--train-size-random-mix', default=0.1, type=float, metavar='PROB',
        help='Share of uniformly drawn sizes in the progressive size schedule.')
    group.add_argument(
        '--train-batches-per-epoch', '--train-steps-per-epoch', default=None, type=int, metavar='N',
        help='Fixed number of training batches per epoch.')
    group.add_argument(
        '--variable-batch-loss-scale', default='none', type=str, choices=['none', 'sqrt', 'linear'],
        help='Scale each --train-img-sizes batch loss by its batch size over the schedule average (linear), its '
             'square root, or not.')
    group.add_argument(
        '--naflex-loader', action='store_true', default=False,
        help="timm's NaFlex loader: batches of patch sequences at native aspect ratio (needs a NaFlex model, e.g. "
             "naflexvit_*).")
    group.add_argument(
        '--naflex-train-seq-lens', default=[128, 256, 576, 784, 1024], nargs='+', type=int, metavar='N',
        help='Patch sequence lengths of the NaFlex loader.')
    group.add_argument(
        '--naflex-max-seq-len', default=576, type=int, metavar='N',
        help='Patch sequence length of the NaFlex validation loader.')
    group.add_argument(
        '--naflex-patch-sizes', default=None, nargs='+', type=int, metavar='N',
        help='Patch sizes the NaFlex loader draws from.')
    group.add_argument(
        '--naflex-patch-size-probs', default=None, nargs='+', type=float, metavar='PROB',
        help='Probability of each of --naflex-patch-sizes.')
    group.add_argument(
        '--naflex-loss-scale', default='linear', type=str, choices=['none', 'sqrt', 'linear'],
        help='Scale each NaFlex batch loss by its batch size over --batch-size (linear), its square root, or '
             'not.')
    group.add_argument(
        '--naflex-patchify-channels-first', action='store_true', default=False,
        help='NaFlex patches in C-P-P order (channel slowest) instead of P-P-C; the model must read the same.')
