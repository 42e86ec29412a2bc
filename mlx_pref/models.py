"""Loading models and tokenizers: a local directory, a Hub id, or the embedded default.

Architectures, weights and tokenizers come from mlx-lm; this module adds clear errors,
the embedded tiny model, quantization that fits the backend (``resolve_quantization``:
QLoRA on Metal and CUDA, float weights on the CPU) and a dtype cast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_pref import backend, moe
from mlx_pref.errors import ModelError

HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
QUANT_GROUP_SIZE = 64
FLOAT_MEMORY_FRACTION = 0.5
"""A float copy of the base may take at most this share of the device's memory."""
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def embedded_root(name: str) -> Path:
    """An embedded asset: ``models/<name>`` or ``data/<name>`` in a checkout, else the wheel's copy."""
    package = Path(__file__).resolve().parent
    for candidate in (
        package.parent / "models" / name,
        package.parent / "data" / name,
        package / "_embedded" / name,
    ):
        if candidate.is_dir():
            return candidate
    raise ModelError(f"embedded asset '{name}' is missing from this installation")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: Path
    config: dict
    notes: list[str] = field(default_factory=list)
    """Things the user should know (a fallback taken), for the trainer to log."""
    quantization_bits: int | None = None
    """The quantization actually applied to a float base (None if none, or if it fell back)."""
    dequantized: bool = False
    """A quantized base was turned into float weights (asked for, or chosen on the CPU)."""
    vision: bool = False
    """A vision-language model (mlx-vlm's; ``vision.model``), its tokenizer a
    ``VisionTokenizer``."""


def resolve_model_path(spec: str | None) -> Path:
    """A local directory for ``spec``: the embedded default (None), a path, or a Hub id."""
    if spec is None:
        return embedded_root("tiny-chat")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelError(
                f"{path} has no config.json: not a Hugging Face / mlx-lm model directory"
            )
        return path
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise ModelError(
            f"model not found: {spec} (not a local path, and not a Hub id like org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"cannot download '{spec}' from the Hugging Face Hub: no network, and it is not in "
            "the local cache. Connect, or pass a local model directory with --model."
        ) from None
    except HfHubHTTPError as exc:
        raise ModelError(f"cannot download '{spec}' from the Hugging Face Hub: {exc}") from None
    except OSError as exc:  # connection errors surface as OSError subclasses
        raise ModelError(
            f"cannot download '{spec}' from the Hugging Face Hub ({type(exc).__name__}); "
            "check the network or pass a local model directory with --model."
        ) from None


def first_line(exc: BaseException) -> str:
    """An exception's first line (library errors can run to dozens)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _damaged_weights(path: Path) -> Path | None:
    """The first weight file in ``path`` that does not read whole (after a failed load)."""
    for file in sorted(path.glob("*.safetensors")):
        try:
            mx.eval(list(mx.load(str(file)).values()))
        except (RuntimeError, ValueError, OSError):
            return file
    return None


def read_model_config(path: Path) -> dict:
    """A model folder's config.json, or a one-line ModelError."""
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path / 'config.json'}: cannot read it ({first_line(exc)})") from None


def _config_or_none(path: Path) -> dict | None:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None


def is_vision_config(config: dict) -> bool:
    """Whether a model folder's config describes a vision-language model (mlx-vlm's)."""
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


def load_checked_tokenizer(path: Path, eos_token_ids=None):
    """mlx-lm's tokenizer for a model folder, or a one-line ModelError saying what is missing."""
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(path, eos_token_ids=eos_token_ids)
    except (ValueError, OSError, RuntimeError, TypeError) as exc:
        if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
            raise ModelError(
                f"{path} has no tokenizer (tokenizer.json or tokenizer.model); copy the "
                "tokenizer files of the model it came from into it"
            ) from None
        raise ModelError(f"cannot load the tokenizer in {path}: {first_line(exc)}") from None


def _quantizable(path: str, module: nn.Module) -> bool:
    """Layers whose rows split into whole quantization groups."""
    weight = getattr(module, "weight", None)
    return (
        hasattr(module, "to_quantized")
        and weight is not None
        and weight.shape[-1] % QUANT_GROUP_SIZE == 0
    )


def quantize_base(model: nn.Module, bits: int) -> None:
    """Quantize the base weights in place (QLoRA); LoRA layers then wrap QuantizedLinear."""
    nn.quantize(model, group_size=QUANT_GROUP_SIZE, bits=bits, class_predicate=_quantizable)


def enable_grad_checkpoint(model: nn.Module, every: int = 1) -> None:
    """Recompute every ``every``-th transformer block in the backward pass instead of
    storing its activations: less memory for about one more forward pass of compute.
    What the block's MoE routers record (``moe.record``) leaves it as outputs of the
    recomputed function: kept by a side channel instead, the logits would hold on to the
    block's activations (measured on a 4-block Mixtral: 772 MB peak against 541 MB)."""
    for layer in model.layers[::every]:
        cls = type(layer)
        if getattr(cls, "_checkpointed", False):
            continue
        call = cls.__call__

        def checkpointed(self, *args, _call=call, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                with moe.recording() as router_logits:
                    out = _call(self, *args, **kwargs)
                return out, router_logits

            out, router_logits = mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)
            for logits in router_logits:
                moe.record(logits)
            return out

        # A subclass per instance: other models of the same class are left alone.
        layer.__class__ = type(
            cls.__name__, (cls,), {"__call__": checkpointed, "_checkpointed": True}
        )


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating-point parameters (not quantized integers) to ``dtype``."""
    from mlx.utils import tree_map

    model.update(
        tree_map(
            lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )


def float_bytes(model: nn.Module, dtype: mx.Dtype = mx.float32) -> int:
    """What the model's weights take with every layer, quantized ones too, in ``dtype``."""
    total = 0
    for _, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            rows, packed = module.weight.shape[-2:]
            total += rows * packed * 32 // module.bits * dtype.size
            continue
        for value in module.parameters().values():  # this module's own arrays only
            if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
                total += value.size * dtype.size
    return total


