"""The frozen teacher: every source, every mismatch, normalization, and the speed-ups: each does what it says
(norms folded, weights in channels_last or the lower dtype), moves the logits (so it is not a no-op) by no more
than its documented bound, and a fold that breaks the network is refused."""
import argparse
import os
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models import save_for_hf
from timm.utils import CheckpointSaver

from timm.layers import BatchNormAct2d

from timm_tfkd import SelfTeacher, TeacherError, create_self_teacher, fold_batch_norms

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = (0.5, 0.5, 0.5)  # test_resnet's own normalization
# Wherever the teacher code lives, its module holds the fp32 bound and the fold that speed_up calls.
TEACHER_MODULE = sys.modules[SelfTeacher.__module__]
# The documented effect of a lower-precision teacher ("roughly 1e-2 relative"), with margin.
LOW_PRECISION_RTOL = {'bfloat16': 5e-2, 'float16': 1e-2}
# Architectures with batch norms after convolutions (plain BatchNorm2d and timm's BatchNormAct2d).
BN_MODELS = ['test_resnet', 'test_efficientnet', 'mobilenetv3_small_050', 'regnetx_002', 'densenet121',
             'cifar_resnet18', 'test_byobnet']


def _model(name='test_resnet', num_classes=5, in_chans=3, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=False)
    # Non-trivial batch norm statistics, so folding has something to fold.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _timm_checkpoint(folder, model):
    os.makedirs(folder, exist_ok=True)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            args=argparse.Namespace(model='test_resnet', mean=None, std=None),
                            checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(0, 1.0)
    return folder


def _build(source, model_name='test_resnet', num_classes=5, in_chans=3, mean=HALF, std=HALF):
    return create_self_teacher(source, model_name, num_classes, in_chans, mean, std)


def _x(channels=3, size=16, batch=4, seed=1):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _relative_error(logits, reference):
    return ((logits - reference).abs().max() / reference.abs().max()).item()


def _norms(model):
    return sum(type(m) in (torch.nn.BatchNorm2d, BatchNormAct2d) for m in model.modules())


def _norms_fed_by_convolutions(model, x):
    """Batch norms whose input, in one forward, is the very tensor a convolution returned."""
    conv_outputs, fed = [], set()
    handles = [m.register_forward_hook(lambda _m, _i, out: conv_outputs.append(out))
               for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    handles += [m.register_forward_pre_hook(
        lambda m, inputs: fed.add(m) if any(inputs[0] is out for out in conv_outputs) else None)
        for m in model.modules() if type(m) in (torch.nn.BatchNorm2d, BatchNormAct2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return len(fed)


def _same_logits(teacher, model, x):
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=0, atol=0)


def test_from_timm_training_checkpoint_and_run_dir_prefers_best(tmp_path):
    model, best, later = _model(seed=0), _model(seed=0), _model(seed=1)
    args = argparse.Namespace(model='test_resnet')
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, 2.0)
    model.load_state_dict(later.state_dict())
    saver.save_checkpoint(1, 1.0)  # worse: rewrites last.pth.tar, keeps model_best.pth.tar
    _same_logits(_build(str(tmp_path)), best, _x())
    _same_logits(_build(str(tmp_path / 'last.pth.tar')), later, _x())


def test_architecture_read_from_checkpoint_args(tmp_path):
    model = _model()
    _timm_checkpoint(tmp_path / 'run', model)
    teacher = _build(str(tmp_path / 'run' / 'model_best.pth.tar'), model_name=None)
    assert teacher.identity['model'] == 'test_resnet'
    assert len(teacher.identity['sha256']) == 64
    assert teacher.identity['source'] == 'model_best.pth.tar'


def test_from_safetensors_pth_local_dir_and_module(tmp_path):
    model = _model()
    save_file(model.state_dict(), tmp_path / 'w.safetensors')
    torch.save(model.state_dict(), tmp_path / 'w.pth')
    save_for_hf(model, tmp_path / 'hf')
    for source in (str(tmp_path / 'w.safetensors'), str(tmp_path / 'w.pth'), f'local-dir:{tmp_path / "hf"}', model):
        _same_logits(_build(source), model, _x())


@pytest.mark.parametrize('make_source,message', [
    (lambda p: str(p / 'missing.pth'), 'does not exist'),
    (lambda p: (p / 'bad.pth').write_bytes(b'not a checkpoint') and str(p / 'bad.pth'), 'corrupt'),
    (lambda p: (p / 'bad.safetensors').write_bytes(b'\x00' * 20) and str(p / 'bad.safetensors'), 'safetensors'),
    (lambda p: str(p), 'no model_best.pth.tar or last.pth.tar'),
])
def test_unreadable_sources(tmp_path, make_source, message):
    with pytest.raises(TeacherError, match=message):
        _build(make_source(tmp_path))


class Payload:
    """Any class outside the weights_only allow-list."""


def test_pickled_objects_refused(tmp_path):
    torch.save({'state_dict': _model().state_dict(), 'extra': Payload()}, tmp_path / 'evil.pth')
    with pytest.raises(TeacherError, match=r'pickled object \(test_teacher.Payload\).*refused for safety'):
        _build(str(tmp_path / 'evil.pth'))


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_classes=7), r'teacher checkpoint has 5 classes \(fc.weight \(5, '),
    (dict(in_chans=1, mean=(0.5,), std=(0.5,)),
     r'teacher checkpoint has 3 input channels \(conv1.0.weight \(16, 3, 3, 3\)\) but the student has 1'),
    (dict(model_name='resnet18'), "does not fit architecture 'resnet18'"),
    (dict(model_name='no_such_model'), "unknown teacher model 'no_such_model'"),
])
def test_checkpoint_mismatches_say_what_differs(tmp_path, kwargs, message):
    torch.save(_model().state_dict(), tmp_path / 'w.pth')
    with pytest.raises(TeacherError, match=message):
        _build(str(tmp_path / 'w.pth'), **kwargs)


