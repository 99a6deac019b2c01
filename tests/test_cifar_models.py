"""The CIFAR models registered by ``timm_tfkd.models`` behave like timm models and match their architectures."""
import logging
import math
from typing import Callable, Dict

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import group_parameters
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import timm_tfkd.models  # noqa: F401  (registers the models)
from timm_tfkd.models import cifar

MODEL_NAMES = ('cifar_resnet18', 'cifar_mobilenetv2', 'cifar_shufflenetv2')
FEATURES = {'cifar_resnet18': 512, 'cifar_mobilenetv2': 1280, 'cifar_shufflenetv2': 1024}
# Stages per model, to count parameter groups.
STAGES = {'cifar_resnet18': 4, 'cifar_mobilenetv2': 7, 'cifar_shufflenetv2': 3}


def conv_bn(in_chs: int, out_chs: int, kernel_size: int = 1, groups: int = 1) -> int:
    """Parameters of a bias-free convolution followed by a batch norm (weight and bias)."""
    return kernel_size * kernel_size * (in_chs // groups) * out_chs + 2 * out_chs


def linear(in_features: int, out_features: int) -> int:
    return in_features * out_features + out_features


def resnet18_params(num_classes: int) -> int:
    """Count ResNet-18 (CIFAR stem) from its description: basic blocks [2, 2, 2, 2], widths 64-512."""
    total = conv_bn(3, 64, 3)
    in_chs = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            total += conv_bn(in_chs, width, 3) + conv_bn(width, width, 3)
            if stride != 1 or in_chs != width:
                total += conv_bn(in_chs, width, 1)
            in_chs = width
    return total + linear(512, num_classes)


def mobilenetv2_params(num_classes: int) -> int:
    """Count canonical MobileNetV2 (no expansion conv at t=1, identity-only residuals) from its description.

    Strides do not change parameter counts, so the CIFAR and ImageNet versions differ only in the classifier.
    """
    total = conv_bn(3, 32, 3)
    in_chs = 32
    for expansion, out_chs, blocks, _ in ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                                          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for _ in range(blocks):
            mid = in_chs * expansion
            if expansion != 1:
                total += conv_bn(in_chs, mid)
            total += conv_bn(mid, mid, 3, groups=mid) + conv_bn(mid, out_chs)
            in_chs = out_chs
    return total + conv_bn(320, 1280) + linear(1280, num_classes)


def shufflenetv2_params(num_classes: int) -> int:
    """Count ShuffleNetV2 1.0x from its description; like MobileNetV2, strides and max-pool hold no weights."""
    total = conv_bn(3, 24, 3)
    in_chs = 24
    for out_chs, basic_units in ((116, 3), (232, 7), (464, 3)):
        half = out_chs // 2
        total += conv_bn(in_chs, in_chs, 3, groups=in_chs) + conv_bn(in_chs, half)  # downsampling, left
        total += conv_bn(in_chs, half) + conv_bn(half, half, 3, groups=half) + conv_bn(half, half)  # right
        total += basic_units * (conv_bn(half, half) + conv_bn(half, half, 3, groups=half) + conv_bn(half, half))
        in_chs = out_chs
    return total + conv_bn(464, 1024) + linear(1024, num_classes)


PARAM_FNS: Dict[str, Callable[[int], int]] = {
    'cifar_resnet18': resnet18_params,
    'cifar_mobilenetv2': mobilenetv2_params,
    'cifar_shufflenetv2': shufflenetv2_params,
}
PARAMS_100 = {'cifar_resnet18': 11_220_132, 'cifar_mobilenetv2': 2_351_972, 'cifar_shufflenetv2': 1_356_104}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



@pytest.fixture(params=MODEL_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_models_are_listed() -> None:
    assert set(MODEL_NAMES) <= set(timm.list_models('cifar_*'))


def test_counting_functions_match_published_imagenet_counts() -> None:
    # torchvision's ImageNet versions differ only in strides and max-pool, which hold no weights, so at 1000
    # classes the counts must equal their published totals: this checks the counting functions themselves.
    assert mobilenetv2_params(1000) == 3_504_872
    assert shufflenetv2_params(1000) == 2_278_604
    assert resnet18_params(100) == 11_220_132


def test_parameter_count(name: str) -> None:
    model = timm.create_model(name, num_classes=100)
    assert num_params(model) == PARAM_FNS[name](100) == PARAMS_100[name]


def test_default_cfg_and_attributes(name: str) -> None:
    model = timm.create_model(name, drop_rate=0.2)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32)
    assert cfg['mean'] == (0.5071, 0.4865, 0.4409) and cfg['std'] == (0.2673, 0.2564, 0.2762)
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear' and cfg['num_classes'] == 100
    assert model.default_cfg is cfg
    first_conv = model.get_submodule(cfg['first_conv'])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3 and first_conv.stride == (1, 1)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    assert (model.num_classes, model.in_chans, model.num_features, model.drop_rate) == (100, 3, FEATURES[name], 0.2)


@torch.no_grad()
def test_forward_shapes(name: str) -> None:
    model = timm.create_model(name).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    model = timm.create_model(name, num_classes=10, in_chans=1).eval()
    assert model.in_chans == 1 and model.get_submodule(model.pretrained_cfg['first_conv']).in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@torch.no_grad()
def test_forward_head_and_reset_classifier(name: str) -> None:
    model = timm.create_model(name).eval()
    features = model.forward_features(torch.randn(2, 3, 16, 16))
    assert features.shape == (2, FEATURES[name], 2, 2)  # 8x reduction
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.forward_head(features).shape == (2, 7)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model.forward_head(features).shape == (2, model.num_features)


def test_sgd_step_updates_weights(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([1, 7]))
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    for key in (model.pretrained_cfg['first_conv'] + '.weight', 'fc.weight'):
        assert not torch.equal(before[key], model.get_parameter(key))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_group_matcher_covers_every_parameter(name: str) -> None:
    model = timm.create_model(name)
    all_names = sorted(n for n, _ in model.named_parameters())
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    fine = group_parameters(model, model.group_matcher(coarse=False))
    for groups in (coarse, fine):
        assert sorted(n for names in groups.values() for n in names) == all_names
        assert all(n.startswith('stem.') for n in groups[0]) and groups[max(groups)] == ['fc.weight', 'fc.bias']
    # stem, one group per stage (the head convolution joins the last), classifier
    assert len(coarse) == STAGES[name] + 2
    assert len(fine) == len([m for stage in model.stages for m in stage]) + 2


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    checkpointed_blocks = []

    def counting_checkpoint(block: nn.Module, *args, **kwargs):
        checkpointed_blocks.append(block)
        return torch_checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(cifar, 'checkpoint', counting_checkpoint)
    model = timm.create_model('cifar_shufflenetv2', num_classes=10).train()
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert checkpointed_blocks == [block for stage in model.stages for block in stage]
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


@torch.no_grad()
def test_channels_last_input() -> None:
    # Channel shuffle reshapes channels; it must not depend on the memory layout.
    model = timm.create_model('cifar_shufflenetv2').eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected)


