"""Exceptions with messages that tell the user what to do.

The CLI catches :class:`HSAMError` and prints its message without a traceback, so every
message must name the offending file/key/value and the fix.
"""


class HSAMError(Exception):
    """Base class for every error hsam raises on purpose."""


class ConfigError(HSAMError, ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(HSAMError, ValueError):
    """Input data is missing, unreadable or inconsistent (shapes, label range, NaNs)."""


class CheckpointError(HSAMError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model it is loaded into."""


class OutputExistsError(HSAMError, FileExistsError):
    """An output path exists and the user did not ask to overwrite or resume it."""


class OutputError(HSAMError, OSError):
    """An output path cannot be written (it lies under a plain file, or its folder is
    read-only); found before any work is done."""


class TrainingError(HSAMError, RuntimeError):
    """Training cannot continue (e.g. the loss became NaN or infinite)."""
