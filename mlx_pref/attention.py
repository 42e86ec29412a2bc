"""Attention over packed sequences, in blocks, with memory that grows linearly with length.

A packed batch is one row of segments (a prompt, then each completion that follows it)
with per-token positions. Each token sees the earlier tokens of its own segment and,
for a completion, its prompt: the attention mask is block-diagonal and causal. It is
computed here query block by query block, each block against only the keys it can see,
so no T x T score matrix is ever built and the masked-out blocks cost nothing. Its backward
pass recomputes one block's probabilities at a time (``flash_attention``): memory grows
with the length, not its square, which MLX's own attention does not offer where it has
no fused backward (the CPU, and Metal in training: MLX falls back to composed attention
there).

The model architectures stay mlx-lm's. Two hooks let them run packed rows: each
attention layer's RoPE module also accepts per-token positions, and the attention
function of the model's module dispatches a ``PackedAttention`` mask to
``PackedAttention.attend`` (every other mask goes to mlx-lm's own function unchanged).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_pref import native
from mlx_pref.backend import attention_kernel, backend_name
from mlx_pref.fastmath import LOG2E

FUSED_MULTIPLE = 128
"""MLX's CUDA fused attention has a backward pass only for query lengths that are multiples
of 128 (``cuda/scaled_dot_product_attention.cpp``): the fused path pads to that."""

QUERY_BLOCK = 64
"""Queries per attention block: each block sees only the keys its queries can see, so
small blocks skip most masked-out scores (64: the fastest measured on the CPU)."""


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


class PackedAttention:
    """The mask a packed forward hands every attention layer: it carries the segments and
    computes the attention itself, block by block (``flash_attention``). The blocks'
    additive masks (a float per query-key pair) are built once and shared by every layer."""

    def __init__(self, segments: Segments, block: int = QUERY_BLOCK) -> None:
        self.segments = segments
        self.window: int | None = None
        self._vectors = [mx.array(a.astype(np.int32)) for a in (
            segments.segment, segments.parent, segments.position
        )]  # fmt: skip
        n = len(segments.segment)
        self.ranges = [(lo, min(lo + block, n)) for lo in range(0, n, block)]
        self.ranges = [(lo, hi, segments.first_key(lo, hi)) for lo, hi in self.ranges]
        self._biases: list[mx.array] | None = None
        self._ranges: mx.array | None = None
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
        """The whole row's mask for a fused attention kernel (built once), padded to a
        multiple of ``FUSED_MULTIPLE``: padding keys are seen by no query, and each padding
        query sees only itself (a row with no key would be NaN)."""
        if self._dense is None:
            n = len(self.segments.segment)
            total = -(-n // FUSED_MULTIPLE) * FUSED_MULTIPLE
            real = mx.pad(self.mask(0, n, 0), [(0, total - n), (0, total - n)])
            padding = mx.arange(total) >= n
            own = mx.eye(total, dtype=mx.bool_) & padding[:, None]
            self._dense = (real | own)[None, None]
        return self._dense

    def _fused(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float):
        """MLX's fused attention over the row padded to a multiple of ``FUSED_MULTIPLE``
        inside attention only: the rest of the model sees no padding tokens."""
        n = queries.shape[2]
        widths = [(0, 0), (0, 0), (0, -n % FUSED_MULTIPLE), (0, 0)]
        q, k, v = (mx.pad(x, widths) for x in (queries, keys, values))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=self.dense_mask())
        return out[:, :, :n]

    def attend(
        self,
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        scale: float,
        kernel: str | None = None,
    ) -> mx.array:
        """Attention of one packed row: (1, Hq, T, D) queries, (1, Hkv, T, D) keys/values.
        ``kernel``: ``fused``, ``blocks`` or ``native``; by default MLX's fused kernel where
        ``backend.attention_kernel`` says so, else the native block kernel on the CPU when
        it loads (``native.load``), else the blocks in MLX."""
        if kernel is None:
            dtype = str(queries.dtype).rsplit(".", 1)[-1]
            kernel = attention_kernel(backend_name(), dtype, queries.shape[-1])
            if kernel == "blocks" and backend_name() == "cpu" and native.load() is not None:
                kernel = "native"
        if kernel == "fused":
            return self._fused(queries, keys, values, scale)
        if kernel == "native":
            if self._ranges is None:
                self._ranges = mx.array(np.asarray(self.ranges, np.int32).reshape(-1, 3))
            attend = native_attention(self._vectors, self._ranges, scale, self.window or 0)
            return attend(queries, keys, values)[0]
        if self._biases is None:  # 0 where a query sees a key, else -inf (faster than a select)
            self._biases = [mx.where(self.mask(*r), 0.0, -mx.inf) for r in self.ranges]
        return flash_attention(self.ranges, self._biases, scale)(queries, keys, values)[0]


def flash_attention(ranges: list[tuple[int, int, int]], biases: list[mx.array], scale: float):
    """Softmax attention over query blocks ``(lo, hi, first)`` (block ``lo:hi`` against keys
    ``first:hi``, masked by the additive ``biases``), as a function ``(q, k, v) -> (out,
    lse)`` with its own backward pass. The forward keeps only the output and each query's
    log-sum-exp; the backward recomputes each block's probabilities from them
    (FlashAttention's scheme, Dao et al. 2022), so no checkpoint has to run the forward
    attention again. MLX schedules independent work breadth first, which would hold every
    block's probabilities at once; so each block depends on the one before it
    (``mx.depends``) and no more than a block's probabilities exist at a time: memory
    grows linearly with length. Exponentials are powers of two: MLX's CPU ``exp`` runs
    at a third of the speed of ``power`` (measured)."""

    def scores(q: mx.array, k: mx.array, bias: mx.array, groups: int) -> mx.array:
        """Masked scores in base 2, (B, Hkv, groups, n, keys), from (B, Hkv, groups*n, D)."""
        s = ((q * (scale * LOG2E)) @ k.swapaxes(-1, -2)).astype(mx.float32)
        b, h, rows, keys = s.shape
        return s.reshape(b, h, groups, rows // groups, keys) + bias

    def heads(q: mx.array, k: mx.array) -> tuple[int, int, int, int]:
        b, hq, _, d = q.shape
        return b, k.shape[1], hq // k.shape[1], d

    @mx.custom_function
    def attend(q: mx.array, k: mx.array, v: mx.array):
        b, hkv, g, d = heads(q, k)
        outs, lses = [], []
        for (lo, hi, first), bias in zip(ranges, biases):
            n = hi - lo
            qb, kb, vb = q[:, :, lo:hi], k[:, :, first:hi], v[:, :, first:hi]
            if outs:  # after the previous block: one block's probabilities at a time
                qb, kb, vb = mx.depends([qb, kb, vb], [outs[-1], lses[-1]])
            s = scores(qb.reshape(b, hkv, g * n, d), kb, bias, g)
            top = s.max(axis=-1, keepdims=True)
            e = mx.power(2.0, s - top)
            total = e.sum(axis=-1, keepdims=True)
            out = e.reshape(b, hkv, g * n, -1).astype(v.dtype) @ vb  # normalized after
            out = out / total.reshape(b, hkv, g * n, 1).astype(v.dtype)
            outs.append(out.reshape(b, hkv * g, n, -1))
            lses.append((top + mx.log2(total)).reshape(b, hkv * g, n, 1))
        return mx.concatenate(outs, axis=2), mx.concatenate(lses, axis=2)

    @attend.vjp
    def backward(primals, cotangents, outputs):
        q, k, v = primals
        d_out, (out, lse) = cotangents[0], outputs
        b, hkv, g, d = heads(q, k)
        delta = (d_out.astype(mx.float32) * out.astype(mx.float32)).sum(-1, keepdims=True)
        dk, dv = mx.zeros(k.shape, mx.float32), mx.zeros(v.shape, mx.float32)
        dqs: list[mx.array] = []
        for (lo, hi, first), bias in zip(ranges, biases):
            n = hi - lo
            qb, kb, vb = q[:, :, lo:hi], k[:, :, first:hi], v[:, :, first:hi]
            dob = d_out[:, :, lo:hi]
            if dqs:  # after the previous block: one block's probabilities at a time
                qb, kb, vb, dob = mx.depends([qb, kb, vb, dob], [dqs[-1], dk, dv])
            qb, dob = qb.reshape(b, hkv, g * n, d), dob.reshape(b, hkv, g * n, -1)
            lse_b = lse[:, :, lo:hi].reshape(b, hkv, g, n, 1)
            p = mx.power(2.0, scores(qb, kb, bias, g) - lse_b)
            dp = (dob @ vb.swapaxes(-1, -2)).astype(mx.float32).reshape(p.shape)
            ds = p * (dp - delta[:, :, lo:hi].reshape(b, hkv, g, n, 1))
            ds, p = ds.reshape(b, hkv, g * n, -1), p.reshape(b, hkv, g * n, -1)
            dqs.append(((ds.astype(k.dtype) @ kb) * scale).reshape(b, hkv * g, n, d))
            dk_b = (ds.swapaxes(-1, -2).astype(q.dtype) @ qb) * scale
            dv_b = p.swapaxes(-1, -2).astype(v.dtype) @ dob
            at = mx.array([first])
            dk = mx.slice_update(dk, dk[:, :, first:hi] + dk_b, at, (2,))
            dv = mx.slice_update(dv, dv[:, :, first:hi] + dv_b, at, (2,))
        dq = mx.concatenate(dqs, axis=2)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    return attend


def native_attention(vectors: list[mx.array], ranges: mx.array, scale: float, window: int):
    """``flash_attention``'s computation by the native CPU kernels (``native.py``):
    ``(q, k, v) -> (out, lse)`` for a row's (segment, parent, position) ``vectors`` and
    its query blocks ``ranges`` ((blocks, 3) int32: lo, hi, first key); ``window`` 0 for
    none. The mask is computed in the kernel from the segments; float32 inside."""
    kernels, threads = native.load(), native.threads()
    if kernels is None:
        raise RuntimeError(f"the native attention kernel is not available: {native.reason()}")

    @mx.custom_function
    def attend(q: mx.array, k: mx.array, v: mx.array):
        out, lse = kernels.attention_forward(q, k, v, *vectors, ranges, scale, window, threads)
        return out.astype(q.dtype), lse

    @attend.vjp
    def backward(primals, cotangents, outputs):
        q, k, v = primals
        grads = kernels.attention_backward(
            q, k, v, *outputs, cotangents[0], *vectors, ranges, scale, window, threads
        )
        return tuple(g.astype(x.dtype) for g, x in zip(grads, primals))

    return attend


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
