"""A run before its first write: the arguments checked, the processes started, then the data, model, task,
optimizer, schedule and output plan built, the resumed state restored and the model wrapped (EMA, compile, DDP).

Everything that can be refused is refused here, before the run folder is touched; :mod:`.main` trains the
:class:`Run` this returns and records it.
"""
import argparse
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import TrainingTask
from timm.utils import init_distributed_device, is_primary, random_seed, set_jit_fuser

from ..data_config import resolve_student_data_config
from ..errors import UsageError
from ..factory import mixup_active
from ..methods import get_method
from ..tasks import EpochOrdered, SampleIndexed
from .build import (
    Precision, available_device, check_naflex_student, create_optimizer, create_precision, create_student, create_task,
    place_model, resolve_lr, student_in_chans,
)
from .checkpoint import load_resume_point, restore_ema, restore_training_state
from .config import CommandLine
from .data import TrainData, TrainSampler, create_train_data, install_train_sampler
from .flags import create_parser
from .policy import aug_splits_note, check_config, check_smoothing, mixup_smoothing, resolve_smoothing
from .resume import RunPlan, plan_run
from .splits import dataset_targets, load_datasets, resolve_num_classes

# The trainer's own log lines, set-up and loop alike, under one name (timm's train.py logs as 'train').
_logger = logging.getLogger('train_tfkd')

DECREASING_METRICS = ('loss', 'nll', 'ece')


@dataclass
class Run:
    """Everything a run needs once it is set up; nothing has been written yet."""
    args: argparse.Namespace
    command_line: CommandLine
    device: torch.device
    primary: bool
    precision: Precision
    data_config: Dict[str, Any]
    data: TrainData
    train_sampler: Optional[TrainSampler]
    task: TrainingTask
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    num_epochs: int
    updates_per_epoch: int
    smoothing: float
    plan: RunPlan

    @property
    def start_epoch(self) -> int:
        if self.args.start_epoch is not None:
            return self.args.start_epoch
        return self.plan.resume.epoch if self.plan.resume else 0

    @property
    def end_epoch(self) -> int:
        return min(self.num_epochs, self.args.stop_epoch) if self.args.stop_epoch is not None else self.num_epochs


def select_device(args: argparse.Namespace, explicit: set) -> None:
    """timm's default --device cuda falls back to the CPU on a machine without CUDA; a device asked for must exist."""
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        if 'device' in explicit:
            raise UsageError(f"--device {args.device} asked for, but CUDA is not available here")
        args.device = 'cpu'
    available_device(args.device)


def set_up(command_line: CommandLine) -> Tuple[argparse.Namespace, List[str]]:
    """Check the arguments, pick the device, start the processes of a distributed run and seed them.

    Returns:
        The arguments and the warnings to log once every check has passed (a refused run prints one line only).
    """
    args, explicit = command_line.args, command_line.explicit
    warnings = [*command_line.warnings, *check_config(args, explicit)]
    for module in args.device_modules or ():
        importlib.import_module(module)
    select_device(args, explicit)
    args.prefetcher = not args.no_prefetcher
    init_distributed_device(args)
    if not is_primary(args):
        logging.getLogger().setLevel(logging.WARNING)  # as timm's train.py, only rank 0 logs the run
    elif args.distributed:
        _logger.info(f'Distributed training: {args.world_size} processes, one device each ({args.device} here).')
    random_seed(args.seed, args.rank)
    if args.fuser:
        set_jit_fuser(args.fuser)
    return args, warnings


def _option_strings() -> Dict[str, str]:
    return {action.dest: action.option_strings[-1] for action in create_parser()._actions if action.option_strings}


def _create_schedule(args: argparse.Namespace, optimizer, updates_per_epoch: int, decreasing: bool):
    try:
        return create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing),
                                   updates_per_epoch=updates_per_epoch)
    except ValueError as e:  # an unknown --sched, or settings the schedule cannot take
        raise UsageError(f'--sched {args.sched}: {e}') from None


def _train_targets(args: argparse.Namespace, dataset) -> Optional[torch.Tensor]:
    """The class of every training sample, read only for a method that needs them."""
    if not get_method(args.tfkd_mode).needs_train_targets:
        return None
    targets = dataset_targets(dataset)
    if targets is None:
        raise UsageError(f"--tfkd-mode {args.tfkd_mode} needs the class of every training image, which --dataset "
                         f"{args.dataset} does not list (timm's folder and tar datasets do)")
    return targets


