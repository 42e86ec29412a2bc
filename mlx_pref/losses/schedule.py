"""β schedules: anneal the KL coefficient from ``beta`` to ``beta_end`` over training."""

from __future__ import annotations

import math

from mlx_pref.errors import suggest

BETA_SCHEDULES = ("constant", "linear", "cosine", "exponential")


def beta_at(
    step: int,
    total_steps: int,
    beta: float,
    beta_end: float | None = None,
    schedule: str = "constant",
) -> float:
    """β to use at optimizer step ``step`` (0-based) of ``total_steps``.

    With progress ``p = step / (total_steps - 1)`` clamped to ``[0, 1]`` (so step 0 gives
    ``beta`` and the last step, ``total_steps - 1``, gives ``beta_end``):

    * ``constant``: ``beta`` (``beta_end`` is ignored);
    * ``linear``: ``beta + (beta_end - beta)·p``;
    * ``cosine``: ``beta_end + (beta - beta_end)·(1 + cos(πp))/2``;
    * ``exponential``: geometric interpolation ``beta·(beta_end/beta)^p``.

    ``beta`` and ``beta_end`` must be > 0; ``beta_end=None`` means no annealing.
    """
    if schedule not in BETA_SCHEDULES:
        hint = suggest(str(schedule), BETA_SCHEDULES)
        raise ValueError(
            f"unknown beta schedule '{schedule}'"
            + (f" (did you mean '{hint}'?)" if hint else "")
            + f"; choose one of: {', '.join(BETA_SCHEDULES)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if schedule == "constant" or beta_end is None:
        return float(beta)
    if not beta_end > 0:
        raise ValueError(f"beta_end must be > 0 (β divides some losses), got {beta_end}")
    if total_steps <= 1:
        progress = 1.0 if step >= 1 else 0.0
    else:
        progress = min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "linear":
        return float(beta + (beta_end - beta) * progress)
    if schedule == "cosine":
        return float(beta_end + (beta - beta_end) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return float(beta * (beta_end / beta) ** progress)
