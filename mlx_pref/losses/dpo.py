"""The DPO family: losses on paired policy/reference log-ratios.

Follows TRL 1.16 ``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss`` and the option
checks in ``DPOTrainer.__init__``). Four things mlx-pref keeps although TRL 1.x dropped them
follow the last TRL release that had them, TRL 0.28 ``trl/trainer/dpo_trainer.py``
(``DPOTrainer.dpo_loss`` / ``get_batch_loss_metrics``):

* ``label_smoothing`` on ``sigmoid`` (cDPO): TRL 1.16 smooths only ``robust``, ``exo_pair`` and
  the ``aot`` losses;
* ``reference_free`` (reference log-probs treated as 0 in the loss; the logged rewards
  still subtract them when they are given, as TRL 0.28 does);
* ``rpo_alpha`` (adds ``α·NLL(chosen)`` to every pair);
* ``bco_pair``'s running reward shift δ (TRL 1.16's ``bco_pair`` has none).

Notation: ``l_c = logπ(y_c) - logπ_ref(y_c)``, ``l_r`` likewise (summed log-probs);
``s_c, s_r`` are the f-divergence scores of those log-ratios (``s = l`` for reverse KL);
``Δ = s_c - s_r``; ``β`` is the KL coefficient; ``ε`` is ``label_smoothing``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_pref.errors import suggest
from mlx_pref.losses.base import (
    EXP_CLAMP,
    LossInputs,
    LossOutput,
    bounded_exp,
    chosen_nll,
    log_sigmoid,
    safe_lengths,
    smoothed_sigmoid_loss,
)
from mlx_pref.losses.state import LossState

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

F_DIVERGENCE_LOSSES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
"""The losses that accept an ``f_divergence_type`` other than ``reverse_kl`` (TRL 1.16).

