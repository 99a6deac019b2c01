#!/usr/bin/env python3
"""A seeded Tf-KD study: every mode x seed trained with ``train_tfkd.py``, the final epoch scored on a held-out test.

    timm-tfkd fashion-mnist data/fashion-mnist-20k --train-size 20000
    python examples/study.py --data-dir data/fashion-mnist-20k --out output/study-fmnist --model resnet18 \\
        --modes ce ls reg-paper reg-official self de-kd --seeds 0 1 2 --epochs 10 --eval-workers 2 \\
        --extra="--num-classes 10 --in-chans 1 --img-size 28 --mean 0.286 --std 0.353 --crop-pct 1 \\
                 --scale 0.75 1 --ratio 0.9 1.1 --color-jitter 0 --train-interpolation bilinear \\
                 --interpolation bilinear -b 128 --lr 0.1 --weight-decay 5e-4 --sched cosine --sched-on-updates \\
                 --warmup-epochs 1 --channels-last --tfkd-teacher-channels-last -j 2 \\
                 --model-kwargs channels=(24,48,96,192) stem_width=24"

The data folder needs ``train``, ``validation`` (carved from the training data) and ``test`` splits, as
``timm-tfkd fashion-mnist OUT`` writes them. Runs validate on ``validation``, where any hyper-parameter choice must
be made; ``test`` is only scored once per run, on the final epoch (``last.pth.tar``), never on a best epoch.

Teachers are runs of the study too, trained before the first student that needs them:

- ``self`` (Tf-KD-self): the ``ce`` run of the same seed (the same architecture trained with plain cross-entropy),
  its final epoch. The reference code also trains teacher and student with one seed (230).
- ``de-kd`` (defective KD): the same ``ce`` run after its first epoch (``milestone-1.pth.tar``, kept by
  ``--save-epochs 1``), i.e. a teacher stopped after one epoch of the full schedule, as the paper's.
- ``re-kd`` (reversed KD): ``--weak-model`` trained with plain cross-entropy, final epoch.

Rerunning the same command skips finished runs (``summary.csv`` complete and ``study_result.json`` written),
resumes unfinished ones with ``--resume auto`` and rewrites ``results.md``, ``results.csv``, ``runs.csv`` and
``results.png`` in ``--out``. A failed run is reported with its log file; the others go on; the exit status is 1.
A run still training after ``--run-timeout`` seconds is stopped and counts as failed.
"""
import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import yaml

import timm_tfkd
from timm_tfkd.evaluate import EvaluationError, evaluate_run
from timm_tfkd.errors import UsageError
from timm_tfkd.train.config import parse_args
from timm_tfkd.train.policy import check_supported

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / 'train_tfkd.py'

