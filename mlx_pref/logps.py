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
from mlx_pref.losses import ld_sequence_logps, wpo_pair_weights

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
    flat: np.ndarray
    """(M,) each scored token's position in the flattened (N, T-1) target grid."""
    shape: tuple[int, int]
    """(N, T-1): rows and target positions of the batch."""
    token_log_sum_p2: mx.array | None = None
    """(M,) log Σ_v p_v² at each scored token (only when asked for: WPO)."""

    def dense(self, values: mx.array) -> mx.array:
        """Per-token ``values`` (M,) scattered onto the (N, T-1) grid, zeros elsewhere."""
        n, t = self.shape
        grid = (
            mx.zeros((n * t,), dtype=values.dtype)
            .at[mx.array(self.flat.astype(np.int32))]
            .add(values)
        )
        return grid.reshape(n, t)

    def mask(self) -> mx.array:
        n, t = self.shape
        grid = np.zeros(n * t, dtype=np.float32)
        grid[self.flat] = 1.0
        return mx.array(grid.reshape(n, t))


def split_lm(model: nn.Module) -> tuple[Callable, Callable] | None:
    """(body, head) for architectures where logits = head(body(tokens)), else None."""
    if getattr(model, "model_type", None) not in SPLIT_HEAD_TYPES or not hasattr(model, "model"):
        return None
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return model.model, model.model.embed_tokens.as_linear
    return model.model, model.lm_head


def _token_logps(
    logits: mx.array, targets: mx.array, with_p2: bool
) -> tuple[mx.array, mx.array | None]:
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    lse = mx.logsumexp(logits, axis=-1)
    p2 = mx.logsumexp(2 * logits, axis=-1) - 2 * lse if with_p2 else None
    return picked - lse, p2


def sequence_logps(model: nn.Module, batch: Batch, *, with_p2: bool = False) -> SequenceLogps:
    """Summed completion log-probs for every row of ``batch`` in one forward pass.

    ``with_p2`` also returns ``log Σ_v p_v²`` per scored token (WPO's weights).
    """
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
            _token_logps(
                head(hidden[i : i + HEAD_CHUNK_ROWS]), targets[i : i + HEAD_CHUNK_ROWS], with_p2
            )
            for i in range(0, len(flat), HEAD_CHUNK_ROWS)
        ]
    else:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[gather]
        pieces = [_token_logps(logits, targets, with_p2)]
    token_logps = mx.concatenate([p[0] for p in pieces])
    p2 = mx.concatenate([p[1] for p in pieces]) if with_p2 else None
    sums = mx.zeros((n,), dtype=mx.float32).at[mx.array(rows.astype(np.int32))].add(token_logps)
    return SequenceLogps(sums, token_logps, flat, (n, t - 1), p2)


def row_logps(seq: SequenceLogps, batch: Batch, ld_alpha: float | None = None) -> mx.array:
    """The per-row log-probs a loss sees: sums, or LD-DPO's length-desensitised sums
    (full weight on the shorter completion's length, ``ld_alpha`` past it) for pairs."""
    if ld_alpha is None or not batch.paired:
        return seq.sums
    b = batch.num_examples
    tokens, mask = seq.dense(seq.token_logps), seq.mask()
    chosen, rejected = ld_sequence_logps(tokens[:b], mask[:b], tokens[b:], mask[b:], ld_alpha)
    return mx.concatenate([chosen, rejected])


def wpo_weights(seq: SequenceLogps, batch: Batch) -> mx.array:
    """WPO's per-pair weights from the policy's own token probabilities (no gradient)."""
    b = batch.num_examples
    tokens = mx.stop_gradient(seq.dense(seq.token_logps))
    p2 = mx.stop_gradient(seq.dense(seq.token_log_sum_p2))
    mask = seq.mask()
    return wpo_pair_weights(tokens[:b], p2[:b], mask[:b], tokens[b:], p2[b:], mask[b:])
