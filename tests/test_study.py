"""``timm-tfkd study`` end to end on a tiny image folder, and timm_tfkd.evaluate on its runs.

One real study (test_resnet, 16 px, 1 epoch, 2 seeds, modes ce / reg-paper / self / de-kd: 8 trainer
subprocesses) is shared by the tests of this module; its tables are checked against mean and sample standard
deviation computed here from its per-run rows. Failure, hang and resume paths use fake trainer scripts.
"""
import argparse
import csv
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import timm_tfkd.study.runs
from conftest import write_image_folder
from timm_tfkd import study
from timm_tfkd.cli import main as cli_main
from timm_tfkd.errors import StudyError
from timm_tfkd.evaluate import EvaluationError, evaluate_run

ROOT = Path(__file__).resolve().parents[1]
MODES = ('ce', 'reg-paper', 'self', 'de-kd')
SEEDS = (0, 1)
EXTRA = '--num-classes 3 --img-size 16 -b 8 -j 0 --lr 0.05 --warmup-epochs 0 --log-interval 1000'
# The shared study trains 8 runs before its first test: more than the suite's per-test timeout allows a test.
WITH_STUDY = pytest.mark.timeout(1200)
TABLE_METRICS = {'test top-1 (%)': 'test_top1', 'test NLL': 'test_nll', 'test ECE (%)': 'test_ece',
                 'val top-1 (%)': 'val_top1', 'wall time / run (s)': 'wall_seconds'}


def run_study(argv) -> int:
    """``timm-tfkd study ARGV``, in this process."""
    return cli_main(['study', *argv])


def _argv(data: Path, out: Path, modes=MODES, seeds=SEEDS, run_timeout=600):
    return ['--data-dir', str(data), '--out', str(out), '--model', 'test_resnet', '--modes', *modes,
            '--seeds', *map(str, seeds), '--epochs', '1', f'--extra={EXTRA}', '--device', 'cpu',
            '--run-timeout', str(run_timeout)]


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp('study') / 'data', classes=3, per_class=4, size=16,
                              splits=('train', 'validation', 'test'))


@pytest.fixture(scope='module')
def finished_study(tiny_data):
    """Run the tiny study once; returns its folder and exit status."""
    out = tiny_data.parent / 'out'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        # One thread per process: on a shared 2-core machine, contending threads make tiny runs many times slower.
        mp.setenv('OMP_NUM_THREADS', '1')
        code = run_study(_argv(tiny_data, out))
    yield out, code
    torch.set_num_threads(threads)


def _read_csv(path: Path):
    with path.open(newline='') as f:
        return list(csv.DictReader(f))


