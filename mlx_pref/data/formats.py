"""Reading preference files and normalising every format to one record shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlx_pref.errors import DataError


@dataclass
class Record:
    """A normalised row. Text fields are strings, or lists of chat messages."""

    prompt: str | list[dict]
    chosen: str | list[dict] | None
    rejected: str | list[dict] | None
    completion: str | list[dict] | None
    label: bool | None
    source: str


def _rows(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        for i, row in enumerate(data):
            yield f"{path}:item {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None


def read_records(path: str | Path, fmt: str = "auto", strict: bool = False) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    out = []
    for source, row in _rows(path):
        if "completion" in row and "label" in row:
            out.append(
                Record(
                    row.get("prompt", ""), None, None, row["completion"], bool(row["label"]), source
                )
            )
        else:
            out.append(
                Record(row.get("prompt", ""), row["chosen"], row["rejected"], None, None, source)
            )
    return out
