"""Checking a Config before anything loads: choices, ranges, and the options of its loss.

Each check raises ``ConfigError`` with what to write instead. The choice lists here are
the vocabulary the command line offers too.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mlx_pref.data.columns import MAPPABLE
from mlx_pref.errors import ConfigError, suggest
from mlx_pref.losses import (
    BETA_SCHEDULES,
    EXTRA_INPUTS,
    LossState,
    get_loss,
    parse_loss,
    prepare_loss,
    supplied_inputs,
)
from mlx_pref.memory import parse_limit

QUANTIZATION_BITS = {"4bit": 4, "8bit": 8}
LR_SCHEDULES = ("constant", "linear", "cosine")
TRUNCATION_MODES = ("keep_end", "keep_start")
DATA_FORMATS = ("auto", "paired", "implicit", "conversational", "unpaired")
REFERENCES = ("auto", "cache", "adapters-off", "model", "none")
DTYPES = ("float32", "bfloat16", "float16")
FINE_TUNE_TYPES = ("lora", "dora", "full")
REPORT_TO = ("tensorboard", "wandb")
"""The tools ``report_to`` logs to besides metrics.jsonl (``none``: neither)."""
EXPORT_FORMATS = ("mlx", "peft", "fused", "gguf", "gguf-lora")
"""What ``mlx-pref export --format`` writes (``mlx_pref.export``)."""
GGUF_QUANTS = ("f16", "q8_0", "q4_0", "f32")
"""``mlx-pref export --format gguf --quant``: the GGUF type of the matrices (first: default)."""


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        valid = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(f"{key}: {value!r} is not one of: {valid}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def validate(cfg) -> None:
    """Every check of a Config, in the order a user would fix them."""
    check_model_and_data(cfg)
    check_optimisation(cfg)
    check_refresh_and_lora(cfg)
    check_reference(cfg)
    check_full_fine_tuning(cfg)
    check_evaluation(cfg)
    check_loss_options(cfg)


def check_model_and_data(cfg) -> None:
    """Model, data and loss choices."""
    _choice("fine_tune", cfg.fine_tune, FINE_TUNE_TYPES)
    _choice("quantization", cfg.quantization, (None, *QUANTIZATION_BITS))
    _choice("dtype", cfg.dtype, (None, *DTYPES))
    if cfg.quantization and cfg.dequantize:
        raise ConfigError("quantization and dequantize exclude each other: pick one")
    _choice("format", cfg.format, DATA_FORMATS)
    check_columns(cfg.columns)
    _choice("truncation_mode", cfg.truncation_mode, TRUNCATION_MODES)
    _choice("reference", cfg.reference, REFERENCES)
    _choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    _positive("beta", cfg.beta)
    _choice("beta_schedule", cfg.beta_schedule, BETA_SCHEDULES)
    if cfg.beta_schedule != "constant":
        if cfg.beta_end is None:
            raise ConfigError(f"beta_schedule: {cfg.beta_schedule} needs beta_end (the final beta)")
        _positive("beta_end", cfg.beta_end)
    if cfg.ld_alpha is not None and not 0 <= cfg.ld_alpha <= 1:
        raise ConfigError(f"ld_alpha must be in [0, 1], got {cfg.ld_alpha}")
    _positive("prompt_sample_size", cfg.prompt_sample_size)
    if not 0 <= cfg.min_density_ratio <= cfg.max_density_ratio:
        raise ConfigError("need 0 <= min_density_ratio <= max_density_ratio")
    try:
        weights = parse_loss(cfg.loss)
        for name in cfg.sweep or []:
            parse_loss(name)
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from None
    if cfg.bco_udm and "bco" not in weights:
        raise ConfigError("bco_udm applies to loss: bco only")


def check_columns(columns: dict[str, str] | None) -> None:
    """``columns`` maps our field names to the dataset's column names, one column each."""
    if not columns:
        return
    for key, column in columns.items():
        if key not in MAPPABLE:
            close = suggest(key, list(MAPPABLE))
            hint = f"did you mean '{close}'? " if close else ""
            raise ConfigError(
                f"columns: unknown field '{key}'; {hint}fields: {', '.join(MAPPABLE)} "
                "(write columns: {prompt: question}, field first)"
            )
        if not column.strip():
            raise ConfigError(f"columns.{key} is empty: name the column that holds the {key}")
    seen: dict[str, str] = {}
    for key, column in columns.items():
        if column in seen:
            raise ConfigError(f"columns: '{column}' is given for both {seen[column]} and {key}")
        seen[column] = key


