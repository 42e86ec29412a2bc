"""mlx_pref.losses against the independent float64 NumPy reference in _loss_reference.py.

Precision: MLX computes in float32, the reference in float64. Test inputs are float32 values
on a dyadic grid (multiples of 2^-10 below 64 in magnitude, of 2^-6 below 2^17 for the
large-magnitude cases), so every sum and difference of log-probs is exact in float32 and the
only float32 rounding left is in the final few operations (log σ, exp, β·Δ, divisions):
a few float32 ulps, i.e. relative errors of order 1e-7, inside ``rtol=1e-5``. ``ATOL = 1e-7``
covers values that float32 resolves only as ``1 - σ(x)`` next to 1 (absolute resolution
2^-24 ≈ 6e-8); the few places that need more say why.
"""

from __future__ import annotations

import json
import math

import _loss_reference as ref
import mlx.core as mx
import numpy as np
import pytest

import mlx_pref  # noqa: F401  (loads the BLAS shim before mlx)
from mlx_pref import backend
from mlx_pref import losses as L
from mlx_pref.losses import base as loss_base
from mlx_pref.losses import state as loss_state
from mlx_pref.losses import unpaired as loss_unpaired

RTOL = 1e-5
ATOL = 1e-7

DPO_LOSSES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "sigmoid_norm",
    "apo_zero",
    "apo_down",
    "discopop",
]
F_DIV_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
"""The losses TRL 1.16 allows with a non-default f_divergence_type."""
F_DIVS = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 1.0),
    ("alpha_divergence", 2.0),
]


def grid(x, step):
    """Round to multiples of ``step`` (a power of two) and store as float32."""
    return (np.round(np.asarray(x, np.float64) / step) * step).astype(np.float32)


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def npy(x: mx.array) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(npy(actual), f64(expected), rtol=rtol, atol=atol)


def pairs(seed: int, n: int = 8, large: bool = False):
    """Chosen/rejected policy and reference log-probs plus completion lengths."""
    rng = np.random.default_rng(seed)
    if large:
        step = 2.0**-6
        c = grid(-rng.uniform(10, 60_000, n), step)
        r = grid(-rng.uniform(10, 60_000, n), step)
        rc = grid(np.minimum(c - rng.uniform(-8_000, 8_000, n), -1.0), step)
        rr = grid(np.minimum(r - rng.uniform(-8_000, 8_000, n), -1.0), step)
    else:
        step = 2.0**-10
        c = grid(-rng.uniform(4, 40, n), step)
        r = grid(-rng.uniform(4, 40, n), step)
        rc = grid(c + rng.normal(0, 3, n), step)
        rr = grid(r + rng.normal(0, 3, n), step)
    lc = rng.integers(1, 48, n).astype(np.float32)
    lr = rng.integers(1, 48, n).astype(np.float32)
    return c, r, rc, rr, lc, lr


def tokens(seed: int, n: int = 6, t: int = 12):
    """Per-token log-probs and completion masks (prompt of 1-3 tokens, then completion)."""
    rng = np.random.default_rng(seed)
    logps = grid(-rng.uniform(0.0, 4.0, (n, t)), 2.0**-12)
    mask = np.zeros((n, t), np.float32)
    for b in range(n):
        start = int(rng.integers(1, 4))
        stop = int(rng.integers(start + 1, t + 1))
        mask[b, start:stop] = 1.0
    return logps, mask


# ---------------------------------------------------------------------------------------
# DPO family
# ---------------------------------------------------------------------------------------


def check_dpo_loss(name, f_type="reverse_kl", coef=0.5, seed=1):
    c, r, rc, rr, lc, lr = pairs(seed)
    eps = 1e-3 if name == "exo_pair" else 0.0
    beta = 0.1
    out = L.preference_loss(
        name,
        c,
        r,
        rc,
        rr,
        lc,
        lr,
        beta=beta,
        label_smoothing=eps,
        f_divergence_type=f_type,
        f_alpha_divergence_coef=coef,
    )
    losses, cr, rj = ref.dpo_reference(
        name, c, r, rc, rr, lc, lr, beta=beta, eps=eps, f_type=f_type, coef=coef
    )
    close(out.losses, losses)
    close(out.loss, losses.mean())
    close(out.chosen_rewards, cr)
    close(out.rejected_rewards, rj)


@pytest.mark.parametrize("name", DPO_LOSSES)
def test_dpo_family_matches_reference(name):
    check_dpo_loss(name)


@pytest.mark.parametrize("name", [n for n in DPO_LOSSES if n in F_DIV_LOSSES])
@pytest.mark.parametrize("f_type,coef", F_DIVS[1:])
def test_f_divergences_match_reference(name, f_type, coef):
    check_dpo_loss(name, f_type, coef)


def test_f_divergence_constants_shift_length_normalised_losses():
    # One pair, log-ratios 0 on both sides: every f-score is f'(1) = 0 (TRL 1.16 keeps the
    # constants), so IPO sees a zero margin whatever the lengths.
    for f_type in ["forward_kl", "js_divergence", "alpha_divergence"]:
        out = L.preference_loss(
            "ipo", [-5.0], [-7.0], [-5.0], [-7.0], [3.0], [9.0], beta=0.5, f_divergence_type=f_type
        )
        assert out.loss.item() == pytest.approx(1.0, abs=1e-6)  # (0 - 1/(2β))²


@pytest.mark.parametrize("name", [n for n in [*DPO_LOSSES, "bco_pair"] if n not in F_DIV_LOSSES])
def test_f_divergence_rejected_for_other_losses(name):
    c, r, rc, rr, lc, lr = pairs(17, n=4)
    state = L.LossState() if name == "bco_pair" else None
    with pytest.raises(ValueError, match=f"does not apply to loss '{name}'.*reverse_kl"):
        L.preference_loss(
            name, c, r, rc, rr, lc, lr, beta=0.1, state=state, f_divergence_type="forward_kl"
        )
    # The default is accepted, and an explicit 'reverse_kl' too.
    L.preference_loss(
        name, c, r, rc, rr, lc, lr, beta=0.1, state=state, f_divergence_type="reverse_kl"
    )
    assert state is None or state.state_dict()["running"]  # bco_pair moved δ once
    with pytest.raises(ValueError, match="does not apply to loss 'nca_pair'"):
        L.preference_loss(
            {"sigmoid": 0.5, "nca_pair": 0.5},
            c,
            r,
            rc,
            rr,
            beta=0.1,
            f_divergence_type="js_divergence",
        )


@pytest.mark.parametrize("name", ["sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"])
@pytest.mark.parametrize("eps", [1e-3, 0.1, 0.3])
def test_label_smoothing(name, eps):
    c, r, rc, rr, lc, lr = pairs(2)
    out = L.preference_loss(name, c, r, rc, rr, lc, lr, beta=0.2, label_smoothing=eps)
    losses, _, _ = ref.dpo_reference(name, c, r, rc, rr, beta=0.2, eps=eps)
    close(out.losses, losses)


