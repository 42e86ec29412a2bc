"""The typed run configuration: one object, built once from a YAML file and flags.

``load_config(path, overrides)`` reads YAML, applies flag overrides (flags win), rejects
unknown keys with the nearest valid one, checks types and ranges, and returns a
``Config``. The resolved config is written next to the run's outputs and reloads to
the same object, so a run can always be repeated or resumed from its directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import yaml

from mlx_pref.errors import ConfigError, suggest
from mlx_pref.losses import (
    BETA_SCHEDULES,
    EXTRA_INPUTS,
    REGISTRY,
    LossState,
    get_loss,
    parse_loss,
    prepare_loss,
    supplied_inputs,
)

RUN_CONFIG = "config.yaml"
"""The resolved config a run writes into its directory."""
QUANTIZATION_BITS = {"4bit": 4, "8bit": 8}
LR_SCHEDULES = ("constant", "linear", "cosine")
TRUNCATION_MODES = ("keep_end", "keep_start")
DATA_FORMATS = ("auto", "paired", "implicit", "conversational", "unpaired")
REFERENCES = ("auto", "cache", "adapters-off", "model", "none")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoraConfig:
    """LoRA settings in the vocabulary of PEFT: ``scale = alpha / r``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    layers: int | None = None
    """Adapt only the last N transformer blocks (None: all)."""
    dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.r


# Spellings other trainers use for the same LoRA keys.
LORA_ALIASES = {
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "keys": "target_modules",
    "num_layers": "layers",
    "use_dora": "dora",
}


