"""The format of a training run folder, owned here: file names, the typed run record, ``summary.csv``, choosing a
checkpoint and rebuilding the trained network.

A run folder is timm's ``train.py`` layout (``args.yaml``, ``summary.csv``, ``last.pth.tar``, ``checkpoint-N.pth.tar``,
``model_best.pth.tar``, ``recovery-*.pth.tar``) plus ``run_info.json``, the record of what was trained. The trainer
writes it; export, evaluation, the study and teachers read it, all through this module.
"""
import csv
import datetime
import fcntl
import glob
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import timm
import torch.nn as nn
import yaml

from .errors import RunFolderError

PathLike = Union[str, os.PathLike]

ARGS_FILE = 'args.yaml'
SUMMARY_FILE = 'summary.csv'
RUN_INFO_FILE = 'run_info.json'
LAST_CHECKPOINT = 'last.pth.tar'
BEST_CHECKPOINT = 'model_best.pth.tar'
RECOVERY_PREFIX = 'recovery'
# Held (flock) by the process training in the folder, for the whole run; the kernel releases it when that process
# ends in any way, so a lock left by a killed run is never in the way.
LOCK_FILE = '.lock'
LOCK_PATIENCE_S = 1.0
# One line per later invocation of the run (a resume), so args.yaml keeps recording how the run began.
INVOCATIONS_FILE = 'invocations.jsonl'
# The validation metrics every run reports (summary.csv's eval_<name>; see row_metrics for a run with an EMA).
METRIC_NAMES = ('top1', 'top5', 'nll', 'ece')
# A multi-label run (--task multilabel) reports timm's multi-label metrics instead: mAP, micro / macro / sample F1
# (percent) and the BCE loss.
MULTILABEL_METRIC_NAMES = ('map', 'micro_f1', 'macro_f1', 'sample_f1', 'loss')
MULTILABEL_TASK = 'multilabel'


def metric_names(task: Optional[str]) -> Tuple[str, ...]:
    """The validation metrics a run of ``task`` (``classification`` when None) reports."""
    return MULTILABEL_METRIC_NAMES if task == MULTILABEL_TASK else METRIC_NAMES


def headline_metric(task: Optional[str]) -> str:
    """The metric that says which of two sets of weights is better: top-1, or mAP for multi-label runs."""
    return metric_names(task)[0]


def row_metrics(row: Mapping[str, Optional[float]], task: Optional[str] = None
                ) -> Tuple[Optional[Dict[str, float]], Optional[Dict[str, float]]]:
    """The validation metrics of the model and of its EMA in a ``summary.csv`` row of a run of ``task``.

    As in timm, a run that validates an EMA writes the EMA's metrics as ``eval_*`` and, here, the model's as
    ``eval_model_*``; runs of timm-tfkd 0.1 wrote the model's as ``eval_*`` and the EMA's as ``eval_ema_*``.
    """
    def metrics(prefix: str) -> Optional[Dict[str, float]]:
        found = {name: row.get(prefix + name) for name in metric_names(task)}
        return {k: v for k, v in found.items() if v is not None} or None

    if metrics('eval_model_'):
        return metrics('eval_model_'), metrics('eval_')
    return metrics('eval_'), metrics('eval_ema_')


def milestone_checkpoint(epochs_done: int) -> str:
    """The file ``--save-epochs`` keeps after ``epochs_done`` epochs."""
    return f'milestone-{epochs_done}.pth.tar'


