"""Resume as README states it, beyond test_train_faults.py's plain reg run: with ``--tfkd-mode self`` (and its
teacher) and with ``--model-ema``, a run stopped at an epoch boundary and resumed with ``--resume auto`` ends with
the weights, EMA weights, optimizer state and summary.csv numbers of an uninterrupted run (CPU, ``-j 0``, fixed
seed); and a run SIGKILLed in the middle of writing a checkpoint keeps a loadable ``last.pth.tar`` and resumes to
that same end."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm

from timm_tfkd.checkpoint_io import CheckpointError, read_checkpoint
from _train_helpers import (
    REPO_ROOT, TRAIN_SCRIPT, assert_nested_equal, assert_run_files, once_per_key, read_summary, run_dir_of, subprocess_env, tiny_args, train_in_process,
)

pytestmark = pytest.mark.slow

EPOCHS = 3
# Random erasing draws from the global RNGs and the warmup + cosine schedule has state (as in test_train_faults).
COMMON_FLAGS = ('--seed', '5', '--reprob', '0.25', '--warmup-epochs', '1', '--warmup-lr', '0.001')
TEACHER = '<teacher run>'  # stands for the teacher's run folder, made by the `teacher` fixture
CONFIGS = {
    'self': ('--tfkd-mode', 'self', '--tfkd-teacher-checkpoint', TEACHER, '--tfkd-alpha', '0.5',
             '--tfkd-temperature', '4'),
    'ema': ('--tfkd-mode', 'reg', '--model-ema', '--model-ema-decay', '0.8'),
}
# Every checkpoint entry that decides how training continues (rng_state is covered by test_train_faults).
TRAINING_STATE = ('epoch', 'state_dict', 'state_dict_ema', 'optimizer')

# The real trainer script, except that its Nth torch.save writes half of the file and then SIGKILLs the process
# from inside: a kill that lands in the middle of a checkpoint write, every time.
KILL_DURING_SAVE = f'''
import io, os, runpy, signal, sys
import torch

kill_at, sys.argv = int(sys.argv[1]), [{TRAIN_SCRIPT!r}, *sys.argv[2:]]
real_save, calls = torch.save, [0]

def save_half_then_die(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] < kill_at:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    with open(f, 'wb') as out:
        out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        out.flush()
        os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_half_then_die
runpy.run_path({TRAIN_SCRIPT!r}, run_name='__main__')
'''


@pytest.fixture(scope='module')
def teacher(workdir, data_dir) -> Path:
    """A run folder trained with plain cross-entropy: the frozen teacher of the self runs."""
    return train_in_process(tiny_args(data_dir, workdir / 'out', 'teacher', '--smoothing', '0', '--seed', '1'))


def config_argv(name: str, data_dir: Path, output: Path, experiment: str, teacher: Path, *extra) -> list:
    flags = [str(teacher) if flag == TEACHER else flag for flag in CONFIGS[name]]
    return tiny_args(data_dir, output, experiment, *COMMON_FLAGS, *flags, *extra, epochs=EPOCHS)


@pytest.fixture(scope='module')
def uninterrupted(workdir, data_dir, teacher):
    """``uninterrupted(name)``: the configuration trained for all epochs in one go, once per module."""
    return once_per_key(lambda name: train_in_process(
        config_argv(name, data_dir, workdir / 'out', f'{name}-whole', teacher)))


def assert_same_training(run: Path, reference: Path) -> None:
    """The end state and every summary.csv number of ``run`` equal those of ``reference``, bit for bit."""
    assert_run_files(run, EPOCHS)
    got, expected = read_checkpoint(str(run / 'last.pth.tar')), read_checkpoint(str(reference / 'last.pth.tar'))
    for key in TRAINING_STATE:
        assert (key in got) == (key in expected), key
        if key in expected:
            assert_nested_equal(got[key], expected[key], key)
    assert read_summary(run) == read_summary(reference)


@pytest.mark.parametrize('name', CONFIGS)
def test_resume_at_epoch_boundary_matches_uninterrupted_run(workdir, data_dir, teacher, uninterrupted, name):
    argv = config_argv(name, data_dir, workdir / 'out', f'{name}-stopped', teacher)
    run = train_in_process([*argv, '--stop-epoch', '2'])
    assert [row['epoch'] for row in read_summary(run)] == [0, 1]
    train_in_process([*argv, '--resume', 'auto'])
    assert_same_training(run, uninterrupted(name))
    if name == 'ema':
        assert 'eval_model_top1' in read_summary(run)[0] and 'state_dict_ema' in read_checkpoint(str(run / 'last.pth.tar'))


def loads_into_model(path: Path) -> int:
    """Read a checkpoint the safe way and load its weights (and EMA weights) into a fresh model; its epoch."""
    checkpoint = read_checkpoint(str(path))
    for key in ('state_dict', 'state_dict_ema'):
        timm.create_model('test_resnet', num_classes=3).load_state_dict(checkpoint[key])
    return checkpoint['epoch']


@pytest.mark.parametrize('kill_at', [1, 2], ids=['first-save', 'second-save'])
def test_kill_during_checkpoint_save_then_resume_auto(workdir, data_dir, teacher, uninterrupted, kill_at):
    """torch.save number ``kill_at`` is the save of epoch ``kill_at - 1``: killed while it writes tmp.pth.tar."""
    argv = config_argv('ema', data_dir, workdir / 'out', f'killed-at-save-{kill_at}', teacher)
    run = run_dir_of(argv)
    killed = subprocess.run([sys.executable, '-c', KILL_DURING_SAVE, str(kill_at), *argv], cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr

    with pytest.raises(CheckpointError):  # the kill landed mid-write: half a file, which nothing may take as valid
        read_checkpoint(str(run / 'tmp.pth.tar'))
    assert [row['epoch'] for row in read_summary(run)] == list(range(kill_at))  # written before its checkpoint
    if kill_at == 1:
        assert not (run / 'last.pth.tar').exists()  # nothing was saved yet: --resume auto starts over, in place
    else:
        assert loads_into_model(run / 'last.pth.tar') == kill_at - 2  # the previous epoch's, intact

    train_in_process([*argv, '--resume', 'auto'])
    assert_same_training(run, uninterrupted('ema'))
    assert sorted(p.name for p in run.parent.iterdir() if p.name.startswith(run.name)) == [run.name]
