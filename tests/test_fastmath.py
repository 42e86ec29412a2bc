"""The CPU's silu (native kernel, or MLX through powers of two): MLX's values and gradients."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from _numerics import NUMERICS
from mlx_lm.models import llama

from mlx_pref import fastmath, native
from mlx_pref.backend import backend_name

TOL = NUMERICS.tolerance(1e-5)


@pytest.mark.parametrize("kernels", ["native", "mlx"])
def test_swiglu_equals_silu_times_up_with_its_gradients(kernels, monkeypatch):
    if kernels == "mlx":
        monkeypatch.setattr(native, "load", lambda: None)
    elif native.load() is None:
        pytest.skip(native.reason())
    rng = np.random.default_rng(0)
    # gates far into both tails too, where 2^x overflows or vanishes
    gate = mx.array(np.concatenate([rng.normal(0, 4, 500), [-200, -90, 90, 200]]), mx.float32)
    up, weights = (mx.array(rng.normal(size=504).astype(np.float32)) for _ in range(2))

    def plain(g, u):
        return nn.silu(g) * u

    np.testing.assert_allclose(
        np.asarray(fastmath.swiglu(gate, up)), np.asarray(plain(gate, up)), rtol=TOL, atol=TOL
    )
    ours = mx.grad(lambda g, u: (fastmath.swiglu(g, u) * weights).sum(), (0, 1))(gate, up)
    want = mx.grad(lambda g, u: (plain(g, u) * weights).sum(), (0, 1))(gate, up)
    for got, expected in zip(ours, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=TOL, atol=TOL)


def test_installed_on_the_cpu_only():
    """The model module's own ``swiglu`` is replaced on the CPU, left as mlx-lm's elsewhere."""
    args = llama.ModelArgs(
        model_type="llama", hidden_size=16, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=10,
    )  # fmt: skip
    model = llama.Model(args)
    fastmath.install(model.model)
    assert (llama.swiglu is fastmath.swiglu) == (backend_name() == "cpu")
