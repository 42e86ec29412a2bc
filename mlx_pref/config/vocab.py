"""Configs written in other trainers' vocabularies, read into ours.

TRL's config files are flat: the fields of one preference config class (``DPOConfig``,
``KTOConfig``, ``CPOConfig``, ``ORPOConfig``, ``BCOConfig``), of ``TrainingArguments``,
of ``ModelConfig`` and ``ScriptArguments`` side by side. The Soup trainer's are nested
(``base``, ``task``, ``data: {train, format}``, ``training: {...}``; ``soup.py``).
``translate`` maps each foreign key to ours, translating values whose meaning differs
(``max_steps: -1`` is unset, ``max_grad_norm: 0`` is no clipping, loss lists with
weights are a weighted ``loss`` normalised to sum to 1, CPO's loss types are not DPO's),
says what it did in one note, and lists every key that has no counterpart as a problem,
all at once. Keys already in mlx-pref's vocabulary pass through unchanged.
"""

from __future__ import annotations

import math
from typing import Any

from mlx_pref.config.hf_values import TRL_VALUE_RULES, Translation

TRL_RENAMED = {
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "output_dir": "output",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_last",
    "gradient_checkpointing": "grad_checkpoint",
    "model_name_or_path": "model",
    "hub_private_repo": "hub_private",
}
TRL_LORA = {
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "use_dora": "dora",
}
TRL_IGNORED = {
    # infrastructure: logging integrations, dataloaders, devices, mixed precision flags
    "report_to", "run_name", "project", "logging_dir", "logging_first_step",
    "logging_strategy", "log_level", "log_level_replica", "disable_tqdm", "data_seed",
    "per_device_eval_batch_size", "precompute_ref_batch_size", "dataset_num_proc",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_drop_last",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "remove_unused_columns",
    "ddp_find_unused_parameters", "ddp_backend", "ddp_timeout", "local_rank", "use_cpu",
    "bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval", "half_precision_backend",
    "torch_compile", "torch_compile_backend", "torch_empty_cache_steps", "use_liger_kernel",
    "use_liger_loss", "use_logits_to_keep", "activation_offloading",
    "gradient_checkpointing_kwargs", "attn_implementation", "trust_remote_code",
    "model_init_kwargs", "ref_model_init_kwargs", "save_safetensors", "save_only_model",
    "overwrite_output_dir", "do_train", "do_eval", "hub_strategy", "hub_token",
    "hub_model_id", "include_num_input_tokens_seen", "average_tokens_across_devices",
    "dataset_streaming", "padding_value", "pad_token", "label_pad_token_id",
    "pad_to_multiple_of", "padding_free", "train_sampling_strategy", "force_use_ref_model",
    "base_model_attribute_name", "model_adapter_name", "tools", "lora_task_type",
    "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage",
    "dataset_train_split", "dataset_test_split", "eval_steps", "num_processes",
}  # fmt: skip
"""Keys that change nothing mlx-pref computes: accepted and listed as ignored."""
TRL_VALUED = set(TRL_VALUE_RULES)
"""Keys whose values are translated (``hf_values``)."""
TRL_NO_COUNTERPART = {
    "ref_adapter_name": "start from an SFT adapter with adapter: DIR instead",
    "neftune_noise_alpha": "mlx-pref adds no embedding noise",
    "auto_find_batch_size": "set batch_size",
    "label_smoothing_factor": "TRL's preference label_smoothing is label_smoothing here",
    "datasets": "name one dataset with data:",
    "resume_from_checkpoint": "resume with mlx-pref train --resume RUN_DIR",
    "lora_modules_to_save": "mlx-pref trains LoRA adapters only",
    "lora_target_parameters": "mlx-pref adapts whole layers (lora.target_modules)",
}
TRL_KEYS = {*TRL_RENAMED, *TRL_LORA, *TRL_IGNORED, *TRL_VALUED, *TRL_NO_COUNTERPART}
CPO_ONLY = {"cpo_alpha", "simpo_gamma", "alpha"}
"""CPOConfig fields that no other TRL preference config has."""
TRAINERS = ("dpo", "kto", "cpo", "orpo", "bco")


