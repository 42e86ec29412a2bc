"""Never lose a user's file, and never a traceback.

A tree of user files meets every command that writes, failing runs included, and stays
byte-identical; every error a user can cause is one ``error:`` line naming the file or
flag, with exit status 2.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlx_pref.checkpoint import write_verified_folder
from mlx_pref.cli import cli
from mlx_pref.errors import WriteError
from mlx_pref.rundir import MARKER, read_marker

ROOT = Path(__file__).resolve().parent.parent


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def user_tree(root: Path, tiny_model: Path, prefs) -> dict[str, Path]:
    """A project folder (its config writes to '.'), a parent folder holding a nested
    config, and a folder of notes: all user files."""
    project = root / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hello')\n")
    (project / "data").mkdir()
    shutil.copy(prefs[0], project / "data" / "prefs.jsonl")
    config = {"model": str(tiny_model), "data": "data/prefs.jsonl", "output": ".", "max_steps": 1}
    (project / "config.yaml").write_text("# my settings\n" + yaml.safe_dump(config))
    parent = root / "parent"
    (parent / "projA").mkdir(parents=True)
    (parent / "notes.txt").write_text("notes\n")
    (parent / "thesis.tex").write_text("\\documentclass{article}\n")
    (parent / "projA" / "config.yaml").write_text("loss: dpo\n")
    (root / "empty.jsonl").write_text("")
    return {"project": project, "parent": parent}


def test_no_command_touches_a_user_file(tmp_path, tiny_model, prefs, monkeypatch):
    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path / "cache"))
    tree = user_tree(tmp_path / "user", tiny_model, prefs)
    project, parent = tree["project"], tree["parent"]
    before = snapshot(tmp_path / "user")
    runner = CliRunner()
    small = ["--model", str(tiny_model), "--data", str(prefs[0]), "--max-steps", "1", "--quiet"]

    def refused(*args: str) -> str:
        result = runner.invoke(cli, list(args))
        assert result.exit_code != 0 and result.exception is not None, (args, result.output)
        return f"{result.exception} {result.output}"

    monkeypatch.chdir(project)
    assert "not empty and is not an mlx-pref run" in refused("train", "config.yaml")
    assert "not empty and is not an mlx-pref run" in refused("train", "config.yaml", "--overwrite")
    for flags in ([], ["--overwrite"]):
        assert "is not an mlx-pref run" in refused("train", *small, "--output", str(parent), *flags)
    assert "one or the other" in refused("train", "--resume", str(parent), "--overwrite")
    assert "not an mlx-pref run directory" in refused("train", "--resume", str(parent / "projA"))
    assert "exists; pass --force" in refused("init", "--output", "config.yaml")
    assert "is a directory" in refused("init", "--output", "src")

    # A real run beside the user's files; failing runs never replace it.
    run = tmp_path / "runs" / "keep"
    assert runner.invoke(cli, ["train", *small, "--output", str(run)]).exit_code == 0
    kept = snapshot(run)
    empty = str(tmp_path / "user" / "empty.jsonl")
    assert "empty" in refused("train", *small, "--output", str(run), "--overwrite", "--data", empty)
    assert "already holds a run" in refused("train", *small, "--output", str(run))
    assert snapshot(run) == kept
    (run / "my-notes.txt").write_text("mine\n")  # a user file inside a run survives --overwrite
    assert runner.invoke(cli, ["train", *small, "--output", str(run), "--overwrite"]).exit_code == 0
    assert (run / "my-notes.txt").read_text() == "mine\n" and read_marker(run).kind == "run"

    # Exports and plots write only into their own outputs.
    assert "not empty" in refused("export", str(run), "--output", "data", "--overwrite")
    assert "not empty" in refused("export", str(run), "--output", ".")
    assert "exists" in refused("plot", str(run), "--output", "src/main.py")
    assert "no metrics.jsonl" in refused("plot", str(parent))
    assert runner.invoke(cli, ["export", str(run), "--output", str(tmp_path / "e")]).exit_code == 0
    again = ["export", str(run), "--output", str(tmp_path / "e"), "--overwrite"]
    assert runner.invoke(cli, again).exit_code == 0
    assert runner.invoke(cli, ["plot", str(run)]).exit_code == 0
    cache = runner.invoke(cli, ["cache-ref", "--model", str(tiny_model), "--data", str(prefs[0])])
    assert cache.exit_code == 0, cache.output
    assert snapshot(tmp_path / "user") == before


def write_run(path: Path, tiny_model: Path, prefs, steps: int = 2) -> Path:
    result = CliRunner().invoke(
        cli, ["train", "--model", str(tiny_model), "--data", str(prefs[0]), "--output",
              str(path), "--max-steps", str(steps), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return path


def damaged_models(root: Path, tiny_model: Path) -> dict[str, Path]:
    out = {}
    weights = (tiny_model / "model.safetensors").read_bytes()
    for name, data in {
        "truncated": weights[: len(weights) // 2],
        "empty": b"",
        "garbage": os.urandom(3000),
    }.items():
        shutil.copytree(tiny_model, root / name)
        (root / name / "model.safetensors").write_bytes(data)
        out[name] = root / name
    shutil.copytree(tiny_model, root / "no-tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / "no-tokenizer" / f).unlink()
    out["no-tokenizer"] = root / "no-tokenizer"
    return out


def limit_file_size() -> None:
    """A disk that fills up: files past 16 KB cannot grow (EFBIG instead of SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))


