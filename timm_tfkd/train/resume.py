"""Where a run writes and what it continues: the one place that decides whether and what a run resumes.

- A fresh run gets its own folder, never an earlier run's (timm would write into an existing ``--experiment``).
- ``--resume auto`` continues the run of ``--experiment``, or without one the newest earlier run of the same model
  whose settings match; ``--resume PATH`` continues from a checkpoint (in its own folder when that is the one named).
- A run continued in its folder must have been trained with the same settings, except those in
  :data:`MAY_CHANGE_ON_RESUME`; its ``args.yaml`` keeps saying how it began and the new invocation is appended.
"""
import argparse
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml
from timm.models import safe_model_name

from ..errors import UsageError
from ..run_folder import ARGS_FILE, RunFolder
from .checkpoint import ResumePoint, load_resume_point
from .policy import DEFAULT_OUTPUT

_logger = logging.getLogger(__name__)

# Settings a resumed run may change: how long it trains, where and how it runs, what it logs and publishes. Every
# other setting (data, model, classes, optimizer, schedule, augmentation, method) must be what the run began with.
MAY_CHANGE_ON_RESUME = frozenset({
    'epochs', 'stop_epoch', 'resume', 'no_resume_opt', 'output', 'experiment', 'data',
    'workers', 'pin_mem', 'use_multi_epochs_loader', 'device', 'device_modules', 'local_rank', 'synchronize_step',
    'log_interval', 'val_interval', 'validation_batch_size', 'recovery_interval', 'checkpoint_hist', 'save_epochs',
    'torchcompile', 'torchcompile_mode', 'tfkd_teacher_channels_last', 'tfkd_teacher_fuse_bn',
    'tfkd_teacher_compile', 'push_to_hub', 'hub_model_id', 'hub_private', 'hub_revision', 'export_dir',
    'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id', 'log_tensorboard',
})


@dataclass
class RunPlan:
    """Where a run writes and what it continues, decided before anything is written.

    Attributes:
        folder: The run folder; for a fresh run the name it starts from (a free name is taken when it is made).
        resume: The checkpoint training continues from, read and verified.
        resumes_in_place: ``resume`` belongs to ``folder``: the run continues there.
        changes: Settings that differ from the run's ``args.yaml`` (only those a resume may change).
    """
    folder: RunFolder
    resume: Optional[ResumePoint]
    resumes_in_place: bool
    changes: Dict[str, Tuple[Any, Any]]

    def claim(self) -> RunFolder:
        """Make the folder of a fresh run under a name no other run has (``NAME``, else ``NAME-1``, ...)."""
        if self.resumes_in_place:
            return self.folder
        base = str(self.folder.path)
        self.folder.path.parent.mkdir(parents=True, exist_ok=True)
        candidate, suffix = base, 0
        while True:
            try:
                os.mkdir(candidate)
                break
            except FileExistsError:  # atomic: two runs starting at once never share a folder
                suffix += 1
                candidate = f'{base}-{suffix}'
        if suffix:
            _logger.info(f"Run folder '{base}' exists: this run writes to '{candidate}' (timm would reuse it)")
        self.folder = RunFolder(candidate)
        return self.folder


def _settings(yaml_text: str) -> Dict[str, Any]:
    return yaml.safe_load(yaml_text) or {}


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """Settings known to both whose values differ (a flag added or removed by another version is not compared)."""
    return {key: (saved[key], current[key]) for key in current if key in saved and saved[key] != current[key]}


def _describe(differences: Mapping[str, Tuple[Any, Any]], options: Mapping[str, str]) -> str:
    shown = [f'{options.get(key, key)} {new!r} (was {old!r})' for key, (old, new) in list(differences.items())[:4]]
    more = len(differences) - len(shown)
    return ', '.join(shown) + (f' and {more} more' if more > 0 else '')


def _check_same_settings(folder: RunFolder, current: Mapping[str, Any],
                         options: Mapping[str, str]) -> Dict[str, Tuple[Any, Any]]:
    """The settings a resume changes; refuse one that changes what the run was trained with."""
    if not folder.file(ARGS_FILE).is_file():
        return {}
    differences = _differences(folder.read_args(), current)
    fixed = {key: value for key, value in differences.items() if key not in MAY_CHANGE_ON_RESUME}
    if fixed:
        raise UsageError(f"run '{folder.path}' was trained with other settings: {_describe(fixed, options)}; resume "
                         f"with the settings of its {ARGS_FILE}, or start a new run without --resume")
    return differences


def _newest_matching_run(root: str, model: str, current: Mapping[str, Any],
                         options: Mapping[str, str]) -> Optional[RunFolder]:
    """``--resume auto`` without ``--experiment``: the newest earlier run of the model trained with these settings.

    Raises:
        UsageError: There are earlier runs of the model with a checkpoint, but none with these settings.
    """
    if not os.path.isdir(root):
        return None
    candidates = [RunFolder(os.path.join(root, name)) for name in os.listdir(root) if safe_model_name(model) in name]
    candidates = sorted((c for c in candidates if c.resume_checkpoint()), key=lambda c: os.path.getmtime(c.path),
                        reverse=True)
    refused: List[str] = []
    for folder in candidates:
        try:
            _check_same_settings(folder, current, options)
            return folder
        except UsageError as e:
            refused.append(str(e))
    if refused:
        raise UsageError(f'--resume auto found no earlier run of {model} with these settings (the newest: '
                         f'{refused[0]}); name the run with --experiment, or drop --resume')
    return None


def plan_run(args: argparse.Namespace, yaml_text: str, image_size: int, options: Mapping[str, str]) -> RunPlan:
    """Decide the run folder and the checkpoint to continue from, reading (and verifying) that checkpoint.

    Args:
        args: Parsed arguments.
        yaml_text: The run's settings as ``args.yaml`` would hold them.
        image_size: The input size, for timm's default folder name.
        options: Destination -> option string, for messages.

    Raises:
        UsageError: A resume that would continue a run with other settings, or a checkpoint that is missing.
        CheckpointError: The checkpoint is corrupt, damaged or unsafe.
        RunFolderError: The run folder is in use by another process.
    """
    root = args.output or DEFAULT_OUTPUT
    current = _settings(yaml_text)
    folder = None
    if args.experiment:
        folder = RunFolder(os.path.join(root, args.experiment))
    elif args.resume == 'auto':
        folder = _newest_matching_run(root, args.model, current, options)
    if folder is None:
        name = '-'.join([datetime.datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model),
                         str(image_size)])
        folder = RunFolder(os.path.join(root, name))

    if args.resume == 'auto':
        found = folder.resume_checkpoint()
        path = str(found) if found else None
    else:
        path = args.resume or None
    in_place = args.resume == 'auto' and folder.path.is_dir() or (
        path is not None and os.path.dirname(os.path.abspath(path)) == os.path.abspath(folder.path))
    changes = _check_same_settings(folder, current, options) if in_place else {}
    if in_place:
        holder = folder.holder()
        if holder:
            raise UsageError(f"run folder '{folder.path}' is in use by {holder}; wait for that run to end or "
                             f"choose another --experiment")
    return RunPlan(folder, load_resume_point(path) if path else None, in_place, changes)
