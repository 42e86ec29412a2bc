"""The config: YAML + flags, unknown keys with suggestions, type and range checks."""

from __future__ import annotations

import pytest

from mlx_pref.config import Config, config_from_dict, load_config
from mlx_pref.errors import ConfigError


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = load_config(None, {"loss": "simpo", "simpo_gamma": 1, "lora.r": 16})
    assert cfg.lora.r == 16 and cfg.lora.scale == pytest.approx(1.0)
    assert cfg.loss_params == {"simpo_gamma": 1.0}
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.2\nbatch_size: 3\nlora: {r: 4, alpha: 8}\n")
    cfg = load_config(path, {"beta": 0.3, "lora.r": 2})
    assert cfg.beta == 0.3 and cfg.batch_size == 3
    assert cfg.lora.r == 2 and cfg.lora.alpha == 8


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"learning_rte": 1e-4}, "unknown key 'learning_rte'; did you mean 'learning_rate'?"),
        ({"simpo_gama": 1}, "did you mean 'simpo_gamma'?"),
        ({"lora": {"rnk": 4}}, "unknown lora key 'rnk'; did you mean 'r'?"),
        ({"beta": 0}, "beta must be > 0, got 0"),
        ({"beta": "high"}, "beta must be a number, got 'high'"),
        ({"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
        ({"label_smoothing": 0.5}, "label_smoothing must be in [0, 0.5)"),
        ({"loss": "ipoo"}, "unknown loss 'ipoo' (did you mean 'ipo'?)"),
        ({"loss": {"dpo": 1.0}}, "for a single loss write `loss: dpo`"),
        ({"loss": {"dpo": 0.7, "bco": 0.2}}, "sum to 1"),
        ({"quantization": "3bit"}, "quantization: '3bit' is not one of: 4bit, 8bit"),
        ({"beta_schedule": "linear"}, "needs beta_end"),
        ({"max_prompt_length": 600, "max_length": 512}, "must be smaller than max_length"),
        ({"ref_model_mixup_alpha": 0}, "ref_model_mixup_alpha must be in (0, 1]"),
    ],
)
def test_bad_values_give_one_actionable_line(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_lora_aliases_from_other_trainers():
    cfg = config_from_dict({"lora": {"rank": 16, "lora_alpha": 32, "use_dora": True}})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dora) == (16, 32.0, True)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("beta: 0.1\nlora: {r: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:1: invalid YAML"):
        load_config(path)


def test_error_from_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("betta: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'betta'; did you mean 'beta'\?"):
        load_config(path)


def test_comma_separated_loss_is_a_sweep():
    cfg = config_from_dict({"loss": "dpo, ipo,simpo"})
    assert cfg.sweep == ["dpo", "ipo", "simpo"] and cfg.loss == "dpo"


def test_scientific_notation_strings_are_numbers():
    # YAML 1.1 reads "1e-4" as a string; a number is meant.
    assert config_from_dict({"learning_rate": "1e-4"}).learning_rate == 1e-4


def test_config_is_a_dataclass_with_typed_defaults():
    cfg = Config()
    assert cfg.model is None and cfg.loss == "sigmoid" and cfg.reference == "auto"


def test_warmup_ratio_is_resolved_against_the_run_steps():
    import mlx.core as mx

    from mlx_pref.train.step import lr_schedule, warmup_steps

    cfg = config_from_dict({"warmup_ratio": 0.1, "learning_rate": 1.0})
    assert warmup_steps(cfg, 25) == 3  # ceil(2.5), as transformers rounds
    schedule = lr_schedule(cfg, 25)
    assert [round(float(schedule(mx.array(s))), 4) for s in (0, 1, 3, 10)] == [0.0, 0.3333, 1, 1]
    with pytest.raises(ConfigError, match="warmup_steps and warmup_ratio exclude each other"):
        config_from_dict({"warmup_ratio": 0.1, "warmup_steps": 2})
    with pytest.raises(ConfigError, match=r"warmup_ratio must be in \[0, 1\)"):
        config_from_dict({"warmup_ratio": 1.5})
