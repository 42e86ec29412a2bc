"""Format detection and normalisation: every row shape becomes one ``Record``.

Formats (TRL's dataset types, by the fields a row has):

- ``paired``: ``prompt``, ``chosen``, ``rejected`` strings.
- ``implicit``: ``chosen`` and ``rejected`` full texts that share the prompt as a prefix
  (hh-rlhf's ``\\n\\nHuman: ... \\n\\nAssistant:`` dialogues); see ``extract_prompt``.
- ``conversational``: ``prompt``/``chosen``/``rejected`` as lists of ``{role, content}``
  messages, or just ``chosen``/``rejected`` lists that share their leading messages.
- ``unpaired``: ``prompt``, ``completion`` (strings or messages) and a boolean ``label``.

With ``format: auto`` each file's format is detected from its first row that has a
recognisable set of fields; every row of the file is then read as that format. Fields
may come from other columns (``columns.py``); a ``system`` column or the ``system_prompt``
option gives each row a system message (see ``tokenize.with_system``). A row of any
format may carry ``images`` (``vision.images``); a message's content may then be a list
of ``{type: text}`` and ``{type: image}`` parts (TRL's vision format).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from mlx_pref.data.columns import (
    FIELDS,
    detect_format,
    infer_columns,
    kind,
    remap,
    suggest_field,
    undetectable_message,
    wanted_columns,
)
from mlx_pref.data.implicit import Messages, Text, extract_prompt, transcript_messages
from mlx_pref.data.report import FileSummary, Report
from mlx_pref.data.sources import DataFile, RawRow, read_rows
from mlx_pref.errors import DataError
from mlx_pref.vision.images import ImageProblem, row_images

__all__ = [
    "FORMATS",
    "Reading",
    "Record",
    "RowError",
    "detect_format",
    "extract_prompt",
    "read_records",
    "transcript_messages",
]

FORMATS = ("paired", "implicit", "conversational", "unpaired")


@dataclass(frozen=True)
class Record:
    """A normalised row: strings, or lists of chat messages (then ``chat`` is True)."""

    prompt: Text
    chosen: Text | None = None
    rejected: Text | None = None
    completion: Text | None = None
    label: bool | None = None
    file: str = ""
    line: int = 0
    format: str = ""
    system: str | None = None
    """The row's system message ("" for none) when its file has a system column or a
    ``system_prompt`` is set; None otherwise (the row is read as it is)."""
    images: tuple = ()
    """The row's images (``vision.images.ImageRef``), in the order the prompt shows them."""

    @property
    def paired(self) -> bool:
        return self.completion is None

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Reading:
    """How to read the rows of a dataset: the format (or ``auto``), the columns fields are
    read from, and the system prompt of rows that have none."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = None

    @classmethod
    def from_config(cls, cfg) -> Reading:
        return cls(cfg.format, dict(cfg.columns or {}), cfg.system_prompt)


class RowError(Exception):
    """A row that cannot be used: ``reason`` for counting, ``message`` names file:line:field."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------- normalisation


TEXT_LABELS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
"""How CSV cells (always text) write a label."""


def _label_hint(label) -> str:
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        return f"; write {label.strip().lower()} without quotes"
    return ""


def _did_you_mean(missing: str, row: dict) -> str:
    found = suggest_field(missing, row)
    if found:
        return f" (the row has '{found}': did you mean '{missing}'?)"
    fields = ", ".join(f"'{k}'" for k in list(row)[:8]) or "none"
    return f" (the row's fields: {fields})"


def _field(row: dict, key: str, where: str, fmt: str) -> Any:
    if key in row:
        return row[key]
    column = getattr(row, "columns", {}).get(key)
    if column is not None:
        raise RowError("missing field", f"{where}: missing column '{column}' (read as '{key}')")
    other = detect_format(row)
    if other is not None and other != fmt:
        raise RowError(
            "missing field",
            f"{where}: missing field '{key}': this row looks like '{other}' data, but the "
            f"file is read as '{fmt}' (one file holds one format)",
        )
    raise RowError("missing field", f"{where}: missing field '{key}'{_did_you_mean(key, row)}")


