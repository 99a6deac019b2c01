"""Input normalization fitted to a model's input channels, shared by the student's loaders and the teacher."""
from typing import Any, Dict, Mapping, Sequence, Tuple

import torch.nn as nn
from timm.data import resolve_data_config
from timm.utils import unwrap_model

from .errors import UsageError


def channel_stats(values: Sequence[float], channels: int, name: str) -> Tuple[float, ...]:
    """Fit per-channel normalization values to ``channels``: repeat one value, or average RGB for 1 channel.

    timm resolves ImageNet's 3-value mean / std even for ``in_chans=1`` models; averaging them is what a
    grayscale image normalized the RGB way sees on average.

    Raises:
        UsageError: The values cannot be fitted (e.g. 2 values for 3 channels).
    """
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise UsageError(f'{name} has {len(values)} values but the model has {channels} input channels')


def fit_channel_stats(data_config: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of a timm data config whose mean / std have one value per input channel."""
    channels = data_config['input_size'][0]
    fitted = dict(data_config)
    fitted['mean'] = channel_stats(data_config['mean'], channels, 'mean')
    fitted['std'] = channel_stats(data_config['std'], channels, 'std')
    return fitted


def resolve_student_data_config(
        settings: Mapping[str, Any],
        model: nn.Module,
        verbose: bool = False,
) -> Dict[str, Any]:
    """timm's data config of the student (from ``train.py``-style settings and the model), channels fitted.

    Args:
        settings: Parsed arguments as a mapping (``vars(args)``): input size, mean, std, crop, interpolation.
        model: The student (possibly wrapped).
        verbose: Let timm log the resolved config.
    """
    model = unwrap_model(model)
    config = resolve_data_config(dict(settings), model=model, verbose=verbose)
    channels = getattr(model, 'in_chans', None)
    if channels and config['input_size'][0] != channels:
        # timm takes the pretrained config's (3, H, W) when no image size is given, whatever the model's channels.
        config['input_size'] = (channels, *config['input_size'][1:])
    return fit_channel_stats(config)
