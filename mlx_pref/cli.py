"""The ``mlx-pref`` command line: parse, build a Config, call the library. Nothing more."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path

import click

import mlx_pref  # noqa: F401  (loads the fast BLAS before mlx.core)
from mlx_pref import backend
from mlx_pref.errors import MlxPrefError

# Flag name -> config key. Flags override the config file.
TRAIN_FLAGS = {
    "loss": "loss",
    "model": "model",
    "data": "data",
    "eval_data": "eval_data",
    "output": "output",
    "max_steps": "max_steps",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "learning_rate": "learning_rate",
    "beta": "beta",
    "max_length": "max_length",
    "lora_rank": "lora.r",
    "seed": "seed",
    "eval_every": "eval_every",
    "save_every": "save_every",
    "strict": "strict",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mlx_pref.__version__, prog_name="mlx-pref")
def cli() -> None:
    """Preference optimization (DPO, IPO, SimPO, ORPO, BCO, KTO, ...) for language models on MLX."""


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--loss", help="Loss name (sigmoid/dpo, ipo, simpo, bco, ...).")
@click.option(
    "--model", help="Model directory or Hugging Face Hub id (default: embedded tiny model)."
)
@click.option("--data", help="Preference data file (default: embedded data).")
@click.option("--eval-data", help="Held-out preference data file.")
@click.option("--output", help="Run directory for adapters, checkpoints and metrics.")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--epochs", type=int, help="Passes over the training data.")
@click.option("--batch-size", type=int, help="Pairs (or rows) per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--learning-rate", type=float, help="Peak learning rate.")
@click.option("--beta", type=float, help="Loss temperature beta.")
@click.option("--max-length", type=int, help="Maximum prompt + completion tokens.")
@click.option("--lora-rank", type=int, help="LoRA rank r.")
@click.option("--seed", type=int, help="Seed for data order, adapter init and dropout.")
@click.option("--eval-every", type=int, help="Evaluate every N steps.")
@click.option("--save-every", type=int, help="Checkpoint every N steps.")
@click.option("--strict/--no-strict", default=None, help="Make any skipped bad row an error.")
@click.option(
    "--resume",
    is_flag=False,
    flag_value=".",
    default=None,
    metavar="[DIR]",
    help="Continue the run in DIR (default: the config's output) from its last checkpoint.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the output directory.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def train(config, resume, overwrite, quiet, **flags) -> None:
    """Train LoRA adapters with a preference loss.

    CONFIG is an optional YAML file; flags override it. With neither, trains the
    embedded tiny model on the embedded preference data with DPO.
    """
    from mlx_pref.config import load_config
    from mlx_pref.trainer import Trainer

    overrides = {TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None}
    if resume is not None:
        run_dir = resume
        if resume == ".":
            run_dir = load_config(config, overrides).output
        trainer = Trainer.resume(run_dir, overrides, verbose=not quiet)
    else:
        cfg = load_config(config, overrides)
        if overwrite and Path(cfg.output).exists():
            shutil.rmtree(cfg.output)
        trainer = Trainer(cfg, verbose=not quiet)
    final = trainer.train()
    if not quiet:
        keys = [
            k
            for k in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")
            if k in final
        ]
        summary = "  ".join(f"{k} {final[k]:.4f}" for k in keys)
        click.echo(f"done: {trainer.run_dir}  {summary}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Report the platform, MLX backend, BLAS (with a measured matmul rate), memory, versions."""
    problem = backend.check_mlx_backend()
    if problem:
        raise MlxPrefError(problem)
    blas = backend.blas_info()
    total = backend.total_memory()
    report = {
        "platform": f"{platform.system()} {platform.machine()} ({platform.platform()})",
        "python": sys.version.split()[0],
        "backend": backend.backend_name(),
        "device": backend.device_info(),
        "blas": blas.name,
        "blas_path": blas.path,
        "blas_fast": blas.fast,
        "blas_note": blas.note,
        "matmul_gflops": round(backend.matmul_gflops(), 1),
        "memory_total_gb": round(total / 1e9, 1) if total else None,
        "peak_rss_gb": round(backend.peak_rss() / 1e9, 2),
        "versions": backend.package_versions(),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    width = max(len(k) for k in report)
    for key, value in report.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        click.echo(f"{key:<{width}}  {value}")
    if not blas.fast:
        click.echo(f"hint: matmuls use a slow BLAS ({blas.note}).")


@cli.group()
def data() -> None:
    """Inspect preference datasets."""


@data.command("check")
@click.argument("spec", metavar="FILE")
@click.option("--model", help="Model whose tokenizer to use (default: embedded tiny model).")
@click.option(
    "--format",
    "data_format",
    type=click.Choice(["auto", "paired", "implicit", "conversational", "unpaired"]),
    help="Row format (default: detected per file).",
)
@click.option("--max-length", type=int, help="Maximum prompt + completion tokens.")
@click.option("--max-prompt-length", type=int, help="Maximum prompt tokens.")
@click.option("--max-completion-length", type=int, help="Maximum tokens per completion.")
@click.option("--truncation-mode", type=click.Choice(["keep_end", "keep_start"]))
@click.option("--strict", is_flag=True, default=None, help="Make any bad row an error.")
@click.option("--batch-size", type=int, help="Batch size for the padding figures.")
def data_check(spec, model, data_format, batch_size, **flags) -> None:
    """Validate a dataset and print what training would read from it.

    FILE is a .jsonl/.json file (or .gz), a directory of them, or a Hugging Face Hub
    dataset: hf://owner/name[/path][:split]. Exit status 2 on a fatal problem.
    """
    from mlx_pref.config import load_config
    from mlx_pref.data.check import check_dataset, load_tokenizer
    from mlx_pref.data.sources import resolve_files

    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update({"data": spec, "model": model, "format": data_format or "auto"})
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    cfg = load_config(None, overrides)
    files = resolve_files(spec)  # a missing file or Hub repo fails before the model loads
    result = check_dataset(spec, load_tokenizer(cfg.model), cfg, files=files)
    click.echo(result.format())


def main() -> None:
    """Entry point: user errors are one line on stderr and exit status 2, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MlxPrefError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(130 if type(exc).__name__ == "Interrupted" else 2)


if __name__ == "__main__":
    main()
