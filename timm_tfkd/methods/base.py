"""What a teacher-free method declares: its flags, its loss and task, what it records, how it treats smoothing.

A method is one module of :mod:`timm_tfkd.methods` with a :class:`Method` subclass and one registration line in
the package's ``__init__``. Everything else (the command line, the trainer's checks, the run record, the model
card) asks the registry, so no other module needs to know a method's name.
"""
import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.task import TrainingTask

from ..loss_settings import check_choice
from ..teacher import SelfTeacher

# How a method treats timm's --smoothing (default 0.1 in timm):
SMOOTHING_TIMM = 'timm'  # as timm does: on the criterion, and folded into Mixup / CutMix targets
SMOOTHING_EPSILON = 'epsilon'  # it is the method's own epsilon (label smoothing itself)
SMOOTHING_EXPLICIT = 'explicit'  # the method regularizes already: 0 unless given explicitly, then only via Mixup

# How a method trains on timm's AugMix splits (--aug-splits N: each batch holds N views of B images, the B clean
# views first, the targets repeated N times):
AUG_SPLITS_ALL = 'all'  # its loss over all N x B views, as timm's criterion
AUG_SPLITS_CLEAN_KD = 'clean-kd'  # its cross-entropy part over all N x B views, its KD term over the B clean ones


@dataclass(frozen=True)
class Flag:
    """One ``--tfkd-*`` flag: its argparse declaration, the check of its value and how records name it.

    A flag shared by several methods is one ``Flag`` object that each of them lists; it is registered once.

    Attributes:
        option: The option string, e.g. ``--tfkd-alpha``.
        kwargs: Keyword arguments of ``add_argument`` (type, default, choices, metavar, help, action).
        check: ``check(option, value)`` raises ``ValueError`` with a one-line message when the value cannot work
            (a flag with ``choices`` is checked against them without one).
        key: Name of the setting in ``run_info.json`` (default: the destination without ``tfkd_``); None when the
            flag is not a setting of the trained model (e.g. a teacher speed-up).
        public_key: Name in an export's ``tfkd.json`` (default: ``key``).
        label: Row label in the model card (default: ``key``).
    """
    option: str
    kwargs: Mapping[str, Any]
    check: Optional[Callable[[str, Any], Any]] = None
    key: Optional[str] = field(default='')
    public_key: str = ''
    label: str = ''

    def __post_init__(self):
        if self.key == '':
            object.__setattr__(self, 'key', self.dest[len('tfkd_'):] if self.dest.startswith('tfkd_') else self.dest)
        if not self.public_key:
            object.__setattr__(self, 'public_key', self.key or '')
        if not self.label:
            object.__setattr__(self, 'label', self.key or self.option)

    @property
    def dest(self) -> str:
        """The argparse destination, e.g. ``tfkd_alpha``."""
        return self.option.lstrip('-').replace('-', '_')

    @property
    def default(self) -> Any:
        return self.kwargs.get('default', False if self.kwargs.get('action') == 'store_true' else None)

    def validate(self, value: Any) -> None:
        """Raise ``ValueError`` (naming the option) when ``value`` cannot work."""
        if 'choices' in self.kwargs:
            check_choice(self.option, value, tuple(self.kwargs['choices']))
        if self.check is not None:
            self.check(self.option, value)


@dataclass
class TaskContext:
    """What the training script built around the student, handed to :meth:`Method.create_task`.

    Attributes:
        criterion: The criterion timm's ``train.py`` built (used by methods with ``uses_timm_criterion``).
        smoothing: Label smoothing of the cross-entropy part, after the smoothing policy.
        data_config: The student's resolved data config, channels fitted (the teacher's normalization needs it).
        teacher: A ready teacher for methods with ``needs_teacher`` (built from the flags when None).
        num_train_samples: Size of the training set, for methods that keep per-sample state (None: unknown).
        train_targets: The class index of every training sample (N,) for methods with ``needs_train_targets``;
            None for the others.
        num_aug_splits: AugMix splits of each batch (``--aug-splits``; 0: none).
        device: Device of the task (and teacher).
        dtype: Dtype of task tensors.
        verbose: Log the set-up.
        class_weight: Per-class weights (K,) of the cross-entropy part of the method's loss (``--class-stats`` /
            ``--loss-class-weight``), or None; the KD term is never weighted.
        pos_weight: Weights of positive targets, for a multi-label BCE loss (``--loss-pos-weight``), or None.
    """
    criterion: Optional[nn.Module] = None
    smoothing: float = 0.0
    data_config: Optional[Dict[str, Any]] = None
    teacher: Optional[SelfTeacher] = None
    num_train_samples: Optional[int] = None
    train_targets: Optional[torch.Tensor] = None
    num_aug_splits: int = 0
    device: Optional[torch.device] = None
    dtype: Optional[torch.dtype] = None
    verbose: bool = True
    class_weight: Optional[torch.Tensor] = None
    pos_weight: Optional[Union[float, torch.Tensor]] = None


