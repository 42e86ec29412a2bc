"""Log-probabilities of completion tokens, summed per sequence, without full-vocabulary copies.

The transformer body runs on every position, but the LM head (the largest single
elementwise cost: a vocabulary-wide logsumexp per position) runs only where a
completion token is predicted, gathered into one (M, D) matrix and processed in row
chunks, so no (N, T, V) logits tensor or log_softmax copy is ever built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_pref.data.batching import Batch

# Architectures whose forward is exactly ``head(model.model(tokens))``: for these the
# head can be applied to gathered positions only. Others fall back to full logits.
SPLIT_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"}
HEAD_CHUNK_ROWS = 1024


@dataclass
class SequenceLogps:
    """Per-sequence sums and the per-token values they came from."""

    sums: mx.array
    """(N,) summed log-probs of each row's completion tokens."""
    token_logps: mx.array
    """(M,) log-prob of every scored token, row-major."""
    rows: np.ndarray
    """(M,) which row each scored token belongs to."""


def split_lm(model: nn.Module) -> tuple[Callable, Callable] | None:
    """(body, head) for architectures where logits = head(body(tokens)), else None."""
    if getattr(model, "model_type", None) not in SPLIT_HEAD_TYPES or not hasattr(model, "model"):
        return None
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return model.model, model.model.embed_tokens.as_linear
    return model.model, model.lm_head


def _token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return picked - mx.logsumexp(logits, axis=-1)


def sequence_logps(model: nn.Module, batch: Batch) -> SequenceLogps:
    """Summed completion log-probs for every row of ``batch`` in one forward pass."""
    tokens = batch.tokens
    n, t = tokens.shape
    mask = batch.completion_mask()
    flat = np.flatnonzero(mask)
    rows = flat // (t - 1)
    targets = mx.array(tokens[:, 1:].reshape(-1)[flat])
    inputs = mx.array(tokens[:, :-1])
    gather = mx.array(flat.astype(np.int32))
    split = split_lm(model)
    if split is not None:
        body, head = split
        hidden = body(inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1])[gather]
        pieces = [
            _token_logps(head(hidden[i : i + HEAD_CHUNK_ROWS]), targets[i : i + HEAD_CHUNK_ROWS])
            for i in range(0, len(flat), HEAD_CHUNK_ROWS)
        ]
    else:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[gather]
        pieces = [_token_logps(logits, targets)]
    token_logps = mx.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    sums = mx.zeros((n,), dtype=mx.float32).at[mx.array(rows.astype(np.int32))].add(token_logps)
    return SequenceLogps(sums, token_logps, rows)
