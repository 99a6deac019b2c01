"""``train_tfkd.py`` / ``timm-tfkd-train``: set up a run from the arguments, train it, record it, publish it."""
import argparse
import datetime
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from timm import __version__ as timm_version
from timm.models import safe_model_name
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import distribute_bn, init_distributed_device, is_primary, random_seed
from timm.utils import update_summary
from timm.utils.log import FormatterNoInfo

from ..checkpoint_io import CheckpointError
from ..hub import check_hub_args, finish_run_for_hub
from ..teacher import TeacherError
from ..version import __version__
from .args import UsageError, check_supported, explicitly_set, parse_args, resolve_smoothing
from .build import (
    create_optimizer, create_precision, create_student, create_task, place_model, resolve_lr,
    resolve_student_data_config,
)
from .checkpoint import (
    check_resume_path, create_saver, drop_summary_rows_from, find_resume_checkpoint, load_rng_state,
    restore_rng_state, write_json_atomic,
)
from .data import create_train_data, mixup_settings
from .engine import LoopContext, NonFiniteLossError, train_one_epoch, validate

_logger = logging.getLogger('train_tfkd')

DECREASING_METRICS = ('loss', 'nll', 'ece')


@dataclass
class RunPlan:
    """Where a run writes and what it resumes from, decided before anything is written."""
    output_dir: Optional[str]
    resume_path: Optional[str]


def _plan_output(args: argparse.Namespace, data_config: Dict[str, Any]) -> RunPlan:
    """The run folder (timm's naming) and the checkpoint to resume from, without creating anything."""
    root = args.output or './output/train'
    if args.experiment:
        name = args.experiment
    elif args.resume == 'auto' and os.path.isdir(root):
        # No name given: resume the newest earlier run of this model that has a checkpoint.
        runs = [os.path.join(root, d) for d in os.listdir(root) if safe_model_name(args.model) in d]
        runs = [r for r in runs if find_resume_checkpoint(r)]
        name = os.path.basename(max(runs, key=os.path.getmtime)) if runs else None
    else:
        name = None
    name = name or '-'.join([datetime.datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model),
                             str(data_config['input_size'][-1])])
    output_dir = os.path.join(root, name)
    if args.resume == 'auto':
        resume_path = find_resume_checkpoint(output_dir)
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
    return RunPlan(output_dir, resume_path)


def _select_device(args: argparse.Namespace, explicit: set) -> None:
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        if 'device' in explicit:
            raise UsageError(f"--device {args.device} asked for, but CUDA is not available here")
        args.device = 'cpu'


