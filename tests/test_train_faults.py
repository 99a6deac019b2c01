"""Interrupted and failing runs: exact resume, SIGKILL at any moment, a checkpoint that never goes missing,
and a non-finite loss that stops the run with the previous checkpoint intact."""
import csv
import os
import re
from pathlib import Path

import pytest
import torch

from timm_tfkd.checkpoint_io import read_checkpoint
from _train_helpers import (
    assert_nested_equal, assert_run_files, assert_state_dicts_equal, call_main, load_state_dict, read_summary,
    sigkill_when, tiny_args, train_in_process,
)

pytestmark = pytest.mark.slow

# Random erasing and mixup draw from the global RNGs and the warmup + cosine schedule has state: a resumed run
# only matches an uninterrupted one if the checkpoint restores all of it.
RESUME_FLAGS = ('--tfkd-mode', 'reg', '--seed', '5', '--reprob', '0.25', '--mixup', '0.2',
                '--warmup-epochs', '1', '--warmup-lr', '0.001')


@pytest.fixture(scope='module')
def uninterrupted(workdir, data_dir) -> Path:
    return train_in_process(tiny_args(data_dir, workdir / 'out', 'A', *RESUME_FLAGS, epochs=3))


@pytest.fixture(scope='module')
def interrupted(workdir, data_dir) -> Path:
    """Run B: stopped after 2 of 3 epochs (a kill at an epoch boundary), then resumed with --resume auto."""
    stopped = tiny_args(data_dir, workdir / 'out', 'B', *RESUME_FLAGS, '--stop-epoch', '2', epochs=3)
    run = train_in_process(stopped)
    assert [row['epoch'] for row in read_summary(run)] == [0, 1]
    assert read_checkpoint(str(run / 'last.pth.tar'))['epoch'] == 1
    train_in_process(tiny_args(data_dir, workdir / 'out', 'B', *RESUME_FLAGS, '--resume', 'auto', epochs=3))
    return run


def test_resume_auto_matches_uninterrupted_run(uninterrupted, interrupted):
    assert_run_files(interrupted, 3)
    assert_state_dicts_equal(load_state_dict(interrupted / 'last.pth.tar'),
                             load_state_dict(uninterrupted / 'last.pth.tar'))
    a, b = read_checkpoint(str(uninterrupted / 'last.pth.tar')), read_checkpoint(str(interrupted / 'last.pth.tar'))
    assert_nested_equal(b['optimizer'], a['optimizer'], 'optimizer')
    assert_nested_equal(b['rng_state'], a['rng_state'], 'rng_state')
    # Every epoch's losses, metrics and learning rate: the same numbers, not merely close ones.
    assert read_summary(interrupted) == read_summary(uninterrupted)
    assert not any(name.startswith(os.path.basename(interrupted) + '-') for name in os.listdir(interrupted.parent))


def test_resume_explicit_path(workdir, data_dir, uninterrupted, interrupted):
    # checkpoint-1 is the state after 2 epochs, with its random state; resumed into a new folder.
    resumed = train_in_process(tiny_args(data_dir, workdir / 'out', 'C', *RESUME_FLAGS, '--resume',
                                         interrupted / 'checkpoint-1.pth.tar', epochs=3))
    assert read_checkpoint(str(resumed / 'last.pth.tar'))['epoch'] == 2
    assert_state_dicts_equal(load_state_dict(resumed / 'last.pth.tar'),
                             load_state_dict(uninterrupted / 'last.pth.tar'))
    assert read_summary(resumed) == read_summary(uninterrupted)[2:]


def test_resume_after_kill_between_summary_row_and_checkpoint(workdir, data_dir):
    """A kill after an epoch's summary row is written but before its checkpoint: the epoch is trained again on
    resume, and summary.csv must still list each epoch once."""
    flags = ('--tfkd-mode', 'reg', '--seed', '1')
    run = train_in_process(tiny_args(data_dir, workdir / 'out', 'D', *flags, '--stop-epoch', '1', epochs=2))
    with open(run / 'summary.csv', newline='') as f:
        rows = list(csv.reader(f))
    with open(run / 'summary.csv', 'a', newline='') as f:
        csv.writer(f).writerow(['1'] + ['123.0'] * (len(rows[0]) - 1))  # the row of the epoch about to be lost
    train_in_process(tiny_args(data_dir, workdir / 'out', 'D', *flags, '--resume', 'auto', epochs=2))
    summary = read_summary(run)
    assert [row['epoch'] for row in summary] == [0, 1]
    assert summary[1]['train_loss'] != 123.0


