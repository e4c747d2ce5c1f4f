"""Test-wide strictness (as in Equinox): no silent dtype or rank promotion."""

import os

import jax
from hypothesis import HealthCheck, Phase, settings

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
