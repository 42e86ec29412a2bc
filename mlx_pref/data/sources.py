"""Where rows come from: local files, directories of them, and Hub dataset repositories.

Every row is yielded with the file and line (or row number) it came from, so any later
message can point at it. Nothing here looks at fields. File-level problems (missing,
empty, not JSON, a damaged parquet file) raise ``DataError``; row-level ones in JSON
Lines files (a malformed line, bytes that are not UTF-8) come back as rows carrying a
problem, to be counted or, under ``strict``, raised by the caller. Files are only ever
read. Readers: ``jsonrows`` (JSON Lines, JSON), ``tabular`` (parquet, Arrow, CSV through
pyarrow); folders and splits: ``splits``; the Hub: ``hub``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mlx_pref.data.files import (
    DATA_SUFFIXES,
    DataFile,
    RawRow,
    is_data_file,
    is_tabular,
)
from mlx_pref.data.hub import HUB_PREFIX, HubSpec, hub_files, parse_hub_spec
from mlx_pref.data.jsonrows import read_json_rows
from mlx_pref.data.splits import directory_files, select_split, split_files
from mlx_pref.data.tabular import Columns, read_tabular_rows
from mlx_pref.errors import DataError

__all__ = [
    "DATA_SUFFIXES",
    "HUB_PREFIX",
    "DataFile",
    "HubSpec",
    "RawRow",
    "hub_files",
    "parse_hub_spec",
    "read_rows",
    "resolve_files",
    "select_split",
]


def resolve_files(spec: str | Path) -> list[DataFile]:
    """The data files a spec names: a file, a directory (sorted, recursive) or a Hub repo."""
    text = str(spec)
    path = Path(text).expanduser()
    if not text.startswith(HUB_PREFIX):
        folder, _, split = text.rpartition(":")
        if path.is_dir() or (folder and Path(folder).expanduser().is_dir()):
            if path.is_dir():
                folder, split = text, None
            root, shown = Path(folder).expanduser(), folder.rstrip("/")
            files = directory_files(root, shown)
            if not files:
                raise DataError(f"{shown}: no data files ({', '.join(DATA_SUFFIXES)}) in it")
            return split_files(files, root, shown, split)
        if path.is_file():
            _check_suffix(path.name, text)
            return [DataFile(path, text)]
    hub = parse_hub_spec(text)
    if hub is not None:
        return hub_files(hub)
    raise DataError(f"data file not found: {text}")


def _check_suffix(filename: str, shown: str) -> None:
    if not is_data_file(filename):
        raise DataError(
            f"{shown}: unknown file type; expected one of {', '.join(DATA_SUFFIXES)} "
            "(JSON Lines, a JSON list of rows, parquet, Arrow or CSV)"
        )


def read_rows(f: DataFile, columns: Columns | None = None) -> Iterator[RawRow]:
    """Rows of one file in order, each with its 1-based line (JSON) or row number.

    ``columns``: for columnar files, which of the file's columns to convert (None: all).
    """
    if is_tabular(f.path.name):
        return read_tabular_rows(f, columns)
    return read_json_rows(f)