def fits_in_memory(nbytes: int) -> bool:
    """Whether weights of ``nbytes`` fit the memory plan: for now a safe share of the
    device's memory (unknown memory: assume they fit)."""
    total = backend.total_memory()
    return total is None or nbytes <= FLOAT_MEMORY_FRACTION * total


@dataclass(frozen=True)
class QuantizationChoice:
    """What to do with the base: make it float, quantize it, and why (a note, or "")."""

    dequantize: bool
    bits: int | None
    note: str = ""


def resolve_quantization(
    dequantize: bool | None, bits: int | None, quantized: bool, float_size: int
) -> QuantizationChoice:
    """The user's choice when explicit (``dequantize`` True or False); otherwise (None) the
    backend's: on the CPU, where quantized matmuls run 15-20x slower than float32 ones, a
    quantized base (a GGUF's Q4/Q8, an MLX 4-bit model, ``quantization: 4bit``) trains in
    float when the float copy fits; Metal and CUDA keep it quantized (QLoRA's memory)."""
    if dequantize is not None or backend.backend_name() != "cpu" or not (quantized or bits):
        return QuantizationChoice(bool(dequantize) and quantized, None if dequantize else bits)
    gb = f"{float_size / 1e9:.1f} GB"
    if not fits_in_memory(float_size):
        total = backend.total_memory() or 0
        return QuantizationChoice(
            False,
            bits,
            f"note: keeping the base quantized on the CPU: a float copy ({gb}) would not fit "
            f"the memory plan ({FLOAT_MEMORY_FRACTION:.0%} of {total / 1e9:.1f} GB)",
        )
    what = (
        "dequantized the quantized base" if quantized else f"not quantizing the base to {bits} bits"
    )
    return QuantizationChoice(
        quantized,
        None,
        f"note: {what}: float weights ({gb}) on the CPU, where quantized matmuls are 15-20x "
        "slower (set dequantize: false to keep quantized weights)",
    )


def _load(spec: str | None) -> tuple[nn.Module, object, dict, Path]:
    """Model, tokenizer, config and path, with the weights as stored (quantized or not)."""
    if spec is not None and str(spec).endswith(".gguf"):
        from mlx_pref.gguf import GGUFError, load_gguf

        if not Path(spec).is_file():
            raise ModelError(f"GGUF file not found: {spec}")
        try:
            model, tokenizer, config = load_gguf(spec)
        except GGUFError as exc:
            raise ModelError(str(exc)) from None
        return model, tokenizer, config, Path(spec)
    from mlx_lm.utils import load_model as mlx_load_model

    path = resolve_model_path(spec)
    config = _config_or_none(path) or {}
    if is_vision_config(config):
        from mlx_pref.vision.model import load_vision

        model, tokenizer = load_vision(path, config)
        return model, tokenizer, config, path
    try:
        model, config = mlx_load_model(path, lazy=False)
    except (ValueError, RuntimeError, OSError) as exc:  # RuntimeError: a damaged file
        where = _damaged_weights(path) or path
        raise ModelError(f"cannot load the model in {where}: {first_line(exc)}") from None
    return model, load_checked_tokenizer(path, config.get("eos_token_id")), config, path


def load_model(
    spec: str | None,
    *,
    quantization_bits: int | None = None,
    dtype: str | None = None,
    dequantize: bool | None = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer through mlx-lm (or the GGUF reader for ``.gguf``).

    ``dequantize`` turns an already-quantized base (a GGUF, an MLX 4-bit model) into
    float weights; ``quantization_bits`` quantizes a float base (QLoRA); ``dequantize=None``
    lets the backend decide both (``resolve_quantization``), with a note saying what it
    chose. On the CPU, float weights from a quantized base are float32 unless ``dtype``.
    """
    from mlx_lm.utils import dequantize_model

    model, tokenizer, config, path = _load(spec)
    vision = is_vision_config(config)
    quantized = any(isinstance(m, QUANTIZED) for _, m in model.named_modules())
    compute = getattr(mx, dtype) if dtype else mx.float32
    choice = resolve_quantization(
        dequantize, quantization_bits, quantized, float_bytes(model, compute)
    )
    notes = [choice.note] if choice.note else []
    if choice.dequantize:
        model = dequantize_model(model)
        if dtype is None and backend.backend_name() == "cpu":
            cast_floats(model, mx.float32)
    if dtype is not None:
        cast_floats(model, getattr(mx, dtype))
    applied = None
    if choice.bits is not None:
        try:
            quantize_base(model.language_model if vision else model, choice.bits)
            mx.eval(model.parameters())
            applied = choice.bits
        except (RuntimeError, ValueError) as exc:  # a mode this backend lacks
            notes.append(
                f"warning: {choice.bits}-bit quantization is not available here ({exc}); "
                "training the unquantized base instead"
            )
    mx.eval(model.parameters())
    return LoadedModel(model, tokenizer, path, config, notes, applied, choice.dequantize, vision)
