"""Publish a Tf-KD training run on the Hugging Face Hub and load it back.

An export is a folder timm can load on its own (``model.safetensors`` + ``config.json``), plus ``tfkd.json``
(machine-readable Tf-KD metadata), ``training_curves.png`` and a ``README.md`` model card.
"""
import argparse
import csv
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
import yaml
from huggingface_hub import HfApi, get_token, hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, validate_repo_id as hf_validate_repo_id
from timm.models import resolve_model_input_args, save_for_hf
from timm.models._hub import hf_split
from torch import nn

from .checkpoint_io import (
    EMA_STATE_DICT_KEYS, CheckpointError, extract_state_dict, read_checkpoint, read_run_args, resolve_run_dir_checkpoint,
    sha256_file)
from .version import __version__

__all__ = [
    'ExportError', 'InvalidRepoIdError', 'HubUploadError', 'EXPORT_FILES',
    'export_run', 'is_export', 'push_to_hub', 'push_run', 'validate_model_id',
    'add_hub_args', 'check_hub_args', 'finish_run_for_hub', 'load_pretrained',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
METADATA_FILE = 'tfkd.json'
CURVES_FILE = 'training_curves.png'
CARD_FILE = 'README.md'
EXPORT_FILES = frozenset((WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE, CURVES_FILE, CARD_FILE))
DEFAULT_EXPORT_SUBDIR = 'hub_export'
# tfkd.json carries this marker so a folder can be recognised as ours before it is overwritten or uploaded.
EXPORT_FORMAT = 'timm-tfkd-export'
EXPORT_FORMAT_VERSION = 1
DEFAULT_LICENSE = 'apache-2.0'
CLI_NAME = 'timm-tfkd'

RUN_INFO_FILE = 'run_info.json'
SUMMARY_FILE = 'summary.csv'
ARGS_FILE = 'args.yaml'
METRIC_NAMES = ('top1', 'top5', 'nll', 'ece')
RUN_INFO_REQUIRED_KEYS = ('model', 'num_classes', 'in_chans', 'data_config', 'tfkd')
# args.yaml keys the trainer passes to timm.create_model that shape the network, and the keyword each becomes.
ARCHITECTURE_ARGS = (('gp', 'global_pool'), ('bn_momentum', 'bn_momentum'), ('bn_eps', 'bn_eps'))

MODE_DESCRIPTIONS = {
    'none': 'plain timm training, no distillation term',
    'lsr': 'label smoothing regularization, the paper\'s control',
    'reg': 'Tf-KD-reg, distillation from a manually designed virtual teacher',
    'self': 'Tf-KD-self, distillation from a trained copy of the same architecture',
    'kd': 'knowledge distillation from a separately trained teacher',
}

# args.yaml keys shown as the training recipe, in this order; anything that may hold a local path stays out.
RECIPE_FIELDS = (
    ('epochs', 'Epochs'),
    ('batch_size', 'Batch size (per device)'),
    ('opt', 'Optimizer'),
    ('lr', 'Learning rate'),
    ('momentum', 'Momentum'),
    ('weight_decay', 'Weight decay'),
    ('sched', 'LR schedule'),
    ('warmup_epochs', 'Warmup epochs'),
    ('min_lr', 'Minimum LR'),
    ('mixup', 'Mixup alpha'),
    ('cutmix', 'CutMix alpha'),
    ('model_ema_decay', 'EMA decay'),
    ('amp', 'Mixed precision'),
    ('seed', 'Seed'),
)

PAPER_BIBTEX = """@inproceedings{yuan2020revisiting,
  title     = {Revisiting Knowledge Distillation via Label Smoothing Regularization},
  author    = {Yuan, Li and Tay, Francis E. H. and Li, Guilin and Wang, Tao and Feng, Jiashi},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {3903--3911},
  year      = {2020}
}"""


class ExportError(ValueError):
    """A training run folder or an export folder cannot be used as asked."""


class InvalidRepoIdError(ValueError):
    """A Hub model id is not of the form ``org/name``."""


class HubUploadError(RuntimeError):
    """An upload to the Hub failed; the export is still on disk.

    Attributes:
        folder: The export folder that was being uploaded.
        repo_id: The target Hub model id.
        retry_command: The shell command that retries the upload.
    """

    def __init__(self, message: str, folder: Path, repo_id: str, retry_command: str):
        super().__init__(message)
        self.folder = folder
        self.repo_id = repo_id
        self.retry_command = retry_command


@dataclass
class _Run:
    """What a training run folder holds, parsed."""
    run_dir: Path
    info: Dict[str, Any]
    args: Dict[str, Any]
    summary: List[Dict[str, Optional[float]]]


@dataclass
class _Selection:
    """The weights chosen for export and where they came from."""
    state_dict: Dict[str, torch.Tensor]
    checkpoint_name: str
    epoch: Optional[int]
    ema: bool
    metrics: Optional[Dict[str, float]]


# ---------------------------------------------------------------------------------------------------------------
# Reading a run folder


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with path.open(encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise ExportError(f"'{path.name}' is missing in '{path.parent}'") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"'{path}' is not valid JSON: {e}") from None


def _read_args(path: Path) -> Dict[str, Any]:
    return read_run_args(str(path), ExportError)


def _to_number(value: Optional[str]) -> Optional[float]:
    """Parse a summary.csv cell; empty cells (metrics not computed that epoch) become None."""
    if value is None or value.strip() == '':
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _read_summary(path: Path) -> List[Dict[str, Optional[float]]]:
    try:
        with path.open(newline='', encoding='utf-8') as f:
            rows = [{key: _to_number(value) for key, value in row.items() if key} for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise ExportError(f"'{path.name}' is missing in '{path.parent}'") from None
    rows = [row for row in rows if row.get('epoch') is not None]
    if not rows:
        raise ExportError(f"'{path}' has no epoch rows")
    return rows


def _read_run_info(path: Path) -> Dict[str, Any]:
    info = _read_json(path)
    missing = [key for key in RUN_INFO_REQUIRED_KEYS if key not in info]
    if missing:
        raise ExportError(f"'{path}' lacks {', '.join(missing)}")
    return info


def _read_run(run_dir: Path) -> _Run:
    if not run_dir.is_dir():
        raise ExportError(f"training run folder '{run_dir}' does not exist")
    return _Run(
        run_dir=run_dir,
        info=_read_run_info(run_dir / RUN_INFO_FILE),
        args=_read_args(run_dir / ARGS_FILE),
        summary=_read_summary(run_dir / SUMMARY_FILE),
    )


# ---------------------------------------------------------------------------------------------------------------
# Choosing the weights


def _resolve_checkpoint(run_dir: Path, checkpoint: PathLike) -> Path:
    if checkpoint == 'best':
        return Path(resolve_run_dir_checkpoint(str(run_dir)))
    if checkpoint == 'last':
        return run_dir / 'last.pth.tar'
    path = Path(checkpoint)
    # A bare file name such as 'checkpoint-7.pth.tar' means the one in the run folder.
    if not path.is_absolute() and not path.exists() and (run_dir / path).exists():
        return run_dir / path
    return path


def _summary_row(summary: List[Dict[str, Optional[float]]], epoch: Optional[int]) -> Optional[Dict[str, Any]]:
    if epoch is None:
        return None
    return next((row for row in summary if int(row['epoch']) == epoch), None)


def _row_metrics(row: Optional[Dict[str, Any]], ema: bool) -> Optional[Dict[str, float]]:
    if row is None:
        return None
    prefix = 'eval_ema_' if ema else 'eval_'
    metrics = {name: row.get(prefix + name) for name in METRIC_NAMES}
    return {k: v for k, v in metrics.items() if v is not None} or None


def _ema_was_better(row: Optional[Dict[str, Any]]) -> bool:
    if row is None or row.get('eval_ema_top1') is None or row.get('eval_top1') is None:
        return False
    return row['eval_ema_top1'] > row['eval_top1']


def _select_weights(run: _Run, checkpoint: PathLike, use_ema: Optional[bool]) -> _Selection:
    """Read the checkpoint safely and decide between its plain and EMA weights.

    Args:
        run: The parsed run folder.
        checkpoint: 'best', 'last' or a checkpoint file.
        use_ema: True / False forces the choice; None takes the EMA weights only when they exist and their
            eval top-1 beat the plain model's at the checkpoint's epoch in summary.csv.
    """
    path = _resolve_checkpoint(run.run_dir, checkpoint)
    state = read_checkpoint(str(path))
    epoch = state.get('epoch') if isinstance(state.get('epoch'), int) else None
    row = _summary_row(run.summary, epoch)
    if use_ema is None:
        has_ema = any(isinstance(state.get(key), dict) for key in EMA_STATE_DICT_KEYS)
        use_ema = has_ema and _ema_was_better(row)
        _logger.info('Exporting %s weights of %s (epoch %s)', 'EMA' if use_ema else 'model', path.name, epoch)
    return _Selection(
        state_dict=extract_state_dict(state, use_ema=use_ema),
        checkpoint_name=path.name,
        epoch=epoch,
        ema=use_ema,
        metrics=_row_metrics(row, use_ema),
    )


def _build_model(run: _Run, selection: _Selection) -> nn.Module:
    """Create the run's architecture the way the trainer did and load the chosen weights into it."""
    info, args = run.info, run.args
    model_kwargs = dict(args.get('model_kwargs') or {})
    # timm records the factory arguments a model was built with and save_for_hf writes them to config.json's
    # model_args, which create_model('hf-hub:...') passes back: any architecture flag of the trainer missing here
    # would make plain timm build another network (e.g. BatchNorm eps is a module attribute, not a weight).
    for arg, kwarg in ARCHITECTURE_ARGS:
        if args.get(arg) is not None:
            model_kwargs[kwarg] = args[arg]
    try:
        # timm resolves image-size arguments for fixed-size models (e.g. ViTs) from the trained input size.
        resolved = resolve_model_input_args(
            info['model'],
            {'input_size': info['data_config']['input_size']},
            num_classes=info['num_classes'],
            in_chans=info['in_chans'],
            **model_kwargs,
        )
        model = timm.create_model(**resolved)
        model.load_state_dict(selection.state_dict)
    except (RuntimeError, ValueError, TypeError) as e:
        detail = ' '.join(str(e).split())
        raise ExportError(
            f"cannot rebuild {info['model']} (num_classes={info['num_classes']}, in_chans={info['in_chans']}) "
            f"from '{selection.checkpoint_name}': {detail}") from None
    return model


# ---------------------------------------------------------------------------------------------------------------
# Writing the export


def is_export(folder: PathLike) -> bool:
    """Whether a folder is a (possibly older) timm-tfkd export: only export files, with our tfkd.json marker."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if not {p.name for p in folder.iterdir()} <= EXPORT_FILES:
        return False
    try:
        return _read_json(folder / METADATA_FILE).get('format') == EXPORT_FORMAT
    except ExportError:
        return False


def _check_out_dir(out_dir: Path, run_dir: Path) -> None:
    if out_dir.resolve() == run_dir.resolve():
        raise ExportError(f"export folder '{out_dir}' is the training run folder; choose a new or empty folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"export folder '{out_dir}' is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export(out_dir):
        raise ExportError(
            f"export folder '{out_dir}' is not empty and is not a previous timm-tfkd export; "
            f"choose a new or empty folder")


def _license(model: nn.Module, args: Dict[str, Any]) -> str:
    """Fine-tuned weights inherit the license of the pretrained weights they started from."""
    if args.get('pretrained'):
        return model.pretrained_cfg.get('license') or 'other'
    return DEFAULT_LICENSE


def _write_weights_and_config(model: nn.Module, run: _Run, license_id: str, folder: Path) -> None:
    info = run.info
    model_config: Dict[str, Any] = {
        # The registry's tag and license describe timm's own weights, not these.
        'pretrained_cfg': {'tag': f"tfkd_{info['tfkd']['mode']}", 'license': license_id},
    }
    class_names = info.get('class_names') or []
    if len(class_names) == info['num_classes']:
        model_config['label_names'] = list(class_names)
    elif class_names:
        _logger.warning('run_info.json lists %d class names for %d classes; label names not exported',
                        len(class_names), info['num_classes'])
    data_config = {key: info['data_config'][key] for key in
                   ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
                   if key in info['data_config']}
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


def _metadata(run: _Run, selection: _Selection, weights_sha256: str) -> Dict[str, Any]:
    info = run.info
    tfkd = info['tfkd']
    teacher = tfkd.get('teacher')
    if teacher:
        teacher = {'model': teacher.get('model'), 'source': _public_source(teacher.get('source')),
                   'sha256': teacher.get('sha256')}
    return {
        'format': EXPORT_FORMAT,
        'format_version': EXPORT_FORMAT_VERSION,
        'model': info['model'],
        'num_classes': info['num_classes'],
        'in_chans': info['in_chans'],
        'tfkd': {
            'mode': tfkd['mode'],
            'formula': tfkd.get('formula'),
            'alpha': tfkd.get('alpha'),
            'tau': tfkd.get('temperature'),
            'a': tfkd.get('correct_prob'),
            'multiplier': tfkd.get('multiplier'),
            'smoothing': tfkd.get('smoothing'),
            'teacher': teacher,
        },
        'dataset': info.get('dataset'),
        'train_split': info.get('train_split'),
        'eval_split': info.get('eval_split'),
        'epochs': info.get('epochs'),
        'seed': info.get('seed'),
        'versions': info.get('versions', {}),
        'final_metrics': info.get('final_metrics'),
        'final_ema_metrics': info.get('final_ema_metrics'),
        'best_epoch': info.get('best_epoch'),
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


def _plot_curves(summary: List[Dict[str, Optional[float]]], path: Path) -> None:
    """Loss and top-1 per epoch, side by side."""
    # matplotlib is only needed here; its Figure API avoids pyplot's process-wide backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, top1_ax = fig.subplots(1, 2)
    panels = (
        (loss_ax, 'Loss', ('train_loss', 'train_task_loss', 'train_kd_loss', 'eval_loss', 'eval_ema_loss')),
        (top1_ax, 'Top-1 accuracy (%)', ('eval_top1', 'eval_ema_top1')),
    )
    for ax, title, columns in panels:
        for column in columns:
            points = [(row['epoch'], row[column]) for row in summary if row.get(column) is not None]
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker='o', markersize=3, label=column)
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, format='png')


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:g}'
    return str(value)


def _format_metric(metrics: Dict[str, float], name: str) -> str:
    value = metrics.get(name)
    if value is None:
        return '–'
    return f'{value:.2f}' if name in ('top1', 'top5') else f'{value:.4f}'


def _metrics_row(label: str, epoch: Optional[int], metrics: Optional[Dict[str, float]]) -> Optional[str]:
    if not metrics:
        return None
    cells = [label, '–' if epoch is None else str(epoch)] + [_format_metric(metrics, n) for n in METRIC_NAMES]
    return '| ' + ' | '.join(cells) + ' |'


def _table(header: Tuple[str, str], rows: List[Tuple[str, Any]]) -> List[str]:
    return [f'| {header[0]} | {header[1]} |', '|---|---|'] + [f'| {k} | {_format_value(v)} |' for k, v in rows]


def _card_front_matter(meta: Dict[str, Any], license_id: str) -> str:
    tags = ['timm', 'timm-tfkd', 'image-classification', 'knowledge-distillation']
    if meta['tfkd']['mode'] != 'none':
        tags.append(f"tfkd-{meta['tfkd']['mode']}")
    front = {'library_name': 'timm', 'license': license_id, 'pipeline_tag': 'image-classification', 'tags': tags}
    return '---\n' + yaml.safe_dump(front, sort_keys=False) + '---\n'


def _card_intro(meta: Dict[str, Any], info: Dict[str, Any], repo_id: Optional[str]) -> List[str]:
    title = repo_id.split('/')[-1] if repo_id else f"{meta['model']} trained with Tf-KD ({meta['tfkd']['mode']})"
    size = info['data_config'].get('input_size') or []
    shape = f"{meta['in_chans']} input channel{'s' if meta['in_chans'] != 1 else ''}"
    if len(size) == 3:
        shape += f', {size[1]}x{size[2]} pixels'
    dataset = meta.get('dataset') or 'a local image folder'
    return [
        f'# {title}', '',
        f"A `{meta['model']}` image classifier ({meta['num_classes']} classes, {shape}) trained on `{dataset}` "
        f"with Teacher-free Knowledge Distillation ([Yuan et al., CVPR 2020](https://arxiv.org/abs/1909.11723)) "
        f"using timm-tfkd, a plugin for [timm](https://github.com/huggingface/pytorch-image-models). "
        f"The weights load with plain timm: no plugin code is needed.",
    ]


def _tfkd_rows(tfkd: Dict[str, Any]) -> List[Tuple[str, Any]]:
    rows = [('Mode', f"`{tfkd['mode']}` ({MODE_DESCRIPTIONS.get(tfkd['mode'], 'custom mode')})")]
    if tfkd['mode'] not in ('none', 'lsr'):
        rows += [('Formula', f"`{tfkd['formula']}`"), ('alpha (distillation weight)', tfkd['alpha']),
                 ('tau (temperature)', tfkd['tau']), ('Multiplier', tfkd['multiplier'])]
    if tfkd['mode'] == 'reg':
        rows.append(('a (virtual teacher probability of the true class)', tfkd['a']))
    rows.append(('Label smoothing', tfkd['smoothing']))
    teacher = tfkd.get('teacher')
    if teacher:
        rows += [('Teacher', f"`{teacher['model']}` from `{teacher['source']}`"),
                 ('Teacher SHA-256', f"`{teacher['sha256']}`")]
    return rows


def _recipe_rows(args: Dict[str, Any]) -> List[Tuple[str, Any]]:
    rows = []
    for key, label in RECIPE_FIELDS:
        value = args.get(key)
        if key == 'lr' and value is None and args.get('lr_base') is not None:
            # timm derives the rate from lr_base scaled by the global batch size
            value = f"lr_base {_format_value(args['lr_base'])} per {args.get('lr_base_size')} samples"
        if key == 'model_ema_decay' and not args.get('model_ema'):
            value = None
        if value is not None:
            rows.append((label, value))
    return rows


def _card_training_section(meta: Dict[str, Any], args: Dict[str, Any]) -> List[str]:
    versions = meta.get('versions') or {}
    return [
        '## Training', '',
        f"Trained for {meta.get('epochs')} epochs on the `{meta.get('train_split')}` split, seed {meta.get('seed')}, "
        f"with timm {versions.get('timm', '?')}, timm-tfkd {versions.get('timm_tfkd', '?')} "
        f"and torch {versions.get('torch', '?')}.", '',
        '### Tf-KD settings', '',
        *_table(('Setting', 'Value'), _tfkd_rows(meta['tfkd'])), '',
        '### Recipe', '',
        *_table(('Argument', 'Value'), _recipe_rows(args)),
    ]


def _card_metrics_section(meta: Dict[str, Any], final_epoch: Optional[int]) -> List[str]:
    export = meta['export']
    exported = f"exported ({export['checkpoint']}, {'EMA' if export['ema'] else 'model'} weights)"
    rows = [
        _metrics_row(exported, export['epoch'], export['metrics']),
        _metrics_row('final epoch, model', final_epoch, meta.get('final_metrics')),
        _metrics_row('final epoch, EMA', final_epoch, meta.get('final_ema_metrics')),
    ]
    split = meta.get('eval_split') or 'evaluation'
    dataset = meta.get('dataset') or 'the training dataset'
    return [
        '## Metrics', '',
        f'On the `{split}` split of `{dataset}`: top-1 and top-5 accuracy in %, negative log-likelihood (NLL) '
        f'in nats, expected calibration error (ECE).', '',
        '| Weights | Epoch | Top-1 | Top-5 | NLL | ECE |', '|---|---|---|---|---|---|',
        *[row for row in rows if row],
    ]


def _card_usage_section(meta: Dict[str, Any], repo_id: Optional[str]) -> List[str]:
    repo = repo_id or 'ORG/NAME'
    image_mode = 'L' if meta['in_chans'] == 1 else 'RGB'
    return [
        '## Usage', '',
        'With timm alone:', '',
        '```python',
        'import timm',
        'import torch',
        'from PIL import Image',
        '',
        f"model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()",
        'data_config = timm.data.resolve_model_data_config(model)',
        'transform = timm.data.create_transform(**data_config, is_training=False)',
        f"img = Image.open('image.png').convert('{image_mode}')",
        'with torch.no_grad():',
        '    probs = model(transform(img).unsqueeze(0)).softmax(dim=-1)',
        "label_names = model.pretrained_cfg['label_names']",
        '```', '',
        'With the Tf-KD metadata of this card (`pip install timm-tfkd`):', '',
        '```python',
        'from timm_tfkd.hub import load_pretrained',
        '',
        f"model, tfkd_meta = load_pretrained('hf-hub:{repo}')",
        '```',
    ]


def _card_files_section(meta: Dict[str, Any]) -> List[str]:
    return [
        '## Files', '',
        f"- `{WEIGHTS_FILE}`: the weights (SHA-256 `{meta['export']['sha256']}`)",
        f'- `{CONFIG_FILE}`: timm architecture with the arguments it was trained with, preprocessing and label names',
        f'- `{METADATA_FILE}`: Tf-KD settings, teacher identity, versions and metrics, machine-readable',
        f'- `{CURVES_FILE}`: loss and top-1 per epoch',
    ]


def _model_card(run: _Run, meta: Dict[str, Any], license_id: str, repo_id: Optional[str]) -> str:
    final_epoch = int(run.summary[-1]['epoch'])
    sections = [
        _card_intro(meta, run.info, repo_id),
        _card_training_section(meta, run.args),
        _card_metrics_section(meta, final_epoch),
        ['## Training curves', '', f'![Loss and top-1 accuracy per epoch]({CURVES_FILE})'],
        _card_usage_section(meta, repo_id),
        _card_files_section(meta),
        ['## Citation', '', '```bibtex', PAPER_BIBTEX, '```'],
    ]
    return _card_front_matter(meta, license_id) + '\n' + '\n\n'.join('\n'.join(s) for s in sections) + '\n'


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
    _plot_curves(run.summary, folder / CURVES_FILE)
    (folder / CARD_FILE).write_text(_model_card(run, meta, license_id, repo_id), encoding='utf-8')


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
        ExportError: The run folder is incomplete, or ``out_dir`` holds something other than an export.
        CheckpointError: The checkpoint is missing, corrupt, or holds pickled objects (never executed).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = _read_run(run_dir)
    _check_out_dir(out_dir, run_dir)
    selection = _select_weights(run, checkpoint, use_ema)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        _write_export(run, selection, staging, repo_id)
        _check_no_local_strings(staging, _local_strings(run_dir, out_dir, staging))
        staging.chmod(0o755)  # mkdtemp makes it private to the user; an export is meant to be shared
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    _logger.info('Exported %s to %s', run_dir, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Uploading


def validate_model_id(repo_id: str) -> str:
    """Check a Hub model id is ``org/name``.

    Returns:
        The id, unchanged.

    Raises:
        InvalidRepoIdError: Not of the form ``org/name`` or not a valid Hub name.
    """
    message = f"invalid Hub model id '{repo_id}': expected org/name (letters, digits, '-', '_', '.')"
    if not isinstance(repo_id, str) or repo_id.count('/') != 1:
        raise InvalidRepoIdError(message)
    try:
        hf_validate_repo_id(repo_id)
    except ValueError:
        raise InvalidRepoIdError(message) from None
    return repo_id


def _check_export_folder(folder: Path) -> None:
    if not is_export(folder):
        raise ExportError(f"'{folder}' is not a timm-tfkd export folder (run `{CLI_NAME} export` first)")
    missing = sorted(EXPORT_FILES - {p.name for p in folder.iterdir()})
    if missing:
        raise ExportError(f"export folder '{folder}' is incomplete, missing {', '.join(missing)}")


def _retry_command(
        target: Path,
        repo_id: str,
        private: bool,
        revision: Optional[str],
        commit_message: Optional[str] = None,
        export_dir: Optional[Path] = None,
) -> str:
    parts = [CLI_NAME, 'push', str(target.absolute()), repo_id]
    if private:
        parts.append('--private')
    if revision:
        parts += ['--revision', revision]
    if commit_message:
        parts += ['--commit-message', commit_message]
    if export_dir is not None:
        parts += ['--export-dir', str(export_dir.absolute())]
    return shlex.join(parts)


def _redact(text: str, token: Optional[str]) -> str:
    return text.replace(token, '***') if token else text


def _default_commit_message(folder: Path) -> str:
    meta = _read_json(folder / METADATA_FILE)
    return f"Upload {meta['model']} trained with Tf-KD ({meta['tfkd']['mode']}) via timm-tfkd {__version__}"


def _upload(
        folder: Path,
        repo_id: str,
        private: bool,
        revision: Optional[str],
        commit_message: Optional[str],
        token: Optional[str],
        api: Optional[Any],
        retry_command: str,
) -> str:
    """Create the repo (and branch) and upload the folder in one commit; wrap every failure with the retry."""
    token = token or get_token()
    if token is None:
        _logger.warning('No Hugging Face token found (set HF_TOKEN or run `hf auth login`); the Hub may refuse '
                        'the upload')
    api = api if api is not None else HfApi(library_name='timm-tfkd', library_version=__version__)
    message = commit_message or _default_commit_message(folder)
    _logger.info('Uploading %s to https://huggingface.co/%s%s', folder, repo_id, f'@{revision}' if revision else '')
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, token=token)
        if revision:
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, token=token)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=message, token=token)
    except Exception as e:  # network, auth, permission, quota: all leave the export for a retry
        detail = _redact(' '.join(f'{type(e).__name__}: {e}'.split()), token)
        raise HubUploadError(
            f"upload of '{folder}' to {repo_id} failed ({detail}); the export is kept on disk. "
            f"Retry with:\n  {retry_command}",
            folder=folder, repo_id=repo_id, retry_command=retry_command) from None
    url = getattr(commit, 'commit_url', None) or str(commit)
    _logger.info('Uploaded to %s', url)
    return url


def push_to_hub(
        folder: PathLike,
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        api: Optional[Any] = None,
) -> str:
    """Upload an export folder to a Hub model repo, creating the repo (and the revision branch) if needed.

    Args:
        folder: A folder written by :func:`export_run`.
        repo_id: ``org/name``.
        private: Create the repo as private (an existing repo keeps its visibility).
        revision: Branch to commit to (created from main when missing); main when None.
        commit_message: Defaults to a message naming the model and Tf-KD mode.
        token: Hub token; defaults to HF_TOKEN, then the stored Hugging Face login. Never logged or written.
        api: An ``HfApi``-like object; a new ``HfApi`` when None.

    Returns:
        The commit URL.

    Raises:
        InvalidRepoIdError: ``repo_id`` is not ``org/name``.
        ExportError: ``folder`` is not a complete export.
        HubUploadError: The Hub call failed; the message holds the command that retries it.
    """
    folder = Path(folder)
    validate_model_id(repo_id)
    _check_export_folder(folder)
    retry = _retry_command(folder, repo_id, private, revision, commit_message)
    return _upload(folder, repo_id, private, revision, commit_message, token, api, retry)


def push_run(
        run_dir: PathLike,
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        export_dir: Optional[PathLike] = None,
        checkpoint: PathLike = 'best',
        use_ema: Optional[bool] = None,
        api: Optional[Any] = None,
) -> str:
    """Export a training run (to ``run_dir/hub_export`` unless ``export_dir`` is given) and upload it.

    Args:
        run_dir: The training output folder.
        repo_id: ``org/name``.
        private: See :func:`push_to_hub`.
        revision: See :func:`push_to_hub`.
        commit_message: See :func:`push_to_hub`.
        token: See :func:`push_to_hub`.
        export_dir: Where to export.
        checkpoint: See :func:`export_run`.
        use_ema: See :func:`export_run`.
        api: See :func:`push_to_hub`.

    Returns:
        The commit URL.

    Raises:
        HubUploadError: The upload failed; the export stays on disk and the message holds the retry command.
    """
    run_dir = Path(run_dir)
    validate_model_id(repo_id)
    default_dir = run_dir / DEFAULT_EXPORT_SUBDIR
    folder = Path(export_dir) if export_dir is not None else default_dir
    folder = export_run(run_dir, folder, checkpoint=checkpoint, use_ema=use_ema, repo_id=repo_id)
    custom_dir = folder if folder.absolute() != default_dir.absolute() else None
    retry = _retry_command(run_dir, repo_id, private, revision, commit_message, custom_dir)
    return _upload(folder, repo_id, private, revision, commit_message, token, api, retry)


# ---------------------------------------------------------------------------------------------------------------
# Trainer integration


def add_hub_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Register the "Hub publishing" group on a trainer parser.

    Args:
        parser: The trainer's parser.

    Returns:
        The argument group.
    """
    group = parser.add_argument_group('Hub publishing')
    group.add_argument(
        '--push-to-hub', action='store_true',
        help='After training, export the run and upload it to the Hugging Face Hub (needs --hub-model-id). '
             'The token comes from HF_TOKEN or `hf auth login`, never from the command line.')
    group.add_argument(
        '--hub-model-id', default=None, metavar='ORG/NAME',
        help='Hub model repo to upload to, created if missing.')
    group.add_argument(
        '--hub-private', action='store_true',
        help='Create the Hub repo as private.')
    group.add_argument(
        '--hub-revision', default=None, metavar='REV',
        help='Branch of the Hub repo to commit to (created if missing). Default: main.')
    group.add_argument(
        '--export-dir', default=None, metavar='DIR',
        help='Export a Hub-ready folder here at the end of training. With --push-to-hub and no --export-dir, '
             f'the export goes to OUTPUT/{DEFAULT_EXPORT_SUBDIR}.')
    return group


def check_hub_args(args: argparse.Namespace) -> None:
    """Fail before training starts when the Hub arguments cannot work.

    Raises:
        ValueError: --push-to-hub without --hub-model-id, or an id that is not ``org/name`` (one-line message).
    """
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError('--push-to-hub needs --hub-model-id ORG/NAME')
    if args.hub_model_id:
        validate_model_id(args.hub_model_id)


def finish_run_for_hub(args: argparse.Namespace, run_dir: PathLike) -> Optional[int]:
    """Export and upload a finished run as the Hub arguments ask; call on rank 0 after the last epoch.

    Failures never lose results: the run folder and any export stay on disk, and the reason (with the command
    that retries an upload) goes to stderr.

    Args:
        args: Parsed trainer arguments with the :func:`add_hub_args` group.
        run_dir: The training output folder.

    Returns:
        None when everything asked for succeeded (or nothing was asked), 1 when the upload failed, 2 when the
        export failed.
    """
    if not args.push_to_hub and args.export_dir is None:
        return None
    run_dir = Path(run_dir)
    export_dir = Path(args.export_dir) if args.export_dir is not None else run_dir / DEFAULT_EXPORT_SUBDIR
    try:
        if args.push_to_hub:
            push_run(run_dir, args.hub_model_id, private=args.hub_private, revision=args.hub_revision,
                     export_dir=export_dir)
        else:
            export_run(run_dir, export_dir)
    except HubUploadError as e:
        print(f'{CLI_NAME}: error: {e}', file=sys.stderr)
        return 1
    except (ExportError, CheckpointError, InvalidRepoIdError) as e:
        print(f'{CLI_NAME}: error: export of {run_dir} failed: {e}', file=sys.stderr)
        return 2
    return None


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _split_pretrained_name(name: str) -> Tuple[str, str]:
    source, sep, location = name.partition(':')
    if sep and source in ('hf-hub', 'local-dir') and location:
        return source, location
    if os.path.isdir(name):
        return 'local-dir', name
    raise ValueError(f"'{name}' is not 'hf-hub:org/name', 'local-dir:/path' or an existing folder")


def _hub_metadata(hub_id: str) -> Optional[Dict[str, Any]]:
    repo_id, revision = hf_split(hub_id)
    try:
        path = hf_hub_download(repo_id, METADATA_FILE, revision=revision,
                               library_name='timm-tfkd', library_version=__version__)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    return _read_json(Path(path))


def _local_metadata(folder: str) -> Optional[Dict[str, Any]]:
    path = Path(folder) / METADATA_FILE
    return _read_json(path) if path.is_file() else None


def load_pretrained(name: str, **create_model_kwargs: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a published model with its weights, and read its Tf-KD metadata.

    Args:
        name: 'hf-hub:org/name[@revision]', 'local-dir:/path' or a folder path. Hub files come from the
            local cache when HF_HUB_OFFLINE=1.
        **create_model_kwargs: Passed to ``timm.create_model`` (pretrained is always True).

    Returns:
        The model, and the parsed tfkd.json (empty, with a warning, when the model has none).
    """
    source, location = _split_pretrained_name(name)
    model = timm.create_model(f'{source}:{location}', pretrained=True, **create_model_kwargs)
    meta = _hub_metadata(location) if source == 'hf-hub' else _local_metadata(location)
    if meta is None:
        _logger.warning("No %s for '%s': not a timm-tfkd export, returning empty Tf-KD metadata",
                        METADATA_FILE, name)
        meta = {}
    return model, meta
