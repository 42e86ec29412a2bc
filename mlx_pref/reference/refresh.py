"""Reference refresh: the student copied into the reference (``ref_regen_epochs``), or
TR-DPO's soft/hard sync (``sync_ref_model``). A refresh replaces the reference adapter (or,
under full fine-tuning, the frozen copy's weights); a cache keyed on the old weights
simply stops matching and is scored anew."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_pref.adapters import adapter_parameters
from mlx_pref.errors import ConfigError
from mlx_pref.reference.strategies import Reference


def mix_adapters(
    policy: dict[str, mx.array], reference: dict[str, mx.array] | None, alpha: float
) -> dict[str, mx.array]:
    """LoRA weights whose update equals ``alpha * policy + (1 - alpha) * reference`` exactly.

    A LoRA update is ``A @ B``; the blend of two is the product of the concatenated
    factors ``[A_p, A_r] @ [[alpha B_p], [(1 - alpha) B_r]]``, so rank grows by r per
    soft sync. When it reaches the layer's full rank it is recompressed exactly (QR +
    SVD), so memory never exceeds a dense update of the adapted layers. A missing
    reference means the base (zero update).
    """
    if alpha == 1.0:
        return dict(policy)
    if any(k.endswith(".m") for k in policy):
        raise ValueError("soft reference sync (ref_model_mixup_alpha < 1) is not defined for DoRA")
    out = {}
    for key in policy:
        if not key.endswith(".lora_a"):
            continue
        stem = key[: -len(".lora_a")]
        a_p, b_p = policy[stem + ".lora_a"], policy[stem + ".lora_b"]
        if reference is None:
            a, b = a_p, alpha * b_p
        else:
            a = mx.concatenate([a_p, reference[stem + ".lora_a"]], axis=1)
            b = mx.concatenate([alpha * b_p, (1 - alpha) * reference[stem + ".lora_b"]], axis=0)
        limit = min(a.shape[0], b.shape[1])
        if a.shape[1] > limit:
            a, b = _recompress(a, b, limit)
        out[stem + ".lora_a"], out[stem + ".lora_b"] = a, b
    return out


def _recompress(a: mx.array, b: mx.array, rank: int) -> tuple[mx.array, mx.array]:
    """Factors of rank ``rank`` with the same product ``a @ b`` (exact when rank(a@b) <= rank)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    qa, ra = np.linalg.qr(a64)
    qb, rb = np.linalg.qr(b64.T)
    u, s, vt = np.linalg.svd(ra @ rb.T)
    new_a = (qa @ u[:, :rank]) * s[:rank]
    new_b = (qb @ vt[:rank].T).T
    return mx.array(new_a.astype(np.float32)), mx.array(new_b.astype(np.float32))


def mix_full(
    policy: dict[str, mx.array], reference: dict[str, mx.array], alpha: float
) -> dict[str, mx.array]:
    """Full fine-tuning's blend: ``alpha * policy + (1 - alpha) * reference``, per weight."""
    if alpha == 1.0:
        return dict(policy)
    return {k: alpha * v + (1 - alpha) * reference[k] for k, v in policy.items()}


def _student(model: nn.Module, full: bool) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters())) if full else adapter_parameters(model)


def _blend(reference: Reference, policy: dict[str, mx.array], alpha: float, full: bool):
    if not full:
        return mix_adapters(policy, reference.weights, alpha)
    current = reference.weights
    if current is None:  # the frozen copy still holds the starting weights
        with reference.as_model() as model:
            current = dict(tree_flatten(model.parameters()))
    return mix_full(policy, current, alpha)


def refresh(
    reference: Reference, model: nn.Module, cfg, step: int, steps_per_epoch: int
) -> list[str]:
    """Apply the refresh rules due before optimizer step ``step``; returns what was done.

    ``ref_regen_epochs: N`` copies the student in at the start of every N-th epoch (never
    at epoch 0); ``sync_ref_model`` blends it in every ``ref_model_sync_steps`` steps.
    """
    done = []
    if step == 0:
        return done
    if cfg.ref_regen_epochs and step % steps_per_epoch == 0:
        epoch = step // steps_per_epoch
        if epoch % cfg.ref_regen_epochs == 0:
            reference.set_weights(_student(model, cfg.full))
            done.append(f"epoch {epoch}: reference regenerated from the student")
    if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:
        alpha = cfg.ref_model_mixup_alpha
        try:
            mixed = _blend(reference, _student(model, cfg.full), alpha, cfg.full)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        mx.eval(mixed)
        reference.set_weights(mixed)
        done.append(f"step {step}: reference synced (alpha {alpha})")
    return done
