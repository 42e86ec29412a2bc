"""Independent float64 NumPy reference for the preference losses.

Written from TRL's definitions, term by term as TRL writes them, and never calling mlx_pref:
TRL 1.16 trl/trainer/dpo_trainer.py (DPO family, WPO, LD-DPO), trl/trainer/kto_trainer.py,
trl/experimental/cpo/cpo_trainer.py and trl/experimental/orpo/orpo_trainer.py; TRL 1.13
trl/experimental/bco/bco_trainer.py (BCO, RunningMoments, UDM weights); TRL 0.28
dpo_trainer.py for what TRL 1.x dropped (cDPO smoothing on sigmoid, reference_free,
rpo_alpha, bco_pair's running shift). Where mlx-pref documents a deliberate deviation that
only acts where TRL overflows (exponents capped at EXP_MAX, averaged log-probs capped just
below 0 in ORPO), the reference applies the same rule so that everything else is still
compared exactly.
"""

from __future__ import annotations

import numpy as np

EXP_CLAMP = 80.0  # TRL 1.16's own clamp of the α-divergence exponent (float32)
EXP_MAX = 88.7227  # mlx-pref's cap on exponents TRL leaves unclamped (float32 overflow: 88.72284)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # mlx-pref caps ORPO's averaged log-probs at -this


def log_sigmoid(x):
    """log σ(x) = -log(1 + e^{-x})."""
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def token_nll(token_logps: np.ndarray, mask: np.ndarray) -> float:
    """Cross-entropy over every completion token of the chosen rows (TRL's ``nll_loss``)."""
    return float(-token_logps[mask.astype(bool)].mean())


def f_scores(logratios, f_type="reverse_kl", coef=0.5):
    """TRL 1.16 chosen_scores / rejected_scores: f'(t) of t = π/π_ref, constants included."""
    lr = np.asarray(logratios, dtype=np.float64)
    if f_type == "reverse_kl":
        return lr
    if f_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - np.exp(np.minimum(-lr, EXP_MAX))
    if f_type == "js_divergence":  # f'(t) = log 2 + log σ(log t)
        return np.log(2) + log_sigmoid(lr)
    if f_type == "alpha_divergence":  # f'(t) = (t^(α-1) - 1) / (α - 1)
        if abs(coef - 1.0) < 1e-6:
            return lr
        t = np.minimum((coef - 1.0) * lr, EXP_CLAMP)
        return (np.exp(t) - 1.0) * (1.0 / (coef - 1.0))
    raise ValueError(f_type)


