"""A seeded teacher-free KD study, ``timm-tfkd study``: every mode x seed trained with the Tf-KD trainer, the final
epoch scored once on a held-out ``test`` split, mean ± sample std per mode.

The data folder needs ``train``, ``validation`` (carved from the training data) and ``test`` splits, as
``timm-tfkd fashion-mnist OUT`` writes them. Runs validate on ``validation``, where any choice of settings must be
made; ``test`` is scored once per run, on the final epoch (``last.pth.tar``), never on a best epoch.

Teachers are runs of the study too, trained just before the first student that needs them (``modes.yaml``):

- ``self`` (Tf-KD-self): the run of the teachers' mode (``ce``, plain cross-entropy) of the same seed and
  architecture, its final epoch.
- ``defective`` (defective KD): the same run after its first epoch (``milestone-1.pth.tar``, kept by
  ``--save-epochs 1``), a teacher stopped after one epoch of the full schedule.
- ``weak`` (reversed KD): ``--weak-model`` trained with the teachers' mode flags, final epoch.

Rerunning the same command skips finished runs (trained to the end and ``study_result.json`` written), resumes
unfinished ones with ``--resume auto`` and rewrites ``results.md``, ``results.csv`` (per mode), ``runs.csv`` (per
run) and ``results.png``. A failed run is reported with its log file and the others go on; a run still training
after ``--run-timeout`` seconds is stopped and counts as failed.
"""
from .command import DESCRIPTION, add_study_arguments, run_all, run_study
from .plan import (
    DEFAULT_RUN_TIMEOUT, TEACHER_KINDS, Run, Study, StudyConfig, TeacherRef, check_plan, load_config, plan_runs,
    trainer_argv,
)
from .report import collect_rows, mean_std, summarize, write_reports
from .runs import RESULT_FILE, TRAINER_COMMAND, is_finished, score, train, training_complete

__all__ = [
    'DEFAULT_RUN_TIMEOUT', 'DESCRIPTION', 'RESULT_FILE', 'TEACHER_KINDS', 'TRAINER_COMMAND', 'Run', 'Study',
    'StudyConfig', 'TeacherRef', 'add_study_arguments', 'check_plan', 'collect_rows', 'is_finished', 'load_config',
    'mean_std', 'plan_runs', 'run_all', 'run_study', 'score', 'summarize', 'train', 'trainer_argv',
    'training_complete', 'write_reports',
]
