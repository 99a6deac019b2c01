"""The model card (``README.md``) and training curves of an export."""
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from ..methods import Method, get_method
from ..models import registered_here
from ..run_folder import MULTILABEL_TASK, RunRecord, headline_metric, metric_names
from .files import CONFIG_FILE, CURVES_FILE, METADATA_FILE, WEIGHTS_FILE

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


def plot_curves(summary: List[Dict[str, Optional[float]]], path: Path, task: Optional[str] = None) -> None:
    """Loss and top-1 (multi-label: mAP) per epoch, side by side."""
    # matplotlib is only needed here; its Figure API avoids pyplot's process-wide backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, top1_ax = fig.subplots(1, 2)
    panels = (
        # With an EMA, eval_* are its metrics and eval_model_* the model's (eval_ema_*: runs of timm-tfkd 0.1).
        (loss_ax, 'Loss', ('train_loss', 'train_task_loss', 'train_kd_loss', 'eval_loss', 'eval_model_loss',
                           'eval_ema_loss')),
        (top1_ax, 'mAP (%)' if task == MULTILABEL_TASK else 'Top-1 accuracy (%)',
         tuple(f'eval_{prefix}{headline_metric(task)}' for prefix in ('', 'model_', 'ema_'))),
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


PERCENT_METRICS = ('top1', 'top5', 'map', 'micro_f1', 'macro_f1', 'sample_f1')
METRIC_HEADERS = {'top1': 'Top-1', 'top5': 'Top-5', 'nll': 'NLL', 'ece': 'ECE', 'map': 'mAP', 'micro_f1': 'F1 micro',
                  'macro_f1': 'F1 macro', 'sample_f1': 'F1 sample', 'loss': 'BCE loss'}


def _format_metric(metrics: Dict[str, float], name: str) -> str:
    value = metrics.get(name)
    if value is None:
        return '–'
    return f'{value:.2f}' if name in PERCENT_METRICS else f'{value:.4f}'


def _metrics_row(label: str, epoch: Optional[int], metrics: Optional[Dict[str, float]],
                 task: Optional[str]) -> Optional[str]:
    if not metrics:
        return None
    cells = [label, '–' if epoch is None else str(epoch)] + [_format_metric(metrics, n) for n in metric_names(task)]
    return '| ' + ' | '.join(cells) + ' |'


def _table(header: Tuple[str, str], rows: List[Tuple[str, Any]]) -> List[str]:
    return [f'| {header[0]} | {header[1]} |', '|---|---|'] + [f'| {k} | {_format_value(v)} |' for k, v in rows]


def _method(mode: str) -> Optional[Method]:
    """The registered method of an export, or None for one this version does not know."""
    try:
        return get_method(mode)
    except ValueError:
        return None


def _card_front_matter(meta: Dict[str, Any], license_id: str) -> str:
    tags = ['timm', 'timm-tfkd', 'image-classification', 'knowledge-distillation']
    method = _method(meta['tfkd']['mode'])
    if method is None or not method.uses_timm_criterion:
        tags.append(f"tfkd-{meta['tfkd']['mode']}")
    front = {'library_name': 'timm', 'license': license_id, 'pipeline_tag': 'image-classification', 'tags': tags}
    return '---\n' + yaml.safe_dump(front, sort_keys=False) + '---\n'


def _card_intro(meta: Dict[str, Any], record: RunRecord, repo_id: Optional[str]) -> List[str]:
    title = repo_id.split('/')[-1] if repo_id else f"{meta['model']} trained with Tf-KD ({meta['tfkd']['mode']})"
    size = record.data_config.get('input_size') or []
    shape = f"{meta['in_chans']} input channel{'s' if meta['in_chans'] != 1 else ''}"
    if len(size) == 3:
        shape += f', {size[1]}x{size[2]} pixels'
    dataset = meta.get('dataset') or 'a local image folder'
    return [
        f'# {title}', '',
        f"A `{meta['model']}` image classifier ({meta['num_classes']} classes, {shape}) trained on `{dataset}` "
        f"with Teacher-free Knowledge Distillation ([Yuan et al., CVPR 2020](https://arxiv.org/abs/1909.11723)) "
        f"using timm-tfkd, a plugin for [timm](https://github.com/huggingface/pytorch-image-models). " + (
            f"The architecture `{meta['model']}` is registered by timm-tfkd: `pip install timm-tfkd` and "
            f"`import timm_tfkd` before `timm.create_model`, which otherwise fails with "
            f"\"Unknown model ({meta['model']})\"." if registered_here(meta['model'])
            else 'The weights load with plain timm: no plugin code is needed.'),
    ]

def _tfkd_rows(tfkd: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    """The method's rows: its name and description, the settings it reads, smoothing and teacher."""
    mode, method = tfkd['mode'], _method(tfkd['mode'])
    if method is not None:
        rows = [('Mode', f"`{mode}` ({method.description})")] + method.card_rows(tfkd)
    else:  # exported by a version that knew a method this one does not
        rows = [('Mode', f'`{mode}`')] + [(key, value) for key, value in tfkd.items()
                                          if key not in ('mode', 'smoothing', 'teacher')]
    rows.append(('Label smoothing', tfkd.get('smoothing')))
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
    trained, planned = meta.get('epochs_trained'), meta.get('epochs')
    if meta.get('finished'):
        length = f'Trained for all {planned} epochs of its schedule'
    else:
        length = (f'Trained for {trained} of the {planned} epochs of its schedule: the run did not finish (it was '
                  f'stopped, or was still training when exported)')
    return [
        '## Training', '',
        f"{length}, on the `{meta.get('train_split')}` split, seed {meta.get('seed')}, "
        f"with timm {versions.get('timm', '?')}, timm-tfkd {versions.get('timm_tfkd', '?')} "
        f"and torch {versions.get('torch', '?')}.", '',
        '### Tf-KD settings', '',
        *_table(('Setting', 'Value'), _tfkd_rows(meta['tfkd'])), '',
        '### Recipe', '',
        *_table(('Argument', 'Value'), _recipe_rows(args)),
    ]


def _card_metrics_section(meta: Dict[str, Any], final_epoch: Optional[int]) -> List[str]:
    export, task = meta['export'], meta.get('task')
    exported = f"exported ({export['checkpoint']}, {'EMA' if export['ema'] else 'model'} weights)"
    rows = [
        _metrics_row(exported, export['epoch'], export['metrics'], task),
        _metrics_row('final epoch, model', final_epoch, meta.get('final_metrics'), task),
        _metrics_row('final epoch, EMA', final_epoch, meta.get('final_ema_metrics'), task),
    ]
    split = meta.get('eval_split') or 'evaluation'
    dataset = meta.get('dataset') or 'the training dataset'
    if task == MULTILABEL_TASK:
        what = ("multi-label (independent sigmoid per class): mean average precision (mAP) and micro, macro and "
                "per-sample F1 at the training's --multilabel-threshold in %, binary cross-entropy (BCE) loss.")
    else:
        what = ('top-1 and top-5 accuracy in %, negative log-likelihood (NLL) in nats, expected calibration error '
                '(ECE).')
    names = metric_names(task)
    return [
        '## Metrics', '',
        f'On the `{split}` split of `{dataset}`: {what}', '',
        '| Weights | Epoch | ' + ' | '.join(METRIC_HEADERS[n] for n in names) + ' |',
        '|---|---|' + '---|' * len(names),
        *[row for row in rows if row],
    ]


def _card_usage_section(meta: Dict[str, Any], repo_id: Optional[str]) -> List[str]:
    repo = repo_id or 'ORG/NAME'
    image_mode = 'L' if meta['in_chans'] == 1 else 'RGB'
    plugin = registered_here(meta['model'])
    return [
        '## Usage', '',
        f"With timm{' and the timm-tfkd architectures' if plugin else ' alone'}:", '',
        '```python',
        'import timm',
        'import torch',
        'from PIL import Image',
        *([f"import timm_tfkd  # registers {meta['model']} with timm"] if plugin else []),
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

def model_card(record: RunRecord, args: Mapping[str, Any], meta: Dict[str, Any], license_id: str,
               repo_id: Optional[str], final_epoch: int) -> str:
    """The card of an export: front matter, what was trained and how, metrics, curves, usage, files, citation.

    Args:
        record: The run's record.
        args: The run's ``args.yaml`` (for the recipe table; fields that may hold local paths are never shown).
        meta: The export's ``tfkd.json``.
        license_id: The license of the weights.
        repo_id: The Hub id the usage snippet names; a placeholder when None.
        final_epoch: The last epoch of the run's summary.
    """
    sections = [
        _card_intro(meta, record, repo_id),
        _card_training_section(meta, args),
        _card_metrics_section(meta, final_epoch),
        ['## Training curves', '', f'![Loss and top-1 accuracy per epoch]({CURVES_FILE})'],
        _card_usage_section(meta, repo_id),
        _card_files_section(meta),
        ['## Citation', '', '```bibtex', PAPER_BIBTEX, '```'],
    ]
    return _card_front_matter(meta, license_id) + '\n' + '\n\n'.join('\n'.join(s) for s in sections) + '\n'
