"""``mlx-pref generate``: answers from runs (and their base) to a few prompts, side by side."""

from __future__ import annotations

import json

import click

from mlx_pref.cli.app import cli
from mlx_pref.errors import MlxPrefError


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False))
@click.option("--base", is_flag=True, help="Also answer with the base model the runs started from.")
@click.option("--model", help="Without RUN_DIR: the model (default: embedded tiny model).")
@click.option("--adapter", help="Without RUN_DIR: an adapter folder to apply to --model.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(dir_okay=False),
    help="A file of prompts: one per line, or .jsonl rows with a 'prompt' (text or messages).",
)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option(
    "--temperature", type=float, default=0.0, show_default=True, help="0: greedy decoding."
)
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--no-chat-template", is_flag=True, help="Send the prompt text as it is.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt.")
def generate(
    run_dirs, base, model, adapter, prompts, prompts_file, max_tokens, temperature, top_p, seed,
    no_chat_template, as_json,
) -> None:  # fmt: skip
    """Answer prompts with the trained weights of one or more runs, side by side.

    Each RUN_DIR answers with its adapter on its base (or its whole model, for full
    fine-tuning); --base adds the base itself. Without RUN_DIR, --model (and --adapter)
    answers. Prompts go through the model's chat template as one user message.
    """
    from mlx_pref.generate import format_answers, generate_answers, read_prompts, sources_for

    if run_dirs and (model or adapter):
        raise MlxPrefError(
            "generate RUN_DIR uses the runs' models; --model and --adapter go without RUN_DIR"
        )
    if max_tokens <= 0 or temperature < 0 or not 0 < top_p <= 1:
        raise MlxPrefError("need --max-tokens > 0, --temperature >= 0 and 0 < --top-p <= 1")
    todo = list(prompts) + (read_prompts(prompts_file) if prompts_file else [])
    if not todo:
        raise MlxPrefError("give at least one --prompt TEXT or a --prompts FILE")
    sources = sources_for(run_dirs, base=base, model=model, adapter=adapter)
    rows = generate_answers(
        sources, todo, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
        chat=not no_chat_template,
    )  # fmt: skip
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        click.echo(format_answers(rows))
