"""The errors mlx-pref reports to users: one actionable line each, never a traceback, and
the one helper that suggests what a mistyped name meant."""

import difflib
from collections.abc import Sequence


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


class GGUFError(ModelError, ValueError):
    """A GGUF file cannot be read: damaged, or a layout mlx-pref does not support."""


class Interrupted(MlxPrefError):
    """Ctrl-C or SIGTERM: a checkpoint was saved; the message says how to resume.

    ``exit_code`` is the shell's convention for the signal: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteError(MlxPrefError):
    """Too many non-finite steps in a row: a checkpoint was saved before stopping."""


_FILLER = {"to", "or", "of", "the", "num", "per", "use", "is"}


def suggest(key: str, valid: Sequence[str]) -> str | None:
    """The valid name a mistyped or foreign one most likely means: a near spelling
    (``lerning_rate``), else the one sharing most of its words (``num_train_epochs`` ->
    ``epochs``), else a looser spelling match; or None."""
    words = set(key.lower().split("_")) - _FILLER

    def shared(v: str) -> float:
        theirs = set(v.split("_")) - _FILLER
        return len(words & theirs) / len(words | theirs) if words & theirs else 0.0

    valid = list(valid)
    if not valid:
        return None
    typo = difflib.get_close_matches(key, valid, n=1, cutoff=0.85)
    if typo:
        return typo[0]
    best = max(valid, key=lambda v: (shared(v), difflib.SequenceMatcher(None, key, v).ratio()))
    if shared(best) > 0:
        return best
    cutoff = 0.5 if len(valid) <= 12 else 0.7
    close = difflib.get_close_matches(key, valid, n=1, cutoff=cutoff)
    return close[0] if close else None
