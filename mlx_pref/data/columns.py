"""Which column holds which field, and which format a row's fields say it is in.

A row's fields are read under their own names (``prompt``, ``chosen``, ``rejected``,
``completion``, ``label``, ``system``), under the names the ``columns`` option maps
them to (``columns: {prompt: question}``), or, for the shapes common on the Hub, under
the names such datasets use: a prompt in ``question`` (Intel/orca_dpo_pairs),
``instruction`` or ``input`` (argilla/distilabel-intel-orca-dpo-pairs), a completion in
``output`` or ``response`` beside a ``label``. A row with a prompt under such a name is
never read as implicit-prompt data. What was used is kept per file, for the load summary.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from mlx_pref.data.files import RawRow

FIELDS = {
    "paired": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
KNOWN_FIELDS = {"prompt", "chosen", "rejected", "completion", "label"}
MAPPABLE = ("prompt", "chosen", "rejected", "completion", "label", "system", "images")
"""Fields the ``columns`` option can read from another column."""
PROMPT_COLUMNS = ("question", "instruction", "input", "query")
"""Columns read as the prompt when a row has none, in this order of preference."""
COMPLETION_COLUMNS = ("output", "response", "answer")
"""Columns read as the completion of a labelled (unpaired) row that has none."""
ALIASES = {
    "prompt": (*PROMPT_COLUMNS, "context", "prompt_text"),
    "chosen": ("accepted", "preferred", "better", "winner", "positive", "good"),
    "rejected": ("dispreferred", "worse", "loser", "negative", "bad"),
    "completion": (*COMPLETION_COLUMNS, "text"),
    "label": ("labels", "desirable", "thumbs_up", "is_good"),
}
"""Names a field goes by elsewhere, for did-you-mean hints."""


class MappedRow(dict):
    """A row with its fields under our names; ``columns`` says which were read from
    another column (field -> column), for messages."""

    columns: dict[str, str] = {}


def remap(row: Any, columns: dict[str, str]) -> Any:
    """``row`` with each mapped field read from its column (a field mapped to a column
    the row lacks is missing, never taken from a column of its own name)."""
    if not isinstance(row, dict) or not columns:
        return row
    out = MappedRow({k: v for k, v in row.items() if k not in columns})
    for field, column in columns.items():
        if column in row:
            out[field] = row[column]
    out.columns = columns
    return out


def infer_columns(row: Any, explicit: dict[str, str]) -> dict[str, str]:
    """The common other names this row holds its fields under, besides ``explicit``."""
    if not isinstance(row, dict):
        return {}
    keys = set(remap(row, explicit))
    found = {}
    paired = "chosen" in keys and "rejected" in keys
    if "prompt" not in keys and "prompt" not in explicit and (paired or "label" in keys):
        alias = next((c for c in PROMPT_COLUMNS if c in keys), None)
        if alias:
            found["prompt"] = alias
    if "completion" not in keys and "completion" not in explicit and "label" in keys:
        alias = next((c for c in COMPLETION_COLUMNS if c in keys), None)
        if alias:
            found["completion"] = alias
    return found


def wanted_columns(names: list[str], explicit: dict[str, str]) -> list[str] | None:
    """Of a columnar file's columns, those any field could be read from; None (read them
    all) when they would not make a recognisable row, so that messages show every name."""
    wanted = {*MAPPABLE, "image", *PROMPT_COLUMNS, *COMPLETION_COLUMNS, *explicit.values()}
    keep = [n for n in names if n in wanted]
    probe = dict.fromkeys(keep, "")
    if detect_format(remap(probe, {**explicit, **infer_columns(probe, explicit)})) is None:
        return None
    return keep


def describe(columns: dict[str, str]) -> str:
    """``prompt <- question, system <- system``."""
    return ", ".join(f"{field} <- {column}" for field, column in columns.items())


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


def kind(value: Any) -> str:
    """A JSON value's kind, for messages."""
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


def undetectable_message(row: RawRow) -> str:
    """Why a file's format could not be told from its first row."""
    if row.reason is not None:
        return f"{row.where}: {row.problem}"
    if not isinstance(row.value, dict):
        return f"{row.where}: expected a JSON object per row, got {kind(row.value)}"
    keys = list(row.value)
    hints, unused = [], list(keys)
    for want in ("prompt", "chosen", "rejected", "completion", "label"):
        found = None if want in keys else suggest_field(want, unused)
        if found:
            hints.append(f"'{want}' for '{found}'")
            unused.remove(found)
    hint = f"; did you mean {', '.join(hints)}? (or map them with columns:)" if hints else ""
    return (
        f"{row.where}: cannot tell the data format from the fields "
        f"({', '.join(repr(k) for k in keys[:8]) or 'none'}): expected 'prompt', 'chosen', "
        f"'rejected' (paired), 'chosen', 'rejected' (implicit prompt), or 'prompt', "
        f"'completion', 'label' (unpaired){hint}"
    )
