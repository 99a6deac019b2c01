"""Evaluate a finished training run on any split, the way the trainer validates.

The network is rebuilt from the run folder (:mod:`timm_tfkd.run_folder`) and fed through the same timm dataset and
eval loader as the trainer's validation, so evaluating ``last`` on the run's validation split reproduces the final
``eval_*`` row of its ``summary.csv``. Use it to report a held-out test split that training never saw.
"""
import argparse
from typing import Dict, List, Optional

import torch

from .checkpoint_io import load_state_dict_file
from .errors import EvaluationError, TfKDError
from .run_folder import MULTILABEL_TASK, RunFolder, metric_names
from .train.build import available_device, create_precision
from .train.data import create_eval_loader
from .train.splits import class_names, create_split_dataset
from .train.engine import measure
from .train.flags import create_parser


def _training_args(folder: RunFolder) -> argparse.Namespace:
    """The trainer's arguments: its parser defaults, overridden by every key the run saved in ``args.yaml``."""
    saved = folder.read_args()
    args = create_parser().parse_args([])
    # Keys unknown to this version's parser cannot change how the model or data are built here.
    for key, value in saved.items():
        if hasattr(args, key):
            setattr(args, key, value)
    return args


def _check_classes(found: List[str], trained: Optional[List[str]], split: str) -> None:
    """A split whose class folders differ from training would shift every label index silently."""
    if trained and found and found != trained:
        raise EvaluationError(f"the '{split}' split has classes {found[:5]}{'...' if len(found) > 5 else ''} but the "
                              f"run was trained on {trained[:5]}{'...' if len(trained) > 5 else ''}")


def evaluate_run(
        run_dir: str,
        data_dir: str,
        split: str = 'test',
        checkpoint: str = 'last',
        batch_size: int = 256,
        device: Optional[str] = None,
        workers: int = 0,
) -> Dict[str, float]:
    """Top-1, top-5, NLL and ECE of a training run's weights (the model's, not the EMA's) on a data split; for a
    multi-label run (``--task multilabel``), timm's multi-label metrics (mAP, F1 micro / macro / sample, BCE loss).

    Args:
        run_dir: Training output folder (``args.yaml``, ``run_info.json``, checkpoints).
        data_dir: Dataset root, read with the run's ``--dataset`` kind (e.g. an image folder with split folders).
        split: Split to evaluate, e.g. ``test``.
        checkpoint: ``last`` for the final epoch (the honest choice for a test split), ``best`` or a file.
        batch_size: Evaluation batch size.
        device: ``cpu``, ``cuda``, ...; default: ``cuda`` when available, else ``cpu``.
        workers: Data loader processes.

    Returns:
        ``top1``, ``top5`` and ``ece`` in percent, ``nll`` in nats per sample (multi-label: ``map``,
        ``micro_f1``, ``macro_f1``, ``sample_f1`` in percent and ``loss``).

    Raises:
        EvaluationError: The run folder, checkpoint or split cannot be used.
    """
    if batch_size < 1 or workers < 0:
        raise EvaluationError(f'batch size must be >= 1 and workers >= 0, got {batch_size} and {workers}')
    try:
        folder = RunFolder(run_dir)
        record = folder.read_record()
        args = _training_args(folder)
        checkpoint_path = folder.checkpoint(checkpoint)
        device = available_device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        precision = create_precision(args, device)
        model = folder.create_model(record, vars(args))
        state_dict = load_state_dict_file(str(checkpoint_path))
        args.data_dir = data_dir
        input_img_mode = args.input_img_mode or ('RGB' if record.in_chans == 3 else 'L')
        dataset = create_split_dataset(args, split, False, input_img_mode)
    except TfKDError as e:
        raise EvaluationError(str(e)) from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise EvaluationError(f"'{checkpoint_path}' does not fit {record.model} (num_classes={record.num_classes}, "
                              f"in_chans={record.in_chans}): {' '.join(str(e).split())[:300]}") from None
    _check_classes(class_names(dataset), record.class_names, split)
    model.to(device=device, dtype=precision.model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = create_eval_loader(dataset, record.data_config, batch_size, workers, device, precision.model_dtype,
                                prefetcher=not args.no_prefetcher)
    multilabel = record.task == MULTILABEL_TASK
    result = measure(model, loader, device, not args.no_prefetcher, args.channels_last, precision.autocast,
                     precision.model_dtype, multilabel_threshold=args.multilabel_threshold if multilabel else None
                     ).compute()
    return {name: result[name] for name in metric_names(record.task)}
