"""Keep-best and early stopping on an eval metric: the expected step, the best weights, an
exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_pref.cli import cli
from mlx_pref.config import config_from_dict
from mlx_pref.errors import ConfigError, Interrupted
from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer
from mlx_pref.train.watch import lower_is_better, read_best

# eval/rewards/accuracies at steps 0, 1, 2, ...: best 0.7 at step 2, then no gain beyond
# 0.05 for three evaluations (a new best 0.72 at step 4 is too small to reset patience).
SCRIPT = [0.5, 0.6, 0.7, 0.65, 0.72, 0.71, 0.69, 0.8, 0.9]


def adapters(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def scripted(trainer: Trainer, values=SCRIPT) -> Trainer:
    """The trainer's evaluation, with the accuracy replaced by the script's value."""
    real = trainer.evaluate

    def evaluate(dataset=None):
        out = real(dataset)
        out["eval/rewards/accuracies"] = values[trainer.step]
        return out

    trainer.evaluate = evaluate
    return trainer


def settings(**extra) -> dict:
    return {"max_steps": 8, "eval_every": 1, "save_every": 1, "save_best": "rewards/accuracies",
            "early_stopping_patience": 3, "early_stopping_threshold": 0.05, **extra}  # fmt: skip


def test_early_stopping_stops_at_the_expected_step_with_a_checkpoint(make_config):
    cfg = make_config(**settings(save_every=100))
    trainer = scripted(Trainer(cfg, verbose=False))
    lines = []
    trainer.verbose, trainer.progress.enabled = True, False
    trainer.log = lambda text: lines.append(text) if text else None
    trainer.train()
    assert trainer.step == 5 and trainer.finished and trainer.watch.stopped
    assert [p.name for p in (Path(cfg.output) / "checkpoints").iterdir()] == ["step-00000005"]
    assert any(line.startswith("early stopping at step 5: eval/rewards/accuracies has not "
                               "improved by more than 0.05 for 3 evaluations (best 0.72 at "
                               "step 4)") for line in lines)  # fmt: skip
    records = read_metrics(cfg.output)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert (Path(cfg.output) / "adapters.safetensors").is_file()
    resumed = Trainer.resume(cfg.output, verbose=False)
    assert resumed.finished and resumed.step == 5  # a finished run, nothing more to do


def test_the_best_weights_are_kept_with_their_step(make_config):
    cfg = make_config(**settings(early_stopping_patience=None))
    scripted(Trainer(cfg, verbose=False)).train()
    best = Path(cfg.output) / "best"
    assert read_best(cfg.output) == {
        "metric": "eval/rewards/accuracies", "value": 0.9, "step": 8,
    }  # fmt: skip
    assert_same = np.testing.assert_array_equal
    checkpoint = Path(cfg.output) / "checkpoints" / "step-00000008"
    for key, value in adapters(best).items():
        assert_same(value, adapters(checkpoint)[key])
    marker = json.loads((Path(cfg.output) / ".mlx-pref.json").read_text())
    assert "best" in marker["files"] and (best / "manifest.json").is_file()


def test_the_best_of_a_run_that_only_gets_worse_is_its_start(make_config):
    cfg = make_config(max_steps=3, eval_every=1, save_best="loss")
    trainer = scripted(Trainer(cfg, verbose=False), values=[0.5] * 4)
    real = trainer.evaluate
    losses = iter([0.6, 0.7, 0.8, 0.9])

    def worse(dataset=None):
        return {**real(dataset), "eval/loss": next(losses)}

    trainer.evaluate = worse
    trainer.train()
    assert read_best(cfg.output)["step"] == 0  # eval/loss: lower is better
    assert not np.any(adapters(Path(cfg.output) / "best")["model.layers.0.self_attn.q_proj.lora_b"])


def test_resume_stops_where_the_uninterrupted_run_stops(make_config, tmp_path):
    cut = make_config(**settings(output=str(tmp_path / "cut")))
    first = scripted(Trainer(cut, verbose=False))
    step = first.train_step

    def stop_after_three(batches):
        result = step(batches)
        if first.step == 3:
            first.request_stop()
        return result

    first.train_step = stop_after_three
    with pytest.raises(Interrupted):
        first.train()
    resumed = scripted(Trainer.resume(cut.output, verbose=False))
    assert resumed.watch.best_step == 2 and resumed.watch.waited == 1  # from the checkpoint
    resumed.train()
    assert resumed.step == 5 and read_best(cut.output)["step"] == 4


def test_direction_is_inferred_from_the_name_and_can_be_overridden(make_config):
    assert lower_is_better("eval/loss") and lower_is_better("eval/nll_loss")
    assert not lower_is_better("eval/rewards/margins")
    trainer = Trainer(make_config(save_best="eval/logps/rejected", greater_is_better=False),
                      verbose=False)  # fmt: skip
    assert trainer.watch.greater is False and trainer.watch.metric == "eval/logps/rejected"


def test_keep_best_needs_held_out_data_and_a_known_metric(make_config):
    with pytest.raises(ConfigError, match="no held-out data: set eval_data or eval_split"):
        Trainer(make_config(eval_data=None, save_best="loss"), verbose=False)
    trainer = Trainer(make_config(save_best="rewards/acuracies", max_steps=1), verbose=False)
    with pytest.raises(ConfigError, match="did you mean 'eval/rewards/accuracies'"):
        trainer.train()


def test_the_cli_prints_a_one_line_stop(make_config, tmp_path, monkeypatch):
    import yaml

    cfg = make_config(max_steps=6, eval_every=1, early_stopping_patience=1,
                      early_stopping_threshold=10.0)  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = CliRunner().invoke(cli, ["train", str(path)])
    assert result.exit_code == 0, result.output
    stop = [line for line in result.output.splitlines() if line.startswith("early stopping")]
    assert stop == [
        "early stopping at step 1: eval/loss has not improved by more than 10 for 1 "
        "evaluations (best " + stop[0].split("(best ")[1]
    ]
    assert config_from_dict({"early_stopping_patience": 2}).early_stopping_patience == 2
