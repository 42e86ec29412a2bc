"""Configs in TRL's and Soup's vocabularies: mapped to ours with one note, keys without a
counterpart named in one error, ``init --from`` writing the equivalent, and both training."""

from __future__ import annotations

import math

import pytest
import yaml
from click.testing import CliRunner

from mlx_pref.cli import cli
from mlx_pref.config import config_from_dict, load_config
from mlx_pref.errors import ConfigError
from mlx_pref.train import Trainer

TRL_DPO = {
    "loss_type": ["sigmoid", "sft"],
    "loss_weights": [1.0, 0.5],
    "beta": 0.1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "num_train_epochs": 1.0,
    "max_steps": 3,
    "learning_rate": 5.0e-4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "max_prompt_length": 64,
    "max_length": 128,
    "precompute_ref_log_probs": True,
    "logging_steps": 1,
    "save_steps": 2,
    "max_grad_norm": 0.0,
    "report_to": "none",
    "bf16": False,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.05,
    "seed": 42,
}

SOUP_BCO = """\
task: bco
data:
  format: dpo
training:
  bco_beta: 0.1
  lora: { r: 64, alpha: 16 }
  quantization: 4bit
"""


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def test_trl_dpo_names_are_mapped_with_one_note():
    cfg = config_from_dict(TRL_DPO)
    assert cfg.loss == pytest.approx({"sigmoid": 2 / 3, "sft": 1 / 3})
    assert (cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps) == (4, 2, 1, 3)
    assert (cfg.lr_schedule, cfg.warmup_ratio, cfg.reference) == ("cosine", 0.1, "cache")
    assert (cfg.log_every, cfg.save_every, cfg.max_grad_norm, cfg.seed) == (1, 2, None, 42)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 8.0, 0.0)
    (note,) = cfg.notes
    assert note.startswith(
        "read TRL names: per_device_train_batch_size -> batch_size, "
        "gradient_accumulation_steps -> grad_accum, logging_steps -> log_every, "
        "save_steps -> save_every, lora_r -> lora.r, lora_alpha -> lora.alpha, "
        "num_train_epochs -> epochs, max_steps, max_grad_norm 0 -> max_grad_norm: null (no "
        "clipping), lr_scheduler_type cosine -> lr_schedule: cosine, precompute_ref_log_probs "
        "-> reference: cache, max_length, loss_type + loss_weights -> loss: {sigmoid: 0.667, "
        "sft: 0.333} (weights normalised to sum to 1: the loss is TRL's divided by 1.5)"
    )
    assert note.endswith(
        "; ignored (no effect here): report_to, bf16, lora_dropout (TRL's disable_dropout "
        "turns it off)"
    )
    assert "\n" not in note
    # Saved in mlx-pref's names, it reloads to the same settings and says nothing more.
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.notes == []


def test_trl_config_trains_on_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, "dpo.yaml", {**TRL_DPO, "output_dir": str(tmp_path / "run")})
    trainer = Trainer(load_config(path, {"eval_batches": 2}), verbose=False)
    assert trainer.config.model is None and trainer.config.data is None
    final = trainer.train()
    assert trainer.step == 3 and math.isfinite(final["loss"])
    assert final["learning_rate"] < 5.0e-4  # cosine decay after warmup
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["batch_size"] == 4 and "per_device_train_batch_size" not in saved


