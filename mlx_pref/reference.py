"""Reference strategies: where a loss's reference log-probs come from, cheaply and never stale.

Every strategy answers ``logps(batch, split)`` with the reference's summed completion
log-probs for each row of the batch (None for reference-free losses):

- ``adapters-off``: the policy's own frozen base, its adapters swapped out for the
  forward pass (or swapped for the *reference adapter*: an SFT adapter the run started
  from, or the student copied in by a refresh). No second copy of the base weights.
- ``model``: a separate frozen model (``ref_model``), sharing the tokenizer.
- ``cache``: one of the above run once over each dataset, stored on disk under a
  fingerprint of everything the values depend on (base weights, quantization, dtype,
  reference adapter weights, the tokenized examples, which already encode the
  tokenizer, chat template, data and truncation settings). A changed input changes the
  fingerprint, so a stale cache is never read; a matching cache from any earlier run or
  loss sweep is reused without recomputation.
- ``none``: reference-free losses (SimPO, CPO, ORPO, ``reference_free`` DPO).

Reference refresh (``ref_regen_epochs``, TR-DPO ``sync_ref_model``) replaces the
reference adapter; a cache keyed on the old weights simply stops matching and is
recomputed on next use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_pref.adapters import adapter_parameters, adapters_disabled, set_adapter_parameters
from mlx_pref.backend import all_sum, distributed_group
from mlx_pref.checkpoint import write_atomic
from mlx_pref.data.batching import Batch, drawn_from, iterate_batches
from mlx_pref.logps import row_logps, sequence_logps
from mlx_pref.progress import Progress

CACHE_FORMAT = "mlx-pref-ref-logps-1"
CACHE_BATCH_SIZE = 8


def _hash_arrays(digest, arrays: dict[str, mx.array]) -> None:
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.asarray(arrays[name].astype(mx.float32)).tobytes())


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
    """SHA-256 over the token ids (and labels) of every example, in order."""
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
    return digest.hexdigest()


@contextmanager
def reference_weights(model: nn.Module, weights: dict[str, mx.array] | None) -> Iterator[None]:
    """Evaluate ``model`` as the reference: adapters off, or swapped for ``weights``."""
    was_training = model.training
    model.eval()  # no dropout in the reference
    try:
        if weights is None:
            with adapters_disabled(model):
                yield
        else:
            saved = adapter_parameters(model)
            set_adapter_parameters(model, weights)
            try:
                yield
            finally:
                set_adapter_parameters(model, saved)
    finally:
        model.train(was_training)


def mix_adapters(
    policy: dict[str, mx.array], reference: dict[str, mx.array] | None, alpha: float
) -> dict[str, mx.array]:
    """LoRA weights whose update equals ``alpha * policy + (1 - alpha) * reference`` exactly.

    A LoRA update is ``A @ B``; the blend of two is the product of the concatenated
    factors ``[A_p, A_r] @ [[alpha B_p], [(1 - alpha) B_r]]``, so rank grows by r per
    soft sync. When it reaches the layer's full rank it is recompressed exactly (QR +
    SVD), so memory never exceeds a dense update of the adapted layers. A missing
    reference means the base (zero update).
    """
    if alpha == 1.0:
        return dict(policy)
    if any(k.endswith(".m") for k in policy):
        raise ValueError("soft reference sync (ref_model_mixup_alpha < 1) is not defined for DoRA")
    out = {}
    for key in policy:
        if not key.endswith(".lora_a"):
            continue
        stem = key[: -len(".lora_a")]
        a_p, b_p = policy[stem + ".lora_a"], policy[stem + ".lora_b"]
        if reference is None:
            a, b = a_p, alpha * b_p
        else:
            a = mx.concatenate([a_p, reference[stem + ".lora_a"]], axis=1)
            b = mx.concatenate([alpha * b_p, (1 - alpha) * reference[stem + ".lora_b"]], axis=0)
        limit = min(a.shape[0], b.shape[1])
        if a.shape[1] > limit:
            a, b = _recompress(a, b, limit)
        out[stem + ".lora_a"], out[stem + ".lora_b"] = a, b
    return out


def _recompress(a: mx.array, b: mx.array, rank: int) -> tuple[mx.array, mx.array]:
    """Factors of rank ``rank`` with the same product ``a @ b`` (exact when rank(a@b) <= rank)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    qa, ra = np.linalg.qr(a64)
    qb, rb = np.linalg.qr(b64.T)
    u, s, vt = np.linalg.svd(ra @ rb.T)
    new_a = (qa @ u[:, :rank]) * s[:rank]
    new_b = (qb @ vt[:rank].T).T
    return mx.array(new_a.astype(np.float32)), mx.array(new_b.astype(np.float32))


