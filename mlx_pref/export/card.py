"""The model card (``README.md``) written into every export.

YAML front matter the Hub reads (base model, library, tags, license), then what a reader
needs: the base model, the loss and its parameters, the data, the final evaluation
metrics, and how to load the export with mlx-lm, PEFT, transformers, llama.cpp or
Ollama. Built only from the run's files; data files appear by name, never by their
local directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mlx_pref.config import Config

if TYPE_CHECKING:
    from mlx_pref.export import BaseModel, Run

# Config fields the card always shows in its settings table, in this order; other
# fields appear when they differ from their defaults.
SETTINGS = (
    "loss",
    "beta",
    "label_smoothing",
    "reference",
    "learning_rate",
    "lr_schedule",
    "warmup_steps",
    "weight_decay",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "max_length",
    "max_prompt_length",
    "truncation_mode",
    "quantization",
    "dtype",
    "seed",
)
# Fields that are paths, logging or bookkeeping: never in the card.
PRIVATE = {
    "model",
    "adapter",
    "ref_cache_dir",
    "data",
    "eval_data",
    "ref_model",
    "output",
    "lora",
    "format",
    "strict",
    "eval_every",
    "eval_batches",
    "log_every",
    "save_every",
    "keep_last",
    "max_nonfinite",
    "max_grad_norm",
    "eval_split",
    "eval_on_start",
    "save_best",
    "greater_is_better",
    "report_to",
}
LOSS_TAGS = {"sigmoid": "dpo"}


def configured_losses(config: Config) -> list[str]:
    """The loss names a run's config gives (one, or the parts of a weighted loss)."""
    return list(config.loss) if isinstance(config.loss, dict) else [config.loss]


def tags(config: Config, dora: bool, library: str) -> list[str]:
    """``mlx-pref``, the loss names in the spelling users search for, ``lora`` (and ``dora``),
    or ``full-fine-tuning``."""
    out = ["mlx-pref"]
    for name in configured_losses(config):
        tag = LOSS_TAGS.get(name, name)
        if tag not in out:
            out.append(tag)
    out.append("full-fine-tuning" if config.full else "lora")
    if dora:
        out.append("dora")
    if library in ("mlx", "gguf"):
        out.append(library)
    return out


def front_matter(run: Run, base: BaseModel, library: str) -> str:
    data: dict = {}
    if base.hub_id:
        data["base_model"] = base.hub_id
    data["library_name"] = library
    if base.license:
        data["license"] = base.license
    data["pipeline_tag"] = "text-generation"
    data["tags"] = tags(run.config, run.dora, library)
    return "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def settings_table(
    config: Config, adapter_config: dict, dora: bool, steps: int | None
) -> list[str]:
    """The loss, its parameters and the training settings, as a Markdown table."""
    values, defaults = config.to_dict(), Config().to_dict()
    keys = [k for k in SETTINGS if values.get(k) is not None]
    keys += [  # anything else (a loss's own parameters, reference refresh) when it was set
        k for k in values if k not in SETTINGS and k not in PRIVATE and values[k] != defaults[k]
    ]
    rows = [f"| {k} | {_fmt(values[k])} |" for k in keys]
    if steps is not None:
        rows.insert(0, f"| steps trained | {steps} |")
    if config.full:  # the fine_tune row says it; there is no adapter to describe
        return ["| setting | value |", "|---|---|", *rows]
    params = adapter_config["lora_parameters"]
    kind = "DoRA" if dora else "LoRA"
    layers = adapter_config.get("num_layers")
    rows.append(
        f"| adapter | {kind}, rank {params['rank']}, alpha {_fmt(params['scale'] * params['rank'])}"
        f" (scale {_fmt(params['scale'])}), dropout {_fmt(params.get('dropout', 0.0))} |"
    )
    if config.adapter:
        rows.append(f"| started from | the SFT adapter `{Path(config.adapter).name}` |")
    rows.append(f"| adapted modules | {', '.join(params.get('keys') or ['all'])} |")
    rows.append(f"| adapted blocks | last {layers} |")
    return ["| setting | value |", "|---|---|", *rows]


def steps_trained(run: Run) -> int | None:
    """The checkpoint's step, else the last step in the metrics log."""
    if run.step is not None:
        return run.step
    steps = [r["step"] for r in run.metrics if "step" in r]
    return max(steps) if steps else None


