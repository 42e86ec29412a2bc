"""The Soup trainer's config shape, read into mlx-pref's keys.

Soup nests its settings: ``base`` (the model), ``task`` (``dpo``, ``ipo``, ``simpo``,
``orpo``, ``kto``, ``bco``, or ``preference`` with ``training.preference_loss`` or
``training.preference_loss_weights``), ``data: {train, format, val_split, max_length}``,
``training: {epochs, lr, batch_size, ..., lora: {...}, quantization, dpo_beta, ...}``,
``output`` and ``experiment_name``. Each loss has its own β key in Soup; mlx-pref has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_pref.config import hf_values as hf
from mlx_pref.config.hf_values import Translation

TASKS = {"dpo": "dpo", "ipo": "ipo", "simpo": "simpo", "orpo": "orpo", "kto": "kto", "bco": "bco"}
BETAS = {
    "dpo": "dpo_beta",
    "ipo": "ipo_tau",
    "orpo": "orpo_beta",
    "kto": "kto_beta",
    "bco": "bco_beta",
}
DATA_FORMATS = {"dpo": "auto", "auto": "auto", "kto": "unpaired"}
SOUP_VAL_SPLIT = 0.1
"""Soup holds out this share of the training rows when ``data.val_split`` is not given."""
TRAINING_RENAMED = {
    "epochs": "epochs",
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
    "save_steps": "save_every",
    "logging_steps": "log_every",
    "dpo_beta_schedule": "beta_schedule",
    "dpo_beta_end": "beta_end",
    "dpo_ref_regen_epochs": "ref_regen_epochs",
    "simpo_gamma": "simpo_gamma",
    "cpo_alpha": "cpo_alpha",
    "seed": "seed",
    "max_steps": "max_steps",
    "label_smoothing": "label_smoothing",
    "max_seq_length": "max_length",
    "beta": "beta",
}
LORA = {"r": "r", "alpha": "alpha", "dropout": "dropout", "target_modules": "target_modules"}
LORA = {**LORA, "use_dora": "dora"}
IGNORED = {"backend", "optimizer", "batch_size", "scheduler", "lora", "quantization",
           "max_grad_norm", "warmup_steps", "gradient_checkpointing", "preference_loss",
           "preference_loss_weights", "use_rslora", *BETAS.values()}  # fmt: skip
"""Training keys read by their own rule below (not unknown)."""


def is_soup(raw: dict[str, Any]) -> bool:
    """Soup's shape: a ``task``, a ``base`` model, or ``data``/``training`` mappings."""
    return (
        "task" in raw
        or "base" in raw
        or isinstance(raw.get("data"), dict)
        or isinstance(raw.get("training"), dict)
    )


def translate_soup(raw: dict[str, Any], ours: set[str]) -> Translation:
    t = Translation("Soup")
    top = {"task", "base", "data", "training", "backend", "modality", "output", "experiment_name"}
    for key, value in raw.items():
        if key not in top:
            t.out[key] = value  # mlx-pref's own keys beside Soup's (or unknown ones)
    base = raw.get("base")
    if isinstance(base, dict):
        base = base.get("model")
    if base is not None:
        t.set("model", base, "base -> model")
    if raw.get("backend") is not None:
        t.ignored.append(f"backend {raw['backend']}")
    if raw.get("modality", "text") != "text":
        t.problems.append(f"modality {raw['modality']!r} has no counterpart (text only)")
    if raw.get("output") is not None:
        output = str(Path(raw["output"]) / raw.get("experiment_name", ""))
        t.set("output", output.rstrip("/"), "output (+ experiment_name) -> output")
    _data(raw.get("data"), t)
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        t.problems.append("training must be a mapping")
        training = {}
    _training(training, t)
    _task(raw.get("task", "dpo"), training, t)
    return t


