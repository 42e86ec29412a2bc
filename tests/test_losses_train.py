"""Every loss trains on the embedded default: `mlx-pref train --loss NAME --max-steps 20`."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from mlx_pref.config import load_config
from mlx_pref.losses import loss_names
from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer

# Paired DPO-family losses: after 20 steps the held-out reward accuracy must beat chance.
PREFERENCE = {
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "sigmoid_norm", "apo_zero", "apo_down", "discopop",
}  # fmt: skip
# Options some losses need. exo_pair is undefined at label_smoothing 0. DiscoPOP's loss at
# its paper default tau = 0.05 has a local minimum at slightly negative margins next to 0
# (dL/d(beta*margin) at 0 is 0.077/tau - 0.75 > 0 for tau < 0.1), so a policy that starts
# equal to its reference first moves the wrong way; tau = 0.2 removes that barrier.
OPTIONS = {
    "exo_pair": {"label_smoothing": 1e-3},
    "robust": {"label_smoothing": 0.1},
    "discopop": {"discopop_tau": 0.2},
}
# 64 held-out pairs keep the evaluation quick; the full eval split has 256.
EVAL = {"eval_batches": 16, "eval_every": 20, "save_every": 20}


WEIGHTED = {"sigmoid": 0.7, "bco": 0.3}


@pytest.mark.parametrize("loss", [*loss_names(), pytest.param(WEIGHTED, id="weighted")])
def test_loss_trains_on_the_embedded_default(loss, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path.parent / "shared-cache"))
    overrides = {"loss": loss, "max_steps": 20, "output": str(tmp_path / "run"), **EVAL}
    if isinstance(loss, str):
        overrides.update(OPTIONS.get(loss, {}))
    final = Trainer(load_config(None, overrides), verbose=False).train()
    train = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in train] == [10, 20]
    assert all(math.isfinite(r["loss"]) for r in train) and math.isfinite(final["eval/loss"])
    if loss is WEIGHTED or loss in PREFERENCE:
        assert final["eval/rewards/accuracies"] > 0.5, final


def test_the_cli_spelling_works(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path.parent / "shared-cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_pref.cli", "train", "--loss", "ipo", "--max-steps", "2",
         "--output", str(tmp_path / "run"), "--eval-every", "2", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(tmp_path / "run")
    assert records[-1]["step"] == 2 and math.isfinite(records[-1]["eval/loss"])
