"""Reference strategies that score live: where a loss's reference log-probs come from.

Every strategy answers ``logps(batch, split)`` with the reference's summed completion
log-probs for each row of the batch, named as its config value:

- ``none`` (``NoReference``): reference-free losses; no log-probs.
- ``adapters-off`` (``AdaptersOff``): the policy's own frozen base, its adapters swapped
  out for the forward pass (or swapped for a *reference adapter*: the SFT adapter the run
  started from, or the student copied in by a refresh). No second copy of the weights.
- ``model`` (``SeparateModel``): a separate frozen model sharing the tokenizer.
- ``cache`` (``Cached``, in ``cache.py``): one of the last two, scored once per row and kept
  on disk.

Full fine-tuning has no adapters to switch off: its reference is ``StartingWeights`` (the
policy itself, only until the first step: the cache scores every row before training) or
``FrozenCopy`` (a second copy of the starting model, which a refresh can overwrite).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_pref.adapters import adapter_parameters, adapters_disabled, set_adapter_parameters
from mlx_pref.data.batching import Batch
from mlx_pref.errors import ConfigError
from mlx_pref.logps import row_logps, sequence_logps


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


class Reference(ABC):
    """What every strategy offers the trainer; ``name`` is its config value."""

    name = ""

    def __init__(self, reason: str = "", ld_alpha: float | None = None, share_prompt: bool = True):
        self.reason = reason
        self.ld_alpha = ld_alpha
        """LD-DPO: summarise pairs as the policy does, so both sides match."""
        self.share_prompt = share_prompt
        self.held_out: dict[tuple, mx.array] = {}
        """Held-out batches already scored: eval batches repeat and the reference is frozen."""

    def describe(self) -> str:
        """One line for the run header: the strategy and why it was chosen."""
        return f"{self.name}: {self.reason}" if self.reason else self.name

    def logps(self, batch: Batch, split: str = "train") -> mx.array | None:
        """Summed completion log-probs of every row of ``batch`` under the reference."""
        if split == "train":  # new rows every step: nothing to keep
            return self.live_logps(batch)
        key = (split, batch.indices.tobytes())
        if key not in self.held_out:
            self.held_out[key] = self.live_logps(batch)
        return self.held_out[key]

    def live_logps(self, batch: Batch) -> mx.array | None:
        """Computed now, never from a cache (also rows no dataset holds: KTO's KL pairs)."""
        with self.as_model() as model:
            if model is None:
                return None
            seq = sequence_logps(model, batch, share_prompt=self.share_prompt)
            out = mx.stop_gradient(row_logps(seq, batch, self.ld_alpha))
            mx.eval(out)
        return out

    @property
    def weights(self) -> dict[str, mx.array] | None:
        """The reference adapter (None: the base itself)."""
        return None

    def set_weights(self, weights: dict[str, mx.array] | None) -> None:
        raise ValueError(f"the '{self.name}' reference cannot be refreshed")

    @abstractmethod
    @contextmanager
    def as_model(self) -> Iterator[nn.Module | None]:
        """The reference as a model to score or generate with (None when there is none)."""

    def attach(self, datasets: dict) -> None:
        """The datasets whose rows ``logps(batch, split)`` will be asked about, by split."""
        self.held_out = {k: v for k, v in self.held_out.items() if k[0] not in datasets}

    def prepare(self, datasets: dict, orders: dict | None = None) -> None:  # noqa: B027
        """Score every row of these datasets now (only the cache keeps anything)."""

    def flush(self) -> None:  # noqa: B027 (only the cache acts)
        """Persist what was scored so far (only the cache does; every process calls it)."""


class NoReference(Reference):
    """Reference-free losses (SimPO, CPO, ORPO, SFT) or ``reference: none``."""

    name = "none"

    @contextmanager
    def as_model(self) -> Iterator[None]:
        yield None


class AdaptersOff(Reference):
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


class FrozenCopy(SeparateModel):
    """Full fine-tuning's live reference: a frozen copy of the starting model. A refresh
    (``ref_regen_epochs``, TR-DPO) overwrites its weights; ``weights`` is None until then."""

    def __init__(self, model: nn.Module, reason: str = "", ld_alpha=None, share_prompt=True):
        super().__init__(model, reason, ld_alpha, share_prompt)
        self._weights: dict[str, mx.array] | None = None

    @property
    def weights(self) -> dict[str, mx.array] | None:
        return self._weights

    def set_weights(self, weights: dict[str, mx.array] | None) -> None:
        if weights is None:
            raise ValueError("a frozen copy cannot go back to the starting weights")
        self._weights = dict(weights)
        self.model.update(tree_unflatten(list(self._weights.items())))
        mx.eval(self.model.parameters())
        self.held_out.clear()


class StartingWeights(Reference):
    """Full fine-tuning's cached reference: the policy itself while it still holds its
    starting weights. The cache scores every row of the run's datasets with it before the
    first step (``seal``); after that there is no reference model left to ask."""

    name = "starting-weights"

    def __init__(self, model: nn.Module, reason: str = "", ld_alpha=None, share_prompt=True):
        super().__init__(reason, ld_alpha, share_prompt)
        self.model = model
        self.sealed = False

    def seal(self) -> None:
        self.sealed = True

    def live_logps(self, batch: Batch) -> mx.array | None:
        if self.sealed:
            raise ConfigError(
                "full fine-tuning scored its reference from the starting weights before the "
                "first step; rows outside the run's datasets need a live reference: set "
                "reference: model (a frozen copy of the starting model)"
            )
        return super().live_logps(batch)

    @contextmanager
    def as_model(self) -> Iterator[nn.Module | None]:
        if self.sealed:  # the weights have moved on: no reference model to show
            yield None
            return
        was_training = self.model.training
        self.model.eval()
        try:
            yield self.model
        finally:
            self.model.train(was_training)
