"""The Tf-KD training tasks inside timm's own machinery: optimizer, Mixup, EMA, checkpoints, compile and DDP.

Every task is built the way timm's train.py would build it: arguments from a parser carrying the Tf-KD group,
the optimizer from ``task.get_trainable_module()``, checkpoints through ``CheckpointSaver(task=...)`` and resumes
through ``timm.task.resume_task_checkpoint`` / ``load_task_ema_checkpoint``.
"""
import argparse
import socket

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import Mixup, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import CheckpointSaver, unwrap_model
from torch.nn.parallel import DistributedDataParallel

import timm_tfkd
from timm_tfkd import SelfTeacher, TeacherError, TfKDRegTask, TfKDSelfTask, create_self_teacher, create_tfkd_task

K = 5  # classes
IMG = 32  # input resolution
BATCH = 4
LR = 0.1
MODES = ('none', 'lsr', 'reg', 'self', 'kd')
KD_TERM_MODES = ('reg', 'self', 'kd')  # the modes whose result carries task_loss / kd_loss
TEACHER_MODES = ('self', 'kd')

# Every mode on three different families (CNN, modern CNN, transformer); one mode each on the others.
FULL_FAMILIES = ('test_resnet', 'test_convnext', 'test_vit')
ROTATING = (
    ('test_efficientnet', 'self'),
    ('mobilenetv3_small_050', 'reg'),
    ('regnetx_002', 'kd'),
    ('densenet121', 'lsr'),
    ('cifar_resnet18', 'self'),
    ('test_byobnet', 'kd'),
    ('test_efficientnet', 'none'),
)
CASES = [(name, mode) for name in FULL_FAMILIES for mode in MODES] + list(ROTATING)
# kd teachers are other architectures; most have other input statistics than their student, so the teacher's
# re-normalization is on the training path too.
KD_TEACHER = {
    'test_resnet': 'test_efficientnet',
    'test_convnext': 'test_byobnet',
    'test_vit': 'test_resnet',
    'regnetx_002': 'test_convnext',
    'test_byobnet': 'test_vit',
}



def _model(name, seed=0, num_classes=K):
    torch.manual_seed(seed)
    kwargs = {'img_size': IMG} if 'vit' in name else {}  # ViT position embeddings follow the input size
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _args(name, *flags):
    """Arguments as timm's train.py has them: its parser plus the Tf-KD group (only the timm flags used here)."""
    parser = argparse.ArgumentParser()
    timm_tfkd.add_tfkd_args(parser)
    args = parser.parse_args(list(flags))
    args.smoothing = 0.1  # train.py's --smoothing default
    args.model = name
    return args


def _teacher(student, teacher_name, seed):
    """A frozen teacher from a freshly initialized module, fed the student's normalized input."""
    config = resolve_data_config({}, model=student)
    return create_self_teacher(_model(teacher_name, seed=seed), teacher_name, K, 3, config['mean'], config['std'])


def _task(name, mode, seed=0, num_classes=K):
    """The task for ``mode``; self uses the student's architecture as teacher, kd another one."""
    model = _model(name, seed=seed, num_classes=num_classes)
    teacher = None
    if mode == 'self':
        teacher = _teacher(model, name, seed + 100)  # other seed: the teacher must not equal the student
    elif mode == 'kd':
        teacher = _teacher(model, KD_TEACHER.get(name, 'test_efficientnet'), seed + 100)
    return create_tfkd_task(_args(name, '--tfkd-mode', mode), model, teacher=teacher)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, IMG, IMG, generator=g), torch.randint(0, K, (BATCH,), generator=g)


def _optimizer(task):
    # timm's train.py builds the optimizer from the trainable module alone. Classical momentum (timm's 'sgd' is
    # Nesterov) makes the first step exactly p - lr * grad, which _assert_student_steps checks.
    return create_optimizer_v2(task.get_trainable_module(), 'momentum', lr=LR, momentum=0.9)


def _step(task, optimizer, x, y):
    optimizer.zero_grad()
    result = task(x, y)
    result['loss'].backward()
    optimizer.step()
    return result


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state_equal(module, state):
    current = module.state_dict()
    assert set(current) == set(state)
    assert all(torch.equal(current[k], state[k]) for k in state), 'weights changed'


def _student(task):
    return unwrap_model(task.get_trainable_module())


