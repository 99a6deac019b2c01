"""Evaluate a finished training run on any split, the way the trainer validates.

The model is rebuilt from the run's ``args.yaml`` and ``run_info.json`` and fed through the same timm dataset and
eval-loader calls as the trainer's validation, so evaluating ``last`` on the run's validation split reproduces the
final ``eval_*`` row of its ``summary.csv``. Use it to report a held-out test split that training never saw.
"""
import argparse
import json
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from timm.data import create_loader

from .checkpoint_io import CheckpointError, load_state_dict_file, read_run_args, resolve_run_dir_checkpoint
from .train.args import UsageError, create_parser
from .train.build import Precision, create_precision, create_student
from .train.data import _class_names, _create_dataset
from .train.engine import measure

METRIC_NAMES = ('top1', 'top5', 'nll', 'ece')
LAST_CHECKPOINT = 'last.pth.tar'


class EvaluationError(ValueError):
    """A run folder, checkpoint or split cannot be evaluated as asked."""


def _read_run_info(run_dir: str) -> Dict[str, Any]:
    path = os.path.join(run_dir, 'run_info.json')
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvaluationError(f"'{run_dir}' is not a finished training run: run_info.json is missing") from None
    except json.JSONDecodeError as e:
        raise EvaluationError(f"'{path}' is not valid JSON: {e}") from None


def _read_training_args(run_dir: str) -> argparse.Namespace:
    """The trainer's arguments: its parser defaults, overridden by every key the run saved in ``args.yaml``."""
    saved = read_run_args(os.path.join(run_dir, 'args.yaml'), EvaluationError)
    args = create_parser().parse_args([])
    # Keys unknown to this version's parser cannot change how the model or data are built here.
    for key, value in saved.items():
        if hasattr(args, key):
            setattr(args, key, value)
    return args


def resolve_checkpoint(run_dir: str, checkpoint: str) -> str:
    """The checkpoint file that ``checkpoint`` names in a run folder.

    Args:
        run_dir: The training output folder.
        checkpoint: ``last`` (the final epoch, never a fallback), ``best`` (``model_best.pth.tar``, else
            ``last.pth.tar``, as ``export`` picks) or a file, relative to ``run_dir`` when not found as given.

    Returns:
        The path of an existing file.
    """
    if checkpoint == 'last':
        path = os.path.join(run_dir, LAST_CHECKPOINT)
    elif checkpoint == 'best':
        try:
            path = resolve_run_dir_checkpoint(run_dir)
        except CheckpointError as e:
            raise EvaluationError(str(e)) from None
    elif not os.path.exists(checkpoint) and os.path.exists(os.path.join(run_dir, checkpoint)):
        path = os.path.join(run_dir, checkpoint)
    else:
        path = checkpoint
    if not os.path.isfile(path):
        raise EvaluationError(f"checkpoint '{path}' does not exist")
    return path


def _build_model(args: argparse.Namespace, info: Dict[str, Any], checkpoint_path: str) -> nn.Module:
    """The trainer's student construction with the run's class and channel counts, then the checkpoint's weights."""
    args.num_classes = info['num_classes']
    args.in_chans = info['in_chans']
    # The weights come from the checkpoint: nothing may be downloaded or read for initialisation.
    args.pretrained, args.pretrained_path, args.initial_checkpoint = False, None, ''
    try:
        model = create_student(args)
        model.load_state_dict(load_state_dict_file(checkpoint_path))
    except (UsageError, CheckpointError) as e:
        raise EvaluationError(str(e)) from None
    except RuntimeError as e:
        raise EvaluationError(f"'{checkpoint_path}' does not fit {info['model']} "
                              f"(num_classes={info['num_classes']}, in_chans={info['in_chans']}): "
                              f"{' '.join(str(e).split())[:300]}") from None
    return model


def _check_classes(found: List[str], trained: Optional[List[str]], split: str) -> None:
    """A split whose class folders differ from training would shift every label index silently."""
    if trained and found and found != trained:
        raise EvaluationError(f"the '{split}' split has classes {found[:5]}{'...' if len(found) > 5 else ''} but the "
                              f"run was trained on {trained[:5]}{'...' if len(trained) > 5 else ''}")


def _create_eval_loader(args: argparse.Namespace, info: Dict[str, Any], data_dir: str, split: str,
                        batch_size: int, workers: int, device: torch.device, precision: Precision):
    data_config = info['data_config']
    args.data_dir = data_dir
    input_img_mode = args.input_img_mode or ('RGB' if info['in_chans'] == 3 else 'L')
    try:
        dataset = _create_dataset(args, split, False, input_img_mode)
    except UsageError as e:
        raise EvaluationError(str(e)) from None
    _check_classes(_class_names(dataset), info.get('class_names'), split)
    # The same create_loader call as the trainer's eval loader (no crop_mode either), so numbers match exactly.
    return create_loader(
        dataset,
        input_size=tuple(data_config['input_size']),
        batch_size=batch_size,
        is_training=False,
        interpolation=data_config['interpolation'],
        mean=tuple(data_config['mean']),
        std=tuple(data_config['std']),
        num_workers=workers,
        crop_pct=data_config['crop_pct'],
        img_dtype=precision.model_dtype or torch.float32,
        device=device,
        use_prefetcher=not args.no_prefetcher,
    )


def evaluate_run(
        run_dir: str,
        data_dir: str,
        split: str = 'test',
        checkpoint: str = 'last',
        batch_size: int = 256,
        device: Optional[str] = None,
        workers: int = 0,
) -> Dict[str, float]:
    """Top-1, top-5, NLL and ECE of a training run's weights (the model's, not the EMA's) on a data split.

    Args:
        run_dir: Training output folder (``args.yaml``, ``run_info.json``, checkpoints).
        data_dir: Dataset root, read with the run's ``--dataset`` kind (e.g. an image folder with split folders).
        split: Split to evaluate, e.g. ``test``.
        checkpoint: ``last`` for the final epoch (the honest choice for a test split), ``best`` or a file.
        batch_size: Evaluation batch size.
        device: ``cpu``, ``cuda``, ...; default: ``cuda`` when available, else ``cpu``.
        workers: Data loader processes.

    Returns:
        ``top1``, ``top5`` and ``ece`` in percent, ``nll`` in nats per sample.

    Raises:
        EvaluationError: The run folder, checkpoint or split cannot be used.
    """
    info = _read_run_info(run_dir)
    args = _read_training_args(run_dir)
    checkpoint_path = resolve_checkpoint(run_dir, checkpoint)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    try:
        precision = create_precision(args, device)
    except UsageError as e:
        raise EvaluationError(str(e)) from None
    model = _build_model(args, info, checkpoint_path)
    model.to(device=device, dtype=precision.model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = _create_eval_loader(args, info, data_dir, split, batch_size, workers, device, precision)
    result = measure(model, loader, device, not args.no_prefetcher, args.channels_last, precision.autocast,
                     precision.model_dtype).compute()
    return {name: result[name] for name in METRIC_NAMES}
