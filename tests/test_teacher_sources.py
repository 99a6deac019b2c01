"""Teachers from the Hub (``hf-hub:org/name[@rev]``) and from timm's pretrained weights (``pretrained[:TAG]``).

All offline: the networks are made here, written with timm's ``save_for_hf`` and laid out in a hand-built Hub cache
(``models--org--name/refs/REV`` -> ``snapshots/COMMIT/{config.json, model.safetensors}``) with HF_HUB_OFFLINE=1.
The teacher must be exactly the saved network (logits equal bit for bit), whether built with
``create_self_teacher``, with ``create_tfkd_task`` from Tf-KD flags on any timm-style parser, or by the trainer's
own steps; a source missing from the cache is one line, quickly, and exit code 2 from the trainer.
"""
import argparse
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import save_for_hf

from timm_tfkd import TeacherError, add_tfkd_args, create_self_teacher, create_tfkd_task

from conftest import publish_to_cache, write_image_folder
from _train_helpers import (
    build_task, call_main, run_subprocess, script_command, tiny_args,
)

pytestmark = pytest.mark.usefixtures('offline_hub')

K = 5
HALF = (0.5, 0.5, 0.5)  # test_resnet's normalization: the student's and the teacher's, so no re-normalization
HUB_REPO = 'org/tfkd-teacher'
# Where timm finds test_resnet's pretrained weights (its pretrained_cfg), and how many classes they have.
PRETRAINED_REPO, PRETRAINED_TAG, PRETRAINED_CLASSES = 'timm/test_resnet.r160_in1k', 'r160_in1k', 1000