# The study config: each mode's trainer flags and the teacher it needs. The Tf-KD hyper-parameters are the
# reference code's ResNet-18 rows (TFKD_FACTS section 2) set for 10 classes; change them with --config FILE.yaml
# (same layout) and compare candidates on the validation column, never on test.
STUDY_CONFIG: Dict[str, Dict[str, str]] = {
    'ce': {'flags': '--tfkd-mode none --smoothing 0'},
    # The reference convention: target 0.9 on the true class, 0.1 spread over the wrong ones.
    'ls': {'flags': '--tfkd-mode lsr --smoothing 0.1 --tfkd-smoothing-convention reference'},
    'reg-paper': {'flags': '--tfkd-mode reg --tfkd-formula paper --tfkd-alpha 0.1 --tfkd-temperature 20 '
                           '--tfkd-correct-prob 0.99'},
    # m = K: the reference ResNet-18 multiplier is 100 for K = 100; m = 10 keeps its label smoothing equivalent
    # (epsilon 0.10, loss scale 1.0) for 10 classes, so this row should land on top of 'ls'.
    'reg-official': {'flags': '--tfkd-mode reg --tfkd-formula official --tfkd-alpha 0.1 --tfkd-temperature 20 '
                              '--tfkd-correct-prob 0.99 --tfkd-multiplier 10'},
    'self': {'flags': '--tfkd-mode self --tfkd-formula paper --tfkd-alpha 0.95 --tfkd-temperature 6',
             'teacher': 'self'},
    # Normal-KD settings of the reference code for ResNet students.
    'de-kd': {'flags': '--tfkd-mode kd --tfkd-formula paper --tfkd-alpha 0.6 --tfkd-temperature 20',
              'teacher': 'defective'},
    're-kd': {'flags': '--tfkd-mode kd --tfkd-formula paper --tfkd-alpha 0.6 --tfkd-temperature 20',
              'teacher': 'weak'},
}
TEACHER_KINDS = ('self', 'defective', 'weak')
TEACHER_DESCRIPTIONS = {
    'self': 'the ce run of the same seed, final epoch',
    'defective': 'the ce run of the same seed after its first epoch',
    'weak': 'the --weak-model trained with the ce flags, final epoch',
}
# The self and defective teachers are checkpoints of this mode's runs.
TEACHER_MODE = 'ce'
DEFECTIVE_EPOCHS = 1
DEFAULT_MODES = ('ce', 'ls', 'reg-paper', 'reg-official', 'self', 'de-kd')
# Flags the study sets for every run; in --extra or a mode's flags they would silently break the design.
STUDY_FLAGS = ('--data-dir', '--model', '--epochs', '--seed', '--output', '--experiment', '--train-split',
               '--val-split', '--resume', '--device', '--tfkd-teacher-checkpoint', '--tfkd-teacher-model')
SPLITS = ('train', 'validation', 'test')
RESULT_FILE = 'study_result.json'
METRICS = ('test_top1', 'test_nll', 'test_ece', 'val_top1', 'wall_seconds')
METRIC_LABELS = {'test_top1': 'test top-1 (%)', 'test_nll': 'test NLL', 'test_ece': 'test ECE (%)',
                 'val_top1': 'val top-1 (%)', 'wall_seconds': 'wall time / run (s)'}
METRIC_DECIMALS = {'test_top1': 2, 'test_nll': 4, 'test_ece': 2, 'val_top1': 2, 'wall_seconds': 0}
# A trainer hung on a dead device or a deadlocked loader must not stall the study forever.
DEFAULT_RUN_TIMEOUT = 24 * 3600


class StudyError(ValueError):
    """The study cannot start as asked."""


class RunFailed(RuntimeError):
    """One run did not finish; the message names its log file."""


@dataclass(frozen=True)
class TeacherRef:
    """The teacher of a student run: a run of the study and the checkpoint file in its folder."""
    run: str
    checkpoint: str
    model: str


@dataclass(frozen=True)
class Run:
    """One trainer invocation of the study.

    Attributes:
        name: Folder name under ``OUT/runs`` and log name under ``OUT/logs``.
        mode: The study mode whose flags it uses.
        seed: Its seed.
        model: The timm architecture.
        epochs: Length of its schedule; ``summary.csv`` must reach it.
        flags: Trainer flags (extra flags, then the mode's), without the study's own.
        teacher: Where its teacher comes from, for ``self`` / ``kd`` modes.
    """
    name: str
    mode: str
    seed: int
    model: str
    epochs: int
    flags: Tuple[str, ...]
    teacher: Optional[TeacherRef] = None


@dataclass
class Study:
    """Where the study writes and what every run shares."""
    data_dir: str
    out: Path
    device: Optional[str]
    eval_workers: int
    run_timeout: Optional[float] = DEFAULT_RUN_TIMEOUT

    @property
    def runs_dir(self) -> Path:
        return self.out / 'runs'

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name

    def log_path(self, name: str) -> Path:
        return self.out / 'logs' / f'{name}.log'


# ---------------------------------------------------------------------------------------------------------------
# Planning


