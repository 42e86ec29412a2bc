"""Export a run for others: the mlx-lm adapter, a PEFT adapter, or a fused model; Hub push.

Three formats, one entry point (``export_run``):

- ``mlx``: the adapter exactly as mlx-lm loads it (``--adapter-path``), with a model card.
- ``peft``: ``adapter_model.safetensors`` + ``adapter_config.json`` that
  ``PeftModel.from_pretrained`` loads onto the original Hugging Face model. mlx-lm keeps
  ``lora_a`` (in, r) and ``lora_b`` (r, out) with ``scale``; PEFT keeps ``lora_A.weight``
  (r, in) and ``lora_B.weight`` (out, r) with ``lora_alpha`` and scaling alpha / r, so the
  factors are transposed and ``lora_alpha = scale * r``. DoRA's magnitude ``m`` is PEFT's
  ``lora_magnitude_vector`` unchanged: both are the norm of each output row of W + ΔW.
- ``fused``: the adapter merged into the base with mlx-lm's own ``fuse()``, written in the
  Hugging Face layout; a quantized base stays MLX-quantized unless ``dequantize``.

``push_to_hub`` uploads an exported folder with huggingface-hub. The token comes from the
usual login or ``HF_TOKEN``; it is never printed, logged or written, and it is scrubbed
from any error message that echoes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import yaml
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

from mlx_pref.adapters import ADAPTER_CONFIG, ADAPTER_FILE, ADAPTER_LEAVES
from mlx_pref.checkpoint import CHECKPOINTS, read_state
from mlx_pref.config import RUN_CONFIG, Config, load_config
from mlx_pref.errors import MlxPrefError
from mlx_pref.models import embedded_root, load_model, resolve_model_path
from mlx_pref.progress import read_metrics
from mlx_pref.rundir import OutputError, check_output, read_marker, record, swap_in

FORMATS = ("mlx", "peft", "fused")
CARD_FILE = "README.md"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PEFT_TIED_HEAD = "lm_head"  # the output module tied to the input embedding in HF causal LMs
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
HUB_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")


class ExportError(MlxPrefError):
    """A run cannot be exported in the requested format (missing file, unsupported layer)."""


class HubError(MlxPrefError):
    """The Hugging Face Hub refused or could not be reached; the export stays on disk."""


@dataclass
class Run:
    """What an export reads from a run directory (or one of its checkpoints)."""

    root: Path
    """The run directory: config.yaml, metrics.jsonl."""
    adapter_dir: Path
    """Where the adapter files are: the run directory, or a checkpoint inside it."""
    config: Config
    adapter_config: dict
    step: int | None = None
    """The checkpoint's step, or None for the run's final adapters."""
    metrics: list[dict] = field(default_factory=list)

    @property
    def dora(self) -> bool:
        return self.adapter_config.get("fine_tune_type", "lora") == "dora"


@dataclass
class BaseModel:
    """The model the adapter was trained on, and how to name it for others."""

    spec: str | None
    """As the run's config names it (None: the embedded tiny model)."""
    hub_id: str | None
    """Its Hugging Face Hub id, when known."""
    name: str
    license: str | None = None

    @property
    def gguf(self) -> bool:
        return self.spec is not None and self.spec.endswith(".gguf")

    def local_path(self) -> Path:
        """A local directory holding it (downloads a Hub model that is not cached)."""
        return resolve_model_path(self.spec)

    def reference(self) -> str:
        """What a user passes to ``from_pretrained`` / ``mlx_lm.load`` to get this base."""
        if self.hub_id:
            return self.hub_id
        return str(self.local_path().resolve())

    def config(self) -> dict:
        """Its Hugging Face config (for a GGUF, the one its metadata describes)."""
        if self.gguf:
            from mlx_pref.gguf import gguf_config, read_gguf_header

            return gguf_config(*read_gguf_header(self.spec))
        return _read_json(self.local_path() / "config.json")

    def weight_names(self) -> set[str]:
        """Its tensor names in the Hugging Face layout, read from file headers only."""
        if self.gguf:
            from mlx_pref.gguf import hf_tensor_names

            return hf_tensor_names(self.spec)
        return checkpoint_keys(self.local_path())

    def skeleton(self) -> nn.Module:
        """Its mlx-lm module tree, weights left unread (lazy): enough to rebuild layers."""
        if self.gguf:
            from mlx_lm.models import llama

            return llama.Model(llama.ModelArgs.from_dict(self.config()))
        from mlx_lm.utils import load_model as mlx_load_model

        return mlx_load_model(self.local_path(), lazy=True)[0]


@dataclass
class Destination:
    """Where an export is written, and the Hub repo it is meant for (if any)."""

    output: Path
    repo_id: str | None = None


