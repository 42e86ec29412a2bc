"""Extra loss inputs: how a run computes each one ``losses.EXTRA_INPUTS`` declares.

A loss that needs more than log-probs names the inputs in its spec (``specs.py``); each
has one provider here. ``context`` providers run before the policy forward, without
gradient (KTO's KL rows, BCO's UDM weights); ``forward`` providers read the policy's own
forward (WPO's weights, the LD-DPO NLL term). Adding an input is three edits: the loss
that reads it, its declaration in ``specs.py``, and its provider in ``PROVIDERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_pref.data import Batch, Dataset
from mlx_pref.data.batching import mismatched
from mlx_pref.errors import ConfigError
from mlx_pref.logps import SequenceLogps, sequence_logps, split_lm, wpo_weights
from mlx_pref.losses import (
    density_ratio_weights,
    fit_density_ratio_classifier,
    mean_pool,
    sample_prompt_indices,
)
from mlx_pref.progress import Progress
from mlx_pref.reference import reference_weights


@dataclass(frozen=True)
class Provider:
    names: tuple[str, ...]
    stage: str
    """``context``: before the policy forward; ``forward``: from the policy's forward."""
    compute: Callable[..., dict[str, mx.array]]
    """``compute(objective, batch, split, dataset, seq)``; ``seq`` is None in ``context``."""


def kl_rows(obj, batch: Batch, split: str, dataset: Dataset, seq=None) -> dict[str, mx.array]:
    """KTO's KL estimate rows: each prompt with another row's completion, scored by the
    policy (no gradient) and the reference."""
    rows = mismatched(batch)
    return {
        "policy_kl_logps": mx.stop_gradient(sequence_logps(obj.model, rows).sums),
        "ref_kl_logps": obj.reference.live_logps(rows),
    }


def udm_weights(obj, batch: Batch, split: str, dataset: Dataset, seq=None) -> dict[str, mx.array]:
    """BCO's UDM weight of every undesirable row's prompt."""
    return {"udm_weights": obj.udm.for_batch(batch, split, dataset)}


def policy_weights(obj, batch: Batch, split: str, dataset: Dataset, seq: SequenceLogps):
    """WPO's pair weights from the policy's own token probabilities."""
    return {"policy_weights": wpo_weights(seq, batch)}


def chosen_nll(obj, batch: Batch, split: str, dataset: Dataset, seq: SequenceLogps):
    """The chosen NLL from true sums: LD-DPO reweighs the log-probs the loss sees."""
    chosen = mx.array(np.flatnonzero(batch.labels))
    lengths = mx.array(batch.completion_lengths)[chosen]
    tokens = mx.maximum(lengths.sum(), 1).astype(mx.float32)
    return {"chosen_nll": -seq.sums[chosen].sum() / tokens}


PROVIDERS = (
    Provider(("policy_kl_logps", "ref_kl_logps"), "context", kl_rows),
    Provider(("udm_weights",), "context", udm_weights),
    Provider(("policy_weights",), "forward", policy_weights),
    Provider(("chosen_nll",), "forward", chosen_nll),
)


def provide(obj, stage: str, batch: Batch, split: str, dataset, seq=None) -> dict[str, mx.array]:
    """Every input of ``stage`` the run supplies, for one batch."""
    out: dict[str, mx.array] = {}
    for provider in PROVIDERS:
        if provider.stage == stage and set(provider.names) & set(obj.inputs):
            out.update(provider.compute(obj, batch, split, dataset, seq))
    return out


class UDM:
    """BCO's underlying distribution matching: a classifier telling desirable from
    undesirable prompts (on the frozen base's mean-pooled last hidden state) gives each
    undesirable row a clipped density-ratio weight. Fitted at first use, on a sample of
    the training prompts; weights are computed once per split."""

    def __init__(
        self, cfg, model, train_set: Dataset, log: Callable[[str], None], progress: bool = False
    ):
        self.cfg, self.model, self.train_set, self.log = cfg, model, train_set, log
        self.progress = progress
        self.classifier = None
        self.weights: dict[str, np.ndarray] = {}

    def embed(self, prompts: list[tuple[int, ...]]) -> np.ndarray:
        """Mean-pooled last hidden states of ``prompts`` (a pass over them, with a progress
        bar: every prompt of a split is embedded once)."""
        split = split_lm(self.model)
        if split is None:
            raise ConfigError("bco_udm needs a llama-family model whose hidden states can be read")
        body, out = split[0], []
        starts = range(0, len(prompts), 16)
        bar = Progress(len(starts), enabled=self.progress, unit="batch", plain_lines=True)
        bar.message(f"bco_udm: embedding {len(prompts)} prompts")
        with reference_weights(self.model, None):
            for n, i in enumerate(starts, 1):
                chunk = prompts[i : i + 16]
                width = max(len(p) for p in chunk)
                ids = np.zeros((len(chunk), width), dtype=np.int32)
                mask = np.zeros((len(chunk), width), dtype=np.float32)
                for k, p in enumerate(chunk):
                    ids[k, : len(p)], mask[k, : len(p)] = p, 1.0
                pooled = mean_pool(body(mx.array(ids)), mx.array(mask))
                out.append(np.asarray(pooled.astype(mx.float32)))
                bar.update(n, {})
        bar.close()
        return np.concatenate(out)

    def fit(self) -> None:
        cfg, examples = self.cfg, self.train_set.examples
        if self.train_set.paired:
            good = bad = [e.prompt for e in examples]
        else:
            good = [e.prompt for e in examples if e.label]
            bad = [e.prompt for e in examples if not e.label]
        take_good = sample_prompt_indices(len(good), cfg.prompt_sample_size, seed=cfg.seed)
        take_bad = sample_prompt_indices(len(bad), cfg.prompt_sample_size, seed=cfg.seed + 1)
        self.classifier = fit_density_ratio_classifier(
            self.embed([good[i] for i in take_good]), self.embed([bad[i] for i in take_bad])
        )
        mean = self.of("train", self.train_set).mean()
        self.log(
            f"bco_udm: density-ratio classifier fitted on {len(take_good)} + {len(take_bad)} "
            f"prompts (mean weight on the training prompts {mean:.3f})"
        )

    def of(self, split: str, dataset: Dataset) -> np.ndarray:
        """The weight of each example's prompt in ``dataset`` (computed once per split)."""
        if self.classifier is None:
            self.fit()
        if split not in self.weights:
            self.weights[split] = np.asarray(
                density_ratio_weights(
                    self.classifier,
                    self.embed([e.prompt for e in dataset.examples]),
                    min_density_ratio=self.cfg.min_density_ratio,
                    max_density_ratio=self.cfg.max_density_ratio,
                )
            )
        return self.weights[split]

    def forget(self, split: str) -> None:
        self.weights.pop(split, None)

    def for_batch(self, batch: Batch, split: str, dataset: Dataset) -> mx.array:
        weights = self.of(split, dataset)[batch.indices]
        return mx.array(weights if batch.paired else weights[~batch.labels])
