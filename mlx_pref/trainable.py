"""What a run trains, behind one interface: LoRA/DoRA adapters (``Adapters``) or every
weight of the model (``FullWeights``, ``fine_tune: full``).

Each knows its weights by name (what checkpoints hold and the optimizer updates), how to
put saved ones back, and how to write a folder others load: an adapter folder for
``mlx_lm.generate --adapter-path``, or a whole model folder for ``mlx_lm.load`` and
transformers' ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_pref.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    adapter_parameters,
    attach_adapters,
    save_adapters,
    set_adapter_parameters,
)
from mlx_pref.errors import ConfigError, ModelError
from mlx_pref.model_folder import (
    load_folder_weights,
    planned_names,
    save_model_folder,
    source_weight_names,
)
from mlx_pref.models import LoadedModel, read_model_config


class Adapters:
    """LoRA or DoRA adapters on a frozen base (mlx-lm's layers and files)."""

    full = False

    def __init__(self, loaded: LoadedModel, cfg):
        self.model = loaded.model
        attach = attach_adapters
        if loaded.vision:  # on the language model only, in mlx-vlm's spelling
            from mlx_pref.vision.model import attach_vision_adapters as attach
        self.config, self.start_weights = attach(self.model, cfg.lora, cfg.adapter)
        """The adapter config written with the weights, and the SFT adapter the run
        started from (the reference keeps it), if any."""

    def weights(self) -> dict[str, mx.array]:
        return adapter_parameters(self.model)

    def load(self, weights: dict[str, mx.array]) -> None:
        set_adapter_parameters(self.model, weights)

    def save(self, directory: Path) -> list[str]:
        """Write the adapter folder; returns the names written."""
        save_adapters(self.model, directory, self.config)
        return [ADAPTER_FILE, ADAPTER_CONFIG]

    def load_from(self, directory: Path) -> None:
        self.load(mx.load(str(Path(directory) / ADAPTER_FILE)))

    def files(self) -> list[str]:
        """The names ``save`` writes into a run directory."""
        return [ADAPTER_FILE, ADAPTER_CONFIG]


class FullWeights:
    """Every weight of the model trained; saved as a whole model folder."""

    full = True

    def __init__(self, loaded: LoadedModel, cfg):
        self.model, self.loaded = loaded.model, loaded
        quantized = [n for n, m in self.model.named_modules() if hasattr(m, "bits")]
        if quantized:
            raise ConfigError(
                f"fine_tune: full trains float weights but {loaded.path} is quantized "
                f"({quantized[0]}, ...): add dequantize: true, or train adapters"
            )
        self.config = {"fine_tune_type": "full"}
        self.start_weights = None
        self.model.unfreeze()
        self.model.train()
        self._names: set[str] | None = None

    def weights(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.model.trainable_parameters()))

    def load(self, weights: dict[str, mx.array]) -> None:
        self.model.update(tree_unflatten(list(weights.items())))

    def save(self, directory: Path) -> list[str]:
        """Write a model folder (config, weights, tokenizer); returns the names written."""
        loaded = self.loaded
        gguf = str(loaded.path).endswith(".gguf")
        if self._names is None:
            self._names = source_weight_names(loaded.path)
        names, _ = save_model_folder(
            self.model,
            Path(directory),
            config=loaded.config if gguf else read_model_config(loaded.path),
            hf_names=self._names,
            tokenizer_source=None if gguf else loaded.path,
            tokenizer=loaded.tokenizer if gguf else None,
        )
        return names

    def load_from(self, directory: Path) -> None:
        weights = load_folder_weights(Path(directory))
        if not weights:
            raise ModelError(f"{directory} holds no model weights (model*.safetensors)")
        self.load(weights)

    def files(self) -> list[str]:
        gguf = str(self.loaded.path).endswith(".gguf")
        return planned_names(self.model, None if gguf else self.loaded.path)


def make_trainable(loaded: LoadedModel, cfg) -> Adapters | FullWeights:
    """Adapters on the frozen base, or (``fine_tune: full``) every weight unfrozen."""
    return FullWeights(loaded, cfg) if cfg.full else Adapters(loaded, cfg)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting quantized weights as mlx-lm does."""
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, get_total_parameters(model)
