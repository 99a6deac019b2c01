"""Publish a Tf-KD training run on the Hugging Face Hub and load it back: one module per job.

- :mod:`.export`: a run folder -> a folder timm loads on its own (weights, ``config.json``, ``tfkd.json``);
- :mod:`.card`: its model card and training curves;
- :mod:`.upload`: the upload, with a retry command when it fails;
- :mod:`.load`: ``load_pretrained``, the model with its Tf-KD metadata.
"""
from ..errors import ExportError, HubUploadError, InvalidRepoIdError
from .export import export_run
from .files import EXPORT_FILES, EXPORT_FORMAT, is_export
from .load import load_pretrained
from .upload import DEFAULT_EXPORT_SUBDIR, push_run, push_to_hub, validate_model_id

__all__ = [
    'ExportError', 'InvalidRepoIdError', 'HubUploadError', 'EXPORT_FILES', 'EXPORT_FORMAT', 'DEFAULT_EXPORT_SUBDIR',
    'export_run', 'is_export', 'push_to_hub', 'push_run', 'validate_model_id', 'load_pretrained',
]