def _assert_student_steps(task, mode, seed=0):
    """One optimizer step: the result dict is complete and finite, and the step is SGD on the student's gradient."""
    task.train()
    student = _student(task)
    optimizer = _optimizer(task)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = _step(task, optimizer, *_batch(seed))

    expected = {'loss', 'output'} | ({'task_loss', 'kd_loss'} if mode in KD_TERM_MODES else set())
    assert expected <= set(result)
    assert result['output'].shape == (BATCH, K)
    assert result['loss'].ndim == 0 and torch.isfinite(result['loss'])
    if mode in KD_TERM_MODES:
        assert torch.isfinite(result['task_loss']) and torch.isfinite(result['kd_loss'])
        # The logged parts must be the parts of the optimized loss.
        alpha = task.criterion.alpha
        torch.testing.assert_close(result['loss'], (1 - alpha) * result['task_loss'] + alpha * result['kd_loss'])

    params = dict(student.named_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values()), 'no student gradient'
    for n, p in params.items():
        # The first step is p - lr * grad. Compared with a tolerance, as tiny updates round away in float32
        # (ConvNeXt's norm weights); that the step really moves the network is checked right below.
        expected = before[n] if p.grad is None else before[n] - LR * p.grad
        torch.testing.assert_close(p.detach(), expected, msg=lambda m: f'{n}: {m}')
    # Gradients reach both ends of the network: the first parameter (stem / embedding) and the classifier moved.
    head_ids = {id(p) for p in student.get_classifier().parameters()}
    ends = [next(iter(params))] + [n for n, p in params.items() if id(p) in head_ids]
    assert len(ends) == 3
    for n in ends:
        assert not torch.equal(params[n], before[n]), f'{n} did not move'
    return optimizer


def _assert_teacher_isolated(task):
    """The teacher is outside the optimizer's parameters, frozen, and in eval whatever the task's mode."""
    assert isinstance(task, TfKDSelfTask) and isinstance(task.teacher, SelfTeacher)
    teacher_ids = {id(p) for p in task.teacher.parameters()}
    assert teacher_ids  # else the disjointness below proves nothing
    assert not teacher_ids & {id(p) for p in task.get_trainable_module().parameters()}
    assert not any(p.requires_grad for p in task.teacher.parameters())
    task.train()
    assert _student(task).training
    assert not any(m.training for m in task.teacher.modules())


@pytest.mark.parametrize('name,mode', CASES, ids=[f'{n}-{m}' for n, m in CASES])
def test_training_step(name, mode):
    task = _task(name, mode)
    expected_type = {'none': ClassificationTask, 'lsr': ClassificationTask, 'reg': TfKDRegTask,
                     'self': TfKDSelfTask, 'kd': TfKDSelfTask}[mode]
    assert type(task) is expected_type
    if mode not in TEACHER_MODES:
        _assert_student_steps(task, mode)
        return
    _assert_teacher_isolated(task)
    teacher_state = _snapshot(task.teacher)
    optimizer = _assert_student_steps(task, mode)
    for seed in (1, 2):  # more steps: momentum and batch norm statistics must not reach the teacher
        _step(task, optimizer, *_batch(seed))
    _assert_state_equal(task.teacher, teacher_state)
    assert all(p.grad is None for p in task.teacher.parameters())


