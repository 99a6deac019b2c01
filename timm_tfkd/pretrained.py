"""Whether timm's pretrained weights for a name can be had here, found out in seconds.

Without a network, timm's download of Hub weights retries for about a minute and then fails with a long traceback.
The trainer asks first: weights in the local Hub cache, or a Hub that answers within a few seconds.
"""
from typing import Optional, Sequence, Tuple

import huggingface_hub.constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from timm.models import get_pretrained_cfg
from timm.models._hub import hf_split

PROBE_TIMEOUT_S = 5.0
# The weights files timm reads from a Hub repo or export folder, in the order it tries them.
HUB_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')


def _hub_files(name: str) -> Optional[Tuple[str, Optional[str], Sequence[str]]]:
    """The Hub repo, revision and files timm would download for ``name``; None when it downloads nothing from the
    Hub (a local folder, a plain URL, or a name timm does not know, which timm refuses itself)."""
    if name.startswith('local-dir:'):
        return None
    if name.startswith('hf-hub:'):
        repo_id, revision = hf_split(name[len('hf-hub:'):])
        return repo_id, revision, ('config.json', *HUB_WEIGHT_FILES)
    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo_id, revision = hf_split(cfg.hf_hub_id)
    return repo_id, revision, ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES)


def pretrained_unavailable(name: str) -> Optional[str]:
    """Why timm could not get the pretrained weights of ``name`` here, or None when it can (or needs no Hub).

    Args:
        name: A timm model name (``resnet18``, ``resnet18.a1_in1k``) or ``hf-hub:org/name[@revision]``.
    """
    found = _hub_files(name)
    if found is None:
        return None
    repo_id, revision, files = found
    cached = [file for file in files if isinstance(try_to_load_from_cache(repo_id, file, revision=revision), str)]
    if any(file != 'config.json' for file in cached) and ('config.json' in cached or 'config.json' not in files):
        return None
    if hf_constants.HF_HUB_OFFLINE:
        return f"its weights ({repo_id}) are not in the local Hub cache and HF_HUB_OFFLINE is set"
    try:  # the first file timm asks for
        get_hf_file_metadata(hf_hub_url(repo_id, files[0], revision=revision), timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # connection, DNS, timeout, 401/404: timm's download would fail the same way, slowly
        return (f'its weights ({repo_id}) are not in the local Hub cache and the Hub cannot be reached '
                f'({type(e).__name__}); download them first, or use local-dir:/path')
    return None


def cached_weights_file(name: str) -> Optional[str]:
    """The weights file of ``name`` in the local Hub cache (after timm loaded it), for its checksum; None if none."""
    found = _hub_files(name)
    if found is None:
        return None
    repo_id, revision, files = found
    paths = (try_to_load_from_cache(repo_id, file, revision=revision) for file in files if file != 'config.json')
    return next((path for path in paths if isinstance(path, str)), None)
