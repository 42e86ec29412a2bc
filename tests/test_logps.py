"""Completion log-probs: the lean paths compute exactly what a full-logits forward does."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.llama import Model, ModelArgs

from mlx_pref.adapters import apply_lora
from mlx_pref.config import LoraConfig
from mlx_pref.data.batching import PairExample, UnpairedExample, collate
from mlx_pref.logps import row_logps, sequence_logps


@pytest.fixture(scope="module")
def model():
    mx.random.seed(0)
    args = ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
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


@pytest.mark.parametrize("share_prompt", [False, "always"])
def test_sums_match_a_full_vocabulary_log_softmax(model, share_prompt):
    batch = collate(PAIRS)
    ours = np.asarray(sequence_logps(model, batch, share_prompt=share_prompt).sums)
    np.testing.assert_allclose(ours, full_logits_reference(model, batch), rtol=1e-5, atol=1e-5)


def test_unpaired_rows_match_too(model):
    rows = [UnpairedExample((1, 2), (3, 4, 5), True), UnpairedExample((6,), (7,), False)]
    batch = collate(rows)
    np.testing.assert_allclose(
        np.asarray(sequence_logps(model, batch).sums),
        full_logits_reference(model, batch),
        atol=1e-5,
    )


def test_prompt_sharing_gives_the_same_gradients(model):
    batch = collate(PAIRS)
    weights = mx.arange(1, 7, dtype=mx.float32)

    def objective(share):
        return lambda: (sequence_logps(model, batch, share_prompt=share).sums * weights).sum()

    _, plain = nn.value_and_grad(model, objective(False))()
    _, shared = nn.value_and_grad(model, objective("always"))()
    for (key, a), (_, b) in zip(tree_flatten(plain), tree_flatten(shared)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4, err_msg=key)


def test_wpo_log_sum_p2_and_ld_summaries_agree_across_paths(model):
    batch = collate(PAIRS)
    plain = sequence_logps(model, batch, with_p2=True, share_prompt=False)
    shared = sequence_logps(model, batch, with_p2=True, share_prompt="always")
    np.testing.assert_allclose(
        np.asarray(plain.token_log_sum_p2), np.asarray(shared.token_log_sum_p2), atol=1e-5
    )
    ld_plain = np.asarray(row_logps(plain, batch, 0.5))
    ld_shared = np.asarray(row_logps(shared, batch, 0.5))
    np.testing.assert_allclose(ld_plain, ld_shared, atol=1e-5)
    # LD-DPO: the shorter completion's length counts fully, the rest at ld_alpha.
    tokens = [np.asarray(plain.token_logps)[plain.flat // plain.shape[1] == r] for r in range(6)]
    pair0 = (tokens[0][:2].sum() + 0.5 * tokens[0][2:].sum(), tokens[3][:2].sum())
    np.testing.assert_allclose([ld_plain[0], ld_plain[3]], pair0, atol=1e-5)


@pytest.mark.parametrize("share_prompt", [False, "always"])
def test_cuda_padding_to_multiples_of_128_changes_nothing(model, monkeypatch, share_prompt):
    batch = collate(PAIRS)
    plain = np.asarray(sequence_logps(model, batch, share_prompt=share_prompt).sums)
    monkeypatch.setattr("mlx_pref.logps.sequence_multiple", lambda: 128)
    padded = sequence_logps(model, batch, share_prompt=share_prompt)
    np.testing.assert_allclose(np.asarray(padded.sums), plain, atol=1e-5)


def test_sharing_is_used_only_where_it_saves_padded_slots():
    from mlx_pref.logps import _sharing_pays

    # Long shared prompts, short completions: one prompt pass is far cheaper.
    long_prompts = collate([PairExample(tuple(range(1, 41)), (41, 42), (43,)) for _ in range(4)])
    assert _sharing_pays(long_prompts, 1)
    # Ragged: a long prompt with a short answer beside a short prompt with a long answer.
    ragged = collate(
        [
            PairExample(tuple(range(1, 41)), (41,), (42,)),
            PairExample((1,), tuple(range(2, 42)), (3,)),
        ]
    )
    assert not _sharing_pays(ragged, 1)
