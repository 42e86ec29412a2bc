"""Where rows come from: local files, directories of them, and Hub dataset repositories.

Every row is yielded with the file and line it came from, so any later message can
point at it. Nothing here looks at fields. File-level problems (missing, empty, not
JSON, not UTF-8 as a whole) raise ``DataError``; row-level ones in JSON Lines files (a
malformed line, bytes that are not UTF-8) come back as rows carrying a problem, to be
counted or, under ``strict``, raised by the caller. Files are only ever read.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mlx_pref.data.hub import download_dataset
from mlx_pref.errors import DataError

LINE_SUFFIXES = (".jsonl", ".ndjson")
"""JSON Lines: one row per line, bad lines can be skipped."""
DOCUMENT_SUFFIXES = (".json",)
"""One JSON document: a list of rows, or ``{"data": [rows]}``."""
DATA_SUFFIXES = tuple(s + gz for s in LINE_SUFFIXES + DOCUMENT_SUFFIXES for gz in ("", ".gz"))
UNSUPPORTED = {
    ".parquet": "parquet",
    ".arrow": "Arrow",
    ".csv": "CSV",
    ".tsv": "TSV",
}
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
"""JSON files that Hub repos and ``datasets`` exports hold next to the data."""
CONVERT_HINT = (
    "convert it to JSON Lines, e.g. datasets.load_dataset(...)[split].to_json('train.jsonl')"
)
HUB_PREFIX = "hf://"
_HUB_SPEC = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<path>[^:]+?))?/?(?::(?P<split>[\w.-]+))?$"
)


@dataclass(frozen=True)
class DataFile:
    """A data file on disk and the name messages use for it."""

    path: Path
    name: str


@dataclass(frozen=True)
class RawRow:
    """One parsed row, or (``reason`` set) why it could not be parsed."""

    file: str
    line: int
    value: Any = None
    reason: str | None = None
    problem: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class HubSpec:
    """``[hf://]owner/name[/path/in/repo][:split]``."""

    repo: str
    path: str | None = None
    split: str | None = None


def is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def _unsupported_kind(name: str) -> str | None:
    lowered = name.lower().removesuffix(".gz")
    return next((kind for suf, kind in UNSUPPORTED.items() if lowered.endswith(suf)), None)


def parse_hub_spec(spec: str) -> HubSpec | None:
    """The Hub dataset a spec names, or None when it is (meant as) a local path.

    ``hf://`` always means the Hub. A bare ``owner/name[...]`` means the Hub only when it
    does not look like a file path (no leading ``.``, ``/`` or ``~``, no data-file suffix).
    """
    explicit = spec.startswith(HUB_PREFIX)
    body = spec[len(HUB_PREFIX) :] if explicit else spec
    if not explicit and (body.startswith((".", "/", "~")) or is_data_file(body.split(":")[0])):
        return None
    match = _HUB_SPEC.match(body)
    if match is None:
        if explicit:
            raise DataError(
                f"'{spec}' is not a Hub dataset: write hf://owner/name[/path/in/repo][:split]"
            )
        return None
    return HubSpec(match["repo"], match["path"], match["split"])


def resolve_files(spec: str | Path) -> list[DataFile]:
    """The data files a spec names: a file, a directory (sorted, recursive) or a Hub repo."""
    text = str(spec)
    path = Path(text).expanduser()
    if not text.startswith(HUB_PREFIX):
        folder, _, split = text.rpartition(":")
        if path.is_dir() or (folder and Path(folder).expanduser().is_dir()):
            if path.is_dir():
                folder, split = text, None
            return _split_files(
                _directory_files(Path(folder).expanduser(), folder.rstrip("/")),
                Path(folder).expanduser(),
                folder.rstrip("/"),
                split,
            )
        if path.is_file():
            _check_suffix(path.name, text)
            return [DataFile(path, text)]
    hub = parse_hub_spec(text)
    if hub is not None:
        return hub_files(hub)
    raise DataError(f"data file not found: {text}")


def _check_suffix(filename: str, shown: str) -> None:
    if is_data_file(filename):
        return
    kind = _unsupported_kind(filename)
    if kind:
        raise DataError(
            f"{shown}: {kind} files are not read (mlx-pref reads .jsonl, .json and their .gz); "
            + CONVERT_HINT
        )
    raise DataError(
        f"{shown}: unknown file type; expected one of {', '.join(DATA_SUFFIXES)} "
        "(JSON Lines, or a JSON list of rows)"
    )


def _directory_files(root: Path, shown: str, hub: bool = False) -> list[DataFile]:
    found, other = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if is_data_file(path.name) and path.name not in METADATA_FILES:
            found.append(DataFile(path, f"{shown}/{rel}"))
        elif _unsupported_kind(path.name):
            other.append(rel)
    if not found:
        if hub:
            hint = f"; parquet-only repositories are not read: {CONVERT_HINT}"
        elif other:
            more = ", ..." if len(other) > 3 else ""
            hint = (
                f"; it holds {', '.join(other[:3])}{more}, which mlx-pref does not read: "
                + CONVERT_HINT
            )
        else:
            hint = ""
        raise DataError(f"{shown}: no data files ({', '.join(DATA_SUFFIXES)}) in it{hint}")
    return found


def select_split(relpaths: list[str], split: str | None) -> list[str]:
    """Files of one split: those whose path has the split's name as a word (between ``/``,
    ``.``, ``-``): ``test.jsonl``, ``data/test-00000-of-00001.jsonl``, ``test/0.jsonl``, so
    that ``train`` is not ``train_prefs``; failing that, with ``_`` as a separator too
    (``hh_test.jsonl``).

    Without a split: the ``train`` files if the folder names splits, else every file.
    """

    def matching(name: str) -> list[str]:
        for separators in ("/.-", "/_.-"):
            edge = f"[{re.escape(separators)}]"
            pattern = rf"(^|{edge}){re.escape(name)}({edge}|$)"
            found = [r for r in relpaths if re.search(pattern, r)]
            if found:
                return found
        return []

    if split is None:
        return matching("train") or relpaths
    return matching(split)


def hub_files(spec: HubSpec) -> list[DataFile]:
    """Download (or find in the cache) a Hub dataset's JSON files and pick the split's."""
    shown = f"{HUB_PREFIX}{spec.repo}"
    sub = spec.path.strip("/") if spec.path else ""
    if sub and is_data_file(sub):
        patterns = [sub]
    else:
        prefix = f"{sub}/" if sub else ""
        patterns = [f"{prefix}*{suffix}" for suffix in DATA_SUFFIXES]
    root = download_dataset(spec.repo, patterns)
    target = root / sub if sub else root
    if sub and is_data_file(sub):
        if not target.is_file():
            raise DataError(f"{shown}: no file '{sub}' in the repository")
        return [DataFile(target, f"{shown}/{sub}")]
    if sub:
        shown = f"{shown}/{sub}"
    if not target.is_dir():
        raise DataError(
            f"{shown}: no data files ({', '.join(DATA_SUFFIXES)}) in it; parquet-only "
            f"repositories are not read: {CONVERT_HINT}"
        )
    return _split_files(_directory_files(target, shown, hub=True), target, shown, spec.split)


def _split_files(
    files: list[DataFile], root: Path, shown: str, split: str | None
) -> list[DataFile]:
    """The files of one split of a folder (local or a Hub repo): see ``select_split``."""
    rel = {f.path.relative_to(root).as_posix(): f for f in files}
    chosen = select_split(list(rel), split)
    if not chosen:
        raise DataError(
            f"{shown}: no files for split '{split}' among {', '.join(list(rel)[:6])}"
            f"{', ...' if len(rel) > 6 else ''}"
        )
    return [rel[r] for r in chosen]


# --------------------------------------------------------------------------- reading


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
                raise DataError(
                    f"{f.name}: this is a parquet file, which is not read: {CONVERT_HINT}"
                )
            if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(f"{f.name}: the file is UTF-16 text; save it as UTF-8")
            yield stream
        except GZIP_ERRORS as exc:  # a corrupt or truncated .gz, at any point of reading
            raise DataError(f"{f.name}: not a valid gzip file ({exc})") from None


def read_rows(f: DataFile) -> Iterator[RawRow]:
    """Rows of one file in order, each with its 1-based line number.

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