def test_cdpo_formula_by_hand():
    # One pair with Δ = (−1 − −2) − (−3 − −1) = 3, β = 0.5, ε = 0.25.
    out = L.preference_loss("dpo", [-1.0], [-3.0], [-2.0], [-1.0], beta=0.5, label_smoothing=0.25)
    z = 1.5
    expected = -0.75 * math.log(1 / (1 + math.exp(-z))) - 0.25 * math.log(1 / (1 + math.exp(z)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-1.0)


@pytest.mark.parametrize("name", [*DPO_LOSSES, "bco_pair"])
def test_large_magnitude_log_ratios(name):
    c, r, rc, rr, lc, lr = pairs(3, n=16, large=True)
    beta = 0.125  # exact in binary, so β·Δ is exact too
    eps = 1e-3 if name == "exo_pair" else 0.0
    state = L.LossState() if name == "bco_pair" else None
    z = beta * ((f64(c) - rc) - (f64(r) - rr))
    assert np.abs(z).max() > 500  # really large |βΔ|
    out = L.preference_loss(name, c, r, rc, rr, lc, lr, beta=beta, label_smoothing=eps, state=state)
    delta = state.delta("bco_pair") if state else 0.0
    if state:  # reference δ: one update with the batch-mean reward
        moments = ref.RunningMomentsRef()
        moments.update([np.concatenate([beta * (f64(c) - rc), beta * (f64(r) - rr)]).mean()])
        assert delta == pytest.approx(moments.mean, rel=1e-6)
    losses, _, _ = ref.dpo_reference(name, c, r, rc, rr, lc, lr, beta=beta, eps=eps, delta=delta)
    assert np.all(np.isfinite(npy(out.losses)))
    # bco_pair: δ is a float32-rounded mean of rewards of size ~1e3 (ulp 6e-5 there); it
    # enters every term once, so compare with that absolute slack.
    atol = 1e-4 if name == "bco_pair" else ATOL
    close(out.losses, losses, atol=atol)

    grads = mx.grad(
        lambda x: (
            L.preference_loss(
                name, x, r, rc, rr, lc, lr, beta=beta, label_smoothing=eps, state=state, train=False
            ).loss
        )
    )(mx.array(c))
    assert np.all(np.isfinite(npy(grads)))


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "robust", "discopop"])
@pytest.mark.parametrize("f_type,coef", F_DIVS)
def test_large_magnitude_f_divergences(name, f_type, coef):
    c, r, rc, rr, lc, lr = pairs(4, n=16, large=True)
    kw = {"f_divergence_type": f_type, "f_alpha_divergence_coef": coef}
    out = L.preference_loss(name, c, r, rc, rr, beta=0.125, **kw)
    losses, _, _ = ref.dpo_reference(name, c, r, rc, rr, beta=0.125, f_type=f_type, coef=coef)
    assert np.all(np.isfinite(npy(out.losses))) and np.isfinite(out.loss.item())
    close(out.losses, losses)
    grads = mx.grad(lambda x: L.preference_loss(name, x, r, rc, rr, beta=0.125, **kw).loss)(
        mx.array(c)
    )
    assert not np.any(np.isnan(npy(grads)))


def test_forward_kl_exponent_is_exact_until_float32_overflow():
    # TRL 1.16 evaluates 1 - exp(-l) unclamped: finite down to l ≈ -88.72, inf below.
    # mlx-pref agrees wherever TRL is finite and stays finite below.
    lc = np.array([-1.0, -79.5, -80.5, -84.0, -88.0, -88.5, -88.72, -89.0, -500.0], np.float32)
    scores, _ = L.f_divergence_scores(mx.array(lc), mx.array(lc), "forward_kl")
    expected = 1 - np.exp(-f64(lc))  # TRL's score, in float64
    finite = np.abs(expected) < np.finfo(np.float32).max
    assert finite[:-2].all() and not finite[-2:].any()  # TRL overflows on the last two
    close(npy(scores)[finite], expected[finite])
    assert np.all(np.isfinite(npy(scores)))
    zeros = np.zeros_like(lc)
    out = L.preference_loss(
        "sigmoid", lc, zeros, zeros, zeros, beta=0.5, f_divergence_type="forward_kl"
    )
    assert np.all(np.isfinite(npy(out.losses))) and np.isfinite(out.loss.item())


def test_discopop_wide_tau_large_magnitude():
    # With τ > 1, σ(z/τ)·e^{-z} grows without bound as z → -∞: TRL overflows (inf or NaN),
    # mlx-pref caps it at e^88.7227 and matches TRL wherever TRL's value fits in float32.
    c, r, rc, rr, _, _ = pairs(18, n=16, large=True)
    out = L.preference_loss("discopop", c, r, rc, rr, beta=0.125, discopop_tau=2.0)
    losses, _, _ = ref.dpo_reference("discopop", c, r, rc, rr, beta=0.125, tau=2.0)
    assert np.all(np.isfinite(npy(out.losses))) and np.isfinite(out.loss.item())
    close(out.losses, losses)
    small = pairs(19, n=8)[:4]
    out = L.preference_loss("discopop", *small, beta=0.5, discopop_tau=2.0)
    close(out.losses, ref.dpo_reference("discopop", *small, beta=0.5, tau=2.0)[0])
    g = mx.grad(
        lambda x: L.preference_loss("discopop", x, r, rc, rr, beta=0.125, discopop_tau=2.0).loss
    )(mx.array(c))
    assert not np.any(np.isnan(npy(g)))


def test_sigmoid_gradient_matches_closed_form():
    c, r, rc, rr, _, _ = pairs(5, n=5)
    beta = 0.1

    def loss_fn(ch, rj):
        return L.preference_loss("sigmoid", ch, rj, rc, rr, beta=beta).loss

    gc, gr = mx.grad(loss_fn, argnums=(0, 1))(mx.array(c), mx.array(r))
    z = beta * ((f64(c) - rc) - (f64(r) - rr))
    expected = -beta * ref.sigmoid(-z) / len(c)  # d/dc of mean(-log σ(z))
    close(gc, expected)
    close(gr, -expected)


def test_reference_free():
    c, r, rc, rr, lc, lr = pairs(6)
    for name in ["sigmoid", "ipo", "apo_zero", "aot"]:
        out = L.preference_loss(name, c, r, rc, rr, lc, lr, beta=0.1, reference_free=True)
        losses, cr, rj = ref.dpo_reference(
            name, c, r, rc, rr, lc, lr, beta=0.1, reference_free=True
        )
        close(out.losses, losses)
        # TRL 0.28 logs rewards against the reference even when the loss ignores it.
        close(out.chosen_rewards, 0.1 * (f64(c) - f64(rc)))
        close(out.chosen_rewards, cr)
        close(out.rejected_rewards, rj)
        # The same loss without reference log-probs at all; rewards are then beta * log pi.
        bare = L.preference_loss(name, c, r, None, None, lc, lr, beta=0.1, reference_free=True)
        close(bare.losses, losses)
        close(bare.chosen_rewards, 0.1 * f64(c))


