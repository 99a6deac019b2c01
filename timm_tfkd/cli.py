"""The ``timm-tfkd`` command: export a training run for the Hub, upload it, prepare Fashion-MNIST, evaluate a run,
run a seeded study.

Each subcommand is registered by one ``add_*_command(subparsers)`` function that sets a ``handler``; a new
subcommand adds its function to :data:`SUBCOMMANDS`.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .console import console_logging, held_logs
from .datasets.fashion_mnist import DEFAULT_SOURCE, prepare_folder
from .errors import ExportError, HubUploadError, TfKDError, UsageError
from .evaluate import evaluate_run
from .hub import export_run, is_export, push_run, push_to_hub
from .study import DESCRIPTION as STUDY_DESCRIPTION
from .study import add_study_arguments, run_study
from .version import __version__

PROG = 'timm-tfkd'


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting, so main() owns the exit status."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def add_export_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export RUN_DIR OUT_DIR``."""
    parser = subparsers.add_parser(
        'export', help='Write a Hub-ready folder (safetensors weights, timm config, Tf-KD metadata, model card).')
    parser.add_argument('run_dir', metavar='RUN_DIR', help='Training output folder.')
    parser.add_argument('out_dir', metavar='OUT_DIR', help='New, empty, or previous export folder.')
    parser.add_argument(
        '--checkpoint', default='best', metavar='best|last|PATH',
        help='best: model_best.pth.tar (else last.pth.tar); last: last.pth.tar; or a checkpoint file. '
             'Default: best.')
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument('--ema', dest='use_ema', action='store_true', default=None,
                     help='Export the EMA weights.')
    ema.add_argument('--no-ema', dest='use_ema', action='store_false',
                     help='Export the plain model weights.')
    parser.set_defaults(handler=run_export)
    return parser


def add_push_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``push RUN_DIR REPO_ID``."""
    parser = subparsers.add_parser(
        'push', help='Export a training run (best checkpoint, EMA when it evaluated better) and upload it. '
                     'The token comes from HF_TOKEN or `hf auth login`.')
    parser.add_argument('run_dir', metavar='RUN_DIR', help='Training output folder, or an export folder.')
    parser.add_argument('repo_id', metavar='REPO_ID', help='Hub model id, org/name.')
    parser.add_argument('--private', action='store_true', help='Create the repo as private.')
    parser.add_argument('--revision', default=None, metavar='REV', help='Branch to commit to. Default: main.')
    parser.add_argument('--commit-message', default=None, metavar='MSG', help='Commit message.')
    parser.add_argument('--export-dir', default=None, metavar='DIR',
                        help='Where to export. Default: RUN_DIR/hub_export.')
    parser.set_defaults(handler=run_push)
    return parser


def add_fashion_mnist_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fashion-mnist OUT_DIR``."""
    parser = subparsers.add_parser(
        'fashion-mnist', help="Write Fashion-MNIST (Debian's dataset-fashion-mnist) as a timm image folder with "
                              "train / validation (carved from train) / test splits.")
    parser.add_argument('out_dir', metavar='OUT_DIR', help='Output folder.')
    parser.add_argument('--train-size', type=int, default=None, metavar='N',
                        help='Training images (default: all the validation split leaves).')
    parser.add_argument('--val-size', type=int, default=5000, metavar='N',
                        help='Validation images carved from the training set. Default: 5000.')
    parser.add_argument('--test-size', type=int, default=None, metavar='N', help='Test images (default: 10000).')
    parser.add_argument('--seed', type=int, default=0, help='Seed of the split. Default: 0.')
    parser.add_argument('--source', default=DEFAULT_SOURCE, help=f'idx .gz folder. Default: {DEFAULT_SOURCE}.')
    parser.set_defaults(handler=run_fashion_mnist)
    return parser