# --------------------------------------------------------------------------- reading a run
def read_run(run_dir: str | Path) -> Run:
    """The config, adapter config and metrics of a finished run or one of its checkpoints."""
    adapter_dir = Path(run_dir)
    if not adapter_dir.is_dir():
        raise ExportError(f"{adapter_dir}: no such run directory")
    in_checkpoint = adapter_dir.parent.name == CHECKPOINTS
    root = adapter_dir.parent.parent if in_checkpoint else adapter_dir
    for path in (root / RUN_CONFIG, adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_FILE):
        if not path.is_file():
            raise ExportError(f"{path} is missing: {_missing_hint(root, path)}")
    step = read_state(adapter_dir)["step"] if in_checkpoint else None
    metrics = [r for r in read_metrics(root) if step is None or r.get("step", 0) <= step]
    return Run(
        root=root,
        adapter_dir=adapter_dir,
        config=load_config(root / RUN_CONFIG),
        adapter_config=json.loads((adapter_dir / ADAPTER_CONFIG).read_text()),
        step=step,
        metrics=metrics,
    )


def _missing_hint(root: Path, path: Path) -> str:
    if path.name == ADAPTER_FILE and (root / CHECKPOINTS).is_dir():
        latest = sorted((root / CHECKPOINTS).glob("step-*"))
        if latest:
            return (
                f"the run has not finished; resume it, or export its latest checkpoint {latest[-1]}"
            )
    return "not an mlx-pref run directory (expected config.yaml, adapters.safetensors, adapter_config.json)"


def identify_base(config: Config, override: str | None = None) -> BaseModel:
    """Name the run's base model (Hub id, display name, license) without downloading it."""
    spec = config.model
    local = None
    if spec is None:
        try:
            local = embedded_root("tiny-chat")
        except MlxPrefError:  # only needed for its license; the formats that need it will say
            local = None
    elif Path(spec).expanduser().exists():
        local = Path(spec).expanduser()
    hub_id = override or _hub_id(spec, local)
    if hub_id:
        name = hub_id
    elif spec is None:
        name = "mlx-pref's embedded tiny-chat model"
    else:
        name = Path(spec).name
    license_ = _front_matter(local / CARD_FILE).get("license") if local and local.is_dir() else None
    return BaseModel(spec=spec, hub_id=hub_id, name=name, license=license_)