def test_flags_override_trl_names_without_a_conflict(tmp_path):
    path = write(tmp_path, "c.yaml", {"per_device_train_batch_size": 8, "num_train_epochs": 2})
    cfg = load_config(path, {"batch_size": 2})
    assert (cfg.batch_size, cfg.epochs) == (2, 2)
    with pytest.raises(ConfigError, match="per_device_train_batch_size -> batch_size conflicts"):
        config_from_dict({"per_device_train_batch_size": 8, "batch_size": 2})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"max_steps": -1, "num_train_epochs": 2.0}, {"max_steps": None, "epochs": 2}),
        ({"loss_type": "simpo", "simpo_gamma": 1.0}, {"loss": "simpo"}),  # CPOConfig
        ({"trainer": "orpo", "beta": 0.2}, {"loss": "orpo", "beta": 0.2}),
        ({"desirable_weight": 1.5, "per_device_train_batch_size": 2}, {"loss": "kto"}),
        ({"trainer": "bco", "max_grad_norm": 0.5}, {"loss": "bco", "max_grad_norm": 0.5}),
        ({"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 5}, {"warmup_steps": 5}),
        ({"lr_scheduler_type": "constant", "warmup_ratio": 0.1}, {"warmup_ratio": 0.0}),
        ({"use_rslora": True, "lora_r": 16, "lora_alpha": 8}, {"lora.alpha": 32.0}),
        ({"load_in_4bit": True, "optim": "adamw_torch"}, {"quantization": "4bit"}),
        (
            {
                "dataset_name": "trl-lib/ultrafeedback_binarized",
                "eval_strategy": "steps",
                "eval_steps": 5,
            },
            {
                "data": "hf://trl-lib/ultrafeedback_binarized",
                "eval_data": "hf://trl-lib/ultrafeedback_binarized:test",
                "eval_every": 5,
            },
        ),
        ({"model_name_or_path": "org/model", "torch_dtype": "bfloat16"}, {"dtype": "bfloat16"}),
        ({"push_to_hub": True, "hub_model_id": "me/run"}, {"push_to_hub": "me/run"}),
    ],
)
def test_trl_values_whose_meaning_differs(raw, expected, monkeypatch):
    monkeypatch.setattr("mlx_pref.train.preflight.check_hub_login", lambda repo: None)
    cfg = config_from_dict(raw)
    for key, value in expected.items():
        got = cfg.lora.alpha if key == "lora.alpha" else getattr(cfg, key, None)
        got = cfg.loss_params.get(key, got)
        assert got == value, key
    if raw.get("loss_type") == "simpo":
        assert cfg.loss_params["cpo_alpha"] == 1.0  # CPOConfig's default, not SimPO's 0


def test_keys_without_a_counterpart_are_named_in_one_error():
    raw = {
        "lr_scheduler_type": "polynomial",
        "optim": "sgd",
        "use_peft": False,
        "num_train_epochs": 2.5,
        "per_device_train_batch_size": 2,
        "learnig_rate": 1e-4,
        "made_up_key": 1,
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    message = str(err.value)
    for part in (
        "num_train_epochs 2.5: mlx-pref trains whole epochs",
        "lr_scheduler_type 'polynomial' has no counterpart",
        "optim 'sgd' has no counterpart",
        "unknown keys: 'learnig_rate' (did you mean 'learning_rate'?), 'made_up_key'",
    ):
        assert part in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="CPO's hinge and ipo are reference-free variants"):
        config_from_dict({"loss_type": "hinge", "cpo_alpha": 1.0})


def test_soup_seed_example_maps_and_trains_on_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, "soup.yaml", SOUP_BCO)
    overrides = {"output": str(tmp_path / "run"), "max_steps": 2, "eval_batches": 2}
    cfg = load_config(path, overrides)
    assert (cfg.loss, cfg.beta, cfg.format, cfg.quantization) == ("bco", 0.1, "auto", "4bit")
    assert (cfg.lora.r, cfg.lora.alpha) == (64, 16.0)
    assert cfg.notes == [
        "read Soup names: data.format dpo -> format, training.lora.r -> lora.r, "
        "training.lora.alpha -> lora.alpha, training.quantization -> quantization, "
        "task bco -> loss, training.bco_beta -> beta"
    ]
    trainer = Trainer(cfg, verbose=False)
    final = trainer.train()
    assert trainer.step == 2 and math.isfinite(final["loss"])
    assert trainer.config.quantization is None  # the CPU trains the float base, with a note