@dataclass
class RunRecord:
    """``run_info.json``: what a run trained and how it ended.

    Attributes:
        model: timm architecture.
        num_classes: Classes of the head.
        in_chans: Input channels.
        data_config: timm data config of the student (input size, mean / std fitted to the channels, crop, ...).
        tfkd: The method's block: ``mode``, its settings, ``smoothing`` and ``teacher`` (identity or None).
        class_names: Class names in label order.
        dataset: timm dataset kind (``folder`` for an image folder).
        train_split: Split trained on.
        eval_split: Split validated on.
        epochs: Epochs of the schedule.
        seed: Random seed.
        versions: timm, timm_tfkd and torch versions.
        final_metrics: Validation metrics of the last validated epoch.
        final_ema_metrics: The same for the EMA weights, when validated.
        best_epoch: Epoch of ``model_best.pth.tar``.
        epochs_trained: Epochs completed so far.
        finished: Whether the run trained every epoch of its schedule (False while running, or when stopped).
        task: ``classification`` or ``multilabel`` (timm's ``--task``); it decides the metrics (:func:`metric_names`).
    """
    model: str
    num_classes: int
    in_chans: int
    data_config: Dict[str, Any]
    tfkd: Dict[str, Any]
    class_names: List[str] = field(default_factory=list)
    dataset: Optional[str] = None
    train_split: Optional[str] = None
    eval_split: Optional[str] = None
    epochs: Optional[int] = None
    seed: Optional[int] = None
    versions: Dict[str, str] = field(default_factory=dict)
    final_metrics: Optional[Dict[str, float]] = None
    final_ema_metrics: Optional[Dict[str, float]] = None
    best_epoch: Optional[int] = None
    epochs_trained: Optional[int] = None
    finished: Optional[bool] = None
    task: str = 'classification'

    REQUIRED = ('model', 'num_classes', 'in_chans', 'data_config', 'tfkd')

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> 'RunRecord':
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            raise RunFolderError(f"'{where}' lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def _to_number(value: Optional[str]) -> Optional[float]:
    """A summary.csv cell; empty cells (metrics not computed that epoch) become None."""
    if value is None or value.strip() == '':
        return None
    try:
        return float(value)
    except ValueError:
        return None


def write_json_atomic(path: PathLike, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp_path = f'{path}.tmp'
    with open(tmp_path, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2)
        f.write('\n')
    os.replace(tmp_path, path)


def architecture_kwargs(args: Mapping[str, Any], num_classes: int, in_chans: int) -> Dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that shape the network, exactly as ``train.py`` passes them.

    The trainer builds the student with these (plus its weight sources) and every reader rebuilds a trained network
    with them, so a checkpoint always fits the network it is loaded into.

    Args:
        args: The run's arguments (``vars(args)`` or ``args.yaml``).
        num_classes: Classes of the head.
        in_chans: Input channels.
    """
    return dict(
        in_chans=in_chans,
        num_classes=num_classes,
        drop_rate=args.get('drop', 0.0),
        drop_path_rate=args.get('drop_path'),
        drop_block_rate=args.get('drop_block'),
        global_pool=args.get('gp'),
        bn_momentum=args.get('bn_momentum'),
        bn_eps=args.get('bn_eps'),
        **(args.get('model_kwargs') or {}),
    )


class RunFolder:
    """One training run folder.

    Args:
        path: The folder (``OUTPUT/EXPERIMENT``).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f'RunFolder({str(self.path)!r})'

    def file(self, name: str) -> Path:
        return self.path / name

    # -- the record and the arguments ---------------------------------------------------------------------------

    def read_record(self) -> RunRecord:
        """``run_info.json``.

        Raises:
            RunFolderError: The folder or the file is missing, or the file is not a run record.
        """
        if not self.path.is_dir():
            raise RunFolderError(f"training run folder '{self.path}' does not exist")
        if not self.file(RUN_INFO_FILE).is_file():
            raise RunFolderError(f"'{self.path}' is not a finished training run: {RUN_INFO_FILE} is missing")
        return RunRecord.from_json(self._read_mapping(RUN_INFO_FILE, json.load, 'a run record'),
                                   str(self.file(RUN_INFO_FILE)))

    def write_record(self, record: RunRecord) -> None:
        write_json_atomic(self.file(RUN_INFO_FILE), record.to_json())

    def read_args(self) -> Dict[str, Any]:
        """The training arguments the run saved in ``args.yaml``."""
        return self._read_mapping(ARGS_FILE, yaml.safe_load, 'a mapping of training arguments')

    def _read_mapping(self, name: str, load: Callable[[Any], Any], what: str) -> Dict[str, Any]:
        """A JSON / YAML file of the run that must hold a mapping; every problem is one line."""
        path = self.file(name)
        try:
            with path.open(encoding='utf-8') as f:
                data = load(f)
        except FileNotFoundError:
            raise RunFolderError(f"'{name}' is missing in '{self.path}'") from None
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise RunFolderError(f"'{path}' is not valid {name.rsplit('.', 1)[-1].upper()}: "
                                 f"{' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise RunFolderError(f"'{path}' does not hold {what}")
        return data

    def write_args(self, text: str) -> None:
        """``args.yaml``, the settings as YAML (readable back with ``-c``)."""
        with self.file(ARGS_FILE).open('w', encoding='utf-8') as f:
            f.write(text)

    def append_invocation(self, entry: Mapping[str, Any]) -> None:
        """Record a later invocation of the run (``invocations.jsonl``, one JSON object per line)."""
        with self.file(INVOCATIONS_FILE).open('a', encoding='utf-8') as f:
            f.write(json.dumps(entry) + '\n')

    # -- who trains in it -----------------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process: create it if needed and take its lock until the block ends.

        Raises:
            RunFolderError: Another process holds it (the message says which and since when).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.file(LOCK_FILE)
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors='replace').strip() or 'another process'
                os.close(fd)
                if time.monotonic() < deadline:  # a reader's brief look (holder()) is not a run
                    time.sleep(0.05)
                    continue
                raise RunFolderError(f"run folder '{self.path}' is in use by {holder}; wait for that run to end or "
                                     f"choose another --experiment") from None
            # The holder before us removes the file on release: lock the file that is there now, not an old one.
            if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
            os.close(fd)
        started = datetime.datetime.now().isoformat(timespec='seconds')
        os.ftruncate(fd, 0)
        os.write(fd, f'process {os.getpid()} on {socket.gethostname()} (since {started})'.encode())
        try:
            yield
        finally:
            os.remove(path)
            os.close(fd)  # releases the lock

    def holder(self) -> Optional[str]:
        """Who trains in the folder now, or None when no process holds it."""
        path = self.file(LOCK_FILE)
        if not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.read(fd, 200).decode(errors='replace').strip() or 'another process'
        finally:
            os.close(fd)

    # -- summary.csv --------------------------------------------------------------------------------------------

    def read_summary(self) -> List[Dict[str, Optional[float]]]:
        """The epoch rows of ``summary.csv``, values as floats (None for empty cells), ``epoch`` as int; [] when the
        file does not exist yet."""
        path = self.file(SUMMARY_FILE)
        if not path.is_file():
            return []
        with path.open(newline='', encoding='utf-8') as f:
            rows = [{key: _to_number(value) for key, value in row.items() if key} for row in csv.DictReader(f)]
        rows = [row for row in rows if row.get('epoch') is not None]
        for row in rows:
            row['epoch'] = int(row['epoch'])
        return rows

    def drop_summary_rows_from(self, start_epoch: int) -> int:
        """Keep only the ``summary.csv`` rows of epochs before ``start_epoch`` (rewritten atomically).

        A run killed after writing an epoch's row but before saving that epoch's checkpoint trains the epoch again
        when resumed; without this the file would list it twice (or keep a half-written row).

        Returns:
            How many rows were dropped.
        """
        path = self.file(SUMMARY_FILE)
        if not path.is_file():
            return 0
        with path.open(newline='') as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [row for row in rows[1:] if row and row[0].isdigit() and int(row[0]) < start_epoch]
        if len(kept) == len(rows):
            return 0
        tmp_path = f'{path}.tmp'
        with open(tmp_path, 'w', newline='') as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp_path, path)
        return len(rows) - len(kept)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def best_checkpoint(self) -> Path:
        """``model_best.pth.tar``, else ``last.pth.tar`` (a run without validation keeps no best)."""
        for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
            if self.file(name).is_file():
                return self.file(name)
        raise RunFolderError(f"no {BEST_CHECKPOINT} or {LAST_CHECKPOINT} in training output folder '{self.path}'")

    def checkpoint(self, name: PathLike) -> Path:
        """The checkpoint file ``name`` means in this run.

        Args:
            name: ``best`` (:meth:`best_checkpoint`), ``last`` (the final epoch, never a fallback), or a file: a
                bare name such as ``checkpoint-7.pth.tar`` is looked up in the run folder when not found as given.

        Raises:
            RunFolderError: The file does not exist.
        """
        if name == 'best':
            return self.best_checkpoint()
        path = self.file(LAST_CHECKPOINT) if name == 'last' else Path(name)
        if not path.is_absolute() and not path.exists() and self.file(str(path)).exists():
            path = self.file(str(path))
        if not path.is_file():
            raise RunFolderError(f"checkpoint '{path}' does not exist")
        return path

    def resume_checkpoint(self) -> Optional[Path]:
        """The newest of ``last.pth.tar`` and ``recovery-*.pth.tar``, what ``--resume auto`` continues from."""
        if not self.path.is_dir():
            return None
        candidates = [Path(p) for p in glob.glob(str(self.path / f'{RECOVERY_PREFIX}-*.pth.tar'))]
        if self.file(LAST_CHECKPOINT).is_file():
            candidates.append(self.file(LAST_CHECKPOINT))
        return max(candidates, key=os.path.getmtime) if candidates else None

    # -- the trained network --------------------------------------------------------------------------------------

    def create_model(self, record: Optional[RunRecord] = None, args: Optional[Mapping[str, Any]] = None) -> nn.Module:
        """The run's architecture, built as the trainer built it, without weights (load a checkpoint into it).

        Raises:
            RunFolderError: The architecture cannot be built here (e.g. a model this timm does not know).
        """
        record = record or self.read_record()
        args = self.read_args() if args is None else args
        try:
            return timm.create_model(record.model, **architecture_kwargs(args, record.num_classes, record.in_chans))
        except (RuntimeError, ValueError, TypeError) as e:
            raise RunFolderError(f"cannot rebuild {record.model} (num_classes={record.num_classes}, "
                                 f"in_chans={record.in_chans}): {' '.join(str(e).split())}") from None
