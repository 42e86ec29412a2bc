"""The command line: one-line errors, every command's output, train --push-to-hub."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlx_pref.cli import cli


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_pref.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_unknown_flag_is_a_short_actionable_error():
    result = run("train", "--max-step", "3")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: No such option '--max-step'")
    assert "'--max-steps'" in result.stderr and "train --help" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_malformed_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: dpo\nbeta: [0.1\n")
    result = run("train", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {bad}:3:1: invalid YAML")
    assert len(result.stderr.strip().splitlines()) == 1
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("los: dpo\n")
    result = run("train", str(unknown))
    assert result.stderr.strip() == f"error: {unknown}: unknown key 'los'; did you mean 'loss'?"


def test_missing_model_is_one_line(tmp_path):
    result = run("train", "--model", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: model not found: {tmp_path / 'nowhere'} (not a local path, and not a Hub id like org/name)"
    )


def test_hub_id_offline_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["train", "--model", "some-org/not-cached-model"])
    assert result.exit_code != 0
    assert (
        "cannot download 'some-org/not-cached-model' from the Hugging Face Hub: no network"
        in str(result.exception)
    )


def test_losses_lists_every_loss_with_formula_and_paper():
    from mlx_pref.losses import loss_names

    result = CliRunner().invoke(cli, ["losses"])
    assert result.exit_code == 0
    for name in loss_names():
        assert any(line.startswith(name + " ") for line in result.output.splitlines()), name
    assert "-log σ(β" in result.output and "Direct Preference Optimization" in result.output


def test_init_writes_a_template_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "c.yaml"
    result = CliRunner().invoke(cli, ["init", "--template", "kto", "-o", str(target)])
    assert result.exit_code == 0 and yaml.safe_load(target.read_text())["loss"] == "kto"
    again = CliRunner().invoke(cli, ["init", "--template", "kto", "-o", str(target)])
    assert again.exit_code != 0 and "exists; pass --force" in str(again.exception)


def test_flags_override_the_config_file_in_the_saved_run(make_config, tmp_path):
    cfg = make_config(beta=0.2, max_steps=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = CliRunner().invoke(
        cli, ["train", str(path), "--beta", "0.3", "--lora-rank", "2", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((Path(cfg.output) / "config.yaml").read_text())
    assert (
        saved["beta"] == 0.3 and saved["lora"]["r"] == 2 and saved["batch_size"] == cfg.batch_size
    )


def test_train_push_to_hub_exports_and_uploads(make_config, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_test")
    cfg = make_config(max_steps=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = CliRunner().invoke(
        cli, ["train", str(path), "--push-to-hub", "me/my-adapter", "--private", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert calls[0][:2] == ("create_repo", "me/my-adapter") and calls[0][2]["private"] is True
    uploaded = Path(calls[1][1]["folder_path"])
    assert calls[1][1]["repo_id"] == "me/my-adapter"
    assert {"adapters.safetensors", "adapter_config.json", "README.md"} <= {
        p.name for p in uploaded.iterdir()
    }


def test_plot_draws_a_png(make_config):
    pytest.importorskip("matplotlib")
    cfg = make_config(max_steps=2)
    from mlx_pref.train import Trainer

    Trainer(cfg, verbose=False).train()
    result = CliRunner().invoke(cli, ["plot", cfg.output])
    assert result.exit_code == 0, result.output
    png = Path(cfg.output) / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_loss_sweep_shares_one_reference_and_prints_a_table(make_config, tmp_path):
    cfg = make_config(max_steps=2, eval_every=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = CliRunner().invoke(cli, ["train", str(path), "--loss", "dpo,ipo,simpo", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:3] == ["loss", "loss", "rewards/accuracies"]
    assert [line.split()[0] for line in lines[2:]] == ["dpo", "ipo", "simpo"]
    for name in ("dpo", "ipo", "simpo"):
        assert (Path(cfg.output) / name / "adapters.safetensors").exists()
    cache = Path(cfg.output).parent / "cache" / "ref-logps"
    assert len(list(cache.glob("*.safetensors"))) == 2  # train and eval, scored once for all
    again = CliRunner().invoke(cli, ["train", str(path), "--loss", "dpo,ipo,simpo", "--quiet"])
    assert again.exit_code == 0 and again.output == result.output  # finished runs are reused


def test_set_any_key_and_the_common_flags(make_config, tmp_path):
    cfg = make_config(max_steps=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = CliRunner().invoke(
        cli,
        ["train", str(path), "--set", "lora.alpha=32", "--set", "beta=0.25", "--set",
         "lora.target_modules=[q_proj, v_proj]", "--beta", "0.3", "--warmup-steps", "1",
         "--lr-schedule", "cosine", "--dtype", "float32", "--format", "conversational",
         "--grad-checkpoint", "--lora-alpha", "24", "--set", "lora.dropout=0.1", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((Path(cfg.output) / "config.yaml").read_text())
    assert saved["lora"] == {"r": 4, "alpha": 24.0, "dropout": 0.1, "layers": None, "dora": False,
                             "target_modules": ["q_proj", "v_proj"]}  # fmt: skip
    assert saved["beta"] == 0.3  # a named flag wins over --set
    assert (saved["warmup_steps"], saved["lr_schedule"], saved["dtype"]) == (1, "cosine", "float32")
    assert saved["format"] == "conversational" and saved["grad_checkpoint"] is True
    alpha = CliRunner().invoke(cli, ["train", str(path), "--set", "lora.alpha=32", "--overwrite",
                                     "--quiet"])  # fmt: skip
    assert alpha.exit_code == 0, alpha.output
    assert yaml.safe_load((Path(cfg.output) / "config.yaml").read_text())["lora"]["alpha"] == 32


def test_every_unknown_key_is_reported_at_once(tmp_path):
    result = run("train", "--set", "los=dpo", "--set", "betta=0.2", "--set", "lora.rnk=4")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown keys: 'los' (did you mean 'loss'?), 'betta' (did you mean 'beta'?), "
        "lora 'rnk' (did you mean 'r'?)"
    )
    bad = run("train", "--set", "lora.alpha")
    assert (
        bad.stderr.strip() == "error: --set 'lora.alpha': write KEY=VALUE, e.g. --set lora.alpha=32"
    )
