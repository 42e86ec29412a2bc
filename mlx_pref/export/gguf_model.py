"""The ``gguf`` export: the adapter merged into the base and written as one GGUF file that
llama.cpp (and Ollama, LM Studio) loads, with an Ollama ``Modelfile`` beside it.

The weights are mlx-pref's fused model (mlx-lm's ``fuse()``, every weight in float, so a
quantized base is dequantized first) under llama.cpp's tensor names, with the q/k rows in
llama.cpp's rotary order. Norms and other 1-D tensors stay F32; the matrices are written
as ``quant``: F16 (default), Q8_0, Q4_0 or F32. In a Q4_0 file the token embedding and
the output head are Q8_0: the head (the embedding, when tied) is the most sensitive
matrix, and llama.cpp's own quantizer keeps it above 4 bits too. A matrix whose rows do
not split into 32-value blocks stays F16. Hyperparameters come from the base's config;
the tokenizer from its ``tokenizer.json``, or, for a GGUF base, is copied from the base
together with its ``llama.*`` keys.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_pref.errors import GGUFError
from mlx_pref.export.card import model_card
from mlx_pref.export.fused import fused_model
from mlx_pref.export.gguf_meta import (
    ARCHITECTURE,
    check_llama,
    copied_meta,
    hf_vocab,
    llama_hparams,
    permute_rows,
    qk_heads,
    require_gguf,
    value,
    write_meta,
)
from mlx_pref.export.ollama import modelfile
from mlx_pref.export.run import CARD_FILE, BaseModel, Destination, ExportError, Run
from mlx_pref.gguf import gguf_tensor_name, read_gguf_header

MODELFILE = "Modelfile"
# --quant -> (tensor type of the matrices, general.file_type)
QUANTS = {
    "f16": ("F16", "MOSTLY_F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "f32": ("F32", "ALL_F32"),
}
KEEP_8BIT = ("token_embd.weight", "output.weight")  # at Q8_0 in a Q4_0 file


def gguf_file_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def model_meta(base: BaseModel, config: dict) -> tuple[dict, dict]:
    """``(llama.* keys, tokenizer.* keys)`` for a GGUF of ``base``."""
    gguf = require_gguf()
    if base.gguf:
        meta = copied_meta(gguf, base.spec, (f"{ARCHITECTURE}.", "tokenizer."))
        vocab = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        return {k: v for k, v in meta.items() if k not in vocab}, vocab
    return llama_hparams(gguf, config), hf_vocab(gguf, base.local_path(), config["vocab_size"])


def _tensor_order(name: str) -> tuple:
    """llama.cpp's converter order: embedding, blocks by index, output norm, head."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def _encode(gguf, name: str, w: np.ndarray, quant: str) -> tuple[np.ndarray, object]:
    """The tensor's data as written and its GGML type."""
    T = gguf.GGMLQuantizationType
    if w.ndim <= 1 or name.endswith("_norm.weight"):
        return w.astype(np.float32), T.F32
    kind = T[QUANTS[quant][0]]
    if kind == T.Q4_0 and name in KEEP_8BIT:
        kind = T.Q8_0
    if kind in (T.F32, T.F16):
        return gguf.quants.quantize(w, kind), kind
    if w.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return w.astype(np.float16), T.F16
    return gguf.quants.quantize(w, kind), kind


def gguf_named(model: nn.Module) -> dict[str, mx.array]:
    """A float mlx-lm llama's weights under llama.cpp's names, in the converter's order."""
    named = {}
    for name, w in tree_flatten(model.parameters()):
        try:
            named[gguf_tensor_name(name)] = w
        except GGUFError as exc:
            raise ExportError(f"cannot write a llama GGUF: {exc}") from None
    return {name: named[name] for name in sorted(named, key=_tensor_order)}


def gguf_array(name: str, w: mx.array, config: dict) -> np.ndarray:
    """One weight as float32 in numpy, q/k rows permuted into llama.cpp's order."""
    heads = qk_heads(config)
    array = np.array(w.astype(mx.float32))
    part = name.split(".")[2] if name.startswith("blk.") else ""
    return permute_rows(array, heads[part]) if part in heads else array


