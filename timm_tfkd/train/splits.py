"""Reading the data splits through timm's ``create_dataset``, checked before anything is written: every split there
and non-empty, the same classes in each, ``--num-classes`` as the data says, multi-label targets that fit."""
import argparse
import itertools
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from timm.data import MultiLabelTarget, create_dataset
from torch.utils.data import IterableDataset

from ..errors import UsageError

# timm accepts these names for the validation split of a folder dataset.
_SPLIT_ALIASES = {'validation': ('validation', 'val', 'valid', 'eval', 'evaluation'), 'train': ('train', 'training')}


@dataclass
class Datasets:
    """The training and validation datasets, read once, with the class names every split shares."""
    train: Any
    eval: Optional[Any]
    class_names: List[str]


# Dataset kinds whose readers can give multi-label targets (index lists, multi-hot vectors or binary fields).
MULTILABEL_READERS = ('hfds/', 'hfids/', 'tfds/', 'wds/')


def _is_folder_dataset(name: str) -> bool:
    return name in ('', 'folder', 'imagefolder') or name.startswith(('folder/', 'imagefolder/'))


class _CheckedMultiLabelTarget(MultiLabelTarget):
    """timm's multi-label target encoding, whose refusal of a target that does not fit the flags is a one-line
    :class:`UsageError` naming them (in a loader worker too) instead of a traceback from inside the loader."""

    def __call__(self, target):
        try:
            return super().__call__(target)
        except ValueError as e:
            given = f"--num-classes {self.num_classes}" + (' --target-format multihot' if self.dense else '')
            raise UsageError(f'--task multilabel with {given}: a target of the dataset does not fit: {e}') from None


def multilabel_target_transform(args: argparse.Namespace) -> Optional[MultiLabelTarget]:
    """timm's encoding of a multi-label target as a float multi-hot vector (None for single-label training)."""
    if args.task != 'multilabel':
        return None
    return _CheckedMultiLabelTarget(args.num_classes, dense=args.target_format == 'multihot')


# Records of each split whose multi-label targets are encoded before a run starts.
MULTILABEL_PROBE_RECORDS = 32


def _read_first_records(dataset: Any, count: int) -> None:
    if isinstance(dataset, IterableDataset):
        for _ in itertools.islice(iter(dataset), count):
            pass
    else:
        for index in range(min(count, len(dataset))):
            dataset[index]


def _check_folder_split(data_dir: str, split: str) -> None:
    candidates = _SPLIT_ALIASES.get(split, (split,))
    if not any(os.path.isdir(os.path.join(data_dir, name)) for name in candidates):
        present = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
        raise UsageError(
            f"no '{split}' split folder in --data-dir '{data_dir}' (found: {', '.join(present) or 'none'})")


def class_names(dataset: Any) -> List[str]:
    classes = getattr(dataset, 'classes', None)
    if classes:
        return [str(c) for c in classes]
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if class_to_idx:
        return [name for name, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]
    return []


def dataset_targets(dataset: Any) -> Optional[torch.Tensor]:
    """The class index of every sample (int64), for datasets whose reader lists them (timm's folder and tar
    readers); None for the others (iterable and multi-label datasets)."""
    samples = getattr(getattr(dataset, 'reader', None), 'samples', None)
    if not isinstance(samples, list) or not all(isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], int)
                                                for s in samples):
        return None
    return torch.tensor([target for _, target in samples], dtype=torch.int64)


