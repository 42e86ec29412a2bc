"""What loading a dataset did: rows read, kept, truncated, and skipped or dropped with why.

Row-level problems go through ``Report.problem``: under ``strict`` the first one is a
``DataError``; otherwise it is counted, with the first few ``file:line`` messages kept
for the summary. After loading, ``check_bad_fraction`` turns a file whose rows are
mostly bad into an error: that file is probably not in the format it was read as.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mlx_pref.errors import DataError

EXAMPLES_PER_REASON = 3
MAX_BAD_FRACTION = 0.5
"""A file with more than this fraction of bad rows is an error, not a warning."""

SETTINGS_REASONS = ("no room for completion", "identical after truncation")
"""Drops caused by the truncation settings rather than by the data."""


@dataclass
class FileSummary:
    """One file of a dataset: its name, the format its rows were read as, rows read."""

    name: str
    format: str
    rows: int = 0
    bad: int = 0
    first_problem: str = ""
    detected_from: int | None = None
    """Line the format was detected from (None: set by the ``format`` option)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Fields read from another column (field -> column), and the system column."""


@dataclass
class Report:
    """Counts and examples from loading one dataset."""

    strict: bool = False
    files: list[FileSummary] = field(default_factory=list)
    kept: int = 0
    truncated: int = 0
    """Kept rows that lost tokens (prompt, completion or both)."""
    prompt_truncated: int = 0
    completion_truncated: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    @property
    def format(self) -> str:
        formats = sorted({f.format for f in self.files})
        return formats[0] if len(formats) == 1 else "mixed (" + ", ".join(formats) + ")"

    def file(self, name: str) -> FileSummary:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    def problem(self, reason: str, message: str, file: str | None = None) -> None:
        """Count a skipped row (or raise, under strict). ``message`` starts with file:line."""
        if self.strict:
            raise DataError(f"{message} [strict: bad rows are errors]")
        self.reasons[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < EXAMPLES_PER_REASON:
            seen.append(message)
        if file is not None and reason not in SETTINGS_REASONS:
            summary = self.file(file)
            summary.bad += 1
            summary.first_problem = summary.first_problem or message

    def count_truncation(self, prompt_cut: bool, completion_cut: bool) -> None:
        self.prompt_truncated += prompt_cut
        self.completion_truncated += completion_cut
        self.truncated += prompt_cut or completion_cut

    def check_bad_fraction(self) -> None:
        """Raise when more than half of a file's rows are bad: its format is probably wrong."""
        for f in self.files:
            if f.rows and f.bad > MAX_BAD_FRACTION * f.rows:
                hint = (
                    f"With more than half the rows bad the file is probably not '{f.format}' "
                    "data; fix the rows or set format explicitly"
                    if f.detected_from is not None and "must be" not in f.first_problem
                    else "Fix the rows"
                )
                raise DataError(
                    f"{f.name}: {f.bad} of {f.rows} rows are unusable, e.g. {f.first_problem}. "
                    + hint
                )

    def summary_line(self) -> str:
        """One line for logs: kept, truncated, and skipped by reason."""
        text = f"{self.kept} of {self.rows} rows kept ({self.format})"
        if self.truncated:
            text += f", {self.truncated} truncated"
        if self.reasons:
            parts = [f"{n} {reason}" for reason, n in self.reasons.most_common()]
            first = next(iter(self.examples.values()))[0]
            text += f", {self.dropped} skipped: {', '.join(parts)} (first: {first})"
        return text

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "format": self.format,
            "files": [(f.name, f.format, f.rows) for f in self.files],
            "columns": {f.name: dict(f.columns) for f in self.files if f.columns},
            "truncated": self.truncated,
            "prompt_truncated": self.prompt_truncated,
            "completion_truncated": self.completion_truncated,
            "dropped": dict(self.reasons),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }
