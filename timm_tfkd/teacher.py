"""The frozen teacher of Tf-KD-self and KD: built once, always in eval, never trained, saved or wrapped."""
import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.layers import BatchNormAct2d
from timm.models import create_model

from .checkpoint_io import describe_mismatch, extract_state_dict, read_checkpoint, sha256_file, state_dict_sha256
from .data_config import channel_stats
from .dtypes import DTYPES
from .errors import CheckpointError, RunFolderError, TeacherError
from .naflex import PATCHES, affine_patches, is_naflex_batch
from .pretrained import HUB_WEIGHT_FILES, cached_weights_file, pretrained_unavailable
from .run_folder import RunFolder, architecture_kwargs

_logger = logging.getLogger(__name__)

HUB_PREFIXES = ('hf-hub:', 'local-dir:')
# Speed-ups in fp32 must not move the logits more than this (relative to their largest magnitude). Where CUDA runs
# fp32 convolutions / matmuls in TF32 (PyTorch's cuDNN default), a different kernel choice alone moves logits by
# ~1e-4, so the check uses the TF32 bound there.
FP32_RTOL = 1e-5
TF32_RTOL = 2e-3


def fold_batch_norms(model: nn.Module, example_input: torch.Tensor) -> int:
    """Fold eval-mode batch norms into the convolution that feeds them, in place.

    Which convolution feeds which norm is read from one traced forward (hooks see the actual tensors), so the
    fold follows the data flow rather than module names. Callers verify the logits afterwards.

    Returns:
        How many batch norms were folded.
    """
    conv_outputs: Dict[int, Tuple[nn.Conv2d, torch.Tensor]] = {}
    pairs, calls = [], {}

    def after_conv(module, _inputs, output):
        conv_outputs[id(output)] = (module, output)

    def before_norm(module, inputs):
        found = conv_outputs.get(id(inputs[0]))
        if found is not None and found[1] is inputs[0]:
            pairs.append((found[0], module))

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(lambda m, i: calls.__setitem__(m, calls.get(m, 0) + 1)))
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif type(module) in (nn.BatchNorm2d, BatchNormAct2d):
            handles.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.inference_mode():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()

    parents = {child: (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    # A conv or norm used twice (shared weights) cannot be folded for one use only.
    used_once = [(conv, norm) for conv, norm in pairs if calls.get(conv) == 1 and calls.get(norm) == 1]
    for conv, norm in used_once:
        with torch.no_grad():
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps) if norm.affine else \
                1.0 / torch.sqrt(norm.running_var + norm.eps)
            shift = (norm.bias if norm.affine else 0.0) - norm.running_mean * scale
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
        parent, name = parents[norm]
        replacement = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
        setattr(parent, name, replacement)
    return len(used_once)


class SelfTeacher(nn.Module):
    """A frozen teacher network producing logits for the student's (already normalized) input.

    It is always in eval mode, runs under ``torch.inference_mode()``, has no trainable parameters, and keeps its
    weights out of the student's checkpoint and optimizer (the tasks only ever hand the student to those). Inputs
    normalized for the student are re-normalized for the teacher when their statistics differ: images per channel,
    NaFlex batches (dicts from timm's NaFlex loader) in their patch values, per channel in the layout
    :attr:`patch_channels_last` names, with coordinates and valid-patch mask unchanged.

    Args:
        model: The teacher network, with weights loaded.
        student_mean: Per-channel mean the student's input was normalized with.
        student_std: Per-channel std the student's input was normalized with.
        teacher_mean: Mean the teacher was trained with (defaults to the student's).
        teacher_std: Std the teacher was trained with (defaults to the student's).
        identity: Where the weights came from and their checksum, for run metadata.
        patch_channels_last: Layout of NaFlex patch values: P-P-C (timm's default), or C-P-P when False.
    """

    def __init__(
            self,
            model: nn.Module,
            student_mean: Sequence[float],
            student_std: Sequence[float],
            teacher_mean: Optional[Sequence[float]] = None,
            teacher_std: Optional[Sequence[float]] = None,
            identity: Optional[Dict[str, Any]] = None,
            patch_channels_last: bool = True,
    ):
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)
        channels = getattr(model, 'in_chans', len(student_mean))
        student_mean = channel_stats(student_mean, channels, 'student mean')
        student_std = channel_stats(student_std, channels, 'student std')
        teacher_mean = channel_stats(teacher_mean or student_mean, channels, 'teacher mean')
        teacher_std = channel_stats(teacher_std or student_std, channels, 'teacher std')
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t = x * gain + offset
        self.renormalize = (student_mean, student_std) != (teacher_mean, teacher_std)
        gain = torch.tensor(student_std) / torch.tensor(teacher_std)
        offset = (torch.tensor(student_mean) - torch.tensor(teacher_mean)) / torch.tensor(teacher_std)
        self.register_buffer('input_gain', gain.view(1, -1, 1, 1), persistent=False)
        self.register_buffer('input_offset', offset.view(1, -1, 1, 1), persistent=False)
        self.identity = identity or {}
        self.patch_channels_last = patch_channels_last
        self.channels_last = False
        self.compute_dtype = torch.float32
        self._set_forward(self.model)

    def _set_forward(self, forward: nn.Module) -> None:
        """What runs the forward: the network, or its compiled form; kept out of the module tree, so the network's
        weights appear once in ``state_dict`` and ``repr``."""
        self.__dict__['_forward_model'] = forward

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def train(self, mode: bool = True) -> 'SelfTeacher':
        """Stay in eval mode whatever the task asks: the teacher's batch norms and dropout never train."""
        return super().train(False)

    def speed_up(
            self,
            example_input: torch.Tensor,
            channels_last: bool = False,
            fuse_bn: bool = False,
            dtype: str = 'float32',
            compile: bool = False,
    ) -> 'SelfTeacher':
        """Apply the optional speed-ups, checking fp32 ones keep the logits of the plain teacher.

        Args:
            example_input: A representative student input (any batch size) to check the logits on.
            channels_last: Run convolutions in channels_last memory format.
            fuse_bn: Fold batch norms into convolutions.
            dtype: 'float32', or 'bfloat16' / 'float16' (changes logits by roughly 1e-2 relative).
            compile: torch.compile the forward.

        Raises:
            TeacherError: fp32 speed-ups (compile included) changed the logits beyond ``FP32_RTOL`` (``TF32_RTOL``
                where CUDA computes fp32 in TF32).
        """
        reference = self(example_input)
        if fuse_bn:
            folded = fold_batch_norms(self.model, self._prepare(example_input))
            _logger.info(f'Teacher: folded {folded} batch norms into convolutions')
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.channels_last = True
        if dtype != 'float32':
            self.compute_dtype = DTYPES[dtype]
            self.model.to(self.compute_dtype)
        if compile:
            self._set_forward(torch.compile(self.model))
        logits = self(example_input)
        error = ((logits - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
        if dtype != 'float32':
            _logger.info(f'Teacher: {dtype} logits differ from float32 by {error:.2e} relative')
            return self
        tf32 = example_input.is_cuda and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        tolerance = TF32_RTOL if tf32 else FP32_RTOL
        if error > tolerance:
            raise TeacherError(f'teacher speed-ups changed the logits by {error:.2e} relative (> {tolerance:g})')
        return self

    def _prepare(self, x: Union[torch.Tensor, Dict[str, Any]]) -> Union[torch.Tensor, Dict[str, Any]]:
        if is_naflex_batch(x):
            patches = x[PATCHES]
            if self.renormalize:
                patches = affine_patches(patches, self.input_gain.flatten(), self.input_offset.flatten(),
                                         self.patch_channels_last)
            return {**x, PATCHES: patches.to(self.compute_dtype)}
        if self.renormalize:
            x = x * self.input_gain + self.input_offset
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.compute_dtype)

    def forward(self, x: Union[torch.Tensor, Dict[str, Any]]) -> torch.Tensor:
        """Teacher logits (float32, outside inference mode so autograd may read them) for a batch of images or a
        NaFlex batch."""
        with torch.inference_mode():
            logits = self._forward_model(self._prepare(x)).float()
        return logits.clone()


@dataclass
class _Loaded:
    """A teacher network read from its source, what it is, and what its training run knew."""
    model: nn.Module
    identity: Dict[str, Any]
    run_args: Dict[str, Any] = field(default_factory=dict)


def _weights_file(folder: str) -> Optional[str]:
    """The weights file of an export folder (what ``local-dir:`` loads), if it is one."""
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        return None
    return next((os.path.join(folder, name) for name in HUB_WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))),
                None)


