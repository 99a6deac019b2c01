"""Faults and resumes that must never end silently wrong: a run folder held by one process at a time, signals that
say where the last checkpoint is, a mid-epoch recovery that resumes at the right batch, a damaged checkpoint that is
refused, a full disk that keeps the last good checkpoint, resumes that only continue a run with its own settings and
never rewrite its record, and exports that say a run did not finish."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from timm_tfkd.checkpoint_io import read_checkpoint
from timm_tfkd.cli import main as cli_main
from timm_tfkd.run_folder import INVOCATIONS_FILE, LOCK_FILE, RunFolder
from test_train_bad_input import flip_a_weight_byte
from _train_helpers import (
    REPO_ROOT, TRAIN_SCRIPT, assert_nested_equal, assert_state_dicts_equal, call_main, load_state_dict,
    read_run_info, read_summary, script_command, subprocess_env, tiny_args, train_in_process,
)

pytestmark = pytest.mark.slow

# Bit-exact mid-epoch resume needs the loader not to read ahead: timm's prefetcher augments the next batch before the
# recovery checkpoint of this one is written, so its random state already includes that batch (README says so).
FLAGS = ('--tfkd-mode', 'reg', '--seed', '4', '--reprob', '0.25', '--recovery-interval', '1', '--no-prefetcher')

# The real trainer, SIGKILLed right after its Nth recovery checkpoint is in place (24 images, batch 8: three
# recovery checkpoints an epoch, so N = 5 stops epoch 1 after its second batch).
KILL_AFTER_RECOVERY = f'''
import os, runpy, signal, sys

kill_after, sys.argv = int(sys.argv[1]), [{TRAIN_SCRIPT!r}, *sys.argv[2:]]
real_replace, renamed = os.replace, [0]

def replace_then_die(src, dst):
    real_replace(src, dst)
    if os.path.basename(str(dst)).startswith('recovery-'):
        renamed[0] += 1
        if renamed[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace_then_die
runpy.run_path({TRAIN_SCRIPT!r}, run_name='__main__')
'''


def _popen(argv, log: Path) -> subprocess.Popen:
    with open(log, 'w') as out:
        return subprocess.Popen(script_command(argv), cwd=REPO_ROOT, env=subprocess_env(), stdout=out,
                                stderr=subprocess.STDOUT)


def _wait_for(condition, process: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f'the run ended ({process.returncode}) before {what}:\n{log.read_text()}'
        assert time.monotonic() < deadline, f'no {what} within {timeout} s'
        time.sleep(0.05)


def _last_line(text: str) -> str:
    return [line for line in text.strip().splitlines() if line][-1]


def test_recovery_checkpoint_resumes_at_the_right_batch(workdir, data_dir):
    uninterrupted = train_in_process(tiny_args(data_dir, workdir / 'out', 'whole', *FLAGS, epochs=3))
    argv = tiny_args(data_dir, workdir / 'out', 'recovered', *FLAGS, epochs=3)
    run = workdir / 'out' / 'recovered'
    killed = subprocess.run([sys.executable, '-c', KILL_AFTER_RECOVERY, '5', *map(str, argv)], cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    recovery = sorted(p.name for p in run.glob('recovery-*.pth.tar'))
    assert recovery == ['recovery-1-0.pth.tar', 'recovery-1-1.pth.tar']  # timm keeps the last two
    assert [row['epoch'] for row in read_summary(run)] == [0]
    args_yaml = (run / 'args.yaml').read_text()

    assert call_main([*argv, '--resume', 'auto']) == 0
    # Every epoch once, each with the numbers of the uninterrupted run (the interrupted epoch's sums were restored).
    assert read_summary(run) == read_summary(uninterrupted)
    assert_state_dicts_equal(load_state_dict(run / 'last.pth.tar'), load_state_dict(uninterrupted / 'last.pth.tar'))
    a, b = read_checkpoint(str(uninterrupted / 'last.pth.tar')), read_checkpoint(str(run / 'last.pth.tar'))
    assert_nested_equal(b['optimizer'], a['optimizer'], 'optimizer')
    assert not list(run.glob('recovery-*')), 'recovery checkpoints outlived the epochs they were for'
    # The record of how the run began is kept; the resume is appended.
    assert (run / 'args.yaml').read_text() == args_yaml
    (invocation,) = [json.loads(line) for line in (run / INVOCATIONS_FILE).read_text().splitlines()]
    assert (invocation['resumed_from'], invocation['epoch'], invocation['batch']) == ('recovery-1-1.pth.tar', 1, 2)
    assert invocation['changed'] == {'resume': {'was': '', 'now': 'auto'}}
    info = read_run_info(run)
    assert (info['epochs_trained'], info['finished']) == (3, True)


def test_one_process_per_run_folder_and_signals_say_how_to_resume(workdir, data_dir):
    argv = tiny_args(data_dir, workdir / 'out', 'held', '--tfkd-mode', 'reg', epochs=400)
    run, logs = workdir / 'out' / 'held', workdir / 'logs'
    logs.mkdir(exist_ok=True)
    first = _popen(argv, logs / 'first.log')
    try:
        _wait_for(lambda: (run / 'last.pth.tar').exists(), first, logs / 'first.log', 'first checkpoint')
        assert RunFolder(run).holder() and f'process {first.pid}' in (run / LOCK_FILE).read_text()
        rows, folders = len(read_summary(run)), sorted(os.listdir(workdir / 'out'))
        # A second process on the same folder is refused at once, in one line, and writes nothing.
        second = subprocess.run(script_command([*argv, '--resume', 'auto']), cwd=REPO_ROOT, env=subprocess_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().count('\n') == 0 and 'Traceback' not in second.stderr
        assert f'is in use by process {first.pid}' in second.stderr
        assert sorted(os.listdir(workdir / 'out')) == folders
        assert not (run / INVOCATIONS_FILE).exists() and len(read_summary(run)) >= rows
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143
    message = _last_line((logs / 'first.log').read_text())
    assert message.startswith('train_tfkd.py: stopped by SIGTERM: the last checkpoint is '), message
    assert '--experiment held --resume auto' in message and 'Traceback' not in (logs / 'first.log').read_text()
    assert not (run / LOCK_FILE).exists()  # released on the way out

    # Ctrl-C: 130, the same line. Then a SIGKILL, which leaves the lock file but not the lock.
    for stop, code in ((signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)):
        resumed = _popen([*argv, '--resume', 'auto'], logs / f'{stop.name}.log')
        try:
            _wait_for(lambda: (run / LOCK_FILE).exists() and RunFolder(run).holder(), resumed,
                      logs / f'{stop.name}.log', 'the lock')
            time.sleep(1.0)
            resumed.send_signal(stop)
            resumed.wait(timeout=120)
        finally:
            if resumed.poll() is None:
                resumed.kill()
        assert resumed.returncode == code, (logs / f'{stop.name}.log').read_text()[-2000:]
    assert 'interrupted (Ctrl-C): the last checkpoint is' in (logs / 'SIGINT.log').read_text()
    assert (run / LOCK_FILE).exists() and RunFolder(run).holder() is None  # stale after its holder died
    done = len(read_summary(run))
    assert call_main([*argv, '--resume', 'auto', '--stop-epoch', str(done + 1)]) == 0
    assert [row['epoch'] for row in read_summary(run)] == list(range(done + 1))
    assert len((run / INVOCATIONS_FILE).read_text().splitlines()) == 3


def test_damaged_checkpoint_is_refused_on_resume_export_and_as_teacher(workdir, data_dir, tmp_path, capsys):
    run = train_in_process(tiny_args(data_dir, workdir / 'out', 'damaged', epochs=1))
    flip_a_weight_byte(run / 'last.pth.tar', run / 'last.pth.tar')
    assert call_main(tiny_args(data_dir, workdir / 'out', 'damaged', '--resume', 'auto', epochs=2)) == 2
    assert cli_main(['export', str(run), str(tmp_path / 'export'), '--checkpoint', 'last']) == 2
    teacher = tiny_args(data_dir, tmp_path / 'student', 'student', '--tfkd-mode', 'self',
                        '--tfkd-teacher-checkpoint', run / 'last.pth.tar')
    assert call_main(teacher) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
    assert len(lines) == 3 and all('is damaged' in line and 'checksum' in line for line in lines), lines
    assert not (tmp_path / 'export').exists() and not (tmp_path / 'student').exists()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, timeout=30).returncode == 0


def test_full_disk_keeps_the_last_good_checkpoint(workdir, data_dir, tmp_path):
    probe = train_in_process(tiny_args(data_dir, tmp_path / 'probe', 'probe', epochs=1))
    size = (probe / 'last.pth.tar').stat().st_size
    disk = tmp_path / 'disk'
    # Room for one epoch's files (last, checkpoint-0 and model_best are hard links of one file) but not for the next
    # checkpoint's temporary copy.
    if not _mount_tmpfs(disk, str(int(size * 1.6) // 4096 * 4096)):
        pytest.skip('mounting a small tmpfs needs root; the full-disk path is then not exercised here')
    try:
        argv = tiny_args(data_dir, disk, 'full', epochs=3)
        result = subprocess.run(script_command(argv), cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 1, result.stderr[-2000:]
        assert 'Traceback' not in result.stderr
        message = _last_line(result.stderr)
        assert 'cannot write the checkpoint of epoch 1 (no space left on device)' in message, message
        assert '--experiment full --resume auto' in message
        run = disk / 'full'
        assert read_checkpoint(str(run / 'last.pth.tar'))['epoch'] == 0  # loadable, the last good state
        assert not list(run.glob('*tmp*')) and not (run / LOCK_FILE).exists()
        subprocess.run(['mount', '-o', 'remount,size=64m', str(disk)], check=True, timeout=30)
        assert call_main([*argv, '--resume', 'auto']) == 0
        assert [row['epoch'] for row in read_summary(run)] == [0, 1, 2]
    finally:
        subprocess.run(['umount', str(disk)], timeout=30)


def test_resume_auto_without_experiment_continues_the_run_with_these_settings(workdir, data_dir, capsys):
    root = workdir / 'auto'

    def argv(*extra, name=None):
        flags = tiny_args(data_dir, root, name or 'x', '--resume', 'auto', *extra, epochs=2)
        if name is None:
            index = flags.index('--experiment')
            del flags[index:index + 2]
        return flags

    older = train_in_process(argv('--seed', '1', '--stop-epoch', '1', name='20260101-000000-test_resnet-16'))
    newer = train_in_process(argv('--seed', '2', '--stop-epoch', '1', name='20260102-000000-test_resnet-16'))
    os.utime(newer, (time.time() + 10, time.time() + 10))
    before = {path: path.stat().st_mtime_ns for path in newer.iterdir()}
    assert call_main(argv('--seed', '1')) == 0
    assert [row['epoch'] for row in read_summary(older)] == [0, 1]
    assert {path: path.stat().st_mtime_ns for path in newer.iterdir()} == before
    assert yaml.safe_load((older / 'args.yaml').read_text())['epochs'] == 2
    (invocation,) = [json.loads(line) for line in (older / INVOCATIONS_FILE).read_text().splitlines()]
    assert invocation['changed'] == {'stop_epoch': {'was': 1, 'now': None},
                                     'experiment': {'was': older.name, 'now': ''}}
    assert sorted(os.listdir(root)) == [older.name, newer.name]
    capsys.readouterr()

    # Nothing left to train: it says so, writes nothing and ends well.
    before = {path.name: path.stat().st_mtime_ns for path in older.iterdir()}
    assert call_main(argv('--seed', '1')) == 0
    assert 'Nothing to train: the run is at epoch 2 of 2' in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in older.iterdir()} == before


def test_class_count_comes_from_the_data(workdir, data_dir, capsys):
    argv = tiny_args(data_dir, workdir / 'out', 'inferred', epochs=1)
    index = argv.index('--num-classes')
    del argv[index:index + 2]
    run = train_in_process(argv)
    assert read_run_info(run)['num_classes'] == 3
    assert "3 classes in the 'train' split (class_0, class_1, class_2): --num-classes 3" in capsys.readouterr().err
    assert load_state_dict(run / 'last.pth.tar')['fc.weight'].shape[0] == 3


def test_export_of_an_unfinished_run_says_so_and_warns_while_it_trains(workdir, data_dir, tmp_path, capsys):
    run = train_in_process(tiny_args(data_dir, workdir / 'out', 'unfinished', '--stop-epoch', '1', epochs=3))
    with RunFolder(run).lock():  # as while a trainer holds it
        assert cli_main(['export', str(run), str(tmp_path / 'export')]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if 'still being trained' in line]
    assert len(warnings) == 1 and f'process {os.getpid()}' in warnings[0]
    meta = json.loads((tmp_path / 'export' / 'tfkd.json').read_text())
    assert (meta['epochs'], meta['epochs_trained'], meta['finished']) == (3, 1, False)
    card = (tmp_path / 'export' / 'README.md').read_text()
    assert 'Trained for 1 of the 3 epochs of its schedule: the run did not finish' in card
    assert torch.equal(load_state_dict(run / 'model_best.pth.tar')['fc.weight'],
                       __import__('safetensors.torch', fromlist=['load_file']).load_file(
                           str(tmp_path / 'export' / 'model.safetensors'))['fc.weight'])
