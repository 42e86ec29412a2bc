"""What a checkpoint of a run holds, and how a run continues from one.

A checkpoint (``checkpoint.write_checkpoint``: atomic, verified) holds the trained weights
(the adapters, or under full fine-tuning a whole model folder), the optimizer state, the
reference weights when a refresh replaced them, and ``trainer_state.json``: the step, the
non-finite counters, BCO's running statistics, the metrics not yet logged and the watched
eval metric (keep-best, early stopping), so a resumed run gives exactly the result it
would have had.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_pref.checkpoint import (
    STATE,
    checkpoint_dir,
    latest_valid,
    read_state,
    remove_after,
    verify,
    write_checkpoint,
)
from mlx_pref.config import RUN_CONFIG, Config, load_config
from mlx_pref.errors import ConfigError
from mlx_pref.rundir import claim, legacy_run, read_marker

OPTIMIZER_FILE = "optimizer.safetensors"
REF_ADAPTER_FILE = "reference_adapters.safetensors"
RESUMABLE = {
    "max_steps",
    "epochs",
    "eval_every",
    "save_every",
    "log_every",
    "keep_last",
    "eval_on_start",
    "report_to",
    "early_stopping_patience",
    "early_stopping_threshold",
}
"""Settings a resumed run may change: none alters the steps already taken."""


def state_dict(trainer) -> dict:
    """Everything besides weights that the next step depends on."""
    return {
        "step": trainer.step,
        "nonfinite_in_a_row": trainer.nonfinite_in_a_row,
        "skipped_steps": trainer.skipped_steps,
        "loss_state": trainer.objective.loss_state.state_dict(),
        "log_window": trainer.window,
        "watch": trainer.watch.state_dict(),
    }


def save(trainer) -> Path:
    """Write an atomic checkpoint of the trainer's current step (kept if it exists)."""
    trainer.reference.flush()  # the reference values scored so far go to disk too
    if not trainer.is_main:
        return checkpoint_dir(trainer.run_dir, trainer.step)

    def write(tmp: Path) -> None:
        trainer.trainable.save(tmp)
        optimizer = dict(tree_flatten(trainer.optimizer.state))
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), optimizer)
        (tmp / STATE).write_text(json.dumps(state_dict(trainer), indent=1))
        if trainer.reference.weights is not None:
            mx.save_safetensors(str(tmp / REF_ADAPTER_FILE), trainer.reference.weights)

    return write_checkpoint(trainer.run_dir, trainer.step, write, trainer.config.keep_last)


def restore(trainer, path: Path) -> None:
    """Restore the weights, optimizer and loop state from a checkpoint directory."""
    trainer.trainable.load_from(path)
    trainer.optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
    state = read_state(path)
    if (path / REF_ADAPTER_FILE).exists():
        trainer.reference.set_weights(mx.load(str(path / REF_ADAPTER_FILE)))
    trainer.step = state["step"]
    trainer.nonfinite_in_a_row = state["nonfinite_in_a_row"]
    trainer.skipped_steps = state["skipped_steps"]
    trainer.objective.loss_state.load_state_dict(state["loss_state"])
    trainer.window = state["log_window"]
    trainer.watch.load_state_dict(state.get("watch", {}))
    mx.eval(trainer.model.parameters(), trainer.optimizer.state)
    trainer.progress.start = trainer.step


def resumed_config(
    run_dir: Path, overrides: dict | None, any_change: bool = False
) -> tuple[Config, list[str]]:
    """The saved config of the run in ``run_dir`` with ``overrides`` applied, and the names
    of the settings they change.

    Overrides equal to the saved settings are fine (the original command with ``--resume``
    added works); changed ones may extend the run (``max_steps``, ``epochs``, which also
    stretches the schedules from here on) or change logging and checkpointing. Anything
    else is refused, unless ``any_change`` (a read-only use such as evaluation).
    """
    if not (run_dir / RUN_CONFIG).exists():
        raise ConfigError(f"{run_dir} is not a run directory: {RUN_CONFIG} is missing")
    if read_marker(run_dir) is None and not legacy_run(run_dir):
        raise ConfigError(f"{run_dir} is not an mlx-pref run directory (no marker)")
    saved = load_config(run_dir / RUN_CONFIG)
    overrides = {k: v for k, v in (overrides or {}).items() if k != "output"}
    config = load_config(run_dir / RUN_CONFIG, {**overrides, "output": str(saved.output)})
    changed = sorted(
        f.name
        for f in dataclasses.fields(Config)
        if f.compare and getattr(config, f.name) != getattr(saved, f.name)
    )
    refused = [k for k in changed if k not in RESUMABLE and not any_change]
    if refused:
        detail = ", ".join(
            f"{k} ({getattr(saved, k)!r} -> {getattr(config, k)!r})" for k in refused
        )
        raise ConfigError(
            f"--resume continues a run with its saved config; only {', '.join(sorted(RESUMABLE))} "
            f"can change, not {detail}"
        )
    return dataclasses.replace(config, output=str(run_dir)), changed


def trainer_at(
    cls,
    run_dir: Path,
    overrides: dict | None = None,
    *,
    checkpoint: Path | None = None,
    at_start: bool = False,
    any_change: bool = False,
    verbose: bool = True,
):
    """A ``cls`` trainer for the run in ``run_dir`` at ``checkpoint`` (default: its newest
    intact one; none, or ``at_start``: step 0). Writes nothing."""
    config, changed = resumed_config(run_dir, overrides, any_change)
    trainer = cls(config, verbose=verbose)
    trainer.checkpoint_path, trainer.changed_settings = None, changed
    if at_start:
        return trainer
    if checkpoint is not None:
        problem = verify(Path(checkpoint))
        if problem:
            raise ConfigError(f"checkpoint {checkpoint} is damaged: {problem}")
    path = checkpoint or latest_valid(run_dir, warn=trainer.log)
    if path is not None:
        restore(trainer, Path(path))
    trainer.checkpoint_path, trainer.changed_settings = path, changed
    return trainer


def resume(cls, run_dir: Path, overrides: dict | None = None, *, verbose: bool = True):
    """A ``cls`` trainer continuing the run in ``run_dir`` from its newest intact
    checkpoint: what ``Trainer.resume`` does."""
    trainer = trainer_at(cls, run_dir, overrides, verbose=verbose)
    trainer.resumed = True
    path = trainer.checkpoint_path
    if path is None:
        trainer.log(f"no intact checkpoint in {run_dir}: starting from step 0")
    if trainer.step > trainer.total_steps:
        raise ConfigError(
            f"{run_dir} is at step {trainer.step}, past the {trainer.total_steps} steps "
            "asked for; pass a larger --max-steps (or --epochs) to train longer"
        )
    if trainer.finished:
        return trainer  # nothing is written
    if trainer.is_main:
        claim(run_dir, "run", trainer.run_files())
        if trainer.changed_settings:
            trainer.config.save(run_dir / RUN_CONFIG)
        # checkpoints and log records past this one were damaged or are stale now
        remove_after(run_dir, trainer.step if path else -1)
    trainer.metrics_log.truncate_after(trainer.step)
    trainer.samples_log.truncate_after(trainer.step)
    if path is not None:
        trainer.log(f"resumed from {path} (step {trainer.step})")
    return trainer
