"""Folders mlx-pref owns, proven by a marker it writes itself, and nothing else.

A run, a loss sweep or an export folder holds ``.mlx-pref.json``: its kind, an id, and
the names mlx-pref wrote there. Only a folder with that marker (or an empty or new one)
is ever written into, and ``--overwrite`` removes only the names the marker lists, never
a file a user put beside them, never the working directory or one of its parents, and
never an input of the run (its config file, data, model or adapter). Every check here
runs before any work, so a refused command has changed nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mlx_pref.checkpoint import CHECKPOINTS, list_checkpoints, verify, write_atomic
from mlx_pref.errors import ConfigError

MARKER = ".mlx-pref.json"
FORMAT = "mlx-pref-folder-1"
KINDS = ("run", "sweep", "export")


class OutputError(ConfigError):
    """An output folder mlx-pref will not write into (not its own, a file, read-only)."""


@dataclass
class Marker:
    """What ``.mlx-pref.json`` records about a folder mlx-pref owns."""

    kind: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    files: list[str] = field(default_factory=list)
    """Names (relative to the folder) that mlx-pref wrote or is writing there."""

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "id": self.id,
            "created": self.created,
            "files": sorted(set(self.files)),
        }


def read_marker(folder: str | Path) -> Marker | None:
    """The folder's marker, or None when mlx-pref cannot show that it owns the folder."""
    path = Path(folder) / MARKER
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("kind") not in KINDS:
        return None
    files = [f for f in raw.get("files", []) if isinstance(f, str) and _plain_name(f)]
    return Marker(raw["kind"], str(raw.get("id", "")), str(raw.get("created", "")), files)


def _plain_name(name: str) -> bool:
    """A name inside the folder: no separators climbing out, not the marker itself."""
    parts = Path(name).parts
    return bool(parts) and ".." not in parts and not Path(name).is_absolute() and name != MARKER


def write_marker(folder: str | Path, marker: Marker) -> None:
    text = json.dumps(marker.to_dict(), indent=1) + "\n"
    write_atomic(Path(folder) / MARKER, lambda tmp: tmp.write_text(text))


def record(folder: str | Path, *names: str) -> None:
    """Add ``names`` to the files an owned folder's marker lists (before writing them)."""
    marker = read_marker(folder)
    if marker is None:
        raise OutputError(f"{folder} is not a folder mlx-pref owns (no {MARKER})")
    if set(names) - set(marker.files):
        marker.files = [*marker.files, *names]
        write_marker(folder, marker)


def legacy_run(folder: Path) -> bool:
    """A run made before markers existed: its config plus a checkpoint whose manifest
    verifies (only mlx-pref writes those)."""
    return (folder / "config.yaml").is_file() and any(
        verify(p) is None for p in list_checkpoints(folder)
    )


