"""What Tf-KD costs: its losses and training steps against cross-entropy and timm's logit distillation.

Run from the repository root::

    python -m benchmarks.overhead                       # both sections, default sizes
    python -m benchmarks.overhead --section loss --steps 50 --markdown overhead.md
    python -m benchmarks.overhead --quick               # smoke test on tiny sizes
    python -m benchmarks.overhead --device cuda --amp-bf16

All configurations of a section are timed in one process, interleaved round-robin (one step of A, of B, of C,
then again), so a machine that speeds up or slows down mid-run moves every configuration alike; each row is the
median over the timed steps after warm-up. Peak memory (training-step section) is measured afterwards, with each
configuration run alone in a fresh process.
"""
import argparse
import contextlib
import datetime
import gc
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Callable, ContextManager, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.task import ClassificationTask, LogitDistillationTask

import timm_tfkd
from timm_tfkd import LabelSmoothingLoss, SelfDistillLoss, SelfTeacher, TfKDRegTask, TfKDSelfTask, VirtualTeacherLoss

MIN_STEPS = 20
MEMORY_STEPS = 3
MIXUP_LAMBDA = 0.7
LEARNING_RATE = 0.01


class ModelSpec(NamedTuple):
    """A timm architecture, its input size (C, H, W) and the batch size."""
    name: str
    input_size: Tuple[int, int, int]
    batch: int

    def __str__(self) -> str:
        return f"{self.name} {'x'.join(map(str, self.input_size))} b{self.batch}"