def _from_module(source: nn.Module) -> _Loaded:
    # A copy: freezing the caller's own module would break its later training with an unclear autograd error.
    model = copy.deepcopy(source)
    return _Loaded(model, {'source': type(source).__name__, 'sha256': state_dict_sha256(model.state_dict())})


def _from_hub(source: str) -> _Loaded:
    """``hf-hub:org/name[@rev]``, ``local-dir:/path`` or an export folder; identified by its weights file."""
    problem = pretrained_unavailable(source)
    if problem:
        raise TeacherError(f"cannot load teacher '{source}': {problem}")
    try:
        model = create_model(source, pretrained=True)
    except Exception as e:  # hub / file errors from timm and huggingface_hub, all fatal here
        raise TeacherError(f"cannot load teacher '{source}': {type(e).__name__}: {e}") from None
    location = source.partition(':')[2]
    if source.startswith('hf-hub:'):
        shown, weights = source, cached_weights_file(source)
    else:
        shown, weights = os.path.basename(location.rstrip('/')), _weights_file(location)
    sha256 = sha256_file(weights) if weights else state_dict_sha256(model.state_dict())
    return _Loaded(model, {'source': shown, 'sha256': sha256})


def _from_pretrained(source: str, model_name: Optional[str], in_chans: Optional[int]) -> _Loaded:
    """``pretrained`` or ``pretrained:TAG``: timm's published weights of ``model_name``."""
    if not model_name:
        raise TeacherError(f"teacher '{source}' needs a teacher model name")
    tag = source.partition(':')[2]
    full_name = f'{model_name}.{tag}' if tag else model_name
    problem = pretrained_unavailable(full_name)
    if problem:
        raise TeacherError(f"cannot load timm pretrained weights '{full_name}': {problem}")
    try:
        # With the student's num_classes, timm would drop a classifier trained for other classes and leave a
        # freshly initialized head, silently; built as published, the class check refuses it instead.
        model = create_model(full_name, pretrained=True, **({'in_chans': in_chans} if in_chans else {}))
    except Exception as e:
        raise TeacherError(f"cannot load timm pretrained weights '{full_name}': {type(e).__name__}: {e}") from None
    weights = cached_weights_file(full_name)
    sha256 = sha256_file(weights) if weights else state_dict_sha256(model.state_dict())
    return _Loaded(model, {'source': f'timm:{full_name}', 'sha256': sha256, 'model': model_name})


