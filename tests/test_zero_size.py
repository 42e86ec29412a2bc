"""No MLX op that mlx-pref issues ever sees a zero-size array.

MLX's CUDA backend (0.32.x) divides by zero in its kernel launch setup when a fused
elementwise kernel runs on a zero-size array, and on x86 hosts the process dies with
SIGFPE. ``nn.log_sigmoid`` is such a kernel, and BCO applied it to the empty side of an
unpaired batch with one label only. The CPU and Metal run the same graph without a
crash, so these tests do not wait for the GPU to fail: while they run, every
``mlx.core`` / ``mlx.nn`` function and every ``mx.array`` operator or method called from
mlx-pref's own code raises if one of its array operands or results has zero elements.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import _loss_reference as ref
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_pref import losses as L
from mlx_pref.data import embedded_data
from mlx_pref.losses import base as loss_base
from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer

# Dunder methods that build an op (the rest convert, compare identity or print).
OPERATORS = {
    "__abs__", "__add__", "__and__", "__div__", "__eq__", "__floordiv__", "__ge__",
    "__getitem__", "__gt__", "__invert__", "__le__", "__lshift__", "__lt__", "__matmul__",
    "__mod__", "__mul__", "__ne__", "__neg__", "__or__", "__pos__", "__pow__", "__radd__",
    "__rdiv__", "__rfloordiv__", "__rmod__", "__rmul__", "__rpow__", "__rshift__",
    "__rsub__", "__rtruediv__", "__sub__", "__truediv__", "__xor__",
}  # fmt: skip
NOT_OPS = {"array", "eval", "async_eval", "compile", "item", "tolist"}


class ZeroSizeOp(AssertionError):
    """An MLX op was called from mlx-pref with a zero-size operand or result."""


def _arrays(value) -> list[mx.array]:
    if isinstance(value, mx.array):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _arrays(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    return []


def _guarded(name: str, fn, seen: list[str]):
    def call(*args, **kwargs):
        caller = sys._getframe(1)
        if not caller.f_globals.get("__name__", "").startswith("mlx_pref"):
            return fn(*args, **kwargs)
        out = fn(*args, **kwargs)
        shapes = [tuple(a.shape) for a in _arrays([args, kwargs, out])]
        if any(math.prod(s) == 0 for s in shapes):
            where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
            seen.append(f"{name} on shapes {shapes} at {where}")
            raise ZeroSizeOp(seen[-1])
        return out

    return call


def _is_op(name: str, attr) -> bool:
    """Whether ``name`` builds an MLX op: public functions (not classes) of
    ``mlx.core`` / ``mlx.nn``, and ``mx.array``'s methods and operators."""
    if not callable(attr) or isinstance(attr, type) or name in NOT_OPS:
        return False
    return not name.startswith("_") or name in OPERATORS


@pytest.fixture
def no_zero_size(monkeypatch) -> list[str]:
    """Make every MLX op called from mlx_pref raise on a zero-size operand or result;
    yields the list of offending calls (a caller that swallowed the error still fails)."""
    seen: list[str] = []
    for owner, prefix in ((mx.array, "array"), (mx, "mx"), (nn, "nn")):
        for name in dir(owner):
            attr = getattr(owner, name)
            if _is_op(name, attr):
                monkeypatch.setattr(owner, name, _guarded(f"{prefix}.{name}", attr, seen))
    yield seen
    assert seen == []


def test_the_guard_catches_an_op_on_an_empty_array(no_zero_size):
    empty = mx.array(np.zeros(0, np.float32))
    with pytest.raises(ZeroSizeOp, match=r"nn.log_sigmoid on shapes \[\(0,\), \(0,\)\]"):
        loss_base.log_sigmoid(empty)  # what BCO ran on an empty side
    assert len(no_zero_size) == 1
    no_zero_size.clear()
    assert loss_base.log_sigmoid(mx.array([0.0])).item() == pytest.approx(-math.log(2))


def unpaired(seed: int, nc: int, nr: int) -> tuple[np.ndarray, ...]:
    """Desirable and undesirable policy / reference log-probs on a dyadic grid."""
    rng = np.random.default_rng(seed)

    def grid(x):
        return (np.round(np.asarray(x) * 1024) / 1024).astype(np.float32)

    c, r = grid(-rng.uniform(4, 40, nc)), grid(-rng.uniform(4, 40, nr))
    return c, r, grid(c + rng.normal(0, 3, nc)), grid(r + rng.normal(0, 3, nr))


def reference_losses(name, c, r, rc, rr, *, beta, state, train):
    """float64 per-row losses of ``name`` and its δ (BCO) from ``_loss_reference``."""
    if name == "bco":
        running = ref.RunningMomentsRef()
        moments = state.moments("bco")
        running.mean, running.var, running.count = moments.mean, moments.var, moments.count
        losses, *_ = ref.bco_reference(c, r, rc, rr, beta=beta, running=running, train=train)
        return losses
    if name == "kto":
        return ref.kto_reference(c, r, rc, rr, beta=beta)[0]
    return ref.apo_zero_unpaired_reference(c, r, rc, rr, beta=beta)


def primed_state() -> L.LossState:
    """A BCO state that has seen a few batches, so δ is not 0."""
    state = L.LossState()
    for seed in (1, 2):
        c, r, rc, rr = unpaired(seed, 3, 2)
        L.preference_loss("bco", c, r, rc, rr, beta=0.1, state=state)
    assert state.delta("bco") != 0.0
    return state