class Reference:
    """Reference-free: no reference log-probs."""

    name = "none"

    def __init__(self, reason: str = "", ld_alpha: float | None = None, share_prompt: bool = True):
        self.reason = reason
        self.ld_alpha = ld_alpha
        """LD-DPO: summarise pairs as the policy does, so both sides match."""
        self.share_prompt = share_prompt
        self.held_out: dict[tuple, mx.array] = {}
        """Held-out batches already scored: eval batches repeat and the reference is frozen."""

    def logps(self, batch: Batch, split: str = "train") -> mx.array | None:
        """Summed completion log-probs of every row of ``batch`` under the reference."""
        if split == "train":  # new rows every step: nothing to keep
            return self._score(batch)
        key = (split, batch.indices.tobytes())
        if key not in self.held_out:
            self.held_out[key] = self._score(batch)
        return self.held_out[key]

    def _score(self, batch: Batch) -> mx.array | None:
        with self.as_model() as model:
            if model is None:
                return None
            seq = sequence_logps(model, batch, share_prompt=self.share_prompt)
            out = mx.stop_gradient(row_logps(seq, batch, self.ld_alpha))
            mx.eval(out)
        return out

    def live_logps(self, batch: Batch) -> mx.array | None:
        """Computed now, never from a cache (rows no dataset holds, e.g. KTO's KL pairs)."""
        return self._score(batch)

    @property
    def weights(self) -> dict[str, mx.array] | None:
        return None

    def set_weights(self, weights: dict[str, mx.array] | None) -> None:
        raise ValueError(f"the '{self.name}' reference cannot be refreshed")

    @contextmanager
    def as_model(self) -> Iterator[nn.Module | None]:
        """The reference as a model to generate with (None when there is none)."""
        yield None

    def attach(self, datasets: dict) -> None:
        """The datasets whose rows ``logps(batch, split)`` will be asked about, by split."""
        self.held_out = {k: v for k, v in self.held_out.items() if k[0] not in datasets}

    def prepare(self, datasets: dict) -> None:
        """Precompute whatever the strategy needs for these datasets (only the cache does)."""


class LiveReference(Reference):
    """The policy model itself with its adapters off or swapped for reference weights."""

    name = "adapters-off"

    def __init__(
        self,
        model: nn.Module,
        weights: dict[str, mx.array] | None = None,
        reason: str = "",
        ld_alpha: float | None = None,
        share_prompt: bool = True,
    ):
        super().__init__(reason, ld_alpha, share_prompt)
        self.model = model
        self._weights = weights

    @property
    def weights(self) -> dict[str, mx.array] | None:
        return self._weights

    def set_weights(self, weights: dict[str, mx.array] | None) -> None:
        self._weights = weights
        self.held_out.clear()

    @contextmanager
    def as_model(self) -> Iterator[nn.Module]:
        with reference_weights(self.model, self._weights):
            yield self.model


class SeparateModel(Reference):
    """A separate frozen reference model (``ref_model``)."""

    name = "model"

    def __init__(
        self,
        model: nn.Module,
        reason: str = "",
        ld_alpha: float | None = None,
        share_prompt: bool = True,
    ):
        super().__init__(reason, ld_alpha, share_prompt)
        self.model = model
        self.model.eval()

    @contextmanager
    def as_model(self) -> Iterator[nn.Module]:
        yield self.model