def load_config(path: Optional[str]) -> Dict[str, Dict[str, str]]:
    """:data:`STUDY_CONFIG` updated with a YAML file of the same layout (``mode: {flags: ..., teacher: ...}``)."""
    config = {name: dict(entry) for name, entry in STUDY_CONFIG.items()}
    if not path:
        return config
    with open(path, encoding='utf-8') as f:
        loaded = yaml.safe_load(f)
    if not isinstance(loaded, dict) or not all(isinstance(v, dict) and 'flags' in v for v in loaded.values()):
        raise StudyError(f"{path}: expected a mapping 'mode: {{flags: ..., teacher: ...}}'")
    config.update({str(name): {k: str(v) for k, v in entry.items() if v is not None}
                   for name, entry in loaded.items()})
    return config


def _check_config(config: Dict[str, Dict[str, str]], modes: Sequence[str], extra: List[str]) -> None:
    unknown = [mode for mode in modes if mode not in config]
    if unknown:
        raise StudyError(f"unknown mode(s) {', '.join(unknown)}; the config has {', '.join(config)}")
    if TEACHER_MODE not in config:
        raise StudyError(f"the config needs a '{TEACHER_MODE}' mode: the self and defective teachers are its runs")
    for mode in modes:
        teacher = config[mode].get('teacher')
        if teacher is not None and teacher not in TEACHER_KINDS:
            raise StudyError(f"mode {mode}: teacher must be one of {', '.join(TEACHER_KINDS)}, got '{teacher}'")
    for source, flags in [('--extra', extra)] + [(f'mode {m}', shlex.split(config[m]['flags'])) for m in modes]:
        clash = [flag for flag in flags if flag.split('=')[0] in STUDY_FLAGS]
        if clash:
            raise StudyError(f"{source} sets {', '.join(clash)}, which the study sets for every run")


def _run_name(mode: str, seed: int) -> str:
    return f'{mode}-s{seed}'


def _ce_run(seed: int, model: str, epochs: int, extra: List[str], config: Dict[str, Dict[str, str]]) -> Run:
    """The cross-entropy run of the seed: a reported mode and the self and defective teachers."""
    # The defective teacher is a snapshot of this very run after its first epoch.
    flags = extra + shlex.split(config[TEACHER_MODE]['flags']) + ['--save-epochs', str(DEFECTIVE_EPOCHS)]
    return Run(_run_name(TEACHER_MODE, seed), TEACHER_MODE, seed, model, epochs, tuple(flags))


def _weak_run(seed: int, weak_model: str, epochs: int, extra: List[str], config: Dict[str, Dict[str, str]]) -> Run:
    flags = extra + shlex.split(config[TEACHER_MODE]['flags'])
    return Run(_run_name(f'{TEACHER_MODE}-{weak_model}', seed), TEACHER_MODE, seed, weak_model, epochs, tuple(flags))


def _teacher(kind: str, seed: int, model: str, weak_model: str, epochs: int, extra: List[str],
             config: Dict[str, Dict[str, str]]) -> Tuple[Run, TeacherRef]:
    """The run a student with a ``kind`` teacher learns from, and which of its checkpoints."""
    if kind == 'weak':
        run = _weak_run(seed, weak_model, epochs, extra, config)
    else:
        run = _ce_run(seed, model, epochs, extra, config)
    checkpoint = f'milestone-{DEFECTIVE_EPOCHS}.pth.tar' if kind == 'defective' else 'last.pth.tar'
    return run, TeacherRef(run.name, checkpoint, run.model)


