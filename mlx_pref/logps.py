"""Log-probabilities of completion tokens, summed per sequence, with no padding and no
full-vocabulary copies.

A batch is packed into one row (``attention.py``): each prompt once, then the completions
that follow it, every token at its true position; chosen and rejected both attend to their
shared prompt, never to each other. So no slot is padding and each prompt is run once. The
transformer body runs on every token, but the LM head (the largest single elementwise
cost: a vocabulary-wide logsumexp per position) runs only where a completion token is
predicted, in row chunks, so no (N, T, V) logits tensor or log_softmax copy is built.
Models whose attention layers the packing hooks do not fit get right-padded rows instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_pref import attention, fastmath, native
from mlx_pref.backend import backend_name
from mlx_pref.data.batching import Batch
from mlx_pref.losses import (
    empty_rows,
    ld_sequence_logps,
    log_sum_squared_probs,
    wpo_pair_weights,
)

# Architectures whose forward is exactly ``head(model.model(tokens))``: for these the
# head can be applied to gathered positions only. Others fall back to full logits.
SPLIT_HEAD_TYPES = {
    "llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3",
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
}  # fmt: skip
HEAD_CHUNK_ROWS = 1024
FORWARDS: dict[type, Callable[..., SequenceLogps]] = {}
"""Model classes whose batches another forward scores, ``forward(model, batch, *, with_p2,
share_prompt)``: ``vision.model`` registers the vision-language models it loads."""


@dataclass(frozen=True)
class Recompute:
    """What the backward pass recomputes instead of keeping (the memory plan decides):
    each LM-head chunk's logits. (Attention always recomputes its probabilities one block
    at a time: ``attention.flash_attention``.)"""

    head: bool = False


@dataclass
class SequenceLogps:
    """Per-sequence sums and the per-token values they came from."""

    sums: mx.array
    """(N,) summed log-probs of each row's completion tokens."""
    token_logps: mx.array
    """(M,) log-prob of every scored token, row by row."""
    rows: np.ndarray
    """(M,) the row each scored token belongs to."""
    cols: np.ndarray
    """(M,) its place among its row's scored completion tokens."""
    num_rows: int
    token_log_sum_p2: mx.array | None = None
    """(M,) log Σ_v p_v² at each scored token (only when asked for: WPO)."""
    routed: np.ndarray | None = None
    """One entry per token the model ran on, in order: how many of the batch's rows it
    stands for (2 for a prompt token a pair shares, 0 for padding). The weight of each
    token in a MoE router's load-balancing loss, so that it equals the loss over the rows
    run one by one, as TRL's concatenated forward runs them."""

    @property
    def width(self) -> int:
        return int(self.cols.max()) + 1 if len(self.cols) else 1

    def dense(self, values: mx.array) -> mx.array:
        """Per-token ``values`` (M,) laid out as (N, width), zeros elsewhere (each slot is
        written once, so the result does not depend on the order of the writes)."""
        slots = mx.array((self.rows * self.width + self.cols).astype(np.int32))
        grid = mx.zeros((self.num_rows * self.width,), dtype=values.dtype).at[slots].add(values)
        return grid.reshape(self.num_rows, self.width)

    def mask(self) -> mx.array:
        grid = np.zeros((self.num_rows, self.width), dtype=np.float32)
        grid[self.rows, self.cols] = 1.0
        return mx.array(grid)


def row_sums(token_logps: mx.array, rows: np.ndarray, num_rows: int) -> mx.array:
    """Per-row sums of per-token values in a fixed order: a masked reduction, not a
    scatter-add (whose float atomics make GPU results vary between runs)."""
    if token_logps.size == 0:
        return mx.zeros((num_rows,), dtype=mx.float32)
    member = mx.array(rows[None, :] == np.arange(num_rows)[:, None])
    return mx.where(member, token_logps[None, :], 0.0).sum(axis=1)


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


@mx.custom_function
def _native_token_logps(logits: mx.array, targets: mx.array) -> list[mx.array]:
    """``_token_logps`` by the native CPU kernel (``native.py``): (log-probs, logsumexp)."""
    return native.load().token_logps(logits, targets, native.threads())


@_native_token_logps.vjp
def _native_token_logps_vjp(primals, cotangents, outputs):
    logits, targets = primals
    kernels = native.load()
    d = kernels.token_logps_grad(logits, targets, outputs[1], cotangents[0], native.threads())
    return d[0].astype(logits.dtype), mx.zeros_like(targets)


def _head_logps(logits: mx.array, targets: mx.array, with_p2: bool):
    if not with_p2 and backend_name() == "cpu" and native.load() is not None:
        return _native_token_logps(logits, targets)[0], None
    out = _HEAD_FNS[(with_p2, _compiled)](logits, targets)
    return out if with_p2 else (out, None)


def score_hidden(
    hidden: mx.array,
    head: Callable,
    index: np.ndarray,
    targets: np.ndarray,
    with_p2: bool,
    recompute: bool = False,
) -> tuple[mx.array, mx.array | None]:
    """Log-probs of ``targets`` predicted by the hidden states at flat positions ``index``
    (the head in row chunks; with ``recompute``, each chunk's logits are computed again
    in the backward pass instead of being kept: the head must then be frozen)."""
    if len(index) == 0:
        empty = empty_rows()  # no op on a zero-size array (see ``losses.empty_rows``)
        return empty, (empty if with_p2 else None)
    hidden = hidden.reshape(-1, hidden.shape[-1])[mx.array(index.astype(np.int32))]
    targets = mx.array(targets)

    def chunk(rows: mx.array, i: int) -> list[mx.array]:
        out = _head_logps(head(rows), targets[i : i + HEAD_CHUNK_ROWS], with_p2)
        return [a for a in out if a is not None]

    out = _recomputed(chunk)(hidden) if recompute else _in_turn(chunk, hidden)
    return out[0], (out[1] if with_p2 else None)


def _in_turn(chunk: Callable, hidden: mx.array) -> list[mx.array]:
    """``chunk(rows, i)`` over the row chunks of ``hidden``, each after the one before (MLX
    would run independent chunks side by side, holding every chunk's logits: 4.8 GB for
    8,192 rows of a 49,152-entry vocabulary), its outputs concatenated."""
    pieces: list[list[mx.array]] = []
    for i in range(0, hidden.shape[0], HEAD_CHUNK_ROWS):
        rows = hidden[i : i + HEAD_CHUNK_ROWS]
        pieces.append(chunk(mx.depends(rows, pieces[-1]) if pieces else rows, i))
    return [mx.concatenate(parts) for parts in zip(*pieces)]


def _as_list(a) -> list[mx.array]:
    return list(a) if isinstance(a, (list, tuple)) else [a]


def _recomputed(chunk: Callable) -> Callable[[mx.array], list[mx.array]]:
    """``_in_turn`` whose backward pass recomputes each chunk's logits right before its
    gradient, one chunk after another too. The head's own weights get no gradient: it
    must be frozen (the memory plan does not recompute a training head)."""

    @mx.custom_function
    def run(hidden: mx.array):
        return tuple(_in_turn(chunk, hidden))

    @run.vjp
    def backward(primals, cotangents, outputs):
        hidden, cotangents = _as_list(primals)[0], _as_list(cotangents)
        grads: list[mx.array] = []
        for i in range(0, hidden.shape[0], HEAD_CHUNK_ROWS):
            rows = hidden[i : i + HEAD_CHUNK_ROWS]
            cots = [c[i : i + HEAD_CHUNK_ROWS] for c in cotangents]
            if grads:
                rows, *cots = mx.depends([rows, *cots], [grads[-1]])
            grads += mx.vjp(lambda r, i=i: chunk(r, i), [rows], cots)[1]
        return mx.concatenate(grads)

    return lambda hidden: _as_list(run(hidden))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Packed:
    """A batch laid out as one packed row, and where each completion token is predicted."""

    tokens: np.ndarray
    segments: attention.Segments
    index: np.ndarray
    """Position of the hidden state that predicts each scored token (rows in batch order)."""
    targets: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    routed: np.ndarray
    """Per token: the rows it stands for (``SequenceLogps.routed``)."""


def pack(batch: Batch, share_prompt: bool = True, multiple: int = 1) -> Packed:
    """Lay ``batch`` out as one row: per example its prompt (once for a pair when
    ``share_prompt``), then its completions. The row is padded at the end to a multiple
    of ``multiple`` with a segment of its own, which no scored token sees."""
    tokens, segment, parent, position, start, routed = [], [], [], [], [], []
    index, targets, rows, cols = [], [], [], []
    n_rows = len(batch.lengths)
    groups = (
        [[i, i + batch.num_examples] for i in range(batch.num_examples)]
        if batch.paired and share_prompt
        else [[i] for i in range(n_rows)]
    )

    def add(ids: np.ndarray, seg: int, par: int, pos0: int, rows: int = 1) -> int:
        at = len(tokens)
        start.append(at)
        tokens.extend(ids.tolist())
        segment.extend([seg] * len(ids))
        parent.extend([par] * len(ids))
        position.extend(range(pos0, pos0 + len(ids)))
        routed.extend([rows] * len(ids))
        return at

    for group in groups:
        plen = int(batch.prompt_lengths[group[0]])
        prompt_seg = len(start)
        prompt_at = add(batch.tokens[group[0], :plen], prompt_seg, -1, 0, len(group))
        for row in group:
            completion = batch.tokens[row, plen : batch.lengths[row]]
            at = add(completion, len(start), prompt_seg, plen)
            for j, token in enumerate(completion.tolist()):
                if plen + j == 0:
                    continue  # no token before it predicts it
                index.append(prompt_at + plen - 1 if j == 0 else at + j - 1)
                targets.append(token)
                rows.append(row)
                cols.append(j)
    pad = _round_up(len(tokens), multiple) - len(tokens)
    if pad:
        add(np.zeros(pad, dtype=np.int32), len(start), -1, 0, rows=0)
    order = np.lexsort((np.array(cols), np.array(rows)))  # row by row, as rows are numbered
    arrays = [np.asarray(a) for a in (index, targets, rows, cols)]
    index_, targets_, rows_, cols_ = (a[order] if len(a) else a for a in arrays)
    segments = attention.Segments(
        np.asarray(segment), np.asarray(parent), np.asarray(position), np.asarray(start)
    )
    return Packed(np.asarray(tokens, dtype=np.int32), segments, index_,
                  targets_.astype(np.int32), rows_, cols_, np.asarray(routed))  # fmt: skip


