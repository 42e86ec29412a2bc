"""Load llama-family GGUF files (llama.cpp's format) as mlx-lm models.

``load_gguf`` returns an mlx-lm llama ``Model``, a ``TokenizerWrapper`` built from the
file's own vocabulary, and the HF-style config the model was built from. By default the
quantized tensors stay quantized (MLX's affine layout, so the model is a QLoRA base);
``dequantize=True`` gives a float model.

Supported: ``general.architecture == "llama"``; tensors stored as F32, F16, BF16, Q8_0,
Q4_0 or Q4_1; byte-level BPE (``gpt2``) and SentencePiece (``llama``) vocabularies.
Anything else raises ``GGUFError`` before weights are read.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_pref.errors import GGUFError
from mlx_pref.gguf_tokenizer import gguf_tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_QUANTIZED = ("Q8_0", "Q4_0", "Q4_1")  # mx.load gives these as affine weight/scales/biases

# ggml tensor type ids, for naming types in errors (the ones MLX cannot keep are listed
# so that the message says "Q4_K" rather than a number).
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# GGUF metadata value types: struct format of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # fmt: skip

# Per-layer GGUF tensor names -> mlx-lm llama module paths.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# ----------------------------------------------------------------------------- reading


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n


def _read_value(buf: mmap.mmap, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALARS:
        fmt = "<" + _SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == 8:
        return _read_string(buf, pos)
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALARS:  # numeric arrays in one go
            dt = np.dtype("<" + _SCALARS[etype])
            values = np.frombuffer(buf, dtype=dt, count=count, offset=pos).tolist()
            return values, pos + count * dt.itemsize
        values = []
        for _ in range(count):
            value, pos = _read_value(buf, pos, etype)
            values.append(value)
        return values, pos
    raise GGUFError(f"unknown GGUF metadata value type {vtype}")


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], dict[str, dict]]:
    """Metadata and tensor descriptions of a GGUF file, without reading tensor data.

    Each tensor maps to ``{"type": name, "shape": numpy-order shape, "offset": absolute
    byte offset}``. Read here rather than through ``mx.load`` so that unsupported types
    are reported by name before MLX converts or rejects them.
    """
    return _guarded_parse(path, None)


def read_gguf_typed_metadata(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple]]:
    """The metadata of a GGUF file, and the value type of each key with, for arrays, the
    type of its elements (numbers of ``gguf.GGUFValueType``): enough to copy it unchanged."""
    types: dict[str, tuple[int, int | None]] = {}
    meta = _guarded_parse(path, types)[0]
    return meta, types


def _guarded_parse(path: str | Path, types: dict | None) -> tuple[dict, dict]:
    try:
        return _parse_header(path, types)
    except (struct.error, ValueError, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        if isinstance(exc, GGUFError):
            raise
        raise GGUFError(f"{path}: truncated or damaged GGUF file ({exc})") from None


def _parse_header(path: str | Path, types: dict | None = None) -> tuple[dict, dict]:
    if Path(path).stat().st_size < 24:
        raise GGUFError(f"{path}: not a GGUF file (only {Path(path).stat().st_size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise GGUFError(
                f"{path}: GGUF version {version} is not supported (need 2 or 3, little-endian)"
            )
        pos, meta = 24, {}
        for _ in range(n_kv):
            key, pos = _read_string(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            if types is not None:
                etype = struct.unpack_from("<I", buf, pos + 4)[0] if vtype == 9 else None
                types[key] = (vtype, etype)
            meta[key], pos = _read_value(buf, pos + 4, vtype)
        tensors = {}
        for _ in range(n_tensors):
            name, pos = _read_string(buf, pos)
            (ndim,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            kind = GGML_TYPES.get(ttype, f"ggml type {ttype}")
            tensors[name] = {"type": kind, "shape": tuple(reversed(dims)), "offset": offset}
        align = int(meta.get("general.alignment", 32))
        start = (pos + align - 1) // align * align
    for info in tensors.values():
        info["offset"] += start
    return meta, tensors


def _check_supported(meta: dict, tensors: dict) -> None:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for name, info in tensors.items():
        if info["type"] not in SUPPORTED_TYPES:
            raise GGUFError(
                f"tensor {name!r} is stored as {info['type']}, which MLX cannot "
                f"represent; supported tensor types: {', '.join(SUPPORTED_TYPES)} "
                "(re-export the model with one of them, e.g. llama.cpp's Q8_0 or Q4_0)"
            )
    if "rope_freqs.weight" in tensors:
        raise GGUFError(
            "tensor 'rope_freqs.weight' (per-frequency rotary factors, as in "
            "Llama 3.1) is not supported"
        )
    for name in tensors:
        _hf_name(name)  # mixture-of-experts and other non-llama tensors stop here


# ----------------------------------------------------------------------------- config


def _f32(x: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not
    9.99999974e-06)."""
    return float(str(np.float32(x)))