@pytest.mark.parametrize('speed_ups', [(), ('--tfkd-teacher-fuse-bn', '--tfkd-teacher-channels-last')])
def test_self_teacher_from_safetensors_flag(tmp_path, speed_ups):
    # --tfkd-teacher-model is not given: Tf-KD-self takes the architecture from --model.
    teacher_net = _model('test_resnet', seed=7).eval()
    path = tmp_path / 'teacher.safetensors'
    save_file(teacher_net.state_dict(), str(path))
    args = _args('test_resnet', '--tfkd-mode', 'self', '--tfkd-teacher-checkpoint', str(path), *speed_ups)
    task = create_tfkd_task(args, _model('test_resnet'))
    _assert_teacher_isolated(task)
    x, _ = _batch()
    # The plain teacher is the saved network bit for bit; fp32 speed-ups only reorder float arithmetic.
    tolerance = dict(rtol=1e-4, atol=1e-5) if speed_ups else dict(rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(task.teacher(x), teacher_net(x), **tolerance)
    teacher_state = _snapshot(task.teacher)
    optimizer = _assert_student_steps(task, 'self')
    _step(task, optimizer, *_batch(1))
    _assert_state_equal(task.teacher, teacher_state)


def test_kd_teacher_from_timm_checkpoint_flag(tmp_path):
    # The architecture comes from the args recorded in the timm training checkpoint.
    teacher_net = _model('test_efficientnet', seed=7)
    saver = CheckpointSaver(teacher_net, torch.optim.SGD(teacher_net.parameters(), lr=0.1),
                            args=argparse.Namespace(model='test_efficientnet'),
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, 1.0)
    args = _args('test_resnet', '--tfkd-mode', 'kd', '--tfkd-teacher-checkpoint', str(tmp_path / 'last.pth.tar'))
    student = _model('test_resnet')
    task = create_tfkd_task(args, student)
    _assert_teacher_isolated(task)
    assert task.teacher.identity['model'] == 'test_efficientnet'
    # Student input is normalized with (0.5, 0.5, 0.5); the ImageNet-trained teacher sees its own statistics.
    student_cfg, teacher_cfg = resolve_data_config({}, model=student), resolve_data_config({}, model=teacher_net)
    assert student_cfg['mean'] != teacher_cfg['mean']
    x, _ = _batch()
    pixels = x * torch.tensor(student_cfg['std']).view(1, 3, 1, 1) + torch.tensor(student_cfg['mean']).view(1, 3, 1, 1)
    teacher_x = (pixels - torch.tensor(teacher_cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(
        teacher_cfg['std']).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(task.teacher(x), teacher_net.eval()(teacher_x), rtol=1e-4, atol=1e-5)
    teacher_state = _snapshot(task.teacher)
    optimizer = _assert_student_steps(task, 'kd')
    _step(task, optimizer, *_batch(1))
    _assert_state_equal(task.teacher, teacher_state)


@pytest.mark.parametrize('mode', TEACHER_MODES)
def test_teacher_mode_without_teacher_or_checkpoint(mode):
    # A library caller who forgets the teacher gets the package's own error, naming the flag to set,
    # like every other teacher problem (and the trainer's `except ValueError`), not an AttributeError.
    args = _args('test_resnet', '--tfkd-mode', mode)
    with pytest.raises(TeacherError, match='--tfkd-teacher-checkpoint'):
        create_tfkd_task(args, _model('test_resnet'))


@pytest.mark.parametrize('mode', ['reg', 'self', 'lsr', 'kd'])
def test_mixup_soft_targets(mode):
    np.random.seed(0)  # Mixup draws lambda with numpy
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=K)
    x, y = _batch()
    x_mixed, target = mixup(x.clone(), y)
    assert target.shape == (BATCH, K) and target.is_floating_point()
    assert not torch.equal(target, F.one_hot(y, K).float())  # really mixed, not one-hot
    task = _task('test_resnet', mode)
    task.train()
    optimizer = _optimizer(task)
    result = _step(task, optimizer, x_mixed, target)
    assert all(torch.isfinite(result[key]) for key in result if key != 'output')
    assert all(torch.isfinite(p).all() for p in _student(task).parameters())

    # The dense path must agree with the class-index path on one-hot targets.
    task.eval()  # batch norm in eval: both forwards see the same network
    with torch.no_grad():
        hard = task(x, y)
        dense = task(x, F.one_hot(y, K).float())
    assert set(dense) == set(hard)
    for key in hard:
        # In float32 the KL is tau^2 times a difference of two O(1) sums: its rounding (~1e-7) is amplified by
        # tau^2 / KL, so the two paths agree to ~1e-5 relative, and how closely depends on the CPU's kernels.
        torch.testing.assert_close(dense[key], hard[key], rtol=5e-5, atol=1e-5)


@pytest.mark.parametrize('mode', ['reg', 'self'])
def test_ema_and_checkpoint_round_trip(tmp_path, mode):
    task = _task('test_resnet', mode)
    optimizer = _optimizer(task)
    task.setup_ema(decay=0.9)
    task.train()
    for i in range(3):
        _step(task, optimizer, *_batch(i))
        task.update_ema(step=i)
    student, ema = _student(task), unwrap_model(task.get_trainable_module(ema=True))
    student_state, ema_state = student.state_dict(), ema.state_dict()
    # The EMA lags the student, so matching each of them below tells the two apart.
    assert any(not torch.equal(student_state[k], ema_state[k]) for k in student_state)

    saver = CheckpointSaver(model=task.get_trainable_module(), optimizer=optimizer,
                            args=argparse.Namespace(model='test_resnet'), task=task,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(2, 0.5)
    path = str(tmp_path / 'last.pth.tar')
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    for key, expected in (('state_dict', student_state), ('state_dict_ema', ema_state)):
        saved = checkpoint[key]
        assert not [k for k in saved if 'teacher' in k]
        assert set(saved) == set(student_state)  # student keys only, no wrapper prefixes
        assert all(torch.equal(saved[k], expected[k]) for k in expected)

    new_task = _task('test_resnet', mode, seed=1)  # other initial weights, so the load is what makes them equal
    new_optimizer = _optimizer(new_task)
    new_task.setup_ema(decay=0.9)
    assert not torch.equal(_student(new_task).state_dict()['fc.weight'], student_state['fc.weight'])
    teacher_state = _snapshot(new_task.teacher) if mode == 'self' else None

    epoch = resume_task_checkpoint(new_task, path, optimizer=new_optimizer)
    load_task_ema_checkpoint(new_task, path)
    assert epoch == 3  # timm's version-2 checkpoints resume at the epoch after the saved one
    new_student, new_ema = _student(new_task), unwrap_model(new_task.get_trainable_module(ema=True))
    _assert_state_equal(new_student, checkpoint['state_dict'])
    _assert_state_equal(new_ema, checkpoint['state_dict_ema'])
    # Optimizer momentum resumes too, on the student's parameters.
    old_state, new_state = optimizer.state_dict()['state'], new_optimizer.state_dict()['state']
    assert old_state.keys() == new_state.keys() and old_state
    assert all(torch.equal(old_state[i]['momentum_buffer'], new_state[i]['momentum_buffer']) for i in old_state)
    if teacher_state is not None:
        _assert_state_equal(new_task.teacher, teacher_state)  # the checkpoint never touches the teacher


@pytest.mark.parametrize('mode', ['reg', 'self'])
def test_compile_eager(mode):
    task = _task('test_resnet', mode)
    compiled = task.compile(backend='eager')
    assert compiled is task.get_trainable_module()
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    if mode == 'self':
        _assert_teacher_isolated(task)
        teacher_state = _snapshot(task.teacher)
    optimizer = _assert_student_steps(task, mode)
    _step(task, optimizer, *_batch(1))
    if mode == 'self':
        _assert_state_equal(task.teacher, teacher_state)
    # Checkpoints see through the compile wrapper.
    assert set(task.get_checkpoint_state()['state_dict']) == set(_student(task).state_dict())


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_prepare_distributed_wraps_only_student():
    task = _task('test_resnet', 'self')
    teacher_state = _snapshot(task.teacher)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1)
    try:
        assert task.prepare_distributed() is task
        assert isinstance(task.get_trainable_module(), DistributedDataParallel)
        assert isinstance(task.teacher, SelfTeacher)
        assert not any(isinstance(m, DistributedDataParallel) for m in task.teacher.modules())
        _assert_teacher_isolated(task)
        optimizer = _assert_student_steps(task, 'self')
        _step(task, optimizer, *_batch(1))
        # Gradient accumulation goes through DDP's no_sync on the student.
        with task.no_sync():
            task(*_batch(2))['loss'].backward()
        _step(task, optimizer, *_batch(3))
        _assert_state_equal(task.teacher, teacher_state)
        assert set(task.get_checkpoint_state()['state_dict']) == set(_student(task).state_dict())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('correct_prob', ['0.2', '0.1'])
def test_reg_rejects_correct_prob_not_above_one_over_k(correct_prob):
    args = _args('test_resnet', '--tfkd-mode', 'reg', '--tfkd-correct-prob', correct_prob)
    with pytest.raises(ValueError, match='K=5'):  # the bound comes from the model's K
        create_tfkd_task(args, _model('test_resnet', num_classes=5))


def test_reg_correct_prob_bound_follows_model_classes():
    # 0.2 is 1/K for K=5 (rejected above) but above 1/K for K=10, and 0.21 is above 1/5.
    args = _args('test_resnet', '--tfkd-mode', 'reg', '--tfkd-correct-prob', '0.2')
    assert isinstance(create_tfkd_task(args, _model('test_resnet', num_classes=10)), TfKDRegTask)
    args = _args('test_resnet', '--tfkd-mode', 'reg', '--tfkd-correct-prob', '0.21')
    assert isinstance(create_tfkd_task(args, _model('test_resnet', num_classes=5)), TfKDRegTask)


def test_self_task_state_dict_leaves_the_teacher_out():
    task = _task('test_resnet', 'self')
    state = task.state_dict()
    assert state and not any('teacher' in key for key in state)
    assert set(state) == {f'trainable_module.{key}' for key in _student(task).state_dict()}
    fresh = _task('test_resnet', 'self', seed=1)
    assert not fresh.load_state_dict(state).missing_keys
    _assert_state_equal(_student(fresh), {k[len('trainable_module.'):]: v for k, v in state.items()})