def test_global_pool_choices() -> None:
    model = timm.create_model('cifar_shufflenetv2', global_pool='catavgmax', num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert model.head_hidden_size == 2 * model.num_features
    with pytest.raises(ValueError, match='not supported'):
        timm.create_model('cifar_shufflenetv2', global_pool='attn')
    with pytest.raises(ValueError, match='num_classes=0'):
        timm.create_model('cifar_shufflenetv2', global_pool='')
    unpooled = timm.create_model('cifar_shufflenetv2', global_pool='', num_classes=0).eval()
    with torch.no_grad():
        assert unpooled(torch.randn(2, 3, 16, 16)).shape == (2, 1024, 2, 2)


def test_unsupported_kwargs_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger='timm_tfkd.models.cifar'):
        timm.create_model('cifar_shufflenetv2', drop_path_rate=None, drop_block_rate=0.)
        assert not caplog.records
        timm.create_model('cifar_shufflenetv2', drop_path_rate=0.1)
    assert 'drop_path_rate' in caplog.text


def test_features_only() -> None:
    model = timm.create_model('cifar_shufflenetv2', features_only=True).eval()
    assert model.feature_info.channels() == [24, 116, 232, 464]
    assert model.feature_info.reduction() == [1, 2, 4, 8]
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in model(torch.randn(2, 3, 16, 16))]
    assert shapes == [(2, 24, 16, 16), (2, 116, 8, 8), (2, 232, 4, 4), (2, 464, 2, 2)]


def test_pretrained_file_adapts_stem_and_classifier(tmp_path) -> None:
    # timm adapts the first conv and drops the classifier by the cfg's names, so this checks them end to end.
    source = timm.create_model('cifar_shufflenetv2')
    path = tmp_path / 'weights.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model(
        'cifar_shufflenetv2', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=10, in_chans=1)
    torch.testing.assert_close(model.stem.conv.weight, source.stem.conv.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.conv_head.conv.weight, source.conv_head.conv.weight)
    assert model.fc.out_features == 10


def test_device_and_dtype_arguments() -> None:
    model = timm.create_model('cifar_mobilenetv2', device='meta', dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {('meta', torch.float64)}
