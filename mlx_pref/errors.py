"""The errors mlx-pref reports to users: one actionable line each, never a traceback."""


class MlxPrefError(Exception):
    """Base class: the CLI prints these as ``error: <message>`` and exits with status 2."""


class ConfigError(MlxPrefError, ValueError):
    """A config file or flag is wrong (unknown key, bad type, out of range)."""


class DataError(MlxPrefError, ValueError):
    """A dataset is unreadable or a row is malformed; the message names file, line and field."""


class ModelError(MlxPrefError):
    """A model or adapter cannot be loaded (missing, offline, unsupported)."""


class WriteError(MlxPrefError):
    """A file could not be written (disk full, read-only); nothing half-written is left."""


class Interrupted(MlxPrefError):
    """Ctrl-C or SIGTERM: a checkpoint was saved; the message says how to resume.

    ``exit_code`` is the shell's convention for the signal: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteError(MlxPrefError):
    """Too many non-finite steps in a row: a checkpoint was saved before stopping."""