def plan_runs(modes: Sequence[str], seeds: Sequence[int], model: str, weak_model: str, epochs: int,
              extra: List[str], config: Dict[str, Dict[str, str]]) -> List[Run]:
    """Every run in the order it must train: seed by seed, each teacher just before its first student.

    Returns:
        Runs with unique names; a teacher that is also a reported mode (``ce``) appears once.
    """
    _check_config(config, modes, extra)
    plan: Dict[str, Run] = {}
    for seed in seeds:
        for mode in modes:
            kind = config[mode].get('teacher')
            teacher = None
            if kind is not None:
                teacher_run, teacher = _teacher(kind, seed, model, weak_model, epochs, extra, config)
                plan.setdefault(teacher_run.name, teacher_run)
            if mode == TEACHER_MODE:
                run = _ce_run(seed, model, epochs, extra, config)
            else:
                run = Run(_run_name(mode, seed), mode, seed, model, epochs,
                          tuple(extra + shlex.split(config[mode]['flags'])), teacher)
            plan.setdefault(run.name, run)
    return list(plan.values())


def trainer_argv(run: Run, study: Study) -> List[str]:
    """The trainer's flags for ``run``; the study's own come last so nothing in ``--extra`` overrides them."""
    argv = list(run.flags)
    if run.teacher is not None:
        argv += ['--tfkd-teacher-model', run.teacher.model,
                 '--tfkd-teacher-checkpoint', str(study.run_dir(run.teacher.run) / run.teacher.checkpoint)]
    argv += ['--data-dir', study.data_dir, '--train-split', 'train', '--val-split', 'validation',
             '--model', run.model, '--epochs', str(run.epochs), '--seed', str(run.seed),
             '--output', str(study.runs_dir), '--experiment', run.name]
    if study.device:
        argv += ['--device', study.device]
    return argv


def check_plan(plan: List[Run], study: Study) -> None:
    """Parse every run's command with the trainer's own parser now, not hours into the study.

    Also warns when the defective teacher's first epoch would be spent entirely in warmup.
    """
    for split in SPLITS:
        if not os.path.isdir(os.path.join(study.data_dir, split)):
            raise StudyError(f"--data-dir '{study.data_dir}' has no '{split}' split folder (needs "
                             f"{', '.join(SPLITS)}; see `timm-tfkd fashion-mnist`)")
    defective_sources = {r.teacher.run for r in plan if r.teacher and r.teacher.checkpoint.startswith('milestone-')}
    for run in plan:
        try:
            args = parse_args(trainer_argv(run, study)).args
            check_supported(args)
        except SystemExit:
            raise StudyError(f'the trainer refuses the flags of run {run.name} (its message is above)') from None
        except UsageError as e:
            raise StudyError(f'run {run.name}: {e}') from None
        if run.name in defective_sources:
            _warn_if_warmup_spans_first_epoch(args, run)


def _warn_if_warmup_spans_first_epoch(args: argparse.Namespace, run: Run) -> None:
    """timm steps a warmup per epoch unless --sched-on-updates: the first epoch then trains at --warmup-lr only."""
    if args.warmup_epochs >= DEFECTIVE_EPOCHS and not args.sched_on_updates:
        print(f'warning: the defective teacher is {run.name} after epoch {DEFECTIVE_EPOCHS}, which --warmup-epochs '
              f'{args.warmup_epochs} without --sched-on-updates trains at lr {args.warmup_lr:g} only: it is almost '
              f'the random initialisation. Add --sched-on-updates (warmup per iteration) or --warmup-epochs 0.',
              file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Running


def _summary_rows(run_dir: Path) -> List[Dict[str, str]]:
    path = run_dir / 'summary.csv'
    if not path.is_file():
        return []
    with path.open(newline='') as f:
        return [row for row in csv.DictReader(f) if row.get('epoch')]


def training_complete(run_dir: Path, epochs: int) -> bool:
    """Whether ``summary.csv`` reached the final epoch and its checkpoint is there."""
    rows = _summary_rows(run_dir)
    return bool(rows) and int(rows[-1]['epoch']) == epochs - 1 and (run_dir / 'last.pth.tar').is_file()


def is_finished(run: Run, study: Study) -> bool:
    """Trained to the end and scored: a rerun skips it."""
    run_dir = study.run_dir(run.name)
    return training_complete(run_dir, run.epochs) and (run_dir / RESULT_FILE).is_file()


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / 'last.pth.tar').is_file() or any(run_dir.glob('recovery-*.pth.tar'))


