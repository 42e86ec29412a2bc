"""Shared types and numerics for the preference losses.

Every loss is a pure function of per-sequence quantities (summed completion log-probs,
completion lengths and a few optional per-row extras), so it can be checked without a model.
This module holds the containers the losses exchange and the numerically stable primitives
they are built from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_pref import backend

ArrayLike = Any
"""An ``mx.array``, a NumPy array, a Python list or a scalar."""

EXP_CLAMP = 80.0
"""Clamp on the α-divergence exponent: TRL 1.16 ``trl/trainer/dpo_trainer.py`` clamps it at
80 for float32 (and bfloat16) inputs; mlx-pref computes in float32, so it uses the same 80."""

EXP_MAX = 88.7227
"""Largest exponent :func:`bounded_exp` evaluates (larger ones are clamped to it).

float32 ``exp`` is finite up to ``ln(FLT_MAX) ≈ 88.72284``, beyond which TRL's unclamped
``exp`` (forward-KL scores, AlphaPO rewards, DiscoPOP's exponential term) overflows to ``inf``.
Stopping 1e-4 short keeps a margin for ``exp`` implementations that are a few ulp off, so the
result is identical to TRL's wherever TRL is finite except in the last ~18 float32 inputs
before its overflow, where it is at most 1e-4 (relative) smaller."""

FLOAT32_TINY = float(np.finfo(np.float32).tiny)
"""Smallest positive normal float32 (about 1.18e-38)."""

LOG_HALF = -math.log(2.0)


class UnknownLossError(ValueError):
    """A loss name that is neither a registered loss nor an alias."""


@dataclass
class LossOutput:
    """What a preference loss returns.

    ``loss`` is the scalar that is back-propagated: the mean of the per-example losses, or for
    a weighted combination the weighted sum of each part's ``loss``. ``losses`` holds the
    per-example values (``None`` for a combination). ``chosen_rewards`` / ``rejected_rewards``
    are per-row implicit rewards as TRL logs them. ``metrics`` holds extra scalars.
    """

    loss: mx.array
    losses: mx.array | None
    chosen_rewards: mx.array
    rejected_rewards: mx.array
    metrics: dict[str, mx.array] = field(default_factory=dict)


@dataclass
class LossInputs:
    """The per-sequence batch a loss function reads (built by ``preference_loss``).

    Arrays are float32 ``mx.array``. ``ref_*`` are ``None`` for reference-free use;
    lengths are ``None`` when the caller did not supply them.
    """

    chosen_logps: mx.array
    rejected_logps: mx.array
    ref_chosen_logps: mx.array | None = None
    ref_rejected_logps: mx.array | None = None
    chosen_lengths: mx.array | None = None
    rejected_lengths: mx.array | None = None
    extras: dict[str, mx.array] = field(default_factory=dict)
    """The extra inputs this loss reads (``specs.EXTRA_INPUTS``) that the caller gave."""
    train: bool = True
    group: Any = None

    def extra(self, name: str) -> mx.array | None:
        """Extra input ``name`` (``policy_weights``, ``udm_weights``, ...), or None."""
        return self.extras.get(name)


LossFn = Callable[..., LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """Registry entry for one loss.

    ``fn(inputs, *, beta, label_smoothing, state, **params)`` computes it; ``params`` maps
    each of its own parameters to its default; ``needs_reference`` says whether reference
    log-probs are required; ``paired`` is False for losses that take unpaired desirable /
    undesirable rows (``bco``, ``kto``); ``uses_label_smoothing`` says whether
    ``label_smoothing`` changes it; ``trl`` names the TRL release and file it follows.
    """

    name: str
    fn: LossFn
    needs_reference: bool
    paired: bool
    params: dict[str, Any]
    formula: str
    paper: str
    arxiv: str | None
    trl: str
    family: str
    inputs: tuple[str, ...] = ()
    """Extra batch inputs it reads (``specs.EXTRA_INPUTS``), e.g. KTO's KL rows."""
    aliases: tuple[str, ...] = ()
    uses_label_smoothing: bool = False
    stateful: bool = False
    decomposable: bool = False
    """The batch loss is the mean of per-example terms (no batch statistics, sorting or
    token-mean NLL), so a batch cut into sub-batches gives the same gradient."""
    description: str = ""

    @property
    def paper_url(self) -> str | None:
        """Link to the paper (arXiv abstract page) or ``None`` when there is none."""
        if self.arxiv is None:
            return None
        if self.arxiv.startswith("http"):
            return self.arxiv
        return f"https://arxiv.org/abs/{self.arxiv}"


def as_float_array(value: ArrayLike, name: str) -> mx.array:
    """Convert ``value`` to a 1-D float32 ``mx.array`` (upcasting half precision).

    Losses are computed in float32 whatever the model's dtype, as TRL's ORPO does with
    ``.float()``; gradients still flow through the cast.
    """
    # Non-MLX input goes through float32 NumPy: float64 arrays are CPU-only in MLX.
    arr = value if isinstance(value, mx.array) else mx.array(np.asarray(value, dtype=np.float32))
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per row), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return empty_rows()  # also cuts off the op that made it: it is never evaluated
    if arr.dtype != mx.float32:
        arr = arr.astype(mx.float32)
    return arr


