"""LoRA/DoRA adapters in mlx-lm's own layers and on-disk format.

``adapters.safetensors`` + ``adapter_config.json`` written here load unchanged with
``mlx_lm.generate --adapter-path`` and ``mlx_lm.fuse``. ``adapters_disabled`` swaps
each adapted layer back to its frozen base layer for a forward pass: the reference
model of a LoRA run, with no second copy of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_pref.checkpoint import write_atomic
from mlx_pref.config import LoraConfig
from mlx_pref.errors import ModelError

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
ADAPTER_TYPES = (LoRALinear, DoRALinear, LoRAEmbedding, DoRAEmbedding, LoRASwitchLinear)


def _expert_layers() -> tuple[type, ...]:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (SwitchLinear, QuantizedSwitchLinear)


def _matches(path: str, target: str) -> bool:
    """``q_proj`` names every module of that name; a dotted target (``switch_mlp.up_proj``,
    ``block_sparse_moe.gate``) the modules whose path ends with it."""
    return path == target or path.endswith("." + target)


def layer_keys(model: nn.Module, targets: list[str]) -> list[str]:
    """Module paths inside a transformer block (``self_attn.q_proj``) matching the target
    names (``q_proj``, or a path's end such as ``mlp.switch_mlp.up_proj``), in mlx-lm's
    ``keys`` spelling. A Mixture-of-Experts block's router is ``gate`` and its experts'
    projections live under ``switch_mlp``."""
    found = set()
    for layer in model.layers:
        for name, module in layer.named_modules():
            if name and any(_matches(name, t) for t in targets) and hasattr(module, "weight"):
                found.add(name)
    missing = [t for t in targets if not any(_matches(k, t) for k in found)]
    if missing:
        kinds = (nn.Linear, nn.QuantizedLinear, *_expert_layers())
        available = sorted(
            {
                n.split(".")[-1]
                for layer in model.layers
                for n, m in layer.named_modules()
                if isinstance(m, kinds)
            }
        )
        raise ModelError(
            f"lora.target_modules: {', '.join(missing)} not found in the model's blocks; "
            f"available: {', '.join(available)}"
        )
    return sorted(found)


def adapter_config(model: nn.Module, lora: LoraConfig) -> dict:
    """mlx-lm's adapter_config.json contents for these settings on this model."""
    if lora.layers is not None and lora.layers > len(model.layers):
        raise ModelError(
            f"lora.layers is {lora.layers} but the model has {len(model.layers)} blocks; "
            f"use at most {len(model.layers)} (or leave it out for all)"
        )
    keys = layer_keys(model, lora.target_modules)
    if lora.dora:
        experts = sorted(
            {
                n
                for layer in model.layers
                for n, m in layer.named_modules()
                if n in keys and isinstance(m, _expert_layers())
            }
        )
        if experts:
            raise ModelError(
                f"lora.dora: mlx-lm has no DoRA for mixture-of-experts layers ({experts[0]}, "
                "...): leave the experts out of target_modules, or use LoRA"
            )
    return {
        "fine_tune_type": "dora" if lora.dora else "lora",
        "num_layers": lora.layers or len(model.layers),
        "lora_parameters": {
            "rank": lora.r,
            "scale": lora.scale,
            "dropout": lora.dropout,
            "keys": keys,
        },
    }


def apply_lora(model: nn.Module, lora: LoraConfig) -> dict:
    """Freeze the base and add trainable adapters; returns the adapter config written to disk."""
    config = adapter_config(model, lora)
    model.freeze()
    linear_to_lora_layers(
        model, config["num_layers"], config["lora_parameters"], use_dora=lora.dora
    )
    return config


def adapter_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The adapter weights by their flat names (what ``adapters.safetensors`` holds)."""
    return {
        k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES
    }


def set_adapter_parameters(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Replace adapter arrays by name (a blended reference adapter may have a higher rank)."""
    model.update(tree_unflatten(list(weights.items())))


def save_adapters(model: nn.Module, directory: str | Path, config: dict) -> None:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` (mlx-lm format), each
    atomically, so a crash never leaves a half-written adapter."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = adapter_parameters(model)
    write_atomic(directory / ADAPTER_FILE, lambda tmp: mx.save_safetensors(str(tmp), weights))
    text = json.dumps(config, indent=2) + "\n"
    write_atomic(directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(text))


def load_adapter_weights(directory: str | Path) -> tuple[dict, dict[str, mx.array]]:
    """Read an adapter directory: its config and weights."""
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_FILE):
        if not (directory / name).exists():
            raise ModelError(f"{directory} is not an adapter directory: {name} is missing")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    return config, mx.load(str(directory / ADAPTER_FILE))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the frozen base: every adapted layer is replaced by its base layer meanwhile."""
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]
    base = [(name, m.linear if hasattr(m, "linear") else m.embedding) for name, m in swapped]
    model.update_modules(tree_unflatten(base))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten(swapped))


def attach_adapters(
    model: nn.Module, lora: LoraConfig, start_from: str | None = None
) -> tuple[dict, dict[str, mx.array] | None]:
    """Fresh trainable adapters, or (``start_from``) an SFT adapter to continue from.

    Returns the adapter config written with the run, and a frozen copy of the SFT
    adapter's weights (the reference keeps it, as TRL's ``ref_adapter_name``; the base is
    never copied). An SFT adapter is rebuilt with its own settings: mlx-lm's loader checks
    that every tensor fits.
    """
    from mlx_lm.tuner.utils import load_adapters

    model.freeze()
    if start_from is None:
        config = apply_lora(model, lora)
    else:
        config, _ = load_adapter_weights(start_from)  # clear errors for a bad directory
        try:
            load_adapters(model, start_from)
        except (ValueError, KeyError) as exc:
            raise ModelError(f"adapter {start_from} does not fit the model: {exc}") from None
    model.train()  # dropout on in the adapters; evaluation switches it off
    mx.eval(model.parameters())
    return config, (adapter_parameters(model) if start_from else None)
