"""Values of Hugging Face ``TrainingArguments`` / TRL keys whose meaning differs here.

One rule per key, ``rule(value, raw, translation)``: it sets our keys, marks the key
ignored, or records a problem. ``-1`` and ``0`` mean "off" in several of them; schedulers
and optimizers have counterparts for some names only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SCHEDULES = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constant_with_warmup": "constant",
}
"""Hugging Face scheduler names with a counterpart in ``lr_schedule``."""
ADAMW = {"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_torch_xla", "adamw_apex_fused"}
ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


@dataclass
class Translation:
    """The translated keys, what was mapped or ignored, and what has no counterpart."""

    source: str
    out: dict[str, Any] = field(default_factory=dict)
    mapped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    """Foreign keys read by another key's rule (``eval_steps`` with ``eval_strategy``)."""

    def set(self, key: str, value: Any, how: str) -> None:
        """Set one of our keys; ``how`` says where it came from (``a -> b``)."""
        if key in self.out and self.out[key] != value:
            self.problems.append(f"{how} conflicts with {key}: {self.out[key]!r} set as well")
            return
        self.out[key] = value
        self.mapped.append(how)

    def lora(self, key: str, value: Any, how: str) -> None:
        lora = dict(self.out.get("lora") or {})
        lora[key] = value
        self.out["lora"] = lora
        self.mapped.append(how)

    def note(self) -> str | None:
        if not (self.mapped or self.ignored):
            return None
        text = f"read {self.source} names: " + (", ".join(self.mapped) or "none mapped")
        if self.ignored:
            text += f"; ignored (no effect here): {', '.join(self.ignored)}"
        return text


Rule = Callable[[Any, dict, Translation], None]
DTYPES = ("float32", "bfloat16", "float16")


def _consumed(value: Any, raw: dict, t: Translation) -> None:
    """Read together with another key (``loss_type`` with ``trainer``, ...)."""


def epochs(value: Any, raw: dict, t: Translation, key: str = "num_train_epochs") -> None:
    if isinstance(value, (int, float)) and float(value).is_integer() and value >= 1:
        t.set("epochs", int(value), f"{key} -> epochs")
    else:
        t.problems.append(f"{key} {value}: mlx-pref trains whole epochs; set max_steps instead")


def max_steps(value: Any, raw: dict, t: Translation) -> None:
    if value is None or value == -1:
        t.ignored.append("max_steps -1 (unset)")
    else:
        t.set("max_steps", value, "max_steps")


def max_grad_norm(value: Any, raw: dict, t: Translation, key: str = "max_grad_norm") -> None:
    if value in (0, None):
        t.set("max_grad_norm", None, f"{key} 0 -> max_grad_norm: null (no clipping)")
    else:
        t.set("max_grad_norm", value, key)


def warmup_steps(value: Any, raw: dict, t: Translation, key: str = "warmup_steps") -> None:
    if isinstance(value, float) and 0 < value < 1:  # transformers 5: a ratio
        t.set("warmup_ratio", value, f"{key} {value} -> warmup_ratio")
    else:
        t.set("warmup_steps", value, key)


def schedule(value: Any, raw: dict, t: Translation, key: str = "lr_scheduler_type") -> None:
    if value not in SCHEDULES:
        t.problems.append(
            f"{key} {value!r} has no counterpart (mlx-pref has {', '.join(SCHEDULES)})"
        )
        return
    t.set("lr_schedule", SCHEDULES[value], f"{key} {value} -> lr_schedule: {SCHEDULES[value]}")
    if value == "constant" and (t.out.get("warmup_steps") or t.out.get("warmup_ratio")):
        t.out.pop("warmup_steps", None)
        t.out.pop("warmup_ratio", None)
        t.ignored.append("warmup (a Hugging Face 'constant' schedule has none)")


def scheduler_kwargs(value: Any, raw: dict, t: Translation) -> None:
    if not value or value == {"num_cycles": 0.5}:
        t.ignored.append("lr_scheduler_kwargs")
    else:
        t.problems.append(f"lr_scheduler_kwargs {value} has no counterpart")


def optimizer(value: Any, raw: dict, t: Translation, key: str = "optim") -> None:
    if value in ADAMW:
        t.ignored.append(f"{key} {value} (AdamW is what mlx-pref uses)")
    else:
        t.problems.append(f"{key} {value!r} has no counterpart (mlx-pref trains with AdamW)")


def adam(key: str) -> Rule:
    def rule(value: Any, raw: dict, t: Translation) -> None:
        if math.isclose(float(value), ADAM_DEFAULTS[key]):
            t.ignored.append(key)
        else:
            t.problems.append(f"{key} {value} has no counterpart (AdamW runs with its defaults)")

    return rule


def precompute(value: Any, raw: dict, t: Translation) -> None:
    if value:
        t.set("reference", "cache", "precompute_ref_log_probs -> reference: cache")
    else:
        t.ignored.append("precompute_ref_log_probs false")


def eval_strategy(value: Any, raw: dict, t: Translation) -> None:
    if value in ("no", None):
        t.ignored.append(f"eval_strategy {value}")
    elif value == "steps":
        t.consumed |= {"eval_steps", "dataset_test_split"}
        every = raw.get("eval_steps") or raw.get("logging_steps")
        if every:
            t.set("eval_every", every, "eval_steps -> eval_every")
        if raw.get("dataset_name") and raw.get("dataset_test_split", "test"):
            name = f"hf://{raw['dataset_name']}:{raw.get('dataset_test_split', 'test')}"
            t.set("eval_data", name, "dataset_test_split -> eval_data")
    else:
        t.problems.append(f"eval_strategy {value!r} has no counterpart; set eval_every (steps)")


