"""NaFlex batches (timm's ``create_naflex_loader``): what they hold, how a model is checked to read them, and the
per-channel arithmetic on their patch values.

A NaFlex batch is a dict: ``patches`` (B, N, P*P*C) flattened, or (B, N, Ph, Pw, C) / (B, N, C, Ph, Pw) with
variable patch sizes, ``patch_coord`` (B, N, 2), ``patch_valid`` (B, N) and ``seq_len``. Inside each flattened
patch the channel varies fastest (P-P-C, timm's default) or slowest (C-P-P, ``--naflex-patchify-channels-first``).
"""
import logging
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

PATCHES = 'patches'


def is_naflex_batch(input: Any) -> bool:
    """Whether ``input`` is a NaFlex batch (a dict with patches) rather than an image tensor."""
    return isinstance(input, dict) and PATCHES in input


def batch_size_of(input: Any) -> int:
    """Samples in a batch of images or of NaFlex patches."""
    return input[PATCHES].shape[0] if is_naflex_batch(input) else input.shape[0]


def move_batch(input: Dict[str, Any], device: torch.device, dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """A NaFlex batch on ``device``: every tensor moved, the patch values (only they) cast to ``dtype``."""
    return {key: value.to(device=device, dtype=dtype if key == PATCHES else None) if torch.is_tensor(value) else value
            for key, value in input.items()}


def layout_name(channels_last: bool) -> str:
    return 'P-P-C' if channels_last else 'C-P-P'


def affine_patches(patches: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor,
                   channels_last: bool) -> torch.Tensor:
    """``patches * gain + offset`` per channel (``gain``, ``offset``: (C,)), in the patches' channel layout.

    Raises:
        ValueError: The patches are neither flattened (3 dimensions) nor patch grids (5 dimensions).
    """
    channels = gain.numel()
    if patches.ndim == 3:  # the channel is the innermost (P-P-C) or the outermost (C-P-P) factor of the last axis
        grouped = patches.unflatten(-1, (-1, channels) if channels_last else (channels, -1))
        axis = (channels,) if channels_last else (channels, 1)
        return (grouped * gain.view(axis) + offset.view(axis)).flatten(-2)
    if patches.ndim == 5:  # (Ph, Pw, C) or (C, Ph, Pw) per patch
        axis = (channels,) if channels_last else (channels, 1, 1)
        return patches * gain.view(axis) + offset.view(axis)
    raise ValueError(f'NaFlex patches have 3 or 5 dimensions, got {patches.ndim}')


def example_batch(patch_size: Tuple[int, int], channels: int, channels_last: bool, unflattened: bool,
                  device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """One sample of one patch, shaped as the NaFlex loader shapes it (to check that a model reads such batches)."""
    ph, pw = patch_size
    if unflattened:
        shape = (1, 1, ph, pw, channels) if channels_last else (1, 1, channels, ph, pw)
    else:
        shape = (1, 1, ph * pw * channels)
    return {
        PATCHES: torch.zeros(shape, device=device),
        'patch_coord': torch.zeros((1, 1, 2), dtype=torch.int64, device=device),
        'patch_valid': torch.ones((1, 1), dtype=torch.bool, device=device),
    }


def reads_naflex_problem(
        model: nn.Module,
        patch_sizes: Sequence[Tuple[int, int]],
        channels: int,
        channels_last: bool,
        unflattened: bool,
        device: Optional[torch.device] = None,
) -> Optional[str]:
    """Why ``model`` cannot read the NaFlex batches of the loader, or None.

    A NaFlex model has ``get_patch_size()`` (timm's train.py takes the loader's patch size from it); one whose patch
    embedding says which layout it reads must read the loader's; and it must run on a one-patch batch of every patch
    size the loader makes (run in eval mode without gradients, so nothing about the model changes).

    Args:
        model: The model (student or teacher network).
        patch_sizes: The patch sizes the loader makes.
        channels: Input channels.
        channels_last: The loader's layout is P-P-C.
        unflattened: The loader keeps patches as (Ph, Pw) grids (``--naflex-patch-sizes``).
        device: Where the model is.
    """
    if not callable(getattr(model, 'get_patch_size', None)):
        return ('it does not read NaFlex patch batches (a NaFlex model has get_patch_size(): naflexvit_*, or a ViT '
                'with --model-kwargs use_naflex=True)')
    model_layout = getattr(getattr(model, 'embeds', None), 'channels_last', None)
    if model_layout is not None and bool(model_layout) != channels_last:
        return (f'it reads {layout_name(model_layout)} patches but the loader makes {layout_name(channels_last)} ones '
                f'(--naflex-patchify-channels-first goes with --model-kwargs patchify_channels_last=False)')
    was_training = model.training
    model.eval()
    try:
        for size in patch_sizes:
            try:
                with torch.no_grad():  # not inference mode: what a forward caches (patch interpolation) stays usable
                    model(example_batch(size, channels, channels_last, unflattened, device))
            except Exception as e:  # any failure of the model's forward means it cannot take these patches
                detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
                return f'it cannot read {size[0]}x{size[1]} patches of {channels} channels ({detail})'
    finally:
        model.train(was_training)
    return None