def add_evaluate_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evaluate RUN_DIR --data-dir DIR``."""
    parser = subparsers.add_parser(
        'evaluate', help="Evaluate a training run's weights on a split (top-1, top-5, NLL, ECE) with the run's "
                         "model and data settings; prints one line of JSON.")
    parser.add_argument('run_dir', metavar='RUN_DIR', help='Training output folder.')
    parser.add_argument('--data-dir', required=True, metavar='DIR', help='Dataset root (e.g. train/validation/test '
                                                                         'folders).')
    parser.add_argument('--split', default='test', metavar='NAME', help='Split to evaluate. Default: test.')
    parser.add_argument(
        '--checkpoint', default='last', metavar='last|best|PATH',
        help='last: the final epoch (last.pth.tar); best: model_best.pth.tar (selected on the run\'s own eval '
             'split, so never report it on that split); or a checkpoint file. Default: last.')
    parser.add_argument('-b', '--batch-size', type=int, default=256, metavar='N', help='Default: 256.')
    parser.add_argument('--device', default=None, help='Default: cuda when available, else cpu.')
    parser.add_argument('-j', '--workers', type=int, default=0, metavar='N', help='Loader processes. Default: 0.')
    parser.set_defaults(handler=run_evaluate)
    return parser


def add_study_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``study --data-dir DIR --out DIR``."""
    parser = subparsers.add_parser('study', help=STUDY_DESCRIPTION, description=STUDY_DESCRIPTION)
    add_study_arguments(parser)
    parser.set_defaults(handler=run_study_command)
    return parser


SUBCOMMANDS: List[Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = [
    add_export_command,
    add_push_command,
    add_fashion_mnist_command,
    add_evaluate_command,
    add_study_command,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``timm-tfkd`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = _Parser(prog=PROG, description='Teacher-free Knowledge Distillation for timm: Hub, data and evaluation tools.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for add_command in SUBCOMMANDS:
        add_command(subparsers)
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``export``: prints the export folder."""
    folder = export_run(args.run_dir, args.out_dir, checkpoint=args.checkpoint, use_ema=args.use_ema)
    print(folder)
    return 0


def run_push(args: argparse.Namespace) -> int:
    """Handler of ``push``: an export folder is uploaded as is, a run folder is exported first. Prints the commit."""
    options = dict(private=args.private, revision=args.revision, commit_message=args.commit_message)
    if is_export(args.run_dir):
        if args.export_dir is not None:
            raise ExportError(f"'{args.run_dir}' is already an export folder; --export-dir does not apply")
        url = push_to_hub(args.run_dir, args.repo_id, **options)
    else:
        url = push_run(Path(args.run_dir), args.repo_id, export_dir=args.export_dir, **options)
    print(url)
    return 0


def run_fashion_mnist(args: argparse.Namespace) -> int:
    """Handler of ``fashion-mnist``: prints the image count of each split."""
    counts = prepare_folder(args.out_dir, args.train_size, args.val_size, args.test_size, args.seed, args.source)
    print(' '.join(f'{split}={count}' for split, count in counts.items()))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``evaluate``: prints the run, split, checkpoint and metrics as one JSON line."""
    metrics = evaluate_run(args.run_dir, args.data_dir, split=args.split, checkpoint=args.checkpoint,
                           batch_size=args.batch_size, device=args.device, workers=args.workers)
    print(json.dumps({'run_dir': args.run_dir, 'split': args.split, 'checkpoint': args.checkpoint, **metrics}))
    return 0


def run_study_command(args: argparse.Namespace) -> int:
    """Handler of ``study``: prints each run's progress; 1 when a run failed (the others went on)."""
    return run_study(args, [PROG, *args.argv])


def _fail(message: str) -> None:
    print(f'{PROG}: error: {message}', file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``timm-tfkd`` command.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 1 when an upload failed (the retry command is printed), 2 on bad input.
    """
    with console_logging(), held_logs() as release:
        code = _run(argv)
        if code == 0:
            release()
        return code


def _run(argv: Optional[Sequence[str]]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    except UsageError as e:
        _fail(str(e))
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.handler(args)
    except HubUploadError as e:  # the export is on disk; the message ends with the command that retries
        _fail(str(e))
        return 1
    except (TfKDError, FileNotFoundError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 2


if __name__ == '__main__':
    sys.exit(main())