def empty_rows() -> mx.array:
    """A ``(0,)`` float32 array that no MLX op computes (it is built from host memory).

    An unpaired batch may have no desirable or no undesirable rows. MLX's CUDA backend
    kills the process (SIGFPE, an integer division by zero in its kernel launch setup)
    when a fused elementwise kernel runs on a zero-size array; ``nn.log_sigmoid`` is one,
    as is anything ``mx.compile`` fuses. So an empty side is this constant, and no op is
    ever issued on it (:func:`on_rows`, :func:`concat_rows`).
    """
    return mx.array(np.zeros((0,), dtype=np.float32))


def on_rows(fn: Callable[..., mx.array], *rows: mx.array) -> mx.array:
    """``fn(*rows)`` for a side that has rows; :func:`empty_rows` for an empty one, without
    calling ``fn`` (the shape decides in Python, so no op sees a zero-size array)."""
    return fn(*rows) if rows[0].size else empty_rows()


def concat_rows(parts: list[mx.array]) -> mx.array:
    """The non-empty ``parts`` concatenated; a single one is returned as it is."""
    kept = [p for p in parts if p.size]
    if not kept:
        return empty_rows()
    return kept[0] if len(kept) == 1 else mx.concatenate(kept)


def log_sigmoid(x: mx.array) -> mx.array:
    """``log σ(x)`` without overflow for any magnitude (``-softplus(-x)``)."""
    return nn.log_sigmoid(x)


def bounded_exp(x: mx.array) -> mx.array:
    """``exp(min(x, EXP_MAX))``: finite for every input, equal to ``exp(x)`` below ``EXP_MAX``.

    MLX's float32 ``exp`` (CPU) already returns ``inf`` above 88.0, short of float32's limit,
    so arguments above 80 are evaluated as ``exp(x - 1)·e``. Both branches stay finite, so
    gradients through the unused one are 0 rather than NaN.
    """
    x = mx.where(x > EXP_MAX, EXP_MAX, x)
    above = x > 80.0
    small = mx.where(above, 80.0, x)
    large = mx.where(above, x, 80.0)
    return mx.where(above, mx.exp(large - 1.0) * math.e, mx.exp(small))


def log1mexp(x: mx.array) -> mx.array:
    """``log(1 - exp(x))`` for ``x < 0``, branching at ``-ln 2`` to avoid cancellation.

    Same split as TRL 1.16's ORPO helper (Mächler's note on computing ``log1mexp``). The
    argument of the ``expm1`` branch is capped at ``-FLOAT32_TINY`` so that it stays finite
    for ``x = 0`` (where the result would be ``-inf``); every ``x <= -FLOAT32_TINY`` is exact.
    """
    small = mx.minimum(x, LOG_HALF)  # keeps the unused branch finite for gradients
    large = mx.minimum(mx.maximum(x, LOG_HALF), -FLOAT32_TINY)
    return mx.where(x < LOG_HALF, mx.log1p(-mx.exp(small)), mx.log(-mx.expm1(large)))


def smoothed_sigmoid_loss(logits: mx.array, label_smoothing: float) -> mx.array:
    """Conservative (cDPO) logistic loss ``-(1-ε)·log σ(z) - ε·log σ(-z)`` of ``z = logits``."""
    loss = -log_sigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * log_sigmoid(-logits)
    return loss


def safe_lengths(lengths: mx.array | None, loss: str, side: str) -> mx.array:
    """Completion lengths clamped to at least 1 (TRL's ``clamp(min=1)``); required here."""
    if lengths is None:
        raise ValueError(
            f"loss '{loss}' averages log-probs over completion tokens: pass {side}_lengths "
            "(number of completion tokens per row)"
        )
    return mx.maximum(lengths, 1.0)


def chosen_nll(inputs: LossInputs, loss: str) -> mx.array:
    """Token-mean negative log-likelihood of the chosen completions over the whole batch.

    TRL computes it as ``cross_entropy`` over every chosen completion token, which equals
    ``-Σ_i logp_i / Σ_i len_i`` with summed log-probs. When ``chosen_nll`` was passed
    explicitly (needed when ``chosen_logps`` are not plain sums, e.g. under LD-DPO), that
    value is used instead.
    """
    if inputs.extra("chosen_nll") is not None:
        return inputs.extra("chosen_nll").reshape(())
    if inputs.chosen_lengths is None:
        raise ValueError(
            f"loss '{loss}' adds a chosen NLL term: pass chosen_lengths (completion token counts) "
            "or chosen_nll"
        )
    tokens = mx.maximum(inputs.chosen_lengths.sum(), 1.0)
    return -inputs.chosen_logps.sum() / tokens


def reduction_group(group: Any = None) -> Any:
    """The group a loss statistic is reduced over, or ``None`` for a single process:
    ``group`` when given, otherwise the global one (``mlx_pref.backend``)."""
    group = group or backend.distributed_group()
    return group if group.size() > 1 else None
