"""The loaders through timm's pipeline (fixed size, ``--train-img-sizes`` schedules, NaFlex), Mixup, the seeded
sampler of the training order, and the checks of what the loaders need before anything is written."""
import argparse
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from timm.data import AugMixDataset, FastCollateMixup, Mixup, NaFlexMixup, create_loader, create_naflex_loader
from torch.utils.data import BatchSampler, DistributedSampler, IterableDataset, Sampler

from ..errors import UsageError
from ..factory import mixup_active
from ..tasks import EpochOrdered
from .splits import Datasets

_logger = logging.getLogger(__name__)

@dataclass
class LossScale:
    """The factor on each batch's loss when the loader's batch size varies, as timm's ``train.py`` applies it.

    Attributes:
        mode: ``none``, ``sqrt`` or ``linear`` (``--naflex-loss-scale``, ``--variable-batch-loss-scale``): 1, or
            the batch size over ``reference``, or its square root.
        reference: The batch size of factor 1: ``--batch-size`` for NaFlex, the size schedule's average for
            ``--train-img-sizes``.
        across_ranks: NaFlex under DDP: also this rank's batch over the mean batch of all ranks (the gradient
            average of DDP weighs every rank alike, whatever its batch).
    """
    mode: str
    reference: float
    across_ranks: bool = False

    def factor(self, batch_size: int, device: torch.device, world_size: int) -> Union[float, torch.Tensor]:
        scale = 1.0
        if self.mode != 'none':
            scale = batch_size / self.reference
            if self.mode == 'sqrt':
                scale = scale ** 0.5
        if self.across_ranks:
            total = torch.tensor(float(batch_size), device=device)
            dist.all_reduce(total)
            scale = scale * (world_size * batch_size / total)
        return scale


@dataclass
class TrainData:
    """Everything the loop needs from the data side.

    Attributes:
        batch_size_reference: The batch size the learning rate is scaled for (``--batch-size``, or the average of
            the ``--train-img-sizes`` schedule, as in timm).
        loss_scale: The per-batch loss factor of a loader whose batch size varies (None: none).
    """
    loader_train: Any
    loader_eval: Optional[Any]
    mixup_fn: Optional[Callable]
    class_names: List[str]
    num_train_samples: int
    batch_size_reference: float
    loss_scale: Optional[LossScale] = None


def mixup_settings(args: argparse.Namespace, smoothing: float) -> Optional[Dict[str, Any]]:
    """timm's Mixup / CutMix arguments, or None when both are off."""
    if not mixup_active(args):
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
        multi_label=args.task == 'multilabel',
    )