def _attempts_path(study: Study, name: str) -> Path:
    return study.out / 'logs' / f'{name}.attempts.json'


def _read_attempts(study: Study, name: str) -> List[Dict[str, Any]]:
    path = _attempts_path(study, name)
    return json.loads(path.read_text()) if path.is_file() else []


def _record_attempt(study: Study, name: str, attempt: Dict[str, Any]) -> None:
    path = _attempts_path(study, name)
    path.write_text(json.dumps(_read_attempts(study, name) + [attempt], indent=2) + '\n')


def train(run: Run, study: Study) -> None:
    """Train ``run`` to its last epoch in a ``train_tfkd.py`` subprocess, resuming what an earlier attempt left.

    Raises:
        RunFailed: The trainer exited non-zero or was stopped after ``study.run_timeout`` seconds.
    """
    run_dir, log_path = study.run_dir(run.name), study.log_path(run.name)
    argv = trainer_argv(run, study)
    resume = _has_checkpoint(run_dir)
    if resume:
        argv += ['--resume', 'auto']
    elif run_dir.exists():
        # A folder without a checkpoint holds no progress; the trainer would write beside it as '<name>-1'.
        shutil.rmtree(run_dir)
    command = [sys.executable, str(TRAIN_SCRIPT), *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open('a') as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}: "
                  f"{shlex.join(command)}\n")
        log.flush()
        start = time.perf_counter()
        try:
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=study.run_timeout or None).returncode
        except subprocess.TimeoutExpired:  # the trainer has been killed
            returncode = None
            log.write(f'\n=== stopped after {study.run_timeout:g} s (--run-timeout)\n')
    seconds = time.perf_counter() - start
    _record_attempt(study, run.name, {'seconds': round(seconds, 3), 'returncode': returncode, 'resumed': resume})
    if returncode is None:
        raise RunFailed(f'run {run.name} stopped after {study.run_timeout:g} s (--run-timeout); log: {log_path}')
    if returncode != 0 or not training_complete(run_dir, run.epochs):
        raise RunFailed(f'run {run.name} failed (exit status {returncode}); log: {log_path}')


def score(run: Run, study: Study) -> Dict[str, Any]:
    """Test metrics of the final epoch, the final validation top-1 and the teacher's test top-1 of a trained run."""
    run_dir = study.run_dir(run.name)
    evaluate = dict(data_dir=study.data_dir, split='test', device=study.device, workers=study.eval_workers)
    try:
        test = evaluate_run(str(run_dir), checkpoint='last', **evaluate)
        teacher = None
        if run.teacher is not None:
            teacher_dir = study.run_dir(run.teacher.run)
            teacher_test = evaluate_run(str(teacher_dir), checkpoint=run.teacher.checkpoint, **evaluate)
            teacher = {'run': run.teacher.run, 'checkpoint': run.teacher.checkpoint, 'test_top1': teacher_test['top1']}
    except EvaluationError as e:
        raise RunFailed(f'run {run.name} trained but cannot be evaluated: {e}') from None
    final = _summary_rows(run_dir)[-1]
    return {
        'run': run.name,
        'mode': run.mode,
        'seed': run.seed,
        'epoch': int(final['epoch']),
        'checkpoint': 'last.pth.tar',
        'test': test,
        'val_top1': float(final['eval_top1']),
        'wall_seconds': sum(a['seconds'] for a in _read_attempts(study, run.name)),
        'teacher': teacher,
        'command': trainer_argv(run, study),
    }


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(data, indent=2) + '\n')
    os.replace(tmp, path)


def _warn_if_changed(run: Run, study: Study) -> None:
    recorded = json.loads((study.run_dir(run.name) / RESULT_FILE).read_text()).get('command')
    if recorded != trainer_argv(run, study):
        print(f'  warning: {run.name} was trained with other flags; its result is reused (use a new --out to '
              f'retrain):\n    then: {shlex.join(recorded or [])}\n    now:  {shlex.join(trainer_argv(run, study))}')