def _run_info(args, data_config, class_names, task, smoothing, final, final_ema, best_epoch) -> Dict[str, Any]:
    teacher = getattr(task, 'teacher', None)
    identity = getattr(teacher, 'identity', None)
    return {
        'model': args.model,
        'num_classes': args.num_classes,
        'in_chans': data_config['input_size'][0],
        'class_names': class_names,
        'data_config': {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        'tfkd': {
            'mode': args.tfkd_mode,
            'formula': args.tfkd_formula,
            'alpha': args.tfkd_alpha,
            'temperature': args.tfkd_temperature,
            'correct_prob': args.tfkd_correct_prob,
            'multiplier': args.tfkd_multiplier,
            'smoothing': smoothing,
            'teacher': dict(identity) if identity else None,
        },
        'dataset': args.dataset or 'folder',
        'train_split': args.train_split,
        'eval_split': args.val_split,
        'epochs': args.epochs,
        'seed': args.seed,
        'versions': {'timm': timm_version, 'timm_tfkd': __version__, 'torch': torch.__version__},
        'final_metrics': final,
        'final_ema_metrics': final_ema,
        'best_epoch': best_epoch,
    }


def train(argv: Optional[Sequence[str]] = None) -> int:
    """Run training; returns the process exit code (raises :class:`UsageError` for bad input before writing)."""
    args, args_text = parse_args(argv)
    explicit = explicitly_set(argv)
    check_supported(args)
    check_hub_args(args)
    for module in args.device_modules or ():
        importlib.import_module(module)
    _select_device(args, explicit)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    device = init_distributed_device(args)
    primary = is_primary(args)
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    precision = create_precision(args, device)
    random_seed(args.seed, args.rank)

    model = create_student(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    data_config = resolve_student_data_config(args, model, primary)
    smoothing, smoothing_note = resolve_smoothing(args, explicit)
    mixup_active = mixup_settings(args, 0.0) is not None
    # lsr applies its smoothing itself; every other mode lets Mixup fold it into the soft targets.
    mixup_smoothing = 0.0 if args.tfkd_mode == 'lsr' else smoothing
    model = place_model(args, model, device, precision.model_dtype)
    data = create_train_data(args, data_config, mixup_smoothing, device, precision.model_dtype)
    task = create_task(args, model, smoothing, mixup_active, data_config, device, precision.model_dtype, primary)
    if primary:
        _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters. '
                     f'{smoothing_note}.')
    resolve_lr(args, args.batch_size)
    optimizer = create_optimizer(args, task)
    plan = _plan_output(args, data_config)

    resume_epoch = None
    if plan.resume_path:
        resume_epoch = resume_task_checkpoint(
            task, plan.resume_path, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else precision.loss_scaler, log_info=primary)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if plan.resume_path:
            load_task_ema_checkpoint(task, plan.resume_path)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)

    eval_metric = args.eval_metric if data.loader_eval is not None else 'loss'
    decreasing = eval_metric in DECREASING_METRICS
    updates_per_epoch = (len(data.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    end_epoch = min(num_epochs, args.stop_epoch) if args.stop_epoch is not None else num_epochs

    # Everything that can fail on bad input has been built: only now does the run folder appear.
    saver = None
    if primary:
        os.makedirs(plan.output_dir, exist_ok=True)
        saver = create_saver(task, optimizer, args, plan.output_dir, precision.loss_scaler, decreasing)
        if plan.resume_path and os.path.dirname(os.path.abspath(plan.resume_path)) == os.path.abspath(
                plan.output_dir):
            saver.load_state_dict_from_checkpoint(plan.resume_path)
        # A folder resumed (or restarted by --resume auto) keeps only the rows of epochs it will not train again.
        drop_summary_rows_from(os.path.join(plan.output_dir, 'summary.csv'), start_epoch)
        with open(os.path.join(plan.output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)
        _logger.info(f'Output folder: {plan.output_dir}. Epochs {start_epoch} to {end_epoch - 1} of {num_epochs}.')
    if plan.resume_path:
        rng_state = load_rng_state(plan.resume_path)
        if rng_state is not None and args.world_size == 1:
            restore_rng_state(rng_state)

    ctx = LoopContext(
        args=args, task=task, optimizer=optimizer, device=device, amp_autocast=precision.autocast,
        loss_scaler=precision.loss_scaler, lr_scheduler=lr_scheduler, mixup_fn=data.mixup_fn,
        model_dtype=precision.model_dtype, is_primary=primary,
        save_recovery=saver.save_recovery if saver is not None else None,
    )
    final, final_ema, best_epoch = None, None, None
    try:
        for epoch in range(start_epoch, end_epoch):
            loader = data.loader_train
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
            if data.loader_eval is not None:
                final = validate(ctx, task.get_eval_model(), data.loader_eval)
                eval_metrics.update(final)
                latest = final[eval_metric]
                if task.has_ema() and not args.model_ema_force_cpu:
                    ema_model = task.get_trainable_module(ema=True)
                    if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                        distribute_bn(ema_model, args.world_size, args.dist_bn == 'reduce')
                    final_ema = validate(ctx, task.get_eval_model(ema=True), data.loader_eval, label='Test (EMA)')
                    eval_metrics.update({f'ema_{k}': v for k, v in final_ema.items()})
                    latest = final_ema[eval_metric]  # timm ranks checkpoints by the EMA when it is validated
            if saver is not None:
                lrs = [group['lr'] for group in optimizer.param_groups]
                update_summary(epoch, train_metrics, eval_metrics, os.path.join(plan.output_dir, 'summary.csv'),
                               lr=sum(lrs) / len(lrs), write_header=None)
                _, best_epoch = saver.save_checkpoint(epoch, metric=latest)
                if args.save_epochs and epoch_done in args.save_epochs:
                    saver.save_milestone(epoch_done)
                write_json_atomic(os.path.join(plan.output_dir, 'run_info.json'), _run_info(
                    args, data_config, data.class_names, task, smoothing, final, final_ema, best_epoch))
            if lr_scheduler is not None:
                lr_scheduler.step(epoch_done, latest)
    except NonFiniteLossError as e:
        _logger.error(str(e))
        return 1
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()

    if not primary:
        return 0
    if final is not None:
        shown = final_ema or final
        print(f"Final ({'EMA' if final_ema else 'model'}) on '{args.val_split}': top-1 {shown['top1']:.2f}%  "
              f"top-5 {shown['top5']:.2f}%  NLL {shown['nll']:.4f}  ECE {shown['ece']:.2f}%")
    print(f'Checkpoints and summary in {plan.output_dir}')
    return finish_run_for_hub(args, plan.output_dir) or 0


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
    except (UsageError, TeacherError, CheckpointError) as e:
        print(f'train_tfkd.py: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
