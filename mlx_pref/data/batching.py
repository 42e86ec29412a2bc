"""Tokenized examples and the batches the model stage consumes.

A batch is a matrix of sequences, each a prompt followed by one completion,
right-padded. Paired data puts the B chosen sequences first and the B rejected
sequences of the same prompts after them, so one forward pass scores both (TRL's
"concatenated forward"). Unpaired data (thumbs up/down rows) is the same matrix with a
label per row. Batches are built by length bucketing: examples are sorted by length
within seeded shuffled windows, cut into batches, and the batches shuffled, so each
batch pads little while the order stays random and exactly reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

PAD_ID = 0
"""Padding never reaches a loss: it sits after each sequence's end and is masked out."""


@dataclass(frozen=True)
class PairExample:
    """One tokenized preference pair. Completions end with EOS (TRL's convention)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    source: str = ""
    """Where it came from, ``file:line``, for messages."""
    images: tuple = ()
    """The prompt's images (``vision.images.ImageRef``); their tokens are in ``prompt``."""

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass(frozen=True)
class UnpairedExample:
    """One tokenized thumbs-up (label True) or thumbs-down (label False) completion."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    label: bool
    source: str = ""
    images: tuple = ()

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.completion)


Example = PairExample | UnpairedExample


@dataclass
class Batch:
    """Sequences ``prompt + completion`` right-padded into one matrix.

    ``paired``: rows ``[0, B)`` are chosen completions and rows ``[B, 2B)`` the rejected
    completions of the same prompts, in the same order. Otherwise ``labels`` says which
    rows are desirable. Token ``t`` of row ``i`` is scored (its log-prob counted) when
    ``prompt_lengths[i] <= t < lengths[i]``.
    """

    tokens: np.ndarray
    prompt_lengths: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    paired: bool
    indices: np.ndarray
    """Dataset positions of the examples in this batch (for per-example caches)."""
    images: list[tuple] | None = None
    """Each example's prompt images, in example order (None: no example has any)."""

    @property
    def completion_lengths(self) -> np.ndarray:
        return self.lengths - self.prompt_lengths

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_lengths.sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / self.tokens.size

    def completion_mask(self) -> np.ndarray:
        """(N, T-1) bool: True where the *target* token (position t+1) is scored."""
        positions = np.arange(1, self.tokens.shape[1])[None, :]
        return (positions >= self.prompt_lengths[:, None]) & (positions < self.lengths[:, None])


def collate(examples: Sequence[Example], indices: Sequence[int] | None = None) -> Batch:
    """Build one Batch from examples of one kind (all pairs or all unpaired rows)."""
    if indices is None:
        indices = range(len(examples))
    paired = isinstance(examples[0], PairExample)
    if paired:
        rows = [(e.prompt, e.chosen) for e in examples] + [(e.prompt, e.rejected) for e in examples]
        labels = np.array([True] * len(examples) + [False] * len(examples))
    else:
        rows = [(e.prompt, e.completion) for e in examples]
        labels = np.array([e.label for e in examples])
    lengths = np.array([len(p) + len(c) for p, c in rows], dtype=np.int32)
    tokens = np.full((len(rows), int(lengths.max())), PAD_ID, dtype=np.int32)
    for i, (p, c) in enumerate(rows):
        tokens[i, : len(p)] = p
        tokens[i, len(p) : len(p) + len(c)] = c
    return Batch(
        tokens=tokens,
        prompt_lengths=np.array([len(p) for p, _ in rows], dtype=np.int32),
        lengths=lengths,
        labels=labels,
        paired=paired,
        indices=np.asarray(list(indices), dtype=np.int64),
        images=[e.images for e in examples] if any(e.images for e in examples) else None,
    )


def drawn_from(batch: Batch, examples: Sequence[Example]) -> bool:
    """Whether ``batch`` holds exactly ``examples[batch.indices]`` (a hand-built batch with
    the same indices does not: per-example caches must not answer for it)."""
    idx = batch.indices
    if len(idx) == 0 or idx.min() < 0 or idx.max() >= len(examples):
        return False
    picked = [examples[i] for i in idx]
    if batch.paired != isinstance(picked[0], PairExample):
        return False
    rows = (
        [(e.prompt, e.chosen) for e in picked] + [(e.prompt, e.rejected) for e in picked]
        if batch.paired
        else [(e.prompt, e.completion) for e in picked]
    )
    if len(rows) != len(batch.lengths):
        return False
    return all(
        batch.lengths[i] == len(p) + len(c)
        and np.array_equal(batch.tokens[i, : batch.lengths[i]], np.asarray(p + c))
        for i, (p, c) in enumerate(rows)
    )


