"""The ``gguf-lora`` export: the LoRA adapter as a GGUF adapter file in llama.cpp's
convention (``llama-cli -m BASE.gguf --lora adapter.gguf``).

llama.cpp reads ``general.type = adapter``, ``adapter.type = lora`` and
``adapter.lora.alpha``, and adds ``alpha / r · B·A`` to each base tensor named like the
adapter's tensors less their ``.lora_a`` / ``.lora_b`` suffix. mlx-lm keeps ``lora_a``
(in, r), ``lora_b`` (r, out) and ``scale``, so ``lora_a`` = ``lora_a``ᵀ (r, in),
``lora_b`` = ``lora_b``ᵀ (out, r) and alpha = scale · r, as for PEFT. The base's q/k rows
are stored in llama.cpp's rotary order, so the rows of q's and k's ``lora_b`` are
permuted the same way: P(W + B·A) = P·W + (P·B)·A. An embedding adapter on a model
with its own output head is written in llama.cpp's embedding layout (``lora_a`` as
mlx-lm has it, (vocab, r); ``lora_b`` transposed, (dims, r)).

For a GGUF base the names, shapes and ``general.architecture`` are checked against the
base file; for a Hugging Face base the adapter is relative to the GGUF llama.cpp's
converter (or ``--format gguf``) writes from that base: the same names and row order.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear

from mlx_pref.adapters import ADAPTER_FILE
from mlx_pref.errors import GGUFError
from mlx_pref.export.card import model_card
from mlx_pref.export.gguf_meta import (
    ARCHITECTURE,
    check_llama,
    permute_rows,
    qk_heads,
    require_gguf,
)
from mlx_pref.export.gguf_model import MODELFILE, quantized_base
from mlx_pref.export.ollama import modelfile
from mlx_pref.export.peft import adapter_layout, check_adapter_weights
from mlx_pref.export.run import CARD_FILE, BaseModel, Destination, ExportError, Run
from mlx_pref.gguf import gguf_tensor_name, read_gguf_header

ADAPTER_GGUF = "adapter.gguf"
INSTEAD = "export --format gguf (the fused model) instead"


def lora_tensors(
    run: Run, base: BaseModel, config: dict
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """The adapter's tensors under llama.cpp's names, and the base tensor shapes
    (numpy order) they must fit."""
    if run.dora:
        raise ExportError(
            "a DoRA adapter has no llama.cpp equivalent (llama.cpp adds B·A, without DoRA's "
            f"magnitudes); {INSTEAD}"
        )
    weights = mx.load(str(run.adapter_dir / ADAPTER_FILE))
    layout = adapter_layout(base, run.adapter_config)
    check_adapter_weights(layout.modules, weights, False)
    heads = qk_heads(config)
    tensors, targets = {}, {}
    for path, module in sorted(layout.modules.items()):
        a = np.array(weights[f"{path}.lora_a"].astype(mx.float32))
        b = np.array(weights[f"{path}.lora_b"].astype(mx.float32))
        try:
            name = gguf_tensor_name(f"{path}.weight")
        except GGUFError:
            raise ExportError(f"{path}: llama.cpp cannot apply a LoRA there; {INSTEAD}") from None
        if isinstance(module, LoRALinear):
            lora_a, lora_b = a.T, b.T  # (r, in), (out, r)
            part = name.split(".")[2] if name.startswith("blk.") else ""
            if part in heads:
                lora_b = permute_rows(lora_b, heads[part])
            targets[name] = (lora_b.shape[0], lora_a.shape[1])
        elif isinstance(module, LoRAEmbedding) and not layout.tied:
            lora_a, lora_b = a, b.T  # (vocab, r), (dims, r)
            targets[name] = (lora_a.shape[0], lora_b.shape[0])
        elif isinstance(module, LoRAEmbedding):
            raise ExportError(
                f"{path}: the adapter changes the embedding, which this model ties to its "
                "output head; llama.cpp would apply it to the head in the embedding's "
                f"layout; {INSTEAD}"
            )
        else:
            raise ExportError(
                f"{path}: llama.cpp cannot apply a {type(module).__name__}; {INSTEAD}"
            )
        tensors[f"{name}.lora_a"] = np.ascontiguousarray(lora_a)
        tensors[f"{name}.lora_b"] = np.ascontiguousarray(lora_b)
    return tensors, targets


def check_against_base(path: str, targets: dict[str, tuple[int, ...]]) -> str:
    """Every adapted tensor is in the base GGUF with the adapter's shape; returns the
    base's ``general.architecture``."""
    meta, tensors = read_gguf_header(path)
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ExportError(f"{path}: architecture {arch!r}; the GGUF export supports llama")
    for name, shape in targets.items():
        if name not in tensors:
            raise ExportError(f"{path} has no tensor {name} for the adapter to apply to")
        if tuple(tensors[name]["shape"]) != shape:
            raise ExportError(
                f"{name}: the adapter is for shape {shape}, the base GGUF's tensor is "
                f"{tuple(tensors[name]['shape'])}"
            )
    return arch


def write_adapter_gguf(path: Path, tensors: dict[str, np.ndarray], alpha: float, arch: str):
    gguf = require_gguf()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_lora(
    run: Run, base: BaseModel, out: Path, dest: Destination, dequantize: bool
) -> None:
    """``adapter.gguf`` for llama.cpp's ``--lora``, a Modelfile (GGUF base), a card."""
    require_gguf()
    config = base.config()
    check_llama(config, base)
    tensors, targets = lora_tensors(run, base, config)
    arch = check_against_base(base.spec, targets) if base.gguf else ARCHITECTURE
    params = run.adapter_config["lora_parameters"]
    write_adapter_gguf(out / ADAPTER_GGUF, tensors, params["scale"] * params["rank"], arch)
    templated = True
    if base.gguf:
        meta = read_gguf_header(base.spec)[0]
        tokenizer = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        text, templated = modelfile(str(Path(base.spec).resolve()), tokenizer, f"./{ADAPTER_GGUF}")
        (out / MODELFILE).write_text(text)
    notes = _lora_notes(run, base, templated)
    (out / CARD_FILE).write_text(
        model_card(
            run, base, "gguf-lora", "gguf", dest.output, dest.repo_id, notes, artifact=ADAPTER_GGUF
        )
    )


def _lora_notes(run: Run, base: BaseModel, templated: bool) -> list[str]:
    params = run.adapter_config["lora_parameters"]
    alpha = params["scale"] * params["rank"]
    notes = [
        f"A GGUF LoRA adapter (F32, rank {params['rank']}, adapter.lora.alpha {alpha:g}): "
        "llama.cpp adds alpha / rank · B·A to each named base tensor."
    ]
    if base.gguf:
        notes.append(
            f"Apply it to the GGUF it was trained on, {Path(base.spec).name}: its tensor names "
            "and shapes were checked against that file."
        )
    else:
        notes.append(
            f"It applies to a GGUF of {base.name} as llama.cpp's convert_hf_to_gguf.py writes "
            "it (the GGUF files published for the model are such files), in any "
            "quantization; the tensor names and q/k row order are llama.cpp's."
        )
    if quantized_base(run, base):
        notes.append(
            "Trained on a quantized base: outputs on another quantization of the base are "
            "close to, not identical with, those in training."
        )
    if base.gguf and not templated:
        notes.append("The base's chat template has no Ollama TEMPLATE equivalent here.")
    if base.gguf:
        notes.append(
            "For Ollama the fused model (`--format gguf`) is the safer route: the Modelfile "
            "here names the base by its local path, and not every Ollama version accepts "
            "ADAPTER."
        )
    return notes