def create_split_dataset(args: argparse.Namespace, split: str, is_training: bool, input_img_mode: str):
    """timm's dataset of one split, with the data folder and split checked first (one line on error)."""
    if not args.dataset_download and not (args.dataset and args.dataset.startswith(('hfds/', 'hfids/', 'wds/'))):
        if not args.data_dir or not os.path.isdir(args.data_dir):
            raise UsageError(f"--data-dir '{args.data_dir}' is not a folder")
        if not os.listdir(args.data_dir):
            raise UsageError(f"--data-dir '{args.data_dir}' is empty")
        if _is_folder_dataset(args.dataset):
            _check_folder_split(args.data_dir, split)
    try:
        dataset = create_dataset(
            args.dataset,
            root=args.data_dir,
            split=split,
            is_training=is_training,
            class_map=args.class_map,
            download=args.dataset_download,
            batch_size=args.batch_size,
            seed=args.seed,
            repeats=args.epoch_repeats if is_training else 0,
            input_img_mode=input_img_mode,
            input_key=args.input_key,
            target_key=args.target_key,
            num_samples=args.train_num_samples if is_training else args.val_num_samples,
            trust_remote_code=args.dataset_trust_remote_code,
            target_format=args.target_format,
            target_transform=multilabel_target_transform(args),
        )
    except (RuntimeError, FileNotFoundError, OSError, AssertionError, ValueError, TypeError) as e:
        raise UsageError(f"cannot read the '{split}' split of dataset '{args.dataset or 'folder'}' at "
                         f"'{args.data_dir}': {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                         ) from None
    if len(dataset) == 0:
        raise UsageError(f"the '{split}' split of '{args.data_dir}' holds no images")
    return dataset


def _listed(names: List[str]) -> str:
    return ', '.join(names[:5]) + (f' and {len(names) - 5} more' if len(names) > 5 else '')


def check_same_classes(train_split: str, train_names: List[str], split: str, names: List[str]) -> None:
    """Labels are indices into each split's own sorted class list: a class missing from one split (an empty or
    absent folder) shifts every later label, so the splits must list the same classes.

    Raises:
        UsageError: One line naming the classes that differ.
    """
    if not train_names or not names or names == train_names:
        return
    only_train = [name for name in train_names if name not in names]
    only_other = [name for name in names if name not in train_names]
    parts = ([f"'{split}' lacks {_listed(only_train)}"] if only_train else []) + (
        [f"'{train_split}' lacks {_listed(only_other)}"] if only_other else [])
    if not parts:
        parts = [f"'{split}' orders them differently"]
    raise UsageError(f"the '{train_split}' and '{split}' splits have different classes: {'; '.join(parts)} "
                     f"(an empty class folder counts as missing); every split needs the same class folders")


def check_shards(args: argparse.Namespace, dataset: Any, split: str, is_training: bool) -> None:
    """Refuse a sharded split (timm's ``wds/`` reader) that a distributed run cannot read correctly.

    timm's reader deals whole shards round-robin to every loader worker of every process, and each worker then
    yields a fixed count of samples, repeating its shards to reach it. A worker without a shard yields nothing:
    in training its process runs out of batches first and the other ranks wait for it forever; in validation a
    worker whose shards do not hold exactly its count repeats or leaves out images, so the metrics would not be
    the split's.

    Raises:
        UsageError: Too few training shards, or validation shards that do not divide evenly.
    """
    shard_lengths = getattr(getattr(getattr(dataset, 'reader', None), 'split_info', None), 'shard_lengths', None)
    if not shard_lengths or args.world_size < 2:
        return
    workers = max(1, args.workers)
    total = args.world_size * workers
    layout = f'{args.world_size} processes x {workers} loader worker(s)'
    if is_training:
        if len(shard_lengths) < total:
            raise UsageError(f"the '{split}' split has {len(shard_lengths)} shard(s) for {layout}: timm's wds reader "
                             f"gives each worker whole shards, and a process whose worker gets none runs out of "
                             f"batches while the others wait for it; use at least {total} shards or fewer processes "
                             f"or -j")
        return
    per_worker = [sum(shard_lengths[worker::total]) for worker in range(total)]
    if len(set(per_worker)) > 1:
        raise UsageError(f"the '{split}' split's shards give the {layout} {per_worker} images, and timm's wds reader "
                         f"then repeats or leaves out images to give each the same count: the metrics would not be "
                         f"the split's; use shards that divide evenly among the workers, or other process / -j "
                         f"counts")


def load_datasets(args: argparse.Namespace, in_chans: int) -> Datasets:
    """Read the training and validation splits and check that they share one class list.

    Raises:
        UsageError: A missing or empty data folder or split, or splits with different classes.
    """
    input_img_mode = args.input_img_mode or ('RGB' if in_chans == 3 else 'L')
    train = create_split_dataset(args, args.train_split, True, input_img_mode)
    evaluation = create_split_dataset(args, args.val_split, False, input_img_mode) if args.val_split else None
    check_shards(args, train, args.train_split, is_training=True)
    if evaluation is not None:
        check_shards(args, evaluation, args.val_split, is_training=False)
    names = class_names(train)
    if evaluation is not None:
        check_same_classes(args.train_split, names, args.val_split, class_names(evaluation))
    if args.task == 'multilabel':
        # Multi-label datasets name no classes, and reading every target means decoding every image: the first
        # records of each split show whether --num-classes and --target-format fit before anything is written (a
        # later record that does not fit stops the run in one line, the last checkpoint kept).
        for dataset in (train, evaluation):
            if dataset is not None:
                _read_first_records(dataset, MULTILABEL_PROBE_RECORDS)
    return Datasets(train, evaluation, names)


def resolve_num_classes(args: argparse.Namespace, names: List[str]) -> Optional[str]:
    """Take ``--num-classes`` from the data when it is not given; refuse a count the data contradicts.

    Returns:
        A line for the log when the count was taken from the data or could not be checked, else None.

    Raises:
        UsageError: ``--num-classes`` differs from the number of classes in the training split.
    """
    if not names:
        return (f"the dataset does not name its classes: --num-classes {args.num_classes} cannot be checked"
                if args.num_classes else None)
    if args.num_classes is None:
        args.num_classes = len(names)
        return f"{len(names)} classes in the '{args.train_split}' split ({_listed(names)}): --num-classes {len(names)}"
    if args.num_classes != len(names):
        raise UsageError(f"--num-classes {args.num_classes} does not match the {len(names)} classes of the "
                         f"'{args.train_split}' split ({_listed(names)}); drop --num-classes to take it from the data")
    return None
