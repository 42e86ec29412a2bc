"""One training step, as public functions over an ``Objective``.

``batch_context`` gathers what a batch's loss needs besides the policy (reference
log-probs, the ``context`` extra inputs); ``forward`` runs the policy and the loss;
``train_step`` accumulates micro-batches (across processes too), clips, guards against
non-finite values and updates. The bench and the tests call these directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_pref import backend, moe
from mlx_pref.data import Batch, Dataset
from mlx_pref.logps import Recompute, row_logps, sequence_logps
from mlx_pref.losses import LossState, PreparedLoss, empty_rows, supplied_inputs
from mlx_pref.reference import Reference
from mlx_pref.train.inputs import UDM, provide


@dataclass
class Objective:
    """What a batch's loss depends on besides the batch."""

    model: nn.Module
    config: object
    loss: PreparedLoss
    reference: Reference
    inputs: list[str]
    """The extra loss inputs this run supplies (``losses.supplied_inputs``)."""
    loss_state: LossState = field(default_factory=LossState)
    udm: UDM | None = None
    beta: float = 0.1
    """β of the current step (the loop moves it along its schedule)."""
    recompute: Recompute = Recompute()
    """What the backward pass recomputes (the memory plan's choice)."""
    router: moe.Router | None = None
    """A MoE model's recording routers: their load-balancing loss, weighted by
    ``router_aux_loss_coef``, is added to the loss (None: no auxiliary loss)."""


def make_objective(cfg, model: nn.Module, loss: PreparedLoss, reference: Reference,
                   train_set: Dataset, log, progress: bool = False,
                   recompute: Recompute | None = None) -> Objective:  # fmt: skip
    """The run's objective: its loss and the extra inputs the loss needs, BCO's UDM, and a
    MoE model's recording routers when ``router_aux_loss_coef`` is on. Built once the
    adapters are in place (a LoRA adapter on a router is part of what it records)."""
    inputs = supplied_inputs(cfg.loss, vars(cfg))
    obj = Objective(
        model, cfg, loss, reference, inputs, beta=cfg.beta, recompute=recompute or Recompute()
    )
    if cfg.bco_udm:
        obj.udm = UDM(cfg, model, train_set, log, progress)
    if cfg.router_aux_loss_coef:
        obj.router = moe.install(model)
        if obj.router is None and moe.has_experts(model):
            log(
                f"note: mlx-pref does not know where {getattr(model, 'model_type', 'this model')}"
                " routes its tokens: training without the router's load-balancing loss "
                f"(architectures with one: {', '.join(moe.SPARSE_BLOCKS)})"
            )
    return obj


@dataclass
class BatchContext:
    """What a batch's loss needs besides the policy forward; none of it is differentiated."""

    ref: mx.array | None = None
    inputs: dict[str, mx.array] = field(default_factory=dict)


@dataclass
class StepResult:
    loss: float
    metrics: dict[str, float]
    finite: bool = True
    """False: the step was skipped (non-finite loss or gradient)."""


def warmup_steps(cfg, total_steps: int) -> int:
    """``warmup_steps``, or ``warmup_ratio`` of the run's steps rounded up (as transformers
    does), never more than the run has."""
    steps = math.ceil(total_steps * cfg.warmup_ratio) if cfg.warmup_ratio else cfg.warmup_steps
    return min(steps, total_steps)


def lr_schedule(cfg, total_steps: int) -> Callable[[mx.array], mx.array]:
    """Linear warmup from 0, then constant, linear decay to 0, or cosine decay to 0."""
    peak, warm = cfg.learning_rate, warmup_steps(cfg, total_steps)
    rest = max(total_steps - warm, 1)
    decay = {
        "constant": lambda: lambda step: mx.array(peak),
        "linear": lambda: optim.linear_schedule(peak, 0.0, rest),
        "cosine": lambda: optim.cosine_decay(peak, rest, 0.0),
    }[cfg.lr_schedule]()
    if warm == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, peak, warm), decay], [warm])


def _mean(x: mx.array) -> mx.array:
    """Mean that is 0, not NaN, for an empty side (an unpaired batch with one label only),
    decided in Python so that no reduction runs on a zero-size array."""
    return x.sum() / x.size if x.size else mx.array(0.0, dtype=mx.float32)


def take_rows(x: mx.array, rows: np.ndarray) -> mx.array:
    """``x[rows]``; for no rows the host-made empty array, so no gather runs on an empty
    index (MLX's CUDA backend crashes on some kernels over zero-size arrays)."""
    return x[mx.array(rows)] if len(rows) else empty_rows()


