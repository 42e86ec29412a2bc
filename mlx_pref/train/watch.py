"""Watching an eval metric: keep the best weights (``save_best``) and stop when the metric
stops improving (``early_stopping_patience``), as TRL/transformers' ``metric_for_best_model``
and ``EarlyStoppingCallback`` do.

Each evaluation, the step-0 baseline included, is compared with the best value so far: a
strictly better value is the new best (``best/`` is rewritten); one better by more than
``early_stopping_threshold`` also resets the patience count, and anything else adds one
to it. The state is checkpointed, so a resumed run stops where the uninterrupted one would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlx_pref.checkpoint import write_verified_folder
from mlx_pref.errors import ConfigError, suggest

BEST = "best"
BEST_INFO = "best.json"
DEFAULT_METRIC = "eval/loss"


def lower_is_better(metric: str) -> bool:
    """A loss (or NLL) shrinks as it improves; rewards, accuracies and margins grow."""
    name = metric.rsplit("/", 1)[-1]
    return "loss" in name or "nll" in name


class EvalWatch:
    """The best value of one eval metric, its step, and evaluations since it last improved."""

    def __init__(self, cfg, has_eval: bool):
        self.save_best = cfg.save_best is not None
        self.patience = cfg.early_stopping_patience
        self.threshold = cfg.early_stopping_threshold
        self.metric = cfg.save_best or DEFAULT_METRIC
        lower = lower_is_better(self.metric)
        self.greater = not lower if cfg.greater_is_better is None else cfg.greater_is_better
        if (self.save_best or self.patience) and not has_eval:
            what = "save_best" if self.save_best else "early_stopping_patience"
            raise ConfigError(
                f"{what} watches an eval metric but the run has no held-out data: set "
                "eval_data or eval_split"
            )
        self.best: float | None = None
        self.best_step: int | None = None
        self.waited = 0
        self.stopped = False

    @property
    def active(self) -> bool:
        return self.save_best or self.patience is not None

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "waited": self.waited,
                "stopped": self.stopped}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.waited, self.stopped = state.get("waited", 0), state.get("stopped", False)

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Take one evaluation's metrics; True when it is a new best."""
        if not self.active or not metrics:
            return False
        if self.metric not in metrics:
            known = sorted(k for k in metrics if k.startswith("eval/"))
            close = suggest(self.metric, known)
            hint = f"did you mean '{close}'?" if close else f"it has {', '.join(known)}"
            raise ConfigError(f"save_best: the evaluation has no metric {self.metric}; {hint}")
        value = metrics[self.metric]
        if not math.isfinite(value):
            improved = by_margin = False
        elif self.best is None:
            improved, by_margin = True, True
        else:
            gain = value - self.best if self.greater else self.best - value
            improved, by_margin = gain > 0, gain > self.threshold
        if improved:
            self.best, self.best_step = value, step
        self.waited = 0 if by_margin else self.waited + 1
        if self.patience is not None and self.waited >= self.patience:
            self.stopped = True
        return improved and self.save_best

    def stop_message(self, step: int) -> str:
        """One line saying why the run stopped early."""
        by = f" by more than {self.threshold:g}" if self.threshold else ""
        return (
            f"early stopping at step {step}: {self.metric} has not improved{by} for "
            f"{self.waited} evaluations (best {self.best:.4g} at step {self.best_step})"
        )


def save_best(trainer, watch: EvalWatch) -> Path:
    """Write RUN_DIR/best/ atomically: the weights as the run's output holds them (an
    adapter folder, or a whole model folder) and ``best.json`` (metric, value, step)."""
    info = {"metric": watch.metric, "value": watch.best, "step": watch.best_step}

    def write(tmp: Path) -> None:
        trainer.trainable.save(tmp)
        (tmp / BEST_INFO).write_text(json.dumps(info, indent=1) + "\n")

    return write_verified_folder(trainer.run_dir / BEST, write, replace=True)


def read_best(run_dir: str | Path) -> dict | None:
    """What RUN_DIR/best/ holds (metric, value, step), or None."""
    path = Path(run_dir) / BEST / BEST_INFO
    return json.loads(path.read_text()) if path.is_file() else None
