"""``mlx-pref train`` and ``mlx-pref cache-ref``: parse, build a Config, call the library."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_pref.cli.app import cli
from mlx_pref.cli.options import parse_settings, set_option
from mlx_pref.config import (
    DATA_FORMATS,
    DTYPES,
    FINE_TUNE_TYPES,
    LR_SCHEDULES,
    QUANTIZATION_BITS,
    REFERENCES,
)
from mlx_pref.errors import MlxPrefError

# Flag name -> config key. Flags override --set, which overrides the config file.
TRAIN_FLAGS = {
    "loss": "loss",
    "fine_tune": "fine_tune",
    "model": "model",
    "data": "data",
    "eval_data": "eval_data",
    "data_format": "format",
    "eval_split": "eval_split",
    "output": "output",
    "max_steps": "max_steps",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "learning_rate": "learning_rate",
    "lr_schedule": "lr_schedule",
    "warmup_steps": "warmup_steps",
    "beta": "beta",
    "max_length": "max_length",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "dtype": "dtype",
    "quantization": "quantization",
    "grad_checkpoint": "grad_checkpoint",
    "memory_limit": "memory_limit",
    "seed": "seed",
    "eval_every": "eval_every",
    "save_every": "save_every",
    "strict": "strict",
    "ref_model": "ref_model",
    "reference": "reference",
    "adapter": "adapter",
    "report_to": "report_to",
    "push_to_hub": "push_to_hub",
    "private": "hub_private",
}


RESUME_OUTPUT = "<the config's output>"


def overrides_from(flags: dict, settings: tuple[str, ...] = ()) -> dict:
    """Config overrides from ``--set`` values and named flags; a named flag wins."""
    named = {TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None}
    return {**parse_settings(settings), **named}


def run_inputs(cfg, config_path: str | None) -> list[str]:
    """The local files and folders a run reads: --overwrite never removes a folder holding one."""
    paths = [config_path, cfg.data, cfg.eval_data, cfg.model, cfg.adapter, cfg.ref_model]
    return [p for p in paths if p and Path(str(p).split(":")[0]).expanduser().exists()]


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--loss", help="Loss name (sigmoid/dpo, ipo, simpo, bco, ...).")
@click.option(
    "--model", help="Model directory or Hugging Face Hub id (default: embedded tiny model)."
)
@click.option(
    "--fine-tune",
    type=click.Choice(FINE_TUNE_TYPES),
    help="lora or dora adapters (default: lora), or full: every weight.",
)
@click.option(
    "--data",
    help="Preference data: a file (JSON Lines, JSON, parquet, Arrow, CSV), a folder, or "
    "hf://owner/name[:split] (default: embedded data).",
)
@click.option("--eval-data", help="Held-out preference data file.")
@click.option(
    "--format", "data_format", type=click.Choice(DATA_FORMATS), help="Row format (default: auto)."
)
@click.option("--eval-split", type=float, help="Without --eval-data: hold out this fraction.")
@click.option("--output", help="Run directory for adapters, checkpoints and metrics.")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--epochs", type=int, help="Passes over the training data.")
@click.option("--batch-size", type=int, help="Pairs (or rows) per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--learning-rate", type=float, help="Peak learning rate.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), help="Decay after warmup.")
@click.option("--warmup-steps", type=int, help="Linear warmup steps from 0.")
@click.option("--beta", type=float, help="Loss temperature beta.")
@click.option("--max-length", type=int, help="Maximum prompt + completion tokens.")
@click.option("--lora-rank", type=int, help="LoRA rank r.")
@click.option("--lora-alpha", type=float, help="LoRA alpha (scale = alpha / r).")
@click.option("--dtype", type=click.Choice(DTYPES), help="Cast the base's float weights.")
@click.option(
    "--quantization", type=click.Choice(tuple(QUANTIZATION_BITS)), help="Quantize the base (QLoRA)."
)
@click.option(
    "--grad-checkpoint/--no-grad-checkpoint",
    default=None,
    help="Recompute every block in the backward pass (default: as the memory plan needs).",
)
@click.option(
    "--memory-limit",
    metavar="SIZE",
    help="What a step may use: 12GB, 800MB or 60% of the device (default: the weights plus 2 GB).",
)
@click.option("--seed", type=int, help="Seed for data order, adapter init and dropout.")
@click.option("--eval-every", type=int, help="Evaluate every N steps.")
@click.option("--save-every", type=int, help="Checkpoint every N steps.")
@click.option("--strict/--no-strict", default=None, help="Make any skipped bad row an error.")
@click.option("--ref-model", help="A separate frozen reference model (directory or Hub id).")
@click.option(
    "--reference",
    type=click.Choice(REFERENCES),
    help="Where reference log-probs come from (default: auto).",
)
@click.option("--adapter", help="Start from this (SFT) adapter; the reference is base + it.")
@click.option("--report-to", help="Also log to: tensorboard, wandb (comma-separated), or none.")
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
@set_option
def train(config, resume, overwrite, quiet, settings, **flags) -> None:
    """Train LoRA adapters with a preference loss.

    CONFIG is an optional YAML file; flags override it. With neither, trains the
    embedded tiny model on the embedded preference data with DPO.
    """
    from mlx_pref.config import load_config
    from mlx_pref.rundir import check_output, clear
    from mlx_pref.train import Trainer
    from mlx_pref.train.loop import EVAL_KEYS
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
    overrides = overrides_from(flags, settings)
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
        keys = [k for k in EVAL_KEYS if k in final]
        summary = "  ".join(f"{k} {final[k]:.4f}" for k in keys)
        click.echo(f"done: {trainer.run_dir}  {summary}".rstrip())


@cli.command("cache-ref")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--model", help="Model directory or Hub id.")
@click.option("--data", help="Preference data file.")
@click.option("--eval-data", help="Held-out preference data file.")
@click.option("--loss", help="Loss (decides whether a reference is needed).")
@set_option
def cache_ref(config, settings, **flags) -> None:
    """Precompute the reference log-probs of a config's datasets into the cache."""
    from mlx_pref.config import load_config
    from mlx_pref.data import load_datasets
    from mlx_pref.models import load_model
    from mlx_pref.reference import Cached, make_reference
    from mlx_pref.trainable import make_trainable

    cfg = load_config(config, {**overrides_from(flags, settings), "reference": "cache"})
    loaded = load_model(
        cfg.model, quantization_bits=cfg.quantization_bits, dtype=cfg.dtype,
        dequantize=cfg.dequantize,
    )  # fmt: skip
    for note in [*cfg.notes, *loaded.notes]:
        click.echo(note)
    trainable = make_trainable(loaded, cfg)
    train_set, eval_set = load_datasets(cfg, loaded.tokenizer)
    reference = make_reference(cfg, loaded, sft_weights=trainable.start_weights, log=click.echo)
    if not isinstance(reference, Cached):
        raise MlxPrefError(f"loss {cfg.loss} is reference-free: there is nothing to cache")
    reference.prepare({"train": train_set, "eval": eval_set})
    for split in reference.datasets:
        click.echo(f"{split}: {reference.path_for(split)}")