def read_only(folder: str) -> bool:
    """Whether nothing can be created in ``folder`` (root ignores permissions: try it)."""
    try:
        Path(folder, ".mlx-pref-probe").mkdir()
    except OSError:
        return os.path.isdir(folder)
    Path(folder, ".mlx-pref-probe").rmdir()
    return False


def test_every_user_error_is_one_line_with_exit_status_2(tmp_path, tiny_model, prefs):
    env = {**os.environ, "MLX_PREF_CACHE": str(tmp_path / "cache")}
    (tmp_path / "afile").write_text("x")
    models = damaged_models(tmp_path / "models", tiny_model)
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)
    layers = tmp_path / "layers.yaml"
    layers.write_text(yaml.safe_dump({"model": str(tiny_model), "lora": {"layers": 99}}))
    run = write_run(tmp_path / "run", tiny_model, prefs)
    base = ["--data", str(prefs[0]), "--max-steps", "1", "--quiet"]
    tiny = ["--model", str(tiny_model), *base]
    cases = {
        "output is a file": (["train", *tiny, "--output", str(tmp_path / "afile")], "afile"),
        "output under a file": (
            ["train", *tiny, "--output", str(tmp_path / "afile" / "x")],
            "afile",
        ),
        "negative seed": (["train", *tiny, "--seed", "-1"], "seed"),
        "init into no folder": (["init", "--output", str(tmp_path / "nodir" / "x.yaml")], "nodir"),
        "export into the cwd": (["export", str(run), "--output", "."], "--output"),
        "lora layers": (["train", str(layers), *base], "lora.layers"),
        "resume and overwrite": (["train", "--resume", str(run), "--overwrite"], "--resume"),
        "resume backwards": (["train", "--resume", str(run), "--max-steps", "1"], str(run)),
        "damaged gguf": (["train", "--model", str(gguf), *base], str(gguf)),
        **{
            f"model: {name}": (["train", "--model", str(path), *base], str(path))
            for name, path in models.items()
        },
    }
    if read_only("/sys"):
        cases["read-only output"] = (["train", *tiny, "--output", "/sys/mlx-pref-run"], "/sys")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "mlx_pref.cli", *args],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for name, (args, _) in cases.items()
    }
    disk_run = tmp_path / "full"
    procs["disk full"] = subprocess.Popen(
        [sys.executable, "-m", "mlx_pref.cli", "train", *tiny, "--output", str(disk_run),
         "--max-steps", "2", "--save-every", "1"],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=limit_file_size,
    )  # fmt: skip
    cases["disk full"] = ([], "cannot write")
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, proc.returncode, err)
        assert "Traceback" not in err, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
    assert not list((disk_run / "checkpoints").glob(".tmp-*"))  # nothing half-written is left
    assert json.loads((run / MARKER).read_text())["kind"] == "run"


def test_a_verified_folder_never_replaces_one_mlx_pref_did_not_write(tmp_path):
    """``best/`` and checkpoints are replaced whole; a folder of that name without the
    manifest mlx-pref writes last is the user's: refused, left byte-identical."""
    mine = tmp_path / "best"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(WriteError, match="mlx-pref did not write it"):
        write_verified_folder(mine, lambda d: (d / "a.txt").write_text("new"), replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    ours = tmp_path / "ours"
    write_verified_folder(ours, lambda d: (d / "a.txt").write_text("one"))
    write_verified_folder(ours, lambda d: (d / "a.txt").write_text("two"), replace=True)
    assert (ours / "a.txt").read_text() == "two"


def test_a_leftover_temporary_folder_is_never_removed(tmp_path):
    """A folder named like this process's temporary one (a crashed run's, or anyone's) is
    left as it is; the write goes to a new one beside it."""
    final = tmp_path / "best"
    leftover = tmp_path / f".tmp-best-{os.getpid()}-0"
    leftover.mkdir()
    (leftover / "notes.txt").write_text("keep me")
    write_verified_folder(final, lambda d: (d / "a.txt").write_text("one"))
    assert (final / "a.txt").read_text() == "one"
    assert [p.name for p in leftover.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best", leftover.name])
