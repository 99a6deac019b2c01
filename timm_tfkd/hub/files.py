"""The files of an export folder, and how a folder is recognised as one."""
import json
from pathlib import Path
from typing import Any, Dict

from ..errors import ExportError

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
METADATA_FILE = 'tfkd.json'
CURVES_FILE = 'training_curves.png'
CARD_FILE = 'README.md'
EXPORT_FILES = frozenset((WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE, CURVES_FILE, CARD_FILE))
# tfkd.json carries this marker so a folder can be recognised as ours before it is overwritten or uploaded.
EXPORT_FORMAT = 'timm-tfkd-export'
EXPORT_FORMAT_VERSION = 1


def read_json(path: Path) -> Dict[str, Any]:
    try:
        with path.open(encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise ExportError(f"'{path.name}' is missing in '{path.parent}'") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"'{path}' is not valid JSON: {e}") from None


def is_export(folder) -> bool:
    """Whether a folder is a (possibly older) timm-tfkd export: only export files, with our tfkd.json marker."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if not {p.name for p in folder.iterdir()} <= EXPORT_FILES:
        return False
    try:
        return read_json(folder / METADATA_FILE).get('format') == EXPORT_FORMAT
    except ExportError:
        return False
