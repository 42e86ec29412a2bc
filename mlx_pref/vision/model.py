"""Vision-language models through mlx-vlm, and LoRA on their language model only.

``load_vision`` loads a model folder whose ``config.json`` has a ``vision_config`` with
mlx-vlm's own loader (the ``mlx-pref[vision]`` extra) and registers the forward that
scores its batches (``vision.forward``). The supported architectures are the ones that
forward is written for (``SUPPORTED``); any other is a one-line error that names them.

Adapters go on the language model's blocks (``model.layers`` of an mlx-vlm model are
its language model's), with mlx-lm's LoRA layers, so the reference (adapters off), the
checkpoints and every other adapter path of mlx-pref work unchanged; the vision tower and
the projector stay frozen. The adapter config lists each adapted module by its full path
(``language_model.model.layers.0.self_attn.q_proj``), the spelling mlx-vlm reads:
``mlx_vlm.load(BASE, adapter_path=RUN_DIR)`` loads a run's adapter.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_pref import logps
from mlx_pref.adapters import adapter_config, adapter_parameters, load_adapter_weights
from mlx_pref.config import LoraConfig
from mlx_pref.errors import ModelError
from mlx_pref.vision.forward import vision_logps
from mlx_pref.vision.processor import VisionTokenizer, load_vision_tokenizer, mlx_vlm_utils

SUPPORTED = ("qwen2_vl", "qwen2_5_vl")
"""mlx-vlm architectures whose language model takes explicit M-RoPE positions and an
attention mask (Qwen2-VL, Qwen2.5-VL)."""


def load_vision(path: Path, config: dict) -> tuple[nn.Module, VisionTokenizer]:
    """Model and tokenizer (with its processor) of the VLM in ``path``, ready to score."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ModelError(
            f"{path}: vision-language model type '{model_type}' is not supported for "
            f"training yet; supported: {', '.join(SUPPORTED)}"
        )
    utils = mlx_vlm_utils()
    tokenizer = load_vision_tokenizer(path, config)
    try:
        model = utils.load_model(Path(path), lazy=False)
    except (ValueError, RuntimeError, OSError) as exc:
        text = str(exc).strip().splitlines()
        raise ModelError(
            f"cannot load the model in {path}: {text[0] if text else type(exc).__name__}"
        ) from None
    model.mlx_pref_tokenizer = tokenizer  # the forward prepares the images with it
    logps.FORWARDS[type(model)] = vision_logps
    return model, tokenizer


def _module_paths(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def full_keys(model: nn.Module, config: dict) -> list[str]:
    """The adapted modules' full paths (mlx-vlm's ``keys``) for an mlx-lm adapter config."""
    paths = _module_paths(model)
    blocks = model.layers[-config["num_layers"] :]
    keys = config["lora_parameters"]["keys"]
    return [f"{paths[id(block)]}.{key}" for block in blocks for key in keys]


def _adapt(model: nn.Module, config: dict) -> None:
    """Put LoRA (or DoRA) layers at the full paths an mlx-vlm adapter config lists."""
    params = config["lora_parameters"]
    layer = DoRALinear if config.get("fine_tune_type") == "dora" else LoRALinear
    modules = dict(model.named_modules())
    swapped = []
    for key in params["keys"]:
        if key not in modules:
            raise ModelError(f"adapter module {key} is not in the model")
        swapped.append(
            (key, layer.from_base(modules[key], params["rank"], params["dropout"], params["scale"]))
        )
    model.update_modules(tree_unflatten(swapped))


def attach_vision_adapters(
    model: nn.Module, lora: LoraConfig, start_from: str | None = None
) -> tuple[dict, dict[str, mx.array] | None]:
    """Adapters on the language model (the vision tower and projector frozen), fresh or
    continued from an adapter folder in mlx-vlm's spelling; the same contract as
    ``adapters.attach_adapters``."""
    model.freeze()
    if start_from is None:
        config = adapter_config(model, lora)
        linear_to_lora_layers(
            model, config["num_layers"], config["lora_parameters"], use_dora=lora.dora
        )
        keys = full_keys(model, config)
        config["lora_parameters"] = {**config["lora_parameters"], "keys": keys}
    else:
        config, weights = load_adapter_weights(start_from)
        if "keys" not in config.get("lora_parameters", {}):
            raise ModelError(f"adapter {start_from} lists no modules (lora_parameters.keys)")
        _adapt(model, config)
        try:
            model.load_weights(list(weights.items()), strict=False)
        except ValueError as exc:
            raise ModelError(f"adapter {start_from} does not fit the model: {exc}") from None
    model.train()
    mx.eval(model.parameters())
    return config, (adapter_parameters(model) if start_from else None)
