"""``mlx-pref export``: a run's adapter for mlx-lm, PEFT/transformers or llama.cpp, or a
fused model (safetensors or GGUF)."""

from __future__ import annotations

import click

from mlx_pref.cli.app import cli
from mlx_pref.config import EXPORT_FORMATS, GGUF_QUANTS


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    default="mlx",
    show_default=True,
    help="mlx: mlx-lm adapter; peft: PEFT adapter for transformers; fused: merged model; "
    "gguf: merged model as one GGUF file (llama.cpp, Ollama); gguf-lora: llama.cpp LoRA adapter.",
)
@click.option(
    "--quant",
    type=click.Choice(GGUF_QUANTS),
    help=f"gguf: the type of the weight matrices (default {GGUF_QUANTS[0]}; norms stay F32).",
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
    run_dir, fmt, quant, output, dequantize, base_model, overwrite, repo_id, private, dry_run
) -> None:
    """Export a run's adapter for mlx-lm, PEFT/transformers, llama.cpp, or as a fused model
    (safetensors or GGUF).

    RUN_DIR is a finished run directory (or one of its checkpoints/step-N directories).
    The Hub token comes from `hf auth login` or HF_TOKEN and is never shown.
    """
    from mlx_pref.export import export_run, push_to_hub, upload_files, validate_repo_id

    if (private or dry_run) and not repo_id:
        raise click.UsageError("--private and --dry-run go with --push-to-hub REPO_ID")
    if dequantize and fmt != "fused":
        raise click.UsageError("--dequantize goes with --format fused")
    if quant and fmt != "gguf":
        raise click.UsageError("--quant goes with --format gguf")
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
        quant=quant,
    )
    files = upload_files(folder)
    click.echo(f"exported {fmt} to {folder} ({len(files)} files, {sum(s for _, s in files)} bytes)")
    if repo_id:
        for line in push_to_hub(folder, repo_id, private=private, dry_run=dry_run):
            click.echo(line)
