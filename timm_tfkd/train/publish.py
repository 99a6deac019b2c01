"""The trainer's Hub flags and the end-of-run export / upload they ask for."""
import argparse
from pathlib import Path
from typing import Union

from ..errors import UsageError
from ..hub import DEFAULT_EXPORT_SUBDIR, export_run, push_run, validate_model_id


def add_hub_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Register the "Hub publishing" group on the trainer's parser.

    Returns:
        The argument group.
    """
    group = parser.add_argument_group('Hub publishing')
    group.add_argument(
        '--push-to-hub', action='store_true',
        help='After training, export the run and upload it to the Hugging Face Hub (needs --hub-model-id). '
             'The token comes from HF_TOKEN or `hf auth login`, never from the command line.')
    group.add_argument(
        '--hub-model-id', default=None, metavar='ORG/NAME',
        help='Hub model repo to upload to, created if missing.')
    group.add_argument(
        '--hub-private', action='store_true',
        help='Create the Hub repo as private.')
    group.add_argument(
        '--hub-revision', default=None, metavar='REV',
        help='Branch of the Hub repo to commit to (created if missing). Default: main.')
    group.add_argument(
        '--export-dir', default=None, metavar='DIR',
        help='Export a Hub-ready folder here at the end of training. With --push-to-hub and no --export-dir, '
             f'the export goes to OUTPUT/{DEFAULT_EXPORT_SUBDIR}.')
    return group


def check_hub_args(args: argparse.Namespace) -> None:
    """Fail before training starts when the Hub arguments cannot work.

    Raises:
        UsageError: --push-to-hub without --hub-model-id, or an id that is not ``org/name`` (one-line message).
    """
    if args.push_to_hub and not args.hub_model_id:
        raise UsageError('--push-to-hub needs --hub-model-id ORG/NAME')
    if args.hub_model_id:
        validate_model_id(args.hub_model_id)


def publish_run(args: argparse.Namespace, run_dir: Union[str, Path]) -> None:
    """Export and upload a finished run as the Hub arguments ask (nothing when none is given); rank 0 only.

    Failures never lose results: the run folder and any export stay on disk.

    Raises:
        HubUploadError: The upload failed; its message holds the command that retries it.
        TfKDError: The export failed.
    """
    if not args.push_to_hub and args.export_dir is None:
        return
    run_dir = Path(run_dir)
    export_dir = Path(args.export_dir) if args.export_dir is not None else run_dir / DEFAULT_EXPORT_SUBDIR
    if args.push_to_hub:
        push_run(run_dir, args.hub_model_id, private=args.hub_private, revision=args.hub_revision,
                 export_dir=export_dir)
    else:
        export_run(run_dir, export_dir)
