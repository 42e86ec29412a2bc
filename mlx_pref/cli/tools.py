"""Commands around a run: ``losses``, ``init``, ``plot`` and ``doctor``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_pref import backend
from mlx_pref.cli.app import cli
from mlx_pref.errors import MlxPrefError


@cli.command()
def losses() -> None:
    """List every loss: its formula, whether it needs a reference, its data, its paper."""
    from mlx_pref.losses import describe_losses

    rows = describe_losses()
    name_w = max(len(r["name"]) for r in rows)
    for r in rows:
        aliases = f" ({', '.join(r['aliases'])})" if r.get("aliases") else ""
        ref = "reference" if r["reference"] else "no reference"
        data = "paired" if r["paired"] else "unpaired"
        click.echo(f"{r['name']:<{name_w}}  {r['formula']}")
        click.echo(f"{'':<{name_w}}  {ref}, {data}{aliases}; {r['paper']}")


TEMPLATES = ("dpo", "ipo", "simpo", "orpo", "bco", "kto", "weighted")


@cli.command()
@click.option("--template", type=click.Choice(TEMPLATES), help="Loss family (default: dpo).")
@click.option(
    "--from",
    "source",
    type=click.Path(dir_okay=False),
    help="A TRL or Soup config file to rewrite in mlx-pref's names.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="File to write (default: TEMPLATE.yaml, or SOURCE-mlx-pref.yaml with --from).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(template: str | None, source: str | None, output: str | None, force: bool) -> None:
    """Write a commented starter config for a loss family, or (--from) the mlx-pref
    equivalent of a TRL or Soup config; either runs as written."""
    from importlib.resources import files

    from mlx_pref.checkpoint import write_atomic
    from mlx_pref.config import rewrite_config

    if template and source:
        raise click.UsageError("--template and --from exclude each other: pick one")
    if source:
        path = Path(output or f"{Path(source).stem}-mlx-pref.yaml")
    else:
        template = template or "dpo"
        path = Path(output or f"{template}.yaml")
    if path.is_dir():
        raise MlxPrefError(f"init: {path} is a folder; name a file with --output")
    if path.exists() and not force:
        raise MlxPrefError(
            f"{path} exists; pass --force to overwrite or --output to pick another file"
        )
    if not path.parent.is_dir():
        raise MlxPrefError(f"init: cannot write {path}: the folder {path.parent} does not exist")
    if source:
        text, notes = rewrite_config(source)
        for note in notes:
            click.echo(note)
    else:
        text = (files("mlx_pref") / "templates" / f"{template}.yaml").read_text()
    write_atomic(path, lambda tmp: tmp.write_text(text))
    click.echo(f"wrote {path}; train with: mlx-pref train {path}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="PNG path (default: RUN_DIR/curves.png).",
)
@click.option("--force", is_flag=True, help="Replace an existing --output file.")
def plot(run_dir: str, output: str | None, force: bool) -> None:
    """Draw a run's training and eval curves (loss, reward accuracy, margins, beta)."""
    from mlx_pref.plot import plot_run

    click.echo(f"wrote {plot_run(run_dir, output, force=force)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Report the platform, MLX backend, the GPU (name, memory, measured bf16/fp32 matmul
    rates) or on the CPU the BLAS and its measured rate, memory, versions."""
    from mlx_pref.doctor import doctor_lines, doctor_report

    problem = backend.check_mlx_backend()
    if problem:
        raise MlxPrefError(problem)
    report = doctor_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for line in doctor_lines(report):
        click.echo(line)
