"""Packed blockwise attention: the plain softmax attention's outputs and gradients, with
memory that grows linearly with the length."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from _numerics import NUMERICS

from mlx_pref import native
from mlx_pref.attention import PackedAttention, Segments

TOL = NUMERICS.tolerance(1e-5)


def segments(prompts: list[int], completions: list[list[int]]) -> Segments:
    """A packed row: each prompt, then its completions (which also see the prompt)."""
    seg, parent, position, start = [], [], [], []

    def add(n: int, parent_seg: int, first_position: int) -> None:
        start.append(len(seg))
        seg.extend([len(start) - 1] * n)
        parent.extend([parent_seg] * n)
        position.extend(range(first_position, first_position + n))

    for prompt, group in zip(prompts, completions):
        at = len(start)
        add(prompt, -1, 0)
        for n in group:
            add(n, at, prompt)
    return Segments(*(np.asarray(a) for a in (seg, parent, position, start)))


def plain_attention(q, k, v, allowed: np.ndarray, scale: float) -> mx.array:
    """Softmax over every key with a dense mask, grouped-query heads repeated."""
    groups = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
    scores = mx.where(mx.array(allowed), (q * scale) @ k.swapaxes(-1, -2), -mx.inf)
    return mx.softmax(scores, axis=-1) @ v


ROWS = {
    # ragged prompts, several completions each, one-token segments, blocks across segments
    "ragged pairs": segments([5, 70, 1, 33], [[9, 1], [40, 66], [3, 2], [1, 80]]),
    "one long row": segments([150], [[]]),
    "unpaired rows": segments([17, 64, 8], [[12], [1], [100]]),
}


def kernel_available(kernel: str) -> str:
    """``kernel``, skipping the test where the native kernels cannot be built here (no
    compiler, Python headers or nanobind: ``test_native_kernels_build`` checks that)."""
    if kernel == "native" and native.load() is None:
        pytest.skip(native.reason())
    return kernel


def test_native_kernels_build_where_a_compiler_and_nanobind_are():
    if not sys.platform.startswith("linux"):
        pytest.skip("the native kernels are built on Linux")
    have = shutil.which("g++") and importlib.util.find_spec("nanobind")
    have = have and Path(sysconfig.get_paths()["include"], "Python.h").exists()
    if not have:
        pytest.skip("no g++, nanobind or Python headers here")
    assert native.load() is not None, native.reason()


KERNELS = ["blocks", "native", "fused"]
"""``fused``: MLX's fused attention as CUDA runs it, the row padded to a multiple of 128
inside attention (on the CPU MLX composes it from ops, so the padding is what is tested)."""


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS)
def test_outputs_and_gradients_equal_the_plain_attention(row, block, kernel):
    kernel = kernel_available(kernel)
    n = len(row.segment)
    rng = np.random.default_rng(n + block)
    q, k, v, weights = (
        mx.array(rng.normal(size=(1, h, n, 16)).astype(np.float32)) for h in (6, 2, 2, 6)
    )
    for window in (None, 7):  # sliding-window layers see only the last ``window`` positions
        layout = PackedAttention(row, block=block)
        layout.window = window
        allowed = np.asarray(layout.mask(0, n, 0))

        got = layout.attend(q, k, v, scale=0.3, kernel=kernel)
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(plain_attention(q, k, v, allowed, 0.3)), atol=TOL
        )
        grads = mx.grad(
            lambda *a, layout=layout: (layout.attend(*a, scale=0.3, kernel=kernel) * weights).sum(),
            (0, 1, 2),
        )
        want_grads = mx.grad(
            lambda *a, allowed=allowed: (plain_attention(*a, allowed, 0.3) * weights).sum(),
            (0, 1, 2),
        )
        grads, want_grads = grads(q, k, v), want_grads(q, k, v)
        for got, expected in zip(grads, want_grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=TOL)


@pytest.mark.parametrize("kernel", ["blocks", "native"])
def test_a_layers_probabilities_never_exist_at_once(kernel):
    """At 4,096 tokens one layer's probabilities are 9 heads x 4096^2 / 2 floats (302 MB).
    Forward and backward hold the masks (a float per visible pair: 34 MB), the inputs'
    gradients and a few blocks' probabilities: 102-123 MB measured on the CPU."""
    kernel = kernel_available(kernel)
    n, heads, d = 4096, 9, 64
    row = segments([n], [[]])
    rng = np.random.default_rng(0)
    q = mx.array(rng.normal(size=(1, heads, n, d)).astype(np.float32))
    k, v = (mx.array(rng.normal(size=(1, 3, n, d)).astype(np.float32)) for _ in range(2))
    layout = PackedAttention(row)
    grad = mx.grad(
        lambda q, k, v: layout.attend(q, k, v, scale=0.125, kernel=kernel).sum(), (0, 1, 2)
    )
    mx.eval(q, k, v)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(grad(q, k, v))
    extra = mx.get_peak_memory() - before
    probabilities = heads * n * n / 2 * 4
    assert extra < 0.5 * probabilities, (extra, probabilities)


@pytest.mark.parametrize("threads", [1, 3])
def test_native_gradients_are_the_same_bits_on_any_number_of_threads(threads, monkeypatch):
    """The native backward sums each key's gradient in a fixed order (two lanes per kv
    head), so a resumed run reproduces its steps exactly on a busier or larger machine."""
    kernel_available("native")
    row = ROWS["ragged pairs"]
    n = len(row.segment)
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.normal(size=(1, h, n, 16)).astype(np.float32)) for h in (6, 2, 2))

    def grads():
        layout = PackedAttention(row, block=16)
        f = mx.grad(lambda *a: layout.attend(*a, scale=0.3, kernel="native").sum(), (0, 1, 2))
        return [np.asarray(g) for g in f(q, k, v)]

    monkeypatch.setattr(native, "threads", lambda: 2)
    want = grads()
    monkeypatch.setattr(native, "threads", lambda: threads)
    for got, expected in zip(grads(), want):
        np.testing.assert_array_equal(got, expected)


def test_without_the_native_kernels_attention_runs_in_mlx(tmp_path, monkeypatch):
    """A cache folder that cannot be created: ``native.load`` says why and returns None,
    and attention falls back to MLX's ops with the same values."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(native, "kernel_dir", lambda: blocker / "cache")
    monkeypatch.setattr(native, "load", native.load.__wrapped__)
    assert native.load() is None
    assert native.reason().startswith("the native kernels could not be built or loaded")
    row = ROWS["unpaired rows"]
    n = len(row.segment)
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.normal(size=(1, h, n, 16)).astype(np.float32)) for h in (6, 2, 2))
    layout = PackedAttention(row)
    allowed = np.asarray(layout.mask(0, n, 0))
    np.testing.assert_allclose(
        np.asarray(layout.attend(q, k, v, scale=0.3)),
        np.asarray(plain_attention(q, k, v, allowed, 0.3)),
        atol=TOL,
    )
