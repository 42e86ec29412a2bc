"""The ``fused`` export: the adapter merged into the base with mlx-lm's own ``fuse()``,
written in the Hugging Face layout; a quantized base stays MLX-quantized unless
``dequantize``. A GGUF base gets the tokenizer its metadata describes."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

from mlx_pref.export.card import model_card
from mlx_pref.export.run import CARD_FILE, BaseModel, Destination, ExportError, Run, write_json
from mlx_pref.models import LoadedModel, load_model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.tiktoken",
)
GENERATION_CONFIG = "generation_config.json"


def fused_model(run: Run, base: BaseModel, dequantize: bool) -> LoadedModel:
    """The run's base as training loaded it, with the adapter merged by mlx-lm's
    ``fuse()``; with ``dequantize``, every weight in float."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model

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
    from mlx_lm.utils import make_shards

    loaded = fused_model(run, base, dequantize)
    model = loaded.model
    weights = dict(tree_flatten(model.parameters()))
    quantization = _quantization(model)
    if base.gguf and quantization is not None:  # a GGUF's per-tensor bits, as loaded
        quantization = loaded.config.get("quantization", quantization)
    hf_layout = quantization is None and set(weights) <= base.weight_names()
    metadata = {"format": "pt" if hf_layout else "mlx"}
    shards = make_shards(weights)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        mx.save_safetensors(str(out / name), shard, metadata=metadata)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in sorted(s)},
        }
        write_json(out / "model.safetensors.index.json", index)
    config = fused_config(base.config(), weights, quantization)
    write_json(out / "config.json", config)
    if base.gguf:  # the tokenizer the GGUF describes, in transformers' files
        loaded.tokenizer._tokenizer.save_pretrained(str(out))
        write_json(out / GENERATION_CONFIG, _token_ids(config))
    else:
        _copy_tokenizer(loaded.path, out, config)
    library = "transformers" if hf_layout else "mlx"
    notes = _fused_notes(run, quantization, hf_layout, dequantize)
    (out / CARD_FILE).write_text(
        model_card(run, base, "fused", library, dest.output, dest.repo_id, notes)
    )


def _quantization(model: nn.Module) -> dict | None:
    """mlx-lm's ``quantization`` config entry for the model's quantized layers, if any."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
    return None


def fused_config(config: dict, weights: dict[str, mx.array], quantization: dict | None) -> dict:
    """The base's config.json for the fused weights: mlx-lm's quantization keys only when
    the weights are quantized, and the dtype the float weights really have."""
    config = dict(config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization"] = dict(quantization)
        config["quantization_config"] = dict(quantization)
    floats = [v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    if floats:
        dtype = max(set(floats), key=floats.count)
        name = str(dtype).rsplit(".", 1)[-1]
        for key in ("torch_dtype", "dtype"):
            if key in config or (key == "torch_dtype" and "dtype" not in config):
                config[key] = name
    return config


def _copy_tokenizer(src: Path, out: Path, config: dict) -> None:
    """Tokenizer files and generation config, as the base has them (no code files)."""
    for pattern in (*TOKENIZER_FILES, GENERATION_CONFIG):
        for file in src.glob(pattern):
            shutil.copyfile(file, out / file.name)
    if not (out / GENERATION_CONFIG).exists():
        write_json(out / GENERATION_CONFIG, _token_ids(config))


def _token_ids(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


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
