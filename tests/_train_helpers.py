"""Helpers shared by the end-to-end trainer tests (test_train_*.py): tiny runs in-process or as subprocesses, and
the trainer's data and task as a run builds them.

The trainer's internal names are imported here and nowhere else in the tests, so a move of the package's modules
means updating this file only.
"""
import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import timm
import torch
import torch.nn as nn
from timm.task import TrainingTask

import timm_tfkd.train.setup as trainer_setup
from timm_tfkd.checkpoint_io import read_checkpoint
from timm_tfkd.data_config import resolve_student_data_config
from timm_tfkd.methods import get_method
from timm_tfkd.train.build import create_student, create_task
from timm_tfkd.train.config import parse_args
from timm_tfkd.train.data import mixup_settings
from timm_tfkd.train.policy import check_smoothing, check_supported, mixup_smoothing, resolve_smoothing
from timm_tfkd.train.main import main

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = 'train_tfkd.py'
CONSOLE_SCRIPT = Path(sys.executable).parent / 'timm-tfkd-train'

# Every run writes these (checkpoint-N files depend on the epochs).
RUN_FILES = ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'run_info.json')
SUMMARY_COLUMNS = ('epoch', 'train_loss', 'train_task_loss', 'train_kd_loss', 'eval_loss', 'eval_top1',
                   'eval_top5', 'eval_nll', 'eval_ece', 'lr')


def tiny_args(data_dir, output, experiment, *extra, model: str = 'test_resnet', epochs: int = 1,
              num_classes: int = 3, img_size: int = 16, batch_size: int = 8) -> List[str]:
    """The flags of a tiny CPU run (no warmup, a fixed learning rate, no loader workers), plus ``extra``."""
    return [
        '--data-dir', str(data_dir), '--model', model, '--num-classes', str(num_classes),
        '--img-size', str(img_size), '-b', str(batch_size), '--epochs', str(epochs), '-j', '0',
        '--lr', '0.05', '--warmup-epochs', '0', '--log-interval', '1000',
        '--output', str(output), '--experiment', experiment, *map(str, extra),
    ]


def call_main(argv: Sequence[str]) -> int:
    """``main(argv)`` in this process, turning argparse's ``SystemExit`` into its exit code."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def train_in_process(argv: Sequence[str]) -> Path:
    """Run ``main`` in-process, check it succeeded, return the run folder."""
    code = call_main(argv)
    assert code == 0, f'main() returned {code} for {list(argv)}'
    return run_dir_of(argv)


def once_per_key(build: Callable[[Any], Any], key: Callable[[Any], Any] = lambda item: item) -> Callable[[Any], Any]:
    """``build(item)`` at most once per ``key(item)``, for module-scoped fixtures that hand out runs on demand.

    A failure is remembered too: the tests sharing a broken run all fail with its error, instead of each training
    it again (into a suffixed folder, since the first attempt left the run folder behind).
    """
    results: Dict[Any, Any] = {}

    def get(item: Any) -> Any:
        if key(item) not in results:
            try:
                results[key(item)] = build(item)
            except Exception as e:
                results[key(item)] = e
        if isinstance(results[key(item)], Exception):
            raise results[key(item)]
        return results[key(item)]
    return get


def run_dir_of(argv: Sequence[str]) -> Path:
    argv = [str(a) for a in argv]
    return Path(argv[argv.index('--output') + 1]) / argv[argv.index('--experiment') + 1]


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('CUDA_VISIBLE_DEVICES', None)
    return env


def run_subprocess(command: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command from the repository root with one CPU thread per process; text output captured."""
    return subprocess.run([str(c) for c in command], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def sigkill_when(argv: Sequence[str], ready: Callable[[], bool], what: str, log_path: Path,
                 timeout: float = 180) -> None:
    """Run the training script on ``argv`` and SIGKILL it (nothing closed, nothing flushed) as soon as ``ready()``
    holds; fail when it ends first or ``what`` has not happened within ``timeout`` seconds. Its output goes to
    ``log_path``, shown on failure."""
    with open(log_path, 'w') as log:
        process = subprocess.Popen(script_command(argv), cwd=REPO_ROOT, env=subprocess_env(), stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert process.poll() is None, f'the run ended ({process.returncode}) first:\n{log_path.read_text()}'
                assert time.monotonic() < deadline, f'no {what} within {timeout:g} s:\n{log_path.read_text()}'
                time.sleep(0.02)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f'the run finished before the kill:\n{log_path.read_text()}'


def script_command(argv: Sequence[str]) -> List[str]:
    """``python train_tfkd.py ARGV`` as a subprocess command."""
    return [sys.executable, TRAIN_SCRIPT, *map(str, argv)]


def read_summary(run_dir: Path) -> List[Dict[str, float]]:
    """The rows of ``summary.csv`` as floats (epoch as int)."""
    with open(run_dir / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == 'epoch' else float(v)) for k, v in row.items()} for row in rows]


def summary_columns(run_dir: Path) -> List[str]:
    with open(run_dir / 'summary.csv', newline='') as f:
        return next(csv.reader(f))


def read_run_info(run_dir: Path) -> Dict:
    with open(run_dir / 'run_info.json') as f:
        return json.load(f)


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """The model weights of a training checkpoint, read the safe way."""
    return read_checkpoint(str(path))['state_dict']