def _head_and_input(model_name: str, state_dict: Dict[str, torch.Tensor]) -> Tuple[Optional[int], Optional[int]]:
    """Classes and input channels a state dict was trained with, read from the shapes of its classifier and first
    convolution (named by the architecture's pretrained config)."""
    cfg = create_model(model_name, pretrained=False).pretrained_cfg
    found = []
    for key, dim in ((cfg.get('classifier'), 0), (cfg.get('first_conv'), 1)):
        key = key[0] if isinstance(key, (list, tuple)) else key
        weight = state_dict.get(f'{key}.weight')
        found.append(int(weight.shape[dim]) if weight is not None and weight.ndim > dim else None)
    return found[0], found[1]


def _from_checkpoint(source: str, model_name: Optional[str], num_classes: Optional[int],
                     in_chans: Optional[int]) -> _Loaded:
    """A training checkpoint, a ``.safetensors`` / ``.pth`` file or a training run folder."""
    if not os.path.exists(source):
        raise TeacherError(f"teacher checkpoint '{source}' does not exist")
    try:
        path = str(RunFolder(source).best_checkpoint()) if os.path.isdir(source) else source
        checkpoint = read_checkpoint(path)
        state_dict = extract_state_dict(checkpoint)
    except (CheckpointError, RunFolderError) as e:
        raise TeacherError(str(e)) from None
    run_args = checkpoint.get('args')
    run_args = vars(run_args) if run_args is not None and not isinstance(run_args, dict) else (run_args or {})
    model_name = model_name or run_args.get('model')
    if not model_name:
        raise TeacherError(f"cannot tell the architecture of teacher '{source}': give the teacher model name")
    # The network its run trained (global pool, batch-norm eps, model kwargs shape its logits), when the checkpoint
    # is of that architecture.
    trained_args = run_args if run_args.get('model') == model_name else {}
    try:
        if num_classes is None or in_chans is None:
            classes, channels = _head_and_input(model_name, state_dict)
            num_classes = num_classes or trained_args.get('num_classes') or classes
            in_chans = in_chans or trained_args.get('in_chans') or channels
        model = create_model(model_name, **architecture_kwargs(trained_args, num_classes, in_chans))
    except RuntimeError as e:
        raise TeacherError(f"unknown teacher model '{model_name}': {e}") from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        raise TeacherError(describe_mismatch(model, state_dict, model_name, 'teacher checkpoint', 'the student')
                           ) from None
    identity = {'source': os.path.basename(os.path.normpath(source)), 'sha256': sha256_file(path), 'model': model_name}
    return _Loaded(model, identity, run_args)


