"""``train_tfkd.py`` / ``timm-tfkd-train``: set up a run from the arguments, train it, record it, publish it.

:func:`train` reads as four steps: :func:`~.setup.set_up` (arguments, device, processes),
:func:`~.setup.prepare` (data, model, task, optimizer, schedule, where the run writes and what it continues),
:func:`_train_epochs` (the loop, writing the run folder through :mod:`timm_tfkd.run_folder` and each epoch's row to
the loggers of :mod:`.loggers`) and :func:`_finish` (the final line and the Hub). Everything that can be refused is
refused before the run folder is touched.
"""
import dataclasses
import datetime
import errno
import glob
import json
import logging
import os
import shutil
import signal
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from timm import __version__ as timm_version
from timm.utils import distribute_bn, update_summary

from ..console import console_logging, held_logs
from ..errors import HubUploadError, NonFiniteLossError, RunStopped, TfKDError, UsageError
from ..methods import get_method
from ..run_folder import SUMMARY_FILE, RunFolder, RunRecord
from ..version import __version__
from .checkpoint import create_saver, restore_rng_state
from .config import parse_args
from .data import set_loader_epoch
from .engine import LoopContext, train_one_epoch, validate
from .loggers import EpochLoggers, create_epoch_loggers, epoch_row
from .publish import publish_run
from .setup import DECREASING_METRICS, Run, prepare, resume_and_wrap, set_up

_logger = logging.getLogger('train_tfkd')

def _record(run: Run, final, final_ema, best_epoch, epochs_trained: int) -> RunRecord:
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
        epochs=run.num_epochs,
        seed=args.seed,
        versions={'timm': timm_version, 'timm_tfkd': __version__, 'torch': torch.__version__},
        final_metrics=final,
        final_ema_metrics=final_ema,
        best_epoch=best_epoch,
        epochs_trained=epochs_trained,
        finished=epochs_trained >= run.num_epochs,
        task=args.task,
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


@contextmanager
def _run_folder(run: Run) -> Iterator[RunFolder]:
    """The run folder, made (fresh run) and held by rank 0 for the whole block; every rank learns whether it got it.

    Raises:
        UsageError: Another process trains in it.
    """
    with ExitStack() as stack:
        folder, refusal = run.plan.folder, None
        if run.primary:
            try:
                folder = run.plan.claim()
                stack.enter_context(folder.lock())
            except TfKDError as e:
                refusal = str(e)
        if run.args.distributed:
            shared = [refusal]
            dist.broadcast_object_list(shared, src=0)
            refusal = shared[0]
        if refusal:
            raise UsageError(refusal)
        yield folder


@contextmanager
def _writing(folder: RunFolder, what: str) -> Iterator[None]:
    """Turn a failed write into a stopped run that names the last good checkpoint, after removing what the failed
    write left half done (checkpoints are written to a temporary file and renamed, so nothing good is lost).

    Raises:
        RunStopped: The write failed (a full disk says so).
    """
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        full = getattr(e, 'errno', None) == errno.ENOSPC or shutil.disk_usage(folder.path).free < 1 << 20
        for leftover in glob.glob(str(folder.path / '*tmp*')):
            os.remove(leftover)
        reason = 'no space left on device' if full else ' '.join(str(e).split())[:200]
        raise _stopped(folder, f'cannot write {what} ({reason})', None) from None


def _start_record(run: Run, folder: RunFolder) -> None:
    """``args.yaml`` for a run that begins here; a run continued in its folder appends this invocation instead."""
    point = run.plan.resume
    if run.plan.resumes_in_place and folder.file('args.yaml').is_file():
        folder.append_invocation({
            'started': datetime.datetime.now().isoformat(timespec='seconds'),
            'resumed_from': os.path.basename(point.path) if point else None,
            'epoch': run.start_epoch,
            'batch': point.progress.batches if point and point.progress else 0,
            'changed': {key: {'was': old, 'now': new} for key, (old, new) in run.plan.changes.items()},
        })
    else:
        folder.write_args(run.command_line.yaml)


@dataclass
class Results:
    """What the loop reports at the end: the last validation metrics of the model and its EMA, the best ranked
    checkpoint, and every epoch's metrics (timm's ``--result``)."""
    final: Optional[Dict[str, float]] = None
    final_ema: Optional[Dict[str, float]] = None
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    epochs: List[Dict[str, Any]] = dataclasses.field(default_factory=list)


def _summary_metrics(final: Dict[str, float], final_ema: Optional[Dict[str, float]]) -> Dict[str, float]:
    """The ``eval_*`` of summary.csv: as in timm, the EMA's when it is validated (the metric checkpoints are ranked
    by), with the model's then kept as ``eval_model_*``."""
    if final_ema is None:
        return dict(final)
    return {**final_ema, **{f'model_{name}': value for name, value in final.items()}}


