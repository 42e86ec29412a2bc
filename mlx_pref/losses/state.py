"""Running statistics kept across steps: BCO's reward shift δ.

``bco`` (TRL 1.13's BCOTrainer) and ``bco_pair`` (TRL 0.28's DPOTrainer) subtract δ, a
running mean of the implicit rewards, from every reward before the logistic loss. δ lives in
an explicit :class:`LossState` so that the loss functions stay pure, the trainer decides when
it moves (training steps only), and a checkpoint can save and restore it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_pref.backend import all_sum
from mlx_pref.losses.base import reduction_group


@dataclass
class RunningMoments:
    """Running mean and variance of a stream, merged batch by batch (Chan et al.).

    Same update as TRL 1.13's ``RunningMoments`` (``trl/experimental/bco/bco_trainer.py``;
    from MOSS-RLHF): it starts at ``mean=0, var=1, count=1e-24``; each batch's population
    mean/variance is merged with the running ones. Under data parallelism the batch sums and
    counts are all-summed first, then the squared deviations from the global mean, so every
    rank keeps the same statistics (TRL's ``get_global_statistics``). mlx-pref keeps the
    values as Python floats (float64) rather than TRL's float32 tensors.
    """

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-24

    @property
    def std(self) -> float:
        """Sample standard deviation of everything seen, as TRL 1.13 tracks it.

        1 before any update (TRL's initial value), ``inf`` after exactly one value (TRL
        divides by ``count - 1 = 0``), ``sqrt(var·count/(count - 1))`` afterwards.
        """
        if self.count < 1.0:
            return 1.0
        if self.count == 1.0:
            return math.inf
        return math.sqrt(self.var * self.count / (self.count - 1.0))

    def update(self, values: mx.array, group: Any = None) -> tuple[float, int]:
        """Merge a batch of values; returns the batch's (global) mean and count.

        An empty batch (on every rank) leaves the statistics unchanged; TRL would turn them
        into NaN there.
        """
        local = (
            np.asarray(mx.stop_gradient(values).astype(mx.float32), dtype=np.float64).ravel()
            if values.size
            else np.zeros(0)  # no MLX op on a zero-size array (see ``base.empty_rows``)
        )
        group = reduction_group(group)
        if group is None:
            count = local.size
            if count == 0:
                return self.mean, 0
            batch_mean = float(local.mean())
            batch_var = float(((local - batch_mean) ** 2).mean())
        else:
            totals = all_sum(mx.array([local.sum(), float(local.size)], dtype=mx.float32), group)
            total_sum, total_count = (float(v) for v in np.asarray(totals, dtype=np.float64))
            count = int(round(total_count))
            if count == 0:
                return self.mean, 0
            batch_mean = total_sum / total_count
            sq = all_sum(
                mx.array(float(((local - batch_mean) ** 2).sum()), dtype=mx.float32), group
            )
            batch_var = float(np.asarray(sq, dtype=np.float64)) / total_count

        delta = batch_mean - self.mean
        total = self.count + count
        old_sum = self.var * self.count + delta**2 * self.count * count / total
        self.mean += delta * count / total
        self.var = (old_sum + batch_var * count) / total
        self.count = total
        return batch_mean, count

    def state_dict(self) -> dict[str, float]:
        """Plain floats, JSON-serialisable; ``load_state_dict`` restores them exactly."""
        return {"mean": float(self.mean), "var": float(self.var), "count": float(self.count)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict` output (extra keys such as TRL's ``std`` are ignored)."""
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = float(state["count"])


@dataclass
class LossState:
    """Per-loss running statistics, keyed by loss name (``bco``, ``bco_pair``).

    Pass the same object to every ``preference_loss`` call of a run. ``train=False`` calls
    (evaluation) read δ but never move it. ``state_dict()`` is JSON-ready; restoring it with
    ``load_state_dict`` resumes δ exactly. Updating reads the batch rewards on the host, so
    the stateful losses cannot be traced by ``mx.compile``.
    """

    running: dict[str, RunningMoments] = field(default_factory=dict)

    def moments(self, name: str) -> RunningMoments:
        """The running moments of loss ``name``, created at TRL's initial values on first use."""
        if name not in self.running:
            self.running[name] = RunningMoments()
        return self.running[name]

    def delta(self, name: str) -> float:
        """Current reward shift δ (running reward mean) of loss ``name``; 0 before any update."""
        return self.running[name].mean if name in self.running else 0.0

    def state_dict(self) -> dict[str, Any]:
        """``{"running": {loss_name: {"mean", "var", "count"}}}`` with plain floats."""
        return {"running": {k: v.state_dict() for k, v in sorted(self.running.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the statistics with those saved by :meth:`state_dict`."""
        self.running = {}
        for name, values in state.get("running", {}).items():
            self.moments(name).load_state_dict(values)
