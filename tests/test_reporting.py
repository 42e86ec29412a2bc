"""What a run reports: TensorBoard and W&B hold metrics.jsonl's values under its names; the
run header; nothing is imported unless asked for."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_pref.config import config_from_dict
from mlx_pref.errors import ConfigError
from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer


def records(path: Path) -> list[bytes]:
    """The payloads of a TFRecord file (length, its CRC, data, the data's CRC)."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
    return out


def tensorboard_scalars(folder: Path) -> tuple[dict[tuple[int, str], float], list[str]]:
    """(step, tag) -> value of every scalar in the event files, and the text summaries."""
    from tensorboardX.proto import event_pb2

    scalars, texts = {}, []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for payload in records(path):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("tensor") and value.tensor.string_val:
                    texts.append(value.tensor.string_val[0].decode())
                elif value.HasField("simple_value") or not value.HasField("tensor"):
                    scalars[(event.step, value.tag)] = value.simple_value
    return scalars, texts


def test_tensorboard_holds_every_metric_of_metrics_jsonl(make_config):
    pytest.importorskip("tensorboardX")
    cfg = make_config(max_steps=4, eval_every=2, report_to="tensorboard")
    Trainer(cfg, verbose=False).train()
    scalars, texts = tensorboard_scalars(Path(cfg.output) / "tensorboard")
    expected = {
        (r["step"], k): v for r in read_metrics(cfg.output) for k, v in r.items() if k != "step"
    }
    assert set(scalars) == set(expected)  # the same names at the same steps, nothing else
    for key, value in expected.items():
        assert scalars[key] == np.float32(value), key  # TensorBoard keeps float32
    assert (0, "eval/rewards/accuracies") in scalars and (4, "rewards/margins") in scalars
    assert any("learning_rate: 0.01" in text for text in texts)  # the config, once
    marker = json.loads((Path(cfg.output) / ".mlx-pref.json").read_text())
    assert "tensorboard" in marker["files"]


def wandb_history(run_dir: Path) -> tuple[list[dict], dict]:
    """History rows and config of the offline W&B run under ``run_dir`` (the LevelDB-style
    log W&B writes: 7-byte header, 32 KiB blocks of checksum, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, block, chunk, rows, config = path.read_bytes(), 7, 32768, b"", [], {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record.FromString(chunk)
            chunk = b""
            if record.HasField("history"):
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in record.history.item})  # fmt: skip
            if record.HasField("run"):
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return rows, config


def test_wandb_offline_logs_every_metric_and_the_config(make_config, monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(max_steps=2, eval_every=2, report_to=["wandb"])
    Trainer(cfg, verbose=False).train()
    rows, config = wandb_history(Path(cfg.output))
    logged = {}
    for row in rows:
        logged.setdefault(row["_step"], {}).update(
            {k: v for k, v in row.items() if not k.startswith("_")}
        )
    expected = {}
    for r in read_metrics(cfg.output):
        expected.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step"})
    assert logged.keys() == expected.keys() == {0, 1, 2}
    for step, values in expected.items():
        assert logged[step] == pytest.approx(values, rel=1e-12), step
    assert config["learning_rate"] == 0.01 and config["loss"] == "sigmoid"


def test_report_to_absent_needs_neither_tool(make_config, tmp_path):
    """With both tools unimportable, a run without report_to trains as usual (mlx-lm's own
    tuner may look for wandb when it is installed; mlx-pref never imports either)."""
    cfg = make_config(max_steps=1)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    code = (
        "import json, sys\n"
        "sys.modules.update(wandb=None, tensorboardX=None)  # any import of them fails\n"
        "from mlx_pref.train import train\n"
        f"print(train(None, **json.load(open({str(path)!r})))['eval/loss'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert np.isfinite(float(out.stdout.strip().splitlines()[-1]))


def test_a_missing_tool_is_a_one_line_error(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    trainer = Trainer(make_config(max_steps=1, report_to="tensorboard"), verbose=False)
    with pytest.raises(ConfigError, match=r"pip install 'mlx-pref\[tensorboard\]'"):
        trainer.train()


def test_report_to_values_are_checked():
    assert config_from_dict({"report_to": "none"}).report_to == []
    assert config_from_dict({"report_to": "tensorboard,wandb"}).report_to == [
        "tensorboard",
        "wandb",
    ]
    with pytest.raises(ConfigError, match="report_to: 'mlflow' is not one of: tensorboard, wandb"):
        config_from_dict({"report_to": "mlflow"})


def test_the_run_header_says_what_trains_and_what_a_step_costs(make_config):
    trainer = Trainer(make_config(max_steps=6, eval_every=3), verbose=False)
    lines = []
    trainer.verbose = True
    trainer.progress.enabled = False
    trainer.log = lambda text: lines.append(text) if text else None
    trainer.train()
    trainable = sum(v.size for k, v in trainer.trainable.weights().items())
    header = [line for line in lines if line.startswith("trainable parameters:")]
    assert header and f"({trainable / 1e6:.3f}M/" in header[0] and "LoRA rank 4" in header[0]
    tokens = [line for line in lines if line.startswith("tokens per step:")]
    assert tokens and "batch 4 x accumulation 1" in tokens[0]
    timed = [line for line in lines if line.startswith("timed:")]
    assert len(timed) == 1 and "2 steps and 1 evaluations" in timed[0]
    assert lines.index(header[0]) < lines.index(timed[0])


def test_a_resumed_run_adds_an_event_file_that_purges_past_its_checkpoint(make_config):
    pytest.importorskip("tensorboardX")
    import shutil

    from tensorboardX.proto import event_pb2

    cfg = make_config(max_steps=4, eval_every=2, report_to="tensorboard")
    Trainer(cfg, verbose=False).train()
    shutil.rmtree(Path(cfg.output) / "checkpoints" / "step-00000004")  # as if killed at step 4
    Trainer.resume(cfg.output, verbose=False).train()  # from step 2
    folder = Path(cfg.output) / "tensorboard"
    first, second = sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.name[-6:])
    assert first.name.endswith(".step0") and second.name.endswith(".step2")
    starts = [
        event.step
        for event in map(event_pb2.Event.FromString, records(second))
        if event.HasField("session_log") and event.session_log.status == 1  # START
    ]
    assert starts == [3]  # TensorBoard drops the first file's events from step 3 on
    scalars, _ = tensorboard_scalars(folder)
    expected = {(r["step"], k): v for r in read_metrics(cfg.output) for k, v in r.items()
                if k != "step"}  # fmt: skip
    assert set(scalars) == set(expected)