def _train_epochs(run: Run, folder: Optional[RunFolder], loggers: EpochLoggers) -> Results:
    """The epoch loop; rank 0 writes ``folder`` and the epoch loggers."""
    args, task, optimizer, point = run.args, run.task, run.optimizer, run.plan.resume
    eval_metric = args.eval_metric if run.data.loader_eval is not None else 'loss'
    start_epoch, end_epoch = run.start_epoch, run.end_epoch
    saver = None
    if folder is not None:
        saver = create_saver(task, optimizer, args, str(folder.path), run.precision.loss_scaler,
                             eval_metric in DECREASING_METRICS)
        if run.plan.resumes_in_place and point is not None and 'saver' in point.checkpoint:
            saver.load_state_dict(point.checkpoint['saver'])
        # A folder resumed (or restarted by --resume auto) keeps only the rows of epochs it will not train again.
        dropped = folder.drop_summary_rows_from(start_epoch)
        if dropped:
            _logger.info(f'{SUMMARY_FILE}: dropped {dropped} row(s) of epochs trained again from epoch {start_epoch}')
        _start_record(run, folder)
        _logger.info(f'Output folder: {folder.path}. Epochs {start_epoch} to {end_epoch - 1} of {run.num_epochs}.')
    if point is not None and point.rng_state is not None and args.world_size == 1:
        restore_rng_state(point.rng_state)
    resumed = point.progress if point is not None and point.epoch == start_epoch else None
    if resumed is not None and run.primary:
        _logger.info(f'Epoch {start_epoch} continues after the {resumed.batches} batches it trained before it stopped')

    ctx = LoopContext(
        args=args, task=task, optimizer=optimizer, device=run.device, amp_autocast=run.precision.autocast,
        loss_scaler=run.precision.loss_scaler, lr_scheduler=run.lr_scheduler, mixup_fn=run.data.mixup_fn,
        model_dtype=run.precision.model_dtype, is_primary=run.primary,
        save_recovery=_recovery_saver(saver, folder) if saver is not None else None, num_epochs=run.num_epochs,
        train_sampler=run.train_sampler, loss_scale=run.data.loss_scale,
        image_folder=folder.path if folder is not None and args.save_images else None,
    )
    results = Results()
    final, final_ema = None, None
    with loggers:  # closed also when the run fails
        for epoch in range(start_epoch, end_epoch):
            set_loader_epoch(run.data.loader_train, run.train_sampler, epoch)
            if resumed is not None:
                run.train_sampler.skip_next(resumed.batches * args.batch_size)
            train_metrics = train_one_epoch(ctx, run.data.loader_train, epoch, resumed)
            resumed = None
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
            epoch_done = epoch + 1
            if epoch_done % args.val_interval != 0 and epoch_done != end_epoch:
                if run.lr_scheduler is not None:
                    run.lr_scheduler.step(epoch_done, metric=None)
                continue
            eval_metrics: Dict[str, float] = {}
            latest = train_metrics['loss']
            if run.data.loader_eval is not None:
                final, final_ema, latest = _validate(run, ctx, eval_metric)
                eval_metrics = _summary_metrics(final, final_ema)
            if saver is not None:
                lrs = [group['lr'] for group in optimizer.param_groups]
                lr = sum(lrs) / len(lrs)
                with _writing(folder, f'the checkpoint of epoch {epoch}'):
                    update_summary(epoch, train_metrics, eval_metrics, str(folder.file(SUMMARY_FILE)), lr=lr,
                                   write_header=None)
                    results.best_metric, results.best_epoch = saver.save_checkpoint(epoch, metric=latest)
                    if args.save_epochs and epoch_done in args.save_epochs:
                        saver.save_milestone(epoch_done)
                    saver.remove_recoveries_through(epoch)
                    folder.write_record(_record(run, final, final_ema, results.best_epoch, epoch_done))
                loggers.log_epoch(epoch, epoch_row(epoch, train_metrics, eval_metrics, lr))
            results.epochs.append({'epoch': epoch, 'train': train_metrics, **(
                {'validation': eval_metrics} if eval_metrics else {})})
            if run.lr_scheduler is not None:
                run.lr_scheduler.step(epoch_done, latest)
    results.final, results.final_ema = final, final_ema
    return results


def _recovery_saver(saver, folder: RunFolder):
    def save_recovery(epoch: int, batch_idx: int, progress) -> None:
        with _writing(folder, f'a recovery checkpoint of epoch {epoch}'):
            saver.save_recovery(epoch, batch_idx, progress)
    return save_recovery


