"""The ``fused`` export: the adapter merged into the base with mlx-lm's own ``fuse()``,
written in the Hugging Face layout; a quantized base stays MLX-quantized unless
``dequantize``. A GGUF base gets the tokenizer its metadata describes. A full fine-tuning
run already holds a whole model folder: its export (``mlx`` or ``fused``) copies it."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlx.utils import tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

from mlx_pref.export.card import model_card
from mlx_pref.export.run import CARD_FILE, BaseModel, Destination, ExportError, Run
from mlx_pref.model_folder import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    WEIGHTS_INDEX,
    folder_format,
    quantization_of,
    save_model_folder,
    weight_files,
)
from mlx_pref.models import LoadedModel, load_model


def fused_model(run: Run, base: BaseModel, dequantize: bool) -> LoadedModel:
    """The run's model with its adapter merged by mlx-lm's ``fuse()`` (a full fine-tuning
    run: its own model folder); with ``dequantize``, every weight in float."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model

    if run.full:
        loaded = load_model(str(run.adapter_dir))
        loaded.model = dequantize_model(loaded.model) if dequantize else loaded.model
        return loaded
    cfg = run.config
    loaded = load_model(
        cfg.model,
        quantization_bits=cfg.quantization_bits,
        dtype=cfg.dtype,
        dequantize=bool(dequantize and base.gguf),
    )
    model = loaded.model
    try:
        load_adapters(model, str(run.adapter_dir))
    except ValueError as exc:
        raise ExportError(f"{run.adapter_dir}: {exc}".replace("\n", " ")) from None
    fused = [
        (name, module.fuse(dequantize=dequantize))
        for name, module in model.named_modules()
        if isinstance(
            module, (LoRALinear, DoRALinear, LoRAEmbedding, DoRAEmbedding, LoRASwitchLinear)
        )
    ]
    model.update_modules(tree_unflatten(fused))
    loaded.model = dequantize_model(model) if dequantize else model
    return loaded


def write_fused(run: Run, base: BaseModel, out: Path, dest: Destination, dequantize: bool) -> None:
    """The base with the adapter merged (mlx-lm's ``fuse``), in the Hugging Face layout."""
    loaded = fused_model(run, base, dequantize)
    model = loaded.model
    quantization = quantization_of(model)
    if base.gguf and quantization is not None:  # a GGUF's per-tensor bits, as loaded
        quantization = loaded.config.get("quantization", quantization)
    _, hf_layout = save_model_folder(
        model,
        out,
        config=base.config(),
        hf_names=base.weight_names(),
        tokenizer_source=None if base.gguf else loaded.path,
        tokenizer=loaded.tokenizer if base.gguf else None,
        quantization=quantization,
    )
    library = "transformers" if hf_layout else "mlx"
    notes = _fused_notes(run, quantization, hf_layout, dequantize)
    (out / CARD_FILE).write_text(
        model_card(run, base, "fused", library, dest.output, dest.repo_id, notes)
    )


def write_full(run: Run, base: BaseModel, out: Path, dest: Destination, dequantize: bool) -> None:
    """A full fine-tuning run's model folder (or a checkpoint's), copied with a model card."""
    src = run.adapter_dir
    files = [*weight_files(src), src / "config.json"]
    for pattern in (WEIGHTS_INDEX, GENERATION_CONFIG, *TOKENIZER_FILES):
        files += sorted(src.glob(pattern))
    for file in files:
        shutil.copyfile(file, out / file.name)
    library = "transformers" if folder_format(src) == "pt" else "mlx"
    notes = [] if library == "transformers" else [
        "The weight names follow mlx-lm's model: this model loads with mlx-lm only."
    ]  # fmt: skip
    (out / CARD_FILE).write_text(
        model_card(run, base, "fused", library, dest.output, dest.repo_id, notes)
    )


def _fused_notes(
    run: Run, quantization: dict | None, hf_layout: bool, dequantize: bool
) -> list[str]:
    notes = []
    if quantization is not None:
        notes.append(
            f"MLX-quantized ({quantization['bits']}-bit, group size {quantization['group_size']}): "
            "loads with mlx-lm only. Export with --dequantize for a float model that "
            "transformers loads too."
        )
    elif not hf_layout:
        notes.append(
            "The weight names follow mlx-lm's model, which differs from the Hugging Face "
            "checkpoint here: this model loads with mlx-lm only."
        )
    if run.config.quantization and dequantize:
        notes.append(
            f"Trained on a {run.config.quantization} quantized base; the fused weights are the "
            "dequantized base plus the adapter, in float."
        )
    return notes