def test_last_checkpoint_never_missing_during_saves(workdir, data_dir, monkeypatch):
    """Between any two file operations of the saver, last.pth.tar exists once it has been written: a kill can land
    anywhere and --resume auto still finds it."""
    run = workdir / 'out' / 'E'
    last = run / 'last.pth.tar'
    seen, gaps = [False], []

    def watch(function):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            if last.exists():
                seen[0] = True
            elif seen[0]:
                gaps.append(f'{function.__name__}{tuple(map(os.path.basename, map(str, args)))}')
            return result
        return wrapper

    for name in ('unlink', 'remove', 'replace', 'rename'):
        monkeypatch.setattr(os, name, watch(getattr(os, name)))
    train_in_process(tiny_args(data_dir, workdir / 'out', 'E', '--tfkd-mode', 'reg', epochs=3))
    assert seen[0]
    assert not gaps, f'last.pth.tar was missing after {gaps}'


def test_sigkill_then_resume_auto(workdir, data_dir):
    epochs = 6
    output = workdir / 'out-kill'
    argv = tiny_args(data_dir, output, 'killed', '--tfkd-mode', 'reg', '--seed', '2', epochs=epochs)
    run = output / 'killed'
    log_path = workdir / 'killed.log'
    sigkill_when(argv, (run / 'last.pth.tar').exists, 'last.pth.tar', log_path)
    checkpoint = read_checkpoint(str(run / 'last.pth.tar'))
    assert 0 <= checkpoint['epoch'] < epochs - 1
    assert all(torch.isfinite(t).all() for t in checkpoint['state_dict'].values() if t.is_floating_point())

    assert call_main([*argv, '--resume', 'auto']) == 0
    assert_run_files(run, epochs)
    assert sorted(os.listdir(output)) == ['killed']  # resumed in place, not into a new 'killed-1' folder


def test_non_finite_loss_stops_with_previous_checkpoint_intact(workdir, data_dir, capsys):
    # Epoch 0 warms up at a tiny learning rate; epoch 1 starts the cosine schedule at 1e30 and blows up.
    output = workdir / 'out-nan'
    argv = tiny_args(data_dir, output, 'nan', '--lr', '1e30', '--warmup-epochs', '1', '--warmup-lr', '1e-6',
                     epochs=3)
    code = call_main(argv)
    err = capsys.readouterr().err
    assert code != 0 and code != 2
    assert re.search(r'non-finite loss .* at epoch 1, step \d+', err), err
    assert 'Traceback' not in err
    run = output / 'nan'
    checkpoint = read_checkpoint(str(run / 'last.pth.tar'))
    assert checkpoint['epoch'] == 0
    assert all(torch.isfinite(t).all() for t in checkpoint['state_dict'].values() if t.is_floating_point())
    assert (run / 'last.pth.tar').read_bytes() == (run / 'checkpoint-0.pth.tar').read_bytes()
    assert [row['epoch'] for row in read_summary(run)] == [0]
    assert not (run / 'tmp.pth.tar').exists()


def test_weights_diverged_by_the_last_step_stop_before_their_checkpoint(workdir, data_dir, capsys):
    # One batch per epoch: epoch 1's only step has a finite loss, but its 1e30 update leaves non-finite weights,
    # which only validation can see. They must not replace epoch 0's checkpoint.
    output = workdir / 'out-nan-last-step'
    argv = tiny_args(data_dir, output, 'nan', '--lr', '1e30', '--warmup-epochs', '1', '--warmup-lr', '1e-6',
                     epochs=3, batch_size=24)
    code = call_main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert 'non-finite model outputs in validation' in err and 'Traceback' not in err
    run = output / 'nan'
    checkpoint = read_checkpoint(str(run / 'last.pth.tar'))
    assert checkpoint['epoch'] == 0
    assert all(torch.isfinite(t).all() for t in checkpoint['state_dict'].values() if t.is_floating_point())
    assert [row['epoch'] for row in read_summary(run)] == [0]
