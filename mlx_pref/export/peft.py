"""The ``peft`` export: an adapter ``PeftModel.from_pretrained`` loads onto the original
Hugging Face model.

mlx-lm keeps ``lora_a`` (in, r) and ``lora_b`` (r, out) with ``scale``; PEFT keeps
``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r) with ``lora_alpha`` and scaling
alpha / r, so the factors are transposed and ``lora_alpha = scale * r``. DoRA's magnitude
``m`` is PEFT's ``lora_magnitude_vector`` unchanged: both are the norm of each output row
of W + ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

from mlx_pref.adapters import ADAPTER_CONFIG, ADAPTER_FILE, ADAPTER_LEAVES
from mlx_pref.export.card import model_card
from mlx_pref.export.run import CARD_FILE, BaseModel, Destination, ExportError, Run, write_json

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PEFT_TIED_HEAD = "lm_head"  # the output module tied to the input embedding in HF causal LMs


@dataclass
class AdapterLayout:
    """The adapter layers mlx-lm builds for a config on a base model."""

    modules: dict[str, nn.Module]
    """Adapter layers by module path (``model.layers.0.self_attn.q_proj``)."""
    base_modules: set[str]
    """Every module path of the base model before adapters were added."""
    tied: bool
    """The LM head reuses the input embedding (there is no ``lm_head`` module)."""


def adapter_layout(base: BaseModel, adapter_config: dict) -> AdapterLayout:
    """Rebuild the run's adapter layers on the base with mlx-lm; weights stay unread (lazy)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    kind = adapter_config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise ExportError(f"fine_tune_type {kind!r} is not an adapter; only lora and dora export")
    try:
        model = base.skeleton()
        base_modules = {name for name, _ in model.named_modules() if name}
        linear_to_lora_layers(
            model,
            adapter_config["num_layers"],
            adapter_config["lora_parameters"],
            use_dora=kind == "dora",
        )
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise ExportError(f"cannot rebuild the adapter layers on {base.name}: {exc}") from None
    modules = {n: m for n, m in model.named_modules() if hasattr(m, "lora_a")}
    return AdapterLayout(modules, base_modules, PEFT_TIED_HEAD not in base_modules)


def check_adapter_weights(
    modules: dict[str, nn.Module], weights: dict[str, mx.array], dora: bool
) -> None:
    """Every saved tensor belongs to an adapter layer, and every layer has its tensors."""
    leaves = ("lora_a", "lora_b", "m") if dora else ("lora_a", "lora_b")
    expected = {f"{path}.{leaf}" for path in modules for leaf in leaves}
    stray = sorted(
        k for k in weights if k not in expected and k.rsplit(".", 1)[-1] in ADAPTER_LEAVES
    )
    missing = sorted(expected - set(weights))
    if stray or missing:
        raise ExportError(
            f"{ADAPTER_FILE} does not match {ADAPTER_CONFIG}: "
            + "; ".join(
                p for p in (_listing("unexpected", stray), _listing("missing", missing)) if p
            )
        )


def _listing(label: str, names: list[str]) -> str:
    if not names:
        return ""
    more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
    return f"{label} {', '.join(names[:3])}{more}"


def peft_tensors(
    modules: dict[str, nn.Module], weights: dict[str, mx.array], tied: bool
) -> dict[str, mx.array]:
    """mlx-lm adapter tensors under PEFT's names and layouts.

    Linear: ``lora_A.weight = lora_a.T`` (r, in), ``lora_B.weight = lora_b.T`` (out, r),
    DoRA ``lora_magnitude_vector = m`` (out,). Embedding: ``lora_embedding_A = lora_a.T``
    (r, vocab), ``lora_embedding_B = lora_b.T`` (dims, r). A tied LM head computes
    ``x @ (W + s·a·b)ᵀ`` in mlx-lm, which is a Linear LoRA with ``lora_A = b``,
    ``lora_B = a``: written under ``lm_head`` the way PEFT itself saves tied adapters.
    """
    out: dict[str, mx.array] = {}
    for path, module in sorted(modules.items()):
        a, b = weights[f"{path}.lora_a"], weights[f"{path}.lora_b"]
        key = PEFT_PREFIX + path
        if isinstance(module, (LoRALinear, DoRALinear)):
            out[f"{key}.lora_A.weight"] = a.T
            out[f"{key}.lora_B.weight"] = b.T
            if isinstance(module, DoRALinear):
                out[f"{key}.lora_magnitude_vector"] = weights[f"{path}.m"]
        elif isinstance(module, DoRAEmbedding):
            raise ExportError(
                f"{path}: DoRA on an embedding has no PEFT equivalent (mlx-lm normalises each "
                "token's vector, PEFT each embedding dimension); export --format fused or mlx"
            )
        elif isinstance(module, LoRAEmbedding):
            out[f"{key}.lora_embedding_A"] = a.T
            out[f"{key}.lora_embedding_B"] = b.T
            if tied:
                out[f"{PEFT_PREFIX}{PEFT_TIED_HEAD}.lora_A.weight"] = b
                out[f"{PEFT_PREFIX}{PEFT_TIED_HEAD}.lora_B.weight"] = a
        elif isinstance(module, LoRASwitchLinear):
            raise ExportError(
                f"{path}: LoRA on mixture-of-experts layers has no PEFT equivalent; "
                "export --format fused or mlx"
            )
        else:
            raise ExportError(f"{path}: {type(module).__name__} cannot be exported to PEFT")
    return out


