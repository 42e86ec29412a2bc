"""Hugging Face Hub dataset repositories: which files hold the split asked for, fetched (or
found in the local cache), every failure one line that says what to do.

Online, the repository's file list is read first and only the chosen split's files are
downloaded. Offline (``HF_HUB_OFFLINE=1``, no network), the cached snapshot is used.
A repository whose main branch holds no data file mlx-pref reads (a loading script, an
archive) is read from the Hub's parquet conversion, the ``refs/convert/parquet``
revision laid out as ``{config}/{split}/NNNN.parquet``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mlx_pref.data.files import DATA_SUFFIXES, METADATA_FILES, DataFile, is_data_file
from mlx_pref.data.splits import directory_files, pick_split
from mlx_pref.errors import DataError

HUB_PREFIX = "hf://"
CONVERTED = "refs/convert/parquet"
"""The revision holding the Hub's parquet conversion of a dataset."""
_HUB_SPEC = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<path>[^:]+?))?/?(?::(?P<split>[\w.-]+))?$"
)


@dataclass(frozen=True)
class HubSpec:
    """``[hf://]owner/name[/path/in/repo][:split]``."""

    repo: str
    path: str | None = None
    split: str | None = None


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


def _hub_error(repo: str, exc: Exception) -> DataError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(exc, LocalEntryNotFoundError):
        return DataError(
            f"cannot download dataset '{repo}' from the Hugging Face Hub: offline "
            "(no network, or HF_HUB_OFFLINE=1) and not in the local cache. Connect once to "
            "cache it, or pass a local file."
        )
    if isinstance(exc, GatedRepoError):
        return DataError(
            f"dataset '{repo}' is gated on the Hugging Face Hub: accept its terms on its "
            "page and log in (hf auth login)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return DataError(
            f"dataset '{repo}' not found on the Hugging Face Hub (if it is private, log "
            "in with hf auth login); a local path that does not exist is read as a Hub id"
        )
    if isinstance(exc, HfHubHTTPError):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return DataError(f"cannot download dataset '{repo}': {first}")
    return DataError(
        f"cannot download dataset '{repo}' from the Hugging Face Hub "
        f"({type(exc).__name__}); check the network or pass a local file"
    )


def download_dataset(repo: str, patterns: list[str], revision: str | None = None) -> Path:
    """The local snapshot of dataset ``repo`` holding the files that match ``patterns``."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo, repo_type="dataset", allow_patterns=patterns, revision=revision)
        )
    except OSError as exc:  # every Hub error is one (HTTP, offline, connection)
        raise _hub_error(repo, exc) from None


def list_files(repo: str, revision: str | None = None) -> list[str] | None:
    """The repository's file names at ``revision`` ([] when it has no such revision), or
    None when the Hub cannot be asked (offline: the cache answers instead)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
    except RevisionNotFoundError:
        return []
    except HfHubHTTPError as exc:
        raise _hub_error(repo, exc) from None
    except Exception:  # no network (httpx's connection errors are not OSErrors): the cache
        return None


def _data_names(names: list[str], sub: str) -> list[str]:
    """Data files under ``sub`` (the whole repository when empty), relative to it."""
    prefix = f"{sub}/" if sub else ""
    return [
        n[len(prefix) :]
        for n in names
        if n.startswith(prefix) and is_data_file(n) and n.rpartition("/")[2] not in METADATA_FILES
    ]


def hub_files(spec: HubSpec) -> list[DataFile]:
    """The files of a Hub dataset's split, downloaded or found in the cache."""
    shown = f"{HUB_PREFIX}{spec.repo}"
    sub = spec.path.strip("/") if spec.path else ""
    if sub and is_data_file(sub):
        root = download_dataset(spec.repo, [sub])
        if not (root / sub).is_file():
            raise DataError(f"{shown}: no file '{sub}' in the repository")
        return [DataFile(root / sub, f"{shown}/{sub}")]
    found = _main_files(spec, shown, sub)
    if found is None:
        found = _converted_files(spec, shown, sub)
    return found


def _main_files(spec: HubSpec, shown: str, sub: str) -> list[DataFile] | None:
    """The split's files on the main branch, or None when it holds no data file."""
    where = f"{shown}/{sub}" if sub else shown
    names = list_files(spec.repo)
    if names is None:  # offline: what the cached snapshot holds
        prefix = f"{sub}/" if sub else ""
        root = download_dataset(spec.repo, [f"{prefix}*{s}" for s in DATA_SUFFIXES])
        target = root / sub if sub else root
        files = directory_files(target, where) if target.is_dir() else []
        if not files:
            return None
        rel = {f.path.relative_to(target).as_posix(): f for f in files}
        return [rel[r] for r in pick_split(list(rel), spec.split, where)]
    data = _data_names(names, sub)
    if not data:
        return None
    chosen = [f"{sub}/{r}" if sub else r for r in pick_split(data, spec.split, where)]
    root = download_dataset(spec.repo, chosen)
    return [DataFile(root / n, f"{shown}/{n}") for n in chosen]


def _converted_files(spec: HubSpec, shown: str, sub: str) -> list[DataFile]:
    """The split's files in the Hub's parquet conversion (``{config}/{split}/NNNN.parquet``,
    ``{config}/partial-{split}/...`` for the first 5 GB of a larger dataset)."""
    where = f"{shown}/{sub}" if sub else shown
    none = f"{where}: no data files ({', '.join(DATA_SUFFIXES)}) in it"
    names = list_files(spec.repo, CONVERTED)
    if names is None:  # offline: the cached conversion, if any
        try:
            root = download_dataset(spec.repo, ["*.parquet"], revision=CONVERTED)
        except DataError:
            raise DataError(
                f"{none}, and its parquet conversion ({CONVERTED}) is not in the local cache "
                "(offline)"
            ) from None
        names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.parquet"))]
    parquet = [n for n in names if n.endswith(".parquet") and n.count("/") == 2]
    if not parquet:
        raise DataError(f"{none}, and the Hub has no parquet conversion of it")
    configs = sorted({n.split("/")[0] for n in parquet})
    config = sub.split("/")[0] if sub else None
    if config is None:
        if len(configs) > 1 and "default" not in configs:
            raise DataError(
                f"{none}; its parquet conversion has configs {', '.join(configs)}: name one "
                f"as {shown}/CONFIG[:split]"
            )
        config = "default" if "default" in configs else configs[0]
    if config not in configs:
        raise DataError(f"{none}; its parquet conversion has configs {', '.join(configs)}")
    inside = [n.split("/", 1)[1] for n in parquet if n.startswith(f"{config}/")]
    # partial-{split} holds the first 5 GB of a split too large to convert whole
    splits = sorted({r.split("/")[0].removeprefix("partial-") for r in inside})
    want = spec.split or ("train" if "train" in splits or len(splits) > 1 else splits[0])
    if want not in splits:
        asked = f"no split '{want}'" if spec.split else "no 'train' split"
        raise DataError(
            f"{none}; its parquet conversion has {asked}, only {', '.join(splits)}: name one "
            f"as {where}:SPLIT"
        )
    files = [f"{config}/{r}" for r in inside if r.split("/")[0] in (want, f"partial-{want}")]
    root = download_dataset(spec.repo, files, revision=CONVERTED)
    return [DataFile(root / n, f"{shown}@{CONVERTED}/{n}") for n in files]
