"""Export a training run folder as a Hub-ready folder that timm loads on its own.

An export is ``model.safetensors`` + ``config.json`` (timm's own format, with the architecture arguments that change
the network), plus ``tfkd.json`` (machine-readable Tf-KD metadata), ``training_curves.png`` and a ``README.md`` card.
"""
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from timm.models import save_for_hf
from torch import nn

from ..checkpoint_io import EMA_STATE_DICT_KEYS, extract_state_dict, read_checkpoint, sha256_file
from ..errors import ExportError
from ..methods import registered_flags
from ..models import registered_here
from ..run_folder import RunFolder, RunRecord, headline_metric, row_metrics
from ..version import __version__
from .card import model_card, plot_curves
from .files import (
    CARD_FILE, CURVES_FILE, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, METADATA_FILE, WEIGHTS_FILE,
    is_export,
)

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

DEFAULT_LICENSE = 'apache-2.0'


@dataclass
class _Run:
    """What export needs of a run folder, read once."""
    folder: RunFolder
    record: RunRecord
    args: Dict[str, Any]
    summary: List[Dict[str, Optional[float]]]

    @property
    def epochs_trained(self) -> int:
        """Epochs the run completed (older records do not say: their summary does)."""
        return self.record.epochs_trained if self.record.epochs_trained is not None else self.summary[-1]['epoch'] + 1


@dataclass
class _Selection:
    """The weights chosen for export and where they came from."""
    state_dict: Dict[str, torch.Tensor]
    checkpoint_name: str
    epoch: Optional[int]
    ema: bool
    metrics: Optional[Dict[str, float]]


def _read_run(run_dir: Path) -> _Run:
    folder = RunFolder(run_dir)
    record = folder.read_record()
    summary = folder.read_summary()
    if not summary:
        raise ExportError(f"'{folder.file('summary.csv')}' has no epoch rows")
    return _Run(folder, record, folder.read_args(), summary)


def _ema_was_better(row: Optional[Mapping[str, Any]], task: Optional[str]) -> bool:
    """The EMA's headline metric (top-1, multi-label: mAP) beat the model's."""
    name = headline_metric(task)
    model, ema = row_metrics(row, task) if row is not None else (None, None)
    if not model or not ema or name not in model or name not in ema:
        return False
    return ema[name] > model[name]


def _select_weights(run: _Run, checkpoint: PathLike, use_ema: Optional[bool]) -> _Selection:
    """Read the checkpoint safely and decide between its plain and EMA weights.

    Args:
        run: The parsed run folder.
        checkpoint: 'best', 'last' or a checkpoint file.
        use_ema: True / False forces the choice; None takes the EMA weights only when they exist and their
            eval top-1 (multi-label: mAP) beat the plain model's at the checkpoint's epoch in summary.csv.
    """
    path = run.folder.checkpoint(checkpoint)
    state = read_checkpoint(str(path))
    epoch = state.get('epoch') if isinstance(state.get('epoch'), int) else None
    row = next((row for row in run.summary if row['epoch'] == epoch), None) if epoch is not None else None
    if use_ema is None:
        has_ema = any(isinstance(state.get(key), dict) for key in EMA_STATE_DICT_KEYS)
        use_ema = has_ema and _ema_was_better(row, run.record.task)
        _logger.info('Exporting %s weights of %s (epoch %s)', 'EMA' if use_ema else 'model', path.name, epoch)
    return _Selection(
        state_dict=extract_state_dict(state, use_ema=use_ema),
        checkpoint_name=path.name,
        epoch=epoch,
        ema=use_ema,
        metrics=row_metrics(row, run.record.task)[1 if use_ema else 0] if row is not None else None,
    )


def _build_model(run: _Run, selection: _Selection) -> nn.Module:
    """The run's architecture, built as the trainer built it, with the chosen weights."""
    model = run.folder.create_model(run.record, run.args)
    try:
        model.load_state_dict(selection.state_dict)
    except RuntimeError as e:
        raise ExportError(
            f"'{selection.checkpoint_name}' does not fit {run.record.model} (num_classes={run.record.num_classes}, "
            f"in_chans={run.record.in_chans}): {' '.join(str(e).split())}") from None
    return model


