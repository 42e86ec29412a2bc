"""mlx-pref's native CPU kernels: built on first use, cached, optional.

MLX's CPU backend runs element-wise work one element at a time on one thread (on x86 its
SIMD width is 1), and MLX offers no way to write a CPU kernel from Python; computing on
the host inside a traced function instead keeps the whole forward graph alive (measured:
5x the peak memory of a training step). So the packed block attention also exists as an
MLX primitive in C++ (``csrc/kernels.cpp``), compiled here against the installed MLX
with nanobind (the binding library MLX itself uses, whose internals an extension must
share to pass arrays) and the system C++ compiler, once per MLX, nanobind, Python and
source version, into ``kernel_dir()``. Where anything is missing (no compiler, no
Python headers, a nanobind MLX was not built with), ``load`` returns None with the reason
and attention runs in MLX as before; ``MLX_PREF_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

from mlx_pref.backend import blas_threads

SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
NATIVE_ENV = "MLX_PREF_NATIVE"
_reason = ""


def reason() -> str:
    """Why ``load`` returned None ("" when it did not, or was not called)."""
    return _reason


def kernel_dir() -> Path:
    """Where built kernels live: ``MLX_PREF_NATIVE_CACHE``, else ``~/.cache/mlx-pref/native``.
    They belong to the machine, not to a run, so ``MLX_PREF_CACHE`` (which moves the
    reference caches, and which tests point at folders of their own) does not move them."""
    root = os.environ.get("MLX_PREF_NATIVE_CACHE")
    if root:
        return Path(root)
    home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(home) / "mlx-pref" / "native"


def _compiler() -> list[str] | None:
    """The C++ compiler command (``CXX`` may carry arguments, e.g. ``ccache g++``)."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++")
    return [found] if found else None


def _build_command(compiler: list[str], nanobind_dir: Path, mlx_dir: Path) -> list[str]:
    """The compile and link command, less its ``-o OUTPUT``."""
    python_include = sysconfig.get_paths()["include"]
    return [
        *compiler, "-O3", "-march=native", "-fopenmp-simd", "-std=c++20", "-shared", "-fPIC",
        "-fvisibility=hidden", "-DNDEBUG",
        "-DNB_DOMAIN=mlx",  # share MLX's nanobind type registry: pass mx.array both ways
        f"-I{python_include}", f"-I{mlx_dir / 'include'}", f"-I{nanobind_dir / 'include'}",
        f"-I{nanobind_dir / 'ext' / 'robin_map' / 'include'}",
        str(nanobind_dir / "src" / "nb_combined.cpp"), str(SOURCE),
        f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}",
    ]  # fmt: skip


def _machine() -> str:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags (a
    cache shared between machines must not hand one the other's instructions)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + " " + " ".join(sorted(flags.split(":")[-1].split()))


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_native", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def load() -> ModuleType | None:
    """The compiled kernels (built now if not cached), or None (see ``reason``)."""
    global _reason
    if os.environ.get(NATIVE_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
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
    mlx_dir, nanobind_dir = Path(mlx.__path__[0]), Path(nanobind.__file__).parent
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    try:
        command = _build_command(compiler, nanobind_dir, mlx_dir)
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
        parts = [SOURCE.read_text(), mx.__version__, nanobind.__version__, sys.version,
                 " ".join(command), version, _machine()]  # fmt: skip
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
        target = kernel_dir() / key / f"_native{suffix}"
        if not target.exists():
            _build(command, target)
        module = _import(target)
        _check(module, mx)
        return module
    except Exception as e:  # noqa: BLE001 (any failure: say why, and run MLX's ops instead)
        _reason = f"the native kernels could not be built or loaded: {e}"
        return None


def _build(command: list[str], target: Path) -> None:
    """Compile into a file this call creates beside ``target``, then move it into place
    unless another process has put its own build there first (nothing is overwritten)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    partial = Path(name)
    if sys.stderr.isatty():  # a terminal's user waits; logs and error lines stay clean
        print("mlx-pref: building the native CPU kernels (once, ~15 s)", file=sys.stderr)
    try:
        done = subprocess.run(
            [*command, "-o", str(partial)], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"the compiler failed: {last}")
        with contextlib.suppress(FileExistsError):  # another process built it first
            os.link(partial, target)  # never replaces a file
    finally:
        partial.unlink(missing_ok=True)  # the file mkstemp created for this call


def _check(module: ModuleType, mx) -> None:
    """One query seeing one key returns that key's value: arrays cross the binding (a
    nanobind MLX was not built with fails here with a TypeError) and the kernel runs."""
    q, v = mx.ones((1, 1, 1, 1)), mx.full((1, 1, 1, 1), 3.0)
    zero, ranges = mx.zeros((1,), mx.int32), mx.array([[0, 1, 0]], mx.int32)
    out, _ = module.attention_forward(q, q, v, zero, zero - 1, zero, ranges, 1.0, 0, 1)
    if out.item() != 3.0:
        raise ValueError(f"self-check returned {out.item()} instead of 3.0")


@cache
def threads() -> int:
    """Worker threads for the kernels: one per core, one when the machine is already busy
    (``backend.blas_threads``'s rule, which ``MLX_PREF_BLAS_THREADS`` overrides), decided
    once per process like OpenBLAS's own count."""
    value = os.environ.get("OPENBLAS_NUM_THREADS", "").strip()  # set by load_fast_blas too
    if value.isdigit() and int(value) > 0:
        return int(value)
    forced = blas_threads()[0]
    if forced:
        return forced
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
