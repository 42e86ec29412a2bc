"""Per-token → per-sequence helpers for WPO weighting and LD-DPO.

The losses only see per-sequence quantities. WPO and LD-DPO need per-token information, so
the model stage calls these pure functions on its per-token arrays and passes the results
on: LD-DPO's sequence log-probs replace the plain sums (for policy and reference alike), WPO's
pair weights go to ``preference_loss(..., policy_weights=...)``.

Per-token arrays are ``(B, T)``, aligned with the completion mask the same way (``T`` may
differ between the chosen and the rejected arrays): ``token_logps[b, t]`` is
``log π(x_{t+1} | x_{≤t})`` of the token that follows position ``t`` (the shifted labels),
and ``mask[b, t]`` is 1 where that token is a completion token, 0 on prompt and padding.
Both follow TRL 1.16 ``trl/trainer/dpo_trainer.py`` (``_compute_loss`` with ``use_weighting``
and ``ld_alpha``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_pref.losses.base import ArrayLike


def _as_2d(x: ArrayLike, name: str) -> mx.array:
    arr = x if isinstance(x, mx.array) else mx.array(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (batch, tokens), got shape {tuple(arr.shape)}")
    return arr.astype(mx.float32)


def log_sum_squared_probs(logits: mx.array, lse: mx.array | None = None) -> mx.array:
    """``log Σ_v p_v²`` per position, i.e. ``logsumexp(2·log_softmax(logits), -1)``.

    Computed as ``logsumexp(2·logits) - 2·logsumexp(logits)`` (TRL's ``lse2 - 2·lse1``), so
    it needs no ``(B, T, V)`` log-softmax copy; ``lse``: ``logsumexp(logits)`` if already at
    hand. Input ``(..., V)``, output ``(...)``; detached.
    """
    logits = mx.stop_gradient(logits).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1) if lse is None else mx.stop_gradient(lse)
    return mx.logsumexp(2.0 * logits, axis=-1) - 2.0 * lse


def wpo_sequence_weights(
    token_logps: ArrayLike, token_log_sum_p2: ArrayLike, mask: ArrayLike
) -> mx.array:
    """WPO per-sequence weight ``exp(mean_t[log p_t - log Σ_v p_v²])`` over completion tokens.

    ``token_log_sum_p2`` is ``log_sum_squared_probs`` of the same positions' logits. This is
    Eq. (2) of the WPO paper as TRL 1.16 computes it (no clamp; TRL 0.28 clamped the pair
    weight at 1). The result is detached.
    """
    lp = _as_2d(token_logps, "token_logps")
    lse = _as_2d(token_log_sum_p2, "token_log_sum_p2")
    m = _as_2d(mask, "mask")
    aligned = (lp - lse) * m
    lengths = mx.maximum(m.sum(axis=1), 1.0)
    return mx.stop_gradient(mx.exp(aligned.sum(axis=1) / lengths))


def wpo_pair_weights(
    chosen_token_logps: ArrayLike,
    chosen_log_sum_p2: ArrayLike,
    chosen_mask: ArrayLike,
    rejected_token_logps: ArrayLike,
    rejected_log_sum_p2: ArrayLike,
    rejected_mask: ArrayLike,
) -> mx.array:
    """WPO pair weights ``w(x, y_c)·w(x, y_r)``: pass them as ``policy_weights``.

    Use the policy's per-token log-probs (not LD-weighted, not the reference's).
    """
    wc = wpo_sequence_weights(chosen_token_logps, chosen_log_sum_p2, chosen_mask)
    wr = wpo_sequence_weights(rejected_token_logps, rejected_log_sum_p2, rejected_mask)
    return wc * wr


def ld_sequence_logps(
    chosen_token_logps: ArrayLike,
    chosen_mask: ArrayLike,
    rejected_token_logps: ArrayLike,
    rejected_mask: ArrayLike,
    ld_alpha: float,
) -> tuple[mx.array, mx.array]:
    """LD-DPO sequence log-probs: full weight on the shared prefix, ``ld_alpha`` on the tail.

    For pair i, ``n_i = min(|y_c|, |y_r|)`` completion tokens are "shared"; the completion
    tokens past position ``n_i`` of the longer response are the verbose tail. Returns
    ``(Σ_shared + α·Σ_tail)`` for chosen and rejected. Apply it to the policy's and the
    reference's per-token log-probs (same masks) and pass the results as
    ``chosen_logps``/``ref_chosen_logps`` etc. ``ld_alpha=1`` gives the plain sums.
    Gradients flow through ``token_logps``.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    mc = _as_2d(chosen_mask, "chosen_mask")
    mr = _as_2d(rejected_mask, "rejected_mask")
    if mc.shape[0] != mr.shape[0]:
        raise ValueError(
            f"LD-DPO needs as many chosen as rejected rows, got {mc.shape[0]} and {mr.shape[0]}"
        )
    shared = mx.minimum(mc.sum(axis=1), mr.sum(axis=1))[:, None]

    def weigh(token_logps: ArrayLike, mask: mx.array, name: str) -> mx.array:
        lp = _as_2d(token_logps, name)
        pos = mx.cumsum(mask, axis=1)  # 1-based index among completion tokens
        in_shared = (pos >= 1) & (pos <= shared)
        weights = mx.where(in_shared, 1.0, ld_alpha) * mask
        return (lp * weights).sum(axis=1)

    return (
        weigh(chosen_token_logps, mc, "chosen_token_logps"),
        weigh(rejected_token_logps, mr, "rejected_token_logps"),
    )
