"""Answers of models to prompts: what ``generate_during_eval`` writes to samples.jsonl and
what ``mlx-pref generate`` prints, through one function, ``answer``.

``mlx-pref generate`` answers with each run's trained weights (its adapter on its base,
or the whole model of a full fine-tuning run), and with the base, side by side. Each
source is loaded in turn, so only one is in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_pref.errors import ConfigError


def answer(
    model: nn.Module,
    tokenizer,
    prompt: Sequence[int],
    max_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """The continuation of a tokenized prompt (dropout off), decoded: greedy at
    ``temperature`` 0, else sampled with mlx-lm's sampler (``top_p`` < 1: nucleus),
    seeded by ``seed``."""
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    kwargs = {}
    if temperature > 0:
        kwargs["sampler"] = make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0)
        if seed is not None:
            mx.random.seed(seed)
    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, list(prompt), max_tokens=max_tokens, **kwargs)
    finally:
        model.train(was_training)


@dataclass
class Source:
    """One model to answer with: a base, an adapter on a base, or a whole model."""

    label: str
    model: str | None
    """A model folder, Hub id or .gguf (None: the embedded model)."""
    adapter: Path | None = None
    quantization_bits: int | None = None
    dtype: str | None = None
    dequantize: bool = False

    def load(self):
        from mlx_lm.tuner.utils import load_adapters

        from mlx_pref.models import load_model

        loaded = load_model(
            self.model, quantization_bits=self.quantization_bits, dtype=self.dtype,
            dequantize=self.dequantize,
        )  # fmt: skip
        if loaded.vision:
            raise ConfigError(
                f"{loaded.path} is a vision-language model: generate with mlx-vlm "
                "(python -m mlx_vlm.generate --model BASE --adapter-path RUN_DIR --image ...)"
            )
        if self.adapter is not None:
            load_adapters(loaded.model, str(self.adapter))
        loaded.model.eval()
        return loaded


def run_sources(run_dir: str | Path) -> tuple[Source, Source]:
    """A run's trained weights and its base, each loaded as the run loaded it. The trained
    weights are its adapter on the base, or the model folder of a full fine-tuning run; an
    unfinished run's newest checkpoint."""
    from mlx_pref.adapters import ADAPTER_FILE
    from mlx_pref.checkpoint import list_checkpoints
    from mlx_pref.config import RUN_CONFIG, load_config
    from mlx_pref.model_folder import weight_files

    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {RUN_CONFIG} is missing")
    cfg = load_config(run_dir / RUN_CONFIG)
    weights = run_dir
    done = weight_files(run_dir) if cfg.full else (run_dir / ADAPTER_FILE).is_file()
    if not done:
        if not list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} has no trained weights yet (no checkpoint)")
        weights = list_checkpoints(run_dir)[-1]
    load = {"quantization_bits": cfg.quantization_bits, "dtype": cfg.dtype,
            "dequantize": cfg.dequantize}  # fmt: skip
    base = Source("base", cfg.model, None, **load)
    if cfg.full:
        return Source(str(run_dir), str(weights), None, dtype=cfg.dtype), base
    return Source(str(run_dir), cfg.model, weights, **load), base


def sources_for(
    run_dirs: Sequence[str], *, base: bool, model: str | None = None, adapter: str | None = None
) -> list[Source]:
    """What ``mlx-pref generate`` answers with: the base first (``base``; one per distinct
    base among the runs), then each run; without runs, ``model`` (+ ``adapter``)."""
    if not run_dirs:
        name = model or "embedded model"
        if adapter is None:
            return [Source(name, model)]
        plain = [Source(f"{name} (base)", model)] if base else []
        return [*plain, Source(adapter, model, Path(adapter))]
    pairs = [run_sources(r) for r in run_dirs]
    distinct: dict[tuple, Source] = {}
    for _, b in pairs if base else []:
        distinct.setdefault((b.model, b.quantization_bits, b.dtype, b.dequantize), b)
    bases = list(distinct.values())
    if len(bases) > 1:
        for b in bases:
            b.label = f"base ({b.model or 'embedded model'})"
    return [*bases, *(trained for trained, _ in pairs)]


def read_prompts(path: str | Path) -> list[str | list[dict]]:
    """Prompts from a file: JSON Lines rows with a ``prompt`` (text or chat messages), or
    plain text, one prompt per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise ConfigError(f"{path}:{n}: a row needs a 'prompt' field")
        prompts.append(row["prompt"])
    return prompts


def generate_answers(
    sources: list[Source],
    prompts: list[str | list[dict]],
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
) -> list[dict]:
    """One row per prompt: ``{"prompt": ..., "answers": {label: text}}``. Every source
    answers every prompt with the same seed, so sampled answers compare fairly."""
    from mlx_pref.data.tokenize import encode_prompt

    rows = [{"prompt": p, "answers": {}} for p in prompts]
    for source in sources:
        loaded = source.load()
        for row in rows:
            ids = encode_prompt(loaded.tokenizer, row["prompt"], chat=chat)
            row["answers"][source.label] = answer(
                loaded.model, loaded.tokenizer, ids, max_tokens,
                temperature=temperature, top_p=top_p, seed=seed,
            )  # fmt: skip
        del loaded
        mx.clear_cache()
    return rows


def format_answers(rows: list[dict]) -> str:
    """The answers side by side, one block per prompt."""
    out = []
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = prompt[-1].get("content", "") if prompt else ""
        out.append(f"prompt: {prompt}")
        width = max(len(label) for label in row["answers"])
        for label, text in row["answers"].items():
            lines = text.strip().splitlines() or [""]
            out.append(f"  {label:<{width}} | {lines[0]}")
            out += [f"  {'':<{width}} | {line}" for line in lines[1:]]
        out.append("")
    return "\n".join(out).rstrip()
