"""The epoch loop: train one epoch through a timm task, validate with exact cross-rank metrics."""
import argparse
import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
from timm.task import TrainingTask, evaluation_sample_limit
from timm.utils import dispatch_clip_grad
from torchvision.utils import save_image

from ..errors import NonFiniteLossError
from ..naflex import batch_size_of, is_naflex_batch, move_batch
from ..tasks import EpochHooks, SampleIndexed
from .data import LossScale, TrainSampler
from .metrics import ClassificationMetrics, MultiLabelMetrics

_logger = logging.getLogger(__name__)
# What one validation pass accumulates: single-label metric sums or timm's multi-label evaluator.
Metrics = Union[ClassificationMetrics, MultiLabelMetrics]


@dataclass
class EpochProgress:
    """How far an epoch got, saved in its recovery checkpoints so that the resumed epoch ends as an uninterrupted
    one would: the batches trained and the running sums of the epoch's logged losses."""
    batches: int = 0
    loss_sum: float = 0.0
    part_sums: Tuple[float, float] = (0.0, 0.0)  # task_loss and kd_loss, each weighted by batch size
    samples: int = 0


@dataclass
class LoopContext:
    """What stays fixed across epochs."""
    args: argparse.Namespace
    task: TrainingTask
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_autocast: Callable[[], AbstractContextManager]
    loss_scaler: Optional[Callable] = None
    lr_scheduler: Optional[object] = None
    mixup_fn: Optional[Callable] = None
    model_dtype: Optional[torch.dtype] = None
    is_primary: bool = True
    save_recovery: Optional[Callable[[int, int, EpochProgress], None]] = None
    num_epochs: int = 0
    train_sampler: Optional[TrainSampler] = None
    image_folder: Optional[Path] = None  # --save-images: where the logged training batches are written
    loss_scale: Optional[LossScale] = None


class _Average:
    """The latest value and the mean so far of a timed quantity (timm's AverageMeter, for the log lines)."""

    def __init__(self):
        self.value, self.sum, self.count = 0.0, 0.0, 0

    def update(self, value: float) -> None:
        self.value, self.sum, self.count = value, self.sum + value, self.count + 1

    @property
    def mean(self) -> float:
        return self.sum / max(self.count, 1)


def _log_update(ctx: LoopContext, epoch: int, update_idx: int, updates_per_epoch: int, loss_now: float,
                loss_mean: float, update_time: _Average, samples: int, data_time: _Average) -> None:
    """timm's training log line; under DDP the losses are averaged over the ranks first (every rank calls this at
    the same updates)."""
    if ctx.args.distributed:
        loss_now, loss_mean = _reduce_mean(torch.tensor([loss_now, loss_mean], dtype=torch.float64,
                                                        device=ctx.device), ctx.args.world_size).tolist()
    if not ctx.is_primary:
        return
    lrs = [group['lr'] for group in ctx.optimizer.param_groups]
    rate = samples * ctx.args.world_size
    _logger.info(
        f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} ({100.0 * (update_idx + 1) / updates_per_epoch:>3.0f}%)]'
        f'  Loss: {loss_now:#.3g} ({loss_mean:#.3g})  '
        f'Time: {update_time.value:.3f}s, {rate / max(update_time.value, 1e-9):>7.2f}/s  '
        f'({update_time.mean:.3f}s, {rate / max(update_time.mean, 1e-9):>7.2f}/s)  '
        f'LR: {sum(lrs) / len(lrs):.3e}  Data: {data_time.value:.3f} ({data_time.mean:.3f})')


def _reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return values


def _to_device(input, target, device: torch.device, dtype: Optional[torch.dtype]):
    """A batch on the device: images cast to ``dtype``, or a NaFlex dict whose patch values are."""
    if is_naflex_batch(input):
        return move_batch(input, device, dtype), target.to(device=device)
    return input.to(device=device, dtype=dtype), target.to(device=device)


def _in_memory_format(input, channels_last: bool):
    """Images in channels_last when asked; NaFlex patches keep the layout their loader made."""
    if channels_last and not is_naflex_batch(input):
        return input.contiguous(memory_format=torch.channels_last)
    return input


def _prepare_batch(ctx: LoopContext, input, target):
    args = ctx.args
    if isinstance(input, (list, tuple)):
        # AugMix splits without the prefetcher arrive as one tensor per split: lay them out as timm's fast collate
        # does with the prefetcher, split after split (clean first), the targets repeated for each.
        target = target.repeat(len(input))
        input = torch.cat(input)
    if not args.prefetcher:
        input, target = _to_device(input, target, ctx.device, ctx.model_dtype)
        if ctx.mixup_fn is not None:
            input, target = ctx.mixup_fn(input, target)
    return _in_memory_format(input, args.channels_last), target


def _backward_and_step(ctx: LoopContext, loss: torch.Tensor, need_update: bool) -> None:
    args, clip = ctx.args, None
    if args.clip_grad is not None:
        clip = ctx.task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
    if ctx.loss_scaler is not None:
        ctx.loss_scaler(loss, ctx.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=clip,
                        need_update=need_update)
        return
    loss.backward()
    if need_update:
        if clip is not None:
            dispatch_clip_grad(clip, value=args.clip_grad, mode=args.clip_mode)
        ctx.optimizer.step()


