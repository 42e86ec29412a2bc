"""Preference losses (sigmoid/DPO only until the full registry lands)."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn


@dataclass
class LossOutput:
    loss: mx.array
    losses: mx.array
    chosen_rewards: mx.array
    rejected_rewards: mx.array
    metrics: dict = field(default_factory=dict)


def parse_loss(value) -> dict[str, float]:
    if value in ("sigmoid", "dpo"):
        return {"sigmoid": 1.0}
    raise ValueError(f"unknown loss {value!r}")


def preference_loss(
    name,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    *,
    beta,
    label_smoothing=0.0,
    state=None,
    **params,
):
    d = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    losses = -nn.log_sigmoid(beta * d)
    return LossOutput(
        losses.mean(),
        losses,
        beta * (chosen_logps - ref_chosen_logps),
        beta * (rejected_logps - ref_rejected_logps),
    )


def loss_needs_reference(weights, cfg) -> bool:
    return True