def _data(data: Any, t: Translation) -> None:
    if data is None:
        return
    if isinstance(data, str):
        t.set("data", data, "data")
        return
    for key, value in data.items():
        if key == "train":
            t.set("data", value, "data.train -> data")
            split = data.get("val_split", SOUP_VAL_SPLIT)
            how = "data.val_split" if "val_split" in data else "Soup's default val_split 0.1"
            if split:
                t.set("eval_split", split, f"{how} -> eval_split")
        elif key == "format":
            if value in DATA_FORMATS:
                t.set("format", DATA_FORMATS[value], f"data.format {value} -> format")
            else:
                t.problems.append(f"data.format {value!r} has no counterpart (dpo, kto, auto)")
        elif key == "max_length":
            t.set("max_length", value, "data.max_length -> max_length")
            if isinstance(value, int):
                half = value // 2
                t.set("max_prompt_length", half, "max_prompt_length = max_length // 2 (as Soup)")
        elif key != "val_split":
            t.problems.append(f"data.{key} has no counterpart")


def _training(training: dict[str, Any], t: Translation) -> None:
    for key, value in training.items():
        where = f"training.{key}"
        if key in TRAINING_RENAMED:
            t.set(TRAINING_RENAMED[key], value, f"{where} -> {TRAINING_RENAMED[key]}")
        elif key == "batch_size":
            if value == "auto":
                t.ignored.append("training.batch_size auto")
            else:
                t.set("batch_size", value, f"{where} -> batch_size")
        elif key == "scheduler":
            hf.schedule(value, training, t, where)
        elif key == "optimizer":
            hf.optimizer(value, training, t, where)
        elif key == "max_grad_norm":
            hf.max_grad_norm(value, training, t, where)
        elif key == "warmup_steps":
            hf.warmup_steps(value, training, t, where)
        elif key == "gradient_checkpointing":
            t.set("grad_checkpoint", bool(value), f"{where} -> grad_checkpoint")
        elif key == "quantization":
            if value in ("4bit", "8bit", "none", None):
                bits = None if value in ("none", None) else value
                t.set("quantization", bits, f"{where} -> quantization")
            else:
                t.problems.append(f"{where} {value!r} has no counterpart (4bit, 8bit, none)")
        elif key == "lora":
            _lora(value or {}, t)
        elif key not in IGNORED:
            t.problems.append(f"{where} has no counterpart")


def _lora(lora: dict[str, Any], t: Translation) -> None:
    for key, value in lora.items():
        where = f"training.lora.{key}"
        if key in LORA:
            if key == "target_modules" and value == "auto":
                t.ignored.append(f"{where} auto")
            else:
                t.lora(LORA[key], value, f"{where} -> lora.{LORA[key]}")
        elif key == "use_rslora":
            hf.rslora(value, lora, t, where)
        elif value not in (False, None):
            t.problems.append(f"{where} has no counterpart")


def _task(task: str, training: dict[str, Any], t: Translation) -> None:
    """The loss and its β from ``task`` (and ``preference_loss[_weights]``)."""
    if task == "preference":
        weights = training.get("preference_loss_weights")
        if weights:
            t.set("loss", dict(weights), "training.preference_loss_weights -> loss")
            names = list(weights)
        else:
            name = training.get("preference_loss", "dpo")
            t.set("loss", name, f"task preference + preference_loss {name} -> loss")
            names = [name]
    elif task in TASKS:
        t.set("loss", TASKS[task], f"task {task} -> loss")
        names = [task]
    else:
        t.problems.append(
            f"task {task!r} has no counterpart (dpo, ipo, simpo, orpo, kto, bco, preference)"
        )
        return
    betas = {BETAS[n]: training[BETAS[n]] for n in names if BETAS.get(n) in training}
    if len(set(betas.values())) > 1:
        shown = ", ".join(f"{k} {v}" for k, v in betas.items())
        t.problems.append(f"{shown}: mlx-pref has one beta for every loss; give them one value")
    elif betas:
        key, value = next(iter(betas.items()))
        t.set("beta", value, f"training.{key} -> beta")
    if "simpo" in names and "cpo_alpha" not in training:
        t.set("cpo_alpha", 1.0, "Soup's default cpo_alpha 1.0 -> cpo_alpha")