def count_rows(path: Path) -> int | None:
    """Rows in a local JSON Lines or JSON file; None when it cannot be counted here."""
    if not path.is_file():
        return None
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                return sum(1 for line in fh if line.strip())
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return len(data) if isinstance(data, list) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None


def data_summary(config: Config) -> list[str]:
    """File (or Hub dataset) names and row counts; never the local directories."""
    if config.data is None:
        sources = [("train", _embedded("train.jsonl"), "mlx-pref's embedded tiny-prefs")]
        evaluation = config.eval_data or _embedded("eval.jsonl")
        sources.append(("eval", Path(evaluation), None))
    else:
        sources = [("train", Path(config.data), None)]
        if config.eval_data is not None:
            sources.append(("eval", Path(config.eval_data), None))
    lines = []
    for split, path, label in sources:
        path = path.expanduser()
        rows = count_rows(path)
        name = path.name if path.is_file() or label else str(path)
        count = f" ({rows} rows)" if rows is not None else ""
        origin = f" from {label}" if label else ""
        lines.append(f"- {split}: `{name}`{count}{origin}")
    if config.eval_data is None and config.data is not None and config.eval_split > 0:
        lines.append(f"- eval: {config.eval_split:.0%} of the training rows held out")
    return lines


def _embedded(name: str) -> Path:
    """A file of the embedded data set (its bare name if this installation lacks it)."""
    from mlx_pref.errors import MlxPrefError
    from mlx_pref.models import embedded_root

    try:
        return embedded_root("tiny-prefs") / name
    except MlxPrefError:
        return Path(name)


def final_eval(metrics: list[dict]) -> dict | None:
    """The last record holding ``eval/`` metrics."""
    for record in reversed(metrics):
        if any(k.startswith("eval/") for k in record):
            return record
    return None


def results(run: Run) -> list[str]:
    record = final_eval(run.metrics)
    if record is None:
        return ["No evaluation metrics were recorded for this run."]
    rows = [f"| {k} | {_fmt(v)} |" for k, v in record.items() if k.startswith("eval/")]
    return [f"At step {record.get('step', '?')}:", "", "| metric | value |", "|---|---|", *rows]


def _base_expr(base: BaseModel) -> tuple[str, list[str]]:
    """A Python expression for the base model, and the imports it needs."""
    if base.hub_id:
        return f'"{base.hub_id}"', []
    if base.spec is None:
        return "str(resolve_model_path(None))", ["from mlx_pref.models import resolve_model_path"]
    return f'"{base.spec}"', []


def _location_expr(location: str, hub: bool) -> tuple[str, list[str]]:
    if hub:
        return f'snapshot_download("{location}")', ["from huggingface_hub import snapshot_download"]
    return f'"{location}"', []


def gguf_usage(base: BaseModel, fmt: str, location: str, on_hub: bool, artifact: str) -> list[str]:
    """llama.cpp and Ollama commands for the two GGUF exports."""
    folder = location.rsplit("/", 1)[-1] if on_hub else location
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(folder).name.lower()).strip("-.") or "mlx-pref"
    fetch = [f"hf download {location} --local-dir {folder}"] if on_hub else []
    file = f'"{folder}/{artifact}"'
    model = f'"{base.spec}"' if fmt == "gguf-lora" and base.gguf else "BASE.gguf"
    flags = f"-m {file}" if fmt == "gguf" else f"-m {model} --lora {file}"
    commands = [*fetch, f"llama-cli {flags}", f"llama-server {flags}  # OpenAI-compatible, :8080"]
    out = ["## Use with llama.cpp", "", "```bash", *commands, "```"]
    if fmt == "gguf-lora" and not base.gguf:
        out += [
            "",
            f"`BASE.gguf` is a GGUF of {base.name} as llama.cpp's `convert_hf_to_gguf.py` "
            "writes it, in any quantization.",
        ]
    if fmt == "gguf" or base.gguf:
        ollama = [f'cd "{folder}"', f"ollama create {name} -f Modelfile", f"ollama run {name}"]
        out += ["", "## Use with Ollama", "", "```bash", *ollama, "```"]
    return out


