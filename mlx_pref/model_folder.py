"""A whole model written as a folder that mlx-lm and transformers load: ``config.json``,
``model.safetensors`` (sharded when large), the tokenizer files and
``generation_config.json``. What the fused export and full fine-tuning write."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_pref.checkpoint import write_atomic

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
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def checkpoint_keys(base_path: Path) -> set[str]:
    """Tensor names in a Hugging Face checkpoint, read from the safetensors headers only."""
    keys: set[str] = set()
    for file in sorted(Path(base_path).glob("*.safetensors")):
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        keys.update(k for k in header if k != "__metadata__")
    return keys


def folder_format(folder: Path) -> str | None:
    """The ``format`` a model folder's first weight file records (``pt``: the Hugging Face
    layout; ``mlx``: mlx-lm's names or quantization)."""
    files = sorted(Path(folder).glob("model*.safetensors"))
    if not files:
        return None
    with open(files[0], "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return header.get("__metadata__", {}).get("format")


def source_weight_names(spec: str | Path) -> set[str]:
    """The tensor names of a model in the Hugging Face layout: a folder's safetensors
    headers, or the names a GGUF file's tensors take."""
    if str(spec).endswith(".gguf"):
        from mlx_pref.gguf import hf_tensor_names

        return hf_tensor_names(str(spec))
    return checkpoint_keys(Path(spec))


def quantization_of(model: nn.Module) -> dict | None:
    """mlx-lm's ``quantization`` config entry for the model's quantized layers, if any."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
    return None


def model_config(config: dict, weights: dict[str, mx.array], quantization: dict | None) -> dict:
    """The base's config.json for these weights: mlx-lm's quantization keys only when the
    weights are quantized, and the dtype the float weights really have."""
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


def _json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def token_ids(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


def save_model_folder(
    model: nn.Module,
    out: Path,
    *,
    config: dict,
    hf_names: set[str],
    tokenizer_source: Path | None = None,
    tokenizer=None,
    quantization: dict | None = None,
) -> tuple[list[str], bool]:
    """Write ``model`` into ``out`` as a loadable model folder; returns the names written
    and whether the weights are in the Hugging Face layout (float, with the base's tensor
    names), which transformers loads too.

    ``config``: the base's config.json; ``hf_names``: its tensor names. The tokenizer
    files are copied from ``tokenizer_source`` (no code files), or, for a GGUF base,
    saved from ``tokenizer``. ``quantization`` replaces the config entry read from the
    quantized layers (a GGUF's per-tensor bits). Each file is written atomically.
    """
    from mlx_lm.utils import make_shards

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    quantization = quantization or quantization_of(model)
    hf_layout = quantization is None and set(weights) <= hf_names
    metadata = {"format": "pt" if hf_layout else "mlx"}
    shards = make_shards(weights)
    names = (
        [WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        write_atomic(
            out / name, lambda tmp, s=shard: mx.save_safetensors(str(tmp), s, metadata=metadata)
        )
    written = list(names)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in sorted(s)},
        }
        _json(out / WEIGHTS_INDEX, index)
        written.append(WEIGHTS_INDEX)
    full_config = model_config(config, weights, quantization)
    _json(out / "config.json", full_config)
    written.append("config.json")
    if tokenizer_source is not None:
        for pattern in (*TOKENIZER_FILES, GENERATION_CONFIG):
            for file in sorted(Path(tokenizer_source).glob(pattern)):
                shutil.copyfile(file, out / file.name)
                written.append(file.name)
    elif tokenizer is not None:  # a GGUF's tokenizer, in transformers' files
        before = {p.name for p in out.iterdir()}
        tokenizer._tokenizer.save_pretrained(str(out))
        written += sorted({p.name for p in out.iterdir()} - before)
    if GENERATION_CONFIG not in written:
        _json(out / GENERATION_CONFIG, token_ids(full_config))
        written.append(GENERATION_CONFIG)
    return sorted(set(written)), hf_layout


def planned_names(model: nn.Module, tokenizer_source: Path | None) -> list[str]:
    """The names ``save_model_folder`` will write for ``model`` (GGUF tokenizers aside)."""
    from mlx_lm.utils import make_shards

    n = len(make_shards(dict(tree_flatten(model.parameters()))))
    names = [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    names += [WEIGHTS_INDEX] if n > 1 else []
    names += ["config.json", GENERATION_CONFIG]
    if tokenizer_source is not None and Path(tokenizer_source).is_dir():
        names += [f.name for p in TOKENIZER_FILES for f in Path(tokenizer_source).glob(p)]
    return sorted(set(names))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder this module wrote."""
    return sorted(Path(folder).glob("model*.safetensors"))


def load_folder_weights(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a model folder's weight files, by name."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(folder):
        weights.update(mx.load(str(file)))
    return weights