def save_strategy(value: Any, raw: dict, t: Translation) -> None:
    if value in ("steps", "no", None):
        t.ignored.append(f"save_strategy {value} (a checkpoint is always written at the end)")
    else:
        t.problems.append(f"save_strategy {value!r} has no counterpart; set save_every (steps)")


def use_peft(value: Any, raw: dict, t: Translation) -> None:
    """TRL without PEFT trains every weight: mlx-pref's full fine-tuning; with PEFT, LoRA
    (DoRA when ``use_dora``)."""
    if value is False:
        t.set("fine_tune", "full", "use_peft false -> fine_tune: full")


def rslora(value: Any, raw: dict, t: Translation, key: str = "use_rslora") -> None:
    """rsLoRA scales by alpha/sqrt(r): the same as PEFT's alpha/r with alpha * sqrt(r)."""
    if not value:
        return
    lora = t.out.get("lora") or {}
    r, alpha = float(lora.get("r", 8)), float(lora.get("alpha", 16.0))
    t.lora(
        "alpha",
        alpha * math.sqrt(r),
        f"{key} -> lora.alpha = alpha * sqrt(r) ({alpha * math.sqrt(r):g})",
    )


def quantize(bits: str) -> Rule:
    def rule(value: Any, raw: dict, t: Translation) -> None:
        if value:
            t.set("quantization", bits, f"load_in_{bits} -> quantization: {bits}")

    return rule


def dtype(value: Any, raw: dict, t: Translation) -> None:
    if value in (None, "auto"):
        t.ignored.append("dtype auto")
    elif value in DTYPES:
        t.set("dtype", value, "torch_dtype -> dtype" if "torch_dtype" in raw else "dtype")
    else:
        t.problems.append(f"dtype {value!r} is not one of {', '.join(DTYPES)}")


def revision(value: Any, raw: dict, t: Translation) -> None:
    if value in (None, "main"):
        t.ignored.append("model_revision main")
    else:
        t.problems.append(f"model_revision {value!r} has no counterpart (use a local copy)")


def dataset(value: Any, raw: dict, t: Translation) -> None:
    t.consumed.add("dataset_train_split")
    spec = f"hf://{value}"
    if raw.get("dataset_config"):
        spec += f"/{raw['dataset_config']}"
    if raw.get("dataset_train_split", "train") != "train":
        spec += f":{raw['dataset_train_split']}"
    t.set("data", spec, "dataset_name -> data")


def dataset_config(value: Any, raw: dict, t: Translation) -> None:
    if "dataset_name" not in raw:
        t.problems.append("dataset_config without dataset_name")


def push(value: Any, raw: dict, t: Translation) -> None:
    if isinstance(value, str):  # mlx-pref's own push_to_hub: a repo id
        t.out["push_to_hub"] = value
    elif value and raw.get("hub_model_id"):
        t.consumed.add("hub_model_id")
        t.set("push_to_hub", raw["hub_model_id"], "push_to_hub + hub_model_id -> push_to_hub")
    elif value:
        t.problems.append("push_to_hub true needs hub_model_id (the repo to push to)")


def encoder_decoder(value: Any, raw: dict, t: Translation) -> None:
    if value:
        t.problems.append("is_encoder_decoder true has no counterpart: mlx-pref trains causal LMs")


def max_length(value: Any, raw: dict, t: Translation) -> None:
    if value is None:
        t.problems.append("max_length null has no counterpart: set a token limit")
    else:
        t.set("max_length", value, "max_length")


def router_aux(value: Any, raw: dict, t: Translation) -> None:
    """TRL 1.x leaves it null to take the model config's own coefficient."""
    if value is None:
        t.ignored.append("router_aux_loss_coef null (mlx-pref's default 0.001 applies)")
    else:
        t.set("router_aux_loss_coef", value, "router_aux_loss_coef")


TRL_VALUE_RULES: dict[str, Rule] = {
    "trainer": _consumed,
    "loss_type": _consumed,
    "loss_weights": _consumed,
    "disable_dropout": _consumed,
    "num_train_epochs": epochs,
    "max_steps": max_steps,
    "max_grad_norm": max_grad_norm,
    "warmup_steps": warmup_steps,
    "lr_scheduler_type": schedule,  # after warmup_steps: HF's 'constant' drops warmup
    "lr_scheduler_kwargs": scheduler_kwargs,
    "precompute_ref_log_probs": precompute,
    "eval_strategy": eval_strategy,
    "evaluation_strategy": eval_strategy,
    "save_strategy": save_strategy,
    "optim": optimizer,
    **{key: adam(key) for key in ADAM_DEFAULTS},
    "use_peft": use_peft,
    "use_rslora": rslora,
    "load_in_4bit": quantize("4bit"),
    "load_in_8bit": quantize("8bit"),
    "torch_dtype": dtype,
    "dtype": dtype,
    "model_revision": revision,
    "dataset_name": dataset,
    "dataset_config": dataset_config,
    "push_to_hub": push,
    "is_encoder_decoder": encoder_decoder,
    "max_length": max_length,
    "router_aux_loss_coef": router_aux,
}
