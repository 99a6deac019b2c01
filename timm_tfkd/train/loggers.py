"""Per-epoch metric loggers of the trainer: Weights & Biases (timm's ``--log-wandb``) and TensorBoard
(``--log-tensorboard DIR``).

Each logger receives the row ``summary.csv`` gets for an epoch (``epoch``, ``train_*``, ``eval_*``, ``eval_model_*``,
``lr``). :func:`check_logging_args` runs before anything is written, so a user who asked for logging never loses it
to a missing package or a bad folder after hours of training; :func:`create_epoch_loggers` starts the loggers once the
run folder exists (rank 0 only, as timm).
"""
import argparse
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Protocol, Sequence

from ..errors import UsageError

_logger = logging.getLogger(__name__)

LOGGING_EXTRA = "pip install 'timm-tfkd[logging]'"


class EpochLogger(Protocol):
    """What the training loop calls on a logger."""

    def log_epoch(self, epoch: int, row: Dict[str, float]) -> None:
        """Record one epoch's ``summary.csv`` row."""

    def close(self, failed: bool = False) -> None:
        """Write out everything and release the logger; ``failed`` tells that the run did not finish."""


def add_logging_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Register the trainer's own "Logging" group (timm's ``--log-wandb`` flags stay in timm's group).

    Returns:
        The argument group.
    """
    group = parser.add_argument_group('Logging')
    group.add_argument(
        '--log-tensorboard', default=None, type=str, metavar='DIR',
        help="Write each epoch's summary.csv row as TensorBoard scalars (step = epoch) to event files in DIR "
             "(rank 0). Needs the tensorboard package.")
    return group


def epoch_row(epoch: int, train_metrics: Dict[str, float], eval_metrics: Dict[str, float],
              lr: Optional[float]) -> Dict[str, float]:
    """The row ``timm.utils.update_summary`` writes to ``summary.csv`` for these metrics, in its column order."""
    row = OrderedDict(epoch=epoch)
    row.update((f'train_{k}', v) for k, v in train_metrics.items())
    row.update((f'eval_{k}', v) for k, v in eval_metrics.items())
    if lr is not None:
        row['lr'] = lr
    return row


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise UsageError(f'--log-wandb needs the wandb package, which is not installed here (pip install wandb, '
                         f'or {LOGGING_EXTRA})') from None
    return wandb


def _check_wandb_settings(wandb, args: argparse.Namespace) -> None:
    """The project, tags and run id as W&B itself validates them (``wandb.init`` would refuse them only after the
    run folder is written)."""
    try:
        wandb.Settings(project=args.wandb_project, run_tags=tuple(args.wandb_tags),
                       run_id=args.wandb_resume_id or None)
    except (wandb.errors.Error, ValueError) as e:
        # pydantic's ValidationError (a ValueError) spans several lines; its messages alone are the point.
        messages = [error['msg'].removeprefix('Value error, ') for error in e.errors()] if hasattr(e, 'errors') \
            else [str(e)]
        raise UsageError(f"--log-wandb: {' '.join('; '.join(messages).split())}") from None


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(f'--log-tensorboard needs the tensorboard package, which is not installed here '
                         f'(pip install tensorboard, or {LOGGING_EXTRA})') from None
    return SummaryWriter


def check_logging_args(args: argparse.Namespace) -> None:
    """Refuse logging flags that cannot work, before anything is built or written (on every rank).

    timm only warns and trains on when wandb is missing; here the run does not start, so that logs asked for are
    never silently lost.

    Raises:
        UsageError: One line naming the flag.
    """
    if args.log_wandb:
        if args.wandb_resume_id and not args.resume:
            raise UsageError('--wandb-resume-id needs --resume (the checkpoint the W&B run continues from)')
        _check_wandb_settings(_import_wandb(), args)
    if args.log_tensorboard is not None:
        _summary_writer_class()


class WandbLogger:
    """A W&B run started as timm's ``train.py`` starts it; each epoch's row is one ``wandb.log`` call (W&B's own
    step counter, as timm; the row holds ``epoch``).

    Args:
        args: The run's arguments, logged as the run config.
        run_name: The run folder's name.
    """

    def __init__(self, args: argparse.Namespace, run_name: str):
        wandb = _import_wandb()
        try:
            self.run = wandb.init(
                project=args.wandb_project,
                name=run_name,
                config=args,
                tags=args.wandb_tags,
                resume='must' if args.wandb_resume_id else None,
                id=args.wandb_resume_id or None,
            )
        except wandb.errors.Error as e:
            raise UsageError(f"--log-wandb: W&B could not start the run: {' '.join(str(e).split())}") from None

    def log_epoch(self, epoch: int, row: Dict[str, float]) -> None:
        self.run.log(dict(row))

    def close(self, failed: bool = False) -> None:
        # The trainer catches its own errors, so W&B's exit hook would mark a failed run as finished.
        self.run.finish(exit_code=1 if failed else 0)


class TensorBoardLogger:
    """Every value of the row but ``epoch`` as a scalar named like its ``summary.csv`` column, at step ``epoch``.

    Args:
        log_dir: Folder of the event files (created if missing).
    """

    def __init__(self, log_dir: str):
        self.writer = _summary_writer_class()(log_dir=log_dir)

    def log_epoch(self, epoch: int, row: Dict[str, float]) -> None:
        for name, value in row.items():
            if name != 'epoch':
                self.writer.add_scalar(name, value, global_step=epoch)
        # Flushed every epoch so that a run killed later keeps what it logged.
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class EpochLoggers:
    """The run's loggers as one: ``log_epoch`` goes to each, and leaving the ``with`` block closes each (also when
    the run fails).

    Args:
        loggers: The loggers; none on ranks other than 0.
    """

    def __init__(self, loggers: Sequence[EpochLogger] = ()):
        self.loggers = list(loggers)

    def log_epoch(self, epoch: int, row: Dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_epoch(epoch, row)

    def close(self, failed: bool = False) -> None:
        for logger in self.loggers:
            logger.close(failed=failed)

    def __enter__(self) -> 'EpochLoggers':
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(failed=exc_type is not None)


def create_epoch_loggers(args: argparse.Namespace, run_name: str) -> EpochLoggers:
    """Start the loggers the arguments ask for (call on rank 0, once the run folder exists).

    Args:
        args: Arguments checked by :func:`check_logging_args`.
        run_name: The run folder's name (the W&B run name).

    Raises:
        UsageError: W&B refused to start the run (e.g. not logged in, or an unknown ``--wandb-resume-id``).
    """
    loggers: List[EpochLogger] = []
    # W&B first: it is the one that can still refuse, and then nothing else has been started.
    if args.log_wandb:
        loggers.append(WandbLogger(args, run_name))
    if args.log_tensorboard is not None:
        loggers.append(TensorBoardLogger(args.log_tensorboard))
        _logger.info(f'TensorBoard scalars in {args.log_tensorboard}')
    return EpochLoggers(loggers)