def write_model_gguf(
    path: Path, model: nn.Module, config: dict, meta: tuple[dict, dict], quant: str, name: str
) -> list[str]:
    """Write a float mlx-lm llama as a GGUF file: ``meta`` from ``model_meta``. Returns
    the matrices kept in F16 because their rows do not split into quantization blocks.
    Tensors are converted one at a time, so the float32 copy of the model is never whole."""
    gguf = require_gguf()
    hparams, vocab = meta
    named = gguf_named(model)
    rows = named["token_embd.weight"].shape[0]
    n_tokens = len(value(vocab, "tokenizer.ggml.tokens", []))
    if n_tokens != rows:
        raise ExportError(f"the vocabulary has {n_tokens} tokens but the embedding {rows} rows")
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    write_meta(writer, hparams)
    writer.add_file_type(gguf.LlamaFileType[QUANTS[quant][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_meta(writer, vocab)
    kept_f16 = []
    for gname, w in named.items():
        data, kind = _encode(gguf, gname, gguf_array(gname, w, config), quant)
        if kind == gguf.GGMLQuantizationType.F16 and quant not in ("f16", "f32"):
            kept_f16.append(gname)
        raw = None if kind.name in ("F32", "F16") else kind
        writer.add_tensor(gname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kept_f16


def write_gguf(
    run: Run, base: BaseModel, out: Path, dest: Destination, dequantize: bool, quant: str = "f16"
) -> None:
    """The fused model as ``model-QUANT.gguf``, a Modelfile and a model card."""
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    require_gguf()
    config = base.config()
    check_llama(config, base)
    meta = model_meta(base, config)
    loaded = fused_model(run, base, dequantize=True)
    title = (dest.repo_id or dest.output.name).rsplit("/", 1)[-1]
    file = gguf_file_name(quant)
    kept_f16 = write_model_gguf(out / file, loaded.model, config, meta, quant, title)
    tokenizer = {k: v.value for k, v in meta[1].items()}
    text, templated = modelfile(f"./{file}", tokenizer)
    (out / MODELFILE).write_text(text)
    notes = _gguf_notes(run, base, quant, kept_f16, templated)
    (out / CARD_FILE).write_text(
        model_card(run, base, "gguf", "gguf", dest.output, dest.repo_id, notes, artifact=file)
    )


def quantized_base(run: Run, base: BaseModel) -> bool:
    """Whether training saw quantized base weights (QLoRA, an MLX-quantized or a
    quantized GGUF base)."""
    if run.config.quantization:
        return True
    if base.gguf:
        types = {t["type"] for t in read_gguf_header(base.spec)[1].values()}
        return not run.config.dequantize and bool(types - {"F32", "F16", "BF16"})
    return "quantization" in base.config()


def _gguf_notes(run: Run, base: BaseModel, quant: str, kept_f16: list[str], templated: bool):
    notes = [
        f"One GGUF file ({quant.upper()} matrices, F32 norms) with the tokenizer and chat "
        "template in its metadata, in llama.cpp's tensor names and q/k row order."
    ]
    if quant == "q4_0":
        notes.append("The token embedding and output head are Q8_0, the other matrices Q4_0.")
    if kept_f16:
        names = ", ".join(kept_f16[:3]) + (" ..." if len(kept_f16) > 3 else "")
        notes.append(
            f"{len(kept_f16)} matrices stay F16: their rows do not split into "
            f"{quant.upper()}'s 32-value blocks ({names})."
        )
    if quantized_base(run, base):
        notes.append(
            "The base was quantized in training; the GGUF holds the dequantized base plus the "
            f"adapter, written as {quant.upper()}."
        )
    if not templated:
        notes.append(
            "The chat template could not be written as an Ollama TEMPLATE, so the Modelfile "
            "has none: add one before chatting with the model in Ollama."
        )
    return notes
