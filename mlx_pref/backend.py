"""The platform shim: the one module that knows whether it runs on Metal, CUDA or a CPU.

It loads a fast BLAS on Linux CPU (before ``mlx.core`` is first imported), reports
devices and memory with backend-neutral calls, sets Metal's wired limit where it
applies, and initialises ``mx.distributed``. Nothing else in mlx-pref asks which
platform it is on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import platform
import resource
import site
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BLAS_ENV = "MLX_PREF_BLAS"
"""``auto`` (default): load OpenBLAS on Linux; ``off``: keep MLX's bundled BLAS; a path: load that."""

BLAS_THREADS_ENV = "MLX_PREF_BLAS_THREADS"
"""OpenBLAS threads; unset: one when the machine is busy, else one per core."""

_blas_path: str | None = None
_blas_note = "not attempted"


def _openblas_candidates() -> list[str]:
    """OpenBLAS libraries exporting plain ``cblas_*`` symbols, best first.

    PyPI's ``cmeel-openblas`` (installed by the ``cpu`` extra) is newer and faster on
    recent x86 cores than Debian's ``libopenblas0``; both work.
    """
    roots = [*site.getsitepackages(), site.getusersitepackages(), sys.prefix]
    found = []
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "cmeel.prefix", "lib", "libopenblas.so*")))
    system = ctypes.util.find_library("openblas")
    if system:
        found.append(system)
    arch = platform.machine()
    found += [
        f"/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
        f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
    ]
    return list(dict.fromkeys(p for p in found if os.path.exists(p) or "/" not in p))


def load_fast_blas() -> str | None:
    """Load OpenBLAS into the global symbol scope so MLX's CPU matmuls resolve to it.

    MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s on a 1024^2 sgemm);
    OpenBLAS loaded with ``RTLD_GLOBAL`` before ``mlx.core`` wins symbol resolution
    (~300 GFLOP/s). Results are the same to float32 rounding. Returns the path loaded.
    """
    global _blas_path, _blas_note
    if _blas_path is not None:
        return _blas_path
    setting = os.environ.get(BLAS_ENV, "auto").strip()
    if not sys.platform.startswith("linux"):
        _blas_note = "not needed: MLX uses Accelerate on macOS"
        return None
    if setting.lower() in ("off", "0", "false", "none"):
        _blas_note = f"disabled by {BLAS_ENV}={setting}"
        return None
    if "mlx.core" in sys.modules and _global_cblas() is None:
        _blas_note = "mlx.core was imported before mlx_pref, so the fast BLAS could not be loaded"
        return None
    candidates = _openblas_candidates() if setting.lower() in ("", "auto") else [setting]
    # Idle OpenBLAS workers spin for ~2^28 cycles by default before sleeping; MLX's CPU
    # attention issues many small matmuls, and when another process holds a core that spin
    # makes each one wait for a time slice (measured: 2.4 s instead of 0.02 s for one
    # attention call). Sleeping at once costs nothing measurable on big matmuls.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    threads, why = blas_threads()
    if threads is not None:
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    errors = []
    for path in candidates:
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            errors.append(str(exc))
            continue
        _blas_path = path
        _blas_note = f"loaded{why}"
        return path
    if not candidates:
        _blas_note = (
            "no OpenBLAS found: pip install 'mlx-pref[cpu]' (cmeel-openblas) "
            "or apt-get install libopenblas0-pthread"
        )
    else:
        _blas_note = "could not load OpenBLAS: " + "; ".join(errors)
        if any("libgfortran" in e for e in errors):
            _blas_note += " (install the system package libgfortran5)"
    return None


def blas_threads() -> tuple[int | None, str]:
    """OpenBLAS threads for this process (None: its default, one per core) and why.

    ``MLX_PREF_BLAS_THREADS`` (or OpenBLAS's own ``OPENBLAS_NUM_THREADS``) decides when
    set. Otherwise one thread when the machine is already busy (1-minute load average at
    least its cores): a second thread then waits for a time slice at every matmul, and
    training ran 5x slower in CPU time (the SmolLM2 GGUF, 3 DPO steps on hh-rlhf, 2 cores
    at load 8: 4 min 26 s with two threads, 45 s with one at load 16).
    """
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return None, ""
    forced = os.environ.get(BLAS_THREADS_ENV, "").strip()
    if forced.isdigit() and int(forced) > 0:
        return int(forced), f", {forced} thread(s) ({BLAS_THREADS_ENV})"
    try:
        cores = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None, ""
    if cores > 1 and load >= cores:
        return 1, f", 1 thread: the machine is busy (load {load:.1f} on {cores} cores)"
    return None, ""


