"""The trainer's epoch loggers: ``--log-wandb`` (timm's flags) and ``--log-tensorboard DIR`` record exactly the rows of
``summary.csv``, and flags that cannot work stop the run before anything is written.

Real runs of the trainer, in process, with the real ``wandb`` client in offline mode (no network) and the real
TensorBoard writer; what they wrote is read back with the packages' own readers: ``wandb leet inspect --json`` for
the ``.wandb`` transaction log, ``EventAccumulator`` for the TensorBoard event files.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import wandb
import yaml

from conftest import write_image_folder
from _train_helpers import (
    call_main, read_summary, run_dir_of, sigkill_when, tensorboard_scalars, tiny_args, train_in_process,
    use_offline_wandb, wandb_records,
)
from timm_tfkd.train.flags import create_parser

EPOCHS = 2
# W&B's own bookkeeping keys in a logged row (step counter, clock).
WANDB_KEYS = ('_step', '_runtime', '_timestamp')


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp('loggers') / 'data', per_class=4)


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch) -> Path:
    yield use_offline_wandb(monkeypatch, tmp_path / 'wandb-root')
    wandb.teardown()


# id -> extra flags; each run checks the rows of a method with a KD term, and one with EMA columns.
RUNS = {
    'reg': ('--tfkd-mode', 'reg', '--tfkd-alpha', '0.5', '--tfkd-temperature', '4'),
    'ema': ('--model-ema', '--model-ema-decay', '0.5'),
}


@pytest.mark.parametrize('run', list(RUNS))
def test_wandb_logs_config_tags_and_summary_rows(run, data, tmp_path, wandb_dir):
    argv = tiny_args(data, tmp_path / 'out', f'wb-{run}', *RUNS[run], '--log-wandb', '--wandb-project', 'tfkd-tests',
                     '--wandb-tags', 'tiny', run, epochs=EPOCHS)
    run_dir = train_in_process(argv)
    summary = read_summary(run_dir)
    assert len(summary) == EPOCHS
    records = wandb_records(wandb_dir)

    (start,) = [r['run'] for r in records if r['type'] == 'run']
    assert start['project'] == 'tfkd-tests'
    assert start['display_name'] == f'wb-{run}'
    assert start['tags'] == ['tiny', run]
    config = start['config']['update']
    args_yaml = yaml.safe_load((run_dir / 'args.yaml').read_text())
    for key in ('model', 'lr', 'epochs', 'tfkd_mode', 'tfkd_alpha', 'model_ema', 'wandb_tags', 'seed'):
        assert config[key] == args_yaml[key], key
    assert config['tfkd_mode'] == ('reg' if run == 'reg' else 'none')
    assert config['lr'] == 0.05

    history = [r['history']['item'] for r in records if r['type'] == 'history']
    logged = [{k: v for k, v in item.items() if k not in WANDB_KEYS} for item in history]
    # Every column of summary.csv, with the value written there, nothing else; one wandb.log per epoch.
    assert logged == summary
    columns = set(summary[0])
    assert {'train_kd_loss', 'eval_nll', 'eval_ece', 'lr'} <= columns
    if run == 'reg':
        assert all(row['train_kd_loss'] > 0 for row in summary)
    else:
        assert {'eval_model_top1', 'eval_model_nll', 'eval_model_ece'} <= columns
    (exit_record,) = [r['exit'] for r in records if r['type'] == 'exit']
    assert exit_record.get('exit_code', 0) == 0


def test_wandb_resume_id_continues_that_run(data, tmp_path, wandb_dir, monkeypatch):
    argv = tiny_args(data, tmp_path / 'out', 'resumed', '--log-wandb', epochs=EPOCHS)
    train_in_process([*argv, '--stop-epoch', '1'])
    (first,) = [r['run'] for r in wandb_records(wandb_dir) if r['type'] == 'run']
    # A new W&B service for the resumed run, writing elsewhere, as a later job would.
    wandb.teardown()
    resumed_root = use_offline_wandb(monkeypatch, tmp_path / 'wandb-resumed')
    run_dir = train_in_process([*argv, '--resume', 'auto', '--wandb-resume-id', first['run_id']])
    records = wandb_records(resumed_root)
    (start,) = [r['run'] for r in records if r['type'] == 'run']
    assert start['run_id'] == first['run_id']
    assert start.get('resume') is True and not first.get('resume')  # resume='must', as timm asks for it
    history = [{k: v for k, v in r['history']['item'].items() if k not in WANDB_KEYS}
               for r in records if r['type'] == 'history']
    assert history == read_summary(run_dir)[1:]


@pytest.mark.parametrize('run', list(RUNS))
def test_tensorboard_scalars_equal_summary_rows(run, data, tmp_path):
    log_dir = tmp_path / 'tb' / run
    argv = tiny_args(data, tmp_path / 'out', f'tb-{run}', *RUNS[run], '--log-tensorboard', log_dir, epochs=EPOCHS)
    summary = read_summary(train_in_process(argv))
    scalars = tensorboard_scalars(log_dir)
    assert set(scalars) == set(summary[0]) - {'epoch'}
    for tag, by_step in scalars.items():
        # Event files hold float32 scalars: each is summary.csv's value rounded to float32, at step = epoch.
        assert by_step == {row['epoch']: float(np.float32(row[tag])) for row in summary}, tag
    assert {'train_kd_loss', 'eval_nll', 'eval_ece'} <= set(scalars)
    if run == 'ema':
        assert {'eval_model_top1', 'eval_model_nll', 'eval_model_ece'} <= set(scalars)


def test_failed_run_closes_its_loggers(data, tmp_path, wandb_dir):
    """A run stopped by a non-finite loss keeps the epochs it logged: TensorBoard flushed and W&B marked failed."""
    log_dir = tmp_path / 'tb'
    # Epoch 0 warms up at a tiny learning rate; epoch 1 starts at 1e30 and diverges.
    argv = tiny_args(data, tmp_path / 'out', 'diverge', '--lr', '1e30', '--warmup-epochs', '1', '--warmup-lr', '1e-6',
                     '--log-tensorboard', log_dir, '--log-wandb', epochs=3)
    assert call_main(argv) == 1
    summary = read_summary(run_dir_of(argv))
    assert [row['epoch'] for row in summary] == [0]
    scalars = tensorboard_scalars(log_dir)
    assert scalars['train_loss'] == {row['epoch']: float(np.float32(row['train_loss'])) for row in summary}
    records = wandb_records(wandb_dir)
    assert len([r for r in records if r['type'] == 'history']) == len(summary)
    (exit_record,) = [r['exit'] for r in records if r['type'] == 'exit']
    assert exit_record['exit_code'] == 1


@pytest.mark.slow
def test_tensorboard_is_flushed_every_epoch(data, tmp_path):
    """A run killed (SIGKILL: nothing is closed) keeps on disk the scalars of every epoch it logged."""
    log_dir, output = tmp_path / 'tb', tmp_path / 'out'
    argv = tiny_args(data, output, 'killed', '--log-tensorboard', log_dir, epochs=500)
    summary_file = output / 'killed' / 'summary.csv'
    # Three rows in summary.csv: epochs 0 and 1 went through log_epoch (it runs before the next epoch trains).
    sigkill_when(argv, lambda: summary_file.exists() and len(summary_file.read_text().splitlines()) >= 4,
                 'three epochs', tmp_path / 'killed.log')
    summary = read_summary(output / 'killed')
    scalars = tensorboard_scalars(log_dir)
    assert set(scalars) == set(summary[0]) - {'epoch'}
    for tag, by_step in scalars.items():
        assert len(by_step) >= 2, tag
        assert by_step == {row['epoch']: float(np.float32(row[tag])) for row in summary[:len(by_step)]}, tag


def test_log_tensorboard_is_a_new_flag_in_its_own_group():
    parser = create_parser()
    (action,) = [a for a in parser._actions if a.dest == 'log_tensorboard']
    assert action.option_strings == ['--log-tensorboard'] and action.default is None
    (group,) = [g for g in parser._action_groups if action in g._group_actions]
    assert group.title == 'Logging'
    timm_reference = json.loads((Path(__file__).parent / 'data' / 'timm_train_args.json').read_text())['args']
    assert 'log_tensorboard' not in {entry['dest'] for entry in timm_reference}


@pytest.fixture(scope='module')
def paths(tmp_path_factory, data) -> SimpleNamespace:
    root = tmp_path_factory.mktemp('logger-paths')
    a_file = root / 'a-file'
    a_file.write_text('not a folder')
    return SimpleNamespace(data=data, file=a_file, under_file=a_file / 'tb')


# id -> (extra flags from the paths, words the one error line must contain, modules made unimportable)
BAD_INPUT = {
    'wandb-resume-id-without-resume': (
        lambda p: ['--log-wandb', '--wandb-resume-id', 'abc123'], ['--wandb-resume-id', '--resume'], ()),
    'tensorboard-dir-is-a-file': (
        lambda p: ['--log-tensorboard', p.file], ['--log-tensorboard', 'a-file', 'not a folder'], ()),
    'tensorboard-dir-under-a-file': (
        lambda p: ['--log-tensorboard', p.under_file], ['--log-tensorboard', 'a-file', 'not a folder'], ()),
    'tensorboard-dir-empty': (lambda p: ['--log-tensorboard', ''], ['--log-tensorboard', 'empty'], ()),
    'wandb-project-with-slash': (
        lambda p: ['--log-wandb', '--wandb-project', 'team/project'], ['--log-wandb', "'team/project'"], ()),
    'wandb-tag-too-long': (
        lambda p: ['--log-wandb', '--wandb-tags', 'ok', 'x' * 65], ['--log-wandb', 'Tag', '65 characters'], ()),
    'wandb-not-installed': (lambda p: ['--log-wandb'], ['--log-wandb', 'wandb', 'not installed'], ('wandb',)),
    'tensorboard-not-installed': (
        lambda p: ['--log-tensorboard', p.file.parent / 'tb'], ['--log-tensorboard', 'tensorboard', 'not installed'],
        ('torch.utils.tensorboard',)),
}


def test_wandb_refusing_to_start_is_one_line(data, tmp_path, wandb_dir, monkeypatch, capsys):
    """What W&B only finds out when the run starts (here: online without a login) is one line and exit 2; the
    run folder exists by then, as in timm, which starts W&B after writing it."""
    monkeypatch.setenv('WANDB_MODE', 'online')
    # Nothing may leave the machine: any connection W&B tries goes to a closed local port.
    monkeypatch.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')
    monkeypatch.setenv('HOME', str(tmp_path))
    log_dir = tmp_path / 'tb'
    argv = tiny_args(data, tmp_path / 'out', 'no-login', '--log-wandb', '--log-tensorboard', log_dir)
    assert call_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and 'W&B could not start the run' in lines[0] and 'API key' in lines[0], lines
    assert run_dir_of(argv).is_dir() and not list(run_dir_of(argv).glob('*.pth.tar'))
    assert not log_dir.exists(), 'TensorBoard was started for a run that could not start'


@pytest.mark.parametrize('case', list(BAD_INPUT))
def test_bad_logging_input_is_one_line_before_any_output(case, paths, tmp_path, capsys, monkeypatch):
    extra, words, missing = BAD_INPUT[case]
    for module in missing:
        # What Python does when a package is absent: the import raises ImportError.
        monkeypatch.setitem(sys.modules, module, None)
    output = tmp_path / 'out'
    code = call_main(tiny_args(paths.data, output, 'bad', *extra(paths)))
    assert code == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert 'error:' in lines[0] and 'Traceback' not in stderr
    for word in words:
        assert word in lines[0], f'{word!r} not in {lines[0]!r}'
    assert not output.exists()
    assert not (paths.file.parent / 'tb').exists()
