"""``mlx-pref doctor`` on each backend: a Metal or CUDA device reports the GPU (name, memory,
compute capability, bf16/fp32 matmul rates), never a CPU BLAS. GPUs are faked here by
what MLX would report for them, so these run on any machine."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlx_pref import backend, doctor, native
from mlx_pref.cli import cli

METAL_INFO = {  # mx.device_info() keys on Metal (mlx/backend/metal/device_info.cpp)
    "device_name": "Apple M3 Max",
    "architecture": "applegpu_g15s",
    "max_buffer_length": 36_507_222_016,
    "max_recommended_working_set_size": 51_539_607_552,
    "memory_size": 68_719_476_736,
    "resource_limit": 499_000,
}
CUDA_INFO = {  # mx.device_info() keys on CUDA (mlx/backend/cuda/device_info.cpp)
    "device_name": "NVIDIA H200",
    "uuid": "GPU-0a1b2c3d-0000-1111-2222-333344445555",
    "architecture": "sm_90",
    "pci_bus_id": "0000:19:00.0",
    "compute_capability_major": 9,
    "compute_capability_minor": 0,
    "free_memory": 149_000_000_000,
    "total_memory": 150_754_820_096,
}
RATES = {"bfloat16": 27.34, "float32": 13.86}


def fake_gpu(monkeypatch, name: str, info: dict) -> None:
    monkeypatch.setattr(backend, "backend_name", lambda: name)
    monkeypatch.setattr(backend, "device_info", lambda: dict(info))
    monkeypatch.setattr(doctor, "matmul_tflops", lambda dtype="float32", **kw: RATES[dtype])

    def no_blas():
        raise AssertionError("a GPU report must not ask for the CPU BLAS")

    monkeypatch.setattr(backend, "blas_info", no_blas)
    monkeypatch.setattr(backend, "matmul_gflops", no_blas)


def run_doctor(*args: str) -> str:
    result = CliRunner().invoke(cli, ["doctor", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_doctor_on_metal_reports_the_gpu_its_memory_and_working_set(monkeypatch):
    fake_gpu(monkeypatch, "metal", METAL_INFO)
    report = json.loads(run_doctor("--json"))
    assert list(report) == [
        "platform", "python", "backend", "gpu", "gpu_architecture", "gpu_memory_gb",
        "gpu_working_set_gb", "matmul_bf16_tflops", "matmul_fp32_tflops", "peak_rss_gb",
        "versions",
    ]  # fmt: skip
    assert report["backend"] == "metal"
    assert report["gpu"] == "Apple M3 Max"
    assert report["gpu_architecture"] == "applegpu_g15s"
    assert report["gpu_memory_gb"] == 68.7  # all of the unified memory
    assert report["gpu_working_set_gb"] == 51.5  # what the GPU should hold: the wired limit
    assert report["matmul_bf16_tflops"] == 27.3
    assert report["matmul_fp32_tflops"] == 13.9
    lines = run_doctor().splitlines()
    assert lines[2:9] == [
        "backend             metal",
        "gpu                 Apple M3 Max",
        "gpu_architecture    applegpu_g15s",
        "gpu_memory_gb       68.7",
        "gpu_working_set_gb  51.5",
        "matmul_bf16_tflops  27.3",
        "matmul_fp32_tflops  13.9",
    ]
    assert not [line for line in lines if line.startswith(("blas", "device", "memory_total"))]


def test_doctor_on_cuda_reports_the_gpu_memory_and_compute_capability(monkeypatch):
    fake_gpu(monkeypatch, "cuda", CUDA_INFO)
    report = json.loads(run_doctor("--json"))
    gpu_keys = {k: v for k, v in report.items() if k.startswith(("backend", "gpu", "matmul"))}
    assert gpu_keys == {
        "backend": "cuda",
        "gpu": "NVIDIA H200",
        "gpu_architecture": "sm_90",
        "gpu_compute_capability": "9.0",
        "gpu_memory_gb": 150.8,
        "matmul_bf16_tflops": 27.3,
        "matmul_fp32_tflops": 13.9,
    }
    assert "blas" not in report and "uuid" not in json.dumps(report)
    lines = run_doctor().splitlines()
    assert lines[2:9] == [
        "backend                 cuda",
        "gpu                     NVIDIA H200",
        "gpu_architecture        sm_90",
        "gpu_compute_capability  9.0",
        "gpu_memory_gb           150.8",
        "matmul_bf16_tflops      27.3",
        "matmul_fp32_tflops      13.9",
    ]


def test_gpu_report_keeps_only_the_keys_a_backend_gives():
    assert doctor.gpu_report({}) == {"gpu": "unknown"}
    assert doctor.gpu_report({"device_name": "NVIDIA T4", "compute_capability_major": 7,
                              "compute_capability_minor": 5}) == {
        "gpu": "NVIDIA T4", "gpu_compute_capability": "7.5",
    }  # fmt: skip


def test_doctor_on_the_cpu_keeps_the_blas_lines(monkeypatch):
    monkeypatch.setattr(backend, "backend_name", lambda: "cpu")
    monkeypatch.setattr(backend, "matmul_gflops", lambda: 123.45)
    monkeypatch.setattr(
        backend, "blas_info", lambda: backend.BlasInfo("reference BLAS bundled with MLX", None,
                                                       False, "disabled by MLX_PREF_BLAS=off")
    )  # fmt: skip
    monkeypatch.setattr(native, "load", lambda: None)
    monkeypatch.setattr(native, "reason", lambda: "no C++ compiler (g++) found")
    report = doctor.doctor_report()
    assert list(report)[2:11] == [
        "backend", "device", "blas", "blas_path", "blas_fast", "blas_note", "matmul_gflops",
        "native", "memory_total_gb",
    ]  # fmt: skip
    assert report["matmul_gflops"] == 123.5
    assert report["native"] == "unavailable: no C++ compiler (g++) found"
    lines = doctor.doctor_lines(report)
    assert lines[6] == "blas_fast        False"
    assert lines[-2:] == [
        "hint: matmuls use a slow BLAS (disabled by MLX_PREF_BLAS=off).",
        "hint: without the native kernels attention runs in MLX, 2-4x slower.",
    ]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_matmul_rate_is_measured_on_the_default_device(dtype):
    rate = doctor.matmul_tflops(dtype, n=64, per_eval=2, repeats=3)
    assert isinstance(rate, float) and rate > 0
