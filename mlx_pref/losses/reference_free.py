"""Reference-free paired losses: CPO, SimPO and ORPO.

* ``cpo`` and ``simpo`` follow TRL 1.16 ``trl/experimental/cpo/cpo_trainer.py``
  (``CPOTrainer.cpo_loss`` with ``loss_type="sigmoid"`` / ``"simpo"``, plus the
  ``cpo_alpha``·NLL behaviour-cloning term of ``get_batch_loss_metrics`` and the AlphaPO
  reward shape ``alpha``; defaults from ``CPOConfig``).
* ``orpo`` follows TRL 1.16 ``trl/experimental/orpo/orpo_trainer.py``
  (``ORPOTrainer.odds_ratio_loss``; the total is ``NLL - mean(β·log σ(log-odds))``).

Inputs are summed log-probs; SimPO and ORPO divide by the completion lengths themselves,
where TRL asks its forward pass for averaged log-probs.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_pref.losses.base import (
    FLOAT32_TINY,
    LossInputs,
    LossOutput,
    bounded_exp,
    chosen_nll,
    log1mexp,
    log_sigmoid,
    safe_lengths,
    smoothed_sigmoid_loss,
)
from mlx_pref.losses.dpo import check_paired
from mlx_pref.losses.state import LossState

ORPO_MAX_AVG_LOGP = -FLOAT32_TINY
"""ORPO caps length-averaged log-probs at this value (about -1.18e-38) before ``log(1 - p)``.

A completion whose every token has probability 1 in float32 has an average log-prob of
exactly 0, where TRL's ``log1mexp`` returns ``-inf`` and the loss becomes ``inf`` or NaN.
Every average log-prob TRL handles finitely (any value below -1.18e-38) is left unchanged."""


def alphapo_reward(logps: mx.array, alpha: float) -> mx.array:
    """AlphaPO reward shape ``(1 - p^(-α)) / α`` with ``p = exp(logps)``; ``logps`` when ``α = 0``.

    ``p^(-α)`` is evaluated as ``exp(-α·logp)`` through :func:`bounded_exp`: TRL's
    ``exp(logp).pow(-α)`` overflows (or meets ``p = 0``) for very negative log-probs, where
    this stays finite; wherever TRL's value is finite the two agree.
    """
    if alpha == 0.0:
        return logps
    return (1.0 - bounded_exp(-alpha * logps)) / alpha


def _no_reference_needed(inputs: LossInputs, name: str) -> None:
    check_paired(inputs, name)


def _cpo_like(
    name: str,
    inputs: LossInputs,
    chosen: mx.array,
    rejected: mx.array,
    *,
    beta: float,
    label_smoothing: float,
    cpo_alpha: float,
    alpha: float,
    gamma: float | None,
) -> LossOutput:
    rc, rr = alphapo_reward(chosen, alpha), alphapo_reward(rejected, alpha)
    logits = rc - rr
    if gamma is not None:
        logits = logits - gamma / beta
    losses = smoothed_sigmoid_loss(beta * logits, label_smoothing)
    if cpo_alpha != 0.0:
        nll = chosen_nll(inputs, name)
        losses = losses + cpo_alpha * nll
    else:
        nll = mx.array(0.0)  # TRL skips the NLL and logs nll_loss = 0
    metrics: dict[str, mx.array] = {"nll_loss": mx.stop_gradient(nll)}
    return LossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=mx.stop_gradient(beta * rc),
        rejected_rewards=mx.stop_gradient(beta * rr),
        metrics=metrics,
    )


def cpo(
    inputs: LossInputs,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    state: LossState | None = None,
    cpo_alpha: float = 1.0,
    alpha: float = 0.0,
) -> LossOutput:
    """CPO: ``-(1-ε)·log σ(β(r_c - r_r)) - ε·log σ(-β(r_c - r_r)) + cpo_alpha·NLL(chosen)``.

    ``r = logπ`` (summed) or the AlphaPO shape when ``alpha ≠ 0``; rewards ``β·r``. Defaults
    are TRL 1.16 ``CPOConfig``'s (``cpo_alpha=1.0``, ``alpha=0.0``). TRL adds the NLL to the
    mean loss; adding it to every pair gives the same mean. Metric ``nll_loss`` (0 when
    ``cpo_alpha=0``, as TRL logs it).
    """
    _no_reference_needed(inputs, "cpo")
    return _cpo_like(
        "cpo",
        inputs,
        inputs.chosen_logps,
        inputs.rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
        cpo_alpha=cpo_alpha,
        alpha=alpha,
        gamma=None,
    )


def simpo(
    inputs: LossInputs,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    state: LossState | None = None,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 0.0,
    alpha: float = 0.0,
) -> LossOutput:
    """SimPO: cDPO-style loss of ``β·(r̄_c - r̄_r) - γ`` on length-averaged log-probs.

    ``simpo_gamma`` (γ) defaults to 0.5 as in TRL 1.16 ``CPOConfig``. ``cpo_alpha`` defaults
    to 0, pure SimPO, the setting TRL 1.16's ``loss_type="alphapo"`` shortcut selects
    (``loss_type="simpo"``, ``cpo_alpha=0.0``); ``CPOConfig``'s own default of 1.0 gives
    CPO-SimPO, which a positive ``cpo_alpha`` selects here. Rewards are ``β·`` the averaged
    log-probs (AlphaPO-shaped when ``alpha ≠ 0``).
    """
    _no_reference_needed(inputs, "simpo")
    avg_c = inputs.chosen_logps / safe_lengths(inputs.chosen_lengths, "simpo", "chosen")
    avg_r = inputs.rejected_logps / safe_lengths(inputs.rejected_lengths, "simpo", "rejected")
    return _cpo_like(
        "simpo",
        inputs,
        avg_c,
        avg_r,
        beta=beta,
        label_smoothing=label_smoothing,
        cpo_alpha=cpo_alpha,
        alpha=alpha,
        gamma=simpo_gamma,
    )


def orpo(
    inputs: LossInputs,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    state: LossState | None = None,
) -> LossOutput:
    """ORPO: ``NLL(chosen) - β·log σ(log odds(y_c) - log odds(y_r))`` on averaged log-probs.

    ``log odds(y) = p̄ - log(1 - exp(p̄))`` with ``p̄`` the length-averaged log-prob (capped
    just below 0, see ``ORPO_MAX_AVG_LOGP``). Metrics: ``nll_loss``, ``log_odds_ratio``
    (mean ``log σ(·)``) and ``log_odds_chosen`` (mean log-odds difference), as TRL 1.16
    logs them.
    """
    _no_reference_needed(inputs, "orpo")
    avg_c = inputs.chosen_logps / safe_lengths(inputs.chosen_lengths, "orpo", "chosen")
    avg_r = inputs.rejected_logps / safe_lengths(inputs.rejected_lengths, "orpo", "rejected")
    pc = mx.minimum(avg_c, ORPO_MAX_AVG_LOGP)
    pr = mx.minimum(avg_r, ORPO_MAX_AVG_LOGP)
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = log_sigmoid(log_odds)
    nll = chosen_nll(inputs, "orpo")
    losses = nll - beta * ratio
    return LossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=mx.stop_gradient(beta * avg_c),
        rejected_rewards=mx.stop_gradient(beta * avg_r),
        metrics={
            "nll_loss": nll,
            "log_odds_ratio": mx.stop_gradient(ratio.mean()),
            "log_odds_chosen": mx.stop_gradient(log_odds.mean()),
        },
    )