def assert_state_dicts_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


def assert_nested_equal(a, b, where='') -> None:
    """Equal checkpoint entries: tensors bit for bit, containers item by item."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f'tensors differ at {where}'
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_nested_equal(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{a!r} != {b!r} at {where}'


def assert_run_files(run_dir: Path, epochs: int, extra: Optional[Sequence[str]] = ()) -> None:
    """The standard files of a finished run, one summary row per epoch in order."""
    assert run_dir.is_dir(), f'no run folder {run_dir}'
    for name in (*RUN_FILES, *extra):
        assert (run_dir / name).is_file(), f'{name} missing in {sorted(os.listdir(run_dir))}'
    assert [row['epoch'] for row in read_summary(run_dir)] == list(range(epochs))
    assert set(SUMMARY_COLUMNS) <= set(summary_columns(run_dir))
    assert not (run_dir / 'tmp.pth.tar').exists()
    checkpoint = read_checkpoint(str(run_dir / 'last.pth.tar'))
    assert checkpoint['epoch'] == epochs - 1


def use_offline_wandb(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """W&B offline and quiet (no network, no login), its runs under ``root/wandb``, for this process and the
    subprocesses it starts. W&B reads these settings once per service: call ``wandb.teardown()`` after the test."""
    root.mkdir(parents=True, exist_ok=True)
    for key, value in {'WANDB_MODE': 'offline', 'WANDB_DIR': root, 'WANDB_SILENT': 'true',
                       'WANDB_CONFIG_DIR': root / 'config', 'WANDB_CACHE_DIR': root / 'cache',
                       'WANDB_ERROR_REPORTING': 'false', 'WANDB_DISABLE_GIT': 'true'}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    return root


def wandb_records(root: Path) -> List[Dict[str, Any]]:
    """The records of the one offline W&B run under ``root`` (see :func:`use_offline_wandb`), decoded by wandb's own
    reader of its ``.wandb`` transaction log (``wandb leet inspect --json``)."""
    files = sorted(root.glob('wandb/offline-run-*/run-*.wandb'))
    assert len(files) == 1, files
    result = run_subprocess([sys.executable, '-m', 'wandb', 'leet', 'inspect', '--json', files[0]], timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def tensorboard_scalars(log_dir: Path) -> Dict[str, Dict[int, float]]:
    """Every scalar of the TensorBoard event files in ``log_dir``, read by TensorBoard's own reader: tag -> {step:
    value}."""
    # Imported here: TensorBoard takes seconds to import and most trainer tests do not need it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(log_dir), size_guidance={'scalars': 0})
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()['scalars']}


def build_task(argv: Sequence[str], device: str = 'cpu') -> Tuple[argparse.Namespace, TrainingTask]:
    """The task the trainer builds for a command line, through the trainer's own steps: parse (YAML and flags),
    what was set explicitly, the usage checks, the smoothing policy, the student, then the task builder. No data
    is read and nothing is written."""
    command_line = parse_args([str(a) for a in argv])
    args = command_line.args
    check_supported(args)
    model = create_student(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    get_method(args.tfkd_mode).check(args, num_classes=args.num_classes)
    data_config = resolve_student_data_config(vars(args), model)
    smoothing, _ = resolve_smoothing(args, command_line.explicit)
    check_smoothing(args, smoothing)
    folded = mixup_smoothing(args, smoothing) if mixup_settings(args, 0.0) is not None else None
    task = create_task(args, model, smoothing, folded, data_config, None, torch.device(device), None,
                       verbose=False)
    return args, task


class _Built(Exception):
    """Stops ``main`` once its training data and task exist."""


def build_in_trainer(argv: Sequence[str]) -> Tuple[Any, TrainingTask]:
    """Run the real ``main(argv)`` until it has built its training data and its task; return both.

    main's own builders do all the work; they are only wrapped to keep what they return, and the run stops right
    after the task exists (no optimizer, no output folder). Unlike calling the builders directly, this covers what
    main decides between parsing and building (which smoothing goes into the loss and which into Mixup).

    Returns:
        The ``TrainData`` (loaders and Mixup) and the task.
    """
    built: Dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, stop in (('create_train_data', False), ('create_task', True)):
            patch.setattr(trainer_setup, name, _keeping(getattr(trainer_setup, name), name, built, stop))
        try:
            code = call_main(argv)
        except _Built:
            return built['create_train_data'], built['create_task']
    raise AssertionError(f'main() returned {code} before building its task for {list(map(str, argv))}')


def _keeping(real, name: str, built: Dict[str, Any], stop: bool):
    def spy(*args: Any, **kwargs: Any) -> Any:
        built[name] = real(*args, **kwargs)
        if stop:
            raise _Built
        return built[name]
    return spy


class FixedLogits(nn.Module):
    """Stands in for the student's forward: the loss sees exactly the test's logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def random_network(name: str, num_classes: int, seed: int) -> nn.Module:
    """A timm network in eval mode whose batch norms have non-trivial running statistics (a teacher left in train
    mode would differ) and whose logits are spread like a trained model's."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, pretrained=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
        model.get_classifier().weight.mul_(20.0)
    return model.eval()
