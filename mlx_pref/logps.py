"""Log-probabilities of completion tokens, summed per sequence, without full-vocabulary copies.

The transformer body runs on every position, but the LM head (the largest single
elementwise cost: a vocabulary-wide logsumexp per position) runs only where a
completion token is predicted, gathered into one (M, D) matrix and processed in row
chunks, so no (N, T, V) logits tensor or log_softmax copy is ever built.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_causal_mask

from mlx_pref.backend import sequence_multiple
from mlx_pref.data.batching import Batch
from mlx_pref.losses import ld_sequence_logps, log_sum_squared_probs, wpo_pair_weights

# Architectures whose forward is exactly ``head(model.model(tokens))``: for these the
# head can be applied to gathered positions only. Others fall back to full logits.
# Prompt sharing needs mlx-lm's cache mask hook with left padding (mlx-lm 0.28+); without
# it every batch takes the concatenated forward.
PREFIX_MASKS = "left_padding" in inspect.signature(create_causal_mask).parameters
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


def _token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return picked - mx.logsumexp(logits, axis=-1)


def _token_logps_p2(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    lse = mx.logsumexp(logits, axis=-1)
    return picked - lse, log_sum_squared_probs(logits, lse)


_HEAD_FNS = {
    (False, False): _token_logps,
    (True, False): _token_logps_p2,
    (False, True): mx.compile(_token_logps, shapeless=True),
    (True, True): mx.compile(_token_logps_p2, shapeless=True),
}
_compiled = False


def set_compile(enabled: bool) -> None:
    """Fuse the head's log-softmax arithmetic with ``mx.compile`` (config ``compile``)."""
    global _compiled
    _compiled = enabled


def _head_logps(logits: mx.array, targets: mx.array, with_p2: bool):
    out = _HEAD_FNS[(with_p2, _compiled)](logits, targets)
    return out if with_p2 else (out, None)


def score_hidden(
    hidden: mx.array, head: Callable, flat: np.ndarray, targets: np.ndarray, with_p2: bool
) -> tuple[mx.array, mx.array | None]:
    """Log-probs of ``targets`` at the ``flat`` positions of ``hidden`` (head in row chunks)."""
    gather = mx.array(flat.astype(np.int32))
    hidden = hidden.reshape(-1, hidden.shape[-1])[gather]
    targets = mx.array(targets)
    pieces = [
        _head_logps(
            head(hidden[i : i + HEAD_CHUNK_ROWS]), targets[i : i + HEAD_CHUNK_ROWS], with_p2
        )
        for i in range(0, len(flat), HEAD_CHUNK_ROWS)
    ]
    token_logps = mx.concatenate([p[0] for p in pieces])
    return token_logps, mx.concatenate([p[1] for p in pieces]) if with_p2 else None


