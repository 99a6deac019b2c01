"""``train_tfkd.py`` / ``timm-tfkd-train``: set up a run from the arguments, train it, record it, publish it.

:func:`train` reads as four steps: :func:`_set_up` (arguments, device, processes), :func:`_prepare` (model, data,
task, optimizer, where the run writes and what it resumes), :func:`_train_epochs` (the loop, writing the run folder
through :mod:`timm_tfkd.run_folder` and each epoch's row to the loggers of :mod:`.loggers`) and :func:`_finish` (the
final line and the Hub).
"""
import argparse
import datetime
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from timm import __version__ as timm_version
from timm.models import safe_model_name
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import distribute_bn, init_distributed_device, is_primary, random_seed, update_summary
from timm.utils.log import FormatterNoInfo

from ..data_config import resolve_student_data_config
from ..errors import HubUploadError, NonFiniteLossError, TfKDError, UsageError
from ..methods import get_method
from ..run_folder import SUMMARY_FILE, RunFolder, RunRecord
from ..tasks import SampleIndexed
from ..version import __version__
from .build import Precision, create_optimizer, create_precision, create_student, create_task, place_model, resolve_lr
from .checkpoint import check_resume_path, create_saver, load_rng_state, restore_rng_state
from .config import CommandLine, parse_args
from .data import SampleIndexRecorder, TrainData, create_train_data, mixup_settings
from .engine import LoopContext, train_one_epoch, validate
from .loggers import EpochLoggers, check_logging_args, create_epoch_loggers, epoch_row
from .policy import check_smoothing, check_supported, mixup_smoothing, resolve_smoothing
from .publish import check_hub_args, publish_run

_logger = logging.getLogger('train_tfkd')

DECREASING_METRICS = ('loss', 'nll', 'ece')


@dataclass
class RunPlan:
    """Where a run writes and what it resumes from, decided before anything is written."""
    folder: RunFolder
    resume_path: Optional[str]


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
    task: TrainingTask
    optimizer: torch.optim.Optimizer
    smoothing: float
    plan: RunPlan
    resume_epoch: Optional[int] = None


def _plan_output(args: argparse.Namespace, data_config: Dict[str, Any]) -> RunPlan:
    """The run folder (timm's naming) and the checkpoint to resume from, without creating anything."""
    root = args.output or './output/train'
    if args.experiment:
        name = args.experiment
    elif args.resume == 'auto' and os.path.isdir(root):
        # No name given: resume the newest earlier run of this model that has a checkpoint.
        runs = [os.path.join(root, d) for d in os.listdir(root) if safe_model_name(args.model) in d]
        runs = [r for r in runs if RunFolder(r).resume_checkpoint()]
        name = os.path.basename(max(runs, key=os.path.getmtime)) if runs else None
    else:
        name = None
    name = name or '-'.join([datetime.datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model),
                             str(data_config['input_size'][-1])])
    output_dir = os.path.join(root, name)
    if args.resume == 'auto':
        found = RunFolder(output_dir).resume_checkpoint()
        resume_path = str(found) if found else None
    else:
        resume_path = args.resume or None
    if resume_path:
        check_resume_path(resume_path)
    elif os.path.exists(output_dir) and args.resume != 'auto':
        # A fresh run never writes into an earlier run's folder: add a suffix as timm does.
        suffix = 1
        while os.path.exists(f'{output_dir}-{suffix}'):
            suffix += 1
        output_dir = f'{output_dir}-{suffix}'
    return RunPlan(RunFolder(output_dir), resume_path)


def _select_device(args: argparse.Namespace, explicit: set) -> None:
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        if 'device' in explicit:
            raise UsageError(f"--device {args.device} asked for, but CUDA is not available here")
        args.device = 'cpu'


def _set_up(command_line: CommandLine) -> argparse.Namespace:
    """Check the arguments, pick the device, start the processes of a distributed run and seed them."""
    args, explicit = command_line.args, command_line.explicit
    check_supported(args)
    check_hub_args(args)
    check_logging_args(args)
    for module in args.device_modules or ():
        importlib.import_module(module)
    _select_device(args, explicit)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    random_seed(args.seed, args.rank)
    return args


