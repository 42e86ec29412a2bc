"""Loss sweeps: one run per loss over the same model, data and cached reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlx_pref.checkpoint import list_checkpoints
from mlx_pref.config import Config
from mlx_pref.trainer import Trainer


def sweep(config: Config, verbose: bool = True) -> list[tuple[str, dict[str, float]]]:
    """One run per loss in ``config.sweep``, into ``output/<loss>``; returns final metrics.

    The runs share the reference cache (same model and data give the same fingerprint),
    so the reference is scored once. A finished sub-run is skipped and an interrupted
    one resumed, so re-running a sweep continues it.
    """
    results = []
    for name in config.sweep or [config.loss]:
        sub = dataclasses.replace(
            config, loss=name, sweep=None, output=str(Path(config.output) / name)
        )
        run_dir = Path(sub.output)
        if list_checkpoints(run_dir):
            trainer = Trainer.resume(run_dir, verbose=verbose)
            if trainer.step >= trainer.total_steps:
                records = trainer.metrics_log.read()
                final = {k: v for r in records for k, v in r.items()}
                results.append((name, final))
                continue
        else:
            trainer = Trainer(sub, verbose=verbose)
        results.append((name, trainer.train()))
    return results


def sweep_table(results: list[tuple[str, dict[str, float]]]) -> str:
    """A plain-text comparison of the final eval metrics of a sweep."""
    keys = ["eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen"]
    header = ["loss", *[k.removeprefix("eval/") for k in keys]]
    rows = [[name, *[f"{m[k]:.4f}" if k in m else "-" for k in keys]] for name, m in results]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