def dpo_reference(
    loss,
    c,
    r,
    rc,
    rr,
    len_c=None,
    len_r=None,
    *,
    beta,
    eps=0.0,
    f_type="reverse_kl",
    coef=0.5,
    reference_free=False,
    rpo_alpha=None,
    nll=None,
    weights=None,
    tau=0.05,
    delta=0.0,
):
    """Per-pair losses and rewards of a DPO-family loss (TRL 1.16 DPOTrainer._compute_loss).

    ``eps`` on sigmoid, ``reference_free``, ``rpo_alpha`` and ``delta`` (bco_pair's running
    shift) are TRL 0.28's; TRL 1.16 is ``eps = 0``, ``delta = 0`` there.
    """
    c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
    given = rc is not None
    if given:  # TRL 0.28's rewards subtract the reference even under reference_free
        reward_rc, reward_rr = np.asarray(rc, np.float64), np.asarray(rr, np.float64)
    if reference_free or rc is None:
        rc, rr = np.zeros_like(c), np.zeros_like(r)
    rc, rr = np.asarray(rc, np.float64), np.asarray(rr, np.float64)
    if not given:
        reward_rc, reward_rr = rc, rr
    chosen_logratios = c - rc
    rejected_logratios = r - rr
    cs = f_scores(chosen_logratios, f_type, coef)
    rs = f_scores(rejected_logratios, f_type, coef)
    delta_score = cs - rs
    b = beta
    if loss == "sigmoid":
        out = -log_sigmoid(b * delta_score) * (1 - eps) - log_sigmoid(-b * delta_score) * eps
    elif loss == "hinge":
        out = np.maximum(0.0, 1 - b * delta_score)
    elif loss == "ipo":
        avg = cs / np.maximum(len_c, 1) - rs / np.maximum(len_r, 1)
        out = (avg - 1 / (2 * b)) ** 2
    elif loss == "exo_pair":
        qw, ql = sigmoid(b * delta_score), sigmoid(-b * delta_score)
        out = qw * (log_sigmoid(b * delta_score) - np.log1p(-eps)) + ql * (
            log_sigmoid(-b * delta_score) - np.log(eps)
        )
    elif loss == "nca_pair":
        cr, rj = b * chosen_logratios, b * rejected_logratios
        out = -log_sigmoid(cr) - 0.5 * log_sigmoid(-cr) - 0.5 * log_sigmoid(-rj)
    elif loss == "robust":
        clean = -(1 - eps) * log_sigmoid(b * delta_score)
        flipped = -eps * log_sigmoid(-b * delta_score)
        out = (clean - flipped) / (1 - 2 * eps)
    elif loss == "bco_pair":
        cr, rj = b * chosen_logratios, b * rejected_logratios
        out = -log_sigmoid(cr - delta) - log_sigmoid(-(rj - delta))
    elif loss == "sppo_hard":
        out = (chosen_logratios - 0.5 / b) ** 2 + (rejected_logratios + 0.5 / b) ** 2
    elif loss == "aot":
        d = np.sort(c - r) - np.sort(rc - rr)
        out = -log_sigmoid(b * d) * (1 - eps) - log_sigmoid(-b * d) * eps
    elif loss == "aot_unpaired":
        d = np.sort(chosen_logratios) - np.sort(rejected_logratios)
        out = -log_sigmoid(b * d) * (1 - eps) - log_sigmoid(-b * d) * eps
    elif loss == "apo_zero":
        out = (1 - sigmoid(b * chosen_logratios)) + sigmoid(b * rejected_logratios)
    elif loss == "apo_down":
        out = sigmoid(b * chosen_logratios) + (1 - sigmoid(b * delta_score))
    elif loss == "discopop":
        logits = delta_score * b
        modulation = sigmoid(logits / tau)
        logistic = -log_sigmoid(logits)
        with np.errstate(over="ignore", invalid="ignore"):
            exp_part = np.exp(-logits) * modulation
        exp_part = np.where(modulation == 0.0, 0.0, exp_part)  # 0·∞ → its limit 0
        # mlx-pref caps σ(z/τ)·e^{-z} at e^EXP_MAX where it leaves float32's range.
        exp_part = np.where(log_sigmoid(logits / tau) - logits > EXP_MAX, np.exp(EXP_MAX), exp_part)
        out = logistic * (1 - modulation) + exp_part
    elif loss == "sft":
        out = np.full(c.shape, nll)
    elif loss == "sigmoid_norm":
        avg = cs / np.maximum(len_c, 1) - rs / np.maximum(len_r, 1)
        out = -log_sigmoid(b * avg)
    else:
        raise ValueError(loss)
    if rpo_alpha is not None:
        out = out + rpo_alpha * nll
    if weights is not None:
        out = out * weights
    return out, b * (c - reward_rc), b * (r - reward_rr)


def alphapo(logps, alpha):
    """AlphaPO reward (1 - p^(-α)) / α, p = exp(logps); p^(-α) = exp(-α·logps), capped at
    exp(EXP_MAX) where TRL's float32 value overflows."""
    if alpha == 0.0:
        return logps
    return (1 - np.exp(np.minimum(-alpha * np.asarray(logps, np.float64), EXP_MAX))) / alpha


def cpo_reference(c, r, *, beta, eps=0.0, cpo_alpha=1.0, alpha=0.0, nll=None):
    """CPOTrainer.cpo_loss, loss_type='sigmoid': per-pair loss plus cpo_alpha·NLL (TRL adds it
    to the mean, the same mean), rewards β·r."""
    rc, rj = alphapo(np.asarray(c, np.float64), alpha), alphapo(np.asarray(r, np.float64), alpha)
    logits = rc - rj
    out = -log_sigmoid(beta * logits) * (1 - eps) - log_sigmoid(-beta * logits) * eps
    if cpo_alpha:
        out = out + cpo_alpha * nll
    return out, beta * rc, beta * rj


def simpo_reference(
    c, r, len_c, len_r, *, beta, gamma=0.5, eps=0.0, cpo_alpha=0.0, alpha=0.0, nll=None
):
    """CPOTrainer.cpo_loss, loss_type='simpo', on length-averaged log-probs."""
    ac = np.asarray(c, np.float64) / len_c
    ar = np.asarray(r, np.float64) / len_r
    rc, rj = alphapo(ac, alpha), alphapo(ar, alpha)
    logits = (rc - rj) - gamma / beta
    out = -log_sigmoid(beta * logits) * (1 - eps) - log_sigmoid(-beta * logits) * eps
    if cpo_alpha:
        out = out + cpo_alpha * nll
    return out, beta * rc, beta * rj


def log1mexp(x):
    """log(1 - e^x) for x < 0 (TRL's ORPO helper; float64 needs no branch)."""
    x = np.asarray(x, np.float64)
    return np.log(-np.expm1(x))


