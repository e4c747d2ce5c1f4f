"""The explicit-vector primitives of kernels/simd.py against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numba import njit

from tinyinterp.kernels.simd import (
    LANES,
    vbroadcast,
    vexp_le0,
    vfma,
    vhmax,
    vhsum,
    vload,
    vmask_after,
    vstore,
    vtranspose,
)


@njit(cache=True)
def _exp_all(x, out):
    for i in range(0, x.shape[0], LANES):
        vstore(out, i, vexp_le0(vload(x, i)))


@njit(cache=True)
def _reductions(x):
    v = vload(x, 0)
    return vhsum(v), vhmax(v)


@njit(cache=True)
def _fma(a, b, c, out):
    vstore(out, 0, vfma(vload(a, 0), vload(b, 0), vload(c, 0)))


@njit(cache=True)
def _broadcast(x, i, out):
    vstore(out, 0, vbroadcast(x, i))


@njit(cache=True)
def _mask(x, first, limit, out):
    vstore(out, 0, vmask_after(vload(x, 0), first, limit))


@njit(cache=True)
def _transpose(a, out):
    rows = (vload(a[0], 0), vload(a[1], 0), vload(a[2], 0), vload(a[3], 0), vload(a[4], 0),
            vload(a[5], 0), vload(a[6], 0), vload(a[7], 0), vload(a[8], 0), vload(a[9], 0),
            vload(a[10], 0), vload(a[11], 0), vload(a[12], 0), vload(a[13], 0),
            vload(a[14], 0), vload(a[15], 0))
    cols = vtranspose(rows)
    for i in range(LANES):
        vstore(out[i], 0, cols[i])


def _lanes(elements):
    return arrays(np.float32, LANES, elements=elements)


@settings(max_examples=60)
@given(x=_lanes(st.floats(-100.0, 0.0, width=32)))
def test_exp_matches_numpy_on_softmax_shifts(x):
    """exp(x) for x <= 0 within 2 float32 ulp of the correctly rounded value; exactly 0 below -87
    (where exp is below float32's normal range)."""
    got = np.empty_like(x)
    _exp_all(x, got)
    want = np.exp(x.astype(np.float64))
    normal = x >= -87.0
    ulp = np.spacing(want[normal].astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got[normal] - want[normal]) <= 2 * ulp)
    assert np.all(got[~normal] == 0.0)


def test_exp_special_values():
    x = np.zeros(LANES, np.float32)
    x[:4] = [-np.inf, np.nan, 0.0, -87.0]
    got = np.empty_like(x)
    _exp_all(x, got)
    assert got[0] == 0.0 and np.isnan(got[1]) and got[2] == 1.0
    assert got[3] == pytest.approx(np.exp(-87.0), rel=1e-6)


@settings(max_examples=30)
@given(x=_lanes(st.floats(-1e6, 1e6, width=32)))
def test_reductions(x):
    total, top = _reductions(x)
    assert top == np.max(x)
    assert total == pytest.approx(float(np.sum(x.astype(np.float64))),
                                  abs=LANES * 1e-7 * float(np.max(np.abs(x)) + 1e-30))


def test_fma_and_mask():
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(LANES).astype(np.float32) for _ in range(3))
    out = np.empty_like(a)
    _fma(a, b, c, out)
    np.testing.assert_allclose(out, a * b + c, rtol=1e-6, atol=1e-6)
    for first, limit in ((0, 0), (0, 7), (16, 20), (32, 20), (5, 100)):
        _mask(a, first, limit, out)
        keys = first + np.arange(LANES)
        assert np.array_equal(out, np.where(keys > limit, -np.inf, a).astype(np.float32))


def test_transpose():
    a = np.arange(LANES * LANES, dtype=np.float32).reshape(LANES, LANES)
    out = np.empty_like(a)
    _transpose(a, out)
    assert np.array_equal(out, a.T)


@given(x=arrays(np.float32, 40, elements=st.floats(-1e6, 1e6, width=32)), i=st.integers(0, 39))
@settings(max_examples=20)
def test_vbroadcast_is_the_element_in_every_lane(x, i):
    out = np.empty(LANES, np.float32)
    _broadcast(x, i, out)
    np.testing.assert_array_equal(out, np.full(LANES, x[i]))


def test_kernel_bounds_checks_trap_out_of_range_vector_accesses(tmp_path):
    """TINYINTERP_KERNEL_BOUNDS=1 (a debugging aid) makes every vector load/store check that the
    16 lanes lie inside the array: in range runs, one element past the end traps (SIGILL)."""
    import os
    import signal
    import subprocess
    import sys

    code = """
import numpy as np
from numba import njit
from tinyinterp.kernels.simd import vload, vstore
@njit
def shift(a, o):
    vstore(a, o, vload(a, 0))
a = np.zeros(20, np.float32)
shift(a, 4)
print("in range", flush=True)
shift(a, 5)
print("not trapped", flush=True)
"""
    env = dict(os.environ, TINYINTERP_KERNEL_BOUNDS="1", NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.stdout.splitlines() == ["in range"], (r.stdout, r.stderr[-2000:])
    assert r.returncode == -signal.SIGILL, r.returncode