@WITH_STUDY
def test_study_writes_results_for_every_mode(finished_study):
    out, code = finished_study
    assert code == 0
    table = _read_csv(out / 'results.csv')
    assert [row['mode'] for row in table] == list(MODES)
    for row in table:
        assert row['n'] == '2'
        assert 0.0 <= float(row['test_top1_mean']) <= 100.0
        assert float(row['test_top1_std']) >= 0.0 and float(row['test_nll_mean']) > 0.0
    runs = _read_csv(out / 'runs.csv')
    assert sorted((r['mode'], r['seed']) for r in runs) == sorted((m, str(s)) for m in MODES for s in SEEDS)
    teachers = {r['run']: (r['teacher_run'], r['teacher_checkpoint']) for r in runs}
    assert teachers['self-s1'] == ('ce-s1', 'last.pth.tar')
    assert teachers['de-kd-s0'] == ('ce-s0', 'milestone-1.pth.tar')

    markdown = (out / 'results.md').read_text()
    for mode in MODES:
        assert f'| {mode} | 2 | ' in markdown
    assert f'torch {torch.__version__}' in markdown and f'timm {timm.__version__},' in markdown
    assert 'cores' in markdown
    assert 'timm-tfkd study --data-dir' in markdown
    assert (out / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _mean_and_sample_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _markdown_rows(markdown: str):
    """The results table of results.md as {mode: {column label: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith('| ')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([cell.strip() for cell in line.strip('|').split('|')] for line in lines[1:])}


@WITH_STUDY
def test_tables_are_mean_and_sample_std_of_the_runs(finished_study):
    out, _ = finished_study
    runs = _read_csv(out / 'runs.csv')
    table = {row['mode']: row for row in _read_csv(out / 'results.csv')}
    markdown = _markdown_rows((out / 'results.md').read_text())
    for mode in MODES:
        rows = [row for row in runs if row['mode'] == mode]
        assert len(rows) == len(SEEDS) and table[mode]['n'] == markdown[mode]['n'] == str(len(SEEDS))
        for label, metric in [*TABLE_METRICS.items(), ('teacher', 'teacher_test_top1')]:
            values = [float(row[metric]) for row in rows if row[metric]]
            if metric == 'teacher_test_top1' and mode in ('ce', 'reg-paper'):
                assert not values and table[mode][f'{metric}_mean'] == ''
                continue
            mean, std = _mean_and_sample_std(values)
            assert float(table[mode][f'{metric}_mean']) == pytest.approx(mean, rel=1e-12, abs=1e-12), (mode, metric)
            assert float(table[mode][f'{metric}_std']) == pytest.approx(std, rel=1e-9, abs=1e-12), (mode, metric)
            if metric == 'teacher_test_top1':
                continue
            # The cell is 'mean ± std', both rounded to the cell's decimals.
            cell = markdown[mode][label]
            shown_mean, shown_std = cell.split(' ± ')
            unit = 10.0 ** -len(shown_mean.partition('.')[2])
            assert abs(float(shown_mean) - mean) <= unit / 2 + 1e-9, (mode, label, cell, mean)
            assert abs(float(shown_std) - std) <= unit / 2 + 1e-9, (mode, label, cell, std)


@WITH_STUDY
def test_only_the_needed_runs_are_trained(finished_study):
    out, _ = finished_study
    assert sorted(p.name for p in (out / 'runs').iterdir()) == sorted(f'{m}-s{s}' for m in MODES for s in SEEDS)
    result = json.loads((out / 'runs' / 'de-kd-s1' / study.RESULT_FILE).read_text())
    assert result['checkpoint'] == 'last.pth.tar' and result['epoch'] == 0
    assert '--tfkd-teacher-checkpoint' in result['command']


@WITH_STUDY
def test_rerun_skips_finished_runs(finished_study, tiny_data, capsys):
    out, _ = finished_study
    checkpoints = sorted((out / 'runs').glob('*/last.pth.tar'))
    before = {path: path.stat().st_mtime_ns for path in checkpoints}
    attempts = {path: path.read_text() for path in (out / 'logs').glob('*.attempts.json')}
    assert run_study(_argv(tiny_data, out)) == 0
    assert {path: path.stat().st_mtime_ns for path in checkpoints} == before
    assert {path: path.read_text() for path in (out / 'logs').glob('*.attempts.json')} == attempts
    assert capsys.readouterr().out.count('finished earlier, skipped') == len(MODES) * len(SEEDS)
    assert len(_read_csv(out / 'results.csv')) == len(MODES)


@WITH_STUDY
def test_evaluate_last_on_validation_reproduces_the_final_summary_row(finished_study, tiny_data):
    out, _ = finished_study
    run_dir = out / 'runs' / 'reg-paper-s0'
    final = _read_csv(run_dir / 'summary.csv')[-1]
    metrics = evaluate_run(str(run_dir), str(tiny_data), split='validation', checkpoint='last', device='cpu')
    assert metrics['top1'] == float(final['eval_top1'])
    assert metrics['nll'] == pytest.approx(float(final['eval_nll']), rel=1e-6)
    test = evaluate_run(str(run_dir), str(tiny_data), split='test', device='cpu')
    assert set(test) == {'top1', 'top5', 'nll', 'ece'} and 0.0 <= test['top1'] <= 100.0
    recorded = json.loads((run_dir / study.RESULT_FILE).read_text())['test']
    assert test == pytest.approx(recorded)


@WITH_STUDY
def test_evaluate_refuses_a_missing_split_and_checkpoint(finished_study, tiny_data):
    out, _ = finished_study
    run_dir = str(out / 'runs' / 'ce-s0')
    with pytest.raises(EvaluationError, match="no 'holdout' split"):
        evaluate_run(run_dir, str(tiny_data), split='holdout', device='cpu')
    with pytest.raises(EvaluationError, match='does not exist'):
        evaluate_run(run_dir, str(tiny_data), checkpoint='checkpoint-7.pth.tar', device='cpu')


@WITH_STUDY
def test_evaluate_command_prints_one_json_line(finished_study, tiny_data, capsys):
    from timm_tfkd.cli import main as cli_main
    out, _ = finished_study
    assert cli_main(['evaluate', str(out / 'runs' / 'ce-s1'), '--data-dir', str(tiny_data), '--device', 'cpu']) == 0
    line = capsys.readouterr().out.strip()
    assert '\n' not in line and json.loads(line)['split'] == 'test'


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch) -> Path:
    """A trainer that records its arguments and fails at once, so failure and resume paths cost no training."""
    calls = tmp_path / 'calls.jsonl'
    script = tmp_path / 'fake_train.py'
    script.write_text('import json, sys\n'
                      f'open({str(calls)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n'
                      'print("simulated crash", file=sys.stderr)\n'
                      'sys.exit(3)\n')
    monkeypatch.setattr(timm_tfkd.study.runs, 'TRAINER_COMMAND', (sys.executable, str(script)))
    return calls


@pytest.fixture
def hanging_trainer(tmp_path, monkeypatch) -> Path:
    """A trainer that says it started, records its pid, and then never ends."""
    pid_file = tmp_path / 'trainer.pid'
    script = tmp_path / 'hanging_train.py'
    script.write_text('import os, sys, time\n'
                      f'open({str(pid_file)!r}, "w").write(str(os.getpid()))\n'
                      'print("simulated start, then a hang", flush=True)\n'
                      'time.sleep(3600)\n')
    monkeypatch.setattr(timm_tfkd.study.runs, 'TRAINER_COMMAND', (sys.executable, str(script)))
    return pid_file


def test_hanging_trainer_is_stopped_and_reported(tiny_data, tmp_path, hanging_trainer, capsys):
    out = tmp_path / 'hanging'
    start = time.monotonic()
    assert run_study(_argv(tiny_data, out, modes=('ce', 'reg-paper'), seeds=(0,), run_timeout=2)) == 1
    assert time.monotonic() - start < 60  # two runs of 2 s each, not an hour
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(int(hanging_trainer.read_text()), 0)
    log = out / 'logs' / 'ce-s0.log'
    text = log.read_text()
    assert 'simulated start, then a hang' in text and 'stopped after 2 s (--run-timeout)' in text
    markdown = (out / 'results.md').read_text()
    for run in ('ce-s0', 'reg-paper-s0'):  # both were tried: a hang stops one run, not the study
        assert f"run {run} stopped after 2 s (--run-timeout); log: {out / 'logs' / f'{run}.log'}" in markdown
    assert str(log) in capsys.readouterr().err
    (attempt,) = json.loads((out / 'logs' / 'ce-s0.attempts.json').read_text())
    assert attempt['returncode'] is None and 2 <= attempt['seconds'] < 30


def test_run_timeout_is_documented_with_its_default():
    text = re.sub(r'\s+', ' ', study.add_study_arguments(argparse.ArgumentParser()).format_help())
    assert '--run-timeout SECONDS' in text and f'Default: {study.DEFAULT_RUN_TIMEOUT} (24 h)' in text


def test_failed_run_is_reported_and_its_students_skipped(tiny_data, tmp_path, fake_trainer, capsys):
    out = tmp_path / 'failing'
    assert run_study(_argv(tiny_data, out, modes=('ce', 'self', 'reg-paper'), seeds=(0,))) == 1
    calls = [json.loads(line) for line in fake_trainer.read_text().splitlines()]
    assert [call[call.index('--experiment') + 1] for call in calls] == ['ce-s0', 'reg-paper-s0']
    log = out / 'logs' / 'ce-s0.log'
    assert 'simulated crash' in log.read_text()
    markdown = (out / 'results.md').read_text()
    assert f'run ce-s0 failed (exit status 3); log: {log}' in markdown
    assert 'self-s0 not started: its teacher ce-s0 failed' in markdown
    assert str(log) in capsys.readouterr().err


def test_unfinished_run_is_resumed(tiny_data, tmp_path, fake_trainer):
    out = tmp_path / 'resumed'
    run_dir = out / 'runs' / 'ce-s0'
    run_dir.mkdir(parents=True)
    (run_dir / 'last.pth.tar').write_bytes(b'')
    run_study(_argv(tiny_data, out, modes=('ce',), seeds=(0,)))
    (call,) = [json.loads(line) for line in fake_trainer.read_text().splitlines()]
    assert call[-2:] == ['--resume', 'auto']


def test_bad_extra_flag_is_refused_before_any_run(tiny_data, tmp_path, fake_trainer):
    argv = _argv(tiny_data, tmp_path / 'bad', modes=('ce',), seeds=(0,))
    argv[argv.index(f'--extra={EXTRA}')] = '--extra=--epochs 3'
    assert run_study(argv) == 2
    assert not fake_trainer.exists()


@pytest.mark.parametrize('schedule, warned', [('--warmup-epochs 1', True), ('--warmup-epochs 0', False),
                                               ('--warmup-epochs 1 --sched-on-updates', False)])
def test_defective_teacher_warns_when_its_first_epoch_is_all_warmup(tiny_data, tmp_path, schedule, warned, capsys,
                                                                   fake_trainer):
    argv = _argv(tiny_data, tmp_path / 'warmup', modes=('de-kd',), seeds=(0,))
    argv[argv.index(f'--extra={EXTRA}')] = f'--extra={schedule}'
    run_study(argv)
    assert ('warning: the defective teacher is ce-s0' in capsys.readouterr().err) == warned


def test_plan_trains_each_teacher_once_before_its_students():
    plan = study.plan_runs(['ls', 'self', 'de-kd', 're-kd'], [0, 1], 'resnet18', 'resnet10t', 5, [],
                           study.load_config(None))
    names = [run.name for run in plan]
    assert names == ['ls-s0', 'ce-s0', 'self-s0', 'de-kd-s0', 'ce-resnet10t-s0', 're-kd-s0',
                     'ls-s1', 'ce-s1', 'self-s1', 'de-kd-s1', 'ce-resnet10t-s1', 're-kd-s1']
    by_name = {run.name: run for run in plan}
    assert by_name['re-kd-s1'].teacher == study.TeacherRef('ce-resnet10t-s1', 'last.pth.tar', 'resnet10t')
    assert by_name['de-kd-s0'].teacher.checkpoint == 'milestone-1.pth.tar'
    assert '--save-epochs' in by_name['ce-s0'].flags and by_name['ce-resnet10t-s0'].model == 'resnet10t'


def test_unknown_mode_is_refused():
    with pytest.raises(StudyError, match='unknown mode'):
        study.plan_runs(['ce', 'nope'], [0], 'resnet18', 'resnet10t', 1, [], study.load_config(None))



def test_the_example_is_the_documented_study_and_its_flags_pass_the_trainer(tiny_data, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('study_example', ROOT / 'examples' / 'study.py')
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / 'example'
    # Every run of the six-mode plan is parsed and checked by the trainer's own checks; --report-only trains nothing.
    assert cli_main(example.study_argv(str(tiny_data), str(out), '--report-only')) == 0
    table = _read_csv(out / 'results.csv')
    assert [row['mode'] for row in table] == ['ce', 'ls', 'reg-paper', 'reg-official', 'self', 'de-kd']
    assert all(row['n'] == '0' for row in table) and not (out / 'runs').exists()
    readme = (ROOT / 'docs' / 'results' / 'cpu-fashion-mnist' / 'README.md').read_text()
    assert example.FASHION_MNIST_RECIPE in re.sub(r'\s*\\\n\s*', ' ', readme)  # the recipe the results came from


def _config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / 'modes.yaml'
    path.write_text(text)
    return str(path)


# id -> (changes to the tiny study's argv, words its one error line must contain)
STUDY_BAD_INPUT = {
    'unknown-mode': (lambda argv, tmp: argv + ['--modes', 'ce', 'nope'], ['unknown mode(s) nope']),
    'extra-sets-a-study-flag': (lambda argv, tmp: argv + ['--extra=--epochs 3'], ['--extra sets --epochs']),
    'mode-sets-a-study-flag': (lambda argv, tmp: argv + ['--modes', 'x', '--config', _config_file(
        tmp, 'x: {flags: --tfkd-mode none --seed 3}\n')], ['mode x sets --seed']),
    'unknown-teacher-kind': (lambda argv, tmp: argv + ['--modes', 'x', '--config', _config_file(
        tmp, 'x: {flags: --tfkd-mode kd, teacher: oracle}\n')], ['teacher must be one of self, defective, weak']),
    'config-not-a-mapping-of-modes': (lambda argv, tmp: argv + ['--config', _config_file(tmp, '- ce\n')],
                                      ['expected a mapping']),
    'config-missing': (lambda argv, tmp: argv + ['--config', str(tmp / 'nope.yaml')], ['cannot read study config']),
    'config-not-yaml': (lambda argv, tmp: argv + ['--config', _config_file(tmp, 'x: [\n')],
                        ['cannot read study config']),
    'trainer-refuses-a-value': (lambda argv, tmp: argv + ['--extra=--hflip 2'], ['run ce-s0', '--hflip']),
    'trainer-unknown-flag': (lambda argv, tmp: argv + ['--extra=--no-such-flag'],
                             ['run ce-s0', 'unrecognized arguments: --no-such-flag']),
    'split-folder-missing': (lambda argv, tmp: [a.replace('DATA', str(tmp)) for a in argv],
                             ["has no 'train' split folder"]),
    'no-seeds': (lambda argv, tmp: argv + ['--seeds'], ['--seeds', 'expected at least one']),
}


@pytest.mark.parametrize('case', STUDY_BAD_INPUT, ids=list(STUDY_BAD_INPUT))
def test_bad_study_input_is_one_line_and_exit_2_before_any_run(case, tiny_data, tmp_path, fake_trainer, capsys):
    change, words = STUDY_BAD_INPUT[case]
    argv = ['--data-dir', 'DATA' if case == 'split-folder-missing' else str(tiny_data), '--out', str(tmp_path / 'o'),
            '--model', 'test_resnet', '--modes', 'ce', '--seeds', '0', '--epochs', '1', '--device', 'cpu']
    assert run_study(change(argv, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('timm-tfkd: error: '), err
    assert all(word in err[0] for word in words), err[0]
    assert not fake_trainer.exists() and not (tmp_path / 'o').exists()