def peft_target_modules(layout: AdapterLayout) -> list[str]:
    """PEFT's ``target_modules``: the short names (``q_proj``) when they select exactly the
    adapted modules, else the full module paths (when only some blocks are adapted)."""
    adapted = set(layout.modules)
    short = sorted({path.rsplit(".", 1)[-1] for path in adapted})
    selected = {n for n in layout.base_modules if n.rsplit(".", 1)[-1] in short}
    return short if selected == adapted else sorted(adapted)


def peft_config(run: Run, base: BaseModel, targets: list[str], tied_embedding: bool) -> dict:
    """PEFT's adapter_config.json for this adapter (alpha = scale * r, so scaling matches)."""
    params = run.adapter_config["lora_parameters"]
    rank = params["rank"]
    alpha = params["scale"] * rank
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.pretrained_id(),
        "r": rank,
        "lora_alpha": int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha,
        "lora_dropout": params.get("dropout", 0.0),
        "target_modules": targets,
        "bias": "none",
        "use_dora": run.dora,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    if tied_embedding:
        config["ensure_weight_tying"] = True
    return config


def write_peft(run: Run, base: BaseModel, out: Path, dest: Destination, dequantize: bool) -> None:
    """A PEFT LoRA/DoRA adapter for the original Hugging Face model, plus a model card."""
    if base.gguf and not base.hub_id:
        raise ExportError(
            f"the run's base is a GGUF file ({base.spec}); a PEFT adapter applies to the Hugging "
            "Face model it came from: name it with --base-model ORG/NAME"
        )
    weights = mx.load(str(run.adapter_dir / ADAPTER_FILE))
    layout = adapter_layout(base, run.adapter_config)
    modules = layout.modules
    check_adapter_weights(modules, weights, run.dora)
    keys = base.weight_names()
    renamed = sorted(p for p in modules if f"{p}.weight" not in keys)
    if renamed:
        raise ExportError(
            f"{_listing('modules', renamed)}: no such weights in the base checkpoint {base.name}, "
            "so MLX and Hugging Face name them differently; export --format fused or mlx"
        )
    tensors = peft_tensors(modules, weights, layout.tied)
    tied_embedding = layout.tied and any(isinstance(m, LoRAEmbedding) for m in modules.values())
    targets = peft_target_modules(layout)
    if tied_embedding:  # PEFT >= 0.19 ties it to the embedding's adapter; older loads it as is
        targets.append(PEFT_TIED_HEAD)
    mx.save_safetensors(str(out / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
    write_json(out / PEFT_CONFIG, peft_config(run, base, targets, tied_embedding))
    (out / CARD_FILE).write_text(
        model_card(
            run,
            base,
            "peft",
            "peft",
            dest.output,
            dest.repo_id,
            _peft_notes(run, base, tied_embedding),
        )
    )


def _peft_notes(run: Run, base: BaseModel, tied_embedding: bool) -> list[str]:
    notes = []
    mlx_quantized = not base.gguf and "quantization" in base.config()
    if base.gguf:
        notes.append(
            f"Trained on the GGUF file {Path(base.spec).name}; the adapter applies to the "
            f"Hugging Face model {base.hub_id} it was converted from (a quantized GGUF gives "
            "outputs close to, not identical with, the float model's)."
        )
    elif run.config.quantization or mlx_quantized:
        notes.append(
            "Trained on a quantized copy of the base model (QLoRA). The PEFT adapter applies to "
            "the original float model; its outputs are close to, not identical with, those of "
            "the quantized model used in training."
        )
    if mlx_quantized:
        notes.append(
            "The base named here is an MLX-quantized checkpoint, which transformers cannot load: "
            "load the float model it was made from (export with --base-model to record it)."
        )
    if tied_embedding:
        notes.append(
            "The adapter changes the input embedding, which this model ties to its LM head, so "
            "the LM head changes too: `lm_head` carries the same update as a LoRA of its own, "
            "which `ensure_weight_tying` (PEFT 0.19 or newer) shares with the embedding's. Do "
            "not `merge_and_unload()` it: on tied weights PEFT applies the update twice. "
            "Export with `--format fused` for a merged model."
        )
    if run.dora:
        notes.append(
            "DoRA magnitudes are PEFT's `lora_magnitude_vector`: in both libraries the norm of "
            "each output row of W + ΔW."
        )
    return notes