def _is_empty(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_writable(folder: Path, flag: str) -> None:
    """Refuse a folder that cannot be created or written, by writing a probe beside it
    (the probe is removed; the folder itself is not created)."""
    target = Path(folder)
    probe_in = target
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if probe_in.exists() and not probe_in.is_dir():
        what = "is a file" if probe_in == target else f"is inside {probe_in}, which is a file"
        raise OutputError(f"{flag} {folder} {what}; pick a folder")
    try:
        tempfile.TemporaryDirectory(dir=probe_in, prefix=".mlx-pref-probe-").cleanup()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{flag} {folder}: cannot write in {probe_in} ({reason})") from None


def check_output(
    folder: str | Path,
    kind: str,
    *,
    overwrite: bool = False,
    protected: Iterable[str | Path] = (),
    flag: str = "--output",
    continues: bool = False,
) -> Marker | None:
    """Decide, before any work, whether ``folder`` may receive a new ``kind`` output.

    A new or empty folder is fine. An existing output of the same kind is fine only with
    ``overwrite`` (its own files are replaced once the new one has been validated). Any
    other non-empty folder is refused, with or without ``overwrite``. ``continues``: an
    existing output of the kind is continued (a loss sweep). Returns the folder's marker.
    """
    folder = Path(folder)
    check_writable(folder, flag)
    if not folder.exists() or _is_empty(folder):
        return None
    target = _resolved(folder)
    cwd = Path.cwd().resolve()
    marker = read_marker(folder)
    if marker is None:
        legacy = " (a run from an older mlx-pref? delete it yourself)" if legacy_run(folder) else ""
        raise OutputError(
            f"{flag} {folder} is not empty and is not an mlx-pref {kind} folder{legacy}; "
            "pick a new or empty folder"
        )
    if marker.kind != kind:
        raise OutputError(f"{flag} {folder} holds an mlx-pref {marker.kind}, not a {kind}")
    if not marker.files or (continues and not overwrite):  # nothing written yet, or resumed
        return marker
    if not overwrite:
        if kind == "export":
            hint = "pick another folder or pass --overwrite"
        else:
            hint = f"continue it with 'mlx-pref train --resume {folder}', pick another {flag}, or pass --overwrite"
        raise OutputError(
            f"{flag} {folder} already holds a{'n' if kind == 'export' else ''} {kind}; {hint}"
        )
    if _inside(cwd, target):
        raise OutputError(
            f"--overwrite will not replace {folder}: it is the working directory or one of its parents"
        )
    for item in protected:
        path = _resolved(item)
        if _inside(path, target):
            raise OutputError(
                f"--overwrite would replace {folder}, which holds {item}, an input of this "
                "command; move that input out or pick another folder"
            )
    if kind == "export":
        extra = sorted({p.name for p in folder.iterdir()} - {MARKER, *marker.files})
        if extra:
            raise OutputError(
                f"--overwrite will not replace {folder}: it also holds {', '.join(extra[:3])}, "
                "which mlx-pref did not write; move them or pick another folder"
            )
    return marker


def claim(folder: str | Path, kind: str, files: Iterable[str] = ()) -> Marker:
    """Make ``folder`` (new, empty, or already this kind's) mlx-pref's, listing ``files``."""
    folder = Path(folder)
    marker = read_marker(folder) if folder.is_dir() else None
    if marker is None:
        if folder.exists() and not _is_empty(folder) and not legacy_run(folder):
            raise OutputError(
                f"{folder} is not empty and is not an mlx-pref {kind} folder; pick a new or "
                "empty folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        marker = Marker(kind)
    elif marker.kind != kind:
        raise OutputError(f"{folder} holds an mlx-pref {marker.kind}, not a {kind}")
    marker.files = [*marker.files, *files]
    write_marker(folder, marker)
    return marker


def clear(folder: str | Path) -> None:
    """Delete what mlx-pref wrote in ``folder`` (the names its marker lists; a sweep's
    sub-runs likewise), keeping anything a user added and the marker itself, so the next
    run or export takes the folder over."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return
    for name in marker.files:
        path = folder / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            if name == CHECKPOINTS:
                _remove_checkpoints(path)
            elif read_marker(path) is not None:
                clear(path)
                (path / MARKER).unlink()
                if _is_empty(path):
                    path.rmdir()
    write_marker(folder, Marker(marker.kind))


def _remove_checkpoints(root: Path) -> None:
    """Checkpoint folders (``step-*``, and temporary ``.tmp-step-*``), nothing else."""
    for path in root.iterdir():
        if path.is_dir() and (path.name.startswith("step-") or path.name.startswith(".tmp-step-")):
            shutil.rmtree(path)
    if _is_empty(root):
        root.rmdir()


def swap_in(folder: Path, tmp: Path, kind: str) -> None:
    """Put a fully written ``tmp`` folder in place of ``folder`` (absent, empty, or an
    output of ``kind`` that mlx-pref owns), marking it as ``kind``."""
    write_marker(tmp, Marker(kind, files=sorted(p.name for p in tmp.iterdir())))
    if folder.exists():
        if not (_is_empty(folder) or (read_marker(folder) or Marker("")).kind == kind):
            raise OutputError(f"{folder} changed while exporting; the export is in {tmp}")
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old)
    else:
        os.rename(tmp, folder)