def _string(row: dict, key: str, where: str, fmt: str, completion: bool = True) -> str:
    value = _field(row, key, where, fmt)
    if not isinstance(value, str):
        hint = (
            " (lists of messages are the 'conversational' format)"
            if isinstance(value, list)
            else ""
        )
        raise RowError(
            "wrong type", f"{where}: field '{key}' must be a string, got {kind(value)}{hint}"
        )
    if completion and _blank(value):
        raise RowError("empty completion", f"{where}: field '{key}' is empty")
    return value


def _messages(row: dict, key: str, where: str, fmt: str, completion: bool = True) -> Messages:
    value = _field(row, key, where, fmt)
    if isinstance(value, str):
        value = transcript_messages(value) or value
    if not isinstance(value, list):
        hint = (
            " that is not an hh-rlhf transcript ('\\n\\nHuman: ...')"
            if isinstance(value, str)
            else ""
        )
        raise RowError(
            "wrong type",
            f"{where}: field '{key}' must be a list of {{role, content}} messages, got "
            f"{kind(value)}{hint}",
        )
    if not value:
        reason = "empty completion" if completion else "empty prompt"
        raise RowError(reason, f"{where}: field '{key}' is an empty list of messages")
    for i, message in enumerate(value, 1):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and (isinstance(message.get("content"), str) or _parts(message.get("content")))
        ):
            raise RowError(
                "wrong type",
                f"{where}: field '{key}' message {i} must be an object with string 'role' and "
                "'content' (a string, or a list of {type: text, text} and {type: image} "
                f"parts), got {kind(message) if not isinstance(message, dict) else message!r:.80}",
            )
    if completion and _blank(value):
        raise RowError("empty completion", f"{where}: field '{key}' has only empty messages")
    return [dict(m) for m in value]


def _parts(content: Any) -> bool:
    """Whether ``content`` is a list of content parts (TRL's vision format): text parts
    with their text, and image placeholders (the row's ``images`` fill them in order)."""
    return (
        isinstance(content, list)
        and bool(content)
        and all(
            isinstance(p, dict)
            and (
                p.get("type") == "image"
                or (p.get("type") == "text" and isinstance(p.get("text"), str))
            )
            for p in content
        )
    )


def message_text(content: str | list) -> str:
    """A message's text: the content, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


def _blank(value: Text) -> bool:
    """No text to score: whitespace, or messages holding only whitespace."""
    if isinstance(value, str):
        return not value.strip()
    return not any(message_text(m["content"]).strip() for m in value)


def _distinct(chosen: Text, rejected: Text, where: str) -> None:
    if chosen == rejected:
        raise RowError(
            "chosen identical to rejected",
            f"{where}: fields 'chosen' and 'rejected' are identical, so the pair states no "
            "preference",
        )


def _implicit(row: dict, where: str, fmt: str, chat: bool) -> Record:
    read = _messages if chat else _string
    chosen, rejected = read(row, "chosen", where, fmt), read(row, "rejected", where, fmt)
    _distinct(chosen, rejected, where)
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if _blank(value):
            raise RowError(
                "empty completion",
                f"{where}: field '{key}' is empty once the prompt it shares with the other "
                "field is removed",
            )
    if not prompt:
        if chat and "prompt" in row:
            raise RowError(
                "wrong type",
                f"{where}: field 'prompt' must be a list of messages like 'chosen' and "
                f"'rejected', got {kind(row['prompt'])}",
            )
        raise RowError(
            "empty prompt",
            f"{where}: fields 'chosen' and 'rejected' share no "
            f"{'leading messages' if chat else 'leading text'}, so there is no prompt to "
            "extract; add a 'prompt' field",
        )
    return Record(prompt, chosen, rejected)


def _label(row: dict, where: str, fmt: str, text: bool) -> bool:
    label = _field(row, "label", where, fmt)
    if text and isinstance(label, str) and label.strip().lower() in TEXT_LABELS:
        return TEXT_LABELS[label.strip().lower()]
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        words = "true or false (or 1/0, yes/no)" if text else "true or false"
        raise RowError(
            "wrong type",
            f"{where}: field 'label' must be {words}, got {kind(label)} ({label!r:.40})"
            + ("" if text else _label_hint(label)),
        )
    return label


def _system(row: dict, where: str) -> str | None:
    """The row's system message: None without a system column, "" for an empty one."""
    if "system" not in row:
        return None
    value = row["system"]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError("wrong type", f"{where}: field 'system' must be a string, got {kind(value)}")
    return value


