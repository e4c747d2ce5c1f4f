"""Test-wide strictness (as in Equinox): no silent dtype or rank promotion, and the shape
annotations of the model's modules checked at run time (jaxtyping + beartype)."""

import gc
import os
import sys

# Issue 23: every run of the suite is a two-device run. Two host CPU devices are forced before JAX
# starts (the device count is fixed when its CPU backend starts), unless the user's XLA_FLAGS
# already set a count; computations without a mesh still run on the first device, as before, and
# tests/test_sweeps.py splits its sweeps over both. (TINYINTERP_FORCED_DEVICES tells the tests that
# two devices were asked for here, so their absence is a failure rather than a skip.)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2").strip()
    os.environ["TINYINTERP_FORCED_DEVICES"] = "2"

from jaxtyping import install_import_hook  # noqa: E402

# `python -m pytest` puts the repository root on sys.path, where the top-level kernels/ folder
# would shadow any installed package named "kernels" (Hugging Face's, which transformers imports
# for TransformerLens). Tests import tinyinterp as installed (tinyinterp.kernels included).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

# Before anything imports them: every call of an annotated function in these modules checks its
# arguments' and result's shapes against the annotation (consistently across arguments), so an
# annotation that lies fails the tests.
# (The analysis modules check their users' shapes themselves, with messages their tests expect,
# so the run-time checker covers the model and its fast paths.)
_CHECKED = ["tinyinterp.model", "tinyinterp.fast", "tinyinterp.inputs"]
install_import_hook(_CHECKED, "beartype.beartype")

# The CLI keeps compiled programs on disk (tinyinterp.compile_cache); the tests call it in-process
# and must neither write the user's cache nor depend on it.
os.environ["TINYINTERP_COMPILE_CACHE"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# Hypothesis: JAX compiles on first use, so wall-clock deadlines are meaningless; example counts are
# chosen per test with @settings(max_examples=...).
settings.register_profile(
    "tinyinterp",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("CI") == "true",
    print_blob=True,
    # Every example compiles a fresh model, so shrinking a failure can take many minutes: it is
    # opt-in (TINYINTERP_SHRINK=1); the failing example and its reproduce blob are printed anyway.
    phases=tuple(p for p in Phase
                 if p is not Phase.shrink or os.environ.get("TINYINTERP_SHRINK") == "1"),
)
settings.load_profile("tinyinterp")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every live XLA:CPU executable holds
    ~7 memory mappings, and a process may have at most vm.max_map_count (65530 by default): one
    session of this suite compiles thousands of programs (measured: 29k mappings after the first
    five modules), and when mmap then failed, XLA crashed with a segmentation fault while
    compiling (both CI runs). ``jax.clear_caches`` releases them (2758 -> 505 mappings after 300
    programs); what the next module needs is compiled again."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_sessionstart(session):
    """CI sets TINYINTERP_REQUIRE_NUMBA=1: there the Numba backend must work, so its tests never
    skip silently (elsewhere they skip with the reason when the binding is unsupported)."""
    if os.environ.get("TINYINTERP_REQUIRE_NUMBA") == "1":
        import pytest

        from tinyinterp.fast import numba_unavailable_reason

        reason = numba_unavailable_reason()
        if reason is not None:
            raise pytest.UsageError(f"TINYINTERP_REQUIRE_NUMBA=1 but the Numba attention backend "
                                    f"is unavailable: {reason}")
