"""The DPO family: losses on paired policy/reference log-ratios.

Follows TRL v1.9.0, ``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss``; unchanged
on TRL main at 1.10.0.dev0, the newest TRL available to us, so 1.16 itself could not be
consulted). Three options that TRL v0.29 removed follow the last release that had them,
TRL v0.28.0 (``DPOTrainer.dpo_loss`` / ``get_batch_loss_metrics``):

* ``label_smoothing`` on ``sigmoid`` (cDPO): v1.9 no longer smooths ``sigmoid``;
* ``reference_free`` (reference log-probs treated as 0);
* ``rpo_alpha`` (adds ``α·NLL(chosen)``) and ``bco_pair``'s running reward shift δ.

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

from mlx_pref.losses.base import (
    EXP_CLAMP,
    LossInputs,
    LossOutput,
    chosen_nll,
    closest,
    log_sigmoid,
    safe_lengths,
    smoothed_sigmoid_loss,
)
from mlx_pref.losses.state import LossState

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

DPO_OPTIONS: dict[str, Any] = {
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "reference_free": False,
    "rpo_alpha": None,
}
"""Options every DPO-family loss accepts, with their defaults."""


def f_divergence_scores(
    chosen_logratios: mx.array,
    rejected_logratios: mx.array,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[mx.array, mx.array]:
    """Map log-ratios ``l = log π/π_ref`` to the f-DPO scores ``f'(π/π_ref)`` (constants dropped).

    As TRL v1.9: ``reverse_kl`` → ``l``; ``forward_kl`` → ``-exp(-l)``; ``js_divergence`` →
    ``log σ(l)``; ``alpha_divergence`` → ``exp((α-1)·l) / (α-1)`` (``l`` when ``|α-1| < 1e-6``).
    The α-divergence follows TRL v1.9's convention, in which the f-DPO paper's
    ``(1 - u^-α)/α`` has α replaced by ``1 - α`` (the two agree at the default 0.5).
    Exponents are clamped at 80 so the scores stay finite in float32; TRL clamps only the
    α-divergence one, so for log-ratios below -80 ``forward_kl`` differs (TRL overflows).
    """
    if f_divergence_type == "reverse_kl":
        return chosen_logratios, rejected_logratios
    if f_divergence_type == "forward_kl":
        return (
            -mx.exp(mx.minimum(-chosen_logratios, EXP_CLAMP)),
            -mx.exp(mx.minimum(-rejected_logratios, EXP_CLAMP)),
        )
    if f_divergence_type == "js_divergence":
        return log_sigmoid(chosen_logratios), log_sigmoid(rejected_logratios)
    if f_divergence_type == "alpha_divergence":
        alpha = float(f_alpha_divergence_coef)
        if abs(alpha - 1.0) < 1e-6:
            return chosen_logratios, rejected_logratios
        coef = 1.0 / (alpha - 1.0)
        return (
            mx.exp(mx.minimum((alpha - 1.0) * chosen_logratios, EXP_CLAMP)) * coef,
            mx.exp(mx.minimum((alpha - 1.0) * rejected_logratios, EXP_CLAMP)) * coef,
        )
    hint = closest(str(f_divergence_type), F_DIVERGENCES)
    raise ValueError(
        f"unknown f_divergence_type '{f_divergence_type}'"
        + (f" (did you mean '{hint}'?)" if hint else "")
        + f"; choose one of: {', '.join(F_DIVERGENCES)}"
    )


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

    The wrapper resolves the reference (``reference_free``), applies the f-divergence, calls
    the body for the per-pair losses, then adds ``rpo_alpha·NLL`` and WPO weights and
    fills the rewards ``β·(logπ - logπ_ref)`` (TRL's logged rewards, detached).
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
            if inputs.policy_weights is not None:
                weights = mx.stop_gradient(inputs.policy_weights)
                if weights.shape != losses.shape:
                    raise ValueError(
                        f"policy_weights must have one weight per pair ({losses.shape[0]}), "
                        f"got shape {tuple(weights.shape)}"
                    )
                losses = losses * weights
                metrics["wpo/weight_mean"] = weights.mean()
            return LossOutput(
                loss=losses.mean(),
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
    """DPO: ``-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)`` (cDPO when ``ε > 0``, TRL v0.28)."""
    return smoothed_sigmoid_loss(t.beta * t.delta, t.label_smoothing), {}


@dpo_loss("hinge")
def hinge(t: PairTerms) -> tuple[mx.array, dict]:
    """SLiC/RSO hinge: ``max(0, 1 - βΔ)``."""
    return mx.maximum(1.0 - t.beta * t.delta, 0.0), {}


@dpo_loss("ipo")
def ipo(t: PairTerms) -> tuple[mx.array, dict]:
    """IPO on length-averaged scores: ``(s_c/|y_c| - s_r/|y_r| - 1/(2β))²`` (TRL's normalisation)."""
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
    """NCA: ``-log σ(βs_c) - ½·log σ(-βs_c) - ½·log σ(-βs_r)``."""
    rc, rr = t.beta * t.chosen_scores, t.beta * t.rejected_scores
    return -log_sigmoid(rc) - 0.5 * log_sigmoid(-rc) - 0.5 * log_sigmoid(-rr), {}


@dpo_loss("robust")
def robust(t: PairTerms) -> tuple[mx.array, dict]:
    """Robust DPO: ``(-(1-ε)·log σ(βΔ) + ε·log σ(-βΔ)) / (1-2ε)``, ``0 ≤ ε < 0.5``."""
    eps = t.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"loss 'robust' needs 0 <= label_smoothing < 0.5, got {eps}")
    z = t.beta * t.delta
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps), {}