def _finish(run: Run, folder: RunFolder, results: Optional[Results]) -> int:
    """The end of a run on rank 0, as timm's: the best metric, then the export / upload the Hub flags ask for, then
    the final metrics and timm's ``--result`` JSON on stdout."""
    args = run.args
    if results is not None and results.best_metric is not None:
        _logger.info(f'*** Best metric: {results.best_metric} (epoch {results.best_epoch})')
    code = 0
    try:
        publish_run(args, folder.path)
    except HubUploadError as e:
        print(f'timm-tfkd: error: {e}', file=sys.stderr)
        code = 1
    except TfKDError as e:
        print(f'timm-tfkd: error: export of {folder.path} failed: {e}', file=sys.stderr)
        code = 2
    if results is not None and results.final is not None:
        shown, which = results.final_ema or results.final, 'EMA' if results.final_ema else 'model'
        if args.task == 'multilabel':
            print(f"Final ({which}) on '{args.val_split}': mAP {shown['map']:.2f}%  F1 micro {shown['micro_f1']:.2f}%  "
                  f"macro {shown['macro_f1']:.2f}%  sample {shown['sample_f1']:.2f}%  loss {shown['loss']:.4f}")
        else:
            print(f"Final ({which}) on '{args.val_split}': top-1 {shown['top1']:.2f}%  top-5 {shown['top5']:.2f}%  "
                  f"NLL {shown['nll']:.4f}  ECE {shown['ece']:.2f}%")
    print(f'Checkpoints and summary in {folder.path}')
    if results is not None:
        metric = args.eval_metric if run.data.loader_eval is not None else 'loss'
        ranked = sorted(results.epochs, key=lambda r: r.get('validation', r['train']).get(metric, 0),
                        reverse=metric in DECREASING_METRICS)
        print(f'--result\n{json.dumps(ranked[-10:], indent=4)}')
    return code


class _Terminated(BaseException):
    """SIGTERM, raised where the run is so that it unwinds like Ctrl-C (locks released, files closed)."""


def _stopped(folder: Optional[RunFolder], why: str, signal_number: Optional[int]) -> RunStopped:
    if folder is None or folder.resume_checkpoint() is None:
        where = 'no checkpoint was written yet; start the run again'
    else:
        where = (f"the last checkpoint is {folder.resume_checkpoint()}; resume with the same command and "
                 f"--experiment {folder.path.name} --resume auto")
    return RunStopped(f'{why}: {where}', signal_number)


def train(argv: Optional[Sequence[str]] = None) -> int:
    """Run training; returns the process exit code.

    Raises:
        TfKDError: Bad input (before anything is written) or a stopped run (:class:`RunStopped`).
    """
    command_line = parse_args(argv)
    folder = None
    with held_logs() as release:
        args, warnings = set_up(command_line)
        try:
            run = prepare(command_line)
            resume_and_wrap(run)
            if run.primary:
                for warning in warnings:
                    _logger.warning(warning)
            if run.start_epoch >= run.end_epoch:
                release()
                if run.primary:
                    _logger.warning(f'Nothing to train: the run is at epoch {run.start_epoch} of {run.end_epoch}')
                return _finish(run, run.plan.folder, None) if run.primary else 0
            with _run_folder(run) as folder:
                # W&B can still refuse here (it checks its login only when the run starts): still one line.
                loggers = create_epoch_loggers(args, folder.path.name) if run.primary else EpochLoggers()
                release()
                results = _train_epochs(run, folder if run.primary else None, loggers)
                code = _finish(run, folder, results) if run.primary else 0
            return code
        except NonFiniteLossError as e:
            release()
            _logger.error(str(e))
            return 1
        except KeyboardInterrupt:
            raise _stopped(folder, 'interrupted (Ctrl-C)', signal.SIGINT) from None
        except _Terminated:
            raise _stopped(folder, 'stopped by SIGTERM', signal.SIGTERM) from None
        finally:
            if args.distributed and dist.is_initialized():
                dist.destroy_process_group()


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point: bad input gives one line on stderr and exit code 2, no traceback; a run stopped by
    Ctrl-C or SIGTERM says where its last checkpoint is and exits with 130 / 143."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    # Under torchrun every process sees the error; one line from rank 0 is enough.
    report = os.environ.get('RANK', '0') == '0'
    try:
        with console_logging():
            return train(argv)
    except RunStopped as e:
        if report:
            print(f'train_tfkd.py: {e}', file=sys.stderr)
        return 128 + e.signal_number if e.signal_number else 1
    except TfKDError as e:
        if report:
            print(f'train_tfkd.py: error: {e}', file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    sys.exit(main())
