"""Memory, planned before the first step: what a training step will hold, and the cheapest
way to keep it inside the budget.

A step holds the weights, the trainable parameters' gradients and AdamW state, and for the
backward pass every block's saved activations (per token: its inputs, norms, projections,
attention outputs, MLP gates), the attention masks and one attention block's probabilities
at a time (``attention.flash_attention``), and the LM head's logits for the scored tokens
(per token, one float per vocabulary entry). The estimate counts those from the model's
shape and the step's size (``Step``); its constants were fitted to MLX's measured peaks
(``bench/run.py --only memory`` prints estimate against measurement).

``plan`` then picks, cheapest first: nothing; splitting each micro-batch into sub-batches
(exact for losses that are a mean of per-example terms; free on a CPU, where throughput does
not depend on batch size); keeping no LM-head logits; checkpointing every k-th block (about
a third more compute at every block). When even the leanest setting does not
fit, the run stops before any data is read, with what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_pref import backend
from mlx_pref.attention import QUERY_BLOCK
from mlx_pref.data.batching import PairExample
from mlx_pref.errors import ConfigError
from mlx_pref.logps import HEAD_CHUNK_ROWS, Recompute
from mlx_pref.models import enable_grad_checkpoint

ACTIVATION_SCALE = 1.0
"""Measured saved bytes per block and token over the count of the arrays a LLaMA block keeps
(4D + 2(Hq + Hkv)d + 3F): MLX keeps a few more (LoRA branches, casts)."""
ACTIVATION_EXTRA = 600
"""Elements per block and token that do not scale with the widths (positions, norms, masks)."""
BLOCK_TRANSIENT = 1.4
"""A checkpointed block's recompute and its gradients hold about 1.4 blocks' activations
(a quarter of that beside kept blocks, whose activations are freed as the backward goes)."""
ATTENTION_TRANSIENT = 4
"""One attention block's backward holds its scores, probabilities and their gradients
(``attention.flash_attention``): a few floats per head, block query and key."""
HEAD_TRANSIENT = 2.0
"""The LM head's backward holds the softmax and the logits' gradient of one chunk."""
DEFAULT_ACTIVATIONS = 2 << 30
"""Without ``memory_limit``: the weights and optimizer state plus 2 GiB for activations (the
lean default TRL also takes, with gradient checkpointing on), at most 70% of the device,
where sub-batches alone get there (they cost no time)..."""
RECOMPUTE_ACTIVATIONS = 3 << 30
"""...and recomputation, which does cost time, only as much as keeps activations under
3 GiB."""
DEVICE_FRACTION = 0.7
FLOATS = (mx.float32, mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class Shape:
    """The widths of a decoder that decide its activations (LLaMA-style blocks)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    act_bytes: int = 4
    kernel: str = "blocks"
    """``backend.attention_kernel``: ``fused`` keeps no probabilities, only a T x T mask."""

    @classmethod
    def of(cls, model: nn.Module, act_bytes: int = 4) -> Shape:
        args = getattr(model, "args", None)
        hidden = int(getattr(args, "hidden_size", 0) or 0)
        heads = int(getattr(args, "num_attention_heads", 1) or 1)
        return cls(
            layers=len(getattr(model, "layers", [])),
            hidden=hidden,
            intermediate=int(getattr(args, "intermediate_size", 4 * hidden) or 4 * hidden),
            heads=heads,
            kv_heads=int(getattr(args, "num_key_value_heads", heads) or heads),
            head_dim=int(getattr(args, "head_dim", None) or hidden // heads),
            vocab=int(getattr(args, "vocab_size", 0) or 0),
            act_bytes=act_bytes,
        )

    def block_bytes(self, tokens: int) -> float:
        """What one block keeps for the backward pass, attention probabilities aside."""
        d, f = self.hidden, self.intermediate
        width = 4 * d + 2 * (self.heads + self.kv_heads) * self.head_dim + 3 * f
        return tokens * (ACTIVATION_SCALE * width + ACTIVATION_EXTRA) * self.act_bytes


@dataclass(frozen=True)
class Step:
    """The size of the largest micro-batch a run will see."""

    tokens: int
    """Packed tokens (prompts once, completions, no padding)."""
    scored: int
    """Completion tokens the LM head scores."""
    scores: int
    """Attention entries per head: each query's visible keys, summed."""
    examples: int = 1


@dataclass(frozen=True)
class Settings:
    """What a step keeps and what it recomputes."""

    split: int = 1
    """Sub-batches each micro-batch is cut into."""
    recompute: Recompute = Recompute()
    checkpoint_every: int = 0
    """Checkpoint every k-th block (0: none)."""

    @property
    def recomputes(self) -> bool:
        """Whether the backward pass computes anything twice (sub-batches alone do not)."""
        return bool(self.recompute.head or self.checkpoint_every)

    def describe(self) -> str:
        parts = []
        if self.split > 1:
            parts.append(f"{self.split} sub-batches per micro-batch")
        if self.checkpoint_every:
            every = (
                "every block"
                if self.checkpoint_every == 1
                else f"every {self.checkpoint_every} blocks"
            )
            parts.append(f"checkpointing {every}")
        if self.recompute.head:
            parts.append("LM head recomputed")
        return ", ".join(parts) or "everything kept"


@dataclass(frozen=True)
class Estimate:
    fixed: float
    activations: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        return self.fixed + self.activations + self.attention + self.head


def estimate(shape: Shape, fixed: float, step: Step, settings: Settings) -> Estimate:
    """Peak bytes of one training step of ``step``'s size under ``settings``."""
    split = max(1, settings.split)
    tokens, scored = step.tokens / split, step.scored / split
    scores = step.scores / split
    k = settings.checkpoint_every
    kept = shape.layers - (len(range(0, shape.layers, k)) if k else 0)
    checkpointed = shape.layers - kept
    block = shape.block_bytes(tokens)
    activations = kept * block + checkpointed * tokens * shape.hidden * shape.act_bytes
    if checkpointed:  # a block recomputed while later kept blocks are already freed
        activations += (BLOCK_TRANSIENT if not kept else BLOCK_TRANSIENT / 4) * block
    # Masks: a float per visible key, built once and shared by every block; each layer
    # keeps a log-sum-exp per head and query; one block at a time holds its probabilities.
    attention = scores * 4 + shape.layers * shape.heads * tokens * 4
    attention += ATTENTION_TRANSIENT * shape.heads * QUERY_BLOCK * tokens * 4
    if shape.kernel == "fused":
        attention = tokens * tokens + shape.layers * shape.heads * tokens * 4  # mask, stats
    chunk = min(scored, HEAD_CHUNK_ROWS) * shape.vocab * 4
    head = HEAD_TRANSIENT * chunk
    head += scored * shape.hidden * 4 if settings.recompute.head else scored * shape.vocab * 4
    return Estimate(fixed, activations, attention, head)


def fixed_bytes(model: nn.Module, reference: nn.Module | None = None) -> float:
    """Weights (and a separate reference model's), plus gradients and AdamW's two moments
    of every trainable parameter."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size * 4 for _, v in tree_flatten(model.trainable_parameters()))
    other = sum(v.nbytes for _, v in tree_flatten(reference.parameters())) if reference else 0
    return weights + 3 * trainable + other


_SIZE = re.compile(r"^\s*([0-9.]+)\s*(gb|gib|g|mb|mib|m)?\s*$", re.I)


def parse_limit(value: str | float | int | None) -> float | None:
    """``memory_limit``: bytes, ``"12GB"``/``"800MB"``, ``"60%"`` of the device, or None/auto."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) * (1 << 30) if value < 4096 else float(value)
    text = str(value).strip()
    if text.endswith("%"):
        total = backend.total_memory() or 0
        return float(text[:-1]) / 100 * total
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"memory_limit: {value!r} is not a size like 12GB, 800MB or 60%")
    unit = (match.group(2) or "gb").lower()
    return float(match.group(1)) * (1 << 30 if unit.startswith("g") else 1 << 20)