def train_one_epoch(ctx: LoopContext, loader, epoch: int, resumed: Optional[EpochProgress] = None) -> Dict[str, float]:
    """Train one epoch with gradient accumulation, AMP, EMA updates and the LR schedule stepped per update.

    A task with :class:`~timm_tfkd.tasks.EpochHooks` is told when the epoch starts and ends; one that is
    :class:`~timm_tfkd.tasks.SampleIndexed` gets each batch's dataset indices before its forward.

    Args:
        ctx: What stays fixed across epochs.
        loader: The training loader; when resuming, its sampler already skips the batches ``resumed`` trained.
        epoch: The epoch (0-based).
        resumed: Progress of this epoch restored from a recovery checkpoint.

    Returns:
        Mean ``loss``, ``task_loss`` and ``kd_loss`` over the epoch (averaged across ranks).

    Raises:
        NonFiniteLossError: The loss became NaN or infinite; nothing is saved for this epoch.
    """
    args, task = ctx.args, ctx.task
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif ctx.mixup_fn is not None:
            ctx.mixup_fn.mixup_enabled = False
    task.train()
    resumed = resumed or EpochProgress()
    if isinstance(task, EpochHooks) and not resumed.batches:
        task.on_epoch_start(epoch, ctx.num_epochs)
    accum_steps = args.grad_accum_steps
    num_batches = len(loader)  # the whole epoch's, also when resumed part way
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch + resumed.batches // accum_steps
    last_accum_start = num_batches - num_batches % accum_steps
    has_no_sync = args.distributed and hasattr(task.get_trainable_module(), 'no_sync')
    indexed = isinstance(task, SampleIndexed)
    update_time, data_time = _Average(), _Average()

    # The loss is read every step (as timm does) to stop on NaN; its parts are summed on the device, unsynced.
    loss_sum, samples = resumed.loss_sum, resumed.samples
    part_sums = torch.tensor(resumed.part_sums, dtype=torch.float64, device=ctx.device)
    no_part = torch.zeros((), device=ctx.device)
    ctx.optimizer.zero_grad()
    update_start = data_start = time.perf_counter()
    update_samples = 0
    for batch_idx, (input, target) in enumerate(loader, start=resumed.batches):
        data_time.update(time.perf_counter() - data_start)
        steps_in_update = accum_steps if batch_idx < last_accum_start else num_batches - last_accum_start
        need_update = batch_idx + 1 == num_batches or (batch_idx + 1) % accum_steps == 0
        input, target = _prepare_batch(ctx, input, target)
        batch_size = batch_size_of(input)
        if indexed:  # an AugMix batch holds aug_splits views of each sample
            task.set_sample_index(ctx.train_sampler.take(batch_size // max(args.aug_splits, 1)))
        with task.no_sync() if has_no_sync and not need_update else nullcontext():
            with ctx.amp_autocast():
                result = task(input, target)
            loss = result['loss']
            update_loss = loss / steps_in_update if steps_in_update > 1 else loss
            if ctx.loss_scale is not None:  # batches of varying size (timm's --naflex-loss-scale and its kin)
                update_loss = update_loss * ctx.loss_scale.factor(batch_size, ctx.device, args.world_size)
            _backward_and_step(ctx, update_loss, need_update)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f'non-finite loss ({loss_value}) at epoch {epoch}, step {batch_idx}; '
                                     f'the last saved checkpoint is unchanged')
        samples += batch_size
        update_samples += batch_size
        loss_sum += loss_value * batch_size
        part_sums += torch.stack([result.get('task_loss', loss).detach(), result.get('kd_loss', no_part).detach()
                                  ]).double() * batch_size
        if ctx.image_folder is not None and (batch_idx % args.log_interval == 0 or batch_idx + 1 == num_batches):
            # As timm: the batch of each logged step, as the model sees it, stretched to the image range.
            save_image(input.float(), ctx.image_folder / f'train-batch-{batch_idx}.jpg', padding=0, normalize=True)
        if need_update:
            num_updates += 1
            ctx.optimizer.zero_grad()
            task.update_ema(step=num_updates)
            if args.synchronize_step and ctx.device.type == 'cuda':
                torch.cuda.synchronize()
            update_idx = batch_idx // accum_steps
            if ctx.save_recovery and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
                ctx.save_recovery(epoch, update_idx, EpochProgress(
                    batch_idx + 1, loss_sum, tuple(part_sums.tolist()), samples))
            if ctx.lr_scheduler is not None:
                ctx.lr_scheduler.step_update(num_updates=num_updates, metric=loss_sum / samples)
            now = time.perf_counter()
            update_time.update(now - update_start)
            update_start = now
            last = batch_idx + 1 == num_batches
            if update_idx % args.log_interval == 0 or last:
                _log_update(ctx, epoch, update_idx, updates_per_epoch, loss_value, loss_sum / samples, update_time,
                            update_samples, data_time)
            update_samples = 0
        data_start = time.perf_counter()
    if hasattr(ctx.optimizer, 'sync_lookahead'):
        ctx.optimizer.sync_lookahead()
    if isinstance(task, EpochHooks):
        task.on_epoch_end(epoch)
    sums = torch.cat([torch.tensor([loss_sum], dtype=torch.float64, device=ctx.device), part_sums])
    means = _reduce_mean(sums / max(samples, 1), args.world_size).tolist()
    return {'loss': means[0], 'task_loss': means[1], 'kd_loss': means[2]}


@torch.no_grad()
def measure(
        model: torch.nn.Module,
        loader,
        device: torch.device,
        prefetcher: bool,
        channels_last: bool,
        amp_autocast: Callable[[], AbstractContextManager],
        model_dtype: Optional[torch.dtype] = None,
        after_batch: Optional[Callable[[int, int, Metrics], None]] = None,
        tta: int = 0,
        multilabel_threshold: Optional[float] = None,
) -> Metrics:
    """Run ``model`` in eval mode over ``loader`` and accumulate this rank's metric sums.

    The duplicates a distributed sampler pads the ranks with still run through the model (collectives stay
    balanced) but are not counted, so the reduced metrics are those of the dataset itself. With
    ``multilabel_threshold`` the targets are multi-label and the metrics timm's multi-label ones.

    With ``tta`` N > 1 (timm's ``--tta``), each N consecutive images are N augmented copies of one: their logits
    are averaged into one prediction, scored against the first copy's target, and every metric is that of the
    averaged predictions (batches and each rank's share hold whole groups, see ``check_tta_groups``).

    Args:
        after_batch: Called with (batch index, number of batches, the sums so far) after each batch.
    """
    model.eval()
    max_samples = evaluation_sample_limit(loader)
    if tta > 1 and max_samples is not None:
        max_samples //= tta
    if multilabel_threshold is None:
        metrics: Metrics = ClassificationMetrics(device, max_samples=max_samples)
    else:
        metrics = MultiLabelMetrics(device, threshold=multilabel_threshold, max_samples=max_samples)
    num_batches = len(loader)
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            if not prefetcher:
                input, target = _to_device(input, target, device, model_dtype)
            input = _in_memory_format(input, channels_last)
            with amp_autocast():
                output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            output = output.float()
            if tta > 1:
                output = output.reshape(-1, tta, output.shape[-1]).mean(dim=1)
                target = target[::tta]
            metrics.update(output, target)
            if after_batch is not None:
                after_batch(batch_idx, num_batches, metrics)
    return metrics


def validate(ctx: LoopContext, model: torch.nn.Module, loader, label: str = 'Test') -> Dict[str, float]:
    """Top-1, top-5, NLL and ECE of ``model`` on ``loader``, summed exactly over all ranks (multi-label: timm's
    loss, mAP and F1 metrics).

    Raises:
        NonFiniteLossError: The model's outputs are not finite (on every rank alike: the sums are reduced first).
    """
    args = ctx.args
    multilabel = args.task == 'multilabel'
    batch_time, end = _Average(), [time.perf_counter()]

    def log_batch(batch_idx: int, num_batches: int, metrics: Metrics) -> None:
        """timm's per-batch validation line, with the running metrics of all ranks (every rank calls it)."""
        now = time.perf_counter()
        batch_time.update(now - end[0])
        end[0] = now
        if batch_idx % args.log_interval and batch_idx + 1 != num_batches:
            return
        running = metrics.running(reduce=args.distributed)
        if ctx.is_primary:
            accuracy = '' if multilabel else f"  Acc@1: {running['top1']:>7.3f}  Acc@5: {running['top5']:>7.3f}"
            _logger.info(f"{label}: [{batch_idx:>4d}/{num_batches - 1}]  "
                         f"Time: {batch_time.value:.3f} ({batch_time.mean:.3f})  Loss: {running['loss']:>6.3f}"
                         + accuracy)

    metrics = measure(model, loader, ctx.device, args.prefetcher, args.channels_last, ctx.amp_autocast,
                      ctx.model_dtype, after_batch=log_batch, tta=args.tta,
                      multilabel_threshold=args.multilabel_threshold if multilabel else None)
    metrics.reduce()
    result = metrics.compute()
    if not math.isfinite(result['loss']):
        # The last update of the epoch made the weights non-finite (its loss was still finite): stop before this
        # epoch's checkpoint replaces the last good one.
        raise NonFiniteLossError(f'non-finite model outputs in validation ({label}): training diverged in the last '
                                 f'step(s); the last saved checkpoint is unchanged')
    if ctx.is_primary and multilabel:
        _logger.info(f"{label}: Loss {result['loss']:.4f}  mAP {result['map']:.3f}  F1 micro {result['micro_f1']:.3f}  "
                     f"macro {result['macro_f1']:.3f}  sample {result['sample_f1']:.3f}")
    elif ctx.is_primary:
        _logger.info(f"{label}: Acc@1 {result['top1']:.3f}  Acc@5 {result['top5']:.3f}  NLL {result['nll']:.4f}  "
                     f"ECE {result['ece']:.2f}")
    return result
