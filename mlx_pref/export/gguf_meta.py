"""What a GGUF file holds besides its tensors, for the two GGUF exports.

llama.cpp's hyperparameter keys come from the Hugging Face config, and its tokenizer keys
from the base's ``tokenizer.json`` (byte-level BPE only) or, for a GGUF base, are copied
from the base file unchanged. Metadata is a plain dict of ``gguf.GGUFValue`` (value and
type), so the same dict is written to the file and read for the Ollama Modelfile.

The files are written with the ``gguf`` package, llama.cpp's own GGUF writer, imported
only here and only when a GGUF export runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mlx_pref.export.run import BaseModel, ExportError
from mlx_pref.gguf import read_gguf_typed_metadata

ARCHITECTURE = "llama"
"""The only ``general.architecture`` the GGUF exports write (and the GGUF loader reads)."""
SUPPORTED = "llama-architecture models (model_type 'llama': Llama, SmolLM, TinyLlama, ...)"

# tokenizer.ggml.token_type values (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def require_gguf():
    """The ``gguf`` package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ExportError(
            "the GGUF export needs the gguf package (llama.cpp's own GGUF writer): "
            "pip install 'mlx-pref[gguf]'"
        ) from None
    return gguf


def check_llama(config: dict, base: BaseModel) -> None:
    """Refuse, in one line, a base llama.cpp would not read as ``llama``."""
    kind = config.get("model_type")
    if kind != ARCHITECTURE:
        raise ExportError(
            f"the GGUF export supports {SUPPORTED}; {base.name} is {kind!r}: "
            "export --format fused or peft instead"
        )
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "linear")) if scaling else None
    if rope_type not in (None, "linear", "default"):
        raise ExportError(
            f"{base.name} uses {rope_type!r} rope scaling, which the GGUF export does not "
            "write (only linear); export --format fused instead"
        )
    if config.get("mlp_bias"):
        raise ExportError(f"{base.name} has MLP biases, which llama.cpp's llama does not read")


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, the two rotary halves interleaved
    (the inverse of ``mlx_pref.gguf._unpermute``). Rows are the first axis."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(config: dict) -> dict[str, int]:
    """GGUF tensor part -> the head count its rows are permuted with."""
    heads = config["num_attention_heads"]
    return {"attn_q": heads, "attn_k": config.get("num_key_value_heads") or heads}


def value(meta: dict, key: str, default: Any = None) -> Any:
    entry = meta.get(key)
    return default if entry is None else entry.value


def llama_hparams(gguf, config: dict) -> dict:
    """llama.cpp's ``llama.*`` keys for a Hugging Face llama config."""
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    heads = int(config["num_attention_heads"])
    dim = head_dim(config)
    entries = {
        gguf.Keys.LLM.CONTEXT_LENGTH: (config.get("max_position_embeddings", 2048), u32),
        gguf.Keys.LLM.EMBEDDING_LENGTH: (config["hidden_size"], u32),
        gguf.Keys.LLM.BLOCK_COUNT: (config["num_hidden_layers"], u32),
        gguf.Keys.LLM.FEED_FORWARD_LENGTH: (config["intermediate_size"], u32),
        gguf.Keys.Attention.HEAD_COUNT: (heads, u32),
        gguf.Keys.Attention.HEAD_COUNT_KV: (config.get("num_key_value_heads") or heads, u32),
        gguf.Keys.Rope.FREQ_BASE: (config.get("rope_theta", 10000.0), f32),
        gguf.Keys.Rope.DIMENSION_COUNT: (dim, u32),
        gguf.Keys.Attention.LAYERNORM_RMS_EPS: (config.get("rms_norm_eps", 1e-6), f32),
        gguf.Keys.LLM.VOCAB_SIZE: (config["vocab_size"], u32),
    }
    if dim != config["hidden_size"] // heads:
        entries[gguf.Keys.Attention.KEY_LENGTH] = (dim, u32)
        entries[gguf.Keys.Attention.VALUE_LENGTH] = (dim, u32)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        entries[gguf.Keys.Rope.SCALING_TYPE] = ("linear", gguf.GGUFValueType.STRING)
        entries[gguf.Keys.Rope.SCALING_FACTOR] = (scaling["factor"], f32)
    out = {}
    for key, (val, kind) in entries.items():
        val = int(val) if kind == u32 else val if kind != f32 else float(val)
        out[key.format(arch=ARCHITECTURE)] = gguf.GGUFValue(val, kind)
    return out


