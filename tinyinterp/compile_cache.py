"""Keep compiled programs between runs: JAX's persistent compilation cache, bounded, opt-out.

A run of a ``tinyinterp reproduce`` command compiles about 160 XLA programs (the training chunk,
evaluation forwards, the detectors, and every operation called outside ``jit``): on this 2-core
machine that is seconds of a run whose whole budget is tens of seconds. JAX can keep them on disk
(its persistent compilation cache) so that the next run loads them instead.

Nothing is changed at import. The ``tinyinterp`` command calls ``enable_compile_cache()`` once at
start; a library user who wants the same calls it once, early (before the first compilation). The
cache lives in ``$TINYINTERP_COMPILE_CACHE`` when that is a path, else
``$XDG_CACHE_HOME/tinyinterp/xla`` (``~/.cache/tinyinterp/xla``); ``TINYINTERP_COMPILE_CACHE=0``
turns it off (the tests do). It is bounded: JAX evicts the least recently used entries beyond
``max_bytes``. A cache directory JAX was already given (``JAX_COMPILATION_CACHE_DIR``) is left as
it is. Correctness does not depend on it: an entry is keyed by the program, the compiler options
and the jax/jaxlib versions, and the Numba kernels are registered by name when a program is
traced, before its executable is looked up.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

OFF = ("0", "off", "false", "no")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinyinterp" / "xla"


def enable_compile_cache(path: str | os.PathLike | None = None, *,
                         max_bytes: int = 512 << 20) -> Path | None:
    """Point JAX's persistent compilation cache at ``path`` (default: see the module docstring),
    caching every program (no minimum compile time) up to ``max_bytes`` on disk. Returns the
    directory in use, or None when the cache is off (``TINYINTERP_COMPILE_CACHE=0``) or the
    directory cannot be created or written (one warning; the run goes on uncached)."""
    import jax

    env = os.environ.get("TINYINTERP_COMPILE_CACHE", "").strip()
    if env.lower() in OFF:
        return None
    if jax.config.jax_compilation_cache_dir:  # the user's own setting wins
        return Path(jax.config.jax_compilation_cache_dir)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    where = Path(path if path is not None else (env or default_dir())).expanduser()
    try:
        where.mkdir(parents=True, exist_ok=True)
        if not os.access(where, os.W_OK | os.X_OK):
            raise PermissionError(f"{where} is not writable")
    except OSError as e:
        warnings.warn(f"tinyinterp: compiled programs are not kept between runs ({e}); set "
                      "TINYINTERP_COMPILE_CACHE to a writable folder, or to 0 to silence this",
                      stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    return where
