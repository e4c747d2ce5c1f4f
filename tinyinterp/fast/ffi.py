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
import functools
import math
import os
import re
import threading

import jax
import jax.numpy as jnp

from tinyinterp.kernels import xla_ffi_abi
from tinyinterp.kernels.targets import (  # noqa: F401 - the names the JAX side calls targets by
    APPLY_BWD,
    APPLY_FWD,
    ATTENTION_BWD,
    ATTENTION_BWD_PACKED,
    ATTENTION_FWD,
    ATTENTION_FWD_PACKED,
    ATTENTION_OUT_FWD,
    QKV_FWD,
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
    """``jax.ffi.ffi_call`` of a Numba target (registered on first use), passing the target's
    index as the attribute ``target`` (the handler finds its kernel entry and the task, which it
    runs on XLA's thread pool, in the address table; see kernels/ffi.py). ``out``: a
    ShapeDtypeStruct or a tuple of them.

    vmap_method "broadcast_all" suits the attention kernels, whose handlers fold every leading
    dimension into the batch (one launch for a vmapped call); kernels that also take weights, which
    may be vmapped too, use "sequential" (one call per vmapped element).

    Every call goes through here, so every kernel gets the same two things for free:

    * inside ``jax.shard_map`` its results are typed as varying over the manual axes its
      arguments vary over (``typed_like_inputs``), as the jnp it replaces would be;
    * under plain ``jax.jit`` with arguments on a multi-device mesh, it runs on each device's
      shard of the batch (``batch_local``) rather than on the whole batch gathered to every
      device. Every result leads with the batch; so does every argument of a "broadcast_all"
      kernel, and the first argument (the activations) of a "sequential" one, whose others are
      weights."""
    from tinyinterp.kernels.ffi import attributes

    attrs = attributes(target)
    ensure_registered(target)
    batched = None if vmap_method == "broadcast_all" else (0,)  # which arguments lead with the batch

    def local(out, *args, **kwargs):
        args, typed = typed_like_inputs(args, out)
        return jax.ffi.ffi_call(target, typed, vmap_method=vmap_method)(*args, **attrs, **kwargs)

    return lambda *args, **kwargs: batch_local(functools.partial(local, **kwargs), args, out,
                                               batched)


def batch_local(fn, args: tuple, out, batched: tuple[int, ...] | None):
    """``fn(out, *args)`` (``out``: the results' ShapeDtypeStructs), run by ``jax.shard_map``
    on each device's part of the batch when the arguments live on a mesh whose non-manual axes
    span several devices (plain ``jax.jit`` of sharded inputs). XLA cannot partition a custom
    call: left alone, it gathers the operands to the full batch on every device and each device
    repeats the whole kernel.

    Which mesh axes split the batch: on an Explicit mesh, those the batch arguments are already
    split over (none: the data is replicated and so is the work, as for jnp); on an Auto mesh,
    every axis (XLA moves the data to match, as it would for any op it partitions). A batch the
    devices do not divide is padded to a multiple of their count by repeating its last row, and
    the padding's rows are cut from the results: every row of a kernel is computed on its own
    (its other arguments are weights, whole on every device), so the padding changes no value.
    XLA moves rows between the devices to pad, so the model does not come here with such a
    batch: its plan takes the XLA path instead (``fast.sublayer.uneven_split``)."""
    batched = range(len(args)) if batched is None else batched
    lead = [args[i] for i in batched]
    mesh, axes = batch_axes(*lead)
    if not axes:
        return fn(out, *args)
    n_dev = math.prod(mesh.shape[n] for n in axes)
    size = jnp.shape(lead[0])[0]
    extra = -size % n_dev
    if extra:
        args = tuple(_pad_rows(a, extra) if i in batched else a for i, a in enumerate(args))
    batch = jax.sharding.PartitionSpec(axes)
    whole = jax.sharding.PartitionSpec()
    in_specs = tuple(batch if i in batched else whole for i in range(len(args)))
    out_specs = (tuple(batch for _ in out) if isinstance(out, (tuple, list)) else batch)
    def part(s):  # a result's per-device shape
        return jax.ShapeDtypeStruct(((s.shape[0] + extra) // n_dev, *s.shape[1:]), s.dtype)

    local_out = tuple(map(part, out)) if isinstance(out, (tuple, list)) else part(out)
    result = jax.shard_map(functools.partial(fn, local_out), mesh=mesh, in_specs=in_specs,
                           out_specs=out_specs, axis_names=frozenset(axes))(*args)
    return jax.tree.map(lambda r: r[:size], result) if extra else result


def _pad_rows(a, extra: int):
    """``a`` with its last row repeated ``extra`` more times (rows a kernel computes and the
    caller drops: copies of a real row, so never a value the kernel could not take)."""
    return jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)])


def batch_axes(*xs) -> tuple:
    """(the mesh, the axes of it) that ``batch_local`` splits the leading (batch) axis of ``xs``
    over: () when the arrays are on no mesh of several devices, or on an Explicit mesh that
    does not split their batch. ``math.prod`` of the axes' sizes is the device count."""
    mesh = next((m for m in (jax.typeof(x).sharding.mesh for x in xs) if not m.empty), None)
    if mesh is None or mesh.size == 1:
        return None, ()
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    explicit = {n for x in xs for n in _leading_axes(jax.typeof(x).sharding.spec)
                if types[n] == jax.sharding.AxisType.Explicit}
    return mesh, tuple(n for n in mesh.axis_names if mesh.shape[n] > 1 and (
        n in explicit or types[n] == jax.sharding.AxisType.Auto))


def _leading_axes(spec) -> tuple:
    """The mesh axes a PartitionSpec splits its first dimension over."""
    if not spec or spec[0] is None:
        return ()
    return spec[0] if isinstance(spec[0], tuple) else (spec[0],)


def typed_like_inputs(args: tuple, out):
    """(args, out) with every result typed as varying over the manual mesh axes (shard_map's)
    that any argument varies over, and each argument cast (``jax.lax.pcast``, a no-op on the
    values) to vary over them all, as an elementwise primitive's result would.

    XLA's FFI takes the result types as given, and a plain ShapeDtypeStruct says "the same on
    every device": inside ``jax.shard_map`` a kernel's per-device results would then be typed as
    replicated, so ``jax.grad`` fails the custom_vjp type check (check_vma=True) and a wrong
    ``out_specs=P()`` returns one device's shard silently. Typed here, they behave as the jnp they
    replace. Outside shard_map (no manual axes) nothing changes."""
    varying = frozenset().union(*(jax.typeof(a).mat.varying for a in args))
    if not varying:
        return args, out
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(n for n in mesh.axis_names if n in varying)  # in the mesh's order
    args = tuple(a if jax.typeof(a).mat.varying == varying
                 else jax.lax.pcast(a, tuple(n for n in axes if n not in jax.typeof(a).mat.varying),
                                    to="varying")
                 for a in args)
    mat = jax.sharding.ManualAxisType(varying=varying)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def typed(s):
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding, manual_axis_type=mat)

    return args, (tuple(typed(s) for s in out) if isinstance(out, (tuple, list)) else typed(out))
