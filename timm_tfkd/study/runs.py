"""Training and scoring one run of a study: a trainer subprocess per attempt, then the final epoch on ``test``.

A run's training folder is the trainer's (:class:`~timm_tfkd.run_folder.RunFolder`); the study adds
``study_result.json`` to it once the run is scored, and keeps each attempt's log and duration under ``OUT/logs``.
"""
import json
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from ..errors import EvaluationError, StudyRunFailed
from ..evaluate import evaluate_run
from ..run_folder import LAST_CHECKPOINT, RunFolder, row_metrics, write_json_atomic
from .plan import Run, Study, trainer_argv

# The trainer's entry point, run in the Python of the study itself.
TRAINER_COMMAND: Tuple[str, ...] = (sys.executable, '-m', 'timm_tfkd.train.main')
RESULT_FILE = 'study_result.json'


def _folder(run: Run, study: Study) -> RunFolder:
    return RunFolder(study.run_dir(run.name))


def training_complete(run: Run, study: Study) -> bool:
    """Whether ``summary.csv`` reached the final epoch and its checkpoint is there."""
    folder = _folder(run, study)
    rows = folder.read_summary()
    return bool(rows) and rows[-1]['epoch'] == run.epochs - 1 and folder.file(LAST_CHECKPOINT).is_file()


def is_finished(run: Run, study: Study) -> bool:
    """Trained to the end and scored: a rerun skips it."""
    return training_complete(run, study) and _folder(run, study).file(RESULT_FILE).is_file()


def _attempts_path(study: Study, name: str):
    return study.out / 'logs' / f'{name}.attempts.json'


def _read_attempts(study: Study, name: str) -> List[Dict[str, Any]]:
    path = _attempts_path(study, name)
    return json.loads(path.read_text()) if path.is_file() else []


def _record_attempt(study: Study, name: str, attempt: Dict[str, Any]) -> None:
    write_json_atomic(_attempts_path(study, name), _read_attempts(study, name) + [attempt])


def train(run: Run, study: Study) -> None:
    """Train ``run`` to its last epoch in a trainer subprocess, resuming what an earlier attempt left.

    Raises:
        StudyRunFailed: The trainer exited non-zero or was stopped after ``study.run_timeout`` seconds.
    """
    folder, log_path = _folder(run, study), study.log_path(run.name)
    argv = trainer_argv(run, study)
    resume = folder.resume_checkpoint() is not None
    if resume:
        argv += ['--resume', 'auto']
    elif folder.path.exists():
        # A folder without a checkpoint holds no progress; the trainer would write beside it as '<name>-1'.
        shutil.rmtree(folder.path)
    command = [*TRAINER_COMMAND, *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open('a') as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}: "
                  f"{shlex.join(command)}\n")
        log.flush()
        start = time.perf_counter()
        try:
            returncode: Optional[int] = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                                       timeout=study.run_timeout or None).returncode
        except subprocess.TimeoutExpired:  # subprocess.run has killed and reaped the trainer
            returncode = None
            log.write(f'\n=== stopped after {study.run_timeout:g} s (--run-timeout)\n')
    seconds = time.perf_counter() - start
    _record_attempt(study, run.name, {'seconds': round(seconds, 3), 'returncode': returncode, 'resumed': resume})
    if returncode is None:
        raise StudyRunFailed(f'run {run.name} stopped after {study.run_timeout:g} s (--run-timeout); log: {log_path}')
    if returncode != 0 or not training_complete(run, study):
        raise StudyRunFailed(f'run {run.name} failed (exit status {returncode}); log: {log_path}')


def score(run: Run, study: Study) -> Dict[str, Any]:
    """Score a trained run and write its ``study_result.json``.

    Returns:
        The result: test metrics of the final epoch, the final validation top-1 of the model (not its EMA: the
        test metrics are the model's too), the teacher's test top-1, the training time of all attempts and the
        trainer command.

    Raises:
        StudyRunFailed: The run or its teacher cannot be evaluated.
    """
    folder = _folder(run, study)
    evaluate = dict(data_dir=study.data_dir, split='test', device=study.device, workers=study.eval_workers)
    try:
        test = evaluate_run(str(folder.path), checkpoint='last', **evaluate)
        teacher = None
        if run.teacher is not None:
            teacher_test = evaluate_run(str(study.run_dir(run.teacher.run)), checkpoint=run.teacher.checkpoint,
                                        **evaluate)
            teacher = {'run': run.teacher.run, 'checkpoint': run.teacher.checkpoint, 'test_top1': teacher_test['top1']}
    except EvaluationError as e:
        raise StudyRunFailed(f'run {run.name} trained but cannot be evaluated: {e}') from None
    final = folder.read_summary()[-1]
    model_metrics, _ = row_metrics(final)
    result = {
        'run': run.name,
        'mode': run.mode,
        'seed': run.seed,
        'epoch': final['epoch'],
        'checkpoint': LAST_CHECKPOINT,
        'test': test,
        'val_top1': model_metrics['top1'],
        'wall_seconds': sum(a['seconds'] for a in _read_attempts(study, run.name)),
        'teacher': teacher,
        'command': trainer_argv(run, study),
    }
    write_json_atomic(folder.file(RESULT_FILE), result)
    return result


def read_result(run_dir) -> Optional[Dict[str, Any]]:
    """The ``study_result.json`` of a run folder; None when the run has not been scored."""
    path = RunFolder(run_dir).file(RESULT_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


def changed_command(run: Run, study: Study) -> Optional[Tuple[List[str], List[str]]]:
    """(the flags a finished run was trained with, the flags the plan has now) when they differ, else None."""
    recorded = (read_result(study.run_dir(run.name)) or {}).get('command') or []
    now = trainer_argv(run, study)
    return None if recorded == now else (recorded, now)