def parse_model_specs(text: str) -> Tuple[ModelSpec, ...]:
    """Parse ``name:CxHxW:batch[,name:CxHxW:batch...]``.

    Raises:
        argparse.ArgumentTypeError: An entry is malformed.
    """
    specs = []
    for entry in text.split(','):
        try:
            name, size, batch = entry.split(':')
            channels, height, width = (int(v) for v in size.split('x'))
            if min(channels, height, width, int(batch)) < 1:
                raise ValueError
            specs.append(ModelSpec(name, (channels, height, width), int(batch)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{entry}' is not name:CxHxW:batch, e.g. resnet18:3x32x32:128") from None
    return tuple(specs)


def parse_loss_sizes(text: str) -> Tuple[Tuple[int, int], ...]:
    """Parse ``BATCHxCLASSES[,BATCHxCLASSES...]``.

    Raises:
        argparse.ArgumentTypeError: An entry is malformed.
    """
    sizes = []
    for entry in text.split(','):
        try:
            batch, num_classes = (int(v) for v in entry.split('x'))
            if batch < 1 or num_classes < 2:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{entry}' is not BATCHxCLASSES (classes >= 2), e.g. 128x100") from None
        sizes.append((batch, num_classes))
    return tuple(sizes)


class RunDefaults(NamedTuple):
    """Defaults that ``--quick`` replaces; options given explicitly win over both."""
    steps: int
    warmup: int
    models: Tuple[ModelSpec, ...]
    loss_sizes: Tuple[Tuple[int, int], ...]
    threads: Optional[int]


FULL = RunDefaults(30, 5, parse_model_specs('resnet18:3x32x32:128,resnet50:3x64x64:64'),
                   parse_loss_sizes('128x100,256x1000'), threads=None)
# One thread: a smoke test on a busy machine otherwise loses minutes to its threads waiting for each other.
QUICK = RunDefaults(3, 1, parse_model_specs('test_resnet:3x16x16:8'), parse_loss_sizes('8x10'), threads=1)


@dataclass(frozen=True)
class Settings:
    """How to run: device, mixed precision, step counts, threads and the number of classes of the step section."""
    device: torch.device
    amp: bool
    steps: int
    warmup: int
    threads: Optional[int]
    num_classes: int

    def sync(self) -> None:
        """Wait for queued device work, so a timing covers the step and nothing after it."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


class Case(NamedTuple):
    """One configuration ready to time: a call of ``run`` is one step."""
    group: str
    name: str
    run: Callable[[], None]
    note: str = ''


class Summary(NamedTuple):
    median_ms: float
    iqr_ms: float


def summarize(seconds: Sequence[float]) -> Summary:
    """Median and interquartile range, in milliseconds, of at least two step times."""
    q1, _, q3 = statistics.quantiles(seconds, n=4, method='inclusive')
    return Summary(statistics.median(seconds) * 1e3, (q3 - q1) * 1e3)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector from firing inside whichever configuration happens to be running."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def time_round_robin(cases: Sequence[Case], steps: int, warmup: int,
                     sync: Callable[[], None]) -> Dict[Tuple[str, str], List[float]]:
    """Time every case, one step of each per round.

    Args:
        cases: The configurations.
        steps: Timed rounds.
        warmup: Untimed rounds first (allocator, caches, lazy initialization).
        sync: Waits for the device.

    Returns:
        Step times in seconds, by (group, name).
    """
    for _ in range(warmup):
        for case in cases:
            case.run()
    times: Dict[Tuple[str, str], List[float]] = {(case.group, case.name): [] for case in cases}
    with _gc_paused():
        for _ in range(steps):
            for case in cases:
                sync()
                start = time.perf_counter()
                case.run()
                sync()
                times[case.group, case.name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------------------------------
# Loss section


class LossInputs(NamedTuple):
    """Student logits (a leaf that takes gradients), class indices, mixup soft targets and teacher logits."""
    logits: torch.Tensor
    labels: torch.Tensor
    soft: torch.Tensor
    teacher_logits: torch.Tensor


def make_loss_inputs(batch: int, num_classes: int, device: torch.device) -> LossInputs:
    """Random inputs for one loss size; soft targets mix each sample's one-hot with its mirror's, as Mixup does."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(num_classes, (batch,), generator=generator)
    return LossInputs(
        logits=torch.randn(batch, num_classes, generator=generator).to(device).requires_grad_(),
        labels=labels.to(device),
        soft=mixup_target(labels, num_classes, lam=MIXUP_LAMBDA).to(device),
        teacher_logits=torch.randn(batch, num_classes, generator=generator).to(device),
    )


def reference_reg_loss(logits: torch.Tensor, labels: torch.Tensor, settings: VirtualTeacherLoss) -> torch.Tensor:
    """The Tf-KD-reg loss built the way the reference code builds it: the anchor for what that code costs.

    A dense teacher is filled with the wrong-class probability and the true-class probability is written into it one
    sample at a time; ``KLDivLoss()`` then averages over batch x K. The value equals ``settings`` (an ``official``
    :class:`VirtualTeacherLoss`), which :func:`check_reference_matches` verifies.

    Args:
        logits: Student logits (B, K).
        labels: Class indices (B,).
        settings: Supplies alpha, temperature, correct_prob and multiplier.
    """
    num_classes = logits.shape[1]
    teacher = torch.full_like(logits, (1.0 - settings.correct_prob) / (num_classes - 1))
    for i in range(logits.shape[0]):
        teacher[i, labels[i]] = settings.correct_prob
    soft_teacher = F.softmax(teacher / settings.temperature, dim=1)
    kd = nn.KLDivLoss()(F.log_softmax(logits, dim=1), soft_teacher) * settings.multiplier
    return (1.0 - settings.alpha) * F.cross_entropy(logits, labels) + settings.alpha * kd


class LossConfig(NamedTuple):
    name: str
    loss: Callable[[LossInputs], torch.Tensor]


# Spelled out rather than the classes' defaults, so the tables say what they measured.
REG_SETTINGS = dict(alpha=0.1, temperature=20.0, correct_prob=0.99, multiplier=1.0)
SELF_SETTINGS = dict(alpha=0.9, temperature=20.0, multiplier=1.0)
REG_PAPER = VirtualTeacherLoss(formula='paper', **REG_SETTINGS)
REG_OFFICIAL = VirtualTeacherLoss(formula='official', **REG_SETTINGS)
SELF_PAPER = SelfDistillLoss(formula='paper', **SELF_SETTINGS)
SMOOTHING = LabelSmoothingLoss(smoothing=0.1, convention='timm')
SOFT_TARGET_CE = SoftTargetCrossEntropy()

# The first entry is the anchor of the ratios.
LOSS_CONFIGS = (
    LossConfig('F.cross_entropy (indices)', lambda x: F.cross_entropy(x.logits, x.labels)),
    LossConfig('timm SoftTargetCrossEntropy (soft)', lambda x: SOFT_TARGET_CE(x.logits, x.soft)),
    LossConfig('reg reference construction (indices)', lambda x: reference_reg_loss(x.logits, x.labels, REG_OFFICIAL)),
    LossConfig('reg official (indices)', lambda x: REG_OFFICIAL(x.logits, x.labels)),
    LossConfig('reg official (soft)', lambda x: REG_OFFICIAL(x.logits, x.soft)),
    LossConfig('reg paper (indices)', lambda x: REG_PAPER(x.logits, x.labels)),
    LossConfig('reg paper (soft)', lambda x: REG_PAPER(x.logits, x.soft)),
    LossConfig('self paper (indices)', lambda x: SELF_PAPER(x.logits, x.teacher_logits, x.labels)),
    LossConfig('label smoothing (indices)', lambda x: SMOOTHING(x.logits, x.labels)),
)


def check_reference_matches(inputs: LossInputs) -> None:
    """Refuse to compare the reference construction with the fused loss unless they compute the same value."""
    torch.testing.assert_close(
        reference_reg_loss(inputs.logits, inputs.labels, REG_OFFICIAL), REG_OFFICIAL(inputs.logits, inputs.labels))


def loss_step(loss: Callable[[LossInputs], torch.Tensor], inputs: LossInputs) -> Callable[[], None]:
    """One forward and backward of ``loss``; the gradient is dropped so that steps do not accumulate into it."""
    def step() -> None:
        loss(inputs).backward()
        inputs.logits.grad = None
    return step


# ---------------------------------------------------------------------------------------------------------------------
# Training-step section


class Prepared(NamedTuple):
    """A built configuration: one call of ``run`` is one step; ``note`` goes to the table."""
    run: Callable[[], None]
    note: str = ''


@dataclass
class StepContext:
    """What the configurations of one model share: the batch, and the student and its optimizer.

    Sharing one student keeps the configurations' only difference the thing measured; step times do not depend on
    the weights. The student is built on first use, so a teacher-only configuration measured alone for memory does
    not pay for it.
    """
    spec: ModelSpec
    num_classes: int
    device: torch.device
    amp: bool
    input: torch.Tensor = field(init=False)
    target: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        batch = torch.randn(self.spec.batch, *self.spec.input_size, generator=generator).to(self.device)
        self.input = batch.contiguous(memory_format=torch.channels_last) if self.amp else batch
        self.target = torch.randint(self.num_classes, (self.spec.batch,), generator=generator).to(self.device)

    def _new_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = timm.create_model(
            self.spec.name, num_classes=self.num_classes, in_chans=self.spec.input_size[0], pretrained=False)
        return model.to(self.device)

    @cached_property
    def student(self) -> nn.Module:
        model = self._new_model(seed=0).train()
        return model.to(memory_format=torch.channels_last) if self.amp else model

    @cached_property
    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=LEARNING_RATE, momentum=0.9)

    def new_teacher_model(self) -> nn.Module:
        """A same-architecture teacher, with the same weights for every configuration that asks."""
        return self._new_model(seed=1).eval()

    def new_self_teacher(self) -> SelfTeacher:
        model = self.new_teacher_model()
        # Same architecture, same normalization: the teacher takes the student's input unchanged.
        return SelfTeacher(model, model.pretrained_cfg['mean'], model.pretrained_cfg['std']).to(self.device)

    def autocast(self) -> ContextManager:
        return torch.autocast('cuda', dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def train_step(self, task: nn.Module) -> Callable[[], None]:
        """Forward and loss through ``task``, backward, optimizer step and zero_grad, as timm's train loop does."""
        task.train()

        def step() -> None:
            with self.autocast():
                loss = task(self.input, self.target)['loss']
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return step


def relative_error(values: torch.Tensor, reference: torch.Tensor) -> float:
    """max |values - reference| / max |reference|."""
    return float((values - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def build_ce(ctx: StepContext) -> Prepared:
    task = ClassificationTask(ctx.student, nn.CrossEntropyLoss(), device=ctx.device, verbose=False)
    return Prepared(ctx.train_step(task))


def build_reg(ctx: StepContext) -> Prepared:
    task = TfKDRegTask(ctx.student, VirtualTeacherLoss(formula='paper', **REG_SETTINGS), device=ctx.device,
                       verbose=False)
    return Prepared(ctx.train_step(task))


def build_self(ctx: StepContext, channels_last: bool = False, fuse_bn: bool = False,
               dtype: str = 'float32') -> Prepared:
    """TfKDSelfTask with the teacher's speed-ups applied; the note is its logit error against the plain teacher."""
    teacher = ctx.new_self_teacher()
    plain_logits = teacher(ctx.input)
    teacher.speed_up(ctx.input, channels_last=channels_last, fuse_bn=fuse_bn, dtype=dtype)
    note = f'logit rel err {relative_error(teacher(ctx.input), plain_logits):.1e}'
    task = TfKDSelfTask(ctx.student, teacher, SelfDistillLoss(formula='paper', **SELF_SETTINGS), device=ctx.device,
                        verbose=False)
    return Prepared(ctx.train_step(task), note)


def build_timm_kd(ctx: StepContext) -> Prepared:
    """timm's LogitDistillationTask weighted like the self configurations: the same loss, computed timm's way."""
    task = LogitDistillationTask(
        ctx.student, ctx.new_teacher_model(), criterion=nn.CrossEntropyLoss(),
        task_loss_weight=1.0 - SELF_SETTINGS['alpha'], temperature=SELF_SETTINGS['temperature'], device=ctx.device,
        verbose=False)
    return Prepared(ctx.train_step(task))


def build_teacher_forward(ctx: StepContext) -> Prepared:
    """One forward of the plain fp32 teacher, as TfKDSelfTask runs it (inference mode)."""
    teacher = ctx.new_self_teacher()

    def forward() -> None:
        with ctx.autocast():
            teacher(ctx.input)
    return Prepared(forward)


class StepConfig(NamedTuple):
    name: str
    build: Callable[[StepContext], Prepared]


# The first entry is the anchor of the ratios; the floor row adds the anchor and the teacher forward.
STEP_CONFIGS = (
    StepConfig('CE (timm ClassificationTask)', build_ce),
    StepConfig('reg paper (TfKDRegTask)', build_reg),
    StepConfig('self (TfKDSelfTask), teacher plain', build_self),
    StepConfig('self, teacher channels_last', partial(build_self, channels_last=True)),
    StepConfig('self, teacher fuse_bn', partial(build_self, fuse_bn=True)),
    StepConfig('self, teacher channels_last+fuse_bn', partial(build_self, channels_last=True, fuse_bn=True)),
    StepConfig('self, teacher bfloat16', partial(build_self, dtype='bfloat16')),
    StepConfig('timm LogitDistillationTask', build_timm_kd),
    StepConfig('teacher forward only (plain fp32)', build_teacher_forward),
)
STEP_CONFIG_BY_NAME = {config.name: config for config in STEP_CONFIGS}
TEACHER_FORWARD = STEP_CONFIGS[-1].name
FLOOR = 'floor for self: CE + teacher forward'


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory, one fresh process per configuration


class MemoryRequest(NamedTuple):
    """Everything a fresh process needs to rebuild one step configuration."""
    spec: ModelSpec
    config: str
    num_classes: int
    device: str
    amp: bool
    threads: Optional[int]


def configure_torch(device: torch.device, threads: Optional[int]) -> None:
    """Thread count, and cuDNN autotuning as timm's train.py enables it."""
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    unit = 1 if sys.platform == 'darwin' else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2 ** 20


def peak_memory_mib(request: MemoryRequest) -> float:
    """Build one configuration in this fresh process, run it a few steps, and return its peak memory.

    CPU: how far the process's peak RSS rose above its value at start (student, optimizer state, teacher,
    activations and allocator slack). CUDA: the peak memory torch allocated.
    """
    device = torch.device(request.device)
    configure_torch(device, request.threads)
    start = _peak_rss_mib()
    ctx = StepContext(request.spec, request.num_classes, device, request.amp)
    prepared = STEP_CONFIG_BY_NAME[request.config].build(ctx)
    for _ in range(MEMORY_STEPS):
        prepared.run()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return _peak_rss_mib() - start


def _fresh_process_context() -> multiprocessing.context.BaseContext:
    """Processes that hold nothing from earlier configurations and need not import torch again.

    A forkserver is a clean interpreter that has only imported torch, timm and timm_tfkd; each child forked from it
    starts with no tensors, allocator caches or thread pools, which spawn would also give, at several seconds per
    child. (Preloading this module itself would make each child's re-import of it as ``__mp_main__`` warn.)
    """
    if 'forkserver' not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context('spawn')
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(['timm_tfkd'])
    return context


def measure_peak_memory(requests: Sequence[MemoryRequest]) -> List[float]:
    """Peak memory of each request, in MiB, each in its own process; one at a time, after all timing is done."""
    context = _fresh_process_context()
    peaks = []
    for request in requests:
        with context.Pool(1) as pool:
            peaks.append(pool.apply(peak_memory_mib, (request,)))
    return peaks


# ---------------------------------------------------------------------------------------------------------------------
# Tables


class Column(NamedTuple):
    header: str
    align: str  # '<' or '>'


@dataclass
class Table:
    title: str
    columns: Sequence[Column]
    rows: List[Sequence[str]]
    footnotes: Sequence[str]


def render_text(table: Table) -> str:
    """The table as aligned plain text."""
    widths = [max([len(column.header)] + [len(row[i]) for row in table.rows]) for i, column in enumerate(table.columns)]

    def line(cells: Sequence[str]) -> str:
        padded = (f'{cell:{column.align}{width}}' for cell, column, width in zip(cells, table.columns, widths))
        return '  '.join(padded).rstrip()

    lines = [table.title, line([c.header for c in table.columns]), '  '.join('-' * w for w in widths)]
    lines += [line(row) for row in table.rows]
    lines += [f'  {note}' for note in table.footnotes]
    return '\n'.join(lines)


def render_markdown(table: Table) -> str:
    """The table as GitHub markdown, footnotes below it."""
    rule = {'<': ':---', '>': '---:'}
    lines = [f'### {table.title}', '', '| ' + ' | '.join(c.header for c in table.columns) + ' |',
             '|' + '|'.join(rule[c.align] for c in table.columns) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in table.rows]
    lines += [''] + [f'- {note}' for note in table.footnotes]
    return '\n'.join(lines)


def _settings_text(settings: Dict[str, float]) -> str:
    return ', '.join(f'{key}={value:g}' for key, value in settings.items())


def _ms(value: float) -> str:
    return f'{value:.4g}'


def _ratio(value: float, anchor: float) -> str:
    return f'{value / anchor:.2f}'


def _timing_footnote(settings: Settings, anchor: str) -> str:
    return (f'median and interquartile range (IQR) of {settings.steps} timed steps per configuration after '
            f'{settings.warmup} untimed warm-up round(s), all configurations interleaved round-robin in one process; '
            f"ratio = median / median of '{anchor}' in the same group")


def loss_section(sizes: Sequence[Tuple[int, int]], settings: Settings) -> Table:
    """Time every loss configuration, forward + backward, at every batch x classes size."""
    cases = []
    with warnings.catch_warnings():
        # The reference construction's KLDivLoss() warns that 'mean' is not the batch mean; that is its point.
        warnings.filterwarnings('ignore', message="reduction: 'mean' divides", category=UserWarning)
        for batch, num_classes in sizes:
            inputs = make_loss_inputs(batch, num_classes, settings.device)
            check_reference_matches(inputs)
            cases += [Case(f'{batch}x{num_classes}', c.name, loss_step(c.loss, inputs)) for c in LOSS_CONFIGS]
        times = time_round_robin(cases, settings.steps, settings.warmup, settings.sync)
    summaries = {key: summarize(seconds) for key, seconds in times.items()}
    rows = []
    for (group, name), summary in summaries.items():
        anchor = summaries[group, LOSS_CONFIGS[0].name].median_ms
        rows.append([group, name, _ms(summary.median_ms), _ms(summary.iqr_ms), _ratio(summary.median_ms, anchor)])
    columns = [Column('B x K', '<'), Column('configuration', '<'), Column('median ms', '>'), Column('IQR ms', '>'),
               Column('ratio', '>')]
    footnotes = [
        _timing_footnote(settings, LOSS_CONFIGS[0].name),
        f'reg (both formulas): {_settings_text(REG_SETTINGS)}; self: {_settings_text(SELF_SETTINGS)}; '
        f'label smoothing: {SMOOTHING.extra_repr()}',
        f'float32 logits; soft = mixup targets (lambda {MIXUP_LAMBDA}); the reference construction (per-sample loop, '
        "dense teacher, KLDivLoss()) is checked to equal 'reg official (indices)'",
        'peak memory is measured for the training-step section only',
    ]
    return Table('Loss only: forward + backward', columns, rows, footnotes)


def _time_steps(specs: Sequence[ModelSpec], settings: Settings) -> Tuple[Dict[Tuple[str, str], List[float]],
                                                                           Dict[Tuple[str, str], str]]:
    """Step times and notes of every configuration of every model; the models are freed on return."""
    cases = []
    for spec in specs:
        ctx = StepContext(spec, settings.num_classes, settings.device, settings.amp)
        cases += [Case(str(spec), c.name, *c.build(ctx)) for c in STEP_CONFIGS]
    times = time_round_robin(cases, settings.steps, settings.warmup, settings.sync)
    return times, {(case.group, case.name): case.note for case in cases}


def step_section(specs: Sequence[ModelSpec], settings: Settings) -> Table:
    """Time every training-step configuration on every model, then measure their peak memory."""
    times, notes = _time_steps(specs, settings)
    requests = [MemoryRequest(spec, c.name, settings.num_classes, str(settings.device), settings.amp, settings.threads)
                for spec in specs for c in STEP_CONFIGS]
    peaks = dict(zip([(str(r.spec), r.config) for r in requests], measure_peak_memory(requests)))
    rows = []
    for spec in specs:
        group = str(spec)
        summaries = {c.name: summarize(times[group, c.name]) for c in STEP_CONFIGS}
        anchor = summaries[STEP_CONFIGS[0].name].median_ms
        for name, summary in summaries.items():
            rows.append([group, name, _ms(summary.median_ms), _ms(summary.iqr_ms), _ratio(summary.median_ms, anchor),
                         f'{spec.batch / summary.median_ms * 1e3:.0f}', f'{peaks[group, name]:.0f}',
                         notes[group, name]])
        floor = anchor + summaries[TEACHER_FORWARD].median_ms
        rows.append([group, FLOOR, _ms(floor), '-', _ratio(floor, anchor), f'{spec.batch / floor * 1e3:.0f}', '-',
                     ''])
    memory = 'peak CUDA MiB (allocated)' if settings.device.type == 'cuda' else 'peak RSS MiB (process)'
    columns = [Column('model', '<'), Column('configuration', '<'), Column('median ms', '>'), Column('IQR ms', '>'),
               Column('ratio', '>'), Column('img/s', '>'), Column(memory, '>'), Column('note', '<')]
    footnotes = [
        _timing_footnote(settings, STEP_CONFIGS[0].name),
        'step = forward, loss, backward, SGD step, zero_grad; teachers have the student architecture, random weights, '
        f'{settings.num_classes} classes; reg (paper): {_settings_text(REG_SETTINGS)}; '
        f'self (paper) and timm KD: {_settings_text(SELF_SETTINGS)}',
        f"'{FLOOR}' adds the two medians: what self costs if the distillation itself were free",
        f'{memory}: each configuration alone for {MEMORY_STEPS} steps in a fresh process (forked from a clean server '
        'that only imported the modules); CPU: rise of peak RSS (ru_maxrss) from the process start (student, '
        'optimizer, teacher, activations, allocator slack); CUDA: torch.cuda.max_memory_allocated',
        'note: max |logits - plain fp32 logits| / max |plain fp32 logits| of the sped-up teacher',
    ]
    return Table('Training step through timm tasks', columns, rows, footnotes)


def e2e_section(data_dir: str, timm_train: Optional[str], rounds: int) -> Table:
    """Throughput of whole training processes: timm's train.py (anchor, when given) and train_tfkd.py."""
    from .end_to_end import e2e_rows
    rows, notes = e2e_rows(data_dir, timm_train, rounds=rounds)
    anchor = rows[0][1]
    columns = [Column('configuration', '<'), Column('step ms', '>'), Column('ratio', '>'), Column('img/s', '>'),
               Column('img/s ratio', '>')]
    body = [[name, _ms(seconds * 1e3), _ratio(seconds, anchor), f'{rate:.0f}', f'{rate / rows[0][2]:.3f}']
            for name, seconds, rate in rows]
    return Table('End to end: training processes', columns, body, notes + [f"ratios against '{rows[0][0]}'"])


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as cpuinfo:
        for line in cpuinfo:
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(settings: Settings) -> str:
    """Where and with what the numbers were taken, and how busy the machine was at the end."""
    parts = [f'machine: {_cpu_model()}', f'{os.cpu_count()} logical cores', f'torch threads {torch.get_num_threads()}']
    if settings.device.type == 'cuda':
        precision = 'autocast bf16 + channels_last' if settings.amp else 'fp32'
        parts.append(f'GPU {torch.cuda.get_device_name(settings.device)} ({precision})')
    load = '/'.join(f'{v:.1f}' for v in os.getloadavg())
    parts += [f'load avg {load} (1/5/15 min)', f'python {platform.python_version()}', f'torch {torch.__version__}',
              f'timm {timm.__version__}', f'timm_tfkd {timm_tfkd.__version__}',
              datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')]
    return ' | '.join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {value}')
        return value
    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the options, filling the defaults that depend on ``--quick``."""
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.overhead', description=__doc__.split('\n\n')[0])
    parser.add_argument('--section', choices=('loss', 'step', 'all', 'e2e'), default='all',
                        help='what to time; all = loss + step; e2e = training processes, needs --data-dir [all]')
    parser.add_argument('--steps', type=_int_at_least(2), default=None,
                        help=f'timed steps per configuration [{FULL.steps}; {QUICK.steps} with --quick; '
                             f'at least {MIN_STEPS} unless --quick]')
    parser.add_argument('--warmup', type=_int_at_least(0), default=None,
                        help=f'untimed rounds first [{FULL.warmup}; {QUICK.warmup} with --quick]')
    parser.add_argument('--models', type=parse_model_specs, default=None,
                        help='step section: name:CxHxW:batch, comma-separated '
                             '[resnet18:3x32x32:128,resnet50:3x64x64:64; test_resnet:3x16x16:8 with --quick]')
    parser.add_argument('--loss-sizes', type=parse_loss_sizes, default=None,
                        help='loss section: BATCHxCLASSES, comma-separated [128x100,256x1000; 8x10 with --quick]')
    parser.add_argument('--num-classes', type=_int_at_least(2), default=100, help='classes of the step section [100]')
    parser.add_argument('--threads', type=_int_at_least(1), default=None,
                        help="torch.set_num_threads [torch's default; 1 with --quick]")
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu', help='[cpu]')
    parser.add_argument('--amp-bf16', action='store_true',
                        help='CUDA only: steps under bfloat16 autocast, student and input channels_last')
    parser.add_argument('--quick', action='store_true', help='smoke test: tiny sizes, few steps; numbers mean nothing')
    parser.add_argument('--markdown', metavar='FILE', help='also write the tables as markdown to FILE')
    parser.add_argument('--data-dir', metavar='DIR', help='e2e: image folder with a train split')
    parser.add_argument('--timm-train', metavar='PATH', help="e2e: timm's train.py from a checkout (row skipped without)")
    parser.add_argument('--e2e-rounds', type=_int_at_least(1), default=3, help='e2e: interleaved rounds [3]')
    args = parser.parse_args(argv)
    if args.section == 'e2e' and not args.data_dir:
        parser.error('--section e2e needs --data-dir')
    for name, value in (QUICK if args.quick else FULL)._asdict().items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.quick and args.steps < MIN_STEPS:
        parser.error(f'--steps must be at least {MIN_STEPS} for meaningful medians (or use --quick)')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available')
    if args.amp_bf16 and args.device != 'cuda':
        parser.error('--amp-bf16 needs --device cuda')
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    settings = Settings(torch.device(args.device), args.amp_bf16, args.steps, args.warmup, args.threads,
                        args.num_classes)
    configure_torch(settings.device, settings.threads)
    sections = {'loss': partial(loss_section, args.loss_sizes, settings),
                'step': partial(step_section, args.models, settings),
                'e2e': partial(e2e_section, args.data_dir, args.timm_train, args.e2e_rounds)}
    tables = []
    for name, run in sections.items():
        if args.section == name or (args.section == 'all' and name != 'e2e'):
            tables.append(run())
            print(render_text(tables[-1]) + '\n', flush=True)
    footer = machine_line(settings)
    print(footer)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write('\n\n'.join(render_markdown(t) for t in tables) + f'\n\n{footer}\n')


if __name__ == '__main__':
    main()
