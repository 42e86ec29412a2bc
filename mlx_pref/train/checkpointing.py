"""What a checkpoint of a run holds, and how a run continues from one.

A checkpoint (``checkpoint.write_checkpoint``: atomic, verified) holds the adapters, the
optimizer state, the reference adapter when a refresh replaced it, and
``trainer_state.json``: the step, the non-finite counters, BCO's running statistics and
the metrics not yet logged, so a resumed run gives exactly the result it would have had.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_pref.adapters import ADAPTER_FILE, save_adapters, set_adapter_parameters
from mlx_pref.checkpoint import STATE, checkpoint_dir, read_state, write_checkpoint
from mlx_pref.config import RUN_CONFIG, Config, load_config
from mlx_pref.errors import ConfigError
from mlx_pref.rundir import legacy_run, read_marker

OPTIMIZER_FILE = "optimizer.safetensors"
REF_ADAPTER_FILE = "reference_adapters.safetensors"
RESUMABLE = {"max_steps", "epochs", "eval_every", "save_every", "log_every", "keep_last"}
"""Settings a resumed run may change: none alters the steps already taken."""


def state_dict(trainer) -> dict:
    """Everything besides weights that the next step depends on."""
    return {
        "step": trainer.step,
        "nonfinite_in_a_row": trainer.nonfinite_in_a_row,
        "skipped_steps": trainer.skipped_steps,
        "loss_state": trainer.objective.loss_state.state_dict(),
        "log_window": trainer.window,
    }


def save(trainer) -> Path:
    """Write an atomic checkpoint of the trainer's current step (kept if it exists)."""
    trainer.reference.flush()  # the reference values scored so far go to disk too
    if not trainer.is_main:
        return checkpoint_dir(trainer.run_dir, trainer.step)

    def write(tmp: Path) -> None:
        save_adapters(trainer.model, tmp, trainer.adapter_config)
        optimizer = dict(tree_flatten(trainer.optimizer.state))
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), optimizer)
        (tmp / STATE).write_text(json.dumps(state_dict(trainer), indent=1))
        if trainer.reference.weights is not None:
            mx.save_safetensors(str(tmp / REF_ADAPTER_FILE), trainer.reference.weights)

    return write_checkpoint(trainer.run_dir, trainer.step, write, trainer.config.keep_last)


def restore(trainer, path: Path) -> None:
    """Restore adapters, optimizer and loop state from a checkpoint directory."""
    set_adapter_parameters(trainer.model, mx.load(str(path / ADAPTER_FILE)))
    trainer.optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
    state = read_state(path)
    if (path / REF_ADAPTER_FILE).exists():
        trainer.reference.set_weights(mx.load(str(path / REF_ADAPTER_FILE)))
    trainer.step = state["step"]
    trainer.nonfinite_in_a_row = state["nonfinite_in_a_row"]
    trainer.skipped_steps = state["skipped_steps"]
    trainer.objective.loss_state.load_state_dict(state["loss_state"])
    trainer.window = state["log_window"]
    mx.eval(trainer.model.parameters(), trainer.optimizer.state)
    trainer.progress.start = trainer.step


def resumed_config(run_dir: Path, overrides: dict | None) -> tuple[Config, list[str]]:
    """The saved config of the run in ``run_dir`` with ``overrides`` applied, and the names
    of the settings they change.

    Overrides equal to the saved settings are fine (the original command with ``--resume``
    added works); changed ones may extend the run (``max_steps``, ``epochs``, which also
    stretches the schedules from here on) or change logging and checkpointing. Anything
    else is refused.
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
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        detail = ", ".join(
            f"{k} ({getattr(saved, k)!r} -> {getattr(config, k)!r})" for k in refused
        )
        raise ConfigError(
            f"--resume continues a run with its saved config; only {', '.join(sorted(RESUMABLE))} "
            f"can change, not {detail}"
        )
    return dataclasses.replace(config, output=str(run_dir)), changed
