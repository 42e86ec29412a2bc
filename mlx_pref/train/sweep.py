"""Loss sweeps: one run per loss over the same model, data and cached reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlx_pref.checkpoint import list_checkpoints
from mlx_pref.config import Config
from mlx_pref.rundir import claim, clear
from mlx_pref.train.loop import EVAL_KEYS, Trainer
from mlx_pref.train.preflight import check_loss_fits_data


def sweep(
    config: Config, verbose: bool = True, overwrite: bool = False
) -> list[tuple[str, dict[str, float]]]:
    """One run per loss in ``config.sweep``, into ``output/<loss>``; returns final metrics.

    The runs share the reference cache (same model and data give the same fingerprint),
    so the reference is scored once. A finished sub-run is skipped and an interrupted
    one resumed, so re-running a sweep continues it. Every loss is checked against the
    data before the first one trains; ``overwrite`` then replaces an earlier sweep.
    """
    names = config.sweep or [config.loss]
    subs = [
        dataclasses.replace(config, loss=name, sweep=None, output=str(Path(config.output) / name))
        for name in names
    ]
    first = None
    for sub in subs:
        sub.validate()
        if not list_checkpoints(Path(sub.output)) or overwrite:
            first = first or Trainer(sub, verbose=verbose)
    if first is not None:
        for sub in subs:
            check_loss_fits_data(sub.loss, first.train_set, first.eval_set)
    if overwrite:
        clear(config.output)
    claim(config.output, "sweep", names)
    results = []
    for sub in subs:
        run_dir = Path(sub.output)
        if list_checkpoints(run_dir):
            trainer = Trainer.resume(run_dir, verbose=verbose)
            if trainer.finished:
                records = trainer.metrics_log.read()
                final = {k: v for r in records for k, v in r.items()}
                results.append((sub.loss, final))
                continue
        elif first is not None and first.config.output == sub.output:
            trainer, first = first, None
        else:
            trainer = Trainer(sub, verbose=verbose)
        results.append((sub.loss, trainer.train()))
    return results


def sweep_table(results: list[tuple[str, dict[str, float]]]) -> str:
    """A plain-text comparison of the final eval metrics of a sweep."""
    keys = [*EVAL_KEYS, "eval/logps/chosen"]
    header = ["loss", *[k.removeprefix("eval/") for k in keys]]
    rows = [[name, *[f"{m[k]:.4f}" if k in m else "-" for k in keys]] for name, m in results]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