def check_optimisation(cfg) -> None:
    """Optimisation, schedule and logging ranges."""
    if cfg.grad_checkpoint not in (True, False, "auto"):
        raise ConfigError(
            f"grad_checkpoint must be true, false or auto, got {cfg.grad_checkpoint!r}"
        )
    parse_limit(cfg.memory_limit)
    _positive("learning_rate", cfg.learning_rate)
    for key in (
        "epochs",
        "batch_size",
        "grad_accum",
        "max_length",
        "eval_every",
        "log_every",
        "save_every",
        "max_nonfinite",
    ):
        _positive(key, getattr(cfg, key))
    _positive("generate_prompts", cfg.generate_prompts)
    _positive("generate_max_tokens", cfg.generate_max_tokens)
    for key in ("max_steps", "max_prompt_length", "eval_batches", "keep_last"):
        if getattr(cfg, key) is not None:
            _positive(key, getattr(cfg, key))
    if cfg.max_completion_length is not None:
        _positive("max_completion_length", cfg.max_completion_length)
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.warmup_ratio and cfg.warmup_steps:
        raise ConfigError("warmup_steps and warmup_ratio exclude each other: set one")
    if cfg.router_aux_loss_coef < 0:
        raise ConfigError(f"router_aux_loss_coef must be >= 0, got {cfg.router_aux_loss_coef}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.max_grad_norm is not None:
        _positive("max_grad_norm", cfg.max_grad_norm)
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(
            f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing} "
            "(it is the assumed probability that a preference label is flipped)"
        )


def check_refresh_and_lora(cfg) -> None:
    """Reference refresh, data split, truncation and LoRA ranges."""
    if not 0 < cfg.ref_model_mixup_alpha <= 1:
        raise ConfigError(
            f"ref_model_mixup_alpha must be in (0, 1], got {cfg.ref_model_mixup_alpha}"
        )
    _positive("ref_model_sync_steps", cfg.ref_model_sync_steps)
    if cfg.ref_regen_epochs is not None:
        _positive("ref_regen_epochs", cfg.ref_regen_epochs)
    if (cfg.sync_ref_model or cfg.ref_regen_epochs) and cfg.ref_model:
        raise ConfigError(
            "reference refresh (sync_ref_model / ref_regen_epochs) copies the student into "
            "the reference, which is the policy's own base plus adapters: drop ref_model"
        )
    if not 0 <= cfg.eval_split < 1:
        raise ConfigError(f"eval_split must be in [0, 1), got {cfg.eval_split}")
    if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(
            f"max_prompt_length ({cfg.max_prompt_length}) must be smaller than "
            f"max_length ({cfg.max_length}) to leave room for the completion"
        )
    _positive("lora.r", cfg.lora.r)
    _positive("lora.alpha", cfg.lora.alpha)
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules is empty: name at least one, e.g. [q_proj, v_proj]")
    if cfg.lora.layers is not None:
        _positive("lora.layers", cfg.lora.layers)


