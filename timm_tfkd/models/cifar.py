"""CIFAR versions of ResNet-18, MobileNetV2 and ShuffleNetV2 1.0x, registered as timm models.

The Tf-KD paper (Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020)
reports CIFAR-100 results for these students. Their CIFAR form keeps the full 32x32 resolution at the stem:
a 3x3 stride-1 convolution and no max-pool, so the last feature map is 4x4 for a 32x32 input.

After ``import timm_tfkd.models`` the models are created like any other timm model::

    model = timm.create_model('cifar_resnet18', num_classes=10, in_chans=1)

Every convolution is bias-free and followed by batch norm; weights keep PyTorch's default initialisation,
as the common CIFAR implementations do. No pretrained weights are published, but ``pretrained=True`` with
``pretrained_cfg_overlay=dict(file=...)`` loads a local state dict through timm (adapting ``in_chans`` and the
classifier as for any timm model).
"""
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ['CifarNet', 'CifarResNet', 'CifarMobileNetV2', 'CifarShuffleNetV2']

_logger = logging.getLogger(__name__)

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax', '')

# (expansion, out channels, blocks, first stride); the second stage keeps stride 1 where ImageNet uses 2.
MOBILENETV2_CIFAR_CFG: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

FeatureInfo = List[Dict[str, Any]]


