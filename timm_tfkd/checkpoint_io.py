"""Reading weights safely: safetensors, or torch files under ``weights_only=True`` only."""
import argparse
import hashlib
import os
import pickle
import re
from typing import Any, Dict, Type

import torch
import yaml
from timm.models import clean_state_dict

STATE_DICT_KEYS = ('state_dict', 'model', 'module')
EMA_STATE_DICT_KEYS = ('state_dict_ema', 'model_ema')
# timm's train.py writes these; `model_best` wins so a self-teacher is the model the run selected.
RUN_DIR_CHECKPOINTS = ('model_best.pth.tar', 'last.pth.tar')


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or of the wrong shape."""


def resolve_run_dir_checkpoint(path: str) -> str:
    """Return the checkpoint file to use from a training output folder (``model_best``, else ``last``)."""
    for name in RUN_DIR_CHECKPOINTS:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise CheckpointError(f"no {' or '.join(RUN_DIR_CHECKPOINTS)} in training output folder '{path}'")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint file without executing pickled code.

    Args:
        path: A ``.safetensors`` file, a torch file (``.pth``, ``.pth.tar``, ``.bin``), or a training output folder.

    Returns:
        The loaded mapping (for safetensors, the tensors themselves).

    Raises:
        CheckpointError: The file is missing, corrupt, or holds objects other than tensors and plain containers.
    """
    if os.path.isdir(path):
        path = resolve_run_dir_checkpoint(path)
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


def read_run_args(path: str, error: Type[Exception]) -> Dict[str, Any]:
    """The training arguments a run saved in ``args.yaml``, or ``error`` saying what is wrong with the file."""
    try:
        with open(path, encoding='utf-8') as f:
            args = yaml.safe_load(f)
    except FileNotFoundError:
        raise error(f"'{os.path.basename(path)}' is missing in '{os.path.dirname(path)}'") from None
    except yaml.YAMLError as e:
        raise error(f"'{path}' is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(args, dict):
        raise error(f"'{path}' does not hold a mapping of training arguments")
    return args
