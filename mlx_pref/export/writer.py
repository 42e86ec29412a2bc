"""The one entry point of every export format: ``export_run`` (and ``export_and_push``).

The folder is filled beside its destination and renamed into place, so a failed export
leaves nothing half-written, and it is marked as mlx-pref's (``rundir``) so that
``--overwrite`` replaces an earlier export and never a folder of the user's.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from mlx_pref.checkpoint import CHECKPOINTS
from mlx_pref.config import EXPORT_FORMATS, GGUF_QUANTS
from mlx_pref.errors import MlxPrefError
from mlx_pref.export.fused import write_full, write_fused
from mlx_pref.export.gguf_lora import write_gguf_lora
from mlx_pref.export.gguf_model import write_gguf
from mlx_pref.export.hub import push_to_hub, validate_repo_id
from mlx_pref.export.mlx import write_mlx
from mlx_pref.export.peft import write_peft
from mlx_pref.export.run import Destination, ExportError, Run, identify_base, read_run
from mlx_pref.models import is_vision_config
from mlx_pref.rundir import OutputError, check_output, read_marker, record, swap_in

FORMATS = EXPORT_FORMATS


def default_output(run_dir: str | Path, fmt: str) -> Path:
    """``RUN_DIR/export-FMT`` (for a checkpoint: ``RUN/export-FMT-step-N`` beside it)."""
    run_dir = Path(run_dir)
    if run_dir.parent.name == CHECKPOINTS:
        return run_dir.parent.parent / f"export-{fmt}-{run_dir.name}"
    return run_dir / f"export-{fmt}"


def export_run(
    run_dir: str | Path,
    fmt: str,
    output: str | Path | None = None,
    *,
    dequantize: bool = False,
    base: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    quant: str | None = None,
) -> Path:
    """Write the run's adapter as ``fmt`` (mlx, peft, fused, gguf or gguf-lora) into
    ``output``; returns it.

    ``base`` records the base model's Hub id where the run used a local copy; ``repo_id``
    is where the export will be pushed (used in the model card's loading snippets);
    ``quant`` is the GGUF type of the matrices of a ``gguf`` export (default f16).
    The folder is assembled next to ``output`` and renamed into place, so a failed export
    leaves nothing half-written.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if dequantize and fmt != "fused":
        raise ExportError("--dequantize applies to --format fused only")
    if quant is not None and fmt != "gguf":
        raise ExportError("--quant applies to --format gguf only")
    if quant is not None and quant not in GGUF_QUANTS:
        raise ExportError(f"--quant {quant!r}: choose one of {', '.join(GGUF_QUANTS)}")
    if base is not None:
        validate_repo_id(base, "--base-model")
    run = read_run(run_dir)
    output = Path(output) if output is not None else default_output(run_dir, fmt)
    _check_output(output, run, overwrite)
    info = identify_base(run.config, base)
    # An adapter trained on dequantized weights is fused into dequantized weights.
    # A run records what it trained on (``dequantize`` true or false); an unresolved one
    # (null) trained on the base as its config describes it.
    dequantize = bool(dequantize or (fmt == "fused" and run.config.dequantize))
    writer = {
        "mlx": write_mlx,
        "peft": write_peft,
        "fused": write_fused,
        "gguf": partial(write_gguf, quant=quant or GGUF_QUANTS[0]),
        "gguf-lora": write_gguf_lora,
    }[fmt]
    if fmt != "mlx" and _vision_base(info):
        raise ExportError(
            f"{run_dir} trained a vision-language model: its adapter exports as --format mlx, "
            "which mlx_vlm.load(BASE, adapter_path=...) reads"
        )
    if run.full and fmt in ("peft", "gguf-lora"):
        raise ExportError(
            f"{run_dir} is a full fine-tuning run: it has no adapter to write in "
            f"{'PEFT' if fmt == 'peft' else 'GGUF LoRA'}'s format; --format fused (or mlx, or "
            "gguf) writes the whole model, which transformers loads with from_pretrained"
        )
    if run.full and fmt in ("mlx", "fused"):
        writer = write_full
    return _write_folder(
        output,
        lambda tmp: writer(run, info, tmp, Destination(output, repo_id), dequantize),
        run.root,
    )


def _vision_base(info) -> bool:
    """Whether the run's base is a vision-language model (mlx-vlm's)."""
    if info.gguf:
        return False
    try:
        return is_vision_config(info.config())
    except (MlxPrefError, OSError, ValueError):
        return False  # the format's own reading of the base says what is wrong


def _check_output(output: Path, run: Run, overwrite: bool) -> None:
    target = output.resolve()
    for protected in (run.root.resolve(), run.adapter_dir.resolve()):
        if target == protected or target in protected.parents:
            raise ExportError(f"--output {output} would overwrite the run itself; pick another")
    try:
        check_output(output, "export", overwrite=overwrite, protected=[run.root])
    except OutputError as exc:
        raise ExportError(str(exc)) from None


def _write_folder(output: Path, fill: Callable[[Path], None], run_root: Path) -> Path:
    """Fill a temporary sibling folder, then swap it in for ``output``; an export inside
    the run directory is listed in the run's marker."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".tmp-{output.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if output.parent.resolve() == run_root.resolve() and read_marker(run_root):
            record(run_root, output.name)
        swap_in(output, tmp, "export")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def export_and_push(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    fmt: str = "mlx",
    output: str | Path | None = None,
    base: str | None = None,
) -> Path:
    """Export a finished run and upload it: what ``train --push-to-hub`` calls at the end.

    Without ``output`` the export goes to ``RUN_DIR/export-FMT`` (replaced if present).
    Returns the exported folder, which stays on disk whether or not the upload succeeds.
    """
    validate_repo_id(repo_id)
    folder = export_run(run_dir, fmt, output, base=base, repo_id=repo_id, overwrite=output is None)
    push_to_hub(folder, repo_id, private=private)
    return folder