def _check_out_dir(out_dir: Path, run_dir: Path) -> None:
    if out_dir.resolve() == run_dir.resolve():
        raise ExportError(f"export folder '{out_dir}' is the training run folder; choose a new or empty folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"export folder '{out_dir}' is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export(out_dir):
        raise ExportError(
            f"export folder '{out_dir}' is not empty and is not a previous timm-tfkd export; "
            f"choose a new or empty folder")


def _license(model: nn.Module, args: Mapping[str, Any]) -> str:
    """Fine-tuned weights inherit the license of the pretrained weights they started from."""
    if args.get('pretrained'):
        return model.pretrained_cfg.get('license') or 'other'
    return DEFAULT_LICENSE


def _write_weights_and_config(model: nn.Module, run: _Run, license_id: str, folder: Path) -> None:
    record = run.record
    model_config: Dict[str, Any] = {
        # The registry's tag and license describe timm's own weights, not these.
        'pretrained_cfg': {'tag': f"tfkd_{record.tfkd['mode']}", 'license': license_id},
    }
    if registered_here(record.model):
        # Plain timm fails with "Unknown model": say in the file it reads what registers the architecture.
        model_config['requires'] = f'pip install timm-tfkd; import timm_tfkd (registers {record.model} with timm)'
    if len(record.class_names) == record.num_classes:
        model_config['label_names'] = list(record.class_names)
    elif record.class_names:
        _logger.warning('run_info.json lists %d class names for %d classes; label names not exported',
                        len(record.class_names), record.num_classes)
    data_config = {key: record.data_config[key] for key in
                   ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
                   if key in record.data_config}
    # timm records the arguments the network was built with (global pool, batch-norm eps, model kwargs) and writes
    # them into config.json, so plain timm rebuilds exactly this network.
    save_for_hf(model, str(folder), model_config=model_config, data_config=data_config, safe_serialization=True)


def _public_source(source: Optional[str]) -> Optional[str]:
    """Keep a teacher's Hub id or file name but never the local directories it was read from."""
    if not source:
        return source
    prefix, sep, rest = source.partition(':')
    if sep and prefix == 'local-dir':
        return 'local-dir:' + os.path.basename(rest.rstrip('/\\'))
    if os.path.isabs(source) or source.startswith('~') or '\\' in source:
        return os.path.basename(source.rstrip('/\\'))
    return source


def _public_tfkd(block: Mapping[str, Any]) -> Dict[str, Any]:
    """The run record's Tf-KD block under the names an export publishes (e.g. ``temperature`` as ``tau``)."""
    public_keys = {flag.key: flag.public_key for flag in registered_flags() if flag.key}
    public = {public_keys.get(key, key): value for key, value in block.items() if key != 'teacher'}
    teacher = block.get('teacher')
    public['teacher'] = {'model': teacher.get('model'), 'source': _public_source(teacher.get('source')),
                         'sha256': teacher.get('sha256')} if teacher else None
    return public


def _metadata(run: _Run, selection: _Selection, weights_sha256: str) -> Dict[str, Any]:
    record = run.record
    return {
        'format': EXPORT_FORMAT,
        'format_version': EXPORT_FORMAT_VERSION,
        'model': record.model,
        'num_classes': record.num_classes,
        'in_chans': record.in_chans,
        'task': record.task,
        'tfkd': _public_tfkd(record.tfkd),
        'dataset': record.dataset,
        'train_split': record.train_split,
        'eval_split': record.eval_split,
        'epochs': record.epochs,
        'epochs_trained': run.epochs_trained,
        'finished': run.epochs_trained >= (record.epochs or 0) if record.finished is None else record.finished,
        'seed': record.seed,
        'versions': record.versions,
        'final_metrics': record.final_metrics,
        'final_ema_metrics': record.final_ema_metrics,
        'best_epoch': record.best_epoch,
        'export': {
            'checkpoint': selection.checkpoint_name,
            'epoch': selection.epoch,
            'ema': selection.ema,
            'metrics': selection.metrics,
            'weights': WEIGHTS_FILE,
            'sha256': weights_sha256,
            'timm_tfkd_version': __version__,
        },
    }


def _local_strings(*folders: Path) -> List[str]:
    """Absolute paths that must never reach a published file."""
    strings = {str(Path.home())} if str(Path.home()) not in ('/', '') else set()
    for folder in folders:
        strings |= {str(folder.absolute()), str(folder.resolve())}
    return sorted(strings)


def _check_no_local_strings(folder: Path, forbidden: List[str]) -> None:
    """Last line of defence: run metadata is free text, so refuse an export that would publish a local path."""
    for path in folder.iterdir():
        if path.suffix not in ('.json', '.md'):
            continue
        text = path.read_text(encoding='utf-8')
        for secret in forbidden:
            if secret in text:
                raise ExportError(f"export refused: '{path.name}' would publish the local path '{secret}' "
                                  f"(check run_info.json / args.yaml)")


def _write_export(run: _Run, selection: _Selection, folder: Path, repo_id: Optional[str]) -> None:
    model = _build_model(run, selection)
    license_id = _license(model, run.args)
    _write_weights_and_config(model, run, license_id, folder)
    meta = _metadata(run, selection, sha256_file(folder / WEIGHTS_FILE))
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + '\n', encoding='utf-8')
    plot_curves(run.summary, folder / CURVES_FILE, run.record.task)
    card = model_card(run.record, run.args, meta, license_id, repo_id, final_epoch=run.summary[-1]['epoch'])
    (folder / CARD_FILE).write_text(card, encoding='utf-8')


def export_run(
        run_dir: PathLike,
        out_dir: PathLike,
        checkpoint: PathLike = 'best',
        use_ema: Optional[bool] = None,
        *,
        repo_id: Optional[str] = None,
) -> Path:
    """Write a Hub-ready folder from a training run folder.

    The folder is written next to ``out_dir`` first and moved into place at the end, so a failed export never
    leaves a half-written folder behind.

    Args:
        run_dir: The training output folder (args.yaml, summary.csv, run_info.json, checkpoints).
        out_dir: Where to write; must be new, empty, or a previous export (which is replaced).
        checkpoint: 'best' (model_best.pth.tar, else last.pth.tar), 'last', or a checkpoint file.
        use_ema: Export the EMA weights (True), the plain weights (False), or decide from summary.csv (None):
            EMA when the checkpoint has EMA weights and their eval top-1 was higher at that epoch.
        repo_id: The Hub id the card's usage snippet names; a placeholder when None.

    Returns:
        The export folder.

    Raises:
        RunFolderError: The run folder is incomplete.
        ExportError: The weights do not fit, or ``out_dir`` holds something other than an export.
        CheckpointError: The checkpoint is missing, corrupt, or holds pickled objects (never executed).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = _read_run(run_dir)
    holder = run.folder.holder()
    if holder:
        _logger.warning(f"'{run_dir}' is still being trained by {holder}: exporting its checkpoints so far")
    _check_out_dir(out_dir, run_dir)
    selection = _select_weights(run, checkpoint, use_ema)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        _write_export(run, selection, staging, repo_id)
        _check_no_local_strings(staging, _local_strings(run_dir, out_dir, staging))
        # mkdtemp (and safetensors) make files private to the user; an export is meant to be shared.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    _logger.info('Exported %s to %s', run_dir, out_dir)
    return out_dir
