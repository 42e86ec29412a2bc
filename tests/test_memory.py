"""The memory plan: its estimate against MLX's measured peak, the choices it makes, and the
attention kernel each backend gets."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from _numerics import NUMERICS
from mlx.utils import tree_flatten

from mlx_pref import memory
from mlx_pref.adapters import adapter_parameters, apply_lora
from mlx_pref.backend import attention_kernel
from mlx_pref.config import LoraConfig
from mlx_pref.data.batching import PairExample, collate
from mlx_pref.errors import ConfigError
from mlx_pref.logps import Recompute, sequence_logps
from mlx_pref.models import embedded_root, enable_grad_checkpoint, load_model
from mlx_pref.train import Trainer


def pairs(length: int, n: int = 4, seed: int = 0) -> list[PairExample]:
    """``n`` pairs of ``length`` tokens each side (half prompt, half completion)."""
    rng = np.random.default_rng(seed)
    half = length // 2
    return [
        PairExample(*(tuple(rng.integers(3, 2000, half).tolist()) for _ in range(3)))
        for _ in range(n)
    ]


def measured_peak(examples, settings: memory.Settings) -> tuple[float, float]:
    """MLX's peak over one forward and backward of the embedded model, and the estimate."""
    model = load_model(None).model
    apply_lora(model, LoraConfig(r=8, alpha=16))
    if settings.checkpoint_every:
        enable_grad_checkpoint(model, settings.checkpoint_every)
    mx.eval(model.parameters())
    trainable = sum(v.size for v in adapter_parameters(model).values())
    batch = collate(examples)
    grad = nn.value_and_grad(
        model, lambda: sequence_logps(model, batch, recompute=settings.recompute).sums.sum()
    )
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()  # the model, and whatever earlier tests keep alive
    value, grads = grad()
    mx.eval(value, grads)
    # Counted from this model's own weights so other live arrays do not skew the peak;
    # AdamW's two moments are not allocated here, the estimate's fixed part counts them.
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    peak = mx.get_peak_memory() - before + weights + 2 * 4 * trainable
    shape = memory.Shape.of(model)
    guess = memory.estimate(shape, memory.fixed_bytes(model), memory.step_size(examples), settings)
    return peak, guess.total


SETTINGS = {
    "everything kept": memory.Settings(),
    "head recomputed": memory.Settings(recompute=Recompute(head=True)),
    "every block checkpointed": memory.Settings(checkpoint_every=1),
    "every other block": memory.Settings(recompute=Recompute(head=True), checkpoint_every=2),
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS)
@pytest.mark.parametrize("length", [64, 256])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(length, settings):
    peak, guess = measured_peak(pairs(length), settings)
    assert abs(guess / peak - 1) < 0.25, (guess, peak)


def test_the_plan_takes_the_cheapest_settings_that_fit():
    shape = memory.Shape(30, 576, 1536, 9, 3, 64, 49152)
    fixed = 0.6e9
    small = memory.step_size(pairs(128, 4))
    big = memory.step_size(pairs(2048, 4))
    assert memory.plan(shape, fixed, small, limit="8GB").settings == memory.Settings()
    chosen = memory.plan(shape, fixed, big, limit="4GB", decomposable=True).settings
    assert chosen.split == 4 and memory.estimate(shape, fixed, big, chosen).total <= 4 * 2**30
    # A loss that is not a per-example mean is never split: blocks are checkpointed instead.
    kept = memory.plan(shape, fixed, big, limit="4GB", decomposable=False).settings
    assert kept.split == 1 and kept.checkpoint_every
    with pytest.raises(ConfigError, match="lower batch_size or max_length"):
        memory.plan(shape, fixed, big, limit="1GB")
    # grad_checkpoint: false is never overruled; true checkpoints every block.
    with pytest.raises(ConfigError):
        memory.plan(shape, fixed, big, limit="2GB", checkpoint=False)
    assert (
        memory.plan(shape, fixed, small, limit="8GB", checkpoint=True).settings.checkpoint_every
        == 1
    )


def test_sub_batches_give_the_whole_batch_step(make_config, tmp_path):
    """A per-example loss cut into sub-batches: the same loss, gradient and update."""
    one = Trainer(make_config(output=str(tmp_path / "one")), verbose=False)
    two = Trainer(make_config(output=str(tmp_path / "two")), verbose=False)
    two.plan.split = 2
    batches = one.step_batches(0)
    assert len(two.step_batches(0)) == 2 * len(batches)
    a, b = one.train_step(batches), two.train_step(two.step_batches(0))
    tol = NUMERICS.tolerance
    assert b.loss == pytest.approx(a.loss, rel=tol(1e-6))
    assert b.metrics["grad_norm"] == pytest.approx(a.metrics["grad_norm"], rel=tol(1e-5))
    for key, value in adapter_parameters(one.model).items():
        np.testing.assert_allclose(
            np.asarray(value), np.asarray(adapter_parameters(two.model)[key]), atol=tol(1e-6)
        )


def test_every_run_prints_its_plan_and_an_impossible_one_stops_first(tmp_path):
    run = [sys.executable, "-m", "mlx_pref.cli", "train", "--max-steps", "1", "--eval-every",
           "100", "--output", str(tmp_path / "run")]  # fmt: skip
    ok = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "memory plan: ~" in ok.stderr and "everything kept" in ok.stderr
    far = subprocess.run([*run[:-2], "--output", str(tmp_path / "far"), "--max-length", "100000"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert far.returncode == 2 and far.stderr.count("\n") == 1, far.stderr
    assert far.stderr.startswith("error: max_length 100000")
    assert not (tmp_path / "far").exists()
    # Within the model's context but past any budget: the plan says so before data loads.
    tight = [*run[:-2], "--output", str(tmp_path / "tight"), "--memory-limit", "10MB",
             "--max-length", "512", "--batch-size", "64"]  # fmt: skip
    result = subprocess.run(tight, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "raise memory_limit" in result.stderr, result.stderr
    assert embedded_root("tiny-chat").is_dir()


def test_each_backend_gets_the_attention_it_can_train_with():
    # The CPU composes attention; Metal falls back to composed attention in training.
    for dtype in ("float32", "bfloat16"):
        assert attention_kernel("cpu", dtype, 64) == "blocks"
        assert attention_kernel("metal", dtype, 64) == "blocks"
    # CUDA: cuDNN's fused forward and backward for half precision and head dims <= 128.
    assert attention_kernel("cuda", "bfloat16", 64) == "fused"
    assert attention_kernel("cuda", "float16", 128) == "fused"
    assert attention_kernel("cuda", "float32", 64) == "blocks"
    assert attention_kernel("cuda", "bfloat16", 256) == "blocks"


def test_a_training_head_is_never_recomputed():
    """A recomputed LM head passes no gradient to its own weights: under full fine-tuning
    (the head or the tied embedding trains) the plan must keep the head's logits."""
    model = load_model(None).model
    apply_lora(model, LoraConfig(r=8, alpha=16))
    assert not memory.head_trains(model)
    model.unfreeze()
    assert memory.head_trains(model)
    lean = memory.candidates(True, 4, 4, head_trains=False)
    full = memory.candidates(True, 4, 4, head_trains=True)
    assert any(s.recompute.head for s in lean)
    assert not any(s.recompute.head for s in full)
    assert [s.checkpoint_every for s in full if s.checkpoint_every] == [4, 3, 2, 1]