def batch_metrics(
    chosen_rewards: mx.array,
    rejected_rewards: mx.array,
    chosen_logps: mx.array,
    rejected_logps: mx.array,
    paired: bool,
) -> dict[str, mx.array]:
    """TRL's reward and log-prob metrics for one batch (means over its rows)."""
    out = {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "logps/chosen": _mean(chosen_logps),
        "logps/rejected": _mean(rejected_logps),
    }
    if paired:
        out["rewards/accuracies"] = (chosen_rewards > rejected_rewards).astype(mx.float32).mean()
        out["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
    else:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def batch_context(obj: Objective, batch: Batch, split: str, dataset: Dataset) -> BatchContext:
    """Reference log-probs and the ``context`` extra inputs of one batch (no gradient)."""
    ref = obj.reference.logps(batch, split)
    return BatchContext(ref, provide(obj, "context", batch, split, dataset))


def forward(obj: Objective, batch: Batch, ctx: BatchContext, *, train: bool):
    """Loss and per-batch metrics for one batch under the current policy."""
    cfg = obj.config
    with_p2 = "policy_weights" in obj.inputs
    with moe.recording() as router_logits:  # the policy's routers only: no reference, no KL rows
        seq = sequence_logps(
            obj.model, batch, with_p2=with_p2, share_prompt=cfg.share_prompt,
            recompute=obj.recompute,
        )  # fmt: skip
    logps = row_logps(seq, batch, cfg.ld_alpha)
    chosen_idx, rejected_idx = np.flatnonzero(batch.labels), np.flatnonzero(~batch.labels)
    lengths = mx.array(batch.completion_lengths)
    chosen, rejected = take_rows(logps, chosen_idx), take_rows(logps, rejected_idx)
    extras = {**ctx.inputs, **provide(obj, "forward", batch, "", None, seq)}
    out = obj.loss(
        chosen,
        rejected,
        None if ctx.ref is None else take_rows(ctx.ref, chosen_idx),
        None if ctx.ref is None else take_rows(ctx.ref, rejected_idx),
        take_rows(lengths, chosen_idx),
        take_rows(lengths, rejected_idx),
        beta=obj.beta,
        state=obj.loss_state,
        train=train,
        **extras,
    )
    metrics = batch_metrics(
        out.chosen_rewards, out.rejected_rewards, chosen, rejected, batch.paired
    )
    metrics.update(out.metrics)
    loss = out.loss
    if obj.router is not None:  # TRL adds it in training and evaluation alike
        aux = obj.router.loss(router_logits, seq.routed)
        loss = loss + cfg.router_aux_loss_coef * aux
        metrics["aux_loss"] = aux
    return loss, metrics


def loss_and_grad(obj: Objective) -> Callable:
    """``(batch, ctx) -> ((loss, metrics), grads)`` over the model's trainable weights."""
    return nn.value_and_grad(obj.model, lambda batch, ctx: forward(obj, batch, ctx, train=True))


def sum_metrics(metrics: dict) -> dict:
    """Sum a dict of scalars over processes (one collective, keys in a fixed order)."""
    keys = sorted(metrics)
    summed = backend.all_sum(mx.stack([mx.array(metrics[k], mx.float32) for k in keys]))
    return dict(zip(keys, summed))


def train_step(
    obj: Objective,
    optimizer: optim.Optimizer,
    batches: list[Batch],
    dataset: Dataset,
    grad_fn: Callable,
) -> StepResult:
    """One optimizer step over ``batches`` (accumulated micro-batches of ``dataset``).

    Each micro-batch of each process weighs n_b / n_total, so the step's gradient and
    metrics are those of one big batch. A non-finite loss or gradient skips the update and
    leaves the running loss statistics as they were.
    """
    cfg = obj.config
    t0 = time.perf_counter()
    backend.reset_peak_memory()
    world = backend.distributed_group().size()
    total = float(backend.all_sum(mx.array(sum(b.num_examples for b in batches), mx.float32)))
    loss_state = obj.loss_state.state_dict()  # restored if the step is skipped
    grads, metrics = None, {}
    for batch in batches:
        ctx = batch_context(obj, batch, "train", dataset)
        (loss, m), g = grad_fn(batch, ctx)
        w = batch.num_examples / total
        g = tree_map(lambda x, w=w: x * w, g)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        for k, v in {"loss": loss, **m}.items():
            metrics[k] = metrics.get(k, 0.0) + w * v
        mx.eval(grads, metrics)
    if world > 1:
        grads = nn.average_gradients(tree_map(lambda x: x * world, grads))
        metrics = sum_metrics(metrics)
    limit = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    clipped, norm = optim.clip_grad_norm(grads, limit)
    out = {k: float(v) for k, v in metrics.items()}
    out["grad_norm"] = float(norm)
    finite = math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
    if finite:
        optimizer.update(obj.model, clipped)
        mx.eval(obj.model.trainable_parameters(), optimizer.state)
    else:
        obj.loss_state.load_state_dict(loss_state)
    elapsed = time.perf_counter() - t0
    out["beta"] = obj.beta
    out["learning_rate"] = float(optimizer.learning_rate)
    out["tokens_per_sec"] = sum(b.num_tokens for b in batches) / elapsed
    out["completion_tokens_per_sec"] = sum(b.num_completion_tokens for b in batches) / elapsed
    out["step_time"] = elapsed
    out["peak_memory_gb"] = backend.memory_stats()["peak"] / 1e9
    return StepResult(out["loss"], out, finite)