def packed_logps(
    model: nn.Module,
    batch: Batch,
    *,
    with_p2: bool = False,
    share_prompt: bool = True,
    recompute: Recompute = Recompute(),
) -> SequenceLogps | None:
    """Summed completion log-probs of every row of ``batch`` from one packed row, or None
    for a model the packing hooks do not fit."""
    split = split_lm(model)
    if split is None or not attention.install(split[0]):
        return None
    body, head = split
    fastmath.install(body)
    packed = pack(batch, share_prompt)
    layout = attention.PackedAttention(packed.segments)
    positions = mx.array(packed.segments.position.astype(np.int32))
    caches = [attention.PackedContext(layout, positions) for _ in body.layers]
    hidden = body(mx.array(packed.tokens[None]), cache=caches)
    token_logps, p2 = score_hidden(
        hidden, head, packed.index, packed.targets, with_p2, recompute.head
    )
    n = len(batch.lengths)
    sums = row_sums(token_logps, packed.rows, n)
    return SequenceLogps(sums, token_logps, packed.rows, packed.cols, n, p2, packed.routed)


def padded_logps(model: nn.Module, batch: Batch, *, with_p2: bool = False) -> SequenceLogps:
    """Summed completion log-probs from right-padded rows (any architecture: full logits
    where the head cannot be split off)."""
    tokens = batch.tokens
    n, t = tokens.shape
    mask = batch.completion_mask()
    rows, positions = np.nonzero(mask)
    flat = rows * (t - 1) + positions
    targets = tokens[:, 1:].reshape(-1)[flat]
    cols = np.concatenate([np.arange(k) for k in np.bincount(rows, minlength=n)]).astype(int)
    inputs = mx.array(tokens[:, :-1])
    split = split_lm(model)
    if split is not None:
        body, head = split
        fastmath.install(body)
        token_logps, p2 = score_hidden(body(inputs), head, flat, targets, with_p2)
    else:  # unknown architecture: full logits, gathered before the log-softmax
        token_logps, p2 = score_hidden(model(inputs), lambda h: h, flat, targets, with_p2)
    routed = (np.arange(t - 1)[None, :] < batch.lengths[:, None]).reshape(-1)
    return SequenceLogps(row_sums(token_logps, rows, n), token_logps, rows, cols, n, p2, routed)


def sequence_logps(
    model: nn.Module,
    batch: Batch,
    *,
    with_p2: bool = False,
    share_prompt: bool = True,
    layout: str = "auto",
    recompute: Recompute = Recompute(),
) -> SequenceLogps:
    """Summed completion log-probs for every row of ``batch``.

    ``layout``: ``packed`` (one row, no padding; ``share_prompt`` runs a pair's prompt
    once), ``padded`` (right-padded rows), or ``auto`` (packed where the model allows).
    ``with_p2`` also returns ``log Σ_v p_v²`` per scored token (WPO).
    ``recompute``: what the backward pass computes again instead of keeping.
    A model class in ``FORWARDS`` is scored by its own forward instead.
    """
    other = FORWARDS.get(type(model))
    if other is not None:
        return other(model, batch, with_p2=with_p2, share_prompt=share_prompt)
    if layout != "padded":
        out = packed_logps(
            model, batch, with_p2=with_p2, share_prompt=share_prompt,
            recompute=recompute,
        )  # fmt: skip
        if out is not None or layout == "packed":
            if out is None:
                raise ValueError(f"{type(model).__name__}: packed rows are not supported")
            return out
    return padded_logps(model, batch, with_p2=with_p2)


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
