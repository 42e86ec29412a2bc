"""``mlx-pref generate``: the answers mlx-lm gives for the same weights, side by side."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler

from mlx_pref.cli import cli
from mlx_pref.train import Trainer

PROMPT = "What is the capital of France?"


def chat(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def run_generate(*args: str) -> list[dict]:
    result = CliRunner().invoke(cli, ["generate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


@pytest.fixture
def trained(make_config):
    cfg = make_config(max_steps=2, learning_rate=5e-2)
    Trainer(cfg, verbose=False).train()
    return cfg


def test_greedy_answers_equal_mlx_lm_generate_with_the_same_adapter(trained, tiny_model):
    rows = run_generate(trained.output, "--base", "--prompt", PROMPT, "--max-tokens", "12")
    assert len(rows) == 1 and list(rows[0]["answers"]) == ["base", trained.output]
    model, tokenizer = load(str(tiny_model), adapter_path=trained.output)
    expected = generate(model, tokenizer, prompt=chat(tokenizer, PROMPT), max_tokens=12)
    assert rows[0]["answers"][trained.output] == expected and expected
    base, tokenizer = load(str(tiny_model))
    assert rows[0]["answers"]["base"] == generate(
        base, tokenizer, prompt=chat(tokenizer, PROMPT), max_tokens=12
    )


def test_sampling_is_mlx_lm_sampling_under_the_same_seed(trained, tiny_model):
    args = [trained.output, "--prompt", PROMPT, "--max-tokens", "10", "--temperature", "1.5",
            "--top-p", "0.95"]  # fmt: skip
    first = run_generate(*args, "--seed", "3")[0]["answers"][trained.output]
    assert run_generate(*args, "--seed", "3")[0]["answers"][trained.output] == first
    model, tokenizer = load(str(tiny_model), adapter_path=trained.output)
    mx.random.seed(3)
    expected = generate(model, tokenizer, prompt=chat(tokenizer, PROMPT), max_tokens=10,
                        sampler=make_sampler(temp=1.5, top_p=0.95))  # fmt: skip
    assert first == expected


def test_several_runs_and_a_file_of_prompts(make_config, tmp_path):
    runs = []
    for name, lr in (("a", 5e-2), ("b", 1e-3)):
        cfg = make_config(max_steps=1, learning_rate=lr, output=str(tmp_path / name))
        Trainer(cfg, verbose=False).train()
        runs.append(cfg.output)
    text = tmp_path / "prompts.txt"
    text.write_text("Hello!\n\nWhat sound does a cat make?\n")
    rows = run_generate(*runs, "--prompts", str(text), "--max-tokens", "4")
    assert [r["prompt"] for r in rows] == ["Hello!", "What sound does a cat make?"]
    assert all(list(r["answers"]) == runs for r in rows)
    lines = tmp_path / "prompts.jsonl"
    messages = [{"role": "user", "content": "Hi"}]
    lines.write_text(json.dumps({"prompt": messages}) + "\n")
    (row,) = run_generate(runs[0], "--prompts", str(lines), "--max-tokens", "4")
    assert row["prompt"] == messages
    result = CliRunner().invoke(cli, ["generate", *runs, "--prompt", "Hi", "--max-tokens", "3"])
    assert result.exit_code == 0 and result.output.startswith("prompt: Hi\n")
    assert [line.split("|")[0].strip() for line in result.output.splitlines()[1:3]] == runs


def test_a_full_fine_tuning_run_answers_with_its_model_folder(make_config):
    cfg = make_config(fine_tune="full", max_steps=2)
    Trainer(cfg, verbose=False).train()
    (row,) = run_generate(cfg.output, "--prompt", PROMPT, "--max-tokens", "8")
    model, tokenizer = load(cfg.output)
    assert row["answers"][cfg.output] == generate(
        model, tokenizer, prompt=chat(tokenizer, PROMPT), max_tokens=8
    )


def test_no_prompt_is_a_one_line_error(trained):
    result = CliRunner().invoke(cli, ["generate", trained.output])
    assert result.exit_code != 0 and "give at least one --prompt" in str(result.exception)
