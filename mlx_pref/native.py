"""mlx-pref's native CPU kernels: built on first use, cached, optional.

MLX's CPU backend runs element-wise work one element at a time on one thread (on x86 its
SIMD width is 1), and MLX offers no way to write a CPU kernel from Python; computing on
the host inside a traced function instead keeps the whole forward graph alive (measured:
5x the peak memory of a training step). So the packed block attention also exists as an
MLX primitive in C++ (``native/attention.cpp``), compiled here against the installed MLX
with nanobind (the binding library MLX itself uses, whose internals an extension must
share to pass arrays) and the system C++ compiler, once per MLX, nanobind, Python and
source version, into ``cache_dir()/native``. Where anything is missing (no compiler, no
Python headers, a nanobind MLX was not built with), ``load`` returns None with the reason
and attention runs in MLX as before; ``MLX_PREF_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from functools import cache
from pathlib import Path
from types import ModuleType

from mlx_pref.backend import blas_threads, cache_dir

SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
NATIVE_ENV = "MLX_PREF_NATIVE"
_reason = ""


def reason() -> str:
    """Why ``load`` returned None ("" when it did not, or was not called)."""
    return _reason


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build_command(compiler: str, nanobind_dir: Path, mlx_dir: Path, out: Path) -> list[str]:
    python_include = sysconfig.get_paths()["include"]
    return [
        compiler, "-O3", "-march=native", "-fopenmp-simd", "-std=c++20", "-shared", "-fPIC",
        "-fvisibility=hidden", "-DNDEBUG",
        "-DNB_DOMAIN=mlx",  # share MLX's nanobind type registry: pass mx.array both ways
        f"-I{python_include}", f"-I{mlx_dir / 'include'}", f"-I{nanobind_dir / 'include'}",
        f"-I{nanobind_dir / 'ext' / 'robin_map' / 'include'}",
        str(nanobind_dir / "src" / "nb_combined.cpp"), str(SOURCE),
        f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}", "-o", str(out),
    ]  # fmt: skip


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_native", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def load() -> ModuleType | None:
    """The compiled kernels (built now if not cached), or None (see ``reason``)."""
    global _reason
    if os.environ.get(NATIVE_ENV, "1").strip() in ("0", "false", "off"):
        _reason = f"{NATIVE_ENV}=0"
        return None
    if not sys.platform.startswith("linux"):
        _reason = "native kernels are built on Linux only (MLX's Metal and CUDA have their own)"
        return None
    try:
        import mlx
        import mlx.core as mx
        import nanobind
    except ImportError as e:
        _reason = f"nanobind is not installed ({e}); install mlx-pref's cpu extra"
        return None
    compiler = _compiler()
    if compiler is None:
        _reason = "no C++ compiler (g++) found"
        return None
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        _reason = "Python's headers are missing (Debian/Ubuntu: apt install python3-dev)"
        return None
    mlx_dir = Path(mlx.__path__[0])
    nanobind_dir = Path(nanobind.__file__).parent
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = hashlib.sha256(
        "|".join(
            [SOURCE.read_text(), mx.__version__, nanobind.__version__, sys.version, compiler]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "native" / key / f"_native{suffix}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        command = _build_command(compiler, nanobind_dir, mlx_dir, partial)
        print("mlx-pref: building the native CPU kernels (once, ~15 s)", file=sys.stderr)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            _reason = f"building the native kernels failed: {e}"
            return None
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            _reason = f"building the native kernels failed: {last}"
            return None
        os.replace(partial, target)  # atomic: a concurrent build writes the same bytes
    try:
        module = _import(target)
        _check(module, mx)
    except (ImportError, AttributeError, OSError, TypeError, ValueError) as e:
        _reason = f"the native kernels do not load: {e}"
        return None
    return module


def _check(module: ModuleType, mx) -> None:
    """One query seeing one key returns that key's value: arrays cross the binding (a
    nanobind MLX was not built with fails here with a TypeError) and the kernel runs."""
    q, v = mx.ones((1, 1, 1, 1)), mx.full((1, 1, 1, 1), 3.0)
    zero, ranges = mx.zeros((1,), mx.int32), mx.array([[0, 1, 0]], mx.int32)
    out, _ = module.attention_forward(q, q, v, zero, zero - 1, zero, ranges, 1.0, 0, 1)
    if out.item() != 3.0:
        raise ValueError(f"self-check returned {out.item()} instead of 3.0")


def threads() -> int:
    """Worker threads for the kernels: one per core, one when the machine is already busy
    (``backend.blas_threads``'s rule, which ``MLX_PREF_BLAS_THREADS`` overrides)."""
    forced = blas_threads()[0]
    if forced:
        return forced
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