class ConvBn(nn.Module):
    """Bias-free convolution, batch norm and an optional ReLU; 'same' padding for odd kernels."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            groups: int = 1,
            act: bool = True,
    ) -> None:
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels.
            kernel_size: Square kernel size.
            stride: Convolution stride.
            groups: Convolution groups (``in_chs`` for a depthwise convolution).
            act: Apply a ReLU after the norm; off for linear bottlenecks and pre-residual outputs.
        """
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class CifarNet(nn.Module):
    """Stem, stages and head shared by the CIFAR models, with the timm classifier interface.

    Subclasses build ``stem``, ``stages`` (a sequence of block sequences), ``conv_head`` and ``feature_info``,
    then call :meth:`_init_head`. Gradient checkpointing is real: when enabled, each block of ``stages`` is
    recomputed in the backward pass instead of keeping its activations.
    """

    stem: nn.Module
    stages: nn.Sequential
    conv_head: nn.Module

    def __init__(self, num_classes: int, in_chans: int, drop_rate: float, **kwargs: Any) -> None:
        """
        Args:
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            drop_rate: Dropout before the classifier.
            **kwargs: Other timm model arguments (e.g. ``drop_path_rate``); ignored, with a warning when set.
        """
        super().__init__()
        if num_classes < 0:
            raise ValueError(f'num_classes must be >= 0, got {num_classes}')
        _warn_ignored(type(self).__name__, kwargs)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.feature_info: FeatureInfo = []

    def _init_head(self, num_features: int, global_pool: str) -> None:
        """Create the global pool and classifier; called by subclasses once the body exists.

        Args:
            num_features: Channels of the last feature map.
            global_pool: A timm pool type from ``POOL_TYPES``.
        """
        self.num_features = num_features
        self._set_head(global_pool)

    def _set_head(self, global_pool: str) -> None:
        _check_pool(global_pool, self.num_classes)
        self.global_pool, self.fc = create_classifier(self.num_features, self.num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regexes that group parameters by depth, for layer-wise learning-rate decay.

        Args:
            coarse: One group per stage instead of one per block.

        Returns:
            timm's matcher dict: ``stem``, then ``blocks`` with the head convolution last.
        """
        blocks = r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)'
        return dict(stem=r'^stem\.', blocks=[(blocks, None), (r'^conv_head\.', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory by recomputing each block's activations in the backward pass.

        Args:
            enable: Turn checkpointing on or off.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes`` is 0)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a freshly initialised one.

        Args:
            num_classes: New number of outputs; 0 removes the classifier.
            global_pool: New pool type; None keeps the current one.
        """
        if num_classes < 0:
            raise ValueError(f'num_classes must be >= 0, got {num_classes}')
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        reference = next(self.parameters())  # the new head must match the body's device and dtype
        self.num_classes = num_classes
        self._set_head(global_pool)
        self.fc.to(device=reference.device, dtype=reference.dtype)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map, ``(N, num_features, H / 8, W / 8)``."""
        x = self.stem(x)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for stage in self.stages:
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        return self.conv_head(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, apply dropout, and classify unless ``pre_logits`` (then ``head_hidden_size`` features)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _add_feature(self, num_chs: int, reduction: int, module: str) -> None:
        """Record a feature map for timm's ``features_only`` wrapper."""
        self.feature_info.append(dict(num_chs=num_chs, reduction=reduction, module=module))


def _check_pool(global_pool: str, num_classes: int) -> None:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool '{global_pool}' is not supported; use one of {POOL_TYPES}")
    if not global_pool and num_classes:
        raise ValueError("global_pool='' (no pooling) needs num_classes=0: the classifier takes pooled features")


def _warn_ignored(model_name: str, kwargs: Dict[str, Any]) -> None:
    # A zero rate or a False flag asks for what the model does anyway, so only real requests are reported.
    ignored = sorted(k for k, v in kwargs.items() if v not in (None, False, 0))
    if ignored:
        _logger.warning('%s ignores the unsupported argument(s): %s', model_name, ', '.join(ignored))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions plus a shortcut, 1x1 conv + BN when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels.
            stride: Stride of the first convolution and of the projection shortcut.
        """
        super().__init__()
        self.conv1 = ConvBn(in_chs, out_chs, 3, stride)
        self.conv2 = ConvBn(out_chs, out_chs, 3, act=False)
        needs_projection = stride != 1 or in_chs != out_chs
        self.shortcut = ConvBn(in_chs, out_chs, 1, stride, act=False) if needs_projection else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class CifarResNet(CifarNet):
    """ResNet with basic blocks for 32x32 inputs: 3x3 stride-1 stem, no max-pool.

    With the defaults this is the ResNet-18 of the common CIFAR code and of the Tf-KD reference code:
    11,220,132 parameters for 100 classes.
    """

    def __init__(
            self,
            layers: Sequence[int] = (2, 2, 2, 2),
            widths: Sequence[int] = (64, 128, 256, 512),
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            layers: Basic blocks per stage.
            widths: Channels per stage; the stem has ``widths[0]``. Every stage after the first halves the size.
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            global_pool: A timm pool type from ``POOL_TYPES``.
            drop_rate: Dropout before the classifier.
            **kwargs: Other timm model arguments; ignored.
        """
        super().__init__(num_classes, in_chans, drop_rate, **kwargs)
        if len(layers) != len(widths):
            raise ValueError(f'layers {tuple(layers)} and widths {tuple(widths)} must have the same length')
        self.stem = ConvBn(in_chans, widths[0], 3)
        self._add_feature(widths[0], 1, 'stem')
        stages = []
        in_chs, reduction = widths[0], 1
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            stages.append(nn.Sequential(*[BasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1)
                                          for j in range(depth)]))
            in_chs = width
            self._add_feature(width, reduction, f'stages.{i}')
        self.stages = nn.Sequential(*stages)
        self.conv_head = nn.Identity()
        self._init_head(in_chs, global_pool)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection.

    Canonical form: the expansion convolution is left out when the expansion is 1, and the identity residual
    is added only when the stride is 1 and the channel count is unchanged (no projection shortcuts).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: int) -> None:
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels.
            stride: Stride of the depthwise convolution.
            expansion: Width multiplier of the hidden layer.
        """
        super().__init__()
        mid_chs = in_chs * expansion
        self.conv_pw = ConvBn(in_chs, mid_chs, 1) if expansion != 1 else nn.Identity()
        self.conv_dw = ConvBn(mid_chs, mid_chs, 3, stride, groups=mid_chs)
        self.conv_pwl = ConvBn(mid_chs, out_chs, 1, act=False)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.conv_dw(self.conv_pw(x)))
        return out + x if self.has_skip else out


class CifarMobileNetV2(CifarNet):
    """MobileNetV2 for 32x32 inputs: 3x3 stride-1 stem and a stride-1 second stage (8x total reduction).

    Blocks are the canonical :class:`InvertedResidual`: identity residual only when the stride is 1 and the width
    is unchanged, no expansion convolution when the expansion is 1. This was chosen over the pytorch-cifar variant,
    which adds a 1x1 conv + BN projection shortcut to every stride-1 block that changes width (and keeps the
    expansion convolution at expansion 1), because the canonical form is the paper's. With the defaults the
    model has 2,351,972 parameters for 100 classes: torchvision's ImageNet MobileNetV2 weights apart from the
    classifier. Activations are ReLU, as in the common CIFAR code, rather than the paper's ReLU6.
    """

    def __init__(
            self,
            cfg: Sequence[Tuple[int, int, int, int]] = MOBILENETV2_CIFAR_CFG,
            stem_chs: int = 32,
            head_chs: int = 1280,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            cfg: One ``(expansion, out channels, blocks, first stride)`` tuple per stage.
            stem_chs: Channels of the stem convolution.
            head_chs: Channels of the final 1x1 convolution, the pooled feature width.
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            global_pool: A timm pool type from ``POOL_TYPES``.
            drop_rate: Dropout before the classifier.
            **kwargs: Other timm model arguments; ignored.
        """
        super().__init__(num_classes, in_chans, drop_rate, **kwargs)
        self.stem = ConvBn(in_chans, stem_chs, 3)
        self._add_feature(stem_chs, 1, 'stem')
        stages = []
        in_chs, reduction = stem_chs, 1
        for i, (expansion, out_chs, depth, stride) in enumerate(cfg):
            reduction *= stride
            stages.append(nn.Sequential(*[
                InvertedResidual(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1, expansion)
                for j in range(depth)]))
            in_chs = out_chs
            self._add_feature(out_chs, reduction, f'stages.{i}')
        self.stages = nn.Sequential(*stages)
        self.conv_head = ConvBn(in_chs, head_chs, 1)
        self._init_head(head_chs, global_pool)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups so the next block mixes both branches."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 basic unit: one part of the channels passes through, the other goes through the branch."""

    def __init__(self, chs: int, split_ratio: float = 0.5) -> None:
        """
        Args:
            chs: Input and output channels.
            split_ratio: Fraction of the channels that pass through unchanged.
        """
        super().__init__()
        self.pass_chs = int(chs * split_ratio)
        branch_chs = chs - self.pass_chs
        self.branch = nn.Sequential(
            ConvBn(branch_chs, branch_chs, 1),
            ConvBn(branch_chs, branch_chs, 3, groups=branch_chs, act=False),
            ConvBn(branch_chs, branch_chs, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passed, active = x.split([self.pass_chs, x.shape[1] - self.pass_chs], dim=1)
        return channel_shuffle(torch.cat([passed, self.branch(active)], dim=1), 2)


class ShuffleDownBlock(nn.Module):
    """ShuffleNetV2 downsampling unit: two stride-2 branches on the full input, concatenated."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels, split between the two branches.
        """
        super().__init__()
        left_chs = out_chs // 2
        right_chs = out_chs - left_chs
        self.branch_left = nn.Sequential(
            ConvBn(in_chs, in_chs, 3, 2, groups=in_chs, act=False),
            ConvBn(in_chs, left_chs, 1),
        )
        self.branch_right = nn.Sequential(
            ConvBn(in_chs, right_chs, 1),
            ConvBn(right_chs, right_chs, 3, 2, groups=right_chs, act=False),
            ConvBn(right_chs, right_chs, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.branch_left(x), self.branch_right(x)], dim=1), 2)


class CifarShuffleNetV2(CifarNet):
    """ShuffleNetV2 for 32x32 inputs: 3x3 stride-1 stem and no max-pool; 1.0x widths by default.

    With the defaults the model has 1,356,104 parameters for 100 classes: torchvision's ImageNet ShuffleNetV2
    1.0x weights apart from the classifier.
    """

    def __init__(
            self,
            stage_chs: Sequence[int] = (116, 232, 464),
            depths: Sequence[int] = (3, 7, 3),
            stem_chs: int = 24,
            head_chs: int = 1024,
            split_ratio: float = 0.5,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            stage_chs: Output channels per stage.
            depths: Basic units per stage, after the stage's downsampling unit.
            stem_chs: Channels of the stem convolution.
            head_chs: Channels of the final 1x1 convolution, the pooled feature width.
            split_ratio: Fraction of the channels a basic unit passes through unchanged.
            num_classes: Classifier outputs; 0 for no classifier.
            in_chans: Input image channels.
            global_pool: A timm pool type from ``POOL_TYPES``.
            drop_rate: Dropout before the classifier.
            **kwargs: Other timm model arguments; ignored.
        """
        super().__init__(num_classes, in_chans, drop_rate, **kwargs)
        if len(stage_chs) != len(depths):
            raise ValueError(f'stage_chs {tuple(stage_chs)} and depths {tuple(depths)} must have the same length')
        self.stem = ConvBn(in_chans, stem_chs, 3)
        self._add_feature(stem_chs, 1, 'stem')
        stages = []
        in_chs, reduction = stem_chs, 1
        for i, (out_chs, depth) in enumerate(zip(stage_chs, depths)):
            reduction *= 2
            blocks = [ShuffleDownBlock(in_chs, out_chs)] + [ShuffleBlock(out_chs, split_ratio) for _ in range(depth)]
            stages.append(nn.Sequential(*blocks))
            in_chs = out_chs
            self._add_feature(out_chs, reduction, f'stages.{i}')
        self.stages = nn.Sequential(*stages)
        self.conv_head = ConvBn(in_chs, head_chs, 1)
        self._init_head(head_chs, global_pool)


def _create(
        variant: str,
        model_cls: Type[CifarNet],
        pretrained: bool,
        num_feature_maps: int,
        **kwargs: Any,
) -> nn.Module:
    # create_model passes device / dtype through to the model; these models build on the CPU, then move.
    device = kwargs.pop('device', None)
    dtype = kwargs.pop('dtype', None)
    # features_only returns every recorded map by default: their count differs per model, timm assumes 5.
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(num_feature_maps)))
    model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 100,
        'input_size': (3, 32, 32),
        'pool_size': (4, 4),
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': CIFAR100_MEAN,
        'std': CIFAR100_STD,
        'first_conv': 'stem.conv',
        'classifier': 'fc',
        'paper_name': 'Revisiting Knowledge Distillation via Label Smoothing Regularization',
        'paper_ids': 'arXiv:1909.11723',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'cifar_resnet18': _cfg(),
    'cifar_mobilenetv2': _cfg(),
    'cifar_shufflenetv2': _cfg(),
})


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 for CIFAR: basic blocks [2, 2, 2, 2], widths 64-512, 3x3 stride-1 stem, no max-pool."""
    model_args = dict(dict(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)), **kwargs)
    return _create('cifar_resnet18', CifarResNet, pretrained, 1 + len(model_args['layers']), **model_args)


@register_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2 for CIFAR with canonical inverted residuals, 3x3 stride-1 stem and a stride-1 second stage."""
    model_args = dict(dict(cfg=MOBILENETV2_CIFAR_CFG, stem_chs=32, head_chs=1280), **kwargs)
    return _create('cifar_mobilenetv2', CifarMobileNetV2, pretrained, 1 + len(model_args['cfg']), **model_args)


@register_model
def cifar_shufflenetv2(pretrained: bool = False, **kwargs: Any) -> CifarShuffleNetV2:
    """ShuffleNetV2 1.0x for CIFAR: widths (116, 232, 464), (3, 7, 3) basic units, 3x3 stride-1 stem."""
    model_args = dict(dict(stage_chs=(116, 232, 464), depths=(3, 7, 3), stem_chs=24, head_chs=1024), **kwargs)
    return _create('cifar_shufflenetv2', CifarShuffleNetV2, pretrained, 1 + len(model_args['stage_chs']), **model_args)