def budgets(fixed: float, limit: str | float | None) -> tuple[float, float, str]:
    """What a step should use, what it may use at most, and where those come from: a
    ``memory_limit`` is both; otherwise the lean default (weights and optimizer plus 2 GB
    of activations) is preferred and 70% of the device is the most."""
    device = backend.total_memory() or 0
    parsed = parse_limit(limit)
    if parsed is not None:
        return parsed, parsed, "memory_limit"
    hard = DEVICE_FRACTION * device if device else float("inf")
    lean = min(fixed + DEFAULT_ACTIVATIONS, hard)
    return lean, hard, "weights + 2 GB of activations"


def candidates(
    decomposable: bool, examples: int, layers: int, checkpoint="auto", head_trains: bool = False
) -> list[Settings]:
    """Settings from the cheapest to the leanest; ``checkpoint`` (``grad_checkpoint``):
    ``auto``, or true (every block) / false (none) as the user set it. A recomputed LM head
    passes no gradient to its own weights, so it is not offered when they train."""
    splits = [s for s in (2, 4, 8, 16, 32, 64) if s <= examples] if decomposable else []
    lean_split = splits[-1] if splits else 1
    head = Recompute(head=not head_trains)
    out = [Settings(), *[Settings(split=s) for s in splits]]
    if not head_trains:
        out.append(Settings(lean_split, head))
    out += [Settings(lean_split, head, every) for every in (4, 3, 2, 1) if every <= layers]
    if checkpoint is True:
        return [replace(s, checkpoint_every=1) for s in out if s.checkpoint_every in (0, 1)]
    if checkpoint is False:
        return [s for s in out if not s.checkpoint_every]
    return out