They are built on the chosen-rejected score difference, where the ``β·log Z(x)`` term of the
f-DPO reparameterisation cancels; TRL rejects the other losses with a non-default value."""

DPO_OPTIONS: dict[str, Any] = {
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "reference_free": False,
    "rpo_alpha": None,
}
"""Options every DPO-family loss accepts, with their defaults."""


def check_f_divergence(f_divergence_type: str) -> None:
    """Raise ``ValueError`` (with the closest spelling) for an unknown ``f_divergence_type``."""
    if f_divergence_type in F_DIVERGENCES:
        return
    hint = suggest(str(f_divergence_type), F_DIVERGENCES)
    raise ValueError(
        f"unknown f_divergence_type '{f_divergence_type}'"
        + (f" (did you mean '{hint}'?)" if hint else "")
        + f"; choose one of: {', '.join(F_DIVERGENCES)}"
    )


def f_divergence_scores(
    chosen_logratios: mx.array,
    rejected_logratios: mx.array,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[mx.array, mx.array]:
    """Map log-ratios ``l = log π/π_ref`` to the f-DPO scores ``f'(π/π_ref)``, as TRL 1.16.

    ``reverse_kl`` → ``l``; ``forward_kl`` → ``1 - exp(-l)``; ``js_divergence`` →
    ``log 2 + log σ(l)``; ``alpha_divergence`` → ``(exp((α-1)·l) - 1) / (α-1)`` (``l`` when
    ``|α-1| < 1e-6``), α being ``f_alpha_divergence_coef`` (TRL's convention: the f-DPO
    paper's ``(1 - u^-α)/α`` with α replaced by ``1 - α``; equal at the default 0.5). The
    constants matter for the length-normalised losses (``ipo``, ``sigmoid_norm``), which
    divide each score by its own completion length. The α-divergence exponent is clamped at
    80 as TRL does in float32; the forward-KL exponent goes through :func:`bounded_exp`, so
    it stays finite where TRL's ``exp`` overflows (log-ratios below about -88.7) and equals
    TRL's everywhere else.
    """
    check_f_divergence(f_divergence_type)
    if f_divergence_type == "reverse_kl":
        return chosen_logratios, rejected_logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - bounded_exp(-chosen_logratios), 1.0 - bounded_exp(-rejected_logratios)
    if f_divergence_type == "js_divergence":
        log2 = math.log(2.0)
        return log2 + log_sigmoid(chosen_logratios), log2 + log_sigmoid(rejected_logratios)
    alpha = float(f_alpha_divergence_coef)
    if abs(alpha - 1.0) < 1e-6:
        return chosen_logratios, rejected_logratios
    coef = 1.0 / (alpha - 1.0)
    return (
        (mx.exp(mx.minimum((alpha - 1.0) * chosen_logratios, EXP_CLAMP)) - 1.0) * coef,
        (mx.exp(mx.minimum((alpha - 1.0) * rejected_logratios, EXP_CLAMP)) - 1.0) * coef,
    )


def batch_mean(losses: mx.array) -> mx.array:
    """Mean of per-example losses as ``Σ(x/n)``, which stays finite for rows near float32's
    limit (a plain sum of a few such rows would overflow before the division)."""
    return (losses / losses.shape[0]).sum()


@dataclass
class PairTerms:
    """What a DPO-family loss body sees: log-ratios, f-scores and the settings."""

    name: str
    inputs: LossInputs
    beta: float
    label_smoothing: float
    state: LossState | None
    chosen_logratios: mx.array
    rejected_logratios: mx.array
    chosen_scores: mx.array
    rejected_scores: mx.array
    ref_chosen: mx.array
    ref_rejected: mx.array

    @property
    def delta(self) -> mx.array:
        """``Δ = s_c - s_r``, TRL's ``delta_score``."""
        return self.chosen_scores - self.rejected_scores


Body = Callable[..., tuple[mx.array, dict[str, mx.array]]]


def check_paired(inputs: LossInputs, name: str) -> None:
    """Paired losses need as many chosen as rejected rows (row i of each forms pair i)."""
    nc, nr = inputs.chosen_logps.shape[0], inputs.rejected_logps.shape[0]
    if nc != nr:
        raise ValueError(
            f"loss '{name}' is paired: it needs as many chosen as rejected rows, got {nc} and {nr}"
        )
    if nc == 0:
        raise ValueError(f"loss '{name}' got an empty batch")


def dpo_loss(name: str, *, needs_reference: bool = True) -> Callable[[Body], Callable]:
    """Wrap a loss body into a full DPO-family loss function.

    The wrapper resolves the reference (``reference_free``), checks and applies the
    f-divergence (only the ``F_DIVERGENCE_LOSSES`` accept a non-default one), calls the body
    for the per-pair losses, then adds ``rpo_alpha·NLL`` and multiplies by the WPO weights,
    and fills the rewards ``β·(logπ - logπ_ref)`` (TRL 1.16's logged rewards, detached, for
    every loss of the family).
    """

    def wrap(body: Body) -> Callable[..., LossOutput]:
        def loss_fn(
            inputs: LossInputs,
            *,
            beta: float,
            label_smoothing: float = 0.0,
            state: LossState | None = None,
            f_divergence_type: str = "reverse_kl",
            f_alpha_divergence_coef: float = 0.5,
            reference_free: bool = False,
            rpo_alpha: float | None = None,
            **params: Any,
        ) -> LossOutput:
            check_paired(inputs, name)
            check_f_divergence(f_divergence_type)
            if f_divergence_type != "reverse_kl" and name not in F_DIVERGENCE_LOSSES:
                raise ValueError(
                    f"f_divergence_type='{f_divergence_type}' does not apply to loss '{name}': "
                    "only the losses built on the chosen-rejected score difference accept it ("
                    + ", ".join(sorted(F_DIVERGENCE_LOSSES))
                    + "); use the default 'reverse_kl'"
                )
            have_ref = inputs.ref_chosen_logps is not None and inputs.ref_rejected_logps is not None
            if reference_free or not have_ref:
                if needs_reference and not reference_free:
                    raise ValueError(
                        f"loss '{name}' needs reference log-probs: pass ref_chosen_logps and "
                        "ref_rejected_logps, or set reference_free=True"
                    )
                ref_c = mx.zeros_like(inputs.chosen_logps)
                ref_r = mx.zeros_like(inputs.rejected_logps)
            else:
                ref_c, ref_r = inputs.ref_chosen_logps, inputs.ref_rejected_logps
            lc = inputs.chosen_logps - ref_c
            lr = inputs.rejected_logps - ref_r
            sc, sr = f_divergence_scores(lc, lr, f_divergence_type, f_alpha_divergence_coef)
            terms = PairTerms(
                name, inputs, beta, label_smoothing, state, lc, lr, sc, sr, ref_c, ref_r
            )
            losses, metrics = body(terms, **params)
            if rpo_alpha is not None:
                nll = chosen_nll(inputs, name)
                losses = losses + rpo_alpha * nll
                metrics["nll_loss"] = nll
            if inputs.extra("policy_weights") is not None:
                weights = mx.stop_gradient(inputs.extra("policy_weights"))
                if weights.shape != losses.shape:
                    raise ValueError(
                        f"policy_weights must have one weight per pair ({losses.shape[0]}), "
                        f"got shape {tuple(weights.shape)}"
                    )
                losses = losses * weights
                metrics["wpo/weight_mean"] = weights.mean()
            if have_ref:  # TRL 0.28: reference_free drops the reference from the loss only
                lc = inputs.chosen_logps - inputs.ref_chosen_logps
                lr = inputs.rejected_logps - inputs.ref_rejected_logps
            return LossOutput(
                loss=batch_mean(losses),
                losses=losses,
                chosen_rewards=mx.stop_gradient(beta * lc),
                rejected_rewards=mx.stop_gradient(beta * lr),
                metrics=metrics,
            )

        loss_fn.__name__ = f"{name}_loss"
        loss_fn.__doc__ = body.__doc__
        return loss_fn

    return wrap


@dpo_loss("sigmoid")
def sigmoid(t: PairTerms) -> tuple[mx.array, dict]:
    """DPO: ``-log σ(βΔ)`` (TRL 1.16); with ``ε > 0`` conservative DPO (cDPO),
    ``-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)``, as TRL 0.28 (TRL 1.x ignores ``ε`` here)."""
    return smoothed_sigmoid_loss(t.beta * t.delta, t.label_smoothing), {}


@dpo_loss("hinge")
def hinge(t: PairTerms) -> tuple[mx.array, dict]:
    """SLiC/RSO hinge: ``max(0, 1 - βΔ)``."""
    return mx.maximum(1.0 - t.beta * t.delta, 0.0), {}


@dpo_loss("ipo")
def ipo(t: PairTerms) -> tuple[mx.array, dict]:
    """IPO on length-averaged scores: ``(s_c/|y_c| - s_r/|y_r| - 1/(2β))²`` (TRL's normalisation).

    Lengths are completion token counts, clamped to at least 1 as TRL does."""
    lc = safe_lengths(t.inputs.chosen_lengths, t.name, "chosen")
    lr = safe_lengths(t.inputs.rejected_lengths, t.name, "rejected")
    delta = t.chosen_scores / lc - t.rejected_scores / lr
    return (delta - 1.0 / (2.0 * t.beta)) ** 2, {}


@dpo_loss("exo_pair")
def exo_pair(t: PairTerms) -> tuple[mx.array, dict]:
    """EXO-pref (Eq. 16): ``σ(z)(log σ(z) - log(1-ε)) + σ(-z)(log σ(-z) - log ε)``, ``z = βΔ``."""
    eps = t.label_smoothing
    if not 0.0 < eps < 1.0:
        raise ValueError(
            "loss 'exo_pair' needs 0 < label_smoothing < 1 (the EXO paper recommends 1e-3), "
            f"got {eps}"
        )
    z = t.beta * t.delta
    losses = mx.sigmoid(z) * (log_sigmoid(z) - math.log1p(-eps)) + mx.sigmoid(-z) * (
        log_sigmoid(-z) - math.log(eps)
    )
    return losses, {}


@dpo_loss("nca_pair")
def nca_pair(t: PairTerms) -> tuple[mx.array, dict]:
    """NCA: ``-log σ(βl_c) - ½·log σ(-βl_c) - ½·log σ(-βl_r)`` (reverse KL only, TRL 1.16)."""
    rc, rr = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    return -log_sigmoid(rc) - 0.5 * log_sigmoid(-rc) - 0.5 * log_sigmoid(-rr), {}


@dpo_loss("robust")
def robust(t: PairTerms) -> tuple[mx.array, dict]:
    """Robust DPO: ``(-(1-ε)·log σ(βΔ) + ε·log σ(-βΔ)) / (1-2ε)``, ``0 ≤ ε < 0.5``.

    TRL 1.16 documents that range for ε but only logs a warning outside it; mlx-pref raises
    (at ε = 0.5 the loss divides by zero, above it the sign flips)."""
    eps = t.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"loss 'robust' needs 0 <= label_smoothing < 0.5, got {eps}")
    z = t.beta * t.delta
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps), {}


