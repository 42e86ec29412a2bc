"""Checkpoints that survive a kill at any moment.

A checkpoint is a directory ``checkpoints/step-00000120/`` holding the adapters (mlx-lm
format), the optimizer state, and ``trainer_state.json`` (step, epoch, data position,
loss statistics). It is written into a temporary directory, every file fsynced, a
``manifest.json`` with each file's size and SHA-256 written last, and then renamed into
place. Loading takes the newest checkpoint whose manifest verifies, so a truncated or
half-written one is detected and the previous one used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mlx_pref.errors import WriteError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Create or replace ``path`` so that readers see the old file or the new one, whole:
    ``write(tmp)`` fills a temporary file beside it, which is fsynced and renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # MLX reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {_reason(exc)}") from None
    _fsync(path.parent)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__) + " (is the disk full?)"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:08d}"


def write_checkpoint(
    run_dir: Path, step: int, write_files: Callable[[Path], None], keep_last: int | None
) -> Path:
    """Atomically create the checkpoint for ``step``; ``write_files(tmp_dir)`` fills it.
    An intact checkpoint for the step is kept as it is."""
    final = write_verified_folder(checkpoint_dir(run_dir, step), write_files, step=step)
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _new_sibling(final: Path) -> Path:
    """A new temporary folder beside ``final``, created here: nothing already on disk (a
    crashed run's leftover under the same process id) is reused or removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{n}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            n += 1


def write_verified_folder(
    final: Path,
    write_files: Callable[[Path], None],
    *,
    step: int | None = None,
    replace: bool = False,
) -> Path:
    """Create the folder ``final`` atomically: ``write_files(tmp_dir)`` fills a temporary
    sibling, every file is fsynced, a manifest of sizes and SHA-256s is written last, and
    the folder is renamed into place. An intact ``final`` is kept unless ``replace``."""
    if final.exists() and verify(final) is None and not replace:
        return final
    what = "checkpoint" if step is not None else "folder"
    if final.exists() and not (final / MANIFEST).is_file():  # only replace what we wrote
        raise WriteError(f"cannot write {final}: it exists and mlx-pref did not write it")
    try:
        tmp = _new_sibling(final)
    except OSError as exc:
        raise WriteError(f"cannot write {what} {final}: {_reason(exc)}") from None
    try:
        write_files(tmp)
        manifest = {}
        for path in sorted(tmp.iterdir()):
            _fsync(path)
            manifest[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
    except (OSError, RuntimeError, WriteError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # created by this call, empty before it
        detail = str(exc) if isinstance(exc, WriteError) else _reason(exc)
        raise WriteError(f"cannot write {what} {final}: {detail}") from None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(final.parent)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable manifest"
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size != meta["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, expected {meta['bytes']}"
        if _sha256(file) != meta["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def latest_valid(run_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint; damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"warning: skipping damaged checkpoint {path}: {problem}")
    return None


def remove_after(run_dir: Path, step: int) -> None:
    """Delete checkpoints past ``step`` (a run resumed from an older one rewrites them)."""
    for path in list_checkpoints(run_dir):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path, ignore_errors=True)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())
