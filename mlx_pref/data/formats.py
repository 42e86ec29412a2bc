"""Format detection and normalisation: every row shape becomes one ``Record``.

Formats (TRL's dataset types, by the fields a row has):

- ``paired``: ``prompt``, ``chosen``, ``rejected`` strings.
- ``implicit``: ``chosen`` and ``rejected`` full texts that share the prompt as a prefix
  (hh-rlhf's ``\\n\\nHuman: ... \\n\\nAssistant:`` dialogues); see ``extract_prompt``.
- ``conversational``: ``prompt``/``chosen``/``rejected`` as lists of ``{role, content}``
  messages, or just ``chosen``/``rejected`` lists that share their leading messages.
- ``unpaired``: ``prompt``, ``completion`` (strings or messages) and a boolean ``label``.

With ``format: auto`` each file's format is detected from its first row that has a
recognisable set of fields; every row of the file is then read as that format.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from mlx_pref.data.report import FileSummary, Report
from mlx_pref.data.sources import DataFile, RawRow, read_rows
from mlx_pref.errors import DataError

FORMATS = ("paired", "implicit", "conversational", "unpaired")
FIELDS = {
    "paired": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
KNOWN_FIELDS = {"prompt", "chosen", "rejected", "completion", "label"}
ALIASES = {
    "prompt": ("question", "instruction", "input", "query", "context", "prompt_text"),
    "chosen": ("accepted", "preferred", "better", "winner", "positive", "good"),
    "rejected": ("dispreferred", "worse", "loser", "negative", "bad"),
    "completion": ("response", "output", "answer", "text"),
    "label": ("labels", "desirable", "thumbs_up", "is_good"),
}
TURN_MARKER = "\n\nAssistant:"
"""hh-rlhf's turn boundary: implicit prompts end right after the last shared one."""
TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant): ?")
"""hh-rlhf's turns, for reading a transcript string as chat messages."""

Messages = list[dict]
Text = str | Messages


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

    @property
    def paired(self) -> bool:
        return self.completion is None

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


class RowError(Exception):
    """A row that cannot be used: ``reason`` for counting, ``message`` names file:line:field."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ------------------------------------------------------------------------ detection


def detect_format(row: Any) -> str | None:
    """The format a row's fields say it is in, or None if they match none."""
    if not isinstance(row, dict):
        return None
    if "completion" in row and "label" in row:
        return "unpaired"
    if "chosen" in row and "rejected" in row:
        if any(isinstance(row.get(key), list) for key in ("prompt", "chosen", "rejected")):
            return "conversational"
        return "paired" if "prompt" in row else "implicit"
    return None


def suggest_field(missing: str, keys: Iterable[str]) -> str | None:
    """The row's field that was probably meant for ``missing`` (``chosen_response``)."""
    extra = [k for k in keys if isinstance(k, str) and k not in KNOWN_FIELDS]
    close = difflib.get_close_matches(missing, extra, n=1, cutoff=0.5)
    if close:
        return close[0]
    return next((k for k in extra if k.lower() in ALIASES.get(missing, ())), None)


def _did_you_mean(missing: str, row: dict) -> str:
    found = suggest_field(missing, row)
    if found:
        return f" (the row has '{found}': did you mean '{missing}'?)"
    fields = ", ".join(f"'{k}'" for k in list(row)[:8]) or "none"
    return f" (the row's fields: {fields})"


def undetectable_message(row: RawRow) -> str:
    """Why a file's format could not be told from its first row."""
    if row.reason is not None:
        return f"{row.where}: {row.problem}"
    if not isinstance(row.value, dict):
        return f"{row.where}: expected a JSON object per row, got {_kind(row.value)}"
    keys = list(row.value)
    hints, unused = [], list(keys)
    for want in ("prompt", "chosen", "rejected", "completion", "label"):
        found = None if want in keys else suggest_field(want, unused)
        if found:
            hints.append(f"'{want}' for '{found}'")
            unused.remove(found)
    hint = f"; did you mean {', '.join(hints)}?" if hints else ""
    return (
        f"{row.where}: cannot tell the data format from the fields "
        f"({', '.join(repr(k) for k in keys[:8]) or 'none'}): expected 'prompt', 'chosen', "
        f"'rejected' (paired), 'chosen', 'rejected' (implicit prompt), or 'prompt', "
        f"'completion', 'label' (unpaired){hint}"
    )


# ----------------------------------------------------------------- normalisation


def _label_hint(label) -> str:
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        return f"; write {label.strip().lower()} without quotes"
    return ""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _field(row: dict, key: str, where: str, fmt: str) -> Any:
    if key in row:
        return row[key]
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
            "wrong type", f"{where}: field '{key}' must be a string, got {_kind(value)}{hint}"
        )
    if completion and _blank(value):
        raise RowError("empty completion", f"{where}: field '{key}' is empty")
    return value


