"""The JAX side of the Numba binding: the version gate, registration and one ``call`` helper.

The Numba ``@cfunc``s live in ``kernels/ffi.py`` (no JAX there): one handler, registered under
every target name, one generic task and one kernel entry per target. Each target is registered
with ``jax.ffi.register_ffi_target`` on its first use, and its kernel entry compiled (or loaded
from Numba's cache) then, so a run compiles only the kernels it calls. Registering targets with
XLA is the one process-wide effect of this package: XLA's registry cannot forget a target, so it
lasts for the process. The target names come from the one table in ``kernels/targets.py``.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading

import jax

from tinyinterp.kernels import xla_ffi_abi
from tinyinterp.kernels.targets import (  # noqa: F401 - the names the JAX side calls targets by
    APPLY_BWD,
    APPLY_FWD,
    ATTENTION_BWD,
    ATTENTION_BWD_PACKED,
    ATTENTION_FWD,
    ATTENTION_FWD_PACKED,
    ATTENTION_OUT_FWD,
    SCORES_BWD,
    SCORES_FWD,
    SUBLAYER_FWD,
    TARGETS,
)

# The jaxlib releases whose xla/ffi/api/c_api.h has the offsets named in kernels/xla_ffi_abi.py
# (identical from 0.10.2 through 0.12.1; tests/test_ffi_abi.py checks the installed one). Outside
# this range the run-time probe still decides, but the backend falls back to XLA with a warning
# rather than guess a layout.
TESTED_JAXLIB = ((0, 10, 2), (0, 12, 1))
FFI_API_VERSION = (xla_ffi_abi.FFI_API_MAJOR, xla_ffi_abi.FFI_API_MINOR)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def version_problem() -> str | None:
    """Why the call-frame layout may not match this jaxlib, or None. Cheap (no compilation)."""
    import jaxlib

    version = getattr(jaxlib, "__version__", None) or jax.lib.__version__
    lo, hi = TESTED_JAXLIB
    if not lo <= _version_tuple(version) <= hi:
        return (f"jaxlib {version} is outside the tested range {'.'.join(map(str, lo))} to "
                f"{'.'.join(map(str, hi))}; the XLA FFI call-frame layout the Numba handlers read "
                "may differ")
    header = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
    if os.path.exists(header):
        with open(header) as f:
            text = f.read()
        major = re.search(r"#define XLA_FFI_API_MAJOR (\d+)", text)
        minor = re.search(r"#define XLA_FFI_API_MINOR (\d+)", text)
        found = (int(major.group(1)), int(minor.group(1))) if major and minor else None
        if found != FFI_API_VERSION:
            return f"XLA FFI API version {found} != {FFI_API_VERSION} that the handlers implement"
    return None


def _capsule(address: int):
    """A PyCapsule holding a C function pointer, as jax.ffi.register_ffi_target expects."""
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    return new(address, None, None)


_registered: set[str] = set()
_register_lock = threading.Lock()


def ensure_registered(target: str) -> str:
    """Register an FFI target with XLA the first time it is used (the one handler is compiled, or
    loaded from Numba's cache, on the first registration; the target's kernel entry then too)."""
    if target not in TARGETS:
        raise ValueError(f"unknown FFI target {target!r}; known: {TARGETS}")
    if target not in _registered:
        with _register_lock:
            if target not in _registered:
                from tinyinterp.kernels.ffi import entry_address, handler_address

                entry_address(target)
                jax.ffi.register_ffi_target(target, _capsule(handler_address()), platform="cpu",
                                            api_version=1)
                _registered.add(target)
    return target


def call(target: str, out, *, vmap_method: str = "broadcast_all"):
    """``jax.ffi.ffi_call`` of a Numba target (registered on first use), passing the addresses of
    the target's kernel entry and of the generic task as the attributes ``entry`` and ``task``
    (the handler runs the task on XLA's thread pool; see kernels/ffi.py). ``out``: a
    ShapeDtypeStruct or a tuple of them.

    vmap_method "broadcast_all" suits the attention kernels, whose handlers fold every leading
    dimension into the batch (one launch for a vmapped call); kernels that also take weights, which
    may be vmapped too, use "sequential" (one call per vmapped element)."""
    from tinyinterp.kernels.ffi import attributes

    fn = jax.ffi.ffi_call(ensure_registered(target), out, vmap_method=vmap_method)
    attrs = attributes(target)
    return lambda *args, **kwargs: fn(*args, **attrs, **kwargs)
