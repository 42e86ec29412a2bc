"""Unpaired losses: BCO, KTO and KTO's APO-zero variant.

Chosen rows are the desirable completions and rejected rows the undesirable ones; the two
sides may differ in size and either may be empty. A paired batch is used as is (chosen →
desirable, rejected → undesirable), which is how paired data feeds these losses. An empty
side issues no MLX op at all (``base.on_rows``): MLX's CUDA backend crashes on fused
kernels over zero-size arrays.

* ``bco`` follows TRL 1.13 ``trl/experimental/bco/bco_trainer.py`` (``BCOTrainer.bco_loss``,
  ``RunningMoments``, ``_get_udm_weight``; defaults from ``bco_config.py``). TRL 1.13 is the
  last release with BCOTrainer; it was removed in 1.14.
* ``kto`` and ``apo_zero_unpaired`` follow TRL 1.16 ``trl/trainer/kto_trainer.py``
  (``KTOTrainer._compute_loss``; defaults from ``kto_config.py``).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_pref.backend import all_sum
from mlx_pref.losses.base import (
    LossInputs,
    LossOutput,
    concat_rows,
    log_sigmoid,
    on_rows,
    reduction_group,
)
from mlx_pref.losses.state import LossState


def _logratios(inputs: LossInputs, name: str) -> tuple[mx.array, mx.array]:
    if inputs.ref_chosen_logps is None or inputs.ref_rejected_logps is None:
        raise ValueError(
            f"loss '{name}' needs reference log-probs: pass ref_chosen_logps and ref_rejected_logps"
        )
    if inputs.ref_chosen_logps.shape != inputs.chosen_logps.shape or (
        inputs.ref_rejected_logps.shape != inputs.rejected_logps.shape
    ):
        raise ValueError(
            f"loss '{name}': reference log-probs must match the policy log-probs' shapes"
        )
    if inputs.chosen_logps.shape[0] + inputs.rejected_logps.shape[0] == 0:
        raise ValueError(f"loss '{name}' got an empty batch")
    return (
        on_rows(mx.subtract, inputs.chosen_logps, inputs.ref_chosen_logps),
        on_rows(mx.subtract, inputs.rejected_logps, inputs.ref_rejected_logps),
    )


def _rewards(logratios: mx.array, beta: float) -> mx.array:
    return on_rows(lambda x: beta * x, logratios)


def bco(
    inputs: LossInputs,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    state: LossState | None = None,
) -> LossOutput:
    """BCO: ``-log σ(r_d - δ)`` for desirable rows, ``-w·log σ(-(r_u - δ))`` for undesirable ones.

    As TRL 1.13 ``BCOTrainer.bco_loss``: ``r = β·(logπ - logπ_ref)``; δ is the running mean
    of every reward seen in training: with ``train=True`` the batch's rewards ``cat(r_d, r_u)``
    (detached, reduced across ranks) update ``state`` before the loss is computed; with
    ``train=False`` (TRL's ``do_train=False`` in evaluation) δ is only read. ``w`` are the UDM
    density-ratio weights (``udm_weights``, one per undesirable row; 1 when not given). The
    loss is the mean over all rows. Metric ``delta`` (TRL's name).
    """
    lc, lr = _logratios(inputs, "bco")
    if state is None:
        raise ValueError(
            "loss 'bco' keeps a running reward mean: pass state=LossState() and reuse it across steps"
        )
    rc, rr = _rewards(lc, beta), _rewards(lr, beta)
    if inputs.train:
        state.moments("bco").update(concat_rows([rc, rr]), group=inputs.group)
    delta = state.delta("bco")
    chosen_losses = on_rows(lambda r: -log_sigmoid(r - delta), rc)
    rejected_losses = on_rows(lambda r: -log_sigmoid(-(r - delta)), rr)
    metrics = {"delta": mx.array(delta, dtype=mx.float32)}
    if inputs.extra("udm_weights") is not None:
        weights = inputs.extra("udm_weights")
        if weights.shape != rejected_losses.shape:
            raise ValueError(
                f"udm_weights must have one weight per undesirable row ({rr.shape[0]}), "
                f"got shape {tuple(weights.shape)}"
            )
        if weights.size:
            weights = mx.stop_gradient(weights)
            rejected_losses = rejected_losses * weights
            metrics["bco/udm_weight_mean"] = weights.mean()
    losses = concat_rows([chosen_losses, rejected_losses])
    return LossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=on_rows(mx.stop_gradient, rc),
        rejected_rewards=on_rows(mx.stop_gradient, rr),
        metrics=metrics,
    )


def kto_kl(inputs: LossInputs) -> mx.array:
    """KTO's reference point: ``max(0, mean(logπ(y'|x) - logπ_ref(y'|x)))``, detached.

    ``y'`` are mismatched completions (each prompt paired with another row's completion),
    given as ``policy_kl_logps`` / ``ref_kl_logps`` (summed log-probs). Under data parallelism
    the per-rank means are averaged across ranks before clamping, as TRL 1.16's
    ``gather_for_metrics(kl).mean().clamp(min=0)``. Without KL log-probs the KL term is 0.
    """
    if inputs.extra("policy_kl_logps") is None and inputs.extra("ref_kl_logps") is None:
        return mx.array(0.0)
    if inputs.extra("policy_kl_logps") is None or inputs.extra("ref_kl_logps") is None:
        raise ValueError(
            "pass both policy_kl_logps and ref_kl_logps for the KTO KL term, or neither"
        )
    if (
        inputs.extra("policy_kl_logps").shape != inputs.extra("ref_kl_logps").shape
        or inputs.extra("ref_kl_logps").size == 0
    ):
        raise ValueError("policy_kl_logps and ref_kl_logps must be non-empty and of the same shape")
    kl = (inputs.extra("policy_kl_logps") - inputs.extra("ref_kl_logps")).mean()
    group = reduction_group(inputs.group)
    if group is not None:
        kl = all_sum(kl, group) / group.size()
    return mx.stop_gradient(mx.maximum(kl, 0.0))


def _weighted(
    inputs: LossInputs,
    chosen_losses: mx.array,
    rejected_losses: mx.array,
    rc: mx.array,
    rr: mx.array,
    desirable_weight: float,
    undesirable_weight: float,
    metrics: dict[str, mx.array],
) -> LossOutput:
    losses = concat_rows(
        [
            on_rows(lambda x: desirable_weight * x, chosen_losses),
            on_rows(lambda x: undesirable_weight * x, rejected_losses),
        ]
    )
    return LossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=on_rows(mx.stop_gradient, rc),
        rejected_rewards=on_rows(mx.stop_gradient, rr),
        metrics=metrics,
    )


def kto(
    inputs: LossInputs,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    state: LossState | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO: ``λ_D·(1 - σ(β(l_d - z)))`` and ``λ_U·(1 - σ(β(z - l_u)))``, mean over all rows.

    ``l = logπ - logπ_ref``; ``z`` is the detached KL estimate from ``kto_kl`` (0 when no KL
    log-probs are passed). Rewards ``β·l``; metric ``kl``. ``desirable_weight`` and
    ``undesirable_weight`` default to 1.0 as in TRL 1.16 ``KTOConfig``.
    """
    lc, lr = _logratios(inputs, "kto")
    kl = kto_kl(inputs)
    chosen_losses = on_rows(lambda x: 1.0 - mx.sigmoid(beta * (x - kl)), lc)
    rejected_losses = on_rows(lambda x: 1.0 - mx.sigmoid(beta * (kl - x)), lr)
    return _weighted(
        inputs,
        chosen_losses,
        rejected_losses,
        _rewards(lc, beta),
        _rewards(lr, beta),
        desirable_weight,
        undesirable_weight,
        {"kl": kl},
    )


def apo_zero_unpaired(
    inputs: LossInputs,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    state: LossState | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Unpaired APO-zero: ``λ_D·(1 - σ(βl_d))`` and ``λ_U·σ(βl_u)`` (KTOTrainer, no KL term).

    TRL 1.16 computes no KL estimate for this loss and logs ``kl = 0``; so does this."""
    lc, lr = _logratios(inputs, "apo_zero_unpaired")
    chosen_losses = on_rows(lambda x: 1.0 - mx.sigmoid(beta * x), lc)
    rejected_losses = on_rows(lambda x: mx.sigmoid(beta * x), lr)
    return _weighted(
        inputs,
        chosen_losses,
        rejected_losses,
        _rewards(lc, beta),
        _rewards(lr, beta),
        desirable_weight,
        undesirable_weight,
        {"kl": mx.array(0.0)},
    )
