"""End-to-end runs of the trainer for every Tf-KD mode: in-process, as a script, as the console command, and
replayed from the ``args.yaml`` a run wrote."""
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from timm_tfkd.checkpoint_io import read_checkpoint
from _train_helpers import (
    CONSOLE_SCRIPT, assert_run_files, assert_state_dicts_equal, load_state_dict, read_run_info, read_summary, run_subprocess, script_command, summary_columns, tiny_args, train_in_process,
)

pytestmark = pytest.mark.slow

# With an EMA, summary.csv's eval_* hold the EMA's metrics (as timm) and these the model's.
MODEL_COLUMNS = ('eval_model_loss', 'eval_model_top1', 'eval_model_top5', 'eval_model_nll', 'eval_model_ece')


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def teacher_run(workdir, data_dir) -> Path:
    """Mode none (plain timm training) with an EMA: also the Tf-KD-self teacher of the later runs."""
    return train_in_process(tiny_args(data_dir, workdir / 'out', 'none-ema', '--model-ema',
                                      '--model-ema-decay', '0.5'))


@pytest.fixture(scope='module')
def kd_teacher_run(workdir, data_dir) -> Path:
    """Mode lsr on another architecture: also the teacher of the kd run."""
    return train_in_process(tiny_args(data_dir, workdir / 'out', 'lsr-effnet', '--tfkd-mode', 'lsr',
                                      '--smoothing', '0.2', model='test_efficientnet'))


@pytest.fixture(scope='module')
def reg_official_run(workdir, data_dir) -> Path:
    return train_in_process(tiny_args(data_dir, workdir / 'out', 'reg-official-mixup', '--tfkd-mode', 'reg',
                                      '--tfkd-formula', 'official', '--mixup', '0.8', '--seed', '3'))


def _check_common(run_dir: Path, mode: str, epochs: int = 1) -> dict:
    assert_run_files(run_dir, epochs)
    info = read_run_info(run_dir)
    assert info['tfkd']['mode'] == mode
    assert info['class_names'] == ['class_0', 'class_1', 'class_2']
    assert info['num_classes'] == 3 and info['in_chans'] == 3
    assert info['epochs'] == epochs
    assert set(info['final_metrics']) >= {'top1', 'top5', 'nll', 'ece'}
    return info


def _check_teacher_identity(info: dict, checkpoint_file: Path, model: str, workdir: Path) -> None:
    teacher = info['tfkd']['teacher']
    assert teacher is not None
    assert teacher['model'] == model
    assert teacher['sha256'] == _sha256(checkpoint_file)
    assert not Path(teacher['source']).is_absolute()
    # No absolute path of this machine anywhere in the record.
    assert str(workdir) not in json.dumps(info)


def test_mode_none_with_model_ema(teacher_run):
    info = _check_common(teacher_run, 'none')
    assert info['tfkd']['teacher'] is None
    assert info['tfkd']['smoothing'] == pytest.approx(0.1)  # timm's default, untouched with Tf-KD off
    assert set(MODEL_COLUMNS) <= set(summary_columns(teacher_run))
    assert info['final_ema_metrics'] is not None
    row = read_summary(teacher_run)[-1]
    assert row['eval_top1'] == info['final_ema_metrics']['top1']
    assert row['eval_model_top1'] == info['final_metrics']['top1']
    assert row['train_kd_loss'] == 0.0
    assert row['train_task_loss'] == pytest.approx(row['train_loss'])
    assert 'state_dict_ema' in read_checkpoint(str(teacher_run / 'last.pth.tar'))


def test_mode_lsr(kd_teacher_run):
    info = _check_common(kd_teacher_run, 'lsr')
    assert info['model'] == 'test_efficientnet'
    assert info['tfkd']['smoothing'] == pytest.approx(0.2)
    assert info['tfkd']['teacher'] is None
    assert not any(c.startswith('eval_model_') for c in summary_columns(kd_teacher_run))
    assert read_summary(kd_teacher_run)[-1]['train_kd_loss'] == 0.0


def test_mode_reg_official_with_mixup(reg_official_run):
    info = _check_common(reg_official_run, 'reg')
    assert info['tfkd']['formula'] == 'official'
    assert info['tfkd']['teacher'] is None
    assert info['tfkd']['smoothing'] == 0.0  # timm's default smoothing is not stacked on Tf-KD
    row = read_summary(reg_official_run)[-1]
    assert row['train_kd_loss'] > 0
    assert row['train_task_loss'] > 0