def _global_cblas() -> str | None:
    """The library that provides ``cblas_sgemm`` in the global symbol scope, if any."""
    try:
        process = ctypes.CDLL(None)
        addr = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    info = DlInfo()
    if not process.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)):
        return None
    return info.dli_fname.decode() if info.dli_fname else None


@dataclass
class BlasInfo:
    name: str
    path: str | None
    fast: bool
    note: str


def blas_info() -> BlasInfo:
    """Which BLAS MLX's CPU matmuls use in this process."""
    if sys.platform == "darwin":
        return BlasInfo("Accelerate", None, True, _blas_note)
    lib = _global_cblas()
    if lib and "openblas" in lib.lower():
        return BlasInfo("OpenBLAS", lib, True, _blas_note)
    return BlasInfo("reference BLAS bundled with MLX", lib, False, _blas_note)


@functools.cache
def backend_name() -> str:
    """``metal``, ``cuda`` or ``cpu``: where MLX runs its default stream."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "gpu"


def attention_kernel(backend: str, dtype: str, head_dim: int) -> str:
    """How training computes attention on ``backend``: ``fused`` where MLX has a fused
    attention with a fused backward, ``blocks`` (mlx-pref's block attention, memory
    linear in length) elsewhere.

    MLX 0.29-0.32 (``mlx/backend/*/scaled_dot_product_attention.cpp``): the CPU always
    composes attention from matmuls and a softmax; Metal falls back to that composed form
    whenever gradients are taken (``if (is_training) return true``); CUDA runs cuDNN's fused
    forward and backward for float16/bfloat16 with head dimensions that are multiples of 8
    up to 128, at query lengths that are multiples of 128 (attention pads to that).
    """
    fused = backend == "cuda" and dtype in ("float16", "bfloat16")
    return "fused" if fused and head_dim % 8 == 0 and head_dim <= 128 else "blocks"


def device_info() -> dict:
    """``mx.device_info()`` for the default device (its keys differ per backend; the call
    exists from MLX 0.30.4, the minimum mlx-pref requires, and is guarded for older ones)."""
    import mlx.core as mx

    fn = getattr(mx, "device_info", None)
    if fn is None:
        return {}
    try:
        return dict(fn())
    except RuntimeError:
        return {}


def total_memory() -> int | None:
    """Bytes the default device can use: Metal's recommended working set, the GPU's
    memory on CUDA, physical RAM on the CPU."""
    info = device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if info.get(key):
            return int(info[key])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_stats() -> dict[str, int]:
    """MLX's own allocator figures (backend-neutral) and the process peak RSS."""
    import mlx.core as mx

    return {
        "active": int(mx.get_active_memory()),
        "peak": int(mx.get_peak_memory()),
        "cache": int(mx.get_cache_memory()),
        "peak_rss": peak_rss(),
    }


def reset_peak_memory() -> None:
    import mlx.core as mx

    mx.reset_peak_memory()


def set_wired_limit() -> int | None:
    """On Metal, wire the recommended working set so weights are not paged out
    between steps. A no-op elsewhere (the call only acts on Apple silicon)."""
    import mlx.core as mx

    if backend_name() != "metal":
        return None
    limit = device_info().get("max_recommended_working_set_size")
    if limit:
        mx.set_wired_limit(int(limit))
    return limit


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Measured float32 n x n matmul rate on the default device (median of repeats)."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e9


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "mlx-pref", "mlx", "mlx-metal", "mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-lm",
        "numpy", "huggingface-hub", "safetensors", "cmeel-openblas", "nanobind",
    ):  # fmt: skip
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def check_mlx_backend() -> str | None:
    """An actionable message when MLX has no usable backend (bare ``mlx`` on Linux)."""
    try:
        import mlx.core as mx

        mx.eval(mx.array([1.0]) + 1)
    except (ImportError, OSError, RuntimeError) as exc:
        return (
            f"MLX cannot run here ({exc}). On Linux install a backend: "
            "pip install 'mlx-pref[cpu]' (CPU) or 'mlx-pref[cuda]' (NVIDIA GPU)."
        )
    return None


def cache_dir() -> Path:
    """Where mlx-pref keeps reusable artifacts (reference log-prob caches)."""
    root = os.environ.get("MLX_PREF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlx-pref"
    )
    return Path(root)


_group = None


def distributed_group():
    """``mx.distributed``'s global group: the processes ``mlx.launch`` started (ring between
    Macs or local processes, MPI, NCCL on CUDA hosts), or a group of one otherwise."""
    global _group
    if _group is None:
        import mlx.core as mx

        _group = mx.distributed.init()
    return _group


def all_sum(x, group=None):
    """Sum ``x`` over the processes of ``group`` (identity for a single process)."""
    import mlx.core as mx

    group = group or distributed_group()
    return x if group.size() == 1 else mx.distributed.all_sum(x, group=group)