def _order_by(task, train_sampler: Optional[TrainSampler], loader_train, args: argparse.Namespace) -> None:
    """Hand the training order to a task that reads its sample indices or chooses each epoch's samples."""
    if train_sampler is None:
        raise UsageError(f'--tfkd-mode {args.tfkd_mode} needs to know (or choose) which dataset sample each training '
                         f'image is, which this loader cannot tell (an iterable dataset, --use-multi-epochs-loader, '
                         f'--train-img-sizes or --naflex-loader)')
    if isinstance(task, EpochOrdered):
        train_sampler.order_by(task)
        if len(loader_train) == 0:
            raise UsageError(f'--tfkd-mode {args.tfkd_mode} loads {len(train_sampler)} images an epoch here, fewer '
                             f'than one batch of --batch-size {args.batch_size}: lower --batch-size')


def prepare(command_line: CommandLine) -> Run:
    """Read the data, build model, task, optimizer and schedule, and decide where the run writes and what it
    continues; every check of the data and the checkpoint to resume happens here, before anything is written."""
    args = command_line.args
    device = torch.device(args.device)
    primary = is_primary(args)
    precision = create_precision(args, device)
    datasets = load_datasets(args, student_in_chans(args))
    classes_note = resolve_num_classes(args, datasets.class_names)
    train_targets = _train_targets(args, datasets.train)
    if primary and classes_note:
        _logger.info(classes_note)
    model = create_student(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    patch_size = check_naflex_student(args, model)
    try:
        get_method(args.tfkd_mode).check(args, num_classes=args.num_classes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    data_config = resolve_student_data_config(vars(args), model, verbose=primary)
    smoothing, smoothing_note = resolve_smoothing(args, command_line.explicit)
    check_smoothing(args, smoothing)
    folded = mixup_smoothing(args, smoothing) if mixup_active(args) else None
    model = place_model(args, model, device, precision.model_dtype)
    data = create_train_data(args, datasets, data_config, folded or 0.0, device, precision.model_dtype,
                             patch_size=patch_size, verbose=primary)
    train_sampler = install_train_sampler(data.loader_train, args.seed, args.rank)
    task = create_task(args, model, smoothing, folded, data_config, data.num_train_samples, device,
                       precision.model_dtype, primary, train_targets=train_targets)
    if isinstance(task, (SampleIndexed, EpochOrdered)):
        _order_by(task, train_sampler, data.loader_train, args)
    if primary:
        _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters. '
                     f'{smoothing_note}.')
        if args.aug_splits > 1:
            _logger.info(aug_splits_note(args))
    resolve_lr(args, data.batch_size_reference)
    optimizer = create_optimizer(args, task)
    eval_metric = args.eval_metric if data.loader_eval is not None else 'loss'
    updates_per_epoch = (len(data.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = _create_schedule(args, optimizer, updates_per_epoch, eval_metric in DECREASING_METRICS)
    plan = plan_run(args, command_line.yaml, data_config['input_size'][-1], _option_strings())
    if plan.resume is not None and plan.resume.progress is not None and train_sampler is None:
        plan.resume = _restart_epoch(plan)
    return Run(args, command_line, device, primary, precision, data_config, data, train_sampler, task, optimizer,
               lr_scheduler, num_epochs, updates_per_epoch, smoothing, plan)


def _restart_epoch(plan: RunPlan):
    """A recovery checkpoint, with a loader that cannot skip the batches already trained: restart the epoch from
    the last epoch checkpoint (or from scratch before the first), and say so."""
    last = plan.folder.checkpoint('last') if plan.folder.file('last.pth.tar').is_file() else None
    _logger.warning(f"'{plan.resume.path}' stopped part way through epoch {plan.resume.epoch}, and this loader cannot "
                    f"skip the batches already trained: epoch {plan.resume.epoch} is trained again from "
                    f"{'its start (' + str(last) + ')' if last else 'scratch'}")
    return load_resume_point(str(last)) if last else None


def resume_and_wrap(run: Run) -> None:
    """Resume weights, optimizer and schedule, then EMA, compile and DDP, in timm's order."""
    args, task, point = run.args, run.task, run.plan.resume
    if point is not None:
        restore_training_state(task, point, None if args.no_resume_opt else run.optimizer,
                               None if args.no_resume_opt else run.precision.loss_scaler)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if point is not None:
            restore_ema(task, point)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[run.device] if run.device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)
    start = run.start_epoch
    if run.lr_scheduler is not None and (start > 0 or (point and point.progress)):
        if args.sched_on_updates:
            done = point.progress.batches // args.grad_accum_steps if point and point.progress else 0
            run.lr_scheduler.step_update(start * run.updates_per_epoch + done)
        else:
            run.lr_scheduler.step(start)