def _check_fits_student(model: nn.Module, num_classes: Optional[int], in_chans: Optional[int], source: str) -> None:
    problems = []
    if num_classes is not None and getattr(model, 'num_classes', num_classes) != num_classes:
        problems.append(f'{model.num_classes} classes (student: {num_classes})')
    if in_chans is not None and getattr(model, 'in_chans', in_chans) != in_chans:
        problems.append(f'{model.in_chans} input channels (student: {in_chans})')
    if problems:
        raise TeacherError(f"teacher '{source}' has " + ' and '.join(problems))


def create_self_teacher(
        source: Union[str, nn.Module],
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        student_mean: Optional[Sequence[float]] = None,
        student_std: Optional[Sequence[float]] = None,
        teacher_mean: Optional[Sequence[float]] = None,
        teacher_std: Optional[Sequence[float]] = None,
        device: Optional[torch.device] = None,
) -> SelfTeacher:
    """Build a frozen teacher from a checkpoint, the Hub, timm's pretrained weights or a module.

    Args:
        source: A timm training checkpoint, ``.safetensors`` / ``.pth`` file or training output folder (the
            architecture is ``model_name``, else the one its run recorded); ``hf-hub:org/name``, ``local-dir:/path``
            or an export folder; ``pretrained`` or ``pretrained:TAG`` for timm's weights of ``model_name``; or an
            ``nn.Module`` with its weights, which is copied (the caller's module is left as it is).
        model_name: timm architecture of the teacher, when the source does not name it.
        num_classes: The student's number of classes; the teacher must match (not checked when None).
        in_chans: The student's input channels; the teacher must match (not checked when None).
        student_mean: The student's input normalization mean (default: the teacher's, so inputs are not changed).
        student_std: Likewise for std.
        teacher_mean: The teacher's normalization mean, when known better than its checkpoint or config says.
        teacher_std: Likewise for std.
        device: Where the teacher runs.

    Returns:
        The teacher. Its ``identity`` names the source and the SHA-256 of the weights file it was read from (the
        state dict's for a module), the same however the file is referred to.

    Raises:
        TeacherError: The source is missing, unreadable, or does not fit the student.
    """
    if isinstance(source, nn.Module):
        loaded = _from_module(source)
    elif source.startswith(HUB_PREFIXES):
        loaded = _from_hub(source)
    elif os.path.isdir(source) and _weights_file(source):
        loaded = _from_hub(f'local-dir:{source}')
    elif source == 'pretrained' or source.startswith('pretrained:'):
        loaded = _from_pretrained(source, model_name, in_chans)
    else:
        loaded = _from_checkpoint(source, model_name, num_classes, in_chans)
    model, identity = loaded.model, loaded.identity
    identity.setdefault('model', model_name or model.pretrained_cfg.get('architecture'))
    _check_fits_student(model, num_classes, in_chans, identity.get('source', str(source)))

    if teacher_mean is None or teacher_std is None:
        # The teacher saw what its own run normalized with: the run's args, else the model's config.
        config = resolve_data_config(loaded.run_args, model=model)
        teacher_mean = teacher_mean or config['mean']
        teacher_std = teacher_std or config['std']
    teacher = SelfTeacher(model, student_mean or teacher_mean, student_std or teacher_std, teacher_mean, teacher_std,
                          identity=identity)
    return teacher.to(device) if device is not None else teacher