def create_train_data(
        args: argparse.Namespace,
        datasets: Datasets,
        data_config: Dict[str, Any],
        mixup_smoothing: float,
        device: torch.device,
        model_dtype: Optional[torch.dtype] = None,
        patch_size: Optional[Tuple[int, int]] = None,
        verbose: bool = True,
) -> TrainData:
    """Build train and eval loaders exactly as timm's ``train.py`` does, through timm's own factories: the fixed
    loader, the scheduled-resolution one (``--train-img-sizes``) or the NaFlex one (``--naflex-loader``).

    Args:
        args: Parsed trainer arguments (``args.prefetcher``, ``args.distributed`` already set).
        datasets: The splits from :func:`load_datasets`.
        data_config: The resolved data config, channel statistics fitted.
        mixup_smoothing: Label smoothing folded into Mixup / CutMix targets.
        device: The training device.
        model_dtype: The model's dtype, for the images.
        patch_size: The student's patch size (``get_patch_size()``), for the NaFlex loaders.
        verbose: Log the loader mode.

    Raises:
        UsageError: The training split holds fewer images than one batch, is not a map-style dataset where the
            loader needs one, or the validation split does not divide into the groups of ``--tta``.
    """
    dataset_train, dataset_eval = datasets.train, datasets.eval
    if (args.naflex_loader or args.train_img_sizes) and isinstance(dataset_train, IterableDataset):
        raise UsageError(f"{'--naflex-loader' if args.naflex_loader else '--train-img-sizes'} needs a dataset with "
                         f"random access (e.g. an image folder); '{args.dataset}' is an iterable one")
    if args.aug_splits > 1:
        # Each sample becomes its clean view and aug_splits - 1 augmented ones; the loader lays them out as
        # aug_splits consecutive blocks of the batch, clean first.
        dataset_train = AugMixDataset(dataset_train, num_splits=args.aug_splits)
    channels = data_config['input_size'][0]
    mixup_args = mixup_settings(args, mixup_smoothing)
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
    augmentation = dict(
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
        num_aug_splits=args.aug_splits,
        interpolation=train_interpolation,
        num_workers=args.workers,
        worker_seeding=args.worker_seeding,
    )
    mixup_fn, reference, loss_scale = None, float(args.batch_size), None
    if args.naflex_loader:
        loader_train = _create_naflex_train_loader(args, dataset_train, mixup_args, patch_size, channels, common,
                                                   augmentation)
        if args.naflex_loss_scale != 'none' or args.distributed:
            loss_scale = LossScale(args.naflex_loss_scale, reference, across_ranks=args.distributed)
        if verbose:
            _logger.info(f"NaFlex loader: sequence lengths {args.naflex_train_seq_lens}, patch size "
                         f"{args.naflex_patch_sizes or patch_size}, {len(loader_train)} batches/epoch, loss scale "
                         f"{args.naflex_loss_scale}")
    else:
        collate_fn = None
        if mixup_args is not None:
            if args.prefetcher:
                collate_fn = FastCollateMixup(**mixup_args)
            else:
                mixup_fn = Mixup(**mixup_args)
        try:
            loader_train = create_loader(
                dataset_train,
                input_size=data_config['input_size'],
                input_size_choices=args.train_img_sizes,
                batch_size_choices=args.train_batch_sizes,
                batch_choice_weights=args.train_size_probs,
                batch_choice_seed=args.seed,
                batch_choice_schedule=args.train_size_schedule,
                batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
                batch_schedule_spread=args.train_size_schedule_spread,
                batch_schedule_random_mix=args.train_size_random_mix,
                num_batches=args.train_batches_per_epoch,
                collate_fn=collate_fn,
                use_multi_epochs_loader=args.use_multi_epochs_loader,
                **common,
                **augmentation,
            )
        except ValueError:  # the size schedule's own check (every other setting is checked before): no batch fits
            if not args.train_img_sizes:
                raise
            raise UsageError(f"the '{args.train_split}' split has {_images_per_process(args, dataset_train)}, too few "
                             f"for one batch of the --train-img-sizes schedule (batch sizes "
                             f"{args.train_batch_sizes or [args.batch_size]}): no training step would run; lower "
                             f"--train-batch-sizes") from None
        if args.train_img_sizes:
            schedule = loader_train.batch_sampler
            reference = schedule.average_batch_size
            if args.variable_batch_loss_scale != 'none':
                loss_scale = LossScale(args.variable_batch_loss_scale, reference)
            if verbose:
                _logger.info(f'Scheduled resolutions {args.train_img_sizes} with batch sizes '
                             f'{list(schedule.batch_sizes)} ({args.train_size_schedule}): {len(schedule)} batches/epoch, '
                             f'average batch size {reference:.2f}')
    if len(loader_train) == 0:
        raise UsageError(f"the '{args.train_split}' split has {_images_per_process(args, dataset_train)}, fewer than "
                         f"one batch of --batch-size {args.batch_size}: no training step would run; lower --batch-size")
    loader_eval = None
    if dataset_eval is not None:
        eval_batch_size = args.validation_batch_size or args.batch_size
        if args.naflex_loader:
            loader_eval = create_naflex_loader(
                dataset_eval, patch_size=patch_size, max_seq_len=args.naflex_max_seq_len,
                patchify_channels_last=not args.naflex_patchify_channels_first, channels=channels,
                batch_size=eval_batch_size, is_training=False, interpolation=data_config['interpolation'],
                num_workers=args.workers, crop_pct=data_config['crop_pct'], **common)
        else:
            loader_eval = create_eval_loader(
                dataset_eval, data_config, eval_batch_size, args.workers, device, model_dtype, args.prefetcher,
                distributed=args.distributed, pin_memory=args.pin_mem)
            if args.tta > 1:
                check_tta_groups(args.tta, loader_eval, eval_batch_size)
    return TrainData(loader_train, loader_eval, mixup_fn, datasets.class_names, len(dataset_train), reference,
                     loss_scale)


