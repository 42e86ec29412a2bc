"""What the tests may expect of each MLX backend's float32 arithmetic, decided in one place.

``conftest.py`` sets ``MLX_ENABLE_TF32=0`` before MLX is imported, so float32 matmuls run
in full float32 everywhere (MLX's default lets cuBLAS use TF32 on CUDA, and the neural
accelerators of recent Apple GPUs on Metal: about 5e-4 relative per product). What is
left to differ between backends is the order in which their kernels add numbers up.

========  ==========================  ===========================  =====================
backend   the same computation again  a row in another batch        tolerances of checks
          (resume, a repeated eval)   (cache vs live, step 0)       that regroup the math
========  ==========================  ===========================  =====================
cpu       bit-identical               bit-identical                 as written (scale 1)
metal     bit-identical, LoRA runs    within tolerance              10x the CPU values
cuda      within RESUME_*             within tolerance              10x the CPU values
========  ==========================  ===========================  =====================

Why. The CPU runs every kernel in one fixed order, and its matmul gives a row the same
bits whatever batch it sits in. OpenBLAS splits long inner products across its threads, so
this holds for one thread count: conftest.py starts child processes with the parent's.
MLX's Metal reductions and GEMMs use no atomics, so a repeat is exact; its scatter-add does
use atomics, and the gradient of an embedding lookup is a scatter-add, so full fine-tuning
(which trains the embedding table) is not promised bit-exact there. GEMM kernels are chosen
per shape on both GPUs, so a row in another batch may round differently. On CUDA MLX has no
deterministic mode: cuDNN's fused attention backward (bf16/fp16 runs) is not set
deterministic, scatter-add is atomic, and cuBLASLt picks each algorithm by a heuristic that
depends on the shape, the GPU and the library version, so a resumed run is promised equal
within ``RESUME_*`` only. With TF32 switched back on (``MLX_ENABLE_TF32=1``: 10 mantissa
bits instead of 23) a GPU's tolerances are 100x the CPU's. The Metal and CUDA rows follow
from reading MLX 0.32's source; they have not been measured on a GPU yet.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest

from mlx_pref import backend

RESUME_WEIGHTS_ATOL = 1e-4
"""Where a resume is not bit-exact: weights may differ by 1% of the tests' learning rate
(Adam's early updates are about ``lr·sign(g)``, so a gradient entry near zero that rounds
the other way moves its weight by up to that much; the gradient-accumulation test uses
the same bound on the CPU)."""
RESUME_METRICS_RTOL = 1e-4
RESUME_METRICS_ATOL = 1e-6


def tf32_enabled(value: str | None) -> bool:
    """Whether MLX reads ``MLX_ENABLE_TF32=value`` as on: unset is on, otherwise C's
    ``atoi`` of it (``mlx/utils.h``: ``get_var("MLX_ENABLE_TF32", 1)``)."""
    if value is None:
        return True
    number = re.match(r"\s*([+-]?\d+)", value)
    return number is not None and int(number.group(1)) != 0


@dataclass(frozen=True)
class Numerics:
    """One backend's promises (see the module docstring)."""

    backend: str
    tf32: bool
    exact_repeat: bool
    """A resumed run ends with bit-identical weights and metrics (LoRA)."""
    exact_repeat_full: bool
    """The same, under full fine-tuning (the embedding table trains)."""
    batch_invariant: bool
    """A row's log-probs do not depend on the batch it is computed in."""
    scale: float
    """Factor on the CPU tolerance of a check that computes the same math grouped
    differently (other batch sizes, layouts, kernels or reference strategies)."""

    def tolerance(self, cpu: float) -> float:
        """The tolerance a check written with ``cpu`` for the CPU uses on this backend."""
        return cpu * self.scale

    def invariant(self, expected: float, cpu: float = 1e-6):
        """``expected`` itself where rows are batch-invariant (an exact comparison), else
        ``pytest.approx(expected, abs=tolerance(cpu))``."""
        if self.batch_invariant:
            return expected
        return pytest.approx(expected, abs=self.tolerance(cpu))

    def assert_repeated(self, actual, expected, *, full: bool = False, err_msg: str = "") -> None:
        """Arrays of a repeated or resumed computation: bit-identical where promised,
        else within ``RESUME_WEIGHTS_ATOL``."""
        if self.exact_repeat_full if full else self.exact_repeat:
            np.testing.assert_array_equal(actual, expected, err_msg=err_msg)
            a, e = np.asarray(actual), np.asarray(expected)
            assert a.dtype == e.dtype and a.tobytes() == e.tobytes(), err_msg  # -0.0 too
        else:
            np.testing.assert_allclose(
                actual, expected, rtol=0, atol=RESUME_WEIGHTS_ATOL, err_msg=err_msg
            )

    def assert_repeated_metrics(self, actual: list | dict, expected: list | dict, *,
                                full: bool = False) -> None:  # fmt: skip
        """Logged metrics (records or one dict) of a repeated or resumed computation:
        equal where promised, else every number within ``RESUME_METRICS_*``."""
        if self.exact_repeat_full if full else self.exact_repeat:
            assert actual == expected
            return
        pairs = zip(actual, expected) if isinstance(actual, list) else [(actual, expected)]
        assert len(actual) == len(expected)
        for a, e in pairs:
            assert a.keys() == e.keys()
            for key in a:
                if isinstance(e[key], float) and math.isfinite(e[key]):
                    assert a[key] == pytest.approx(
                        e[key], rel=RESUME_METRICS_RTOL, abs=RESUME_METRICS_ATOL
                    ), key
                else:
                    assert a[key] == e[key], key


def for_backend(name: str, tf32: bool) -> Numerics:
    """The promises of backend ``name`` (``mlx_pref.backend.backend_name()``); an unknown
    GPU is held to CUDA's."""
    if name == "cpu":
        return Numerics(name, False, True, True, True, 1.0)
    scale = 100.0 if tf32 else 10.0
    if name == "metal":
        return Numerics(name, tf32, True, False, False, scale)
    return Numerics(name, tf32, False, False, False, scale)


NUMERICS = for_backend(backend.backend_name(), tf32_enabled(os.environ.get("MLX_ENABLE_TF32")))
"""What this test run may expect."""
