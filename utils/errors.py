"""The errors a user can cause, in one hierarchy: main.py reports any `UserError` as one line,
`error: <message>`, and exits with status 2; the tools do the same with their own prefix.

A user error is something the user can fix by changing a path, a file, an option or the machine:
the message names the thing and the fix, and a traceback would only hide it. Bugs stay ordinary
exceptions (with their traceback). Each class below is raised by the module named in its docstring
and by no other; a caller that needs to tell them apart catches the subclass.

Not here: `utils.resume.Preempted` (a stop on a signal after saving, not an error: exit 128 +
the signal number), and the models package's own errors (`models.weights` raises ValueError,
FileNotFoundError and UnsafeFileError; it does not depend on utils/, so utils wraps them in
ModelError or CheckpointError where they reach a user).
"""

__all__ = ['UserError', 'OptionError', 'DatasetError', 'BadImageError', 'UnreadableDatasetError', 'CheckpointError',
           'CheckpointWriteError', 'OutputDirError', 'RunDirBusyError', 'DeviceError', 'AmpError', 'ModelError',
           'NonFiniteLossError', 'NonFiniteStateError', 'LaunchOptionError']


class UserError(Exception):
    """Base of the errors a user can cause and fix; the message says what to change."""


class OptionError(UserError):
    """A value from a config file or a checkpoint does not follow its option's rule (utils.options)."""


class DatasetError(UserError):
    """The dataset folder is missing, laid out wrongly or unusable (utils.data)."""


class BadImageError(UserError):
    """A file that cannot be used as a training or validation image (utils.images)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # travels from a DataLoader worker to the main process (utils.images.Sample.error)
        return type(self), (self.path, self.reason)


class UnreadableDatasetError(BadImageError):
    """So many files cannot be read (a long run of them, or a whole split) that the dataset or the disk,
    not a file, is broken. `path` is the folder (utils.images, utils.engine)."""


class CheckpointError(UserError):
    """A checkpoint or weights file is missing, unreadable, or does not fit the run or model
    (utils.checkpoint, utils.resume, utils.inference)."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, lost permissions); the previous file is kept
    (utils.checkpoint)."""


class OutputDirError(UserError):
    """The run directory cannot hold the run's files (utils.checkpoint)."""


class RunDirBusyError(OutputDirError):
    """Another run holds the run directory (utils.checkpoint.RunDirLock)."""


class DeviceError(UserError):
    """The requested device cannot be used on this machine (utils.device)."""


class AmpError(UserError):
    """The requested mixed-precision setup cannot run here (utils.amp)."""


class ModelError(UserError):
    """The model cannot be built as asked: unknown name, --pretrained weights that do not fit (main.py,
    utils.options)."""


class NonFiniteLossError(UserError):
    """Training produced non-finite losses it cannot recover from; the message names the step and what to
    change (--lr, warmup, clipping) (utils.engine)."""


class NonFiniteStateError(NonFiniteLossError):
    """The model's weights or statistics hold NaN or inf; the state is not saved and the run stops
    (utils.engine, utils.checkpoint)."""


class LaunchOptionError(UserError):
    """An argument of a launch script (test/*.sh) breaks one of the script's own rules: a misplaced or empty
    option, an option of the other kind of script, a missing --pth_path (utils.launcher)."""