@dpo_loss("bco_pair")
def bco_pair(t: PairTerms) -> tuple[mx.array, dict]:
    """Paired BCO with reward shift: ``-log σ(βl_c - δ) - log σ(-(βl_r - δ))``.

    TRL 1.16's ``bco_pair`` is this loss with ``δ = 0``; mlx-pref keeps the running shift of
    TRL 0.28's ``bco_pair``: δ is the running mean of the batch-mean reward (each training
    step adds ``mean(cat(βl_c, βl_r))`` to the running moments as one value, across ranks),
    updated before the loss. Unlike TRL 0.28, which also updated δ in evaluation, calls with
    ``train=False`` only read δ. Reverse KL only (TRL 1.16). Metric ``delta``.
    """
    if t.state is None:
        raise ValueError(
            "loss 'bco_pair' keeps a running reward mean: pass state=LossState() and reuse it "
            "across steps"
        )
    rc, rr = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    if t.inputs.train:
        rewards = mx.concatenate([rc, rr])
        t.state.moments("bco_pair").update(rewards.mean().reshape(1), group=t.inputs.group)
    delta = t.state.delta("bco_pair")
    losses = -log_sigmoid(rc - delta) - log_sigmoid(-(rr - delta))
    return losses, {"delta": mx.array(delta, dtype=mx.float32)}


