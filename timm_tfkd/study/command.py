"""``timm-tfkd study``: plan, train and score every run, then write the report; rerun the command to resume."""
import argparse
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import timm
import torch

from ..errors import StudyRunFailed
from ..version import __version__
from .plan import DEFAULT_RUN_TIMEOUT, TEACHER_KINDS, Run, Study, check_plan, load_config, plan_runs
from .report import collect_rows, machine_description, summarize, write_reports
from .runs import changed_command, is_finished, score, train, training_complete

DESCRIPTION = ('Train every mode x seed of a teacher-free KD study with the Tf-KD trainer, score the final epoch on '
               'the test split, and tabulate mean ± std per mode.')


def add_study_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The study's options on ``parser``."""
    defaults = load_config(None).defaults
    parser.add_argument('--data-dir', required=True, help='Folder with train / validation / test split folders.')
    parser.add_argument('--out', required=True, help='Study folder: runs/, logs/, results.*; rerun to resume.')
    parser.add_argument('--model', default='resnet18', help='Student (and self / defective teacher) architecture.')
    parser.add_argument('--weak-model', default='resnet10t',
                        help='Re-KD teacher architecture, weaker than --model (--extra applies to it too).')
    parser.add_argument('--modes', nargs='+', default=list(defaults),
                        help=f"Modes of the study config. Default: {' '.join(defaults)}.")
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


def _ensure_finished(run: Run, study: Study, index: int, total: int) -> None:
    """Train and score ``run`` unless an earlier invocation already did."""
    prefix = f'[{index}/{total}] {run.name}'
    if is_finished(run, study):
        print(f'{prefix}: finished earlier, skipped')
        changed = changed_command(run, study)
        if changed:
            print(f'  warning: {run.name} was trained with other flags; its result is reused (use a new --out to '
                  f'retrain):\n    then: {shlex.join(changed[0])}\n    now:  {shlex.join(changed[1])}')
        return
    if training_complete(run, study):
        print(f'{prefix}: trained earlier, scoring')
    else:
        print(f'{prefix}: training (log: {study.log_path(run.name)})', flush=True)
        train(run, study)
    result = score(run, study)
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
            _ensure_finished(run, study, index, len(plan))
        except StudyRunFailed as e:
            failures[run.name] = str(e)
            print(f'[{index}/{len(plan)}] {e}', flush=True)
    return failures


def _settings(options: argparse.Namespace, command: Sequence[str]) -> Dict[str, str]:
    return {
        'Command': f'`{shlex.join(command)}` (in `{os.getcwd()}`)',
        'Versions': f'torch {torch.__version__}, timm {timm.__version__}, timm_tfkd {__version__}, '
                    f'Python {platform.python_version()}',
        'Machine': machine_description(options.device),
        'Design': f"model {options.model}, epochs {options.epochs}, seeds {' '.join(map(str, options.seeds))}, "
                  f"data {options.data_dir}, extra flags `{options.extra}`",
    }


def run_study(options: argparse.Namespace, command: Sequence[str]) -> int:
    """Plan and check every run, train and score what is not finished, write the report.

    Args:
        options: Parsed :func:`add_study_arguments` options.
        command: The command line, recorded in the report.

    Returns:
        0 when every run finished, 1 when one failed (each failure is in the report and on stderr).

    Raises:
        StudyError: The study cannot start as asked; nothing was trained or written.
    """
    study = Study(options.data_dir, Path(options.out), options.device, options.eval_workers, options.run_timeout)
    config = load_config(options.config)
    plan = plan_runs(options.modes, options.seeds, options.model, options.weak_model, options.epochs,
                     shlex.split(options.extra), config)
    for warning in check_plan(plan, study):
        print(f'warning: {warning}', file=sys.stderr)
    study.out.mkdir(parents=True, exist_ok=True)
    failures = {} if options.report_only else run_all(plan, study)
    rows = collect_rows(options.modes, options.seeds, study)
    table = summarize(rows, options.modes, config)
    write_reports(study, table, rows, _settings(options, command), config, failures)
    print(f"Results: {study.out / 'results.md'}")
    if failures:
        print(f'{len(failures)} run(s) failed:', *failures.values(), sep='\n  ', file=sys.stderr)
        return 1
    return 0
