"""What ``mlx-pref doctor`` reports: the platform and MLX backend, then what the backend
computes on. On a GPU (Metal or CUDA) that is the GPU itself: its name, its memory (and
Metal's recommended working set, or CUDA's compute capability) from ``mx.device_info()``,
and bfloat16 and float32 matmul rates measured there. On the CPU it is the BLAS MLX's
matmuls use and their float32 rate, as before: a BLAS line says nothing about a GPU.
"""

from __future__ import annotations

import platform
import sys
import time

from mlx_pref import backend

GPU_BACKENDS = ("metal", "cuda", "gpu")


def matmul_tflops(
    dtype: str = "float32", n: int = 4096, per_eval: int = 4, repeats: int = 5
) -> float:
    """Measured ``n x n`` matmul rate of ``dtype`` on the default device, in TFLOP/s.

    Each timing evaluates ``per_eval`` independent matmuls at once, so a GPU's launch and
    synchronisation costs are small next to the work; the median of ``repeats`` timings
    (after one warm-up) is reported. float32 runs as MLX runs it: on CUDA and the newest
    Macs through TF32 units unless ``MLX_ENABLE_TF32=0``.
    """
    import mlx.core as mx

    kind = getattr(mx, dtype)
    a = mx.random.normal((n, n)).astype(kind)
    b = mx.random.normal((n, n)).astype(kind)
    mx.eval(a, b)
    mx.eval([a @ b for _ in range(per_eval)])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval([a @ b for _ in range(per_eval)])
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 * per_eval / times[len(times) // 2] / 1e12


def _gb(value: object) -> float | None:
    """Bytes as decimal gigabytes to one place (None when unknown)."""
    return round(int(value) / 1e9, 1) if value else None


def gpu_report(info: dict) -> dict:
    """The GPU's lines from ``mx.device_info()``'s keys, which differ per backend.

    Metal: ``memory_size`` (the unified memory, all of RAM) and
    ``max_recommended_working_set_size`` (what the GPU should hold at once, the wired
    limit mlx-pref sets). CUDA: ``total_memory``, ``compute_capability_major/minor`` and
    ``architecture`` (e.g. ``sm_90``). Keys a backend does not report are left out.
    """
    out: dict = {"gpu": info.get("device_name") or "unknown"}
    if info.get("architecture"):
        out["gpu_architecture"] = info["architecture"]
    if "compute_capability_major" in info:
        major, minor = info["compute_capability_major"], info.get("compute_capability_minor", 0)
        out["gpu_compute_capability"] = f"{major}.{minor}"
    memory = info.get("memory_size") or info.get("total_memory")
    if memory:
        out["gpu_memory_gb"] = _gb(memory)
    if info.get("max_recommended_working_set_size"):
        out["gpu_working_set_gb"] = _gb(info["max_recommended_working_set_size"])
    return out


def doctor_report() -> dict:
    """Everything ``doctor`` prints, as a dict (``--json`` prints it as is)."""
    name = backend.backend_name()
    report: dict = {
        "platform": f"{platform.system()} {platform.machine()} ({platform.platform()})",
        "python": sys.version.split()[0],
        "backend": name,
    }
    if name in GPU_BACKENDS:
        report.update(gpu_report(backend.device_info()))
        report["matmul_bf16_tflops"] = round(matmul_tflops("bfloat16"), 1)
        report["matmul_fp32_tflops"] = round(matmul_tflops("float32"), 1)
    else:
        blas = backend.blas_info()
        total = backend.total_memory()
        report.update({
            "device": backend.device_info(),
            "blas": blas.name,
            "blas_path": blas.path,
            "blas_fast": blas.fast,
            "blas_note": blas.note,
            "matmul_gflops": round(backend.matmul_gflops(), 1),
            "native": native_line(),
            "memory_total_gb": round(total / 1e9, 1) if total else None,
        })  # fmt: skip
    report["peak_rss_gb"] = round(backend.peak_rss() / 1e9, 2)
    report["versions"] = backend.package_versions()
    return report


def doctor_lines(report: dict) -> list[str]:
    """The report as aligned ``key  value`` lines, with a hint when matmuls use a slow BLAS."""
    width = max(len(k) for k in report)
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        lines.append(f"{key:<{width}}  {value}")
    if report.get("blas_fast") is False:
        lines.append(f"hint: matmuls use a slow BLAS ({report['blas_note']}).")
    if str(report.get("native", "built")).startswith("unavailable"):
        lines.append("hint: without the native kernels attention runs in MLX, 2-4x slower.")
    return lines


def native_line() -> str:
    """The native CPU kernels (``native.py``): built (they are built now if need be), or
    why not."""
    from mlx_pref import native

    module = native.load()
    return f"built ({module.__file__})" if module else f"unavailable: {native.reason()}"