class CachedReference(Reference):
    """Reference log-probs computed once per dataset by ``scorer`` and kept on disk."""

    name = "cache"

    def __init__(
        self,
        scorer: Reference,
        base_fingerprint: str,
        cache_dir: Path,
        reason: str = "",
        log=print,
        show_progress: bool = True,
    ):
        super().__init__(reason, scorer.ld_alpha)
        self.show_progress = show_progress
        self.scorer = scorer
        self.base_fingerprint = base_fingerprint
        self.cache_dir = Path(cache_dir)
        self.log = log
        self.datasets: dict = {}
        self.values: dict[str, np.ndarray] = {}
        self.computed_rows = 0
        """Rows scored by the reference model in this process (0 when every cache hit)."""

    @property
    def weights(self) -> dict[str, mx.array] | None:
        return self.scorer.weights

    def set_weights(self, weights: dict[str, mx.array] | None) -> None:
        self.scorer.set_weights(weights)
        self.values.clear()  # recomputed (or found) under the new fingerprint on next use

    def fingerprint(self, examples) -> str:
        digest = hashlib.sha256(
            f"{CACHE_FORMAT}|{self.base_fingerprint}|ld={self.ld_alpha}|".encode()
        )
        if self.weights is not None:
            _hash_arrays(digest, self.weights)
        digest.update(dataset_fingerprint(examples).encode())
        return digest.hexdigest()[:32]

    def attach(self, datasets: dict) -> None:
        self.datasets.update({k: v for k, v in datasets.items() if v is not None})
        for split in datasets:
            self.values.pop(split, None)

    def prepare(self, datasets: dict) -> None:
        self.attach(datasets)
        for split in self.datasets:
            self._values(split)

    def path_for(self, split: str) -> Path:
        return self.cache_dir / f"{self.fingerprint(self.datasets[split].examples)}.safetensors"

    def _values(self, split: str) -> np.ndarray:
        if split in self.values:
            return self.values[split]
        dataset = self.datasets[split]
        path = self.path_for(split)
        shape = (len(dataset), 2) if dataset.paired else (len(dataset),)
        values = None
        if path.exists():
            try:
                values = np.asarray(mx.load(str(path))["logps"])
            except (RuntimeError, ValueError, KeyError):
                values = None
            if values is None or values.shape != shape:
                self.log(f"warning: unreadable reference cache {path}; recomputing")
                values = None
        # Every process must agree to load or to compute (computing is collective).
        group = distributed_group()
        if group.size() > 1 and float(all_sum(mx.array(float(values is not None)))) < group.size():
            values = None
        if values is not None:
            self.values[split] = values
            self.log(f"reference log-probs for {split}: cache hit {path}")
            return values
        values = self._compute(dataset, split)
        self._store(path, values, dataset)
        self.values[split] = values
        return values

    def _compute(self, dataset, split: str) -> np.ndarray:
        paired = dataset.paired
        n = len(dataset)
        out = np.zeros((n, 2) if paired else (n,), dtype=np.float32)
        group = distributed_group()
        batches = list(iterate_batches(dataset.examples, CACHE_BATCH_SIZE, seed=0, epoch=0))
        batches = batches[group.rank() :: group.size()]  # each process scores its share
        bar = Progress(len(batches), enabled=self.show_progress)
        bar.message(f"computing reference log-probs for {split} ({n} examples)")
        for i, batch in enumerate(batches, 1):
            logps = np.asarray(self.scorer.live_logps(batch))
            k = len(batch.indices)
            if paired:
                out[batch.indices, 0], out[batch.indices, 1] = logps[:k], logps[k:]
            else:
                out[batch.indices] = logps
            self.computed_rows += len(logps)
            bar.update(i, {})
        bar.close()
        return np.asarray(all_sum(mx.array(out), group))

    def _store(self, path: Path, values: np.ndarray, dataset) -> None:
        if distributed_group().rank() != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": CACHE_FORMAT, "dataset": dataset.name, "examples": str(len(dataset))}
        arrays = {"logps": mx.array(values)}
        write_atomic(path, lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=meta))
        self.log(f"reference log-probs for {dataset.name} cached at {path}")

    def live_logps(self, batch: Batch) -> mx.array:
        return self.scorer.live_logps(batch)

    def as_model(self):
        return self.scorer.as_model()

    def logps(self, batch: Batch, split: str = "train") -> mx.array:
        dataset = self.datasets.get(split)
        if dataset is None or not drawn_from(batch, dataset.examples):
            return self.scorer.live_logps(batch)  # not a batch of the cached rows
        values = self._values(split)
        idx = batch.indices
        if batch.paired:
            return mx.array(np.concatenate([values[idx, 0], values[idx, 1]]))
        return mx.array(values[idx])


def describe(reference: Reference) -> str:
    text = reference.name
    if isinstance(reference, CachedReference):
        text += f" (scored by {reference.scorer.name})"
    return f"{text}: {reference.reason}" if reference.reason else text
