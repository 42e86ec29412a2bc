"""Data-parallel training: 2 processes with batch B train exactly like 1 process with 2B."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_trainer import TIMING_KEYS, assert_same_adapters

from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer

LAUNCH = Path(sys.executable).parent / "mlx.launch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")
@pytest.mark.parametrize("loss", ["dpo", "bco"])
def test_two_ring_processes_equal_one_process_with_twice_the_batch(make_config, tmp_path, loss):
    # lr 1e-3: Adam turns float rounding in near-zero gradients into ~lr-sized noise.
    steps = dict(max_steps=4, eval_every=2, save_every=2, loss=loss, learning_rate=1e-3)
    two = make_config(batch_size=2, output=str(tmp_path / "two"), **steps)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two.to_dict()))
    proc = subprocess.run(
        [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()),
         "--", sys.executable, "-m", "mlx_pref.cli", "train", str(path), "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = make_config(batch_size=4, output=str(tmp_path / "one"), **steps)
    Trainer(one, verbose=False).train()
    assert_same_adapters(Path(one.output), Path(two.output), atol=1e-5)
    # Only the first process wrote: one metrics log, with all-reduced values.
    got, want = read_metrics(two.output), read_metrics(one.output)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    # Accuracies count chosen > rejected: at step 1 rewards are ~0 and float rounding decides.
    for a, b in zip(got, want):
        for key in {k for k in b if "accuracies" not in k} - TIMING_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
