"""Scoring a held-out set: the mean loss and TRL's metrics, prefixed ``eval/``.

One function for the trainer's evaluations and the ``evaluate`` command, so both give
the same numbers for the same weights and data.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_pref.data import BatchPlan, Dataset, collate
from mlx_pref.errors import ConfigError
from mlx_pref.train.step import Objective, batch_context, forward, sum_metrics


def eval_order(cfg, dataset: Dataset, world: int = 1, rank: int = 0) -> list[np.ndarray]:
    """This process's evaluation batches of ``dataset``, as index arrays, in order."""
    plan = BatchPlan(dataset.examples, cfg.batch_size, 1, 0, cfg.share_prompt, world, rank)
    order = plan.shard(seed=0, epoch=0)
    if not order:
        raise ConfigError(f"{dataset.name}: fewer eval examples than processes ({world})")
    return order[: cfg.eval_batches]


def evaluate_dataset(
    obj: Objective,
    dataset: Dataset,
    split: str,
    *,
    world: int = 1,
    rank: int = 0,
) -> dict[str, float]:
    """Mean loss and metrics of ``obj``'s model over ``dataset`` (at most
    ``eval_batches`` batches, in a fixed order), weighted by examples; dropout off."""
    sums: dict[str, mx.array] = {}
    was_training = obj.model.training
    obj.model.eval()
    try:
        for idx in eval_order(obj.config, dataset, world, rank):
            batch = collate([dataset.examples[i] for i in idx], idx)
            ctx = batch_context(obj, batch, split, dataset)
            loss, metrics = forward(obj, batch, ctx, train=False)
            for k, v in {"loss": loss, "count": mx.array(1.0), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + batch.num_examples * v
            mx.eval(sums)
    finally:
        obj.model.train(was_training)
    if world > 1:
        sums = sum_metrics(sums)
    count = float(sums.pop("count"))
    return {f"eval/{k}": float(v) / count for k, v in sums.items()}
