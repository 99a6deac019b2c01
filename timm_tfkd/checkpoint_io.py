"""Reading weights safely: safetensors, or torch files under ``weights_only=True`` only."""
import argparse
import hashlib
import os
import pickle
import re
from typing import Any, Dict

import torch
import torch.nn as nn
from timm.models import clean_state_dict

from .errors import CheckpointError

STATE_DICT_KEYS = ('state_dict', 'model', 'module')
EMA_STATE_DICT_KEYS = ('state_dict_ema', 'model_ema')
# The trainer stores a checksum of each set of weights in the checkpoint beside them (state_dict -> its checksum).
WEIGHTS_CHECKSUM_KEYS = {'state_dict': 'state_dict_sha256', 'state_dict_ema': 'state_dict_ema_sha256'}


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's names and tensor bytes, in name order (independent of the file format)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()


def add_weights_checksums(checkpoint: Dict[str, Any]) -> None:
    """Store beside each set of weights of a training checkpoint the checksum :func:`read_checkpoint` verifies."""
    for weights_key, checksum_key in WEIGHTS_CHECKSUM_KEYS.items():
        if isinstance(checkpoint.get(weights_key), dict):
            checkpoint[checksum_key] = state_dict_sha256(checkpoint[weights_key])


def _verify_weights_checksums(checkpoint: Dict[str, Any], path: str) -> None:
    for weights_key, checksum_key in WEIGHTS_CHECKSUM_KEYS.items():
        recorded = checkpoint.get(checksum_key)
        if recorded is not None and state_dict_sha256(checkpoint.get(weights_key) or {}) != recorded:
            raise CheckpointError(
                f"checkpoint '{path}' is damaged: its {weights_key} does not match the checksum recorded when it was "
                f"saved; use another checkpoint of the run (e.g. checkpoint-N.pth.tar)")


def describe_mismatch(model: nn.Module, state_dict: Dict[str, torch.Tensor], model_name: str, subject: str,
                      target: str) -> str:
    """One line saying how a state dict differs from a model: classes, input channels, or the first differences.

    Args:
        model: The model the weights should fit.
        state_dict: The weights.
        model_name: The model's architecture, for the message.
        subject: What the weights are, e.g. ``teacher checkpoint``.
        target: What they should fit, e.g. ``the student``.
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    own = model.state_dict()
    classifier = cfg.get('classifier')
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    first_conv = cfg.get('first_conv')
    first_conv = first_conv[0] if isinstance(first_conv, (list, tuple)) else first_conv
    head_key = f'{classifier}.weight'
    if head_key in state_dict and head_key in own and state_dict[head_key].shape[0] != own[head_key].shape[0]:
        return (f'{subject} has {state_dict[head_key].shape[0]} classes ({head_key} '
                f'{tuple(state_dict[head_key].shape)}) but {target} has {own[head_key].shape[0]}')
    conv_key = f'{first_conv}.weight'
    if conv_key in state_dict and conv_key in own and state_dict[conv_key].shape[1] != own[conv_key].shape[1]:
        return (f'{subject} has {state_dict[conv_key].shape[1]} input channels ({conv_key} '
                f'{tuple(state_dict[conv_key].shape)}) but {target} has {own[conv_key].shape[1]}')
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing keys (e.g. {missing[0]})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys (e.g. {unexpected[0]})')
    if shapes:
        parts.append(f'{len(shapes)} shape mismatches (e.g. {shapes[0]}: checkpoint '
                     f'{tuple(state_dict[shapes[0]].shape)}, model {tuple(own[shapes[0]].shape)})')
    return f"{subject} does not fit architecture '{model_name}': " + ', '.join(parts)


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint file without executing pickled code, verifying the checksums the trainer stored in it.

    Args:
        path: A ``.safetensors`` file or a torch file (``.pth``, ``.pth.tar``, ``.bin``).

    Returns:
        The loaded mapping (for safetensors, the tensors themselves).

    Raises:
        CheckpointError: The file is missing, corrupt or damaged (weights that no longer match their checksum), or
            holds objects other than tensors and plain containers.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as e:  # safetensors raises its own error types for truncated / foreign files
            raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file: {e}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r'GLOBAL (\S+)', str(e))
        if unsafe is None:
            raise CheckpointError(f"checkpoint '{path}' is corrupt or not a torch file") from None
        raise CheckpointError(
            f"checkpoint '{path}' holds a pickled object ({unsafe.group(1)}), not only tensors and plain containers: "
            f"refused for safety, weights are only read with weights_only=True") from None
    except Exception as e:  # zip / EOF / magic-number errors from truncated or foreign files
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not a torch file: {type(e).__name__}: {e}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a state dict")
    _verify_weights_checksums(checkpoint, path)
    return checkpoint


def _without_split_bn(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {key: value for key, value in state_dict.items() if '.aux_bn.' not in key}


def extract_state_dict(checkpoint: Dict[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Pick the model weights out of a training checkpoint or return a bare state dict as is.

    Args:
        checkpoint: What :func:`read_checkpoint` returned.
        use_ema: Take the EMA weights; an error when the checkpoint has none.

    Returns:
        A state dict with wrapper prefixes (``module.``, ``_orig_mod.``) removed, and without the auxiliary batch
        norms of a ``--split-bn`` run: they normalized the augmented AugMix splits in training only, the model is
        the one of the clean split (timm's ``SplitBatchNorm2d`` evaluates with it too).
    """
    keys = EMA_STATE_DICT_KEYS if use_ema else STATE_DICT_KEYS
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            return _without_split_bn(clean_state_dict(checkpoint[key]))
    if use_ema:
        raise CheckpointError('checkpoint has no EMA weights (state_dict_ema)')
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return _without_split_bn(clean_state_dict(checkpoint))
    raise CheckpointError(f"checkpoint has no model weights (looked for {', '.join(keys)})")


def load_state_dict_file(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """:func:`read_checkpoint` then :func:`extract_state_dict`."""
    return extract_state_dict(read_checkpoint(path), use_ema=use_ema)