@dpo_loss("bco_pair")
def bco_pair(t: PairTerms) -> tuple[mx.array, dict]:
    """Paired BCO with reward shift: ``-log σ(βs_c - δ) - log σ(-(βs_r - δ))``.

    δ is the running mean of the batch-mean reward (TRL v0.28 ``bco_pair``: each step adds
    ``mean(cat(βl_c, βl_r))`` to the running moments as one value), updated before the loss
    in training and left alone when ``train=False``.
    """
    if t.state is None:
        raise ValueError(
            "loss 'bco_pair' keeps a running reward mean: pass state=LossState() and reuse it "
            "across steps"
        )
    if t.inputs.train:
        rewards = mx.concatenate([t.beta * t.chosen_logratios, t.beta * t.rejected_logratios])
        t.state.moments("bco_pair").update(rewards.mean().reshape(1), group=t.inputs.group)
    delta = t.state.delta("bco_pair")
    rc, rr = t.beta * t.chosen_scores, t.beta * t.rejected_scores
    losses = -log_sigmoid(rc - delta) - log_sigmoid(-(rr - delta))
    return losses, {"bco_pair/delta": mx.array(delta, dtype=mx.float32)}


@dpo_loss("sppo_hard")
def sppo_hard(t: PairTerms) -> tuple[mx.array, dict]:
    """SPPO with hard labels: ``(s_c - 1/(2β))² + (s_r + 1/(2β))²``."""
    half = 0.5 / t.beta
    return (t.chosen_scores - half) ** 2 + (t.rejected_scores + half) ** 2, {}


def _no_weighting(t: PairTerms) -> None:
    if t.inputs.policy_weights is not None:
        raise ValueError(
            f"WPO weights (policy_weights) cannot be used with '{t.name}': it sorts the batch, "
            "which would misalign per-pair weights"
        )


@dpo_loss("aot")
def aot(t: PairTerms) -> tuple[mx.array, dict]:
    """AOT (paired): cDPO loss on ``β·(sort(logπ_c - logπ_r) - sort(logπ_ref,c - logπ_ref,r))``."""
    _no_weighting(t)
    pi = mx.sort(t.inputs.chosen_logps - t.inputs.rejected_logps, axis=0)
    ref = mx.sort(t.ref_chosen - t.ref_rejected, axis=0)
    return smoothed_sigmoid_loss(t.beta * (pi - ref), t.label_smoothing), {}


@dpo_loss("aot_unpaired")
def aot_unpaired(t: PairTerms) -> tuple[mx.array, dict]:
    """AOT (unpaired): cDPO loss on ``β·(sort(l_c) - sort(l_r))``."""
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

    ``σ(z/τ)·exp(-z)`` is evaluated as ``exp(log σ(z/τ) - z)``, which is finite where TRL's
    product turns into ``0·inf = NaN`` (``z`` below about -88 in float32).
    """
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    z = t.beta * t.delta
    # 1 - σ(z/τ) is written σ(-z/τ) to avoid cancellation near σ = 1.
    logistic = -log_sigmoid(z) * mx.sigmoid(-z / discopop_tau)
    losses = logistic + mx.exp(log_sigmoid(z / discopop_tau) - z)
    return losses, {}


@dpo_loss("sft", needs_reference=False)
def sft(t: PairTerms) -> tuple[mx.array, dict]:
    """NLL of the chosen completions (token mean over the batch), the same value for every pair."""
    nll = chosen_nll(t.inputs, t.name)
    return mx.broadcast_to(nll, t.inputs.chosen_logps.shape), {"nll_loss": nll}
