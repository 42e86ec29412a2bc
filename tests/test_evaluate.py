"""``mlx-pref evaluate``: the trainer's own numbers for a run, a checkpoint, its start, or a
model with an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _numerics import NUMERICS
from click.testing import CliRunner

from mlx_pref.cli import cli
from mlx_pref.config import config_from_dict
from mlx_pref.data import load_dataset
from mlx_pref.errors import ConfigError
from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer
from mlx_pref.train.evaluate import evaluate_model, evaluate_run


def evals(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "eval/loss" in r}


def metrics(result) -> dict[str, float]:
    return {k: v for k, v in result.items() if k.startswith("eval/")}


def assert_same(ours: dict, theirs: dict) -> None:
    ours, theirs = metrics(ours), metrics(theirs)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=NUMERICS.tolerance(1e-6)), key


def cli_json(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["evaluate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_embedded_default_before_and_after_40_steps(tmp_path, monkeypatch):
    """Reward accuracy rises from the baseline, and `evaluate` gives the trainer's own
    evaluation of the same weights and data."""
    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "dpo"
    cfg = config_from_dict({"max_steps": 40, "eval_every": 40, "output": str(run)})
    Trainer(cfg, verbose=False).train()
    before, after = cli_json(str(run), "--base"), cli_json(str(run))
    assert before["step"] == 0 and after["step"] == 40 and after["examples"] == 256
    assert after["eval/rewards/accuracies"] > before["eval/rewards/accuracies"] + 0.5
    assert after["eval/rewards/margins"] > before["eval/rewards/margins"]
    logged = evals(run)
    assert_same(before, logged[0])
    assert_same(after, logged[40])
    assert_same(cli_json("--adapter", str(run)), logged[40])  # the adapter on its own


def test_a_checkpoint_scores_as_the_trainer_did_at_that_step(make_config):
    # A beta schedule: the evaluation uses the beta of the last step taken, as training does.
    cfg = make_config(max_steps=4, eval_every=2, beta_schedule="linear", beta_end=0.05)
    Trainer(cfg, verbose=False).train()
    logged = evals(cfg.output)
    step_2 = Path(cfg.output) / "checkpoints" / "step-00000002"
    assert_same(evaluate_run(step_2).to_dict(), logged[2])
    assert_same(evaluate_run(cfg.output).to_dict(), logged[4])


def test_bco_running_statistics_come_from_the_checkpoint(make_config):
    cfg = make_config(loss="bco", max_steps=3, eval_every=3)
    Trainer(cfg, verbose=False).train()
    assert_same(evaluate_run(cfg.output).to_dict(), evals(cfg.output)[3])


def test_other_data_and_a_held_out_split(make_config, prefs):
    cfg = make_config(max_steps=2)
    trainer = Trainer(cfg, verbose=False)
    trainer.train()
    other = evaluate_run(cfg.output, {"eval_data": str(prefs[0])})
    assert other.examples == 48 and other.dataset == str(prefs[0])
    expected = trainer.evaluate(load_dataset(prefs[0], trainer.tokenizer, trainer.config))
    assert_same(other.to_dict(), expected)
    split = cli_json(cfg.output, "--data", str(prefs[0]), "--eval-split", "0.25")
    assert split["examples"] == 12 and split["dataset"].endswith("(eval split)")


def test_a_model_alone_is_its_own_reference(make_config, tiny_model):
    result = evaluate_model({"model": str(tiny_model), "eval_data": make_config().eval_data})
    assert result.step is None
    assert result.metrics["eval/rewards/margins"] == NUMERICS.invariant(0.0)
    assert result.metrics["eval/loss"] == pytest.approx(0.6931472, abs=NUMERICS.tolerance(1e-6))


def test_text_output_and_one_line_errors(make_config, tmp_path):
    cfg = make_config(max_steps=2)
    Trainer(cfg, verbose=False).train()
    result = CliRunner().invoke(cli, ["evaluate", cfg.output])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{cfg.output} at step 2 on ")
    assert any(line.split()[0] == "eval/rewards/accuracies" for line in lines[1:])
    with pytest.raises(ConfigError, match="is not a run directory: config.yaml is missing"):
        evaluate_run(tmp_path / "nowhere")
    mixed = CliRunner().invoke(cli, ["evaluate", cfg.output, "--model", "x"])
    assert mixed.exit_code != 0 and "go without RUN_DIR" in str(mixed.exception)