def orpo_reference(c, r, len_c, len_r, *, beta, nll):
    """ORPOTrainer.odds_ratio_loss; the total is nll - mean(beta * ratio)."""
    ac = np.asarray(c, np.float64) / len_c
    ar = np.asarray(r, np.float64) / len_r
    pc, pr = np.minimum(ac, -FLOAT32_TINY), np.minimum(ar, -FLOAT32_TINY)
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = log_sigmoid(log_odds)
    out = nll - beta * ratio
    return out, beta * ac, beta * ar, ratio.mean(), log_odds.mean()


class RunningMomentsRef:
    """TRL 1.13's RunningMoments.update (single process), in float64."""

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, xs):
        xs = np.asarray(xs, np.float64)
        xs_count = xs.size
        xs_mean = xs.mean()
        xs_var = xs.var()  # unbiased=False
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += delta * xs_count / tot_count
        new_var = tot_sum / tot_count
        with np.errstate(divide="ignore"):  # one value seen: TRL divides by tot_count - 1 = 0
            self.std = float(np.sqrt(np.float64(new_var * tot_count) / np.float64(tot_count - 1)))
        self.var = new_var
        self.count = tot_count


def bco_reference(c, r, rc, rr, *, beta, running, train=True, udm=None):
    """TRL 1.13 BCOTrainer.bco_loss: (per-row losses, chosen rewards, rejected rewards, delta).

    ``train`` is TRL's ``do_train`` (False in evaluation: δ is read, not updated)."""
    chosen_rewards = beta * (np.asarray(c, np.float64) - rc)
    rejected_rewards = beta * (np.asarray(r, np.float64) - rr)
    if train:
        running.update(np.concatenate([chosen_rewards, rejected_rewards]))
    delta = running.mean
    chosen_losses = -log_sigmoid(chosen_rewards - delta)
    rejected_losses = -log_sigmoid(-(rejected_rewards - delta))
    if udm is not None:
        rejected_losses = udm * rejected_losses
    return np.concatenate([chosen_losses, rejected_losses]), chosen_rewards, rejected_rewards, delta


def kto_reference(c, r, rc, rr, *, beta, kl_policy=None, kl_ref=None, wd=1.0, wu=1.0):
    """TRL 1.16 KTOTrainer._compute_loss, loss_type='kto' (single process)."""
    if kl_policy is None:
        kl = 0.0
    else:
        kl = max(float(np.mean(np.asarray(kl_policy, np.float64) - kl_ref)), 0.0)
    cl = np.asarray(c, np.float64) - rc
    rl = np.asarray(r, np.float64) - rr
    chosen_losses = 1 - sigmoid(beta * (cl - kl))
    rejected_losses = 1 - sigmoid(beta * (kl - rl))
    return np.concatenate([wd * chosen_losses, wu * rejected_losses]), beta * cl, beta * rl, kl


def apo_zero_unpaired_reference(c, r, rc, rr, *, beta, wd=1.0, wu=1.0):
    """TRL 1.16 KTOTrainer._compute_loss, loss_type='apo_zero_unpaired' (no KL term)."""
    cl = np.asarray(c, np.float64) - rc
    rl = np.asarray(r, np.float64) - rr
    chosen_losses = 1 - sigmoid(beta * cl)
    rejected_losses = sigmoid(beta * rl)
    return np.concatenate([wd * chosen_losses, wu * rejected_losses])


def wpo_weights_from_logits(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray):
    """TRL 1.16 WPO weight: exp(mean over completion tokens of (logp - log Σ_v p_v²)), with
    log Σ_v p_v² = lse(2·logits) - 2·lse(logits)."""
    logits = np.asarray(logits, np.float64)
    lse1 = np.logaddexp.reduce(logits, axis=-1)
    lse2 = np.logaddexp.reduce(2.0 * logits, axis=-1)
    logp = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0] - lse1
    aligned = (logp - (lse2 - 2.0 * lse1)) * mask
    return np.exp(aligned.sum(1) / np.maximum(mask.sum(1), 1)), logp


def ld_reference(token_logps: np.ndarray, mask: np.ndarray, shared_lens: np.ndarray, alpha):
    """TRL 1.16 LD-DPO aggregation (shared prefix weight 1, tail ld_alpha), as a token loop."""
    out = np.zeros(token_logps.shape[0])
    for b in range(token_logps.shape[0]):
        pos = 0
        for t in range(token_logps.shape[1]):
            if not mask[b, t]:
                continue
            pos += 1
            weight = 1.0 if pos <= shared_lens[b] else alpha
            out[b] += weight * token_logps[b, t]
    return out