def batch_order(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    bucket: bool = True,
    window: int = 64,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """The epoch's batches as arrays of example indices, a pure function of its inputs.

    With ``bucket``, indices are shuffled, sorted by length within windows of
    ``window * batch_size`` examples, cut into batches, and the batches shuffled.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if bucket:
        lengths = np.asarray(lengths)
        span = window * batch_size
        order = np.concatenate(
            [
                chunk[np.argsort(lengths[chunk], kind="stable")]
                for chunk in np.array_split(order, max(1, -(-len(order) // span)))
            ]
        )
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iterate_batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    bucket: bool = True,
) -> Iterator[Batch]:
    """Yield the epoch's batches, a pure function of the examples, seed and epoch."""
    order = batch_order(
        [e.length for e in examples], batch_size, seed=seed, epoch=epoch, bucket=bucket
    )
    for idx in order:
        yield collate([examples[i] for i in idx], idx)


def padding_fraction(
    examples: Sequence[Example], batch_size: int, *, seed: int = 0, bucket: bool = True
) -> float:
    """Fraction of the epoch's batch cells that are padding (lower is better)."""
    total = real = 0
    for batch in iterate_batches(examples, batch_size, seed=seed, epoch=0, bucket=bucket):
        total += batch.tokens.size
        real += batch.num_tokens
    return 1.0 - real / total if total else 0.0


def mismatched(batch: Batch) -> Batch:
    """KTO's KL rows: each row's prompt with the previous row's completion, so the
    completions no longer answer their prompts."""
    rows = []
    for i in range(len(batch.lengths)):
        j = i - 1
        prompt = tuple(batch.tokens[i, : batch.prompt_lengths[i]].tolist())
        completion = tuple(batch.tokens[j, batch.prompt_lengths[j] : batch.lengths[j]].tolist())
        images = batch.images[i % batch.num_examples] if batch.images else ()
        rows.append(UnpairedExample(prompt, completion, True, images=images))
    return collate(rows, np.arange(len(rows)))


def bucket_keys(examples: Sequence[Example], share_prompt: bool = False) -> np.ndarray:
    """Length-bucketing sort keys. Rows sort by total length; for pairs whose prompt is
    shared, by prompt-length quartile and then completion length, so that both the shared
    prompt pass and the completion pass pad little (on hh-rlhf, 16% fewer padded slots
    than sorting by total length)."""
    if examples and isinstance(examples[0], PairExample) and share_prompt:
        prompts = np.array([len(e.prompt) for e in examples])
        completions = np.array([max(len(e.chosen), len(e.rejected)) for e in examples])
        quartile = np.searchsorted(np.quantile(prompts, [0.25, 0.5, 0.75]), prompts)
        return quartile * (completions.max() + 1) + completions
    return np.array([e.length for e in examples])


@dataclass
class BatchPlan:
    """Which examples every optimizer step of a run uses, a pure function of the step.

    An epoch is ordered in global batches of ``batch_size x world`` examples and each
    process takes its slice, so N processes with batch B see exactly what one process
    with batch N x B sees; ``grad_accum`` consecutive batches make one step.
    """

    examples: Sequence[Example]
    batch_size: int
    grad_accum: int = 1
    seed: int = 0
    share_prompt: bool = False
    world: int = 1
    rank: int = 0

    split: int = 1
    """Sub-batches per micro-batch (``memory.plan``)."""

    def __post_init__(self) -> None:
        self._epochs: dict[int, list[np.ndarray]] = {}
        self.keys = bucket_keys(self.examples, self.share_prompt)

    def shard(self, seed: int, epoch: int, drop_short: bool = True) -> list[np.ndarray]:
        """This process's share of each batch of an epoch. With several processes, a last
        batch too small to give each one a row is left out when ``drop_short``: every
        process must take part in every collective."""
        order = batch_order(self.keys, self.batch_size * self.world, seed=seed, epoch=epoch)
        if self.world == 1:
            return order
        if drop_short and order and len(order[-1]) < self.world:
            order = order[:-1]
        return [np.array_split(idx, self.world)[self.rank] for idx in order]

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """This process's batches of training epoch ``epoch`` (the last one is kept)."""
        if epoch not in self._epochs:
            self._epochs = {epoch: self.shard(self.seed, epoch)}
        return self._epochs[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.epoch(0)) // self.grad_accum)

    def step(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step ``step`` (0-based), each cut into ``split``
        sub-batches (the memory plan's: exact for losses that are per-example means)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch(epoch)
        ga = self.grad_accum
        return [
            collate([self.examples[i] for i in part], part)
            for idx in order[within * ga : (within + 1) * ga]
            for part in np.array_split(idx, min(self.split, len(idx)))
        ]