def check_reference(cfg) -> None:
    """The reference settings against the loss, before anything loads."""
    specs = [get_loss(name) for name in parse_loss(cfg.loss)]
    needs = any(s.needs_reference for s in specs)
    ignored = not needs or cfg.loss_params.get("reference_free")
    if ignored and (cfg.ref_regen_epochs or cfg.sync_ref_model):
        raise ConfigError(
            f"loss {cfg.loss} is reference-free: ref_regen_epochs / sync_ref_model do not apply"
        )
    if cfg.reference == "none" and not ignored:
        raise ConfigError(
            f"loss {cfg.loss} needs a reference; 'reference: none' is for reference-free "
            "losses (simpo, cpo, orpo, or reference_free: true)"
        )
    if cfg.ref_model and cfg.reference == "adapters-off":
        raise ConfigError("reference: adapters-off uses the policy's own base; drop ref_model")
    if cfg.reference == "model" and not cfg.ref_model and needs and not cfg.full:
        raise ConfigError("reference: model needs ref_model (--ref-model DIR_OR_HUB_ID)")
    if cfg.sync_ref_model and cfg.ref_model_mixup_alpha < 1 and cfg.lora.dora:
        raise ConfigError(
            "TR-DPO blends (ref_model_mixup_alpha < 1) are not defined for DoRA adapters; "
            "use ref_model_mixup_alpha: 1.0 or LoRA"
        )
    if cfg.ld_alpha is not None and any(s.family != "dpo" for s in specs):
        others = ", ".join(s.name for s in specs if s.family != "dpo")
        raise ConfigError(f"ld_alpha (LD-DPO) applies to DPO-family losses, not to {others}")


def check_full_fine_tuning(cfg) -> None:
    """``fine_tune: full`` trains float weights and has no adapters to switch off."""
    if not cfg.full:
        return
    if cfg.lora.dora:
        raise ConfigError("fine_tune: full trains every weight; lora.dora does not apply")
    if cfg.quantization:
        raise ConfigError(
            "fine_tune: full trains float weights; drop quantization (a quantized base "
            "takes adapters: fine_tune: lora)"
        )
    if cfg.adapter:
        raise ConfigError(
            "fine_tune: full starts from a model, not an adapter: fuse the adapter into its "
            "base first (mlx-pref export RUN --format fused) and pass that folder as model"
        )
    if cfg.reference == "adapters-off":
        raise ConfigError(
            "fine_tune: full has no adapters to switch off: use reference: cache (the "
            "default: scored from the starting weights before the first step) or "
            "reference: model (a frozen copy)"
        )
    if cfg.bco_udm:
        raise ConfigError("bco_udm reads the frozen base, which fine_tune: full trains: use LoRA")


def check_evaluation(cfg) -> None:
    """Keep-best, early stopping and the reporting tools."""
    for name in cfg.report_to:
        _choice("report_to", name, (*REPORT_TO, "none"))
    if cfg.save_best is not None and cfg.save_best == "eval/":
        raise ConfigError(
            "save_best names an eval metric, e.g. eval/loss or eval/rewards/accuracies"
        )
    if cfg.early_stopping_patience is not None:
        _positive("early_stopping_patience", cfg.early_stopping_patience)
    if cfg.early_stopping_threshold < 0:
        raise ConfigError(
            f"early_stopping_threshold must be >= 0, got {cfg.early_stopping_threshold}"
        )


def check_loss_options(cfg) -> None:
    """Run the loss once on placeholder values, so that an option it rejects (an
    f-divergence it does not take, WPO with AOT, ...) is a config error now rather
    than a traceback at the first step."""
    rows = {"pair": 1, "row": 2, "rejected": 1}
    extras = {}
    for name in supplied_inputs(cfg.loss, vars(cfg)):
        per = EXTRA_INPUTS[name].per
        extras[name] = mx.ones(()) if per == "batch" else mx.zeros((rows[per],))
    one = mx.zeros((1,))
    specs = [get_loss(name) for name in parse_loss(cfg.loss)]
    free = not any(s.needs_reference for s in specs) or cfg.loss_params.get("reference_free")
    ref = None if free and cfg.reference == "none" else one
    try:
        loss = prepare_loss(cfg.loss, label_smoothing=cfg.label_smoothing, **cfg.loss_params)
        out = loss(one, one, ref, ref, mx.ones((1,)), mx.ones((1,)), beta=cfg.beta,
                   state=LossState(), train=False, **extras)  # fmt: skip
        mx.eval(out.loss)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"loss {cfg.loss}: {exc}") from None
