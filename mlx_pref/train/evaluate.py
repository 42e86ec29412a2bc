"""Evaluation without training: a run (at its end, a checkpoint, or its start) or a model
with an optional adapter, scored on a preference set through the trainer's own evaluation,
so the numbers are the ones training logs for the same weights and data.

What ``mlx-pref evaluate`` calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlx_pref.checkpoint import CHECKPOINTS, list_checkpoints
from mlx_pref.config import RUN_CONFIG, load_config
from mlx_pref.errors import ConfigError
from mlx_pref.losses import beta_at
from mlx_pref.progress import read_metrics
from mlx_pref.train import checkpointing
from mlx_pref.train.loop import Trainer

READ_ONLY = {"push_to_hub": None, "report_to": []}
"""Settings an evaluation never acts on: nothing is uploaded or reported."""


@dataclass
class Evaluation:
    """The metrics of one evaluation and what was scored."""

    what: str
    dataset: str
    examples: int
    step: int | None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        head = {"what": self.what, "dataset": self.dataset, "examples": self.examples}
        return {**head, "step": self.step, **self.metrics}

    def format(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        lines = [f"{self.what}{at} on {self.dataset} ({self.examples} examples)"]
        width = max(len(k) for k in self.metrics)
        lines += [f"  {k:<{width}}  {v:.6g}" for k, v in self.metrics.items()]
        return "\n".join(lines)


def eval_data_overrides(data: str | None, eval_split: float | None) -> dict:
    """``data`` alone: score that whole file; with ``eval_split``: its held-out fraction,
    as training splits it; ``eval_split`` alone: that fraction of the run's own data."""
    if data is not None and eval_split is None:
        return {"eval_data": data}
    out: dict = {} if data is None else {"data": data}
    if eval_split is not None:
        out.update(eval_data=None, eval_split=eval_split)
    return out


def _score(trainer: Trainer, what: str) -> Evaluation:
    cfg = trainer.config
    trainer.objective.beta = beta_at(
        max(trainer.step - 1, 0), trainer.total_steps, cfg.beta, cfg.beta_end, cfg.beta_schedule
    )  # the beta of the last step taken, as the trainer's own evaluation uses
    if trainer.eval_set is None:
        raise ConfigError(
            "nothing to evaluate on: the run has no held-out data; pass --data FILE "
            "(or --eval-split FRACTION)"
        )
    metrics = trainer.evaluate()
    return Evaluation(what, trainer.eval_set.name, len(trainer.eval_set), trainer.step, metrics)


def run_location(path: str | Path) -> tuple[Path, Path | None]:
    """(run directory, checkpoint) for a run directory or one of its checkpoints."""
    path = Path(path)
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent, path
    if not (path / RUN_CONFIG).is_file():
        hint = " (an adapter folder? pass it with --adapter)" if path.is_dir() else ""
        raise ConfigError(f"{path} is not a run directory: {RUN_CONFIG} is missing{hint}")
    return path, None


def evaluate_run(
    run_dir: str | Path, overrides: dict | None = None, *, base: bool = False
) -> Evaluation:
    """Score a run's weights (its newest checkpoint, or the checkpoint given as
    ``run_dir``) on its held-out set, or on other data given in ``overrides``. ``base``:
    the run's starting point instead (the base, or base + the SFT adapter it started
    from): the step-0 baseline."""
    root, checkpoint = run_location(run_dir)
    overrides = {**(overrides or {}), **READ_ONLY}
    if base or checkpoint is not None or list_checkpoints(root):
        trainer = checkpointing.trainer_at(
            Trainer, root, overrides, checkpoint=checkpoint, at_start=base, any_change=True,
            verbose=False,
        )  # fmt: skip
    else:  # checkpoints removed: the final weights, at the last logged step
        trainer = checkpointing.trainer_at(
            Trainer, root, overrides, at_start=True, any_change=True, verbose=False
        )
        trainer.trainable.load_from(root)
        trainer.step = max((r.get("step", 0) for r in read_metrics(root)), default=0)
    what = f"{root} (start: no trained weights)" if base else str(checkpoint or root)
    return _score(trainer, what)


def evaluate_model(overrides: dict, adapter: str | None = None) -> Evaluation:
    """Score a model (``overrides["model"]``; default the embedded one), with ``adapter``
    applied if given, against the model itself as the reference."""
    cfg = load_config(None, {**overrides, **READ_ONLY, "adapter": adapter})
    trainer = Trainer(cfg, verbose=False)
    if adapter is not None and trainer.reference.weights is not None:
        trainer.reference.set_weights(None)  # the reference is the bare model, not + adapter
    name = cfg.model or "the embedded model"
    what = f"{name} + {adapter}" if adapter else name
    result = _score(trainer, what)
    result.step = None  # a model, not a run: no step
    return result


def to_json(evaluation: Evaluation) -> str:
    return json.dumps(evaluation.to_dict(), indent=1)
