"""Attention over packed sequences, in blocks, with memory that grows linearly with length.

A packed batch is one row of segments (a prompt, then each completion that follows it)
with per-token positions. Each token sees the earlier tokens of its own segment and,
for a completion, its prompt: the attention mask is block-diagonal and causal. It is
computed here query block by query block, each block against only the keys it can see,
so no T x T score matrix is ever built and the masked-out blocks cost nothing. With
``recompute`` the block's probabilities are not kept for the backward pass
(``mx.checkpoint``): memory then grows with the length, not its square, which is what
MLX's own attention does not offer where it has no fused backward (the CPU, and Metal in
training: MLX falls back to composed attention there).

The model architectures stay mlx-lm's. Two hooks let them run packed rows: each
attention layer's RoPE module also accepts per-token positions, and the attention function of the model's module dispatches a ``PackedAttention`` mask to
``PackedAttention.attend`` (every other mask goes to mlx-lm's own function unchanged).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_pref.backend import attention_kernel, backend_name

QUERY_BLOCK = 64
"""Queries per attention block: each block sees only the keys its queries can see, so
small blocks skip most masked-out scores (64: the fastest measured on the CPU)."""
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TokenPositions:
    """Per-token positions of a packed row, given to RoPE as its ``offset``."""

    positions: mx.array


def _accept_token_positions(rope: nn.Module) -> None:
    """Let a layer's RoPE module also rotate a packed row by per-token positions: the row
    is laid out as one single-token sequence per position, which RoPE offsets one by one.
    A subclass per instance, so the module tree (and every saved weight name) is kept."""
    cls = type(rope)
    if getattr(cls, "token_positions", False):
        return
    call = cls.__call__

    def __call__(self, x: mx.array, offset=0):
        if not isinstance(offset, TokenPositions):
            return call(self, x, offset=offset)
        tokens = x.transpose(2, 1, 0, 3)  # (1, H, T, D) -> (T, H, 1, D)
        return call(self, tokens, offset=offset.positions).transpose(2, 1, 0, 3)

    rope.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "token_positions": True})


@dataclass
class Segments:
    """A packed row's structure, one entry per token (NumPy): its segment, the segment it
    also attends to in full (its prompt; -1 for none), and its position."""

    segment: np.ndarray
    parent: np.ndarray
    position: np.ndarray
    start: np.ndarray
    """First token index of each segment."""

    def first_key(self, lo: int, hi: int) -> int:
        """The first key any of the queries ``[lo, hi)`` sees (its segment's or prompt's start)."""
        seg_q, parent_q = self.segment[lo:hi], self.parent[lo:hi]
        firsts = np.where(parent_q >= 0, self.start[np.maximum(parent_q, 0)], self.start[seg_q])
        return int(firsts.min())


_WHOLE_BLOCK = [False]
"""True while a checkpointed transformer block runs: it is recomputed whole in the
backward pass, so recomputing its attention again inside would only add a third pass."""


@contextmanager
def block_recomputed() -> Iterator[None]:
    """Attention inside this context keeps its probabilities: the block around it is
    checkpointed, so they live only while that one block's backward runs."""
    before, _WHOLE_BLOCK[0] = _WHOLE_BLOCK[0], True
    try:
        yield
    finally:
        _WHOLE_BLOCK[0] = before