@dpo_loss("sppo_hard")
def sppo_hard(t: PairTerms) -> tuple[mx.array, dict]:
    """SPPO with hard labels: ``(l_c - 1/(2β))² + (l_r + 1/(2β))²`` (reverse KL only)."""
    half = 0.5 / t.beta
    return (t.chosen_logratios - half) ** 2 + (t.rejected_logratios + half) ** 2, {}


def _no_weighting(t: PairTerms) -> None:
    if t.inputs.extra("policy_weights") is not None:
        raise ValueError(
            f"WPO weights (policy_weights) cannot be used with '{t.name}': it sorts the batch, "
            "which would misalign per-pair weights"
        )


@dpo_loss("aot")
def aot(t: PairTerms) -> tuple[mx.array, dict]:
    """AOT (paired): smoothed logistic loss (as TRL 1.16) of
    ``β·(sort(logπ_c - logπ_r) - sort(logπ_ref,c - logπ_ref,r))``, sorted within the batch."""
    _no_weighting(t)
    pi = mx.sort(t.inputs.chosen_logps - t.inputs.rejected_logps, axis=0)
    ref = mx.sort(t.ref_chosen - t.ref_rejected, axis=0)
    return smoothed_sigmoid_loss(t.beta * (pi - ref), t.label_smoothing), {}


@dpo_loss("aot_unpaired")
def aot_unpaired(t: PairTerms) -> tuple[mx.array, dict]:
    """AOT (unpaired): smoothed logistic loss (as TRL 1.16) of ``β·(sort(l_c) - sort(l_r))``."""
    _no_weighting(t)
    delta = mx.sort(t.chosen_logratios, axis=0) - mx.sort(t.rejected_logratios, axis=0)
    return smoothed_sigmoid_loss(t.beta * delta, t.label_smoothing), {}


@dpo_loss("sigmoid_norm")
def sigmoid_norm(t: PairTerms) -> tuple[mx.array, dict]:
    """Length-normalised DPO: ``-log σ(β·(s_c/|y_c| - s_r/|y_r|))``."""
    lc = safe_lengths(t.inputs.chosen_lengths, t.name, "chosen")
    lr = safe_lengths(t.inputs.rejected_lengths, t.name, "rejected")
    return -log_sigmoid(t.beta * (t.chosen_scores / lc - t.rejected_scores / lr)), {}


@dpo_loss("apo_zero")
def apo_zero(t: PairTerms) -> tuple[mx.array, dict]:
    """APO-zero (Eq. 7): ``1 - σ(βl_c) + σ(βl_r)``."""
    return 1.0 - mx.sigmoid(t.beta * t.chosen_logratios) + mx.sigmoid(
        t.beta * t.rejected_logratios
    ), {}


@dpo_loss("apo_down")
def apo_down(t: PairTerms) -> tuple[mx.array, dict]:
    """APO-down (Eq. 8): ``σ(βl_c) + 1 - σ(βΔ)``."""
    return mx.sigmoid(t.beta * t.chosen_logratios) + 1.0 - mx.sigmoid(t.beta * t.delta), {}


@dpo_loss("discopop")
def discopop(t: PairTerms, discopop_tau: float = 0.05) -> tuple[mx.array, dict]:
    """DiscoPOP / LRML (Eq. 5): ``(1-σ(z/τ))·(-log σ(z)) + σ(z/τ)·exp(-z)``, ``z = βΔ``.

    ``σ(z/τ)·exp(-z)`` is evaluated as ``exp(log σ(z/τ) - z)`` through :func:`bounded_exp`,
    which is finite where TRL's product turns into ``0·inf = NaN`` or ``inf`` (``z`` below
    about -88.7 in float32) and equal to it elsewhere. ``discopop_tau`` defaults to 0.05
    (TRL 1.16's ``DPOConfig``) and must be > 0.
    """
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    z = t.beta * t.delta
    # 1 - σ(z/τ) is written σ(-z/τ) to avoid cancellation near σ = 1.
    logistic = -log_sigmoid(z) * mx.sigmoid(-z / discopop_tau)
    losses = logistic + bounded_exp(log_sigmoid(z / discopop_tau) - z)
    return losses, {}


@dpo_loss("sft", needs_reference=False)
def sft(t: PairTerms) -> tuple[mx.array, dict]:
    """NLL of the chosen completions (token mean over the batch), the same value for every pair.

    As TRL 1.16: ``-mean`` of the chosen per-token log-probs over all chosen completion tokens
    (not LD-weighted: pass ``chosen_nll`` when ``chosen_logps`` are not plain sums)."""
    nll = chosen_nll(t.inputs, t.name)
    return mx.broadcast_to(nll, t.inputs.chosen_logps.shape), {"nll_loss": nll}
