"""The ``cache`` reference: log-probs scored once per row, the first time a step uses it.

Values live on disk under a fingerprint of everything they depend on: the scoring
model's weights, quantization and dtype, the reference adapter's weights, LD-DPO's
alpha, and the tokenized examples (which already encode the tokenizer, chat template,
data and truncation settings) with the bytes of their images. A changed input changes the fingerprint, so a stale cache
is never read. The file holds each row's value and whether it was scored yet: a run
scores only the rows its steps use and saves them with each checkpoint, and a resumed
run, a second epoch or another loss of a sweep reads them back. ``prepare`` (the
``cache-ref`` command) scores every row up front.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_pref.backend import all_sum, distributed_group
from mlx_pref.checkpoint import write_atomic
from mlx_pref.data.batching import Batch, collate, drawn_from, iterate_batches
from mlx_pref.progress import Progress
from mlx_pref.reference.strategies import Reference

CACHE_FORMAT = "mlx-pref-ref-logps-2"
CACHE_BATCH_SIZE = 8

_fingerprints: dict[tuple, str] = {}


def model_fingerprint(model_path: Path) -> str:
    """SHA-256 over the model's weight files and config.json (content, not names or dates);
    remembered per file size and modification time within a process."""
    if model_path.is_file():
        files = [model_path]
    else:
        files = sorted(model_path.glob("*.safetensors")) + sorted(model_path.glob("config.json"))
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]


def dataset_fingerprint(examples) -> str:
    """SHA-256 over the token ids (and labels) of every example, in order, and over the
    bytes of its images (their digests: the tokens of an image say only its size)."""
    digest = hashlib.sha256()
    for e in examples:
        parts = (
            (e.prompt, e.chosen, e.rejected)
            if hasattr(e, "chosen")
            else (e.prompt, e.completion, (int(e.label),))
        )
        for part in parts:
            digest.update(np.asarray(part, dtype=np.int64).tobytes())
            digest.update(b"|")
        for image in e.images:
            digest.update(f"image:{image.digest}|".encode())
    return digest.hexdigest()


class _Split:
    """One dataset's cached values: (N, 2) for pairs, (N,) for unpaired rows, plus which
    rows are scored; ``dirty`` until saved."""

    def __init__(self, dataset, path: Path, values: np.ndarray, known: np.ndarray):
        self.dataset, self.path, self.values, self.known = dataset, path, values, known
        self.dirty = False

    def rows(self, idx: np.ndarray) -> np.ndarray:
        if self.dataset.paired:
            return np.concatenate([self.values[idx, 0], self.values[idx, 1]])
        return self.values[idx]

    def fill(self, idx: np.ndarray, logps: np.ndarray) -> None:
        k = len(idx)
        if self.dataset.paired:
            self.values[idx, 0], self.values[idx, 1] = logps[:k], logps[k:]
        else:
            self.values[idx] = logps
        self.known[idx] = True
        self.dirty = True

    def merge(self, group) -> None:
        """Every process's scored rows (a row scored twice gets the mean of its values)."""
        known = self.known.astype(np.float32)
        weight = known[:, None] if self.values.ndim == 2 else known
        count = np.asarray(all_sum(mx.array(weight), group))
        total = np.asarray(all_sum(mx.array(self.values * weight), group))
        self.values = (total / np.maximum(count, 1)).astype(np.float32)
        self.known = count.reshape(len(self.known), -1)[:, 0] > 0