def _prepare(command_line: CommandLine) -> Run:
    """Build model, data, task and optimizer, and decide where the run writes and what it resumes from."""
    args = command_line.args
    device = torch.device(args.device)
    primary = is_primary(args)
    precision = create_precision(args, device)
    model = create_student(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    try:
        get_method(args.tfkd_mode).check(args, num_classes=args.num_classes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    data_config = resolve_student_data_config(vars(args), model, verbose=primary)
    smoothing, smoothing_note = resolve_smoothing(args, command_line.explicit)
    check_smoothing(args, smoothing)
    mixup_active = mixup_settings(args, 0.0) is not None
    model = place_model(args, model, device, precision.model_dtype)
    data = create_train_data(args, data_config, mixup_smoothing(args, smoothing), device, precision.model_dtype)
    task = create_task(args, model, smoothing, mixup_active, data_config, data.num_train_samples, device,
                       precision.model_dtype, primary)
    if primary:
        _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters. '
                     f'{smoothing_note}.')
    resolve_lr(args, args.batch_size)
    optimizer = create_optimizer(args, task)
    return Run(args, command_line, device, primary, precision, data_config, data, task, optimizer, smoothing,
               _plan_output(args, data_config))


def _resume_and_wrap(run: Run) -> None:
    """Resume weights and optimizer, then EMA, compile and DDP, in timm's order."""
    args, task = run.args, run.task
    if run.plan.resume_path:
        run.resume_epoch = resume_task_checkpoint(
            task, run.plan.resume_path, optimizer=None if args.no_resume_opt else run.optimizer,
            loss_scaler=None if args.no_resume_opt else run.precision.loss_scaler, log_info=run.primary)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if run.plan.resume_path:
            load_task_ema_checkpoint(task, run.plan.resume_path)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[run.device] if run.device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)


def _record(run: Run, final, final_ema, best_epoch) -> RunRecord:
    args, method = run.args, get_method(run.args.tfkd_mode)
    identity = getattr(getattr(run.task, 'teacher', None), 'identity', None)
    return RunRecord(
        model=args.model,
        num_classes=args.num_classes,
        in_chans=run.data_config['input_size'][0],
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in run.data_config.items()},
        tfkd={'mode': method.name, **method.record(args), 'smoothing': run.smoothing,
              'teacher': dict(identity) if identity else None},
        class_names=run.data.class_names,
        dataset=args.dataset or 'folder',
        train_split=args.train_split,
        eval_split=args.val_split,
        epochs=args.epochs,
        seed=args.seed,
        versions={'timm': timm_version, 'timm_tfkd': __version__, 'torch': torch.__version__},
        final_metrics=final,
        final_ema_metrics=final_ema,
        best_epoch=best_epoch,
    )


def _validate(run: Run, ctx: LoopContext, eval_metric: str):
    """Validate the model (and its EMA); returns its metrics, the EMA's, and the value that ranks checkpoints."""
    args, task = run.args, run.task
    final = validate(ctx, task.get_eval_model(), run.data.loader_eval)
    final_ema, latest = None, final[eval_metric]
    if task.has_ema() and not args.model_ema_force_cpu:
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(task.get_trainable_module(ema=True), args.world_size, args.dist_bn == 'reduce')
        final_ema = validate(ctx, task.get_eval_model(ema=True), run.data.loader_eval, label='Test (EMA)')
        latest = final_ema[eval_metric]  # timm ranks checkpoints by the EMA when it is validated
    return final, final_ema, latest