@pytest.mark.parametrize("loss", ["bco", "kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("sides", [(0, 4), (4, 0)], ids=["no-desirable", "no-undesirable"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_one_sided_batches_issue_no_op_on_the_empty_side(no_zero_size, loss, sides, train):
    c, r, rc, rr = unpaired(10 + sides[0], *sides)
    beta, state = 0.1, primed_state()
    expected = reference_losses(loss, c, r, rc, rr, beta=beta, state=state, train=train)
    out = L.preference_loss(loss, c, r, rc, rr, beta=beta, state=state, train=train)
    np.testing.assert_allclose(np.asarray(out.losses), expected, rtol=1e-5, atol=1e-7)
    assert float(out.loss) == pytest.approx(expected.mean(), rel=1e-5)
    assert out.chosen_rewards.shape == (sides[0],) and out.rejected_rewards.shape == (sides[1],)

    # The gradient reaches the side that has rows (δ fixed: evaluation mode).
    frozen = L.LossState()
    frozen.load_state_dict(state.state_dict())
    full = c if sides[0] else r

    def of(x):
        args = (x, r) if sides[0] else (c, x)
        return L.preference_loss(loss, *args, rc, rr, beta=beta, state=frozen, train=False).loss

    grad = np.asarray(mx.grad(of)(mx.array(full)), np.float64)
    h, numeric = 1e-4, []
    for i in range(len(full)):
        up, down = full.astype(np.float64), full.astype(np.float64)
        up[i] += h
        down[i] -= h
        pair = [(v, r) if sides[0] else (c, v) for v in (up, down)]
        f = [reference_losses(loss, *p, rc, rr, beta=beta, state=frozen, train=False).mean()
             for p in pair]  # fmt: skip
        numeric.append((f[0] - f[1]) / (2 * h))
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-8)


def test_bco_state_and_udm_weights_with_one_side_empty(no_zero_size):
    state = L.LossState()
    c, r, rc, rr = unpaired(20, 3, 0)
    out = L.preference_loss("bco", c, r, rc, rr, beta=0.1, state=state, udm_weights=r)
    rewards = 0.1 * (c.astype(np.float64) - rc)
    assert state.delta("bco") == pytest.approx(rewards.mean() * 3 / (3 + 1e-24), rel=1e-6)
    assert "bco/udm_weight_mean" not in out.metrics
    before = json.dumps(state.state_dict())
    c, r, rc, rr = unpaired(21, 0, 2)
    w = np.array([0.5, 2.0], np.float32)
    out = L.preference_loss("bco", c, r, rc, rr, beta=0.1, state=state, udm_weights=w, train=False)
    assert json.dumps(state.state_dict()) == before
    expected = w * -ref.log_sigmoid(-(0.1 * (r.astype(np.float64) - rr) - state.delta("bco")))
    np.testing.assert_allclose(np.asarray(out.losses), expected, rtol=1e-5, atol=1e-7)
    assert float(out.metrics["bco/udm_weight_mean"]) == 1.25


def test_a_weighted_unpaired_loss_with_one_side_empty(no_zero_size):
    c, r, rc, rr = unpaired(30, 0, 5)
    state = L.LossState()
    out = L.preference_loss({"bco": 0.5, "kto": 0.5}, c, r, rc, rr, beta=0.1, state=state)
    bco = ref.bco_reference(c, r, rc, rr, beta=0.1, running=ref.RunningMomentsRef())[0]
    kto = ref.kto_reference(c, r, rc, rr, beta=0.1)[0]
    assert float(out.loss) == pytest.approx(0.5 * bco.mean() + 0.5 * kto.mean(), rel=1e-5)


def one_label_rows(path: Path, n: int, label: bool) -> Path:
    """``n`` unpaired rows of the embedded data, all with ``label`` (True: the chosen
    completions, False: the rejected ones)."""
    pairs = [json.loads(line) for line in embedded_data()[0].read_text().splitlines()[:n]]
    side = "chosen" if label else "rejected"
    rows = [{"prompt": p["prompt"], "completion": p[side], "label": label} for p in pairs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("loss,start", [("bco", math.log(2)), ("kto", 0.5)])
def test_training_and_evaluation_on_one_label_batches(
    no_zero_size, make_config, tmp_path, loss, start
):
    """Every training batch lacks undesirable rows, every eval batch desirable ones."""
    cfg = make_config(
        loss=loss,
        data=str(one_label_rows(tmp_path / "good.jsonl", 16, True)),
        eval_data=str(one_label_rows(tmp_path / "bad.jsonl", 8, False)),
        max_steps=2,
        eval_every=2,
    )
    final = Trainer(cfg, verbose=False).train()
    records = read_metrics(cfg.output)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    # Step 0: zero adapters, policy == reference, every reward 0 (and BCO's δ still 0).
    assert evals[0]["eval/loss"] == pytest.approx(start, abs=1e-6)
    assert all(r["rewards/rejected"] == 0.0 and r["logps/rejected"] == 0.0 for r in train)
    assert all(r["eval/rewards/chosen"] == 0.0 for r in evals)
    assert all(math.isfinite(r["loss"]) and r["logps/chosen"] < 0 for r in train)
    assert math.isfinite(final["eval/loss"]) and final["eval/rewards/rejected"] != 0.0
    if loss == "bco":
        assert train[0]["delta"] == 0.0 and train[1]["delta"] != 0.0