def test_mode_self_with_teacher_run_folder(workdir, data_dir, teacher_run):
    run = train_in_process(tiny_args(data_dir, workdir / 'out', 'self', '--tfkd-mode', 'self',
                                     '--tfkd-teacher-checkpoint', teacher_run, '--tfkd-alpha', '0.5'))
    info = _check_common(run, 'self')
    # A run folder as teacher: its model_best checkpoint, named by the folder's name only.
    _check_teacher_identity(info, teacher_run / 'model_best.pth.tar', 'test_resnet', workdir)
    assert info['tfkd']['teacher']['source'] == teacher_run.name
    assert read_summary(run)[-1]['train_kd_loss'] > 0
    # The frozen teacher never enters the student's checkpoint.
    assert not any('teacher' in key for key in load_state_dict(run / 'last.pth.tar'))


def test_mode_kd_with_other_architecture(workdir, data_dir, kd_teacher_run):
    checkpoint = kd_teacher_run / 'last.pth.tar'
    run = train_in_process(tiny_args(data_dir, workdir / 'out', 'kd', '--tfkd-mode', 'kd',
                                     '--tfkd-teacher-model', 'test_efficientnet',
                                     '--tfkd-teacher-checkpoint', checkpoint, '--tfkd-temperature', '4'))
    info = _check_common(run, 'kd')
    assert info['model'] == 'test_resnet'
    _check_teacher_identity(info, checkpoint, 'test_efficientnet', workdir)
    assert info['tfkd']['teacher']['source'] == 'last.pth.tar'
    assert read_summary(run)[-1]['train_kd_loss'] > 0
    assert not any('teacher' in key for key in load_state_dict(run / 'last.pth.tar'))


def test_script_as_subprocess(workdir, data_dir):
    output = workdir / 'out-script'
    result = run_subprocess(script_command(tiny_args(data_dir, output, 'reg-paper', '--tfkd-mode', 'reg',
                                                     epochs=2)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    run = output / 'reg-paper'
    assert_run_files(run, 2, extra=('checkpoint-0.pth.tar', 'checkpoint-1.pth.tar'))
    info = read_run_info(run)
    assert info['tfkd']['mode'] == 'reg' and info['tfkd']['formula'] == 'paper'
    assert all(row['train_kd_loss'] > 0 for row in read_summary(run))
    assert str(run) in result.stdout  # "Checkpoints and summary in <run folder>"


def test_console_script(workdir, data_dir):
    assert CONSOLE_SCRIPT.is_file(), f'{CONSOLE_SCRIPT} is not installed (pip install -e .)'
    output = workdir / 'out-console'
    result = run_subprocess([CONSOLE_SCRIPT, *tiny_args(data_dir, output, 'lsr', '--tfkd-mode', 'lsr')])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    _check_common(output / 'lsr', 'lsr')


def test_args_yaml_replays_the_same_settings(workdir, reg_official_run):
    output = workdir / 'out-replay'
    replay = train_in_process(['-c', reg_official_run / 'args.yaml', '--output', output,
                               '--experiment', 'replayed'])
    with open(reg_official_run / 'args.yaml') as f:
        original = yaml.safe_load(f)
    with open(replay / 'args.yaml') as f:
        replayed = yaml.safe_load(f)
    assert replayed['output'] == str(output) and replayed['experiment'] == 'replayed'
    for settings in (original, replayed):
        del settings['output'], settings['experiment']
    assert replayed == original
    # The resolved settings (not only the flags) are the same: smoothing policy, Tf-KD block, data config.
    original_info, replayed_info = read_run_info(reg_official_run), read_run_info(replay)
    assert replayed_info['tfkd'] == original_info['tfkd']
    assert replayed_info['data_config'] == original_info['data_config']
    # Same seed, same settings, same process: the same training, bit for bit.
    assert read_summary(replay) == read_summary(reg_official_run)
    assert_state_dicts_equal(load_state_dict(replay / 'last.pth.tar'),
                             load_state_dict(reg_official_run / 'last.pth.tar'))