def copied_meta(gguf, path: str | Path, prefixes: tuple[str, ...]) -> dict:
    """The keys of a GGUF file that start with ``prefixes``, with their value types."""
    meta, types = read_gguf_typed_metadata(path)
    out = {}
    for key, (kind, element) in types.items():
        if key.startswith(prefixes):
            sub_type = None if element is None else gguf.GGUFValueType(element)
            out[key] = gguf.GGUFValue(meta[key], gguf.GGUFValueType(kind), sub_type)
    return out


def bpe_pre(tokenizer: dict, source: Path) -> str:
    """The ``tokenizer.ggml.pre`` llama.cpp splits text with as this tokenizer does."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == (
        _LLAMA3_SPLIT
    ):
        return "llama-bpe"
    raise ExportError(
        f"{source}: cannot tell which llama.cpp pre-tokenizer splits text as this "
        f"tokenizer's {'+'.join(str(k) for k in kinds)} does; supported: GPT-2 byte-level, "
        "SmolLM/StarCoder (digits + byte-level), Llama 3"
    )


def _vocab_list(tokenizer: dict, n_vocab: int, source: Path) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types; ids without a token are ``[PADn]``."""
    by_id: dict[int, str] = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    types = {}
    for added in tokenizer.get("added_tokens", []):
        content = added["content"]
        by_id[added["id"]] = content
        looks_control = content.startswith("<|") and content.endswith("|>")
        types[added["id"]] = CONTROL if added.get("special") or looks_control else USER_DEFINED
    if max(by_id) >= n_vocab:
        raise ExportError(
            f"{source}: the tokenizer has ids up to {max(by_id)}, beyond the model's "
            f"{n_vocab} embeddings"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    kinds = [types.get(i, NORMAL if i in by_id else UNUSED) for i in range(n_vocab)]
    return tokens, kinds


def hf_vocab(gguf, folder: Path, n_vocab: int) -> dict:
    """Tokenizer keys for a Hugging Face byte-level BPE tokenizer (``tokenizer.json``):
    tokens, types, merges, special ids, BOS/EOS rules and the chat template, read with the
    gguf package's ``SpecialVocab`` as llama.cpp's converter reads them."""
    source = folder / "tokenizer.json"
    if not source.is_file():
        raise ExportError(
            f"{folder} has no tokenizer.json; the GGUF export writes byte-level BPE "
            "tokenizers from Hugging Face models (train on a GGUF base to keep its tokenizer)"
        )
    tokenizer = json.loads(source.read_text())
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE" if model.get("type") == "BPE" else model.get("type")
        raise ExportError(
            f"{source}: a {kind} tokenizer; the GGUF export writes byte-level BPE tokenizers "
            "and copies others only from a GGUF base (convert the base with llama.cpp's "
            "convert_hf_to_gguf.py and train on that file)"
        )
    pre = bpe_pre(tokenizer, source)
    tokens, kinds = _vocab_list(tokenizer, n_vocab, source)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    T, V = gguf.Keys.Tokenizer, gguf.GGUFValueType
    meta = {
        T.MODEL: gguf.GGUFValue("gpt2", V.STRING),
        T.PRE: gguf.GGUFValue(pre, V.STRING),
        T.LIST: gguf.GGUFValue(tokens, V.ARRAY, V.STRING),
        T.TOKEN_TYPE: gguf.GGUFValue(kinds, V.ARRAY, V.INT32),
    }
    if special.merges:
        meta[T.MERGES] = gguf.GGUFValue(list(special.merges), V.ARRAY, V.STRING)
    ids = {"bos": T.BOS_ID, "eos": T.EOS_ID, "unk": T.UNK_ID, "sep": T.SEP_ID, "pad": T.PAD_ID}
    for kind, token_id in special.special_token_ids.items():
        if kind in ids:
            meta[ids[kind]] = gguf.GGUFValue(int(token_id), V.UINT32)
    flags = {"bos": T.ADD_BOS, "eos": T.ADD_EOS, "sep": T.ADD_SEP}
    for kind, on in special.add_special_token.items():
        if kind in flags:
            meta[flags[kind]] = gguf.GGUFValue(bool(on), V.BOOL)
    template = special.chat_template
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        meta[T.CHAT_TEMPLATE] = gguf.GGUFValue(template, V.STRING)
    return meta


def write_meta(writer, meta: dict) -> None:
    for key, entry in meta.items():
        writer.add_key_value(key, entry.value, entry.type, entry.sub_type)
