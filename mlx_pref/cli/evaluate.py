"""``mlx-pref evaluate``: score a run, a checkpoint, or a model (+ adapter) on preference
data with the trainer's own evaluation, and print TRL's metrics."""

from __future__ import annotations

import click

from mlx_pref.cli.app import cli
from mlx_pref.cli.options import parse_settings, set_option
from mlx_pref.config import DATA_FORMATS
from mlx_pref.errors import MlxPrefError


@cli.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--model", help="Without RUN_DIR: the model to score (default: embedded tiny model).")
@click.option("--adapter", help="Without RUN_DIR: an adapter folder to apply to --model.")
@click.option("--base", is_flag=True, help="With RUN_DIR: score the run's starting point (step 0).")
@click.option("--data", help="Score this whole file (with --eval-split: its held-out part).")
@click.option("--eval-split", type=float, help="Score this held-out fraction, as training splits.")
@click.option("--format", "data_format", type=click.Choice(DATA_FORMATS), help="Row format.")
@click.option("--batch-size", type=int, help="Pairs (or rows) per batch.")
@click.option("--eval-batches", type=int, help="Score at most this many batches.")
@click.option("--loss", help="Score with this loss (default: the run's, else sigmoid).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@set_option
def evaluate(
    run_dir, model, adapter, base, data, eval_split, data_format, batch_size, eval_batches,
    loss, as_json, settings,
) -> None:  # fmt: skip
    """Evaluate a run, a checkpoint, or a model on preference data.

    RUN_DIR is a run directory (its newest checkpoint is scored, on its own held-out data
    unless --data is given) or one of its checkpoints/step-N folders; --base scores the
    run's starting point instead. Without RUN_DIR, --model (and --adapter) is scored,
    with the model itself as the reference. Prints the mean loss and TRL's metrics:
    reward accuracy, margins, chosen/rejected rewards and log-probs.
    """
    from mlx_pref.train.evaluate import (
        eval_data_overrides,
        evaluate_model,
        evaluate_run,
        to_json,
    )

    overrides = parse_settings(settings)
    overrides.update(eval_data_overrides(data, eval_split))
    named = {"format": data_format, "batch_size": batch_size, "eval_batches": eval_batches,
             "loss": loss}  # fmt: skip
    overrides.update({k: v for k, v in named.items() if v is not None})
    if run_dir is not None:
        if model or adapter:
            raise MlxPrefError(
                "evaluate RUN_DIR uses the run's model and weights; --model and --adapter go "
                "without RUN_DIR"
            )
        result = evaluate_run(run_dir, overrides, base=base)
    else:
        if base:
            raise MlxPrefError("--base goes with RUN_DIR (without it, leave out --adapter)")
        result = evaluate_model({**overrides, "model": model}, adapter)
    click.echo(to_json(result) if as_json else result.format())