def test_soup_preference_dispatcher_and_kl_controls():
    cfg = config_from_dict(
        yaml.safe_load(
            """
base: HuggingFaceTB/SmolLM2-135M-Instruct
task: preference
data: {train: ./data/preferences.jsonl, format: dpo, max_length: 256}
training:
  epochs: 2
  lr: 2e-5
  batch_size: auto
  preference_loss_weights: {dpo: 0.7, bco: 0.3}
  dpo_beta: 0.2
  dpo_beta_schedule: linear
  dpo_beta_end: 0.01
  dpo_ref_regen_epochs: 2
  scheduler: cosine
  warmup_ratio: 0.03
output: ./output
experiment_name: run1
"""
        )
    )
    assert cfg.model == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg.loss == {
        "dpo": 0.7,
        "bco": 0.3,
    }
    assert (cfg.beta, cfg.beta_schedule, cfg.beta_end, cfg.ref_regen_epochs) == (
        0.2,
        "linear",
        0.01,
        2,
    )
    assert (cfg.data, cfg.eval_split, cfg.max_length, cfg.max_prompt_length) == (
        "./data/preferences.jsonl",
        0.1,
        256,
        128,
    )
    assert (cfg.epochs, cfg.learning_rate, cfg.lr_schedule, cfg.warmup_ratio) == (
        2,
        2e-5,
        "cosine",
        0.03,
    )
    assert cfg.output == "output/run1"
    assert "Soup's default val_split 0.1 -> eval_split" in cfg.notes[0]
    assert "ignored (no effect here): training.batch_size auto" in cfg.notes[0]
    with pytest.raises(ConfigError, match="dpo_beta 0.2, bco_beta 0.3: mlx-pref has one beta"):
        config_from_dict(
            {
                "task": "preference",
                "training": {
                    "preference_loss_weights": {"dpo": 0.5, "bco": 0.5},
                    "dpo_beta": 0.2,
                    "bco_beta": 0.3,
                },
            }
        )
    with pytest.raises(ConfigError, match="task 'grpo' has no counterpart"):
        config_from_dict({"task": "grpo"})


def test_init_from_writes_the_equivalent_config(tmp_path):
    source = write(tmp_path, "trl.yaml", TRL_DPO)
    target = tmp_path / "ours.yaml"
    runner = CliRunner()
    result = runner.invoke(cli, ["init", "--from", source, "-o", str(target)])
    assert result.exit_code == 0, result.output
    note = result.output.splitlines()[0]
    assert (
        note.startswith("read TRL names: ") and "per_device_train_batch_size -> batch_size" in note
    )
    written = yaml.safe_load(target.read_text())
    assert written["batch_size"] == 4 and "per_device_train_batch_size" not in written
    assert load_config(target) == config_from_dict(TRL_DPO)
    assert target.read_text().startswith(f"# mlx-pref config written from {source}\n# read TRL")
    again = runner.invoke(cli, ["init", "--from", source, "-o", str(target)])
    assert again.exit_code != 0 and "exists; pass --force" in str(again.exception)
    both = runner.invoke(cli, ["init", "--from", source, "--template", "kto"])
    assert both.exit_code != 0 and "exclude each other" in both.output


def test_keys_read_together_with_another_are_not_listed_as_ignored():
    raw = {
        "dataset_name": "org/ds",
        "dataset_train_split": "train_prefs",
        "dataset_test_split": "test_prefs",
        "eval_strategy": "steps",
        "eval_steps": 5,
    }
    cfg = config_from_dict(raw)
    assert (cfg.data, cfg.eval_data, cfg.eval_every) == (
        "hf://org/ds:train_prefs",
        "hf://org/ds:test_prefs",
        5,
    )
    assert "ignored" not in cfg.notes[0]
    cfg = config_from_dict({**raw, "eval_strategy": "no"})
    assert cfg.eval_data is None and cfg.notes[0].endswith(
        "ignored (no effect here): dataset_test_split, eval_steps, eval_strategy no"
    )
