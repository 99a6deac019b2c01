"""The study's report: per-run rows, mean and sample standard deviation per mode, as Markdown, CSV and a plot."""
import csv
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .plan import TEACHER_DESCRIPTIONS, Study, StudyConfig, run_name
from .runs import read_result

METRICS = ('test_top1', 'test_nll', 'test_ece', 'val_top1', 'wall_seconds')
METRIC_LABELS = {'test_top1': 'test top-1 (%)', 'test_nll': 'test NLL', 'test_ece': 'test ECE (%)',
                 'val_top1': 'val top-1 (%)', 'wall_seconds': 'wall time / run (s)'}
METRIC_DECIMALS = {'test_top1': 2, 'test_nll': 4, 'test_ece': 2, 'val_top1': 2, 'wall_seconds': 0}


def _run_row(result: Dict[str, Any]) -> Dict[str, Any]:
    teacher = result.get('teacher') or {}
    return {
        'mode': result['mode'], 'seed': result['seed'], 'run': result['run'],
        'test_top1': result['test']['top1'], 'test_top5': result['test']['top5'],
        'test_nll': result['test']['nll'], 'test_ece': result['test']['ece'],
        'val_top1': result['val_top1'], 'wall_seconds': result['wall_seconds'],
        'teacher_run': teacher.get('run'), 'teacher_checkpoint': teacher.get('checkpoint'),
        'teacher_test_top1': teacher.get('test_top1'),
    }


def collect_rows(modes: Sequence[str], seeds: Sequence[int], study: Study) -> List[Dict[str, Any]]:
    """One row per finished student run of the requested modes and seeds."""
    rows = []
    for mode in modes:
        for seed in seeds:
            result = read_result(study.run_dir(run_name(mode, seed)))
            if result is not None:
                rows.append(_run_row(result))
    return rows


def mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (None below two values)."""
    return {'mean': statistics.fmean(values) if values else None,
            'std': statistics.stdev(values) if len(values) > 1 else None}


def summarize(rows: List[Dict[str, Any]], modes: Sequence[str], config: StudyConfig
              ) -> List[Dict[str, Any]]:
    """Per mode: n and mean / sample std of every metric over its seeds."""
    table = []
    for mode in modes:
        runs = [row for row in rows if row['mode'] == mode]
        entry: Dict[str, Any] = {'mode': mode, 'n': len(runs)}
        for metric in METRICS + ('teacher_test_top1',):
            stats = mean_std([row[metric] for row in runs if row[metric] is not None])
            entry[f'{metric}_mean'], entry[f'{metric}_std'] = stats['mean'], stats['std']
        entry['flags'] = config.modes[mode]['flags']
        table.append(entry)
    return table


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    with path.open('w', newline='') as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _cell(entry: Dict[str, Any], metric: str) -> str:
    mean, std = entry[f'{metric}_mean'], entry[f'{metric}_std']
    if mean is None:
        return '—'
    decimals = METRIC_DECIMALS.get(metric, 2)
    return f'{mean:.{decimals}f}' + ('' if std is None else f' ± {std:.{decimals}f}')


def machine_description(device: Optional[str]) -> str:
    """CPU model and cores, and the GPU when the study runs on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    text = f'{cpu}, {os.cpu_count()} logical cores'
    on_cuda = (device or 'cuda').startswith('cuda') and torch.cuda.is_available()
    if on_cuda:
        text += f'; GPU: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()} visible)'
    return text + ('' if on_cuda else '; device: cpu')


def _markdown_table(table: List[Dict[str, Any]]) -> List[str]:
    header = ['mode', 'n'] + [METRIC_LABELS[m] for m in METRICS]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for entry in table:
        lines.append('| ' + ' | '.join([entry['mode'], str(entry['n'])] + [_cell(entry, m) for m in METRICS]) + ' |')
    return lines


