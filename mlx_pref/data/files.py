"""What a data file is: its kind by suffix, the name messages use for it, and its rows.

A leaf module: the readers (``jsonrows``, ``tabular``), the folder and split rules
(``splits``) and the Hub (``hub``) all speak in these terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

LINE_SUFFIXES = (".jsonl", ".ndjson")
"""JSON Lines: one row per line, bad lines can be skipped."""
DOCUMENT_SUFFIXES = (".json",)
"""One JSON document: a list of rows, or ``{"data": [rows]}``."""
JSON_SUFFIXES = tuple(s + gz for s in LINE_SUFFIXES + DOCUMENT_SUFFIXES for gz in ("", ".gz"))
TABULAR_SUFFIXES = (".parquet", ".arrow", ".feather", ".csv", ".csv.gz", ".tsv", ".tsv.gz")
"""Columnar and delimited files, read through pyarrow in record batches."""
DATA_SUFFIXES = JSON_SUFFIXES + TABULAR_SUFFIXES
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
"""JSON files that Hub repos and ``datasets`` exports hold next to the data."""


@dataclass(frozen=True)
class DataFile:
    """A data file on disk and the name messages use for it."""

    path: Path
    name: str


@dataclass(frozen=True)
class RawRow:
    """One parsed row, or (``reason`` set) why it could not be parsed.

    ``line`` is the 1-based line of a JSON file, or the 1-based row number of a parquet,
    Arrow or CSV file (the CSV header not counted). ``text`` marks rows whose values are
    untyped text (CSV cells), where ``true``/``false`` are written as words.
    """

    file: str
    line: int
    value: Any = None
    reason: str | None = None
    problem: str | None = None
    text: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def is_tabular(name: str) -> bool:
    return name.lower().endswith(TABULAR_SUFFIXES)