def test_module_mismatch_says_what_differs():
    with pytest.raises(TeacherError, match=r'has 5 classes \(student: 9\)'):
        _build(_model(), num_classes=9)


def test_always_eval_frozen_and_inference():
    teacher = _build(_model())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    logits = teacher(_x())
    assert not logits.requires_grad and not logits.is_inference()


def test_one_channel_student_with_rgb_teacher_statistics():
    """timm's own DistillationTeacher crashes here (3-channel mean on a 1-channel input)."""
    model = _model(in_chans=1)
    teacher = create_self_teacher(model, 'test_resnet', 5, 1, student_mean=(0.5,), student_std=(0.25,),
                                  teacher_mean=IMAGENET[0], teacher_std=IMAGENET[1])
    x = _x(channels=1)
    raw = x * 0.25 + 0.5
    mean_t, std_t = sum(IMAGENET[0]) / 3, sum(IMAGENET[1]) / 3
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model((raw - mean_t) / std_t), rtol=1e-5, atol=1e-5)


def test_renormalizes_between_different_statistics():
    model = _model()
    teacher = create_self_teacher(model, 'test_resnet', 5, 3, student_mean=(0.5, 0.5, 0.5),
                                  student_std=(0.5, 0.5, 0.5), teacher_mean=IMAGENET[0], teacher_std=IMAGENET[1])
    x = _x()
    raw = x * 0.5 + 0.5
    expected = (raw - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', BN_MODELS + ['test_convnext'])
@pytest.mark.parametrize('channels_last,fuse_bn', [(True, False), (False, True), (True, True)])
def test_fp32_speed_ups_keep_logits(name, channels_last, fuse_bn):
    model = _model(name)
    reference = SelfTeacher(_model(name), *IMAGENET)(_x(size=32))
    teacher = SelfTeacher(model, *IMAGENET).speed_up(_x(size=32, seed=5), channels_last=channels_last,
                                                      fuse_bn=fuse_bn)
    error = _relative_error(teacher(_x(size=32)), reference)
    assert error <= TEACHER_MODULE.FP32_RTOL
    if fuse_bn and name in BN_MODELS:
        assert error > 0, 'folding non-trivial batch norms cannot leave every logit bit-identical'


@pytest.mark.parametrize('name', ['test_resnet', 'test_efficientnet', 'test_byobnet'])  # both norm types
def test_fuse_bn_folds_every_norm_that_follows_a_convolution(name):
    x = _x(size=32)
    model = _model(name)
    norms, fed = _norms(model), _norms_fed_by_convolutions(model, x)
    assert fed > 0
    folded = fold_batch_norms(model, x)
    assert folded == fed and _norms(model) == norms - folded
    assert _norms_fed_by_convolutions(model, x) == 0
    # And through the teacher's switch: none is left there either.
    teacher = SelfTeacher(_model(name), *IMAGENET).speed_up(x, fuse_bn=True)
    assert _norms_fed_by_convolutions(teacher.model, x) == 0 and _norms(teacher.model) == norms - folded


def test_channels_last_puts_convolution_weights_in_channels_last():
    def spatial_conv_weights(model):  # 1x1 kernels are contiguous in both formats
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]

    teacher = SelfTeacher(_model(), *IMAGENET)
    weights = spatial_conv_weights(teacher.model)
    assert weights and not any(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    teacher.speed_up(_x(seed=5), channels_last=True)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in spatial_conv_weights(teacher.model))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_low_precision_teacher_weights_and_logits(dtype):
    reference = SelfTeacher(_model(), *IMAGENET)(_x())
    teacher = SelfTeacher(_model(), *IMAGENET).speed_up(_x(seed=5), dtype=dtype)
    tensors = [t for t in [*teacher.model.parameters(), *teacher.model.buffers()] if t.is_floating_point()]
    assert tensors and all(t.dtype == getattr(torch, dtype) for t in tensors)
    logits = teacher(_x())
    assert logits.dtype == torch.float32
    assert 0 < _relative_error(logits, reference) <= LOW_PRECISION_RTOL[dtype]


def test_a_fold_that_breaks_the_network_is_refused(monkeypatch):
    def broken_fold(model, example_input):
        folded = fold_batch_norms(model, example_input)
        with torch.no_grad():
            next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight.mul_(1.01)
        return folded

    monkeypatch.setattr(TEACHER_MODULE, 'fold_batch_norms', broken_fold)
    with pytest.raises(TeacherError, match=r'teacher speed-ups changed the logits by \S+ relative \(> 1e-05\)'):
        SelfTeacher(_model(), *IMAGENET).speed_up(_x(seed=5), fuse_bn=True)


def test_compiled_teacher_keeps_logits(monkeypatch):
    """The compile switch goes through the same logits check (eager backend: inductor needs minutes on 2 cores)."""
    import functools
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='eager'))
    reference = SelfTeacher(_model(), *IMAGENET)(_x())
    teacher = SelfTeacher(_model(), *IMAGENET).speed_up(_x(seed=5), channels_last=True, fuse_bn=True, compile=True)
    assert teacher._forward_model is not teacher.model
    assert _relative_error(teacher(_x()), reference) <= TEACHER_MODULE.FP32_RTOL


def test_run_checkpoint_teacher_is_the_network_its_run_trained(tmp_path):
    """A run's batch-norm eps and global pool shape its logits, not its weights: the teacher must be rebuilt with them."""
    torch.manual_seed(0)
    trained = timm.create_model('test_efficientnet', num_classes=5, bn_eps=1e-3, global_pool='max').eval()
    args = argparse.Namespace(model='test_efficientnet', bn_eps=1e-3, gp='max', model_kwargs={}, mean=None, std=None)
    saver = CheckpointSaver(trained, torch.optim.SGD(trained.parameters(), lr=0.1), args=args,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, 1.0)
    config = resolve_data_config({}, model=trained)  # the student normalizes as the teacher's run did
    teacher = _build(str(tmp_path), model_name=None, mean=config['mean'], std=config['std'])
    _same_logits(teacher, trained, _x(size=32))


def test_a_module_source_is_copied_and_the_callers_module_left_as_it_was():
    model = _model().train()
    teacher = create_self_teacher(model)  # model name, classes and statistics come from the module itself
    assert teacher.model is not model and model.training and all(p.requires_grad for p in model.parameters())
    # The caller can go on training its module: a frozen alias would fail here with an autograd error.
    loss = model(_x()).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not teacher.renormalize  # no student statistics given: the input is the teacher's own
    assert teacher.identity['model'] == 'test_resnet'


def test_the_teacher_holds_its_network_once(monkeypatch):
    import functools
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='eager'))
    network = _model()
    teacher = SelfTeacher(network, *IMAGENET).speed_up(_x(seed=5), compile=True)
    assert len(teacher.state_dict()) == len(network.state_dict())
    assert sum(1 for _ in teacher.children()) == 1 and repr(teacher).count('ResNet(') == 1


def test_an_export_folder_is_a_source_with_one_identity(tmp_path):
    import hashlib
    model = _model()
    save_for_hf(model, tmp_path / 'export', safe_serialization=True)
    weights = tmp_path / 'export' / 'model.safetensors'
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    for source in (str(tmp_path / 'export'), f'local-dir:{tmp_path / "export"}', str(weights)):
        teacher = _build(source)
        _same_logits(teacher, model, _x())
        assert teacher.identity['sha256'] == expected, source