def _summed(n: int, flat: np.ndarray, width: int, token_logps: mx.array) -> mx.array:
    rows = mx.array((flat // width).astype(np.int32))
    return mx.zeros((n,), dtype=mx.float32).at[rows].add(token_logps)


def sequence_logps(
    model: nn.Module,
    batch: Batch,
    *,
    with_p2: bool = False,
    share_prompt: bool | str = True,
) -> SequenceLogps:
    """Summed completion log-probs for every row of ``batch``.

    Paired batches can run each prompt once and both completions against its cache:
    ``share_prompt`` True does so when that touches fewer padded token slots,
    ``"always"`` whenever possible, False never; otherwise one forward pass over the
    concatenated rows. ``with_p2`` also returns ``log Σ_v p_v²`` per scored token (WPO).
    """
    split = split_lm(model)
    multiple = sequence_multiple()
    possible = (
        PREFIX_MASKS and split is not None and batch.paired and batch.prompt_lengths.min() > 0
    )
    if possible and (share_prompt == "always" or (share_prompt and _sharing_pays(batch, multiple))):
        return _shared_prompt_logps(*split, batch, with_p2, multiple)
    if (batch.tokens.shape[1] - 1) % multiple:  # padding after every row's end changes nothing
        width = _round_up(batch.tokens.shape[1] - 1, multiple) + 1
        padded = np.zeros((len(batch.tokens), width), dtype=batch.tokens.dtype)
        padded[:, : batch.tokens.shape[1]] = batch.tokens
        batch = dataclasses.replace(batch, tokens=padded)
    tokens = batch.tokens
    n, t = tokens.shape
    flat = np.flatnonzero(batch.completion_mask())
    targets = tokens[:, 1:].reshape(-1)[flat]
    inputs = mx.array(tokens[:, :-1])
    if split is not None:
        body, head = split
        token_logps, p2 = score_hidden(body(inputs), head, flat, targets, with_p2)
    else:  # unknown architecture: full logits, gathered before the log-softmax
        token_logps, p2 = score_hidden(model(inputs), lambda h: h, flat, targets, with_p2)
    return SequenceLogps(_summed(n, flat, t - 1, token_logps), token_logps, flat, (n, t - 1), p2)


def _sharing_pays(batch: Batch, multiple: int) -> bool:
    """Whether one prompt pass plus completions against its cache touches fewer padded
    token slots than one pass over the concatenated rows (ragged prompts can make the
    left-padded prompt plus right-padded completions wider than the rows themselves)."""
    b, n = batch.num_examples, len(batch.lengths)
    shared = b * _round_up(int(batch.prompt_lengths.max()), multiple)
    shared += n * _round_up(int(batch.completion_lengths.max()) - 1, multiple)
    return shared < 0.9 * n * _round_up(batch.tokens.shape[1] - 1, multiple)


class PrefixCache:
    """A differentiable per-layer KV cache for completions that follow a shared prompt.

    Prompts are left-padded to one length: ``offset`` holds each row's true position
    (for rotary embeddings) and the mask hides the padding, so every row computes
    exactly what it would unpadded. Keys and values are concatenated, never written in
    place, so gradients flow back into the prompt's pass.
    """

    def __init__(self, left_padding: mx.array):
        self.left_padding = left_padding
        self.offset = -left_padding
        self.keys = self.values = None
        self._idx = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.offset = self.offset + (keys.shape[2] - self._idx)
        self.keys, self.values, self._idx = keys, values, keys.shape[2]
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None, **_):
        return create_causal_mask(
            n, offset=self._idx, left_padding=self.left_padding, window_size=window_size
        )

    def repeat(self, times: int) -> None:
        """Serve ``times`` completions per prompt: rows are tiled along the batch axis."""
        self.keys = mx.concatenate([self.keys] * times)
        self.values = mx.concatenate([self.values] * times)
        self.left_padding = mx.concatenate([self.left_padding] * times)
        self.offset = mx.concatenate([self.offset] * times)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _shared_prompt_logps(body, head, batch: Batch, with_p2: bool, multiple: int) -> SequenceLogps:
    """Chosen and rejected completions scored against one pass over their shared prompt."""
    b, n = batch.num_examples, len(batch.lengths)
    plen = batch.prompt_lengths[:b]
    width = _round_up(int(plen.max()), multiple)
    prompts = np.zeros((b, width), dtype=np.int32)
    for i, p in enumerate(plen):
        prompts[i, width - p :] = batch.tokens[i, :p]
    clen = batch.completion_lengths
    longest = _round_up(int(clen.max()) - 1, multiple) + 1
    completions = np.zeros((n, longest), dtype=np.int32)
    for i in range(n):
        start = batch.prompt_lengths[i]
        completions[i, : clen[i]] = batch.tokens[i, start : start + clen[i]]
    caches = [PrefixCache(mx.array(width - plen)) for _ in body.layers]
    last = body(mx.array(prompts), cache=caches)[:, -1:, :]  # predicts each first completion token
    hidden = mx.concatenate([last, last])
    if longest > 1:
        for cache in caches:
            cache.repeat(2)
        hidden = mx.concatenate([hidden, body(mx.array(completions[:, :-1]), cache=caches)], axis=1)
    flat = np.flatnonzero(np.arange(longest)[None, :] < clen[:, None])
    token_logps, p2 = score_hidden(hidden, head, flat, completions.reshape(-1)[flat], with_p2)
    return SequenceLogps(
        _summed(n, flat, longest, token_logps), token_logps, flat, (n, longest), p2
    )


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