def ensure_finished(run: Run, study: Study, index: int, total: int) -> None:
    """Train and score ``run`` unless an earlier invocation already did."""
    prefix = f'[{index}/{total}] {run.name}'
    if is_finished(run, study):
        print(f'{prefix}: finished earlier, skipped')
        _warn_if_changed(run, study)
        return
    if training_complete(study.run_dir(run.name), run.epochs):
        print(f'{prefix}: trained earlier, scoring')
    else:
        print(f'{prefix}: training (log: {study.log_path(run.name)})', flush=True)
        train(run, study)
    result = score(run, study)
    _write_json(study.run_dir(run.name) / RESULT_FILE, result)
    print(f"{prefix}: test top-1 {result['test']['top1']:.2f}%, val top-1 {result['val_top1']:.2f}%, "
          f"{result['wall_seconds']:.0f} s", flush=True)


def run_all(plan: List[Run], study: Study) -> Dict[str, str]:
    """Run the plan in order, going on past failures; a student whose teacher failed is not started.

    Returns:
        Failure message by run name.
    """
    failures: Dict[str, str] = {}
    for index, run in enumerate(plan, 1):
        if run.teacher is not None and run.teacher.run in failures:
            failures[run.name] = f'run {run.name} not started: its teacher {run.teacher.run} failed'
            print(f'[{index}/{len(plan)}] {run.name}: skipped, teacher {run.teacher.run} failed')
            continue
        try:
            ensure_finished(run, study, index, len(plan))
        except RunFailed as e:
            failures[run.name] = str(e)
            print(f'[{index}/{len(plan)}] {e}', flush=True)
    return failures


# ---------------------------------------------------------------------------------------------------------------
# Reporting


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
            path = study.run_dir(_run_name(mode, seed)) / RESULT_FILE
            if path.is_file():
                rows.append(_run_row(json.loads(path.read_text())))
    return rows


def mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (None below two values)."""
    return {'mean': statistics.fmean(values) if values else None,
            'std': statistics.stdev(values) if len(values) > 1 else None}


def summarize(rows: List[Dict[str, Any]], modes: Sequence[str], config: Dict[str, Dict[str, str]]
              ) -> List[Dict[str, Any]]:
    """Per mode: n and mean / sample std of every metric over its seeds."""
    table = []
    for mode in modes:
        runs = [row for row in rows if row['mode'] == mode]
        entry: Dict[str, Any] = {'mode': mode, 'n': len(runs)}
        for metric in METRICS + ('teacher_test_top1',):
            stats = mean_std([row[metric] for row in runs if row[metric] is not None])
            entry[f'{metric}_mean'], entry[f'{metric}_std'] = stats['mean'], stats['std']
        entry['flags'] = config[mode]['flags']
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


def _teacher_lines(table: List[Dict[str, Any]], config: Dict[str, Dict[str, str]]) -> List[str]:
    lines = []
    for entry in table:
        kind = config[entry['mode']].get('teacher')
        if kind and entry['teacher_test_top1_mean'] is not None:
            lines.append(f"- {entry['mode']}: {TEACHER_DESCRIPTIONS[kind]}; its test top-1 "
                         f"{_cell(entry, 'teacher_test_top1')} %")
    return lines


def write_markdown(path: Path, table: List[Dict[str, Any]], settings: Dict[str, str],
                   config: Dict[str, Dict[str, str]], failures: Dict[str, str]) -> None:
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
                  settings: Dict[str, str], config: Dict[str, Dict[str, str]], failures: Dict[str, str]) -> None:
    """``results.md``, ``results.csv`` (per mode), ``runs.csv`` (per run) and ``results.png`` in ``--out``."""
    write_markdown(study.out / 'results.md', table, settings, config, failures)
    _write_csv(study.out / 'results.csv', table)
    _write_csv(study.out / 'runs.csv', rows)
    plot(study.out / 'results.png', table)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def create_parser() -> argparse.ArgumentParser:
    """The study's command line."""
    parser = argparse.ArgumentParser(
        description='Train every Tf-KD mode x seed with train_tfkd.py, score the final epoch on the test split, '
                    'and tabulate mean ± std per mode.')
    parser.add_argument('--data-dir', required=True, help='Folder with train / validation / test split folders.')
    parser.add_argument('--out', required=True, help='Study folder: runs/, logs/, results.*; rerun to resume.')
    parser.add_argument('--model', default='resnet18', help='Student (and self / defective teacher) architecture.')
    parser.add_argument('--weak-model', default='resnet10t',
                        help='Re-KD teacher architecture, weaker than --model (--extra applies to it too).')
    parser.add_argument('--modes', nargs='+', default=list(DEFAULT_MODES),
                        help=f"Modes of the study config. Default: {' '.join(DEFAULT_MODES)}.")
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2], help='Default: 0 1 2.')
    parser.add_argument('--epochs', type=int, default=10, help='Epochs of every run. Default: 10.')
    parser.add_argument('--extra', default='',
                        help='Extra trainer flags for every run, as one string: --extra="--img-size 28 -b 128".')
    parser.add_argument('--config', default=None, help='YAML overriding or adding modes: mode: {flags: "...", '
                                                       f"teacher: {'|'.join(TEACHER_KINDS)}}}.")
    parser.add_argument('--device', default=None, help="Trainer and evaluation device. Default: the trainer's "
                                                       '(cuda when available, else cpu).')
    parser.add_argument('--report-only', action='store_true',
                        help='Train nothing: write the tables from the runs finished so far (n per mode says how many).')
    parser.add_argument('--eval-workers', type=int, default=0, help='Loader processes for test scoring.')
    parser.add_argument('--run-timeout', type=float, default=DEFAULT_RUN_TIMEOUT, metavar='SECONDS',
                        help='Stop a trainer subprocess after this long and count its run as failed (a rerun '
                             f'resumes it); 0: no limit. Default: {DEFAULT_RUN_TIMEOUT} (24 h).')
    return parser


def _settings(options: argparse.Namespace, argv: Sequence[str]) -> Dict[str, str]:
    return {
        'Command': f'`{shlex.join([sys.executable, os.path.relpath(__file__), *argv])}` (in `{os.getcwd()}`)',
        'Versions': f'torch {torch.__version__}, timm {timm.__version__}, timm_tfkd {timm_tfkd.__version__}, '
                    f'Python {platform.python_version()}',
        'Machine': machine_description(options.device),
        'Design': f"model {options.model}, epochs {options.epochs}, seeds {' '.join(map(str, options.seeds))}, "
                  f"data {options.data_dir}, extra flags `{options.extra}`",
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the study; 0 when every run finished, 1 when one failed, 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = create_parser().parse_args(argv)
    study = Study(options.data_dir, Path(options.out), options.device, options.eval_workers, options.run_timeout)
    try:
        config = load_config(options.config)
        extra = shlex.split(options.extra)
        plan = plan_runs(options.modes, options.seeds, options.model, options.weak_model, options.epochs, extra,
                         config)
        check_plan(plan, study)
    except (StudyError, OSError) as e:
        print(f'study.py: error: {e}', file=sys.stderr)
        return 2
    study.out.mkdir(parents=True, exist_ok=True)
    failures = {} if options.report_only else run_all(plan, study)
    rows = collect_rows(options.modes, options.seeds, study)
    table = summarize(rows, options.modes, config)
    write_reports(study, table, rows, _settings(options, argv), config, failures)
    print(f"Results: {study.out / 'results.md'}")
    if failures:
        print(f'{len(failures)} run(s) failed:', *failures.values(), sep='\n  ', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
