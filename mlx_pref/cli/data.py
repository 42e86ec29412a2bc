"""``mlx-pref data check``: what training would read from a dataset, before training."""

from __future__ import annotations

import click

from mlx_pref.cli.app import cli
from mlx_pref.config import DATA_FORMATS, TRUNCATION_MODES


@cli.group()
def data() -> None:
    """Inspect preference datasets."""


@data.command("check")
@click.argument("spec", metavar="FILE")
@click.option("--model", help="Model whose tokenizer to use (default: embedded tiny model).")
@click.option(
    "--format",
    "data_format",
    type=click.Choice(DATA_FORMATS),
    help="Row format (default: detected per file).",
)
@click.option("--max-length", type=int, help="Maximum prompt + completion tokens.")
@click.option("--max-prompt-length", type=int, help="Maximum prompt tokens.")
@click.option("--max-completion-length", type=int, help="Maximum tokens per completion.")
@click.option("--truncation-mode", type=click.Choice(TRUNCATION_MODES))
@click.option("--strict", is_flag=True, default=None, help="Make any bad row an error.")
@click.option("--batch-size", type=int, help="Batch size for the padding figures.")
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="FIELD=COLUMN",
    help="Read a field from another column, e.g. --column prompt=question (repeatable).",
)
@click.option("--system-prompt", help="System message for rows without one.")
def data_check(spec, model, data_format, batch_size, columns, **flags) -> None:
    """Validate a dataset and print what training would read from it.

    FILE is a .jsonl/.json, .parquet, .arrow or .csv/.tsv file (JSON and CSV may be .gz),
    a directory of them, or a Hugging Face Hub dataset: hf://owner/name[/path][:split].
    Exit status 2 on a fatal problem.
    """
    from mlx_pref.config import load_config
    from mlx_pref.data.check import check_dataset, load_tokenizer
    from mlx_pref.data.sources import resolve_files

    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update({"data": spec, "model": model, "format": data_format or "auto"})
    if columns:
        pairs = [c.partition("=") for c in columns]
        if any(not sep or not field or not column for field, sep, column in pairs):
            raise click.UsageError("--column takes FIELD=COLUMN, e.g. --column prompt=question")
        overrides["columns"] = {field: column for field, _, column in pairs}
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    cfg = load_config(None, overrides)
    files = resolve_files(spec)  # a missing file or Hub repo fails before the model loads
    result = check_dataset(spec, load_tokenizer(cfg.model), cfg, files=files)
    click.echo(result.format())