def normalise(row: Any, fmt: str, where: str, *, text: bool = False) -> Record:
    """One raw row as a Record of format ``fmt``; raises RowError naming file:line:field.
    ``text``: the row's values are untyped text (a CSV row), where labels are words."""
    if not isinstance(row, dict):
        fields = ", ".join(FIELDS[fmt])
        raise RowError(
            "not an object", f"{where}: expected a JSON object with {fields}, got {kind(row)}"
        )
    if "prompt" in getattr(row, "columns", {}):
        _field(row, "prompt", where, fmt)  # a mapped prompt is never left to be inferred
    if fmt == "paired":
        prompt = _string(row, "prompt", where, fmt, completion=False)
        chosen, rejected = _string(row, "chosen", where, fmt), _string(row, "rejected", where, fmt)
        _distinct(chosen, rejected, where)
        return Record(prompt, chosen, rejected)
    if fmt == "implicit":
        return _implicit(row, where, fmt, chat=False)
    if fmt == "conversational":
        if isinstance(row.get("prompt"), list):
            prompt = _messages(row, "prompt", where, fmt, completion=False)
            chosen = _messages(row, "chosen", where, fmt)
            rejected = _messages(row, "rejected", where, fmt)
            _distinct(chosen, rejected, where)
            return Record(prompt, chosen, rejected)
        return _implicit(row, where, fmt, chat=True)
    if fmt == "unpaired":
        chat = isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list)
        read = _messages if chat else _string
        prompt = read(row, "prompt", where, fmt, completion=False)
        completion = read(row, "completion", where, fmt)
        return Record(prompt, completion=completion, label=_label(row, where, fmt, text))
    raise DataError(f"unknown data format '{fmt}'; expected auto or one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------- per file


def _layout(
    rows: Iterator[RawRow], f: DataFile, reading: Reading
) -> tuple[list[RawRow], str, dict[str, str], int | None]:
    """Rows read ahead, the file's format, the columns its fields come from, and the line
    the format was detected from (None when set by the ``format`` option)."""
    explicit, head = reading.columns, []
    for row in rows:
        head.append(row)
        if not isinstance(row.value, dict):
            continue
        columns = {**explicit, **infer_columns(row.value, explicit)}
        if reading.format != "auto":
            return head, reading.format, columns, None
        found = detect_format(remap(row.value, columns))
        if found is not None:
            return head, found, columns, row.line
    if reading.format != "auto":
        return head, reading.format, dict(explicit), None
    if not head:
        raise DataError(f"{f.name}: the file holds no rows")
    raise DataError(undetectable_message(head[0]))


def read_records(f: DataFile, reading: Reading | str, report: Report) -> Iterator[Record]:
    """Every usable row of one file as a Record, streamed; bad rows are counted in ``report``.

    ``reading``: a ``Reading``, or just the format. Rows are read ahead only until one
    shows the file's format and columns.
    """
    if isinstance(reading, str):
        reading = Reading(reading)
    rows = read_rows(f, lambda names: wanted_columns(names, reading.columns))
    head, fmt, columns, detected_from = _layout(rows, f, reading)
    shown = dict(columns)
    if any(isinstance(r.value, dict) and "system" in r.value for r in head[-1:]):
        shown.setdefault("system", "system")
    summary = FileSummary(f.name, fmt, detected_from=detected_from, columns=shown)
    report.files.append(summary)
    for row in itertools.chain(head, rows):
        summary.rows += 1
        if row.reason is not None:
            report.problem(row.reason, f"{row.where}: {row.problem}", f.name)
            continue
        value = remap(row.value, columns)
        try:
            record = normalise(value, fmt, row.where, text=row.text)
            system = _system(value, row.where) if isinstance(value, dict) else None
            images = row_images(value, row.where, f.path.parent)
        except (RowError, ImageProblem) as exc:
            report.problem(exc.reason, exc.message, f.name)
            continue
        if reading.system_prompt is not None and not system:
            system = reading.system_prompt
        yield replace(record, file=f.name, line=row.line, format=fmt, system=system, images=images)
    if summary.rows == 0:
        raise DataError(f"{f.name}: the file holds no rows")