def _train_epochs(run: Run) -> Tuple[Optional[Dict[str, float]], Optional[Dict[str, float]]]:
    """The epoch loop; rank 0 writes the run folder and the epoch loggers. Returns the last validation metrics of the
    model and EMA."""
    args, task, optimizer, plan = run.args, run.task, run.optimizer, run.plan
    eval_metric = args.eval_metric if run.data.loader_eval is not None else 'loss'
    decreasing = eval_metric in DECREASING_METRICS
    updates_per_epoch = (len(run.data.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (run.resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    end_epoch = min(num_epochs, args.stop_epoch) if args.stop_epoch is not None else num_epochs
    sample_index = SampleIndexRecorder(run.data.loader_train) if isinstance(task, SampleIndexed) else None

    # Everything that can fail on bad input has been built: only now does the run folder appear.
    saver, loggers = None, EpochLoggers()
    if run.primary:
        os.makedirs(plan.folder.path, exist_ok=True)
        saver = create_saver(task, optimizer, args, str(plan.folder.path), run.precision.loss_scaler, decreasing)
        if plan.resume_path and os.path.dirname(os.path.abspath(plan.resume_path)) == os.path.abspath(
                plan.folder.path):
            saver.load_state_dict_from_checkpoint(plan.resume_path)
        # A folder resumed (or restarted by --resume auto) keeps only the rows of epochs it will not train again.
        dropped = plan.folder.drop_summary_rows_from(start_epoch)
        if dropped:
            _logger.info(f'{SUMMARY_FILE}: dropped {dropped} row(s) of epochs trained again from epoch {start_epoch}')
        plan.folder.write_args(run.command_line.yaml)
        _logger.info(f'Output folder: {plan.folder.path}. Epochs {start_epoch} to {end_epoch - 1} of {num_epochs}.')
        loggers = create_epoch_loggers(args, plan.folder.path.name)
    if plan.resume_path:
        rng_state = load_rng_state(plan.resume_path)
        if rng_state is not None and args.world_size == 1:
            restore_rng_state(rng_state)

    ctx = LoopContext(
        args=args, task=task, optimizer=optimizer, device=run.device, amp_autocast=run.precision.autocast,
        loss_scaler=run.precision.loss_scaler, lr_scheduler=lr_scheduler, mixup_fn=run.data.mixup_fn,
        model_dtype=run.precision.model_dtype, is_primary=run.primary,
        save_recovery=saver.save_recovery if saver is not None else None, num_epochs=num_epochs,
        sample_index=sample_index,
    )
    final, final_ema, best_epoch = None, None, None
    with loggers:  # closed also when the run fails
        for epoch in range(start_epoch, end_epoch):
            loader = run.data.loader_train
            sampler = getattr(loader, 'sampler', None)
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(epoch)
            train_metrics = train_one_epoch(ctx, loader, epoch)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
            epoch_done = epoch + 1
            if epoch_done % args.val_interval != 0 and epoch_done != end_epoch:
                if lr_scheduler is not None:
                    lr_scheduler.step(epoch_done, metric=None)
                continue
            eval_metrics: Dict[str, float] = {}
            latest = train_metrics['loss']
            if run.data.loader_eval is not None:
                final, final_ema, latest = _validate(run, ctx, eval_metric)
                eval_metrics.update(final)
                eval_metrics.update({f'ema_{k}': v for k, v in (final_ema or {}).items()})
            if saver is not None:
                lrs = [group['lr'] for group in optimizer.param_groups]
                lr = sum(lrs) / len(lrs)
                update_summary(epoch, train_metrics, eval_metrics, str(plan.folder.file(SUMMARY_FILE)), lr=lr,
                               write_header=None)
                loggers.log_epoch(epoch, epoch_row(epoch, train_metrics, eval_metrics, lr))
                _, best_epoch = saver.save_checkpoint(epoch, metric=latest)
                if args.save_epochs and epoch_done in args.save_epochs:
                    saver.save_milestone(epoch_done)
                plan.folder.write_record(_record(run, final, final_ema, best_epoch))
            if lr_scheduler is not None:
                lr_scheduler.step(epoch_done, latest)
    return final, final_ema


def _finish(run: Run, final: Optional[Dict[str, float]], final_ema: Optional[Dict[str, float]]) -> int:
    """The final line, then the export / upload the Hub flags ask for (rank 0)."""
    args, folder = run.args, run.plan.folder
    if final is not None:
        shown = final_ema or final
        print(f"Final ({'EMA' if final_ema else 'model'}) on '{args.val_split}': top-1 {shown['top1']:.2f}%  "
              f"top-5 {shown['top5']:.2f}%  NLL {shown['nll']:.4f}  ECE {shown['ece']:.2f}%")
    print(f'Checkpoints and summary in {folder.path}')
    try:
        publish_run(args, folder.path)
    except HubUploadError as e:
        print(f'timm-tfkd: error: {e}', file=sys.stderr)
        return 1
    except TfKDError as e:
        print(f'timm-tfkd: error: export of {folder.path} failed: {e}', file=sys.stderr)
        return 2
    return 0


def train(argv: Optional[Sequence[str]] = None) -> int:
    """Run training; returns the process exit code (raises :class:`UsageError` for bad input before writing)."""
    command_line = parse_args(argv)
    args = _set_up(command_line)
    try:
        run = _prepare(command_line)
        _resume_and_wrap(run)
        final, final_ema = _train_epochs(run)
    except NonFiniteLossError as e:
        _logger.error(str(e))
        return 1
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return _finish(run, final, final_ema) if run.primary else 0


class _ConsoleHandler(logging.StreamHandler):
    """timm's console log format, with INFO on stdout and warnings / errors on stderr.

    The stream is looked up for each record, so a replaced ``sys.stdout`` / ``sys.stderr`` (pytest's capture, a
    caller's redirect) is honoured instead of one captured when the handler was made.
    """

    def __init__(self):
        super().__init__()
        self.setFormatter(FormatterNoInfo())

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


def _setup_logging() -> None:
    """Like timm's ``setup_default_logging``, but stderr keeps only warnings and errors (so bad input is exactly one
    line there) and the handler is added once however often :func:`main` runs in a process."""
    if not any(isinstance(handler, _ConsoleHandler) for handler in logging.root.handlers):
        logging.root.addHandler(_ConsoleHandler())
    logging.root.setLevel(logging.INFO)


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point: bad input gives one line on stderr and exit code 2, no traceback."""
    _setup_logging()
    try:
        return train(argv)
    except TfKDError as e:
        print(f'train_tfkd.py: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
