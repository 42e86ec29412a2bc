"""JSON Lines and JSON documents, as rows with the line each starts on.

JSON Lines files are streamed line by line, and a malformed line or one that is not
UTF-8 comes back as a row carrying a problem; a ``.json`` document is read whole and must
parse as a whole. ``.gz`` files are decompressed on the fly. File-level problems raise
``DataError`` naming the file.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO

from mlx_pref.data.files import LINE_SUFFIXES, DataFile, RawRow
from mlx_pref.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
GZIP_ERRORS = (OSError, EOFError, zlib.error)


@contextmanager
def _open(f: DataFile) -> Iterator[IO[bytes]]:
    """The file's bytes as a stream (decompressed for .gz), once its first bytes look right."""
    try:
        raw = f.path.open("rb")
    except OSError as exc:
        raise DataError(f"{f.name}: cannot read the file ({exc.strerror or exc})") from None
    with raw:
        gz = f.path.name.lower().endswith(".gz")
        try:
            magic = raw.peek(2)[:2]
            if gz and magic and magic != GZIP_MAGIC:
                raise DataError(f"{f.name}: not a valid gzip file (no gzip header)")
            if not gz and magic == GZIP_MAGIC:
                raise DataError(f"{f.name}: the file is gzip-compressed; name it {f.path.name}.gz")
            stream = gzip.GzipFile(fileobj=raw) if gz and magic else raw
            head = stream.peek(4)[:4]
            if head == b"PAR1":
                stem = f.path.name.rsplit(".", 2 if gz else 1)[0]
                raise DataError(f"{f.name}: this is a parquet file; name it {stem}.parquet")
            if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(f"{f.name}: the file is UTF-16 text; save it as UTF-8")
            yield stream
        except GZIP_ERRORS as exc:  # a corrupt or truncated .gz, at any point of reading
            raise DataError(f"{f.name}: not a valid gzip file ({exc})") from None


def read_json_rows(f: DataFile) -> Iterator[RawRow]:
    """Rows of one JSON (Lines) file in order, each with its 1-based line number.

    JSON Lines files are streamed line by line; a .json document is read whole.
    """
    name = f.path.name.lower().removesuffix(".gz")
    with _open(f) as stream:
        if name.endswith(LINE_SUFFIXES):
            yield from _line_rows(f, stream)
        else:
            yield from _document_rows(f, stream.read())


def _line_rows(f: DataFile, lines: Iterable[bytes]) -> Iterator[RawRow]:
    seen = False
    for lineno, raw in enumerate(lines, 1):
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            seen = True
            yield RawRow(
                f.name,
                lineno,
                reason="not UTF-8",
                problem=f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
            )
            continue
        if not line.strip():
            continue
        seen = True
        try:
            yield RawRow(f.name, lineno, json.loads(line))
        except json.JSONDecodeError as exc:
            yield RawRow(
                f.name,
                lineno,
                reason="malformed JSON",
                problem=f"malformed JSON: {exc.msg} (column {exc.colno})",
            )
    if not seen:
        raise DataError(f"{f.name}: the file is empty")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _document_rows(f: DataFile, raw: bytes) -> Iterator[RawRow]:
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if not raw.strip():
        raise DataError(f"{f.name}: the file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{f.name}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); a .json file "
            "must be UTF-8 throughout"
        ) from None
    decoder = json.JSONDecoder()
    start = _skip_space(text, 0)
    try:
        value, end = decoder.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{f.name}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno}); a .json "
            "file must parse as a whole (use JSON Lines, .jsonl, to have bad rows skipped)"
        ) from None
    if _skip_space(text, end) < len(text):
        if isinstance(value, dict):  # JSON Lines saved under a .json name
            yield from _line_rows(f, io.BytesIO(raw))
            return
        line = text.count("\n", 0, end) + 1
        raise DataError(f"{f.name}:{line}: malformed JSON: extra data after the document")
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        start = _member_position(text, start, "data")
    elif not isinstance(value, list):
        got = "an object without a 'data' list" if isinstance(value, dict) else type(value).__name__
        raise DataError(
            f"{f.name}: a .json file must hold a list of rows or an object with a 'data' "
            f"list of rows; got {got}"
        )
    yield from _array_rows(f, text, start)


def _member_position(text: str, pos: int, key: str) -> int:
    """Where the value of ``key`` starts in the (valid) JSON object at ``pos``."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, pos + 1)
    while text[pos] != "}":
        name, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, _skip_space(text, pos) + 1)  # past ':'
        if name == key:
            return pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, pos)
        if text[pos] == ",":
            pos = _skip_space(text, pos + 1)
    raise ValueError(key)


def _array_rows(f: DataFile, text: str, pos: int) -> Iterator[RawRow]:
    """Items of the (valid) JSON array at ``pos``, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, pos + 1)
    line, counted = 1, 0
    while text[pos] != "]":
        value, end = decoder.raw_decode(text, pos)
        line += text.count("\n", counted, pos)
        counted = pos
        yield RawRow(f.name, line, value)
        pos = _skip_space(text, end)
        if text[pos] == ",":
            pos = _skip_space(text, pos + 1)
