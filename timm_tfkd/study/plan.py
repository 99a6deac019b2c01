"""The study's plan: its modes, every run it needs in the order they must train, and the check of all their command
lines before the first one starts."""
import contextlib
import io
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from ..errors import StudyError, UsageError
from ..run_folder import LAST_CHECKPOINT, milestone_checkpoint
from ..train.config import parse_args
from ..train.policy import check_config, check_smoothing, resolve_smoothing

DEFAULT_MODES_FILE = Path(__file__).with_name('modes.yaml')
TEACHER_KINDS = ('self', 'defective', 'weak')
TEACHER_DESCRIPTIONS = {
    'self': 'the {teachers} run of the same seed, final epoch',
    'defective': 'the {teachers} run of the same seed after its first epoch',
    'weak': 'the --weak-model trained with the {teachers} flags, final epoch',
}
# The defective teacher: a snapshot of the teachers' run after this many epochs of its full schedule.
DEFECTIVE_EPOCHS = 1
# Flags the study sets for every run; in --extra or a mode's flags they would silently break the design.
STUDY_FLAGS = ('--data-dir', '--model', '--epochs', '--seed', '--output', '--experiment', '--train-split',
               '--val-split', '--resume', '--device', '--tfkd-teacher-checkpoint', '--tfkd-teacher-model')
SPLITS = ('train', 'validation', 'test')
# A trainer hung on a dead device or a deadlocked loader must not stall the study forever.
DEFAULT_RUN_TIMEOUT = 24 * 3600


@dataclass
class StudyConfig:
    """The modes a study can run.

    Attributes:
        modes: Mode name -> ``flags`` (trainer flags as one string) and optionally ``teacher`` (a teacher kind).
        teachers_mode: The mode whose runs are the ``self`` and ``defective`` teachers.
        defaults: The modes run when none are named.
    """
    modes: Dict[str, Dict[str, str]]
    teachers_mode: str
    defaults: Tuple[str, ...] = ()


def _read_yaml(path: str) -> Mapping:
    try:
        with open(path, encoding='utf-8') as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise StudyError(f"cannot read study config '{path}': {' '.join(str(e).split())}") from None


def _modes(entries: object, path: str) -> Dict[str, Dict[str, str]]:
    if not isinstance(entries, dict) or not all(isinstance(v, dict) and 'flags' in v for v in entries.values()):
        raise StudyError(f"{path}: expected a mapping 'mode: {{flags: ..., teacher: ...}}'")
    return {str(name): {k: str(v) for k, v in entry.items() if v is not None and k != 'default'}
            for name, entry in entries.items()}


def load_config(path: Optional[str]) -> StudyConfig:
    """The default modes (``modes.yaml`` beside this module), updated with a YAML file of modes of the same layout
    (``mode: {flags: ..., teacher: ...}``)."""
    default = _read_yaml(str(DEFAULT_MODES_FILE))
    config = StudyConfig(_modes(default['modes'], str(DEFAULT_MODES_FILE)), default['teachers_mode'],
                         tuple(name for name, entry in default['modes'].items() if entry.get('default')))
    if path:
        config.modes.update(_modes(_read_yaml(path), path))
    return config


@dataclass(frozen=True)
class TeacherRef:
    """The teacher of a student run: a run of the study and the checkpoint file in its folder."""
    run: str
    checkpoint: str
    model: str


@dataclass(frozen=True)
class Run:
    """One trainer invocation of the study.

    Attributes:
        name: Folder name under ``OUT/runs`` and log name under ``OUT/logs``.
        mode: The study mode whose flags it uses.
        seed: Its seed.
        model: The timm architecture.
        epochs: Length of its schedule; ``summary.csv`` must reach it.
        flags: Trainer flags (extra flags, then the mode's), without the study's own.
        teacher: Where its teacher comes from, for a mode that learns from one.
    """
    name: str
    mode: str
    seed: int
    model: str
    epochs: int
    flags: Tuple[str, ...]
    teacher: Optional[TeacherRef] = None


@dataclass
class Study:
    """Where the study writes and what every run shares."""
    data_dir: str
    out: Path
    device: Optional[str]
    eval_workers: int
    run_timeout: Optional[float] = DEFAULT_RUN_TIMEOUT

    @property
    def runs_dir(self) -> Path:
        return self.out / 'runs'

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name

    def log_path(self, name: str) -> Path:
        return self.out / 'logs' / f'{name}.log'


def _check_config(config: StudyConfig, modes: Sequence[str], extra: List[str]) -> None:
    unknown = [mode for mode in modes if mode not in config.modes]
    if unknown:
        raise StudyError(f"unknown mode(s) {', '.join(unknown)}; the config has {', '.join(config.modes)}")
    if config.teachers_mode not in config.modes:
        raise StudyError(f"the config needs its teachers' mode '{config.teachers_mode}': its runs are the teachers")
    for mode in modes:
        teacher = config.modes[mode].get('teacher')
        if teacher is not None and teacher not in TEACHER_KINDS:
            raise StudyError(f"mode {mode}: teacher must be one of {', '.join(TEACHER_KINDS)}, got '{teacher}'")
    for source, flags in [('--extra', extra)] + [(f'mode {m}', shlex.split(config.modes[m]['flags'])) for m in modes]:
        clash = [flag for flag in flags if flag.split('=')[0] in STUDY_FLAGS]
        if clash:
            raise StudyError(f"{source} sets {', '.join(clash)}, which the study sets for every run")