def _hub_id(spec: str | None, local: Path | None) -> str | None:
    """The Hub id of a model named by id, or found in the Hub cache's ``models--org--name``."""
    if spec is None:
        return None
    if local is None:
        return spec if spec.count("/") == 1 else None
    for part in local.resolve().parts:
        match = HUB_CACHE_DIR.match(part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def _front_matter(path: Path) -> dict:
    """The YAML front matter of a model card, or {} if it has none."""
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    block = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------- export: all
def default_output(run_dir: str | Path, fmt: str) -> Path:
    """``RUN_DIR/export-FMT`` (for a checkpoint: ``RUN/export-FMT-step-N`` beside it)."""
    run_dir = Path(run_dir)
    if run_dir.parent.name == CHECKPOINTS:
        return run_dir.parent.parent / f"export-{fmt}-{run_dir.name}"
    return run_dir / f"export-{fmt}"


def export_run(
    run_dir: str | Path,
    fmt: str,
    output: str | Path | None = None,
    *,
    dequantize: bool = False,
    base: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the run's adapter as ``fmt`` (mlx, peft or fused) into ``output``; returns it.

    ``base`` records the base model's Hub id where the run used a local copy; ``repo_id``
    is where the export will be pushed (used in the model card's loading snippets).
    The folder is assembled next to ``output`` and renamed into place, so a failed export
    leaves nothing half-written.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if dequantize and fmt != "fused":
        raise ExportError("--dequantize applies to --format fused only")
    if base is not None:
        validate_repo_id(base, "--base-model")
    run = read_run(run_dir)
    output = Path(output) if output is not None else default_output(run_dir, fmt)
    _check_output(output, run, overwrite)
    info = identify_base(run.config, base)
    # An adapter trained on dequantized weights is fused into dequantized weights.
    dequantize = dequantize or (fmt == "fused" and run.config.dequantize)
    writer = {"mlx": write_mlx, "peft": write_peft, "fused": write_fused}[fmt]
    return _write_folder(
        output,
        lambda tmp: writer(run, info, tmp, Destination(output, repo_id), dequantize),
        run.root,
    )


def _check_output(output: Path, run: Run, overwrite: bool) -> None:
    target = output.resolve()
    for protected in (run.root.resolve(), run.adapter_dir.resolve()):
        if target == protected or target in protected.parents:
            raise ExportError(f"--output {output} would overwrite the run itself; pick another")
    try:
        check_output(output, "export", overwrite=overwrite, protected=[run.root])
    except OutputError as exc:
        raise ExportError(str(exc)) from None


def _write_folder(output: Path, fill: Callable[[Path], None], run_root: Path) -> Path:
    """Fill a temporary sibling folder, then swap it in for ``output``; an export inside
    the run directory is listed in the run's marker."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".tmp-{output.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if output.parent.resolve() == run_root.resolve() and read_marker(run_root):
            record(run_root, output.name)
        swap_in(output, tmp, "export")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------- export: mlx
def write_mlx(run: Run, base: BaseModel, out: Path, dest: Destination, dequantize: bool) -> None:
    """The adapter files as they are (mlx-lm's format), plus a model card."""
    from mlx_pref.card import model_card

    for name in (ADAPTER_FILE, ADAPTER_CONFIG):
        shutil.copyfile(run.adapter_dir / name, out / name)
    notes = []
    if run.config.quantization:
        notes.append(
            f"Trained on a {run.config.quantization} quantized copy of the base model; "
            "mlx-lm applies the adapter to whichever copy of the base you load."
        )
    (out / CARD_FILE).write_text(
        model_card(run, base, "mlx", "mlx", dest.output, dest.repo_id, notes)
    )


# --------------------------------------------------------------------------- export: peft
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


def checkpoint_keys(base_path: Path) -> set[str]:
    """Tensor names in a Hugging Face checkpoint, read from the safetensors headers only."""
    keys: set[str] = set()
    for file in sorted(base_path.glob("*.safetensors")):
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        keys.update(k for k in header if k != "__metadata__")
    return keys


def _check_weights(modules: dict[str, nn.Module], weights: dict[str, mx.array], dora: bool) -> None:
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
        "base_model_name_or_path": base.reference(),
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
    from mlx_pref.card import model_card

    if base.gguf and not base.hub_id:
        raise ExportError(
            f"the run's base is a GGUF file ({base.spec}); a PEFT adapter applies to the Hugging "
            "Face model it came from: name it with --base-model ORG/NAME"
        )
    weights = mx.load(str(run.adapter_dir / ADAPTER_FILE))
    layout = adapter_layout(base, run.adapter_config)
    modules = layout.modules
    _check_weights(modules, weights, run.dora)
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
    _write_json(out / PEFT_CONFIG, peft_config(run, base, targets, tied_embedding))
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


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# -------------------------------------------------------------------------- export: fused
def write_fused(run: Run, base: BaseModel, out: Path, dest: Destination, dequantize: bool) -> None:
    """The base with the adapter merged (mlx-lm's ``fuse``), in the Hugging Face layout."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, make_shards

    from mlx_pref.card import model_card

    cfg = run.config
    loaded = load_model(
        cfg.model,
        quantization_bits=cfg.quantization_bits,
        dtype=cfg.dtype,
        dequantize=dequantize and base.gguf,
    )
    model = loaded.model
    try:
        load_adapters(model, str(run.adapter_dir))
    except ValueError as exc:
        raise ExportError(f"{run.adapter_dir}: {exc}".replace("\n", " ")) from None
    fused = [
        (name, module.fuse(dequantize=dequantize))
        for name, module in model.named_modules()
        if isinstance(
            module, (LoRALinear, DoRALinear, LoRAEmbedding, DoRAEmbedding, LoRASwitchLinear)
        )
    ]
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    quantization = _quantization(model)
    if base.gguf and quantization is not None:  # a GGUF's per-tensor bits, as loaded
        quantization = loaded.config.get("quantization", quantization)
    hf_layout = quantization is None and set(weights) <= base.weight_names()
    metadata = {"format": "pt" if hf_layout else "mlx"}
    shards = make_shards(weights)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        mx.save_safetensors(str(out / name), shard, metadata=metadata)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in sorted(s)},
        }
        _write_json(out / "model.safetensors.index.json", index)
    config = fused_config(base.config(), weights, quantization)
    _write_json(out / "config.json", config)
    if base.gguf:  # the tokenizer the GGUF describes, in transformers' files
        loaded.tokenizer._tokenizer.save_pretrained(str(out))
        _write_json(out / GENERATION_CONFIG, _token_ids(config))
    else:
        _copy_tokenizer(loaded.path, out, config)
    library = "transformers" if hf_layout else "mlx"
    notes = _fused_notes(run, quantization, hf_layout, dequantize)
    (out / CARD_FILE).write_text(
        model_card(run, base, "fused", library, dest.output, dest.repo_id, notes)
    )


def _quantization(model: nn.Module) -> dict | None:
    """mlx-lm's ``quantization`` config entry for the model's quantized layers, if any."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
    return None


def fused_config(config: dict, weights: dict[str, mx.array], quantization: dict | None) -> dict:
    """The base's config.json for the fused weights: mlx-lm's quantization keys only when
    the weights are quantized, and the dtype the float weights really have."""
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


def _copy_tokenizer(src: Path, out: Path, config: dict) -> None:
    """Tokenizer files and generation config, as the base has them (no code files)."""
    for pattern in (*TOKENIZER_FILES, GENERATION_CONFIG):
        for file in src.glob(pattern):
            shutil.copyfile(file, out / file.name)
    if not (out / GENERATION_CONFIG).exists():
        _write_json(out / GENERATION_CONFIG, _token_ids(config))


def _token_ids(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


def _fused_notes(
    run: Run, quantization: dict | None, hf_layout: bool, dequantize: bool
) -> list[str]:
    notes = []
    if quantization is not None:
        notes.append(
            f"MLX-quantized ({quantization['bits']}-bit, group size {quantization['group_size']}): "
            "loads with mlx-lm only. Export with --dequantize for a float model that "
            "transformers loads too."
        )
    elif not hf_layout:
        notes.append(
            "The weight names follow mlx-lm's model, which differs from the Hugging Face "
            "checkpoint here: this model loads with mlx-lm only."
        )
    if run.config.quantization and dequantize:
        notes.append(
            f"Trained on a {run.config.quantization} quantized base; the fused weights are the "
            "dequantized base plus the adapter, in float."
        )
    return notes


# ------------------------------------------------------------------------------ the Hub
def validate_repo_id(repo_id: str, flag: str = "--push-to-hub") -> None:
    """Reject a malformed Hub repo id before any work is done."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    try:
        hub_validate(repo_id)
    except HFValidationError as exc:
        raise HubError(f"{flag} {repo_id!r}: {str(exc).splitlines()[0]}") from None


def upload_files(folder: str | Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file an upload of ``folder`` sends, sorted. Hidden
    files and folders (``.cache``, ``.DS_Store``) are left out, as the upload leaves them."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), path.stat().st_size))
    return files


def describe_upload(folder: str | Path, repo_id: str, private: bool) -> list[str]:
    """The dry-run listing: repo, visibility, then each file with its size in bytes."""
    files = upload_files(folder)
    total = sum(size for _, size in files)
    visibility = "private" if private else "public"
    lines = [
        f"dry run: would upload {len(files)} files ({total} bytes) from {folder} "
        f"to {repo_id} ({visibility}); nothing was uploaded"
    ]
    lines += [f"  {name}  {size} bytes" for name, size in files]
    return lines


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    api: object | None = None,
) -> list[str]:
    """Create the model repo if needed and upload ``folder``; returns lines to show the user.

    ``dry_run`` only lists what would be uploaded. ``api`` replaces ``huggingface_hub.HfApi()``
    (which reads the token from ``HF_TOKEN`` or the saved login). Any failure becomes one
    ``HubError`` line; the folder is left as it was.
    """
    folder = Path(folder)
    validate_repo_id(repo_id)
    if not folder.is_dir() or not upload_files(folder):
        raise HubError(f"{folder}: nothing to upload (not an exported folder)")
    if dry_run:
        return describe_upload(folder, repo_id, private)
    from huggingface_hub import get_token

    token = get_token()
    if api is None:
        if not token:
            raise HubError(
                "not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN"
            )
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            ignore_patterns=[".*", "*/.*"],
            commit_message="Upload from mlx-pref",
        )
    except Exception as exc:  # the network boundary: whatever the client raises, one line
        raise HubError(_hub_failure(repo_id, folder, exc, token)) from None
    files = upload_files(folder)
    return [f"uploaded {len(files)} files to https://huggingface.co/{repo_id}"]


def _hub_failure(repo_id: str, folder: Path, exc: Exception, token: str | None) -> str:
    detail = " ".join(str(exc).split()) or "no details"
    if token:
        detail = detail.replace(token, "<token>")
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return (
        f"cannot upload to {repo_id} on the Hugging Face Hub ({type(exc).__name__}: {detail}); "
        f"the export is intact in {folder}"
    )


def export_and_push(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    fmt: str = "mlx",
    output: str | Path | None = None,
    base: str | None = None,
) -> Path:
    """Export a finished run and upload it: what ``train --push-to-hub`` calls at the end.

    Without ``output`` the export goes to ``RUN_DIR/export-FMT`` (replaced if present).
    Returns the exported folder, which stays on disk whether or not the upload succeeds.
    """
    validate_repo_id(repo_id)
    folder = export_run(run_dir, fmt, output, base=base, repo_id=repo_id, overwrite=output is None)
    push_to_hub(folder, repo_id, private=private)
    return folder
