"""The errors timm-tfkd raises on purpose: one base class, one class per kind of problem.

Every message is one line meant for the user. Library code only raises them; the command lines
(``train_tfkd.py``, ``timm-tfkd``) print the message and choose the exit status: 1 for an upload that failed or a
run that diverged (the results on disk are intact), 2 for everything caused by the input.
"""


class TfKDError(Exception):
    """Base class of every error timm-tfkd raises on purpose."""


class UsageError(TfKDError, ValueError):
    """A flag, a combination of flags or an input (data, folder, file) that cannot work."""


class CheckpointError(TfKDError, ValueError):
    """A checkpoint is missing, unreadable, unsafe or of the wrong shape."""


class TeacherError(TfKDError, ValueError):
    """The teacher cannot be built or does not fit the student."""


class RunFolderError(TfKDError, ValueError):
    """A training run folder is missing, incomplete or cannot be used as asked."""


class ExportError(TfKDError, ValueError):
    """A training run or an export folder cannot be exported or uploaded as asked."""


class InvalidRepoIdError(TfKDError, ValueError):
    """A Hub model id is not of the form ``org/name``."""


class EvaluationError(TfKDError, ValueError):
    """A run folder, checkpoint or split cannot be evaluated as asked."""


class StudyError(TfKDError, ValueError):
    """A study cannot start as asked."""


class StudyRunFailed(TfKDError, RuntimeError):
    """One run of a study did not train or cannot be scored; the study goes on with the others."""


class NonFiniteLossError(TfKDError, RuntimeError):
    """The training loss became NaN or infinite; the last checkpoint on disk is intact."""


class HubUploadError(TfKDError, RuntimeError):
    """An upload to the Hub failed; the export is still on disk.

    Attributes:
        folder: The export folder that was being uploaded.
        repo_id: The target Hub model id.
        retry_command: The shell command that retries the upload.
    """

    def __init__(self, message: str, folder, repo_id: str, retry_command: str):
        super().__init__(message)
        self.folder = folder
        self.repo_id = repo_id
        self.retry_command = retry_command


class RunStopped(TfKDError):
    """Training stopped part way by a signal or a fault (e.g. a full disk); the run folder holds its last good
    checkpoint and the message says how to resume.

    Attributes:
        signal_number: The signal that stopped it (SIGINT, SIGTERM), or None for a fault.
    """

    def __init__(self, message: str, signal_number=None):
        super().__init__(message)
        self.signal_number = signal_number
