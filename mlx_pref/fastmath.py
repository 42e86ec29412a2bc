"""Exponentials as powers of two, where MLX's CPU backend makes ``exp`` slow.

On the CPU, MLX evaluates ``exp``, ``sigmoid`` and ``logsumexp`` one element at a time at
about 14 ns each, while ``power(2, x)`` takes about 5 ns (measured on x86 with
``bench/run.py --only phases``); a forward pass of SmolLM2-135M over 1,062 tokens runs 49
million of them in its MLP gates and 25 million in the LM head's log-softmax. Here are
those two functions over ``2^x``, with backward passes that reuse what the forward
computed. They agree with MLX's own to float32 rounding; on GPUs, where MLX's fused
kernels are faster, the callers keep MLX's.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn

from mlx_pref.backend import backend_name

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _sigmoid(x: mx.array) -> mx.array:
    return 1 / (1 + mx.power(2.0, x * -LOG2E))


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``, the gated MLP of LLaMA-style blocks."""
    return gate * _sigmoid(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    s = _sigmoid(gate)
    silu = gate * s
    return cotangent * up * (s + silu * (1 - s)), cotangent * silu


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """Log-softmax of (N, V) float32 ``logits`` at (N,) ``targets``."""
    return _log_softmax_at(logits, targets)[0]


@mx.custom_function
def _log_softmax_at(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """The log-probs, and each row's log-sum-exp in base 2 for the backward pass."""
    scaled = logits * LOG2E
    top = scaled.max(axis=-1, keepdims=True)
    lse2 = top + mx.log2(mx.power(2.0, scaled - top).sum(axis=-1, keepdims=True))
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return (picked - lse2 * LN2)[:, 0], lse2


@_log_softmax_at.vjp
def _log_softmax_at_vjp(primals, cotangents, outputs):
    logits, targets = primals
    cotangent = cotangents[0][:, None]
    grad = -cotangent * mx.power(2.0, logits * LOG2E - outputs[1])  # -softmax
    at = targets[:, None]
    grad = mx.put_along_axis(grad, at, mx.take_along_axis(grad, at, axis=-1) + cotangent, axis=-1)
    return grad, mx.zeros_like(targets)


def install(body: nn.Module) -> None:
    """On the CPU, run the MLP gates of ``body``'s blocks through ``swiglu`` above: the
    model module's own ``swiglu`` (mlx-lm's, which most of its architectures call) is
    replaced in that module only. Idempotent; other backends are left alone."""
    if backend_name() != "cpu":
        return
    for layer in getattr(body, "layers", []):
        module = sys.modules.get(type(getattr(layer, "mlp", None)).__module__)
        if module is not None and getattr(module, "swiglu", None) is not None:
            module.swiglu = swiglu