def usage(
    base: BaseModel, fmt: str, library: str, location: str, on_hub: bool, artifact: str = ""
) -> list[str]:
    """How to load the export: code a reader can paste."""
    if fmt in ("gguf", "gguf-lora"):
        return gguf_usage(base, fmt, location, on_hub, artifact)
    base_code, base_imports = _base_expr(base)
    if fmt == "mlx" and base.gguf and not base.hub_id:  # mlx_lm.load reads no GGUF files
        where, imports = _location_expr(location, on_hub)
        code = [
            *imports,
            "from mlx_lm import generate",
            "from mlx_lm.tuner.utils import load_adapters",
            "from mlx_pref.models import load_model",
            "",
            f"base = load_model({base_code})  # mlx-pref reads the GGUF file",
            f"model = load_adapters(base.model, {where})",
            'print(generate(model, base.tokenizer, prompt="Hello", max_tokens=64))',
        ]
        return ["## Use with mlx-lm and mlx-pref", "", "```python", *code, "```"]
    if fmt == "mlx":
        where, imports = _location_expr(location, on_hub)
        code = [
            *imports,
            *base_imports,
            "from mlx_lm import generate, load",
            "",
            f"model, tokenizer = load({base_code}, adapter_path={where})",
            'print(generate(model, tokenizer, prompt="Hello", max_tokens=64))',
        ]
        out = ["## Use with mlx-lm", "", "```python", *code, "```"]
        if not on_hub and not base_imports:
            command = f"mlx_lm.generate --model {base_code} --adapter-path {where} --prompt Hello"
            out += ["", "or from the shell:", "", "```bash", command, "```"]
        return out
    if fmt == "peft":
        code = [
            *base_imports,
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({base_code})",
            f'model = PeftModel.from_pretrained(base, "{location}")',
            f"tokenizer = AutoTokenizer.from_pretrained({base_code})",
        ]
        return ["## Use with PEFT", "", "```python", *code, "```"]
    mlx_code = [
        "from mlx_lm import generate, load",
        "",
        f'model, tokenizer = load("{location}")',
        'print(generate(model, tokenizer, prompt="Hello", max_tokens=64))',
    ]
    out = ["## Use with mlx-lm", "", "```python", *mlx_code, "```"]
    if library == "transformers":
        hf_code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{location}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
        ]
        out += ["", "## Use with transformers", "", "```python", *hf_code, "```"]
    return out


def model_card(
    run: Run,
    base: BaseModel,
    fmt: str,
    library: str,
    output: Path,
    repo_id: str | None,
    notes: list[str],
    artifact: str = "",
) -> str:
    """The README.md of an export in format ``fmt``, written to ``output`` and, when
    ``repo_id`` is given, pushed there (the loading snippets then name the repo);
    ``artifact`` is the GGUF file of a GGUF export."""
    on_hub = repo_id is not None
    location = repo_id or str(output)
    losses = " + ".join(LOSS_TAGS.get(n, n) for n in configured_losses(run.config))
    kind = "DoRA" if run.dora else "LoRA"
    if run.config.full:  # a whole model in either format: loaded as the fused one is
        fmt = "fused"
    what = {
        "mlx": f"A {kind} adapter for **{base.name}** in mlx-lm's format",
        "peft": f"A {kind} adapter for **{base.name}** in PEFT's format",
        "fused": f"**{base.name}** with a {kind} adapter merged into its weights",
        "gguf": f"**{base.name}** with a {kind} adapter merged into its weights, as GGUF",
        "gguf-lora": f"A {kind} adapter for **{base.name}** as a llama.cpp GGUF adapter",
    }[fmt]
    if run.config.full:
        what = f"**{base.name}** with every weight fine-tuned"
    checkpoint = f", at step {run.step}" if run.step is not None else ""
    title = location.rsplit("/", 1)[-1] if on_hub else output.name
    lines = [
        front_matter(run, base, library),
        f"# {title}",
        "",
        f"{what}. Trained with the **{losses}** preference loss by mlx-pref{checkpoint}.",
        "",
        "## Training",
        "",
        *settings_table(run.config, run.adapter_config, run.dora, steps_trained(run)),
        "",
        "## Data",
        "",
        *data_summary(run.config),
        "",
        "## Results",
        "",
        *results(run),
        "",
        *usage(base, fmt, library, location, on_hub, artifact),
    ]
    if notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"
