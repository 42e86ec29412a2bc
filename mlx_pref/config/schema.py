"""The typed run configuration: one object holding every setting of a run.

``Config`` is built once (``load.py``: YAML file, flags, foreign vocabularies), checked
before anything loads (``checks.py``), written next to the run's outputs and reloaded to
the same object, so a run can always be repeated or resumed from its directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_pref.config.checks import QUANTIZATION_BITS, validate

RUN_CONFIG = "config.yaml"
"""The resolved config a run writes into its directory."""


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
    fine_tune: str = "lora"
    """What is trained: ``lora`` or ``dora`` adapters (``dora`` is ``lora.dora: true``), or
    ``full``: every weight, no adapters (mlx-lm's ``--fine-tune-type full``)."""
    adapter: str | None = None
    """Start from this (SFT) adapter directory; the reference is base + it, frozen."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: str | None = None
    """Quantize a float base to 4bit or 8bit for QLoRA (on the CPU only with dequantize: false)."""
    dequantize: bool | None = None
    """Train on float weights from an already-quantized base (a GGUF, an MLX 4-bit model).
    None: decided by the backend (``models.resolve_quantization``): float on the CPU, where
    quantized matmuls are slow, when the float copy fits in memory; quantized elsewhere."""
    dtype: str | None = None
    # data
    data: str | None = None
    eval_data: str | None = None
    eval_split: float = 0.0
    format: str = "auto"
    columns: dict[str, str] | None = None
    """Fields read from other columns: ``{prompt: question, completion: output}``."""
    system_prompt: str | None = None
    """System message for rows without one (rendered with the chat template)."""
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
    router_aux_loss_coef: float = 0.001
    """Mixture-of-Experts models: weight of the router's load-balancing loss added to the
    preference loss (TRL's ``router_aux_loss_coef``); 0 turns it off."""
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
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the run's optimizer steps (rounded up), instead of warmup_steps."""
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    share_prompt: bool = True
    """Run each prompt once and score chosen and rejected against its cache."""
    grad_checkpoint: bool | str = "auto"
    """Recompute blocks in the backward pass: ``auto`` when the memory plan needs it (and
    only as many as it needs), ``true`` every block, ``false`` never."""
    memory_limit: str | float | None = None
    """What a step may use: a size (``12GB``, ``800MB``, a number of GB), a share of the
    device (``60%``), or unset: the weights and optimizer state plus 2 GB of activations,
    at most 70% of the device (``mlx_pref.memory``)."""
    compile: bool = False
    """Fuse the LM head's log-softmax arithmetic with mx.compile (pays on GPUs)."""
    # evaluation, logging, checkpoints
    output: str = "runs/mlx-pref"
    eval_every: int = 50
    eval_batches: int | None = None
    eval_on_start: bool = True
    """Evaluate before the first step too (the step-0 baseline, TRL's ``eval_on_start``)."""
    save_best: str | None = None
    """Keep a copy of the weights at the best value of this eval metric in RUN_DIR/best/."""
    greater_is_better: bool | None = None
    """Direction of ``save_best`` (and early stopping); by default lower is better for a
    metric named like a loss, higher for any other."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations in a row without improving the watched metric
    (``save_best``'s, else ``eval/loss``) by more than ``early_stopping_threshold``."""
    early_stopping_threshold: float = 0.0
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
    report_to: list[str] | None = field(default_factory=list)
    """Also log every metric to these tools: ``tensorboard``, ``wandb`` (``none``: neither)."""
    # sharing
    push_to_hub: str | None = None
    """At the end of training, export the adapter (mlx-lm format + model card) and upload it."""
    hub_private: bool = False
    notes: list[str] = field(default_factory=list, compare=False, repr=False)
    """What reading the config did that the user should hear (foreign names mapped); not
    a setting: never saved, never compared."""

    def __post_init__(self) -> None:
        # fine_tune: dora and lora.dora: true say the same thing; keep both spellings in step.
        if self.fine_tune == "dora" and not self.lora.dora:
            self.lora = dataclasses.replace(self.lora, dora=True)
        elif self.fine_tune == "lora" and self.lora.dora:
            self.fine_tune = "dora"
        if isinstance(self.report_to, str) or self.report_to is None:
            self.report_to = [self.report_to] if self.report_to else []
        self.report_to = [name for name in self.report_to if name != "none"]
        if self.save_best is not None and not self.save_best.startswith("eval/"):
            self.save_best = f"eval/{self.save_best}"  # `save_best: loss` means eval/loss

    @property
    def full(self) -> bool:
        """Full fine-tuning: every weight trained, no adapters."""
        return self.fine_tune == "full"

    def validate(self) -> Config:
        """Choice, range and loss-option checks (``checks.validate``); returns itself."""
        validate(self)
        return self

    @property
    def quantization_bits(self) -> int | None:
        return QUANTIZATION_BITS.get(self.quantization) if self.quantization else None

    def to_dict(self) -> dict[str, Any]:
        """Plain values; loss parameters sit at the top level, as users write them."""
        out = dataclasses.asdict(self)
        out.pop("notes")
        out.update(out.pop("loss_params"))
        return out

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML, atomically (reloads with ``load_config``)."""
        from mlx_pref.checkpoint import write_atomic

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        write_atomic(Path(path), lambda tmp: tmp.write_text(text))