class Method:
    """A teacher-free method. Subclasses set the class attributes and implement :meth:`create_task`.

    Attributes:
        name: The ``--tfkd-mode`` value.
        description: One line for ``--help``, the logs and the model card.
        flags: The ``--tfkd-*`` flags this method reads (shared ones included); the others are ignored with a
            warning when given.
        needs_teacher: It learns from a frozen teacher given by ``--tfkd-teacher-checkpoint``.
        needs_train_targets: It reads the class of every training sample (``TaskContext.train_targets``, e.g. to
            draw same-class pairs); datasets that do not list them are refused for it.
        uses_timm_criterion: Plain timm training: the criterion timm's ``train.py`` built (so ``--bce-loss``,
            ``--loss`` and timm's ``--kd-*`` distillation apply); every other method brings its own loss.
        smoothing: How timm's ``--smoothing`` is treated: :data:`SMOOTHING_TIMM`, :data:`SMOOTHING_EPSILON` or
            :data:`SMOOTHING_EXPLICIT`.
        aug_splits: How it trains on AugMix splits: :data:`AUG_SPLITS_ALL` or :data:`AUG_SPLITS_CLEAN_KD`.
        jsd_loss: ``--jsd-loss`` (timm's ``JsdCrossEntropy``, cross-entropy on the clean split plus the
            Jensen-Shannon consistency of the splits) can be its loss; refused otherwise, since it would replace the
            method's loss rather than add to it.
        supports_multilabel: It defines a loss for ``--task multilabel`` (independent binary labels); the others are
            refused with it until they define one.
    """
    name: str = ''
    description: str = ''
    flags: Tuple[Flag, ...] = ()
    needs_teacher: bool = False
    needs_train_targets: bool = False
    uses_timm_criterion: bool = False
    smoothing: str = SMOOTHING_EXPLICIT
    aug_splits: str = AUG_SPLITS_CLEAN_KD
    jsd_loss: bool = False
    supports_multilabel: bool = False

    def check(self, args: argparse.Namespace, num_classes: Optional[int] = None) -> None:
        """Refuse settings that cannot work, before anything is built.

        Args:
            args: Parsed arguments.
            num_classes: The student's classes, once known (some bounds depend on them).

        Raises:
            ValueError: One line naming the flag.
        """
        if getattr(args, 'task', 'classification') == 'multilabel' and not self.supports_multilabel:
            raise ValueError(f'--task multilabel is not defined for --tfkd-mode {self.name} (its distillation term is '
                             f'a softmax over the classes) and is refused until defined; use --tfkd-mode none or lsr')
        for flag in self.flags:
            flag.validate(getattr(args, flag.dest))
        if getattr(args, 'jsd_loss', False) and not self.jsd_loss:
            raise ValueError(f"--jsd-loss (timm's cross-entropy + Jensen-Shannon loss) would replace the loss of "
                             f"--tfkd-mode {self.name}, not add to it; use it with --tfkd-mode none or lsr")

    def create_loss(self, args: argparse.Namespace, smoothing: float,
                    class_weight: Optional[torch.Tensor] = None) -> Optional[nn.Module]:
        """The method's single-label criterion from parsed arguments (None when it uses the criterion timm built).

        Args:
            args: Parsed arguments with the "Tf-KD parameters" group.
            smoothing: Label smoothing after the smoothing policy (the epsilon of label smoothing itself).
            class_weight: Per-class weights (K,) of the cross-entropy part, or None.
        """
        return None

    def create_task(self, args: argparse.Namespace, model: nn.Module, context: 'TaskContext') -> TrainingTask:
        """The timm training task of this method for ``model``.

        Args:
            args: Parsed arguments with the "Tf-KD parameters" group.
            model: The student.
            context: What the caller built around the student.
        """
        raise NotImplementedError

    def record(self, args: argparse.Namespace) -> Dict[str, Any]:
        """The method's settings as ``run_info.json`` records them (``key`` -> value of each recorded flag)."""
        return {flag.key: getattr(args, flag.dest) for flag in self.flags if flag.key}

    def card_rows(self, settings: Mapping[str, Any]) -> List[Tuple[str, Any]]:
        """Model card rows (label, value) of the method's settings, from an export's ``tfkd.json`` block."""
        return [(flag.label, settings[flag.public_key]) for flag in self.flags
                if flag.key and flag.public_key in settings]

    def describe(self, args: argparse.Namespace) -> str:
        """One log line naming the method and the settings it reads."""
        settings = ', '.join(f'{key}={value:g}' if isinstance(value, float) else f'{key}={value}'
                             for key, value in self.record(args).items())
        return f'Tf-KD: {self.name} ({self.description})' + (f': {settings}' if settings else '')
