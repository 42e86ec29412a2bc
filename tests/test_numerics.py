"""The per-backend promises the numeric tests read (``_numerics.py``)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from _numerics import NUMERICS, for_backend, tf32_enabled

from mlx_pref import backend


def test_the_cpu_keeps_its_own_tolerances_and_bit_exact_resume():
    cpu = for_backend("cpu", tf32=True)  # TF32 means nothing on the CPU
    assert cpu.tolerance(1e-6) == 1e-6 and cpu.tolerance(1e-4) == 1e-4
    assert cpu.exact_repeat and cpu.exact_repeat_full and cpu.batch_invariant
    assert cpu.invariant(0.0) == 0.0 and type(cpu.invariant(0.0)) is float


def test_gpus_state_their_promises():
    metal, cuda = for_backend("metal", tf32=False), for_backend("cuda", tf32=False)
    assert metal.exact_repeat and not metal.exact_repeat_full  # atomic scatter-add
    assert not cuda.exact_repeat and not cuda.exact_repeat_full
    assert not metal.batch_invariant and not cuda.batch_invariant
    assert cuda.tolerance(1e-5) == pytest.approx(1e-4)
    assert for_backend("cuda", tf32=True).tolerance(1e-5) == pytest.approx(1e-3)
    unknown = for_backend("gpu", tf32=False)  # a GPU backend_name() cannot name
    assert dataclasses.replace(unknown, backend="cuda") == cuda


def test_tf32_is_read_as_mlx_reads_it():
    # MLX: unset means on; otherwise C's atoi of the value, nonzero means on.
    values = [None, "0", "1", "2", " 1", "7x", "", "off", "-1"]
    assert [tf32_enabled(v) for v in values] == [
        True, False, True, True, True, True, False, False, True,
    ]  # fmt: skip
    assert os.environ.get("MLX_ENABLE_TF32") is not None  # conftest sets it before mlx loads
    assert NUMERICS.tf32 == (
        backend.backend_name() != "cpu" and tf32_enabled(os.environ["MLX_ENABLE_TF32"])
    )
