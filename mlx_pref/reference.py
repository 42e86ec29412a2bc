"""Reference strategies: where a loss's reference log-probs come from.

Every strategy answers ``logps(batch)`` with the reference's summed completion
log-probs for each row of the batch (or None for reference-free losses).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_pref.adapters import adapters_disabled
from mlx_pref.data.batching import Batch
from mlx_pref.logps import sequence_logps


class Reference:
    name = "none"
    reason = ""

    def logps(self, batch: Batch) -> mx.array | None:
        return None


class AdaptersOff(Reference):
    """The policy's own base weights with its adapters switched off: no second copy."""

    name = "adapters-off"

    def __init__(self, model: nn.Module):
        self.model = model

    def logps(self, batch: Batch) -> mx.array:
        with adapters_disabled(self.model):
            return mx.stop_gradient(sequence_logps(self.model, batch).sums)
