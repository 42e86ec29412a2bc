"""Mixture-of-Experts models: the router's load-balancing loss.

TRL adds ``router_aux_loss_coef * aux_loss`` to the preference loss of a sparse model
(``output_router_logits=True``), with ``aux_loss`` the Switch Transformer's
load-balancing loss that transformers' ``load_balancing_loss_func`` computes from every
sparse layer's router logits. mlx-lm's models return no router logits, so they are
recorded where they are made: each sparse block's router (its ``gate``, a linear layer,
with or without a LoRA adapter) gets a subclass per instance whose ``__call__`` also hands
its output to ``record``. That is the least invasive hook there is: the architecture, the
module tree and every weight name stay mlx-lm's (adapters on the router still load in
mlx-lm), and nothing is kept unless a forward pass asks for it (``recording``). A block
that ``grad_checkpoint`` recomputes returns what it recorded as outputs of the
checkpointed function (``models.enable_grad_checkpoint``), so the logits carry gradients
without the block's activations being kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

SPARSE_BLOCKS = {
    "mixtral": ("block_sparse_moe", "num_experts_per_tok"),
    "qwen2_moe": ("mlp", "top_k"),
    "qwen3_moe": ("mlp", "top_k"),
    "olmoe": ("mlp", "top_k"),
}
"""Per mlx-lm architecture: the decoder layer's attribute holding the sparse block, and the
block's attribute holding top-k. Each such block routes with ``gate`` (raw logits, one
per expert) over the experts in ``switch_mlp``; dense layers (Qwen3-MoE's
``mlp_only_layers``) have neither and are skipped."""

_sinks: list[list[mx.array]] = []


def record(logits: mx.array) -> None:
    """Keep one router's logits, if a ``recording`` is open (innermost one)."""
    if _sinks:
        _sinks[-1].append(logits)


@contextmanager
def recording() -> Iterator[list[mx.array]]:
    """Collect, in call order, the logits every recording router computes meanwhile."""
    sink: list[mx.array] = []
    _sinks.append(sink)
    try:
        yield sink
    finally:
        _sinks.pop()


_recording_classes: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    if cls not in _recording_classes:

        def __call__(self, x):
            out = cls.__call__(self, x)
            record(out)
            return out

        _recording_classes[cls] = type(
            cls.__name__, (cls,), {"__call__": __call__, "records_router_logits": True}
        )
    return _recording_classes[cls]


def load_balancing_loss(
    router_logits: list[mx.array],
    num_experts: int,
    top_k: int,
    weights: mx.array | None = None,
) -> mx.array:
    """transformers' ``load_balancing_loss_func``: ``E * sum_e f_e * P_e`` over the tokens
    of every sparse layer pooled, with ``f_e`` the share of top-k assignments that go to
    expert ``e`` (the k choices of a token each count) and ``P_e`` its mean routing
    probability. A balanced router scores ``top_k``. ``weights`` counts each token (one
    entry per token of the forward, the same for every layer) that many times; 0 leaves
    padding out, as the attention mask does in transformers. The gradient flows through
    the probabilities only (the top-k choice is piecewise constant)."""
    logits = mx.concatenate([x.reshape(-1, num_experts) for x in router_logits])
    probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
    chosen = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[:, :top_k]
    counts = (chosen[..., None] == mx.arange(num_experts)).astype(mx.float32).sum(axis=1)
    counts = mx.stop_gradient(counts)
    if weights is None:
        weights = mx.ones((logits.shape[0] // len(router_logits),), dtype=mx.float32)
    w = mx.tile(weights.astype(mx.float32), (len(router_logits),))[:, None]
    total = w.sum()
    tokens_per_expert = (counts * w).sum(axis=0) / total
    prob_per_expert = (probs * w).sum(axis=0) / total
    return num_experts * (tokens_per_expert * prob_per_expert).sum()


@dataclass(frozen=True)
class Router:
    """The sparse blocks of a model whose routers record their logits."""

    model_type: str
    blocks: int
    """Sparse blocks (each layer's router is one)."""
    num_experts: int
    top_k: int

    def loss(self, router_logits: list[mx.array], weights: np.ndarray | None) -> mx.array:
        """The load-balancing loss of one recorded forward pass (``weights``: what each of
        its tokens counts for, see ``logps.SequenceLogps.routed``)."""
        if len(router_logits) != self.blocks:
            raise RuntimeError(
                f"recorded {len(router_logits)} router outputs in one forward pass of a model "
                f"with {self.blocks} sparse blocks"
            )
        w = None if weights is None else mx.array(weights.astype(np.float32))
        return load_balancing_loss(router_logits, self.num_experts, self.top_k, w)

    def describe(self, coef: float) -> str:
        return (
            f"router load-balancing loss: coefficient {coef:g}, {self.blocks} sparse blocks "
            f"of {self.num_experts} experts (top {self.top_k}), logged as aux_loss"
        )


def sparse_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse blocks of ``model`` the table knows (none for other architectures)."""
    spec = SPARSE_BLOCKS.get(getattr(model, "model_type", None))
    if spec is None or not hasattr(model, "layers"):
        return []
    attr = spec[0]
    blocks = [layer[attr] for layer in model.layers if attr in layer]
    return [b for b in blocks if isinstance(b, nn.Module) and "gate" in b and "switch_mlp" in b]


def has_experts(model: nn.Module) -> bool:
    """Whether ``model`` routes tokens to experts (mlx-lm's switch layers), known or not."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    switch = (SwitchLinear, QuantizedSwitchLinear)
    return any(isinstance(m, switch) for _, m in model.named_modules())


def install(model: nn.Module) -> Router | None:
    """Make every sparse block's router record its logits (idempotent). Call it once the
    adapters are in place, so that a LoRA adapter on the router is part of what is
    recorded. None for a model with no sparse block the table knows."""
    blocks = sparse_blocks(model)
    if not blocks:
        return None
    for block in blocks:
        gate = block.gate
        if not getattr(type(gate), "records_router_logits", False):
            gate.__class__ = _recording_class(type(gate))
    top_k_attr = SPARSE_BLOCKS[model.model_type][1]
    first = blocks[0]
    return Router(
        model.model_type, len(blocks), int(first.num_experts), int(getattr(first, top_k_attr))
    )