@dataclass(frozen=True)
class MemoryPlan:
    settings: Settings
    estimate: Estimate
    budget: float
    source: str

    def line(self) -> str:
        e = self.estimate
        return (
            f"memory plan: ~{_gb(e.total)} of {_gb(self.budget)} ({self.source}): weights and "
            f"optimizer {_gb(e.fixed)}, activations {_gb(e.activations)}, attention "
            f"{_gb(e.attention)}, LM head {_gb(e.head)}; {self.settings.describe()}"
        )


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def plan(
    shape: Shape,
    fixed: float,
    step: Step,
    *,
    limit: str | float | None = None,
    decomposable: bool = False,
    checkpoint: bool | str = "auto",
    head_trains: bool = False,
) -> MemoryPlan:
    """The cheapest settings whose estimate fits: without ``memory_limit``, sub-batches
    alone within the lean budget, else the least recomputation within 3 GB of activations;
    else the leanest, if it fits the most a step may use; else a one-line error saying
    what to change."""
    preferred, hard, source = budgets(fixed, limit)
    options = candidates(decomposable, step.examples, shape.layers, checkpoint, head_trains)
    guesses = [(s, estimate(shape, fixed, step, s)) for s in options]
    tiers = [(preferred, source, source != "memory_limit")]
    if source != "memory_limit":
        more = min(fixed + RECOMPUTE_ACTIVATIONS, hard)
        tiers.append((more, "weights + 3 GB of activations when recomputing", False))
    for budget, where, free_only in tiers:
        for settings, guess in guesses:
            if guess.total <= budget and not (free_only and settings.recomputes):
                return MemoryPlan(settings, guess, budget, where)
    leanest = guesses[-1][1]
    if leanest.total <= hard:  # over the preferred budget: as lean as allowed
        return MemoryPlan(guesses[-1][0], leanest, hard, "70% of the device")
    raise ConfigError(
        f"a training step needs ~{_gb(leanest.total)} even as lean as grad_checkpoint allows, "
        f"more than {_gb(hard)} ({'memory_limit' if source == 'memory_limit' else '70% of the device'}): "
        "lower batch_size or max_length, quantize the base (quantization: 4bit), or raise "
        "memory_limit"
    )


def step_size(examples, share_prompt: bool = True) -> Step:
    """The packed size of a micro-batch of ``examples`` (pairs or unpaired rows)."""
    tokens = scored = scores = 0
    for e in examples:
        p = len(e.prompt)
        completions = (e.chosen, e.rejected) if hasattr(e, "chosen") else (e.completion,)
        prompts = 1 if share_prompt else len(completions)
        tokens += prompts * p + sum(len(c) for c in completions)
        scored += sum(len(c) for c in completions)
        scores += prompts * p * (p + 1) // 2 + sum(
            len(c) * (p + (len(c) + 1) / 2) for c in completions
        )
    return Step(tokens, scored, int(scores), len(examples))


def worst_step(cfg) -> Step:
    """The largest micro-batch the settings allow (half prompt, half completion at
    ``max_length``): what the plan is checked against before any data is read."""
    length = cfg.max_length
    completion = min(cfg.max_completion_length or length // 2, length - 1)
    prompt = length - completion
    pair = PairExample((0,) * prompt, (0,) * completion, (0,) * completion)
    return step_size([pair] * cfg.batch_size, cfg.share_prompt)


def activation_bytes(model: nn.Module) -> int:
    """Bytes per activation element: the itemsize of the model's float weights (float32
    for a quantized base's scales)."""
    sizes = [v.itemsize for _, v in tree_flatten(model.parameters()) if v.dtype in FLOATS]
    return max(set(sizes), key=sizes.count) if sizes else 4


def plan_run(model: nn.Module, cfg, steps: list[Step] | None, decomposable: bool,
             reference: nn.Module | None = None) -> MemoryPlan:  # fmt: skip
    """The plan for a run: against the largest of ``steps`` (the micro-batches its data
    makes), or before the data is read, the largest the settings allow."""
    act = activation_bytes(model)
    dtype = {4: "float32", 2: "bfloat16"}.get(act, "float32")
    shape = Shape.of(model, act)
    head_dim = shape.head_dim
    shape = replace(shape, kernel=backend.attention_kernel(backend.backend_name(), dtype, head_dim))
    fixed = fixed_bytes(model, reference)
    kept = Settings()
    if steps:
        step = max(steps, key=lambda s: estimate(shape, fixed, s, kept).total)
    else:
        step = worst_step(cfg)
    return plan(shape, fixed, step, limit=cfg.memory_limit, decomposable=decomposable,
                checkpoint=cfg.grad_checkpoint, head_trains=head_trains(model))  # fmt: skip


def head_trains(model: nn.Module) -> bool:
    """Whether the LM head's weights train (full fine-tuning; tied: the embedding's)."""
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    return any("lm_head" in k or "embed_tokens" in k for k in names)


def epoch_steps(batch_plan) -> list[Step]:
    """The size of every micro-batch of a run's first epoch (this process's share)."""
    examples = batch_plan.examples
    return [
        step_size([examples[i] for i in idx], batch_plan.share_prompt)
        for idx in batch_plan.epoch(0)
    ]


def apply_plan(memory: MemoryPlan, model: nn.Module, batch_plan) -> None:
    """Put a plan's settings in place: sub-batches in the batch plan, checkpointed blocks
    in the model (the recompute choices travel with the training objective)."""
    batch_plan.split = memory.settings.split
    if memory.settings.checkpoint_every:
        enable_grad_checkpoint(model, memory.settings.checkpoint_every)