def test_reference_required_unless_reference_free():
    c, r, *_ = pairs(7)
    with pytest.raises(ValueError, match="needs reference log-probs.*reference_free=True"):
        L.preference_loss("sigmoid", c, r, beta=0.1)


def test_rpo_alpha_adds_token_mean_nll():
    logps, mask = tokens(8, n=6)
    c = (logps * mask).sum(1)
    lc = mask.sum(1)
    _, r, rc, rr, _, lr = pairs(8, n=6)
    nll = ref.token_nll(logps, mask)
    out = L.preference_loss("sigmoid", c, r, rc, rr, lc, lr, beta=0.1, rpo_alpha=0.5)
    losses, _, _ = ref.dpo_reference("sigmoid", c, r, rc, rr, beta=0.1, rpo_alpha=0.5, nll=nll)
    close(out.losses, losses)
    close(out.metrics["nll_loss"], nll)
    # An explicit chosen_nll (e.g. under LD-DPO) takes precedence over the derived one.
    out2 = L.preference_loss("sigmoid", c, r, rc, rr, beta=0.1, rpo_alpha=0.5, chosen_nll=2.0)
    losses2, _, _ = ref.dpo_reference("sigmoid", c, r, rc, rr, beta=0.1, rpo_alpha=0.5, nll=2.0)
    close(out2.losses, losses2)


def test_sft_loss_is_chosen_nll():
    logps, mask = tokens(9, n=5)
    c = (logps * mask).sum(1)
    lc = mask.sum(1)
    _, r, rc, rr, _, lr = pairs(9, n=5)
    nll = ref.token_nll(logps, mask)
    out = L.preference_loss("sft", c, r, rc, rr, lc, lr, beta=0.1)
    close(out.losses, np.full(5, nll))
    close(out.loss, nll)
    close(out.chosen_rewards, 0.1 * (f64(c) - rc))
    # No reference needed; the rewards then use a zero reference.
    out_free = L.preference_loss("sft", c, r, None, None, lc, lr, beta=0.1)
    close(out_free.loss, nll)
    close(out_free.chosen_rewards, 0.1 * f64(c))


def test_wpo_weights_scale_each_pair():
    rng = np.random.default_rng(10)
    n, t, v = 4, 7, 11
    logits_c = rng.normal(0, 2, (n, t, v)).astype(np.float32)
    logits_r = rng.normal(0, 2, (n, t, v)).astype(np.float32)
    labels_c = rng.integers(0, v, (n, t))
    labels_r = rng.integers(0, v, (n, t))
    _, mask_c = tokens(10, n=n, t=t)
    _, mask_r = tokens(11, n=n, t=t)
    wc, logp_c = ref.wpo_weights_from_logits(logits_c, labels_c, mask_c)
    wr, logp_r = ref.wpo_weights_from_logits(logits_r, labels_r, mask_r)

    lse_c = L.log_sum_squared_probs(mx.array(logits_c))
    lse_r = L.log_sum_squared_probs(mx.array(logits_r))
    weights = L.wpo_pair_weights(
        logp_c.astype(np.float32), lse_c, mask_c, logp_r.astype(np.float32), lse_r, mask_r
    )
    close(weights, wc * wr, rtol=2e-5)  # mean of ~10 float32 terms, then exp

    c, r, rc, rr, lc, lr = pairs(10, n=n)
    for name in ["sigmoid", "ipo", "hinge"]:
        out = L.preference_loss(name, c, r, rc, rr, lc, lr, beta=0.1, policy_weights=weights)
        losses, _, _ = ref.dpo_reference(name, c, r, rc, rr, lc, lr, beta=0.1, weights=npy(weights))
        close(out.losses, losses)


def test_wpo_rejected_for_aot_and_non_dpo_losses():
    c, r, rc, rr, lc, lr = pairs(12, n=4)
    with pytest.raises(ValueError, match="sorts the batch"):
        L.preference_loss("aot", c, r, rc, rr, beta=0.1, policy_weights=np.ones(4))
    with pytest.raises(ValueError, match="policy_weights is only used by DPO-family"):
        L.preference_loss("kto", c, r, rc, rr, beta=0.1, policy_weights=np.ones(4))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_sequence_logps(alpha):
    logps_c, mask_c = tokens(13, n=6, t=14)
    logps_r, mask_r = tokens(14, n=6, t=10)
    shared = np.minimum(mask_c.sum(1), mask_r.sum(1))
    got_c, got_r = L.ld_sequence_logps(logps_c, mask_c, logps_r, mask_r, alpha)
    close(got_c, ref.ld_reference(logps_c, mask_c, shared, alpha))
    close(got_r, ref.ld_reference(logps_r, mask_r, shared, alpha))
    if alpha == 1.0:
        close(got_c, (f64(logps_c) * mask_c).sum(1))


def test_bco_pair_running_shift_over_steps():
    state = L.LossState()
    moments = ref.RunningMomentsRef()
    beta = 0.2
    for step, n in enumerate([4, 6, 3, 5]):
        c, r, rc, rr, lc, lr = pairs(100 + step, n=n)
        out = L.preference_loss("bco_pair", c, r, rc, rr, lc, lr, beta=beta, state=state)
        rewards = np.concatenate([beta * (f64(c) - rc), beta * (f64(r) - rr)])
        moments.update([rewards.mean()])  # TRL 0.28: one value per step
        assert state.delta("bco_pair") == pytest.approx(moments.mean, rel=1e-6, abs=1e-9)
        # One value per step: TRL's std is inf after the first step (count - 1 = 0).
        assert state.running["bco_pair"].std == pytest.approx(moments.std, rel=1e-5)
        losses, _, _ = ref.dpo_reference("bco_pair", c, r, rc, rr, beta=beta, delta=moments.mean)
        close(out.losses, losses)
        close(out.metrics["delta"], moments.mean)

        # Evaluation reads δ without moving it.
        before = state.state_dict()
        ev = L.preference_loss("bco_pair", r, c, rr, rc, beta=beta, state=state, train=False)
        assert state.state_dict() == before
        ev_losses, _, _ = ref.dpo_reference("bco_pair", r, c, rr, rc, beta=beta, delta=moments.mean)
        close(ev.losses, ev_losses)


def test_bco_pair_needs_state():
    c, r, rc, rr, *_ = pairs(15)
    with pytest.raises(ValueError, match="pass state=LossState"):
        L.preference_loss("bco_pair", c, r, rc, rr, beta=0.1)