def transcript_messages(text: str) -> Messages | None:
    """An hh-rlhf transcript (``\\n\\nHuman: ... \\n\\nAssistant: ...``) as user/assistant
    messages, or None when ``text`` is not one (it must start with a turn)."""
    parts = TRANSCRIPT_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


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
            f"{_kind(value)}{hint}",
        )
    if not value:
        reason = "empty completion" if completion else "empty prompt"
        raise RowError(reason, f"{where}: field '{key}' is an empty list of messages")
    for i, message in enumerate(value, 1):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise RowError(
                "wrong type",
                f"{where}: field '{key}' message {i} must be an object with string 'role' and "
                f"'content', got {_kind(message) if not isinstance(message, dict) else message!r:.80}",
            )
    if completion and _blank(value):
        raise RowError("empty completion", f"{where}: field '{key}' has only empty messages")
    return [dict(m) for m in value]


def _blank(value: Text) -> bool:
    """No text to score: whitespace, or messages holding only whitespace."""
    if isinstance(value, str):
        return not value.strip()
    return not any(m["content"].strip() for m in value)


def _distinct(chosen: Text, rejected: Text, where: str) -> None:
    if chosen == rejected:
        raise RowError(
            "chosen identical to rejected",
            f"{where}: fields 'chosen' and 'rejected' are identical, so the pair states no "
            "preference",
        )


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on the longest equal prefix: C-speed comparisons
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split a shared prompt off two full texts (or message lists): (prompt, chosen, rejected).

    Message lists: the prompt is the leading messages both share (TRL's ``extract_prompt``).
    Strings: the longest common prefix, cut back to end right after the last shared
    ``\\n\\nAssistant:`` turn marker, so a first word both answers happen to share stays in
    the completions. Without a marker in the shared text, TRL's character rule: the whole
    common prefix, less a trailing space (which then starts both completions).
    """
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = _common_prefix(chosen, rejected)
    marker = chosen.rfind(TURN_MARKER, 0, n)
    if marker >= 0:
        n = marker + len(TURN_MARKER)
    elif 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


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
                f"'rejected', got {_kind(row['prompt'])}",
            )
        raise RowError(
            "empty prompt",
            f"{where}: fields 'chosen' and 'rejected' share no "
            f"{'leading messages' if chat else 'leading text'}, so there is no prompt to "
            "extract; add a 'prompt' field",
        )
    return Record(prompt, chosen, rejected)


def normalise(row: Any, fmt: str, where: str) -> Record:
    """One raw row as a Record of format ``fmt``; raises RowError naming file:line:field."""
    if not isinstance(row, dict):
        fields = ", ".join(FIELDS[fmt])
        raise RowError(
            "not an object", f"{where}: expected a JSON object with {fields}, got {_kind(row)}"
        )
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
        label = _field(row, "label", where, fmt)
        if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
            label = bool(label)
        if not isinstance(label, bool):
            raise RowError(
                "wrong type",
                f"{where}: field 'label' must be true or false, got {_kind(label)} ({label!r:.40})"
                + _label_hint(label),
            )
        return Record(prompt, completion=completion, label=label)
    raise DataError(f"unknown data format '{fmt}'; expected auto or one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------- per file


def read_records(f: DataFile, fmt: str, report: Report) -> Iterator[Record]:
    """Every usable row of one file as a Record, streamed; bad rows are counted in ``report``.

    With ``fmt`` "auto", rows are buffered only until one shows the file's format.
    """
    rows = read_rows(f)
    head: list[RawRow] = []
    detected_from = None
    if fmt == "auto":
        for row in rows:
            head.append(row)
            if detect_format(row.value) is not None:
                fmt, detected_from = detect_format(row.value), row.line
                break
        else:
            if not head:
                raise DataError(f"{f.name}: the file holds no rows")
            raise DataError(undetectable_message(head[0]))
    summary = FileSummary(f.name, fmt, detected_from=detected_from)
    report.files.append(summary)
    for row in itertools.chain(head, rows):
        summary.rows += 1
        if row.reason is not None:
            report.problem(row.reason, f"{row.where}: {row.problem}", f.name)
            continue
        try:
            record = normalise(row.value, fmt, row.where)
        except RowError as exc:
            report.problem(exc.reason, exc.message, f.name)
            continue
        yield replace(record, file=f.name, line=row.line, format=fmt)
    if summary.rows == 0:
        raise DataError(f"{f.name}: the file holds no rows")
