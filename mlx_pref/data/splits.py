"""The data files of a folder (local or a Hub snapshot) and which of them form a split.

Split rules, in the order they apply:

1. Sharded files ``{split}-NNNNN-of-NNNNN.ext`` (what ``datasets.push_to_hub`` writes,
   e.g. ``data/train_prefs-00000-of-00001.parquet``) name their split exactly: ``train``
   is not ``train_prefs``. Without a split asked for, ``train`` is used, or the only
   split; several splits and none called ``train`` is an error listing them.
2. Otherwise a split is the files whose path has its name as a word between ``/``,
   ``.`` and ``-`` (``test.jsonl``, ``test/0.jsonl``), failing that with ``_`` as a
   separator too (``hh_test.jsonl``). Without a split asked for: the ``train`` files if
   there are any, else every file.
"""

from __future__ import annotations

import re
from pathlib import Path

from mlx_pref.data.files import METADATA_FILES, DataFile, is_data_file
from mlx_pref.errors import DataError

SHARD = re.compile(r"(?:^|/)(?P<split>[^/]+?)-\d{5}-of-\d{5}\.")
SHOWN_FILES = 6


def directory_files(root: Path, shown: str) -> list[DataFile]:
    """Every data file under ``root``, sorted by path; hidden files and dataset metadata
    skipped. Empty when there is none."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        parts = path.relative_to(root).parts
        if any(part.startswith(".") for part in parts):
            continue
        if is_data_file(path.name) and path.name not in METADATA_FILES:
            found.append(DataFile(path, f"{shown}/{'/'.join(parts)}"))
    return found


def sharded_splits(relpaths: list[str]) -> list[str]:
    """Split names given by sharded file names, sorted (empty when none is sharded)."""
    return sorted({m["split"] for r in relpaths if (m := SHARD.search(r))})


def _word_matches(relpaths: list[str], name: str, loose: bool = True) -> list[str]:
    passes = ("/.-", "/_.-") if loose else ("/.-",)
    for separators in passes:
        edge = f"[{re.escape(separators)}]"
        pattern = rf"(^|{edge}){re.escape(name)}({edge}|$)"
        found = [r for r in relpaths if re.search(pattern, r)]
        if found:
            return found
    return []


def select_split(relpaths: list[str], split: str | None) -> list[str]:
    """The files of ``split`` (see the module's rules); empty when it has none. Raises
    ``DataError`` (without the folder's name) when no split is given and the files hold
    several named splits, none of them ``train``."""
    shards = sharded_splits(relpaths)
    if shards:
        want = split or ("train" if "train" in shards or len(shards) > 1 else shards[0])
        if want in shards:
            return [r for r in relpaths if (m := SHARD.search(r)) and m["split"] == want]
        if split is None:
            raise DataError(f"no 'train' split; its splits are {', '.join(shards)}")
        return _word_matches(relpaths, split, loose=False)
    if split is None:
        return _word_matches(relpaths, "train") or relpaths
    return _word_matches(relpaths, split)


def pick_split(relpaths: list[str], split: str | None, shown: str) -> list[str]:
    """The paths of one split of a folder (local or a Hub repo) named ``shown`` in
    messages, or a DataError that says which splits there are."""
    shards = sharded_splits(relpaths)
    try:
        chosen = select_split(relpaths, split)
    except DataError as exc:
        example = next((s for s in shards if s.startswith("train")), shards[0])
        raise DataError(f"{shown}: {exc}: name one, e.g. {shown}:{example}") from None
    if chosen:
        return chosen
    if shards:
        raise DataError(f"{shown}: no split '{split}'; its splits are {', '.join(shards)}")
    more = ", ..." if len(relpaths) > SHOWN_FILES else ""
    raise DataError(
        f"{shown}: no files for split '{split}' among {', '.join(relpaths[:SHOWN_FILES])}{more}"
    )


def split_files(files: list[DataFile], root: Path, shown: str, split: str | None) -> list[DataFile]:
    """The files of one split of a local folder (see ``pick_split``)."""
    rel = {f.path.relative_to(root).as_posix(): f for f in files}
    return [rel[r] for r in pick_split(list(rel), split, shown)]