def test_dpo_validation_messages():
    c, r, rc, rr, *_ = pairs(16)
    with pytest.raises(ValueError, match="exo_pair.*label_smoothing.*1e-3"):
        L.preference_loss("exo_pair", c, r, rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="robust.*label_smoothing < 0.5"):
        L.preference_loss("robust", c, r, rc, rr, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="did you mean 'forward_kl'"):
        L.preference_loss("sigmoid", c, r, rc, rr, beta=0.1, f_divergence_type="forward-kl")
    with pytest.raises(ValueError, match="paired: it needs as many chosen as rejected rows"):
        L.preference_loss("sigmoid", c, r[:3], rc, rr[:3], beta=0.1)
    with pytest.raises(ValueError, match="ipo.*chosen_lengths"):
        L.preference_loss("ipo", c, r, rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="unknown loss parameter 'simpo_gama'.*'simpo_gamma'"):
        L.preference_loss("simpo", c, r, beta=0.1, simpo_gama=1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.preference_loss("sigmoid", c, r, rc, rr, beta=0.0)


# ---------------------------------------------------------------------------------------
# Reference-free: CPO, SimPO, ORPO
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_cpo(eps, alpha):
    logps, mask = tokens(20, n=6)
    c, lc = (logps * mask).sum(1), mask.sum(1)
    _, r, _, _, _, lr = pairs(20, n=6)
    nll = ref.token_nll(logps, mask)
    out = L.preference_loss(
        "cpo", c, r, None, None, lc, lr, beta=0.1, label_smoothing=eps, alpha=alpha
    )
    losses, cr, rj = ref.cpo_reference(c, r, beta=0.1, eps=eps, alpha=alpha, nll=nll)
    close(out.losses, losses)
    close(out.chosen_rewards, cr)
    close(out.rejected_rewards, rj)
    close(out.metrics["nll_loss"], nll)
    # cpo_alpha=0 drops the NLL term (and no lengths are needed then); TRL logs nll_loss = 0.
    out0 = L.preference_loss("cpo", c, r, beta=0.1, label_smoothing=eps, alpha=alpha, cpo_alpha=0)
    losses0, _, _ = ref.cpo_reference(c, r, beta=0.1, eps=eps, alpha=alpha, cpo_alpha=0.0)
    close(out0.losses, losses0)
    assert out0.metrics["nll_loss"].item() == 0.0


def test_alphapo_reward_is_exact_until_float32_overflow():
    # TRL 1.16: (1 - exp(logp).pow(-α)) / α. With α = 1 it is finite down to logp ≈ -88.72
    # (and mlx-pref must agree there); below, TRL overflows and mlx-pref stays finite.
    c = np.array([-2.0, -79.5, -80.5, -85.0, -88.5, -88.72, -89.5, -300.0], np.float32)
    r = np.full_like(c, -1.0)
    out = L.preference_loss("cpo", c, r, beta=1e-3, alpha=1.0, cpo_alpha=0.0)
    trl_reward = 1 - np.exp(-f64(c))  # p^(-1) = exp(-logp), α = 1
    finite = np.abs(trl_reward) < np.finfo(np.float32).max
    assert finite[:-2].all() and not finite[-2:].any()
    close(npy(out.chosen_rewards)[finite], 1e-3 * trl_reward[finite])
    assert np.all(np.isfinite(npy(out.losses))) and np.all(np.isfinite(npy(out.chosen_rewards)))


@pytest.mark.parametrize("gamma,cpo_alpha,alpha,eps", [(0.5, 0.0, 0.0, 0.0), (1.2, 0.7, 0.3, 0.1)])
def test_simpo(gamma, cpo_alpha, alpha, eps):
    logps, mask = tokens(21, n=6)
    c, lc = (logps * mask).sum(1), mask.sum(1)
    _, r, _, _, _, lr = pairs(21, n=6)
    nll = ref.token_nll(logps, mask)
    out = L.preference_loss(
        "simpo",
        c,
        r,
        None,
        None,
        lc,
        lr,
        beta=2.0,
        label_smoothing=eps,
        simpo_gamma=gamma,
        cpo_alpha=cpo_alpha,
        alpha=alpha,
    )
    losses, cr, rj = ref.simpo_reference(
        c, r, lc, lr, beta=2.0, gamma=gamma, eps=eps, cpo_alpha=cpo_alpha, alpha=alpha, nll=nll
    )
    close(out.losses, losses)
    close(out.chosen_rewards, cr)  # β · length-averaged log-probs
    close(out.rejected_rewards, rj)


def test_orpo():
    logps, mask = tokens(22, n=6)
    c, lc = (logps * mask).sum(1), mask.sum(1)
    _, r, _, _, _, lr = pairs(22, n=6)
    nll = ref.token_nll(logps, mask)
    out = L.preference_loss("orpo", c, r, None, None, lc, lr, beta=0.1)
    losses, cr, rj, ratio, log_odds = ref.orpo_reference(c, r, lc, lr, beta=0.1, nll=nll)
    close(out.losses, losses)
    close(out.loss, losses.mean())
    close(out.chosen_rewards, cr)
    close(out.rejected_rewards, rj)
    close(out.metrics["nll_loss"], nll)
    close(out.metrics["log_odds_ratio"], ratio)
    close(out.metrics["log_odds_chosen"], log_odds, atol=1e-6)  # mean of ± terms ~ 1


def test_orpo_extreme_log_probs_stay_finite():
    # Averaged log-probs of exactly 0 (every token at probability 1) and very negative ones.
    c = np.array([0.0, -1e4, -3.0, -0.5], np.float32)
    r = np.array([-2.0, 0.0, -1e4, -1e-7], np.float32)
    ones = np.ones(4, np.float32)
    out = L.preference_loss("orpo", c, r, None, None, ones, ones, beta=0.1)
    losses, _, _, _, log_odds = ref.orpo_reference(c, r, ones, ones, beta=0.1, nll=-f64(c).mean())
    close(out.losses, losses, rtol=2e-5)  # log(1-e^x) near x = -1e-7 loses a few ulps
    # Only the averaged log-prob of exactly 0 is capped (at -1.18e-38, where TRL's log-odds
    # are infinite); -1e-7 is used as is. Rows of size 1e4 carry float32 spacing 1e-3 into
    # this mean.
    close(out.metrics["log_odds_chosen"], log_odds, atol=1e-3)
    g = mx.grad(lambda x: L.preference_loss("orpo", x, r, None, None, ones, ones, beta=0.1).loss)(
        mx.array(c)
    )
    assert np.all(np.isfinite(npy(g)))


@pytest.mark.parametrize("name", ["cpo", "simpo", "orpo"])
def test_reference_free_losses_large_magnitude(name):
    c, r, _, _, lc, lr = pairs(23, n=16, large=True)
    nll = -f64(c).sum() / f64(lc).sum()
    kw = {"beta": 0.125}
    out = L.preference_loss(name, c, r, None, None, lc, lr, **kw)
    if name == "cpo":
        losses, *_ = ref.cpo_reference(c, r, beta=0.125, nll=nll)
    elif name == "simpo":
        losses, *_ = ref.simpo_reference(c, r, lc, lr, beta=0.125)
    else:
        losses, *_ = ref.orpo_reference(c, r, lc, lr, beta=0.125, nll=nll)
    assert np.all(np.isfinite(npy(out.losses)))
    close(out.losses, losses)


# ---------------------------------------------------------------------------------------
# Unpaired: BCO, KTO
# ---------------------------------------------------------------------------------------


def unpaired(seed: int, nc: int, nr: int):
    rng = np.random.default_rng(seed)
    step = 2.0**-10
    c = grid(-rng.uniform(4, 40, nc), step)
    r = grid(-rng.uniform(4, 40, nr), step)
    rc = grid(c + rng.normal(0, 3, nc), step)
    rr = grid(r + rng.normal(0, 3, nr), step)
    return c, r, rc, rr


def test_bco_running_delta_over_steps_and_eval():
    state = L.LossState()
    moments = ref.RunningMomentsRef()
    beta = 0.1
    for step, (nc, nr) in enumerate([(4, 3), (2, 5), (0, 3), (3, 0), (6, 6)]):
        c, r, rc, rr = unpaired(200 + step, nc, nr)
        out = L.preference_loss("bco", c, r, rc, rr, beta=beta, state=state)
        losses, cr, rj, delta = ref.bco_reference(c, r, rc, rr, beta=beta, running=moments)
        close(out.losses, losses)
        close(out.loss, losses.mean())
        close(out.chosen_rewards, cr)
        close(out.rejected_rewards, rj)
        close(out.metrics["delta"], delta)
        assert state.delta("bco") == pytest.approx(moments.mean, rel=1e-6, abs=1e-12)
        assert state.running["bco"].var == pytest.approx(moments.var, rel=1e-5)
        assert state.running["bco"].count == pytest.approx(moments.count)
        assert state.running["bco"].std == pytest.approx(moments.std, rel=1e-5)

        before = json.dumps(state.state_dict())
        c2, r2, rc2, rr2 = unpaired(300 + step, 3, 2)
        ev = L.preference_loss("bco", c2, r2, rc2, rr2, beta=beta, state=state, train=False)
        assert json.dumps(state.state_dict()) == before
        ev_losses, *_ = ref.bco_reference(c2, r2, rc2, rr2, beta=beta, running=moments, train=False)
        close(ev.losses, ev_losses)


def test_bco_state_dict_round_trip_resumes_exactly():
    state = L.LossState()
    for step in range(3):
        c, r, rc, rr = unpaired(400 + step, 4, 4)
        L.preference_loss("bco", c, r, rc, rr, beta=0.1, state=state)
        L.preference_loss("bco_pair", c, r, rc, rr, beta=0.1, state=state)
    saved = json.loads(json.dumps(state.state_dict()))
    assert set(saved["running"]) == {"bco", "bco_pair"}
    assert all(isinstance(v, float) for m in saved["running"].values() for v in m.values())
    resumed = L.LossState()
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == state.state_dict()
    c, r, rc, rr = unpaired(500, 5, 2)
    a = L.preference_loss("bco", c, r, rc, rr, beta=0.1, state=state)
    b = L.preference_loss("bco", c, r, rc, rr, beta=0.1, state=resumed)
    assert resumed.state_dict() == state.state_dict()
    np.testing.assert_array_equal(npy(a.losses), npy(b.losses))


def test_bco_udm_weights_scale_undesirable_rows():
    state, moments = L.LossState(), ref.RunningMomentsRef()
    c, r, rc, rr = unpaired(600, 4, 5)
    w = np.array([0.5, 1.0, 2.0, 10.0, 3.25], np.float32)
    out = L.preference_loss("bco", c, r, rc, rr, beta=0.1, state=state, udm_weights=w)
    losses, *_ = ref.bco_reference(c, r, rc, rr, beta=0.1, running=moments, udm=f64(w))
    close(out.losses, losses)
    with pytest.raises(ValueError, match="one weight per undesirable row"):
        L.preference_loss("bco", c, r, rc, rr, beta=0.1, state=state, udm_weights=w[:2])


def test_bco_large_magnitude():
    c, r, rc, rr, *_ = pairs(601, n=16, large=True)
    state, moments = L.LossState(), ref.RunningMomentsRef()
    out = L.preference_loss("bco", c, r[:11], rc, rr[:11], beta=0.125, state=state)
    losses, *_ = ref.bco_reference(c, r[:11], rc, rr[:11], beta=0.125, running=moments)
    assert np.all(np.isfinite(npy(out.losses)))
    # δ is a mean of rewards of size ~1e3 carried in float32 into the loss (ulp 6e-5).
    close(out.losses, losses, atol=1e-4)


def test_running_moments_cross_rank_reduction(monkeypatch):
    """With two ranks, every rank must end with the statistics of the concatenated batch."""
    rank_b = np.array([0.25, -1.5, 2.0], np.float32)
    seen = {}

    class TwoRanks:
        def size(self):
            return 2

    def fake_all_sum(x, group):
        arr = np.asarray(x, np.float64)
        if arr.shape == (2,):  # [sum, count]
            seen["mean"] = (arr[0] + rank_b.sum()) / (arr[1] + rank_b.size)
            return mx.array(arr + [rank_b.sum(), rank_b.size], dtype=mx.float32)
        return mx.array(arr + ((f64(rank_b) - seen["mean"]) ** 2).sum(), dtype=mx.float32)

    monkeypatch.setattr(loss_state, "all_sum", fake_all_sum)
    rank_a = np.array([1.0, 0.5, -0.75, 3.0], np.float32)
    moments = L.RunningMoments()
    moments.update(mx.array(rank_a), group=TwoRanks())
    expected = ref.RunningMomentsRef()
    expected.update(np.concatenate([rank_a, rank_b]))
    assert moments.mean == pytest.approx(expected.mean, rel=1e-6)
    assert moments.var == pytest.approx(expected.var, rel=1e-6)
    assert moments.count == pytest.approx(expected.count)


def test_running_moments_initial_values_and_std():
    moments, expected = L.RunningMoments(), ref.RunningMomentsRef()
    assert (moments.mean, moments.var, moments.count, moments.std) == (0.0, 1.0, 1e-24, 1.0)
    for batch in ([0.5], [1.0, -2.0, 0.25], [3.0, 3.0]):
        moments.update(mx.array(batch))
        expected.update(batch)
        assert moments.std == pytest.approx(expected.std, rel=1e-6)
        assert moments.mean == pytest.approx(expected.mean, rel=1e-6)


def test_single_process_needs_no_reduction():
    assert loss_base.reduction_group() is None
    x = mx.array([1.0, 2.0])
    assert backend.all_sum(x, None) is x


@pytest.mark.parametrize("with_kl", [False, True])
def test_kto(with_kl):
    c, r, rc, rr = unpaired(700, 5, 3)
    rng = np.random.default_rng(701)
    kl_p = grid(-rng.uniform(4, 40, 8), 2.0**-10) if with_kl else None
    kl_r = grid(f64(kl_p) - rng.uniform(0, 3, 8), 2.0**-10) if with_kl else None
    out = L.preference_loss(
        "kto",
        c,
        r,
        rc,
        rr,
        beta=0.1,
        desirable_weight=1.33,
        undesirable_weight=0.75,
        policy_kl_logps=kl_p,
        ref_kl_logps=kl_r,
    )
    losses, cr, rj, kl = ref.kto_reference(
        c, r, rc, rr, beta=0.1, kl_policy=kl_p, kl_ref=kl_r, wd=1.33, wu=0.75
    )
    assert (kl > 0) == with_kl  # without KL log-probs the KL term is 0
    close(out.losses, losses)
    close(out.loss, losses.mean())
    close(out.chosen_rewards, cr)
    close(out.rejected_rewards, rj)
    close(out.metrics["kl"], kl)


def test_kto_kl_is_clamped_and_detached():
    c, r, rc, rr = unpaired(702, 3, 3)
    kl_p = np.array([-10.0, -12.0], np.float32)
    kl_r = np.array([-5.0, -6.0], np.float32)  # mean log-ratio −5.5 → clamped to 0
    out = L.preference_loss("kto", c, r, rc, rr, beta=0.1, policy_kl_logps=kl_p, ref_kl_logps=kl_r)
    assert out.metrics["kl"].item() == 0.0

    def loss_of_kl(x):
        return L.preference_loss(
            "kto", c, r, rc, rr, beta=0.1, policy_kl_logps=x, ref_kl_logps=kl_p - 3
        ).loss

    np.testing.assert_array_equal(npy(mx.grad(loss_of_kl)(mx.array(kl_p))), [0.0, 0.0])


def test_kto_kl_cross_rank_mean(monkeypatch):
    class TwoRanks:
        def size(self):
            return 2

    other_rank_kl = 3.0
    monkeypatch.setattr(loss_unpaired, "all_sum", lambda x, group: x + other_rank_kl)
    c, r, rc, rr = unpaired(703, 2, 2)
    kl_p = np.array([-4.0, -6.0], np.float32)
    kl_r = np.array([-5.0, -6.0], np.float32)  # this rank: 0.5
    out = L.preference_loss(
        "kto", c, r, rc, rr, beta=0.1, policy_kl_logps=kl_p, ref_kl_logps=kl_r, group=TwoRanks()
    )
    assert out.metrics["kl"].item() == pytest.approx((0.5 + 3.0) / 2)


def test_apo_zero_unpaired():
    c, r, rc, rr = unpaired(704, 4, 6)
    out = L.preference_loss(
        "apo_zero_unpaired", c, r, rc, rr, beta=0.3, desirable_weight=2.0, undesirable_weight=0.5
    )
    close(out.losses, ref.apo_zero_unpaired_reference(c, r, rc, rr, beta=0.3, wd=2.0, wu=0.5))
    assert out.metrics["kl"].item() == 0.0  # TRL computes no KL here and logs 0


def test_unpaired_empty_sides():
    c, r, rc, rr = unpaired(705, 0, 4)
    out = L.preference_loss("kto", c, r, rc, rr, beta=0.1)
    losses, *_ = ref.kto_reference(c, r, rc, rr, beta=0.1)
    close(out.loss, losses.mean())
    assert out.chosen_rewards.shape == (0,)
    with pytest.raises(ValueError, match="empty batch"):
        L.preference_loss("kto", [], [], [], [], beta=0.1)


def test_unpaired_and_sft_large_magnitude():
    c, r, rc, rr, lc, _ = pairs(707, n=16, large=True)
    kl_p, kl_r = c[:8], rc[:8]
    out = L.preference_loss(
        "kto", c, r[:9], rc, rr[:9], beta=0.125, policy_kl_logps=kl_p, ref_kl_logps=kl_r
    )
    losses, *_ = ref.kto_reference(c, r[:9], rc, rr[:9], beta=0.125, kl_policy=kl_p, kl_ref=kl_r)
    assert np.all(np.isfinite(npy(out.losses)))
    # z is a float32 mean of log-ratios of size ~1e3-1e4 (spacing up to 1e-3), times β.
    close(out.losses, losses, atol=1e-4)
    out = L.preference_loss("apo_zero_unpaired", c, r[:5], rc, rr[:5], beta=0.125)
    close(out.losses, ref.apo_zero_unpaired_reference(c, r[:5], rc, rr[:5], beta=0.125))
    out = L.preference_loss("sft", c, r, rc, rr, lc, lc, beta=0.125)
    close(out.loss, -f64(c).sum() / f64(lc).sum())


def test_paired_batch_feeds_unpaired_losses():
    """A paired batch passed to bco/kto is chosen → desirable, rejected → undesirable."""
    c, r, rc, rr, *_ = pairs(706, n=5)
    out = L.preference_loss("kto", c, r, rc, rr, beta=0.1)
    losses, *_ = ref.kto_reference(c, r, rc, rr, beta=0.1)
    close(out.losses, losses)


# ---------------------------------------------------------------------------------------
# Registry, parsing, weighted combinations
# ---------------------------------------------------------------------------------------


def test_registry_contents():
    names = L.loss_names()
    for expected in [*DPO_LOSSES, "bco_pair", "sft", "cpo", "simpo", "orpo", "bco", "kto"]:
        assert expected in names
    assert L.get_loss("dpo").name == "sigmoid"
    assert L.get_loss("aot_pair").name == "aot_unpaired"
    assert L.get_loss(" SimPO ").name == "simpo"
    assert L.get_loss("bco").paired is False and L.get_loss("kto").paired is False
    assert L.get_loss("sigmoid").paired is True
    assert L.get_loss("simpo").needs_reference is False
    assert L.get_loss("cpo").needs_reference is False
    assert L.get_loss("kto").needs_reference is True
    assert L.get_loss("simpo").params["simpo_gamma"] == 0.5
    assert L.get_loss("discopop").params["discopop_tau"] == 0.05
    assert L.get_loss("sigmoid").params["rpo_alpha"] is None
    assert L.get_loss("sigmoid").params["f_divergence_type"] == "reverse_kl"
    assert L.get_loss("cpo").params["cpo_alpha"] == 1.0
    assert L.get_loss("kto").params == {"desirable_weight": 1.0, "undesirable_weight": 1.0}
    rows = L.describe_losses()
    assert [row["name"] for row in rows] == names
    for row in rows:
        assert row["formula"] and row["paper"] and row["trl"].startswith("TRL 1.1")
        assert row["data"] in ("paired", "unpaired")
    trl = {row["name"]: row["trl"] for row in rows}
    assert trl["bco"] == "TRL 1.13 trl/experimental/bco/bco_trainer.py"
    assert trl["kto"] == "TRL 1.16 trl/trainer/kto_trainer.py"
    assert trl["simpo"].startswith("TRL 1.16 trl/experimental/cpo/cpo_trainer.py")
    assert trl["hinge"].startswith("TRL 1.16 trl/trainer/dpo_trainer.py")
    assert "label_smoothing (cDPO)" in trl["sigmoid"] and "running shift" in trl["bco_pair"]
    assert all("rpo_alpha: TRL 0.28" in trl[n] for n in [*DPO_LOSSES, "bco_pair", "sft"])
    arxiv = {row["name"]: row["arxiv"] for row in rows}
    assert arxiv["sigmoid"] == "2305.18290"
    assert arxiv["simpo"] == "2405.14734"
    assert arxiv["bco"] == "2404.04656"
    assert arxiv["kto"] == "2402.01306"
    assert arxiv["orpo"] == "2403.07691"


def test_parse_loss_strings_and_aliases():
    assert L.parse_loss("sigmoid") == {"sigmoid": 1.0}
    assert L.parse_loss("dpo") == {"sigmoid": 1.0}
    assert L.parse_loss("aot_pair") == {"aot_unpaired": 1.0}
    assert L.parse_loss({"dpo": 0.7, "bco": 0.3}) == {"sigmoid": 0.7, "bco": 0.3}
    weights = L.parse_loss({"sigmoid": 0.2, "ipo": 0.2, "hinge": 0.2, "kto": 0.2, "sft": 0.2})
    assert sum(weights.values()) == pytest.approx(1.0)


def test_parse_loss_errors():
    with pytest.raises(L.UnknownLossError) as err:
        L.parse_loss("sigmod")
    message = str(err.value)
    assert "did you mean 'sigmoid'" in message and "valid losses: sigmoid, hinge" in message
    assert "\n" not in message
    assert isinstance(err.value, ValueError)
    with pytest.raises(L.UnknownLossError, match="did you mean 'aot_unpaired'"):
        L.parse_loss("aot_pairr")  # closest is the alias; the message names its target
    with pytest.raises(ValueError, match=r"for a single loss write `loss: simpo`"):
        L.parse_loss({"simpo": 1.0})
    with pytest.raises(ValueError, match=r"must sum to 1 \(±1e-06\), got 0.9"):
        L.parse_loss({"sigmoid": 0.6, "ipo": 0.3})
    L.parse_loss({"sigmoid": 0.6, "ipo": 0.4 + 5e-7})  # within tolerance
    with pytest.raises(ValueError, match="at most 5 losses, got 6"):
        L.parse_loss({n: 1 / 6 for n in ["sigmoid", "ipo", "hinge", "robust", "kto", "sft"]})
    with pytest.raises(ValueError, match="must be > 0"):
        L.parse_loss({"sigmoid": 1.2, "ipo": -0.2})
    with pytest.raises(ValueError, match="appears twice"):
        L.parse_loss({"dpo": 0.5, "sigmoid": 0.5})
    with pytest.raises(L.UnknownLossError, match="unknown loss 'dpoo'"):
        L.parse_loss({"dpoo": 0.5, "ipo": 0.5})
    with pytest.raises(ValueError, match="must be a number"):
        L.parse_loss({"sigmoid": "0.5", "ipo": 0.5})


def test_weighted_combination_is_weighted_sum():
    c, r, rc, rr, lc, lr = pairs(800, n=6)
    common = {"beta": 0.1, "rpo_alpha": 0.5, "simpo_gamma": 0.8}
    combo = {"sigmoid": 0.4, "ipo": 0.1, "simpo": 0.2, "kto": 0.2, "bco": 0.1}
    state_combo, state_parts = L.LossState(), L.LossState()
    out = L.preference_loss(combo, c, r, rc, rr, lc, lr, state=state_combo, **common)
    parts = {
        name: L.preference_loss(name, c, r, rc, rr, lc, lr, state=state_parts, **common)
        for name in combo
    }
    expected = sum(w * parts[n].loss.item() for n, w in combo.items())
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.losses is None
    close(out.chosen_rewards, npy(parts["sigmoid"].chosen_rewards))  # first listed loss
    for name in combo:
        close(out.metrics[f"{name}/loss"], npy(parts[name].loss))
    # Clashing metric names get the loss name as prefix; unique ones keep theirs.
    assert "sigmoid/nll_loss" in out.metrics and "ipo/nll_loss" in out.metrics
    assert "kl" in out.metrics and "delta" in out.metrics
    assert state_combo.state_dict() == state_parts.state_dict()
    # Gradients flow through the combination.
    g = mx.grad(
        lambda x: L.preference_loss(combo, x, r, rc, rr, lc, lr, state=L.LossState(), **common).loss
    )(mx.array(c))
    assert np.all(np.isfinite(npy(g))) and np.abs(npy(g)).sum() > 0


def test_data_keywords_must_be_used():
    c, r, rc, rr, *_ = pairs(801, n=3)
    with pytest.raises(ValueError, match="udm_weights is only used by bco"):
        L.preference_loss("sigmoid", c, r, rc, rr, beta=0.1, udm_weights=np.ones(3))
    with pytest.raises(ValueError, match="policy_kl_logps is only used by kto"):
        L.preference_loss(
            "bco", c, r, rc, rr, beta=0.1, state=L.LossState(), policy_kl_logps=c, ref_kl_logps=rc
        )


# ---------------------------------------------------------------------------------------
# β schedules
# ---------------------------------------------------------------------------------------


def test_beta_schedules():
    b0, b1, total = 0.1, 0.01, 101
    for kind in L.BETA_SCHEDULES:
        assert L.beta_at(0, total, b0, b1, kind) == pytest.approx(b0)
    assert L.beta_at(100, total, b0, b1, "constant") == pytest.approx(b0)
    for kind in ["linear", "cosine", "exponential"]:
        assert L.beta_at(100, total, b0, b1, kind) == pytest.approx(b1, rel=1e-12)
        assert L.beta_at(500, total, b0, b1, kind) == pytest.approx(b1, rel=1e-12)
    assert L.beta_at(50, total, b0, b1, "constant") == pytest.approx(0.1)
    assert L.beta_at(50, total, b0, b1, "linear") == pytest.approx(0.055)
    assert L.beta_at(50, total, b0, b1, "cosine") == pytest.approx(0.055)
    assert L.beta_at(50, total, b0, b1, "exponential") == pytest.approx(math.sqrt(0.001))
    assert L.beta_at(25, total, b0, b1, "linear") == pytest.approx(0.0775)
    assert L.beta_at(25, total, b0, b1, "cosine") == pytest.approx(0.01 + 0.09 * 0.8535533906)
    assert L.beta_at(25, total, b0, b1, "exponential") == pytest.approx(0.1 * 0.1**0.25)
    assert L.beta_at(7, total, b0, None, "linear") == pytest.approx(0.1)  # no beta_end
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        L.beta_at(0, total, b0, b1, "cosin")
    with pytest.raises(ValueError, match="beta_end must be > 0"):
        L.beta_at(0, total, b0, 0.0, "exponential")


# ---------------------------------------------------------------------------------------
# UDM density-ratio classifier
# ---------------------------------------------------------------------------------------


def objective_gradient(clf, xd, xu, C=1.0, balanced=True):
    """Gradient of ½‖w‖² + C·Σ sᵢ·log(1+exp(-yᵢ(w·xᵢ+b))) at the fitted parameters."""
    x = np.concatenate([xd, xu])
    y = np.concatenate([np.ones(len(xd)), -np.ones(len(xu))])
    n = len(x)
    s = (
        np.concatenate([np.full(len(xd), n / (2 * len(xd))), np.full(len(xu), n / (2 * len(xu)))])
        if balanced
        else np.ones(n)
    )
    m = y * (x @ clf.coef + clf.intercept)
    coeff = C * s * y * ref.sigmoid(-m)
    return np.concatenate([clf.coef - x.T @ coeff, [-coeff.sum()]])


def test_udm_one_dimensional_closed_form():
    # Desirable prompts at +1, undesirable at −1: by symmetry b = 0 and w solves
    # w = 2·σ(−w) (stationarity of ½w² + 2·log(1 + e^{−w})).
    lo, hi = 0.0, 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - 2 * ref.sigmoid(-mid) < 0 else (lo, mid)
    w = (lo + hi) / 2
    clf = L.fit_density_ratio_classifier([[1.0]], [[-1.0]])
    assert clf.coef[0] == pytest.approx(w, rel=1e-8)
    assert clf.intercept == pytest.approx(0.0, abs=1e-10)
    p = ref.sigmoid(-w)  # P(desirable | x = −1)
    raw = L.density_ratio_weights(clf, [[-1.0]], min_density_ratio=0.1)
    assert raw.item() == pytest.approx(p / (1 - p + 1e-8), rel=1e-6)
    q = ref.sigmoid(-2 * w)  # at x = −2 the ratio e^{−2w} ≈ 0.26 is below min_density_ratio
    clipped = L.density_ratio_weights(clf, [[-2.0]])  # default min_density_ratio 0.5
    assert q / (1 - q) < 0.5 and clipped.item() == pytest.approx(0.5)
    far = L.density_ratio_weights(clf, [[10.0]])
    assert far.item() == pytest.approx(10.0)  # max_density_ratio


def test_udm_balanced_class_weight():
    # Identical prompts on both sides, 3 desirable vs 1 undesirable: with balanced class
    # weights the classifier must not learn the 3:1 prior (P = 1/2), without it P = 3/4.
    xd, xu = np.zeros((3, 2)), np.zeros((1, 2))
    balanced = L.fit_density_ratio_classifier(xd, xu)
    assert balanced.predict_proba([[0.0, 0.0]])[0] == pytest.approx(0.5, abs=1e-9)
    assert L.density_ratio_weights(balanced, xu).item() == pytest.approx(1.0, rel=1e-6)
    plain = L.fit_density_ratio_classifier(xd, xu, class_weight=None)
    assert plain.predict_proba([[0.0, 0.0]])[0] == pytest.approx(0.75, abs=1e-9)


@pytest.mark.parametrize("separable", [True, False])
def test_udm_fit_reaches_the_optimum(separable):
    rng = np.random.default_rng(900)
    shift = 4.0 if separable else 0.3
    xd = rng.normal(0, 1, (60, 5)) + shift
    xu = rng.normal(0, 1, (40, 5)) - shift
    clf = L.fit_density_ratio_classifier(xd, xu)
    grad = objective_gradient(clf, xd, xu)
    assert np.abs(grad).max() < 1e-7
    accuracy = clf.score(np.concatenate([xd, xu]), np.r_[np.ones(60), np.zeros(40)])
    if separable:
        assert accuracy == 1.0
    else:
        assert 0.5 < accuracy < 0.9
    weights = npy(L.density_ratio_weights(clf, xu))
    prob = ref.sigmoid(xu @ clf.coef + clf.intercept)
    np.testing.assert_allclose(
        weights, np.clip(prob / (1 - prob + 1e-8), 0.5, 10.0), rtol=1e-6, atol=0
    )
    if separable:
        assert np.all(weights == np.float32(0.5))  # undesirable prompts look undesirable
    # JSON round trip gives the same predictions.
    again = L.DensityRatioClassifier.from_state_dict(json.loads(json.dumps(clf.state_dict())))
    np.testing.assert_array_equal(again.predict_proba(xu), clf.predict_proba(xu))


def test_udm_more_dimensions_than_prompts():
    rng = np.random.default_rng(901)
    xd, xu = rng.normal(0.5, 1, (12, 40)), rng.normal(-0.5, 1, (9, 40))
    clf = L.fit_density_ratio_classifier(xd, xu)
    assert np.abs(objective_gradient(clf, xd, xu)).max() < 1e-7


def test_udm_weights_feed_bco():
    rng = np.random.default_rng(902)
    xd, xu = rng.normal(1, 1, (30, 3)), rng.normal(-1, 1, (30, 3))
    clf = L.fit_density_ratio_classifier(xd, xu)
    c, r, rc, rr = unpaired(903, 4, 3)
    batch_embeddings = rng.normal(0, 1.5, (3, 3))
    w = L.density_ratio_weights(clf, batch_embeddings)
    out = L.preference_loss("bco", c, r, rc, rr, beta=0.1, state=L.LossState(), udm_weights=w)
    losses, *_ = ref.bco_reference(
        c, r, rc, rr, beta=0.1, running=ref.RunningMomentsRef(), udm=npy(w)
    )
    close(out.losses, losses)


def test_udm_helpers():
    idx = L.sample_prompt_indices(10, 4, seed=0)
    assert idx.shape == (4,) and idx.min() >= 0 and idx.max() < 10
    np.testing.assert_array_equal(idx, L.sample_prompt_indices(10, 4, seed=0))
    assert L.sample_prompt_indices(3, 1024, seed=1).shape == (3,)
    hidden = mx.array(np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2))
    pooled = L.mean_pool(hidden, [[1, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(npy(pooled), [[1.0, 2.0], [10.0, 11.0]])
    with pytest.raises(ValueError, match="at least one desirable and one undesirable"):
        L.fit_density_ratio_classifier(np.zeros((0, 2)), np.zeros((3, 2)))
