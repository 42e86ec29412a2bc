"""The platform shim: the fast BLAS on Linux CPU, numerically the same as MLX's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_pref import backend
from mlx_pref.cli import cli

LINUX_CPU = sys.platform.startswith("linux") and mx.default_device() == mx.cpu

MATMUL = """
import os, sys, numpy as np
import mlx_pref, mlx.core as mx
from mlx_pref import backend
rng = np.random.default_rng(0)
a = rng.standard_normal((257, 300)).astype(np.float32)
b = rng.standard_normal((300, 129)).astype(np.float32)
np.save(sys.argv[1], np.asarray(mx.array(a) @ mx.array(b)))
print(backend.blas_info().name)
"""


@pytest.mark.skipif(not LINUX_CPU, reason="the BLAS switch only exists for MLX's Linux CPU build")
def test_fast_blas_is_loaded_and_agrees_with_the_reference_blas(tmp_path):
    info = backend.blas_info()
    assert info.fast and info.name == "OpenBLAS", info.note
    results, names = {}, {}
    for setting in ("auto", "off"):
        out = tmp_path / f"{setting}.npy"
        proc = subprocess.run(
            [sys.executable, "-c", MATMUL, str(out)],
            capture_output=True, text=True, env={**os.environ, backend.BLAS_ENV: setting},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        names[setting], results[setting] = proc.stdout.strip(), np.load(out)
    assert names == {"auto": "OpenBLAS", "off": "reference BLAS bundled with MLX"}
    exact = np.load(tmp_path / "auto.npy")  # float32; compare with float64 numpy too
    rng = np.random.default_rng(0)
    a = rng.standard_normal((257, 300))
    b = rng.standard_normal((300, 129))
    np.testing.assert_allclose(results["auto"], results["off"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(exact, a @ b, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not LINUX_CPU, reason="Linux CPU only")
def test_doctor_reports_the_fast_blas_and_a_measured_rate():
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["backend"] == "cpu" and report["blas"] == "OpenBLAS" and report["blas_fast"]
    assert "openblas" in report["blas_path"].lower()
    assert report["matmul_gflops"] > 0
    assert report["versions"]["mlx"] == mx.__version__


def test_memory_figures_are_backend_neutral():
    stats = backend.memory_stats()
    assert set(stats) == {"active", "peak", "cache", "peak_rss"}
    assert stats["peak_rss"] > 10_000_000
    assert backend.total_memory() > 1_000_000_000
    if backend.backend_name() != "metal":
        assert backend.set_wired_limit() is None  # only acts on Apple silicon


def test_blas_can_be_switched_off(tmp_path):
    code = "import mlx_pref; from mlx_pref import backend; print(backend.blas_info().note)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, backend.BLAS_ENV: "off"},
    )  # fmt: skip
    expected = "disabled by MLX_PREF_BLAS=off" if sys.platform.startswith("linux") else "not needed"
    assert expected in proc.stdout


def test_openblas_runs_one_thread_on_a_busy_machine(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv(backend.BLAS_THREADS_ENV, raising=False)
    monkeypatch.setattr(backend.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(backend.os, "getloadavg", lambda: (2.5, 1.0, 1.0))
    assert backend.blas_threads() == (1, ", 1 thread: the machine is busy (load 2.5 on 2 cores)")
    monkeypatch.setattr(backend.os, "getloadavg", lambda: (0.4, 1.0, 1.0))
    assert backend.blas_threads() == (None, "")  # idle: OpenBLAS's default, every core
    monkeypatch.setenv(backend.BLAS_THREADS_ENV, "2")
    assert backend.blas_threads()[0] == 2
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # OpenBLAS's own setting is left alone
    assert backend.blas_threads() == (None, "")
    if sys.platform.startswith("linux"):
        code = "import mlx_pref; from mlx_pref import backend; print(backend.blas_info().note)"
        env = {**os.environ, backend.BLAS_THREADS_ENV: "1"}
        env.pop("OPENBLAS_NUM_THREADS")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert "loaded, 1 thread(s) (MLX_PREF_BLAS_THREADS)" in proc.stdout


def test_cuda_specifics_without_a_gpu(monkeypatch):
    """What the CUDA backend changes, checked on any machine by faking what MLX reports."""
    monkeypatch.setattr(backend, "backend_name", lambda: "cuda")
    assert backend.set_wired_limit() is None  # wiring memory is an Apple-only call
    monkeypatch.setattr(
        backend, "device_info", lambda: {"device_name": "NVIDIA H100", "total_memory": 80 * 2**30}
    )
    assert backend.total_memory() == 80 * 2**30
    monkeypatch.setattr(
        backend, "device_info", lambda: {"max_recommended_working_set_size": 12 * 2**30}
    )
    assert backend.total_memory() == 12 * 2**30  # Metal: the recommended working set
