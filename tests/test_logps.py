"""Completion log-probs: the lean paths compute exactly what a full-logits forward does."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from _numerics import NUMERICS
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.llama import Model, ModelArgs

from mlx_pref import native
from mlx_pref.adapters import apply_lora
from mlx_pref.config import LoraConfig
from mlx_pref.data.batching import PairExample, UnpairedExample, collate
from mlx_pref.logps import Recompute, pack, row_logps, score_hidden, sequence_logps
from mlx_pref.models import enable_grad_checkpoint

TOL = NUMERICS.tolerance(1e-5)
"""Lean paths against the full-logits reference: float32 rounding in another order."""


def tiny_model(layers: int = 2) -> Model:
    """A small random Llama with LoRA adapters whose weights are random too."""
    mx.random.seed(0)
    args = ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=layers, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50,
    )  # fmt: skip
    m = Model(args)
    apply_lora(m, LoraConfig(r=4))
    rng = np.random.default_rng(0)
    m.update(tree_unflatten([
        (k, mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32)))
        for k, v in tree_flatten(m.trainable_parameters())
    ]))  # fmt: skip
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# Ragged prompts and completions, including one-token completions.
PAIRS = [
    PairExample((1, 2, 3), (4, 5, 6), (7, 8)),
    PairExample((9,), (10, 11, 12, 13), (14,)),
    PairExample((3, 4, 5, 6, 7), (8,), (9,)),
]


def full_logits_reference(model, batch) -> np.ndarray:
    """log_softmax over the whole vocabulary at every position, masked to completions."""
    logits = model(mx.array(batch.tokens[:, :-1])).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, mx.array(batch.tokens[:, 1:])[..., None], axis=-1)[..., 0]
    return (np.asarray(picked) * batch.completion_mask()).sum(axis=1)


LAYOUTS = {
    "padded": {"layout": "padded"},
    "packed": {"layout": "packed"},
    "packed, prompts not shared": {"layout": "packed", "share_prompt": False},
    "packed, recomputed": {"layout": "packed", "recompute": Recompute(head=True)},
}


@pytest.mark.parametrize("options", LAYOUTS.values(), ids=LAYOUTS)
def test_sums_match_a_full_vocabulary_log_softmax(model, options):
    batch = collate(PAIRS)
    ours = np.asarray(sequence_logps(model, batch, **options).sums)
    np.testing.assert_allclose(ours, full_logits_reference(model, batch), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_unpaired_rows_match_too(model, layout):
    rows = [UnpairedExample((1, 2), (3, 4, 5), True), UnpairedExample((6,), (7,), False)]
    batch = collate(rows)
    np.testing.assert_allclose(
        np.asarray(sequence_logps(model, batch, layout=layout).sums),
        full_logits_reference(model, batch),
        atol=TOL,
    )


def test_packed_rows_give_the_padded_gradients(model):
    batch = collate(PAIRS)
    weights = mx.arange(1, 7, dtype=mx.float32)

    def objective(**options):
        return lambda: (sequence_logps(model, batch, **options).sums * weights).sum()

    _, plain = nn.value_and_grad(model, objective(layout="padded"))()
    for options in list(LAYOUTS.values())[1:]:
        _, packed = nn.value_and_grad(model, objective(**options))()
        for (key, a), (_, b) in zip(tree_flatten(plain), tree_flatten(packed)):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL, err_msg=key
            )


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_blocks_and_recomputed_head_give_the_same_gradients(every):
    """Checkpointed blocks (every one, or every other) and a recomputed LM head change what
    the backward pass keeps, not the gradients."""
    batch = collate(PAIRS)
    weights = mx.arange(1, 7, dtype=mx.float32)
    grads = {}
    for name in ("plain", "checkpointed"):
        m = tiny_model(layers=4)
        recompute = Recompute()
        if name == "checkpointed":
            enable_grad_checkpoint(m, every)
            recompute = Recompute(head=True)
        _, grads[name] = nn.value_and_grad(
            m, lambda m=m, r=recompute: (sequence_logps(m, batch, recompute=r).sums * weights).sum()
        )()
    for (key, a), (_, b) in zip(tree_flatten(grads["plain"]), tree_flatten(grads["checkpointed"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, err_msg=key)


def test_wpo_log_sum_p2_and_ld_summaries_agree_across_layouts(model):
    batch = collate(PAIRS)
    plain = sequence_logps(model, batch, with_p2=True, layout="padded")
    packed = sequence_logps(model, batch, with_p2=True, layout="packed")
    np.testing.assert_allclose(
        np.asarray(plain.token_log_sum_p2), np.asarray(packed.token_log_sum_p2), atol=TOL
    )
    ld_plain = np.asarray(row_logps(plain, batch, 0.5))
    ld_packed = np.asarray(row_logps(packed, batch, 0.5))
    np.testing.assert_allclose(ld_plain, ld_packed, atol=TOL)
    # LD-DPO: the shorter completion's length counts fully, the rest at ld_alpha.
    tokens = [np.asarray(plain.token_logps)[plain.rows == r] for r in range(6)]
    pair0 = (tokens[0][:2].sum() + 0.5 * tokens[0][2:].sum(), tokens[3][:2].sum())
    np.testing.assert_allclose([ld_plain[0], ld_plain[3]], pair0, atol=TOL)


def test_packing_leaves_no_padding_and_runs_each_prompt_once():
    batch = collate(PAIRS)
    packed = pack(batch)
    prompts = sum(len(p.prompt) for p in PAIRS)
    completions = sum(len(p.chosen) + len(p.rejected) for p in PAIRS)
    assert len(packed.tokens) == prompts + completions
    assert len(pack(batch, share_prompt=False).tokens) == 2 * prompts + completions
    # Every completion token is scored, from the hidden state just before it.
    assert len(packed.index) == batch.num_completion_tokens


def test_row_sums_are_a_fixed_order_reduction(model, tmp_path):
    """Two runs give the same sums and gradients (bit-identical where the backend
    promises it), and the sums' graph holds no scatter-add (whose float atomics reorder
    additions on a GPU)."""
    batch = collate(PAIRS)
    runs = []
    for _ in range(2):
        value, grads = nn.value_and_grad(model, lambda: sequence_logps(model, batch).sums.sum())()
        runs.append((np.asarray(value), [np.asarray(g) for _, g in tree_flatten(grads)]))
    NUMERICS.assert_repeated(runs[1][0], runs[0][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        NUMERICS.assert_repeated(b, a)
    seq = sequence_logps(model, batch)
    mx.export_to_dot(str(tmp_path / "sums.dot"), seq.sums)
    assert "Scatter" not in (tmp_path / "sums.dot").read_text()


@pytest.mark.parametrize("kernels", ["native", "mlx"])
def test_the_heads_log_probs_and_gradients_equal_a_float64_log_softmax(kernels, monkeypatch):
    """``score_hidden`` on a 5,000-entry vocabulary (a row nearly one-hot among them),
    against log-softmax in float64: the native CPU kernel and MLX's own path."""
    if kernels == "mlx":
        monkeypatch.setattr(native, "load", lambda: None)
    elif native.load() is None:
        pytest.skip(native.reason())
    rng = np.random.default_rng(0)
    rows, width, vocab = 40, 16, 5000
    hidden = rng.normal(size=(rows, width)).astype(np.float32)
    weight = rng.normal(0, 0.5, size=(vocab, width)).astype(np.float32)
    weight[7] *= 40  # row 0's logit for token 7 dominates
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    targets[0] = 7
    w = rng.normal(size=rows)
    head = nn.Linear(width, vocab, bias=False)
    head.weight = mx.array(weight)

    def loss(h):
        logps, _ = score_hidden(h, head, np.arange(rows), targets, with_p2=False)
        return (logps * mx.array(w.astype(np.float32))).sum(), logps

    (_, got), grad = mx.value_and_grad(loss)(mx.array(hidden))
    logits = hidden.astype(np.float64) @ weight.T.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    want = logits[np.arange(rows), targets] - lse
    onehot = np.eye(vocab)[targets]
    want_grad = (w[:, None] * (onehot - np.exp(logits - lse[:, None]))) @ weight
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=10 * TOL, atol=10 * TOL)
