"""Load a published Tf-KD model (Hub or local export folder) with its metadata."""
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
from timm.models._hub import hf_split
from torch import nn

from ..version import __version__
from .files import METADATA_FILE, read_json

_logger = logging.getLogger(__name__)


def _split_pretrained_name(name: str) -> Tuple[str, str]:
    source, sep, location = name.partition(':')
    if sep and source in ('hf-hub', 'local-dir') and location:
        return source, location
    if os.path.isdir(name):
        return 'local-dir', name
    raise ValueError(f"'{name}' is not 'hf-hub:org/name', 'local-dir:/path' or an existing folder")


def _hub_metadata(hub_id: str) -> Optional[Dict[str, Any]]:
    repo_id, revision = hf_split(hub_id)
    try:
        path = hf_hub_download(repo_id, METADATA_FILE, revision=revision,
                               library_name='timm-tfkd', library_version=__version__)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    return read_json(Path(path))


def _local_metadata(folder: str) -> Optional[Dict[str, Any]]:
    path = Path(folder) / METADATA_FILE
    return read_json(path) if path.is_file() else None


def load_pretrained(name: str, **create_model_kwargs: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a published model with its weights, and read its Tf-KD metadata.

    Args:
        name: 'hf-hub:org/name[@revision]', 'local-dir:/path' or a folder path. Hub files come from the
            local cache when HF_HUB_OFFLINE=1.
        **create_model_kwargs: Passed to ``timm.create_model`` (pretrained is always True).

    Returns:
        The model, and the parsed tfkd.json (empty, with a warning, when the model has none).
    """
    source, location = _split_pretrained_name(name)
    model = timm.create_model(f'{source}:{location}', pretrained=True, **create_model_kwargs)
    meta = _hub_metadata(location) if source == 'hf-hub' else _local_metadata(location)
    if meta is None:
        _logger.warning("No %s for '%s': not a timm-tfkd export, returning empty Tf-KD metadata",
                        METADATA_FILE, name)
        meta = {}
    return model, meta