def _images_per_process(args: argparse.Namespace, dataset: Any) -> str:
    per_process = f' ({math.ceil(len(dataset) / args.world_size)} per process)' if args.distributed else ''
    return f'{len(dataset)} images{per_process}'


def _create_naflex_train_loader(args: argparse.Namespace, dataset: Any, mixup_args: Optional[Dict[str, Any]],
                                patch_size: Optional[Tuple[int, int]], channels: int, common: Dict[str, Any],
                                augmentation: Dict[str, Any]):
    """timm's NaFlex training loader, with ``NaFlexMixup`` when Mixup / CutMix is on (timm's train.py settings).

    Its batch order and sequence-length schedule follow ``--seed``, and Mixup stops at ``--mixup-off-epoch`` (the
    loader tells its Mixup the epoch, in every worker).
    """
    mixup_fn = None
    if mixup_args is not None:
        # NaFlexMixup pairs images of different sizes: it has no per-element mode and no CutMix bounds.
        settings = {key: value for key, value in mixup_args.items() if key not in ('mode', 'cutmix_minmax')}
        mixup_fn = NaFlexMixup(**settings, mixup_off_epoch=args.mixup_off_epoch)
    if args.naflex_patch_sizes:
        patches = dict(patch_size_choices=args.naflex_patch_sizes, patch_size_choice_probs=args.naflex_patch_size_probs)
    else:
        patches = dict(patch_size=patch_size)
    return create_naflex_loader(
        dataset,
        train_seq_lens=args.naflex_train_seq_lens,
        mixup_fn=mixup_fn,
        rank=args.rank,
        world_size=args.world_size,
        seed=args.seed,
        channels=channels,
        patchify_channels_last=not args.naflex_patchify_channels_first,
        **patches,
        **common,
        **augmentation,
    )


def set_loader_epoch(loader: Any, train_sampler: Optional['TrainSampler'], epoch: int) -> None:
    """Tell the training loader the epoch, as timm's ``train.py`` does: its dataset (the NaFlex schedule), then its
    batch sampler (the ``--train-img-sizes`` schedule) or else its sampler (here: the :class:`TrainSampler`)."""
    dataset = getattr(loader, 'dataset', None)
    if hasattr(dataset, 'set_epoch'):
        dataset.set_epoch(epoch)
    target = train_sampler or getattr(loader, 'batch_sampler', None)
    if not hasattr(target, 'set_epoch'):
        target = getattr(loader, 'sampler', None)
    if hasattr(target, 'set_epoch'):
        target.set_epoch(epoch)


def check_tta_groups(tta: int, loader: Any, batch_size: int) -> None:
    """``--tta N`` averages the predictions of each N consecutive validation images (as timm's ``train.py``): every
    group must lie within one batch and one process's share of the split.

    Raises:
        UsageError: The batch size or the images each process validates are not a multiple of N.
    """
    try:
        share = len(loader.sampler)
    except TypeError:  # an iterable dataset's sampler has no length: only the batch size can be checked
        share = 0
    if batch_size % tta or share % tta:
        per_process = ' per process' if share != len(loader.dataset) else ''
        raise UsageError(f'--tta {tta} averages each {tta} consecutive validation images: the validation batch size '
                         f'({batch_size}) and the images validated{per_process} ({share}) must be multiples of {tta}')


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


