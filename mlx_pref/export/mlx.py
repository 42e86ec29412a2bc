"""The ``mlx`` export: the adapter exactly as mlx-lm loads it (``--adapter-path``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlx_pref.adapters import ADAPTER_CONFIG, ADAPTER_FILE
from mlx_pref.export.card import model_card
from mlx_pref.export.run import CARD_FILE, BaseModel, Destination, Run


def write_mlx(run: Run, base: BaseModel, out: Path, dest: Destination, dequantize: bool) -> None:
    """The adapter files as they are (mlx-lm's format), plus a model card."""
    for name in (ADAPTER_FILE, ADAPTER_CONFIG):
        shutil.copyfile(run.adapter_dir / name, out / name)
    notes = []
    if run.config.quantization:
        notes.append(
            f"Trained on a {run.config.quantization} quantized copy of the base model; "
            "mlx-lm applies the adapter to whichever copy of the base you load."
        )
    (out / CARD_FILE).write_text(
        model_card(run, base, "mlx", "mlx", dest.output, dest.repo_id, notes)
    )