@dataclass
class Config:
    """Everything a run needs. ``None`` for ``model``/``data`` means the embedded default."""

    # model and adapters
    model: str | None = None
    adapter: str | None = None
    """Start from this (SFT) adapter directory; the reference is base + it, frozen."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: str | None = None
    """Quantize a float base to 4bit or 8bit for QLoRA."""
    dequantize: bool = False
    """Train on float weights from an already-quantized base (a GGUF, an MLX 4-bit model)."""
    dtype: str | None = None
    # data
    data: str | None = None
    eval_data: str | None = None
    eval_split: float = 0.0
    format: str = "auto"
    max_length: int = 512
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_end"
    strict: bool = False
    # loss
    loss: str | dict[str, float] = "sigmoid"
    sweep: list[str] | None = None
    """Train once per listed loss (into output/<loss>/), sharing one cached reference."""
    beta: float = 0.1
    beta_schedule: str = "constant"
    beta_end: float | None = None
    """Final beta of a non-constant schedule (reached at the last optimizer step)."""
    label_smoothing: float = 0.0
    use_weighting: bool = False
    """WPO: weight each pair by the policy's own probability of its completions."""
    ld_alpha: float | None = None
    """LD-DPO: weight of completion tokens past the shorter completion's length."""
    bco_udm: bool = False
    """BCO underlying distribution matching: reweight undesirable rows by a prompt classifier."""
    prompt_sample_size: int = 1024
    min_density_ratio: float = 0.5
    max_density_ratio: float = 10.0
    loss_params: dict[str, Any] = field(default_factory=dict)
    """Parameters of individual losses (simpo_gamma, discopop_tau, rpo_alpha, ...), written
    at the top level of a config file; only those set are passed, others keep each loss's
    own default."""
    # reference
    reference: str = "auto"
    ref_model: str | None = None
    ref_cache_dir: str | None = None
    """Where cached reference log-probs live (default: the user cache directory)."""
    ref_regen_epochs: int | None = None
    """Copy the student into the reference every N epochs (never at epoch 0)."""
    sync_ref_model: bool = False
    """TR-DPO: every ref_model_sync_steps, reference <- alpha * policy + (1 - alpha) * reference."""
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    # optimisation
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    share_prompt: bool = True
    """Run each prompt once and score chosen and rejected against its cache."""
    grad_checkpoint: bool = False
    """Recompute block activations in the backward pass (less memory, ~1/3 more compute)."""
    compile: bool = False
    """Fuse the LM head's log-softmax arithmetic with mx.compile (pays on GPUs)."""
    # evaluation, logging, checkpoints
    output: str = "runs/mlx-pref"
    eval_every: int = 50
    eval_batches: int | None = None
    generate_during_eval: bool = False
    """At each evaluation, sample greedy completions for a few fixed eval prompts from the
    policy and the reference, into samples.jsonl (TRL's generate_during_eval)."""
    generate_prompts: int = 3
    generate_max_tokens: int = 64
    log_every: int = 10
    save_every: int = 100
    keep_last: int | None = 3
    max_nonfinite: int = 5
    """Stop (with a checkpoint) after this many non-finite steps in a row."""
    # sharing
    push_to_hub: str | None = None
    """At the end of training, export the adapter (mlx-lm format + model card) and upload it."""
    hub_private: bool = False

    def validate(self) -> Config:
        """Range and choice checks; raises ConfigError with what to write instead."""
        _choice("quantization", self.quantization, (None, *QUANTIZATION_BITS))
        _choice("dtype", self.dtype, (None, *DTYPES))
        if self.quantization and self.dequantize:
            raise ConfigError("quantization and dequantize exclude each other: pick one")
        _choice("format", self.format, DATA_FORMATS)
        _choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        _choice("reference", self.reference, REFERENCES)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _positive("beta", self.beta)
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.beta_schedule != "constant":
            if self.beta_end is None:
                raise ConfigError(
                    f"beta_schedule: {self.beta_schedule} needs beta_end (the final beta)"
                )
            _positive("beta_end", self.beta_end)
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ConfigError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        _positive("prompt_sample_size", self.prompt_sample_size)
        if not 0 <= self.min_density_ratio <= self.max_density_ratio:
            raise ConfigError("need 0 <= min_density_ratio <= max_density_ratio")
        try:
            weights = parse_loss(self.loss)
            for name in self.sweep or []:
                parse_loss(name)
        except ValueError as exc:
            raise ConfigError(f"loss: {exc}") from None
        if self.bco_udm and "bco" not in weights:
            raise ConfigError("bco_udm applies to loss: bco only")
        _positive("learning_rate", self.learning_rate)
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
            _positive(key, getattr(self, key))
        _positive("generate_prompts", self.generate_prompts)
        _positive("generate_max_tokens", self.generate_max_tokens)
        for key in ("max_steps", "max_prompt_length", "eval_batches", "keep_last"):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))
        if self.max_completion_length is not None:
            _positive("max_completion_length", self.max_completion_length)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"label_smoothing must be in [0, 0.5), got {self.label_smoothing} "
                "(it is the assumed probability that a preference label is flipped)"
            )
        if not 0 < self.ref_model_mixup_alpha <= 1:
            raise ConfigError(
                f"ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}"
            )
        _positive("ref_model_sync_steps", self.ref_model_sync_steps)
        if self.ref_regen_epochs is not None:
            _positive("ref_regen_epochs", self.ref_regen_epochs)
        if (self.sync_ref_model or self.ref_regen_epochs) and self.ref_model:
            raise ConfigError(
                "reference refresh (sync_ref_model / ref_regen_epochs) copies the student into "
                "the reference, which is the policy's own base plus adapters: drop ref_model"
            )
        if not 0 <= self.eval_split < 1:
            raise ConfigError(f"eval_split must be in [0, 1), got {self.eval_split}")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"max_length ({self.max_length}) to leave room for the completion"
            )
        _positive("lora.r", self.lora.r)
        _positive("lora.alpha", self.lora.alpha)
        if not 0 <= self.lora.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        if not self.lora.target_modules:
            raise ConfigError(
                "lora.target_modules is empty: name at least one, e.g. [q_proj, v_proj]"
            )
        if self.lora.layers is not None:
            _positive("lora.layers", self.lora.layers)
        self._check_reference()
        self._check_loss_options()
        return self

    def _check_reference(self) -> None:
        """The reference settings against the loss, before anything loads."""
        specs = [get_loss(name) for name in parse_loss(self.loss)]
        needs = any(s.needs_reference for s in specs)
        ignored = not needs or self.loss_params.get("reference_free")
        if ignored and (self.ref_regen_epochs or self.sync_ref_model):
            raise ConfigError(
                f"loss {self.loss} is reference-free: ref_regen_epochs / sync_ref_model do not apply"
            )
        if self.reference == "none" and not ignored:
            raise ConfigError(
                f"loss {self.loss} needs a reference; 'reference: none' is for reference-free "
                "losses (simpo, cpo, orpo, or reference_free: true)"
            )
        if self.ref_model and self.reference == "adapters-off":
            raise ConfigError("reference: adapters-off uses the policy's own base; drop ref_model")
        if self.reference == "model" and not self.ref_model and needs:
            raise ConfigError("reference: model needs ref_model (--ref-model DIR_OR_HUB_ID)")
        if self.sync_ref_model and self.ref_model_mixup_alpha < 1 and self.lora.dora:
            raise ConfigError(
                "TR-DPO blends (ref_model_mixup_alpha < 1) are not defined for DoRA adapters; "
                "use ref_model_mixup_alpha: 1.0 or LoRA"
            )
        if self.ld_alpha is not None and any(s.family != "dpo" for s in specs):
            others = ", ".join(s.name for s in specs if s.family != "dpo")
            raise ConfigError(f"ld_alpha (LD-DPO) applies to DPO-family losses, not to {others}")

    def _check_loss_options(self) -> None:
        """Run the loss once on placeholder values, so that an option it rejects (an
        f-divergence it does not take, WPO with AOT, ...) is a config error now rather
        than a traceback at the first step."""
        rows = {"pair": 1, "row": 2, "rejected": 1}
        extras = {}
        for name in supplied_inputs(self.loss, vars(self)):
            per = EXTRA_INPUTS[name].per
            extras[name] = mx.ones(()) if per == "batch" else mx.zeros((rows[per],))
        one = mx.zeros((1,))
        specs = [get_loss(name) for name in parse_loss(self.loss)]
        free = not any(s.needs_reference for s in specs) or self.loss_params.get("reference_free")
        ref = None if free and self.reference == "none" else one
        try:
            loss = prepare_loss(self.loss, label_smoothing=self.label_smoothing, **self.loss_params)
            out = loss(one, one, ref, ref, mx.ones((1,)), mx.ones((1,)), beta=self.beta,
                       state=LossState(), train=False, **extras)  # fmt: skip
            mx.eval(out.loss)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"loss {self.loss}: {exc}") from None

    @property
    def quantization_bits(self) -> int | None:
        return QUANTIZATION_BITS.get(self.quantization) if self.quantization else None

    def to_dict(self) -> dict[str, Any]:
        """Plain values; loss parameters sit at the top level, as users write them."""
        out = dataclasses.asdict(self)
        out.update(out.pop("loss_params"))
        return out

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML, atomically (reloads with ``load_config``)."""
        from mlx_pref.checkpoint import write_atomic

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        write_atomic(Path(path), lambda tmp: tmp.write_text(text))


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        valid = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(f"{key}: {value!r} is not one of: {valid}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint, converting where YAML/flags are loose (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [_coerce(key, v, args[0]) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                pass
    elif hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = suggest(key, valid)
    if close:
        hint = f"; did you mean '{close}'?"
    elif len(valid) <= 12:
        hint = f"; valid keys: {', '.join(sorted(valid))}"
    else:
        hint = " (the README's configuration reference lists every key)"
    return ConfigError(f"unknown {where}key '{key}'{hint}")


def _build_lora(raw: Any) -> LoraConfig:
    if raw is None:
        return LoraConfig()
    if isinstance(raw, LoraConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"lora must be a mapping like {{r: 8, alpha: 16}}, got {raw!r}")
    hints = _field_types(LoraConfig)
    kwargs = {}
    for key, value in raw.items():
        name = LORA_ALIASES.get(key, key)
        if name not in hints:
            raise _unknown_key(key, list(hints), "lora ")
        kwargs[name] = _coerce(f"lora.{name}", value, hints[name])
    return LoraConfig(**kwargs)


def loss_parameter_defaults() -> dict[str, Any]:
    """Every registered loss's own parameters (a name shared by losses keeps its first default)."""
    out: dict[str, Any] = {}
    for spec in REGISTRY.values():
        for key, default in spec.params.items():
            out.setdefault(key, default)
    return out


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from plain values (a parsed YAML file plus overrides)."""
    hints = _field_types(Config)
    loss_params = loss_parameter_defaults()
    kwargs: dict[str, Any] = {"loss_params": {}}
    for key, value in raw.items():
        if key == "lora":
            kwargs["lora"] = _build_lora(value)
        elif key == "loss_params":
            for k, v in (value or {}).items():
                kwargs["loss_params"][k] = v
        elif key in loss_params:
            kwargs["loss_params"][key] = value
        elif key not in hints:
            raise _unknown_key(key, [*hints, *loss_params], "")
        else:
            kwargs[key] = _coerce(key, value, hints[key])
    loss = kwargs.get("loss")
    if isinstance(loss, str) and "," in loss:  # `--loss dpo,ipo,simpo` is a sweep
        kwargs["sweep"] = [name.strip() for name in loss.split(",") if name.strip()]
        kwargs["loss"] = kwargs["sweep"][0]
    for key, value in kwargs["loss_params"].items():
        if key not in loss_params:
            raise _unknown_key(key, list(loss_params), "loss parameter ")
        default = loss_params[key]
        if value is not None and default is not None and not isinstance(default, str):
            kwargs["loss_params"][key] = _coerce(key, value, type(default))
    return Config(**kwargs).validate()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; syntax errors name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return raw


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides win; a dotted key ``lora.r`` sets one nested value."""
    out = dict(base)
    for key, value in overrides.items():
        if "." in key:
            head, tail = key.split(".", 1)
            nested = out.get(head) or {}
            if isinstance(nested, LoraConfig):
                nested = dataclasses.asdict(nested)
            out[head] = merge(dict(nested), {tail: value})
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The one way to get a Config: YAML file (optional), then overrides (flags)."""
    raw = read_yaml(path) if path else {}
    where = f"{path}: " if path else ""
    try:
        config = config_from_dict(merge(raw, overrides or {}))
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    if path:
        _check_relative_paths(config, raw, overrides or {}, Path(path))
    return config


PATH_KEYS = ("model", "data", "eval_data", "adapter", "ref_model")


def _check_relative_paths(config: Config, raw: dict, overrides: dict, path: Path) -> None:
    """Relative paths in a config file resolve from the working directory, as flags do;
    one that only exists beside the config file gets an error saying so."""
    for key in PATH_KEYS:
        value = getattr(config, key)
        if key in overrides or key not in raw or not isinstance(value, str):
            continue
        local = Path(value).expanduser()
        beside = path.parent / local
        if not local.is_absolute() and not local.exists() and beside.exists():
            raise ConfigError(
                f"{path}: {key}: {value} does not exist in the working directory ({Path.cwd()}), "
                f"which relative paths are read from; it is beside the config: write {beside} "
                "or run from there"
            )