def gguf_config(meta: dict, tensors: dict) -> dict:
    """The HF-style llama config described by the metadata (``llama.*`` keys).

    Every field mlx-lm's llama reads is set explicitly: a missing ``rope_theta`` would
    silently become 10000.
    """
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"metadata {arch}.{key} is missing")
        if isinstance(value, list):  # per-layer values: only a uniform one maps to HF
            if len(set(value)) != 1:
                raise GGUFError(f"per-layer {arch}.{key} is not supported")
            value = value[0]
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError("partial rotary embeddings (rope.dimension_count < head dim) not supported")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": tensors["token_embd.weight"]["shape"][0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
    }
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": _f32(get("rope.scaling.factor", 1.0)),
        }
    elif scaling != "none":
        raise GGUFError(f"rope scaling {scaling!r} is not supported (only linear)")
    for name in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{name.replace('padding', 'pad')}_token_id"] = int(token_id)
    return config


# ----------------------------------------------------------------------------- weights


def _hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, index, part = base.split(".", 2)
        if part in _LAYER_NAMES:
            return f"model.layers.{index}.{_LAYER_NAMES[part]}.{suffix}"
    elif base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    raise GGUFError(f"tensor {name!r} has no place in a llama model")


def gguf_tensor_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (llama.cpp's
    name for a Hugging Face llama tensor; the inverse of ``_hf_name``)."""
    module, _, suffix = name.rpartition(".")
    if module.startswith("model.layers."):
        index, _, part = module.removeprefix("model.layers.").partition(".")
        for gguf_part, hf_part in _LAYER_NAMES.items():
            if part == hf_part and index.isdigit():
                return f"blk.{index}.{gguf_part}.{suffix}"
    for gguf_part, hf_part in _TOP_NAMES.items():
        if module == hf_part:
            return f"{gguf_part}.{suffix}"
    raise GGUFError(f"tensor {name!r} has no place in a llama GGUF")


def hf_tensor_names(path: str | Path) -> set[str]:
    """The Hugging Face names of a GGUF's tensors (header only)."""
    return {_hf_name(name) for name in read_gguf_header(path)[1]}


def _unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row order (rotary pairs interleaved per head) so the rows
    are in HF order again. Works on packed quantized rows, scales and biases alike."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_bf16(path: str | Path, info: dict) -> mx.array:
    """BF16 tensors straight from the file: ``mx.load`` would narrow them to float16."""
    count = int(np.prod(info["shape"]))
    raw = np.fromfile(path, dtype="<u2", count=count, offset=info["offset"])
    return mx.array(raw).view(mx.bfloat16).reshape(info["shape"])


def _load_weights(
    path: str | Path, tensors: dict, config: dict, dequantize: bool, dtype: mx.Dtype
) -> tuple[dict[str, mx.array], dict[str, dict]]:
    """HF-named weights, and ``{module path: {"group_size", "bits"}}`` for the quantized
    ones (empty when dequantizing)."""
    raw = mx.load(str(path))
    out, quant = {}, {}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, info in tensors.items():
        key, base = _hf_name(name), name.rpartition(".")[0]
        n_heads = heads.get(base.rpartition(".")[2])

        def fix(w: mx.array, n_heads: int | None = n_heads) -> mx.array:
            return _unpermute(w, n_heads) if n_heads else w

        if info["type"] == "BF16":
            out[key] = fix(_read_bf16(path, info)).astype(dtype)
        elif info["type"] not in _QUANTIZED:
            out[key] = fix(raw[name]).astype(dtype)
        else:
            w, s, b = (fix(raw[f"{base}.{k}"]) for k in ("weight", "scales", "biases"))
            s, b = s.astype(mx.float32), b.astype(mx.float32)  # float16 in the file: exact
            in_features = info["shape"][-1]
            params = {
                "group_size": in_features // s.shape[-1],
                "bits": w.shape[-1] * 32 // in_features,
            }
            module = key.removesuffix(".weight")
            if dequantize:
                out[key] = mx.dequantize(w, s, b, **params).astype(dtype)
            else:
                s, b = s.astype(dtype), b.astype(dtype)
                out.update({key: w, f"{module}.scales": s, f"{module}.biases": b})
                quant[module] = params
    return out, quant


# ----------------------------------------------------------------------------- model


def load_gguf(
    path: str | Path, *, dequantize: bool = False, dtype: mx.Dtype | None = None
) -> tuple[nn.Module, TokenizerWrapper, dict]:
    """Load a llama-family GGUF as ``(model, tokenizer, config)``.

    Quantized tensors (Q8_0, Q4_0, Q4_1) stay quantized as MLX affine layers with group
    size 32 and per-tensor bits, unless ``dequantize``. Float tensors, and the scales and
    biases of quantized ones, are cast to ``dtype`` (float32 by default: the GGUF's
    float16 scales convert exactly).
    """
    dtype = dtype or mx.float32
    meta, tensors = read_gguf_header(path)
    try:
        _check_supported(meta, tensors)
        config = gguf_config(meta, tensors)
        tokenizer = gguf_tokenizer(meta)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    try:
        weights, quant = _load_weights(path, tensors, config, dequantize, dtype)
    except (RuntimeError, ValueError, OSError) as exc:
        raise GGUFError(f"{path}: cannot read its tensors, truncated or damaged? ({exc})") from None

    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quant:
        nn.quantize(model, class_predicate=lambda p, _: quant.get(p, False))
        # mlx-lm's convention: a default plus per-module overrides.
        common = max(quant.values(), key=list(quant.values()).count)
        config["quantization"] = {**common, "mode": "affine", **quant}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer, config