class PackedAttention:
    """The mask a packed forward hands every attention layer: it carries the segments and
    computes the attention itself, block by block. The blocks' boolean masks (a byte per
    query-key pair) are built once and shared by every layer; with ``recompute`` each block
    runs under a checkpoint, so no float of size queries x keys outlives a block."""

    def __init__(
        self, segments: Segments, recompute: bool = False, block: int = QUERY_BLOCK,
        within_blocks: bool = False,
    ) -> None:  # fmt: skip
        self.segments = segments
        self.recompute = recompute
        self.within_blocks = within_blocks
        """Recompute inside checkpointed transformer blocks too (see ``block_recomputed``)."""
        self.block = block
        self.window: int | None = None
        self._vectors = [mx.array(a.astype(np.int32)) for a in (
            segments.segment, segments.parent, segments.position
        )]  # fmt: skip
        n = len(segments.segment)
        self.ranges = [(lo, min(lo + block, n)) for lo in range(0, n, block)]
        self.ranges = [(lo, hi, segments.first_key(lo, hi)) for lo, hi in self.ranges]
        self._masks: list[mx.array] | None = None
        self._dense: mx.array | None = None

    def mask(self, lo: int, hi: int, first: int) -> mx.array:
        """Which of the keys ``[first, hi)`` each query of ``[lo, hi)`` sees: its own
        segment's earlier tokens and its prompt (and, for sliding windows, only near ones)."""
        seg, parent, position = self._vectors
        seg_q, parent_q, seg_k = seg[lo:hi, None], parent[lo:hi, None], seg[None, first:hi]
        causal = mx.arange(first, hi)[None, :] <= mx.arange(lo, hi)[:, None]
        allowed = ((seg_k == seg_q) & causal) | (seg_k == parent_q)
        if self.window is not None:
            allowed = allowed & (position[lo:hi, None] - position[None, first:hi] < self.window)
        return allowed

    def dense_mask(self) -> mx.array:
        """The whole row's mask (T x T), for a fused attention kernel (built once)."""
        if self._dense is None:
            n = len(self.segments.segment)
            self._dense = self.mask(0, n, 0)[None, None]
        return self._dense

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float):
        """Attention of one packed row: (1, Hq, T, D) queries, (1, Hkv, T, D) keys/values."""
        dtype = str(queries.dtype).rsplit(".", 1)[-1]
        if attention_kernel(backend_name(), dtype, queries.shape[-1]) == "fused":
            return mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=scale, mask=self.dense_mask()
            )
        if self._masks is None:  # one byte per query-key pair, shared by every layer
            self._masks = [self.mask(*r) for r in self.ranges]
        blocks = zip(self.ranges, self._masks)
        if self.recompute and (self.within_blocks or not _WHOLE_BLOCK[0]):
            outs = [
                mx.checkpoint(lambda q, k, v, m=m: _block(q, k, v, m, scale))(
                    queries[:, :, lo:hi], keys[:, :, first:hi], values[:, :, first:hi]
                )
                for (lo, hi, first), m in blocks
            ]
        else:
            outs = [
                _block(queries[:, :, lo:hi], keys[:, :, first:hi], values[:, :, first:hi], m, scale)
                for (lo, hi, first), m in blocks
            ]
        return mx.concatenate(outs, axis=2)


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, exponentials as powers of two: MLX's CPU ``exp`` runs
    at a third of the speed of ``power`` (measured; the results agree to float32
    rounding). Masked entries are -inf; every row has one finite entry."""
    shifted = (x - mx.stop_gradient(x.max(axis=-1, keepdims=True))) * LOG2E
    e = mx.power(2.0, shifted)
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return (output * (cotangent - (output * cotangent).sum(axis=-1, keepdims=True)),)


def _block(q: mx.array, k: mx.array, v: mx.array, mask: mx.array, scale: float) -> mx.array:
    """Softmax attention of a query block against its keys, with grouped-query heads."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, hkv, hq // hkv, n, d)
    scores = ((q * scale) @ k[:, :, None].swapaxes(-1, -2)).astype(mx.float32)
    probs = softmax(mx.where(mask, scores, -mx.inf))
    out = probs.astype(v.dtype) @ v[:, :, None]
    return out.reshape(b, hq, n, v.shape[-1])


class PackedContext:
    """What each layer receives as its "cache" in a packed forward: the per-token
    positions for RoPE and the packed attention as its mask. It caches nothing."""

    def __init__(self, attention: PackedAttention, positions: mx.array):
        self.attention = attention
        self.offset = TokenPositions(positions)

    def make_mask(self, n: int, return_array: bool = False, window_size=None, **_):
        if window_size is not None:
            self.attention.window = window_size
        return self.attention

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def _dispatching(original: Callable) -> Callable:
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(mask, PackedAttention):
            if sinks is not None:
                raise ValueError("packed attention does not support attention sinks")
            return mask.attend(queries, keys, values, scale)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.packed = True
    return scaled_dot_product_attention


def install(body: nn.Module) -> bool:
    """Enable packed rows on a transformer body (idempotent); False when its attention
    layers do not have the shape the hooks need (the caller then pads rows instead)."""
    layers = getattr(body, "layers", None)
    if not layers or not all(hasattr(getattr(x, "self_attn", None), "rope") for x in layers):
        return False
    for layer in layers:
        attn = layer.self_attn
        module = sys.modules.get(type(attn).__module__)
        function = getattr(module, "scaled_dot_product_attention", None)
        if function is None:
            return False
        if not getattr(function, "packed", False):
            module.scaled_dot_product_attention = _dispatching(function)
        _accept_token_positions(attn.rope)
    return True