class TrainSampler(Sampler[int]):
    """The training order of a run, installed inside the training loader's batch sampler (timm's loader unchanged).

    - The order is a permutation fixed by the seed and the epoch (as timm's distributed sampler draws it, also on
      one process), so it does not depend on what else drew from the global random state, and an epoch resumed
      from a recovery checkpoint sees the same batches as an uninterrupted one.
    - :meth:`skip_next` makes the next pass start after the samples an interrupted epoch already trained on,
      without reading them (reading would draw augmentations from the random state the checkpoint restored).
    - A task that is :class:`~timm_tfkd.tasks.EpochOrdered` (:meth:`order_by`) turns each epoch's permutation into
      the indices the epoch loads (e.g. same-class pairs side by side); skipping and recording apply to those.
    - It records the indices it yields, so each batch's dataset indices can be taken back (:meth:`take`): the loader
      delivers batches in the order their indices were drawn.
    - The loader's own draw at the start of an epoch (the base seed of its workers) comes from :attr:`generator`,
      seeded by seed, rank and epoch, instead of the global random state a resumed run has just restored.

    Args:
        sampler: The sampler the loader was built with (a distributed or repeated-augmentation sampler is kept).
        dataset: The training dataset.
        seed: Seed of the order on one process and of the loader's draws.
        rank: This process's rank (each rank's workers draw their own augmentations).
    """

    def __init__(self, sampler: Sampler, dataset: Any, seed: int, rank: int = 0):
        if not hasattr(sampler, 'set_epoch'):  # the one-process random sampler draws from the global random state
            sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self._sampler = sampler
        self._seed, self._rank = seed, rank
        self._skip = 0
        self._epoch = 0
        self._ordering: Optional[EpochOrdered] = None
        self._drawn: deque = deque()
        self.generator = torch.Generator()

    def order_by(self, task: EpochOrdered) -> None:
        """Let ``task`` choose what each epoch loads from the epoch's permutation."""
        self._ordering = task

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._sampler.set_epoch(epoch)
        self.generator.manual_seed((self._seed * 1_000_003 + self._rank) * 10_007 + epoch)

    def skip_next(self, count: int) -> None:
        """Leave out the first ``count`` samples of the next pass."""
        self._skip = count

    def __iter__(self) -> Iterator[int]:
        self._drawn.clear()  # also drops the indices of a last partial batch the loader discarded
        skip, self._skip = self._skip, 0
        for position, index in enumerate(self._epoch_indices()):
            if position >= skip:
                self._drawn.append(index)
                yield index

    def _epoch_indices(self) -> Iterable[int]:
        if self._ordering is None:
            return self._sampler
        drawn = torch.tensor(list(self._sampler), dtype=torch.int64)
        order = self._ordering.epoch_order(drawn, self._epoch)
        expected = self._ordering.epoch_length(len(drawn))
        if order.ndim != 1 or len(order) != expected:
            raise RuntimeError(f'{type(self._ordering).__name__}.epoch_order gave {tuple(order.shape)} indices for '
                               f'epoch {self._epoch}, its epoch_length {expected}')
        return order.tolist()

    def __len__(self) -> int:
        num_drawn = len(self._sampler)
        return num_drawn if self._ordering is None else self._ordering.epoch_length(num_drawn)

    def take(self, count: int) -> torch.Tensor:
        """The indices (int64, CPU) of the next ``count`` samples the loader delivers."""
        if count > len(self._drawn):
            raise RuntimeError(f'{count} sample indices asked for, {len(self._drawn)} recorded')
        return torch.tensor([self._drawn.popleft() for _ in range(count)], dtype=torch.int64)


def install_train_sampler(loader: Any, seed: int, rank: int = 0) -> Optional[TrainSampler]:
    """Put a :class:`TrainSampler` inside a training loader from timm's ``create_loader``.

    Returns:
        The sampler, or None for loaders whose order it cannot own: iterable datasets (the NaFlex loader's batches
        come from one), ``--use-multi-epochs-loader`` (its workers draw the next epoch before the loop starts it)
        and ``--train-img-sizes`` (timm's scheduled batch sampler draws sizes and indices together).
    """
    data_loader = getattr(loader, 'loader', loader)  # timm's PrefetchLoader wraps the DataLoader
    batch_sampler = getattr(data_loader, 'batch_sampler', None)
    if isinstance(data_loader.dataset, IterableDataset) or not isinstance(batch_sampler, BatchSampler):
        return None
    sampler = TrainSampler(batch_sampler.sampler, data_loader.dataset, seed, rank)
    batch_sampler.sampler = sampler
    data_loader.generator = sampler.generator
    return sampler
