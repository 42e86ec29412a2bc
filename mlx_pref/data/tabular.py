"""Parquet, Arrow and CSV files, streamed through pyarrow one record batch at a time.

Only one batch of rows is ever a Python object at once: a parquet file is read row group
by row group (``ParquetFile.iter_batches``), an Arrow file batch by batch (IPC stream, as
``datasets`` writes its cache, or IPC file / Feather v2), a CSV file block by block
(``pyarrow.csv.open_csv``, quoted cells may span lines, every column read as text so a
late value never contradicts a type guessed from the first block). Message columns
(lists of ``{role, content}`` structs) come out as lists of dicts. ``columns`` picks the
columns worth converting from the file's names: wide Hub datasets carry many others.

A file pyarrow cannot open, or that breaks part-way, is one ``DataError`` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

from mlx_pref.data.files import DataFile, RawRow
from mlx_pref.errors import DataError

BATCH_ROWS = 1024
ARROW_FILE_MAGIC = b"ARROW1"
CSV_BLOCK_BYTES = 1 << 20

Columns = Callable[[list[str]], list[str] | None]
"""Given a file's column names, the ones to read (None: all)."""


def pyarrow_modules():
    """``pyarrow`` with its parquet, IPC and CSV readers, or a one-line DataError."""
    try:
        import pyarrow
        import pyarrow.csv
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(
            "reading parquet, Arrow and CSV files needs pyarrow, which is missing from this "
            "environment: pip install pyarrow"
        ) from None
    return pyarrow


def kind(f: DataFile) -> str:
    """``parquet``, ``arrow`` or ``csv`` (``tsv`` is CSV with tabs)."""
    name = f.path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".arrow", ".feather")):
        return "arrow"
    return "csv"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_tabular_rows(f: DataFile, columns: Columns | None = None) -> Iterator[RawRow]:
    """Rows of one parquet, Arrow or CSV file, numbered from 1, one batch in memory at a time."""
    pa = pyarrow_modules()
    what = kind(f)
    errors = (pa.ArrowException, OSError, ValueError)
    row = 0
    with ExitStack() as stack:
        try:
            if f.path.stat().st_size == 0:
                raise DataError(f"{f.name}: the file is empty")
            batches = _open(pa, f, what, columns or (lambda names: None), stack)
        except FileNotFoundError:
            raise DataError(f"data file not found: {f.name}") from None
        except errors as exc:
            raise DataError(f"{f.name}: not a readable {what} file ({_first_line(exc)})") from None
        try:
            for batch in batches:
                for value in batch.to_pylist():
                    row += 1
                    yield RawRow(f.name, row, value, text=what == "csv")
        except errors as exc:
            raise DataError(
                f"{f.name}: damaged {what} file, unreadable after row {row} ({_first_line(exc)})"
            ) from None


def _open(pa, f: DataFile, what: str, columns: Columns, stack: ExitStack) -> Iterator[Any]:
    """An iterator of record batches (opening errors raise here, reading ones later)."""
    if what == "parquet":
        pf = stack.enter_context(pa.parquet.ParquetFile(f.path))
        keep = columns(pf.schema_arrow.names)
        return pf.iter_batches(batch_size=BATCH_ROWS, columns=keep)
    if what == "arrow":
        source = stack.enter_context(pa.memory_map(str(f.path)))
        if source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            stream = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            stream = iter(reader)
        keep = columns(reader.schema.names)
        return stream if keep is None else (b.select(keep) for b in stream)
    return _csv_batches(pa, f, columns)


def _csv_batches(pa, f: DataFile, columns: Columns) -> Iterator[Any]:
    """CSV record batches with every (kept) column as text; the header is read first."""
    csv = pa.csv
    tab = f.path.name.lower().removesuffix(".gz").endswith(".tsv")
    parse = csv.ParseOptions(delimiter="\t" if tab else ",", newlines_in_values=True)
    read = csv.ReadOptions(block_size=CSV_BLOCK_BYTES)
    with csv.open_csv(f.path, read_options=read, parse_options=parse) as probe:
        names = probe.schema.names
    keep = columns(names) or names
    convert = csv.ConvertOptions(
        include_columns=keep, column_types={name: pa.string() for name in keep}
    )
    return csv.open_csv(f.path, read_options=read, parse_options=parse, convert_options=convert)