def _network(seed: int, num_classes: int = K) -> nn.Module:
    """A distinct test_resnet per seed, with non-trivial batch norm statistics."""
    torch.manual_seed(seed)
    model = timm.create_model('test_resnet', num_classes=num_classes, pretrained=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _publish(cache: Path, repo_id: str, model: nn.Module, folder: Path, revision: str = 'main') -> None:
    save_for_hf(model, folder, safe_serialization=True)
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']
    publish_to_cache(cache, repo_id, folder, revision)


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _assert_is(teacher: nn.Module, network: nn.Module) -> None:
    images = _images()
    with torch.no_grad():
        expected = network(images)
    assert torch.equal(teacher(images), expected)


def _api_task(student: nn.Module, *flags):
    """create_tfkd_task from the Tf-KD flags on a plain parser, as a copy of timm's train.py would have them."""
    parser = argparse.ArgumentParser()
    add_tfkd_args(parser)
    args = parser.parse_args([str(f) for f in flags])
    args.model, args.smoothing = 'test_resnet', 0.0
    return create_tfkd_task(args, student, verbose=False)


@pytest.fixture
def hub_networks(offline_hub, tmp_path):
    """Two revisions of one Hub repo: main and v1, different weights."""
    main, v1 = _network(1), _network(2)
    _publish(offline_hub, HUB_REPO, main, tmp_path / 'main')
    _publish(offline_hub, HUB_REPO, v1, tmp_path / 'v1', revision='v1')
    return {'main': main, 'v1': v1}


@pytest.fixture
def pretrained_network(offline_hub, tmp_path):
    """test_resnet's "pretrained weights", made here and put where timm looks for them."""
    assert timm.create_model('test_resnet').pretrained_cfg['hf_hub_id'] == PRETRAINED_REPO
    network = _network(3, PRETRAINED_CLASSES)
    _publish(offline_hub, PRETRAINED_REPO, network, tmp_path / 'pretrained')
    return network


@pytest.mark.parametrize('revision', ['main', 'v1'])
def test_hf_hub_teacher_is_the_published_network(hub_networks, revision):
    source = f'hf-hub:{HUB_REPO}' + ('' if revision == 'main' else f'@{revision}')
    teacher = create_self_teacher(source, None, K, 3, HALF, HALF)
    _assert_is(teacher, hub_networks[revision])
    assert teacher.identity['source'] == source


@pytest.mark.parametrize('mode', ['self', 'kd'])
@pytest.mark.parametrize('route', ['trainer', 'api'])
def test_hf_hub_teacher_from_flags(hub_networks, mode, route):
    flags = ['--tfkd-mode', mode, '--tfkd-teacher-checkpoint', f'hf-hub:{HUB_REPO}@v1']
    if route == 'trainer':
        _, task = build_task(['--model', 'test_resnet', '--num-classes', K, '--img-size', 16, *flags])
    else:
        task = _api_task(timm.create_model('test_resnet', num_classes=K), *flags)
    _assert_is(task.teacher, hub_networks['v1'])


@pytest.mark.parametrize('source', ['pretrained', f'pretrained:{PRETRAINED_TAG}'])
def test_pretrained_teacher_is_timms_weights_of_the_architecture(pretrained_network, source):
    teacher = create_self_teacher(source, 'test_resnet', PRETRAINED_CLASSES, 3, HALF, HALF)
    _assert_is(teacher, pretrained_network)


@pytest.mark.parametrize('source', ['pretrained', f'pretrained:{PRETRAINED_TAG}'])
@pytest.mark.parametrize('mode, student', [('self', 'test_resnet'), ('kd', 'test_convnext')])
@pytest.mark.parametrize('route', ['trainer', 'api'])
def test_pretrained_teacher_from_flags(pretrained_network, source, mode, student, route):
    flags = ['--tfkd-mode', mode, '--tfkd-teacher-checkpoint', source]
    if mode == 'kd':
        flags += ['--tfkd-teacher-model', 'test_resnet']
    if route == 'trainer':
        _, task = build_task(['--model', student, '--num-classes', PRETRAINED_CLASSES, '--img-size', 16, *flags])
    else:
        task = _api_task(timm.create_model(student, num_classes=PRETRAINED_CLASSES), *flags)
    _assert_is(task.teacher, pretrained_network)


def test_pretrained_teacher_with_other_classes_than_the_student_is_refused(pretrained_network):
    """timm would load the backbone and leave a freshly initialized head: no teacher at all."""
    with pytest.raises(TeacherError) as error:
        create_self_teacher('pretrained', 'test_resnet', K, 3, HALF, HALF)
    message = str(error.value)
    assert '\n' not in message
    assert f'{PRETRAINED_CLASSES} classes' in message and f'student: {K}' in message


def test_unknown_pretrained_tag_is_refused_even_with_the_default_weights_at_hand(pretrained_network):
    """The tag picks the weights: it must never be dropped in favour of the architecture's default ones."""
    with pytest.raises(TeacherError) as error:
        create_self_teacher('pretrained:no_such_tag', 'test_resnet', PRETRAINED_CLASSES, 3, HALF, HALF)
    message = str(error.value)
    assert '\n' not in message and 'test_resnet.no_such_tag' in message


@pytest.mark.parametrize('source, named', [
    (f'hf-hub:{HUB_REPO}-missing', f'hf-hub:{HUB_REPO}-missing'),
    ('pretrained', 'test_resnet'),  # nothing in the cache for timm's weights either
])
def test_source_missing_from_the_cache_is_one_line(source, named):
    start = time.monotonic()
    with pytest.raises(TeacherError) as error:
        create_self_teacher(source, 'test_resnet', PRETRAINED_CLASSES, 3, HALF, HALF)
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert '\n' not in message and named in message


def _missing_teacher_run(tmp_path: Path) -> list:
    data = write_image_folder(tmp_path / 'data', per_class=3)  # 9 images: one batch of 8
    return tiny_args(data, tmp_path / 'out', 'missing-teacher', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint',
                     f'hf-hub:{HUB_REPO}-missing')


def _check_one_line_exit_2(code: int, stderr: str, output: Path) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert 'error:' in lines[0] and f'hf-hub:{HUB_REPO}-missing' in lines[0]
    assert not output.exists()


def test_trainer_with_a_hub_teacher_missing_from_the_cache_exits_2(tmp_path, capsys):
    start = time.monotonic()
    code = call_main(_missing_teacher_run(tmp_path))
    assert time.monotonic() - start < 60
    _check_one_line_exit_2(code, capsys.readouterr().err, tmp_path / 'out')


@pytest.mark.slow
def test_trainer_script_with_a_hub_teacher_missing_from_the_cache_exits_2(tmp_path):
    """A real process, offline through the environment alone: it must fail, not wait on the network."""
    result = run_subprocess(script_command(_missing_teacher_run(tmp_path)), timeout=120)
    _check_one_line_exit_2(result.returncode, result.stderr, tmp_path / 'out')
