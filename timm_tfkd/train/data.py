"""Datasets and loaders through timm's pipeline, with input checks that fail before anything is written."""
import argparse
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader

from ..errors import UsageError

_logger = logging.getLogger(__name__)

# timm accepts these names for the validation split of a folder dataset.
_SPLIT_ALIASES = {'validation': ('validation', 'val', 'valid', 'eval', 'evaluation'), 'train': ('train', 'training')}


@dataclass
class TrainData:
    """Everything the loop needs from the data side."""
    loader_train: Any
    loader_eval: Optional[Any]
    mixup_fn: Optional[Callable]
    class_names: List[str]
    num_train_samples: int


def _is_folder_dataset(name: str) -> bool:
    return name in ('', 'folder', 'imagefolder') or name.startswith(('folder/', 'imagefolder/'))


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
        )
    except (RuntimeError, FileNotFoundError, OSError, AssertionError) as e:
        raise UsageError(f"cannot read the '{split}' split of dataset '{args.dataset or 'folder'}' at "
                         f"'{args.data_dir}': {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                         ) from None
    if len(dataset) == 0:
        raise UsageError(f"the '{split}' split of '{args.data_dir}' holds no images")
    return dataset


def mixup_settings(args: argparse.Namespace, smoothing: float) -> Optional[Dict[str, Any]]:
    """timm's Mixup / CutMix arguments, or None when both are off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return dict(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=smoothing,
        num_classes=args.num_classes,
    )


def create_train_data(
        args: argparse.Namespace,
        data_config: Dict[str, Any],
        mixup_smoothing: float,
        device: torch.device,
        model_dtype: Optional[torch.dtype] = None,
) -> TrainData:
    """Build train and eval loaders exactly as timm's ``train.py`` does, through timm's own factories.

    Args:
        args: Parsed trainer arguments (``args.prefetcher``, ``args.distributed`` already set).
        data_config: The resolved data config, channel statistics fitted.
        mixup_smoothing: Label smoothing folded into Mixup / CutMix targets.
        device: The training device.
        model_dtype: The model's dtype, for the images.

    Raises:
        UsageError: A missing or empty data folder or split.
    """
    input_img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    dataset_train = create_split_dataset(args, args.train_split, True, input_img_mode)
    dataset_eval = create_split_dataset(args, args.val_split, False, input_img_mode) if args.val_split else None

    mixup_args = mixup_settings(args, mixup_smoothing)
    collate_fn = mixup_fn = None
    if mixup_args is not None:
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)

    common = dict(
        mean=data_config['mean'],
        std=data_config['std'],
        pin_memory=args.pin_mem,
        img_dtype=model_dtype or torch.float32,
        device=device,
        distributed=args.distributed,
        use_prefetcher=args.prefetcher,
    )
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    loader_train = create_loader(
        dataset_train,
        input_size=data_config['input_size'],
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_split=args.resplit,
        train_crop_mode=args.train_crop_mode,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob,
        auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats,
        interpolation=train_interpolation,
        num_workers=args.workers,
        worker_seeding=args.worker_seeding,
        num_batches=args.train_batches_per_epoch,
        collate_fn=collate_fn,
        use_multi_epochs_loader=args.use_multi_epochs_loader,
        **common,
    )
    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_eval_loader(
            dataset_eval, data_config, args.validation_batch_size or args.batch_size, args.workers, device,
            model_dtype, args.prefetcher, distributed=args.distributed, pin_memory=args.pin_mem)
    return TrainData(loader_train, loader_eval, mixup_fn, class_names(dataset_train), len(dataset_train))


def create_eval_loader(
        dataset: Any,
        data_config: Dict[str, Any],
        batch_size: int,
        workers: int,
        device: torch.device,
        model_dtype: Optional[torch.dtype],
        prefetcher: bool,
        distributed: bool = False,
        pin_memory: bool = False,
):
    """The validation loader of the trainer, also used by ``timm-tfkd evaluate`` so that both measure the same
    (``data_config`` may come from ``run_info.json``, with lists for tuples)."""
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
        pin_memory=pin_memory,
        img_dtype=model_dtype or torch.float32,
        device=device,
        distributed=distributed,
        use_prefetcher=prefetcher,
    )


class SampleIndexRecorder:
    """Records the dataset indices a training loader's sampler draws, so each batch's indices can be taken back.

    It replaces the sampler inside the loader's batch sampler and passes every index through, in order. The loader
    delivers batches in the order their indices were drawn, so the first ``n`` recorded indices are those of the
    next batch of ``n`` samples; a new pass over the sampler (an epoch) starts a new record, which also drops the
    indices of a last partial batch the loader discarded.

    Args:
        loader: A training loader from timm's ``create_loader`` (with or without the prefetcher).

    Raises:
        UsageError: The loader has no batch sampler to record from, or repeats epochs without restarting its sampler
            (``--use-multi-epochs-loader``).
    """

    def __init__(self, loader: Any):
        data_loader = getattr(loader, 'loader', loader)  # timm's PrefetchLoader wraps the DataLoader
        batch_sampler = getattr(data_loader, 'batch_sampler', None)
        if batch_sampler is None or not hasattr(batch_sampler, 'sampler') or \
                type(batch_sampler).__name__ == '_RepeatSampler':
            raise UsageError('this --tfkd-mode needs the dataset index of every sample, which this loader cannot '
                             'give (drop --use-multi-epochs-loader)')
        self._sampler = batch_sampler.sampler
        self._drawn: deque = deque()
        batch_sampler.sampler = self

    def __iter__(self) -> Iterator[int]:
        self._drawn.clear()
        for index in self._sampler:
            self._drawn.append(index)
            yield index

    def __len__(self) -> int:
        return len(self._sampler)

    def take(self, count: int) -> torch.Tensor:
        """The indices (int64, CPU) of the next ``count`` samples the loader delivers."""
        if count > len(self._drawn):
            raise RuntimeError(f'{count} sample indices asked for, {len(self._drawn)} recorded')
        return torch.tensor([self._drawn.popleft() for _ in range(count)], dtype=torch.int64)