def _selection_line(table: List[Dict[str, Any]]) -> str:
    scored = [entry for entry in table if entry['val_top1_mean'] is not None]
    if not scored:
        return 'No finished runs yet.'
    best = max(scored, key=lambda entry: entry['val_top1_mean'])
    return (f"Chosen on validation top-1: **{best['mode']}** ({_cell(best, 'val_top1')}); its test top-1 "
            f"{_cell(best, 'test_top1')} is reported, not used for the choice.")


def _teacher_lines(table: List[Dict[str, Any]], config: StudyConfig) -> List[str]:
    lines = []
    for entry in table:
        kind = config.modes[entry['mode']].get('teacher')
        if kind and entry['teacher_test_top1_mean'] is not None:
            description = TEACHER_DESCRIPTIONS[kind].format(teachers=config.teachers_mode)
            lines.append(f"- {entry['mode']}: {description}; its test top-1 "
                         f"{_cell(entry, 'teacher_test_top1')} %")
    return lines


def write_markdown(path: Path, table: List[Dict[str, Any]], settings: Dict[str, str],
                   config: StudyConfig, failures: Dict[str, str]) -> None:
    """``results.md``: the table, how it was made, and what failed."""
    lines = ['# Tf-KD study', '']
    lines += [f'- **{key}**: {value}' for key, value in settings.items()]
    lines += ['', *_markdown_table(table), '', _selection_line(table), '',
              'Mean ± sample standard deviation over the n seeds of each mode. Test metrics are those of the final '
              'epoch (`last.pth.tar`) on the `test` split, scored once after training; the validation top-1 is the '
              "final epoch's on the `validation` split carved from the training data, the only split on which "
              'settings may be compared. Wall time is the training subprocess of the run (all attempts), teachers '
              'excluded.', '']
    teachers = _teacher_lines(table, config)
    if teachers:
        lines += ['## Teachers', '', *teachers, '']
    lines += ['## Modes', '', *[f"- `{e['mode']}`: `{e['flags']}`" for e in table], '']
    if failures:
        lines += ['## Failed runs', '', *[f'- {message}' for message in failures.values()], '']
    path.write_text('\n'.join(lines))


def plot(path: Path, table: List[Dict[str, Any]]) -> None:
    """``results.png``: test top-1 and test ECE per mode, mean ± sample std."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    shown = [entry for entry in table if entry['n']]
    names = [entry['mode'] for entry in shown]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(shown) + 2), 4))
    for ax, metric in zip(axes, ('test_top1', 'test_ece')):
        means = [entry[f'{metric}_mean'] for entry in shown]
        stds = [entry[f'{metric}_std'] or 0.0 for entry in shown]
        ax.bar(names, means, yerr=stds, capsize=4, color='tab:blue' if metric == 'test_top1' else 'tab:orange')
        ax.set_title(f"{METRIC_LABELS[metric]}, final epoch, mean ± std (n = {', '.join(str(e['n']) for e in shown)})",
                     fontsize=9)
        if metric == 'test_top1' and means:
            # Differences of tenths of a percent vanish on a 0-100 axis: zoom, and say so.
            low = min(m - s for m, s in zip(means, stds))
            high = max(m + s for m, s in zip(means, stds))
            margin = max(0.5, (high - low) * 0.5)
            ax.set_ylim(max(0.0, low - margin), min(100.0, high + margin))
            ax.set_ylabel('top-1 (%), axis does not start at 0')
        ax.tick_params(axis='x', rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(study: Study, table: List[Dict[str, Any]], rows: List[Dict[str, Any]],
                  settings: Dict[str, str], config: StudyConfig, failures: Dict[str, str]) -> None:
    """``results.md``, ``results.csv`` (per mode), ``runs.csv`` (per run) and ``results.png`` in ``--out``."""
    write_markdown(study.out / 'results.md', table, settings, config, failures)
    _write_csv(study.out / 'results.csv', table)
    _write_csv(study.out / 'runs.csv', rows)
    plot(study.out / 'results.png', table)