def translate(raw: dict[str, Any], ours: set[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """``raw`` in mlx-pref's vocabulary: (keys, notes, problems). Keys neither ours nor a
    known foreign one pass through, for the caller to report as unknown."""
    from mlx_pref.config.soup import is_soup, translate_soup

    if is_soup(raw):
        t = translate_soup(raw, ours)
    elif any(k in TRL_KEYS and k not in ours for k in raw):
        t = translate_trl(raw, ours)
    else:
        return dict(raw), [], []
    note = t.note()
    return t.out, [note] if note else [], t.problems


def translate_trl(raw: dict[str, Any], ours: set[str]) -> Translation:
    """A flat TRL config (trainer config + TrainingArguments + ModelConfig + ScriptArguments)."""
    t = Translation("TRL")
    for key, value in raw.items():
        if (key in ours or key not in TRL_KEYS) and key not in TRL_VALUED:
            t.out[key] = value  # ours, or unknown: reported by the caller
    for key, value in raw.items():
        if key in TRL_RENAMED:
            t.set(TRL_RENAMED[key], value, f"{key} -> {TRL_RENAMED[key]}")
        elif key in TRL_NO_COUNTERPART:
            t.problems.append(f"{key} has no counterpart ({TRL_NO_COUNTERPART[key]})")
    lora_dropout_off = raw.get("disable_dropout", True) is not False
    for key, name in TRL_LORA.items():
        if key in raw and raw.get("use_peft", True) is not False:
            if key == "lora_dropout" and lora_dropout_off:
                t.ignored.append("lora_dropout (TRL's disable_dropout turns it off)")
                continue
            t.lora(name, raw[key], f"{key} -> lora.{name}")
    _trl_values(raw, t)
    trl_loss(raw, t)
    t.ignored[:0] = [k for k in raw if k in TRL_IGNORED and k not in t.consumed]
    return t


def _trl_values(raw: dict[str, Any], t: Translation) -> None:
    """Keys whose values mean something else here, or only some of whose values do."""
    for key, rule in TRL_VALUE_RULES.items():
        if key in raw:
            rule(raw[key], raw, t)


def trainer_kind(raw: dict[str, Any], t: Translation) -> str:
    """Which TRL config class the file was written for: ``trainer:`` when given, else
    what its keys imply (CPO's own fields, KTO's weights, BCO's density ratios)."""
    kind = raw.get("trainer")
    if kind is not None:
        if kind not in TRAINERS:
            t.problems.append(f"trainer: {kind!r} is not one of {', '.join(TRAINERS)}")
            return "dpo"
        return kind
    if CPO_ONLY & set(raw):
        return "cpo"
    if {"desirable_weight", "undesirable_weight"} & set(raw):
        return "kto"
    if {"prompt_sample_size", "min_density_ratio", "max_density_ratio"} & set(raw):
        return "bco" if "loss_type" not in raw else "dpo"
    return "dpo"


CPO_LOSSES = {"sigmoid": "cpo", "simpo": "simpo", "alphapo": "simpo"}


def trl_loss(raw: dict[str, Any], t: Translation) -> None:
    """``loss_type`` (a name or a list, with ``loss_weights``) read for the trainer class."""
    kind = trainer_kind(raw, t)
    given = raw.get("loss_type")
    names = [given] if isinstance(given, str) else list(given or [])
    if kind in ("orpo", "bco") or (kind == "kto" and not names):
        if names:
            t.problems.append(f"loss_type has no meaning for TRL's {kind.upper()}Config")
        t.set("loss", {"orpo": "orpo", "bco": "bco", "kto": "kto"}[kind], f"trainer {kind} -> loss")
        return
    if kind == "cpo":
        names = names or ["sigmoid"]
        bad = [n for n in names if n not in CPO_LOSSES]
        if bad:
            t.problems.append(
                f"loss_type {', '.join(bad)} of CPOConfig has no counterpart (CPO's hinge and "
                "ipo are reference-free variants; mlx-pref's hinge and ipo use a reference)"
            )
            return
        if any(CPO_LOSSES[n] == "simpo" for n in names) and "cpo_alpha" not in raw:
            t.set("cpo_alpha", 1.0, "CPOConfig's default cpo_alpha 1.0 -> cpo_alpha")
        names = [CPO_LOSSES[n] for n in names]
    if not names:
        return
    weights = raw.get("loss_weights")
    if len(names) == 1:
        if weights not in (None, [1], [1.0]):
            t.ignored.append("loss_weights (one loss: its weight only scales the loss)")
        t.set("loss", names[0], f"loss_type -> loss: {names[0]}")
        return
    weights = list(weights or [1.0] * len(names))
    if len(weights) != len(names) or len(set(names)) != len(names):
        t.problems.append("loss_type and loss_weights must be lists of the same length, no repeats")
        return
    total = math.fsum(float(w) for w in weights)
    loss = {n: float(w) / total for n, w in zip(names, weights, strict=True)}
    shown = ", ".join(f"{n}: {w:.3g}" for n, w in loss.items())
    t.set(
        "loss",
        loss,
        f"loss_type + loss_weights -> loss: {{{shown}}} (weights normalised to sum to 1: "
        f"the loss is TRL's divided by {total:g})",
    )
