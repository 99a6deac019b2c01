"""Bad input to the trainer: exit code 2, exactly one line on stderr naming the problem, no traceback, and no
output folder."""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from timm.models import create_model

from conftest import write_image_folder
from _train_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    call_main, one_torch_thread, run_subprocess, script_command, tiny_args,
)


def _save_teacher(path: Path, model_name: str, num_classes: int = 3, in_chans: int = 3) -> Path:
    """A timm-style training checkpoint of a freshly built model (no training needed to test the checks)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes, in_chans=in_chans)
    torch.save({'epoch': 0, 'arch': model_name, 'state_dict': model.state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def paths(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp('bad-input')
    empty = root / 'empty'
    empty.mkdir()
    corrupt = root / 'corrupt.pth.tar'
    corrupt.write_bytes(os.urandom(4096))
    bad_yaml = root / 'bad.yaml'
    bad_yaml.write_text('batch_size: 8\nno_such_option: 1\n')
    teachers = root / 'teachers'
    teachers.mkdir()
    return SimpleNamespace(
        data=write_image_folder(root / 'data', per_class=3),  # 9 images: one batch of 8
        gray=write_image_folder(root / 'gray', per_class=3, channels=1),
        no_val=write_image_folder(root / 'no-val', per_class=3, splits=('train',)),
        empty=empty,
        missing=root / 'does-not-exist',
        corrupt=corrupt,
        bad_yaml=bad_yaml,
        teacher_effnet=_save_teacher(teachers / 'effnet.pth.tar', 'test_efficientnet'),
        teacher_5_classes=_save_teacher(teachers / 'resnet-5-classes.pth.tar', 'test_resnet', num_classes=5),
        teacher_rgb=_save_teacher(teachers / 'resnet-rgb.pth.tar', 'test_resnet'),
    )


def _args(data, *extra, **kwargs):
    return lambda p, out: tiny_args(getattr(p, data), out, 'bad', *extra, **kwargs)


# id -> (argv builder (paths, output) -> argv, words the error line must contain)
CASES = {
    'unknown-model': (_args('data', model='no_such_model_xyz'), ['unknown model', 'no_such_model_xyz']),
    'missing-data-dir': (_args('missing'), ['--data-dir', 'does-not-exist', 'not a folder']),
    'empty-data-dir': (_args('empty'), ['--data-dir', 'empty']),
    'missing-validation-split': (_args('no_val'), ["'validation'", 'split']),
    'teacher-missing': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint',
                                 p.missing / 'teacher.pth.tar'),
        ['teacher', 'does not exist']),
    'teacher-corrupt': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint', p.corrupt),
        ['corrupt.pth.tar', 'corrupt']),
    'teacher-other-architecture': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint',
                                 p.teacher_effnet),
        ['teacher', 'test_resnet', 'does not fit']),
    'teacher-other-num-classes': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint',
                                 p.teacher_5_classes),
        ['teacher', '5 classes']),
    'teacher-other-in-chans': (
        lambda p, out: tiny_args(p.gray, out, 'bad', '--in-chans', '1', '--tfkd-mode', 'kd',
                                 '--tfkd-teacher-model', 'test_resnet', '--tfkd-teacher-checkpoint', p.teacher_rgb),
        ['teacher', '3 input channels']),
    'self-without-teacher': (_args('data', '--tfkd-mode', 'self'), ['--tfkd-mode self', '--tfkd-teacher-checkpoint']),
    'alpha-out-of-range': (_args('data', '--tfkd-mode', 'reg', '--tfkd-alpha', '1.5'), ['--tfkd-alpha', '1.5']),
    'temperature-zero': (_args('data', '--tfkd-mode', 'reg', '--tfkd-temperature', '0'), ['--tfkd-temperature']),
    'correct-prob-below-1-over-k': (
        _args('data', '--tfkd-mode', 'reg', '--tfkd-correct-prob', '0.2'), ['--tfkd-correct-prob', '0.2', 'K=3']),
    'unsupported-flag': (_args('data', '--naflex-loader'), ['--naflex-loader', 'not supported']),
    'kd-model-name-with-tfkd': (
        _args('data', '--kd-model-name', 'resnet18', '--tfkd-mode', 'reg'), ['--kd-model-name', '--tfkd-mode reg']),
    'resume-missing-file': (
        lambda p, out: tiny_args(p.data, out, 'bad', '--resume', p.missing / 'last.pth.tar'),
        ['--resume', 'does not exist']),
    'config-unknown-key': (
        lambda p, out: ['-c', p.bad_yaml, *tiny_args(p.data, out, 'bad')], ["'no_such_option'", 'unknown key']),
}

# These go through a real process too: an argparse-level failure and one found after logging has started.
SUBPROCESS_CASES = ('config-unknown-key', 'teacher-corrupt')


def _check_error(code: int, stderr: str, words, output: Path) -> None:
    assert code == 2, stderr
    assert 'Traceback' not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f'stderr has {len(lines)} lines:\n{stderr}'
    assert 'error:' in lines[0]
    for word in words:
        assert word in lines[0], f'{word!r} not in {lines[0]!r}'
    assert not output.exists(), f'{output} was created'


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_in_process(case, paths, tmp_path, capsys):
    build, words = CASES[case]
    output = tmp_path / 'out'
    code = call_main(build(paths, output))
    _check_error(code, capsys.readouterr().err, words, output)


@pytest.mark.slow
@pytest.mark.parametrize('case', SUBPROCESS_CASES)
def test_bad_input_subprocess(case, paths, tmp_path):
    build, words = CASES[case]
    output = tmp_path / 'out'
    result = run_subprocess(script_command(build(paths, output)), timeout=120)
    _check_error(result.returncode, result.stderr, words, output)