class Cached(Reference):
    """Reference log-probs scored by ``scorer`` once per example and kept on disk."""

    name = "cache"

    def __init__(
        self,
        scorer: Reference,
        base_fingerprint: str,
        cache_dir: Path,
        reason: str = "",
        log: Callable[[str], None] = print,
        show_progress: bool = True,
    ):
        super().__init__(reason, scorer.ld_alpha)
        self.show_progress = show_progress
        self.scorer = scorer
        self.base_fingerprint = base_fingerprint
        self.cache_dir = Path(cache_dir)
        self.log = log
        self.datasets: dict = {}
        self.splits: dict[str, _Split] = {}
        self.computed_rows = 0
        """Dataset rows (pairs, or unpaired rows) scored by the reference model in this
        process (0 when every row used was cached)."""

    def describe(self) -> str:
        text = f"{self.name} (scored by {self.scorer.name})"
        return f"{text}: {self.reason}" if self.reason else text

    @property
    def weights(self) -> dict[str, mx.array] | None:
        return self.scorer.weights

    @property
    def values(self) -> dict[str, np.ndarray]:
        """The values held in memory, by split (rows not scored yet are 0)."""
        return {split: cached.values for split, cached in self.splits.items()}

    def set_weights(self, weights: dict[str, mx.array] | None) -> None:
        self.flush()
        self.scorer.set_weights(weights)
        self.splits.clear()  # other values under the new fingerprint, found or scored anew

    def fingerprint(self, examples) -> str:
        digest = hashlib.sha256(
            f"{CACHE_FORMAT}|{self.base_fingerprint}|ld={self.ld_alpha}|".encode()
        )
        if self.weights is not None:
            for name in sorted(self.weights):
                digest.update(name.encode())
                digest.update(np.asarray(self.weights[name].astype(mx.float32)).tobytes())
        digest.update(dataset_fingerprint(examples).encode())
        return digest.hexdigest()[:32]

    def path_for(self, split: str) -> Path:
        return self.cache_dir / f"{self.fingerprint(self.datasets[split].examples)}.safetensors"

    def attach(self, datasets: dict) -> None:
        self.datasets.update({k: v for k, v in datasets.items() if v is not None})
        for split in datasets:
            self.splits.pop(split, None)

    def _split(self, split: str) -> _Split:
        if split in self.splits:
            return self.splits[split]
        dataset = self.datasets[split]
        path = self.path_for(split)
        n = len(dataset)
        values = np.zeros((n, 2) if dataset.paired else (n,), dtype=np.float32)
        known = np.zeros(n, dtype=bool)
        if path.exists():
            try:
                saved = mx.load(str(path))
                stored, mask = np.asarray(saved["logps"]), np.asarray(saved["known"]).astype(bool)
                if stored.shape != values.shape or mask.shape != known.shape:
                    raise ValueError("shape")
                values, known = stored.astype(np.float32), mask
                self.log(
                    f"reference log-probs for {split}: {known.sum()} of {n} rows cached in {path}"
                )
            except (RuntimeError, ValueError, KeyError):
                self.log(f"warning: unreadable reference cache {path}; scoring anew")
        self.splits[split] = _Split(dataset, path, values, known)
        return self.splits[split]

    def logps(self, batch: Batch, split: str = "train") -> mx.array:
        dataset = self.datasets.get(split)
        if dataset is None or not drawn_from(batch, dataset.examples):
            return self.scorer.live_logps(batch)  # not a batch of the cached rows
        cached = self._split(split)
        idx = batch.indices
        missing = idx[~cached.known[idx]]
        if len(missing):  # score only the rows not scored yet
            if len(missing) < len(idx):
                batch = collate([dataset.examples[i] for i in missing], missing)
            cached.fill(missing, np.asarray(self.scorer.live_logps(batch)))
            self.computed_rows += len(missing)
        return mx.array(cached.rows(idx))

    def prepare(self, datasets: dict, orders: dict | None = None) -> None:
        """Score every row not yet cached (each process its share), then save. ``orders``:
        this process's batches of a split, as index arrays, scored first (the batches the
        run will use, so the values are those a live pass over them gives, to the last
        bit); rows they leave out are scored in batches of their own."""
        self.attach(datasets)
        group = distributed_group()
        for split, idx_list in (orders or {}).items():
            examples = self.datasets[split].examples
            batches = [collate([examples[i] for i in idx], idx) for idx in idx_list]
            self._score(split, self._split(split), batches)
        self.flush()  # every process's rows, known to all before the rest is shared out
        for split, dataset in self.datasets.items():
            rest = list(iterate_batches(dataset.examples, CACHE_BATCH_SIZE, seed=0, epoch=0))
            self._score(split, self._split(split), rest[group.rank() :: group.size()])
        self.flush()

    def _score(self, split: str, cached: _Split, todo: list[Batch]) -> None:
        batches = [b for b in todo if not cached.known[b.indices].all()]
        if not batches:
            return
        bar = Progress(len(batches), enabled=self.show_progress, unit="batch", plain_lines=True)
        bar.message(f"scoring reference log-probs for {split} ({len(cached.dataset)} examples)")
        for i, batch in enumerate(batches, 1):
            cached.fill(batch.indices, np.asarray(self.scorer.live_logps(batch)))
            self.computed_rows += batch.num_examples
            bar.update(i, {})
        bar.close()

    def flush(self) -> None:
        """Write the rows scored since the last save. Every process calls it: each holds
        the rows of its own batches, merged here before the first process writes."""
        group = distributed_group()
        for split, cached in self.splits.items():
            dirty = cached.dirty
            if group.size() > 1:
                dirty = float(all_sum(mx.array(float(dirty)))) > 0
                if dirty:
                    cached.merge(group)
            if dirty:
                self._save(split, cached)
            cached.dirty = False

    def _save(self, split: str, cached: _Split) -> None:
        if distributed_group().rank() != 0:
            return
        cached.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": CACHE_FORMAT, "dataset": cached.dataset.name}
        arrays = {
            "logps": mx.array(cached.values),
            "known": mx.array(cached.known.astype(np.uint8)),
        }
        write_atomic(cached.path, lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=meta))

    def live_logps(self, batch: Batch) -> mx.array:
        return self.scorer.live_logps(batch)

    def as_model(self):
        return self.scorer.as_model()