def run_name(mode: str, seed: int) -> str:
    return f'{mode}-s{seed}'


def _teachers_run(seed: int, model: str, epochs: int, extra: List[str], config: StudyConfig) -> Run:
    """The run of the teachers' mode for the seed: a reported mode, and the self and defective teachers (the
    defective one a snapshot of this very run, kept by ``--save-epochs``)."""
    mode = config.teachers_mode
    flags = extra + shlex.split(config.modes[mode]['flags']) + ['--save-epochs', str(DEFECTIVE_EPOCHS)]
    return Run(run_name(mode, seed), mode, seed, model, epochs, tuple(flags))


def _weak_run(seed: int, weak_model: str, epochs: int, extra: List[str], config: StudyConfig) -> Run:
    mode = config.teachers_mode
    flags = extra + shlex.split(config.modes[mode]['flags'])
    return Run(run_name(f'{mode}-{weak_model}', seed), mode, seed, weak_model, epochs, tuple(flags))


def _teacher(kind: str, seed: int, model: str, weak_model: str, epochs: int, extra: List[str],
             config: StudyConfig) -> Tuple[Run, TeacherRef]:
    """The run a student with a ``kind`` teacher learns from, and which of its checkpoints."""
    if kind == 'weak':
        run = _weak_run(seed, weak_model, epochs, extra, config)
    else:
        run = _teachers_run(seed, model, epochs, extra, config)
    checkpoint = milestone_checkpoint(DEFECTIVE_EPOCHS) if kind == 'defective' else LAST_CHECKPOINT
    return run, TeacherRef(run.name, checkpoint, run.model)


def plan_runs(modes: Sequence[str], seeds: Sequence[int], model: str, weak_model: str, epochs: int,
              extra: List[str], config: StudyConfig) -> List[Run]:
    """Every run in the order it must train: seed by seed, each teacher just before its first student.

    Returns:
        Runs with unique names; a teacher that is also a reported mode (the teachers' mode) appears once.
    """
    _check_config(config, modes, extra)
    plan: Dict[str, Run] = {}
    for seed in seeds:
        for mode in modes:
            kind = config.modes[mode].get('teacher')
            teacher = None
            if kind is not None:
                teacher_run, teacher = _teacher(kind, seed, model, weak_model, epochs, extra, config)
                plan.setdefault(teacher_run.name, teacher_run)
            if mode == config.teachers_mode:
                run = _teachers_run(seed, model, epochs, extra, config)
            else:
                run = Run(run_name(mode, seed), mode, seed, model, epochs,
                          tuple(extra + shlex.split(config.modes[mode]['flags'])), teacher)
            plan.setdefault(run.name, run)
    return list(plan.values())


def trainer_argv(run: Run, study: Study) -> List[str]:
    """The trainer's flags for ``run``; the study's own come last so nothing in ``--extra`` overrides them."""
    argv = list(run.flags)
    if run.teacher is not None:
        argv += ['--tfkd-teacher-model', run.teacher.model,
                 '--tfkd-teacher-checkpoint', str(study.run_dir(run.teacher.run) / run.teacher.checkpoint)]
    argv += ['--data-dir', study.data_dir, '--train-split', 'train', '--val-split', 'validation',
             '--model', run.model, '--epochs', str(run.epochs), '--seed', str(run.seed),
             '--output', str(study.runs_dir), '--experiment', run.name]
    if study.device:
        argv += ['--device', study.device]
    return argv


def check_plan(plan: List[Run], study: Study) -> List[str]:
    """Parse every run's command with the trainer's own parser now, not hours into the study.

    Returns:
        Warnings: a defective teacher whose first epoch would be spent entirely in warmup.

    Raises:
        StudyError: A split folder is missing, or the trainer refuses a run's flags.
    """
    for split in SPLITS:
        if not os.path.isdir(os.path.join(study.data_dir, split)):
            raise StudyError(f"--data-dir '{study.data_dir}' has no '{split}' split folder (needs "
                             f"{', '.join(SPLITS)}; see `timm-tfkd fashion-mnist`)")
    defective_sources = {r.teacher.run for r in plan
                         if r.teacher and r.teacher.checkpoint == milestone_checkpoint(DEFECTIVE_EPOCHS)}
    warnings = []
    for run in plan:
        message = io.StringIO()
        try:
            with contextlib.redirect_stderr(message):  # the trainer's parser writes its one error line and exits
                command_line = parse_args(trainer_argv(run, study))
            args = command_line.args
            check_config(args, command_line.explicit)
            check_smoothing(args, resolve_smoothing(args, command_line.explicit)[0])
        except SystemExit:
            reason = message.getvalue().strip().partition(': error: ')[2] or message.getvalue().strip()
            raise StudyError(f'run {run.name}: the trainer refuses its flags: {reason}') from None
        except UsageError as e:
            raise StudyError(f'run {run.name}: {e}') from None
        # timm steps a warmup per epoch unless --sched-on-updates: the first epoch then trains at --warmup-lr only.
        if run.name in defective_sources and args.warmup_epochs >= DEFECTIVE_EPOCHS and not args.sched_on_updates:
            warnings.append(
                f'the defective teacher is {run.name} after epoch {DEFECTIVE_EPOCHS}, which --warmup-epochs '
                f'{args.warmup_epochs} without --sched-on-updates trains at lr {args.warmup_lr:g} only: it is almost '
                f'the random initialisation. Add --sched-on-updates (warmup per iteration) or --warmup-epochs 0.')
    return warnings
