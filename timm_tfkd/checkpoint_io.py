"""Reading weights safely: safetensors, or torch files under ``weights_only=True`` only."""
import argparse
import hashlib
import os
import pickle
import re
from typing import Any, Dict

import torch
from timm.models import clean_state_dict

from .errors import CheckpointError

STATE_DICT_KEYS = ('state_dict', 'model', 'module')
EMA_STATE_DICT_KEYS = ('state_dict_ema', 'model_ema')


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint file without executing pickled code.

    Args:
        path: A ``.safetensors`` file or a torch file (``.pth``, ``.pth.tar``, ``.bin``).

    Returns:
        The loaded mapping (for safetensors, the tensors themselves).

    Raises:
        CheckpointError: The file is missing, corrupt, or holds objects other than tensors and plain containers.
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
    return checkpoint


def extract_state_dict(checkpoint: Dict[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Pick the model weights out of a training checkpoint or return a bare state dict as is.

    Args:
        checkpoint: What :func:`read_checkpoint` returned.
        use_ema: Take the EMA weights; an error when the checkpoint has none.

    Returns:
        A state dict with wrapper prefixes (``module.``, ``_orig_mod.``) removed.
    """
    keys = EMA_STATE_DICT_KEYS if use_ema else STATE_DICT_KEYS
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            return clean_state_dict(checkpoint[key])
    if use_ema:
        raise CheckpointError('checkpoint has no EMA weights (state_dict_ema)')
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return clean_state_dict(checkpoint)
    raise CheckpointError(f"checkpoint has no model weights (looked for {', '.join(keys)})")


def load_state_dict_file(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """:func:`read_checkpoint` then :func:`extract_state_dict`."""
    return extract_state_dict(read_checkpoint(path), use_ema=use_ema)
