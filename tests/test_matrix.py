"""Every loss with every option it could be given: two steps with finite losses, or a
one-line refusal from the config check, before any model loads."""

from __future__ import annotations

import itertools
import math

import pytest

from mlx_pref.config import config_from_dict
from mlx_pref.errors import ConfigError
from mlx_pref.losses import loss_names
from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer

OPTIONS = {
    "plain": {},
    "ld_alpha": {"ld_alpha": 0.5},
    "use_weighting": {"use_weighting": True},
    "rpo_alpha": {"rpo_alpha": 0.5},
    "label_smoothing": {"label_smoothing": 0.1},
    "f_divergence": {"f_divergence_type": "js_divergence"},
    "reference_free": {"reference_free": True},
    "beta_schedule": {"beta_schedule": "linear", "beta_end": 0.05},
    "grad_accum": {"grad_accum": 2},
    "no_share_prompt": {"share_prompt": False},
    "grad_checkpoint": {"grad_checkpoint": True},
    "compile": {"compile": True},
    "reference_cache": {"reference": "cache"},
    "reference_adapters_off": {"reference": "adapters-off"},
    "reference_model": {"reference": "model", "ref_model": "<tiny>"},
    "reference_none": {"reference": "none"},
}
NEEDS = {"exo_pair": {"label_smoothing": 1e-3}}  # undefined at label_smoothing 0


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory, prefs):
    path = tmp_path_factory.mktemp("matrix") / "pairs.jsonl"
    path.write_text("".join(prefs[0].read_text().splitlines(keepends=True)[:8]))
    return path


@pytest.mark.parametrize("loss", loss_names())
def test_every_option_trains_or_is_refused_before_loading(
    loss, tiny_model, eight_pairs, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path / "cache"))
    outcomes = {}
    for name, option in OPTIONS.items():
        raw = {
            "model": str(tiny_model), "data": str(eight_pairs), "loss": loss,
            "output": str(tmp_path / name), "batch_size": 2, "max_steps": 2, "log_every": 1,
            "eval_every": 100, "save_every": 100, "lora": {"r": 4}, "max_length": 96,
            **NEEDS.get(loss, {}),
            **{k: str(tiny_model) if v == "<tiny>" else v for k, v in option.items()},
        }  # fmt: skip
        try:
            cfg = config_from_dict(raw)
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 300, message
            outcomes[name] = "refused"
            continue
        Trainer(cfg, verbose=False).train()
        losses = [r["loss"] for r in read_metrics(cfg.output) if "loss" in r]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (name, losses)
        outcomes[name] = "trained"
    assert outcomes["plain"] == "trained"
    assert all(outcomes[k] == "trained" for k in ("grad_accum", "grad_checkpoint", "compile"))


def test_the_refusals_are_the_expected_ones():
    """Spot checks of what the matrix refuses, and why."""
    cases = {
        ("aot", "use_weighting"): "cannot be used with 'aot'",
        ("kto", "use_weighting"): "policy_weights is only used by DPO-family",
        ("kto", "ld_alpha"): "ld_alpha (LD-DPO) applies to DPO-family losses",
        ("sigmoid", "reference_none"): "needs a reference",
        ("nca_pair", "f_divergence"): "does not apply to loss 'nca_pair'",
    }
    for (loss, option), expected in cases.items():
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            config_from_dict({"loss": loss, **OPTIONS[option]})
    for loss, option in itertools.product(["simpo", "cpo", "orpo"], ["reference_none"]):
        config_from_dict({"loss": loss, **OPTIONS[option]})  # reference-free: accepted
