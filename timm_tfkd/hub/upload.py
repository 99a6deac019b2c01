"""Upload an export folder to a Hugging Face Hub model repo; a failure keeps the export and says how to retry."""
import logging
import os
import shlex
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id

from ..errors import ExportError, HubUploadError, InvalidRepoIdError
from ..version import __version__
from .export import export_run
from .files import EXPORT_FILES, METADATA_FILE, is_export, read_json

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CLI_NAME = 'timm-tfkd'
DEFAULT_EXPORT_SUBDIR = 'hub_export'


def validate_model_id(repo_id: str) -> str:
    """Check a Hub model id is ``org/name``.

    Returns:
        The id, unchanged.

    Raises:
        InvalidRepoIdError: Not of the form ``org/name`` or not a valid Hub name.
    """
    message = f"invalid Hub model id '{repo_id}': expected org/name (letters, digits, '-', '_', '.')"
    if not isinstance(repo_id, str) or repo_id.count('/') != 1:
        raise InvalidRepoIdError(message)
    try:
        hf_validate_repo_id(repo_id)
    except ValueError:
        raise InvalidRepoIdError(message) from None
    return repo_id


def _check_export_folder(folder: Path) -> None:
    if not is_export(folder):
        raise ExportError(f"'{folder}' is not a timm-tfkd export folder (run `{CLI_NAME} export` first)")
    missing = sorted(EXPORT_FILES - {p.name for p in folder.iterdir()})
    if missing:
        raise ExportError(f"export folder '{folder}' is incomplete, missing {', '.join(missing)}")


def _retry_command(
        target: Path,
        repo_id: str,
        private: bool,
        revision: Optional[str],
        commit_message: Optional[str] = None,
        export_dir: Optional[Path] = None,
) -> str:
    parts = [CLI_NAME, 'push', str(target.absolute()), repo_id]
    if private:
        parts.append('--private')
    if revision:
        parts += ['--revision', revision]
    if commit_message:
        parts += ['--commit-message', commit_message]
    if export_dir is not None:
        parts += ['--export-dir', str(export_dir.absolute())]
    return shlex.join(parts)


def _redact(text: str, token: Optional[str]) -> str:
    return text.replace(token, '***') if token else text


def _default_commit_message(folder: Path) -> str:
    meta = read_json(folder / METADATA_FILE)
    return f"Upload {meta['model']} trained with Tf-KD ({meta['tfkd']['mode']}) via timm-tfkd {__version__}"


def _upload(
        folder: Path,
        repo_id: str,
        private: bool,
        revision: Optional[str],
        commit_message: Optional[str],
        token: Optional[str],
        api: Optional[Any],
        retry_command: str,
) -> str:
    """Create the repo (and branch) and upload the folder in one commit; wrap every failure with the retry."""
    token = token or get_token()
    if token is None:
        _logger.warning('No Hugging Face token found (set HF_TOKEN or run `hf auth login`); the Hub may refuse '
                        'the upload')
    api = api if api is not None else HfApi(library_name='timm-tfkd', library_version=__version__)
    message = commit_message or _default_commit_message(folder)
    _logger.info('Uploading %s to https://huggingface.co/%s%s', folder, repo_id, f'@{revision}' if revision else '')
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, token=token)
        if revision:
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, token=token)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=message, token=token)
    except Exception as e:  # network, auth, permission, quota: all leave the export for a retry
        detail = _redact(' '.join(f'{type(e).__name__}: {e}'.split()), token)
        raise HubUploadError(
            f"upload of '{folder}' to {repo_id} failed ({detail}); the export is kept on disk. "
            f"Retry with:\n  {retry_command}",
            folder=folder, repo_id=repo_id, retry_command=retry_command) from None
    url = getattr(commit, 'commit_url', None) or str(commit)
    _logger.info('Uploaded to %s', url)
    return url


def push_to_hub(
        folder: PathLike,
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        api: Optional[Any] = None,
) -> str:
    """Upload an export folder to a Hub model repo, creating the repo (and the revision branch) if needed.

    Args:
        folder: A folder written by :func:`export_run`.
        repo_id: ``org/name``.
        private: Create the repo as private (an existing repo keeps its visibility).
        revision: Branch to commit to (created from main when missing); main when None.
        commit_message: Defaults to a message naming the model and Tf-KD mode.
        token: Hub token; defaults to HF_TOKEN, then the stored Hugging Face login. Never logged or written.
        api: An ``HfApi``-like object; a new ``HfApi`` when None.

    Returns:
        The commit URL.

    Raises:
        InvalidRepoIdError: ``repo_id`` is not ``org/name``.
        ExportError: ``folder`` is not a complete export.
        HubUploadError: The Hub call failed; the message holds the command that retries it.
    """
    folder = Path(folder)
    validate_model_id(repo_id)
    _check_export_folder(folder)
    retry = _retry_command(folder, repo_id, private, revision, commit_message)
    return _upload(folder, repo_id, private, revision, commit_message, token, api, retry)


def push_run(
        run_dir: PathLike,
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        export_dir: Optional[PathLike] = None,
        checkpoint: PathLike = 'best',
        use_ema: Optional[bool] = None,
        api: Optional[Any] = None,
) -> str:
    """Export a training run (to ``run_dir/hub_export`` unless ``export_dir`` is given) and upload it.

    Args:
        run_dir: The training output folder.
        repo_id: ``org/name``.
        private: See :func:`push_to_hub`.
        revision: See :func:`push_to_hub`.
        commit_message: See :func:`push_to_hub`.
        token: See :func:`push_to_hub`.
        export_dir: Where to export.
        checkpoint: See :func:`export_run`.
        use_ema: See :func:`export_run`.
        api: See :func:`push_to_hub`.

    Returns:
        The commit URL.

    Raises:
        HubUploadError: The upload failed; the export stays on disk and the message holds the retry command.
    """
    run_dir = Path(run_dir)
    validate_model_id(repo_id)
    default_dir = run_dir / DEFAULT_EXPORT_SUBDIR
    folder = Path(export_dir) if export_dir is not None else default_dir
    folder = export_run(run_dir, folder, checkpoint=checkpoint, use_ema=use_ema, repo_id=repo_id)
    custom_dir = folder if folder.absolute() != default_dir.absolute() else None
    retry = _retry_command(run_dir, repo_id, private, revision, commit_message, custom_dir)
    return _upload(folder, repo_id, private, revision, commit_message, token, api, retry)
