"""The ``mlx-pref`` command line: parse, build a Config, call the library. Nothing more."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import click

import mlx_pref  # noqa: F401  (loads the fast BLAS before mlx.core)
from mlx_pref import backend
from mlx_pref.errors import Interrupted, MlxPrefError

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
    "ref_model": "ref_model",
    "reference": "reference",
    "adapter": "adapter",
    "push_to_hub": "push_to_hub",
    "private": "hub_private",
}


RESUME_OUTPUT = "<the config's output>"


def run_inputs(cfg, config_path: str | None) -> list[str]:
    """The local files and folders a run reads: --overwrite never removes a folder holding one."""
    paths = [config_path, cfg.data, cfg.eval_data, cfg.model, cfg.adapter, cfg.ref_model]
    return [p for p in paths if p and Path(str(p).split(":")[0]).expanduser().exists()]


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
@click.option("--ref-model", help="A separate frozen reference model (directory or Hub id).")
@click.option(
    "--reference",
    type=click.Choice(["auto", "cache", "adapters-off", "model", "none"]),
    help="Where reference log-probs come from (default: auto).",
)
@click.option("--adapter", help="Start from this (SFT) adapter; the reference is base + it.")
@click.option("--push-to-hub", metavar="REPO_ID", help="Export and upload the adapter when done.")
@click.option(
    "--private/--public", default=None, help="With --push-to-hub: a private (or public) repo."
)
@click.option(
    "--resume",
    is_flag=False,
    flag_value=RESUME_OUTPUT,
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
    from mlx_pref.rundir import check_output, clear
    from mlx_pref.train import Trainer
    from mlx_pref.train.sweep import sweep, sweep_table

    if resume and resume.endswith((".yaml", ".yml")) and Path(resume).is_file():
        raise MlxPrefError(
            f"--resume takes a run directory, not a config; for this config write: "
            f"mlx-pref train {resume} --resume"
        )
    if resume is not None and overwrite:
        raise MlxPrefError(
            "--resume continues a run and --overwrite replaces one: pass one or the other"
        )
    overrides = {TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None}
    cfg = load_config(config, overrides)
    if resume is not None:
        run_dir = cfg.output if resume == RESUME_OUTPUT else resume
        trainer = Trainer.resume(run_dir, overrides, verbose=not quiet)
        if trainer.finished:
            click.echo(
                f"{run_dir} already finished at step {trainer.step}; nothing to do (to train "
                f"longer: mlx-pref train --resume {run_dir} --max-steps N)"
            )
            return
    else:
        kind = "sweep" if cfg.sweep else "run"
        protected = run_inputs(cfg, config)
        check_output(
            cfg.output, kind, overwrite=overwrite, protected=protected, continues=bool(cfg.sweep)
        )
        if cfg.sweep:  # finished sub-runs are skipped and interrupted ones resumed
            click.echo(sweep_table(sweep(cfg, verbose=not quiet, overwrite=overwrite)))
            return
        trainer = Trainer(cfg, verbose=not quiet)  # model, data and options validated
        if overwrite and trainer.is_main:
            clear(cfg.output)
    final = trainer.train()
    if not quiet:
        keys = [
            k
            for k in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")
            if k in final
        ]
        summary = "  ".join(f"{k} {final[k]:.4f}" for k in keys)
        click.echo(f"done: {trainer.run_dir}  {summary}".rstrip())


@cli.command("cache-ref")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--model", help="Model directory or Hub id.")
@click.option("--data", help="Preference data file.")
@click.option("--eval-data", help="Held-out preference data file.")
@click.option("--loss", help="Loss (decides whether a reference is needed).")
def cache_ref(config, **flags) -> None:
    """Precompute the reference log-probs of a config's datasets into the cache."""
    from mlx_pref.adapters import attach_adapters
    from mlx_pref.config import load_config
    from mlx_pref.data import load_datasets
    from mlx_pref.models import load_model
    from mlx_pref.reference import Cached, make_reference

    overrides = {TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None}
    cfg = load_config(config, {**overrides, "reference": "cache"})
    loaded = load_model(
        cfg.model, quantization_bits=cfg.quantization_bits, dtype=cfg.dtype,
        dequantize=cfg.dequantize,
    )  # fmt: skip
    _, sft_weights = attach_adapters(loaded.model, cfg.lora, cfg.adapter)
    train_set, eval_set = load_datasets(cfg, loaded.tokenizer)
    reference = make_reference(cfg, loaded, sft_weights=sft_weights, log=click.echo)
    if not isinstance(reference, Cached):
        raise MlxPrefError(f"loss {cfg.loss} is reference-free: there is nothing to cache")
    reference.prepare({"train": train_set, "eval": eval_set})
    for split in reference.datasets:
        click.echo(f"{split}: {reference.path_for(split)}")


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
@click.option("--template", type=click.Choice(TEMPLATES), default="dpo", show_default=True)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="File to write (default: TEMPLATE.yaml).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(template: str, output: str | None, force: bool) -> None:
    """Write a commented starter config for a loss family; it runs as written."""
    from importlib.resources import files

    from mlx_pref.checkpoint import write_atomic

    path = Path(output or f"{template}.yaml")
    if path.is_dir():
        raise MlxPrefError(f"init: {path} is a folder; name a file with --output")
    if path.exists() and not force:
        raise MlxPrefError(
            f"{path} exists; pass --force to overwrite or --output to pick another file"
        )
    if not path.parent.is_dir():
        raise MlxPrefError(f"init: cannot write {path}: the folder {path.parent} does not exist")
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


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mlx", "peft", "fused"]),
    default="mlx",
    show_default=True,
    help="mlx: mlx-lm adapter; peft: PEFT adapter for transformers; fused: merged model.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    help="Export directory (default: RUN_DIR/export-FORMAT).",
)
@click.option(
    "--dequantize", is_flag=True, help="fused: write a float model from a quantized base."
)
@click.option(
    "--base-model", help="Hub id of the base model to record, when the run used a local copy."
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option(
    "--push-to-hub", "repo_id", metavar="REPO_ID", help="Upload the export to this Hub repo."
)
@click.option("--private", is_flag=True, help="Create the Hub repo as private.")
@click.option(
    "--dry-run", is_flag=True, help="List what --push-to-hub would upload; upload nothing."
)
def export(
    run_dir, fmt, output, dequantize, base_model, overwrite, repo_id, private, dry_run
) -> None:
    """Export a run's adapter for mlx-lm, PEFT/transformers, or as a fused model.

    RUN_DIR is a finished run directory (or one of its checkpoints/step-N directories).
    The Hub token comes from `hf auth login` or HF_TOKEN and is never shown.
    """
    from mlx_pref.export import export_run, push_to_hub, upload_files, validate_repo_id

    if (private or dry_run) and not repo_id:
        raise click.UsageError("--private and --dry-run go with --push-to-hub REPO_ID")
    if dequantize and fmt != "fused":
        raise click.UsageError("--dequantize goes with --format fused")
    if repo_id:
        validate_repo_id(repo_id)
    folder = export_run(
        run_dir,
        fmt,
        output,
        dequantize=dequantize,
        base=base_model,
        repo_id=repo_id,
        overwrite=overwrite,
    )
    files = upload_files(folder)
    click.echo(f"exported {fmt} to {folder} ({len(files)} files, {sum(s for _, s in files)} bytes)")
    if repo_id:
        for line in push_to_hub(folder, repo_id, private=private, dry_run=dry_run):
            click.echo(line)


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
    except click.UsageError as exc:  # unknown flag, bad value: one line, with the help hint
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except MlxPrefError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code if isinstance(exc, Interrupted) else 2)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without a checkpoint
        click.echo("aborted", err=True)
        sys.exit(130)
    except OSError as exc:  # the disk or the file system refused: name the file, nothing else
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
