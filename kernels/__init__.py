"""Numba CPU kernels (numpy in, numpy out, no JAX import). Installed as ``tinyinterp.kernels``.

    attention.py    causal attention kernels: fused forward / backward, scores, apply_pattern
    block.py        the fused attention sublayer; q/k/v and attention-output kernels for caches
    simd.py         explicit 16-lane float32 vectors; the fast-math flags the kernels use
    work.py         work items shared by threads (claim); FfiKernel, how the binding runs a kernel
    ffi.py          the XLA typed-FFI binding: one handler, one task, one entry per kernel
    xla_ffi_abi.py  XLA's FFI struct offsets and enum values, named (checked against jax's header)
    targets.py      the one table of FFI target names

Nothing is imported here: import the module you need (``tinyinterp.kernels.attention``).

Numba's on-disk cache (``cache=True``) checks only the file that defines a function, so an entry in
ffi.py, which links a kernel from block.py, would keep the old kernel after block.py changes (a
developer's edit, a ``git pull`` into an editable install): the results would be silently those of
the old code. On first import the package therefore compares a hash of all its sources with the one
recorded beside Numba's cache files in ``__pycache__`` and, when they differ, removes those cache
files (only Numba's index and data files of this package's modules) before any kernel loads.
"""

import hashlib as _hashlib
import os as _os


def _drop_stale_numba_caches() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    modules = sorted(f[:-3] for f in _os.listdir(here) if f.endswith(".py"))
    digest = _hashlib.sha256()
    for m in modules:
        with open(_os.path.join(here, m + ".py"), "rb") as f:
            digest.update(m.encode() + b"\0" + f.read() + b"\0")
    stamp = digest.hexdigest()
    cache = _os.path.join(here, "__pycache__")
    record = _os.path.join(cache, "tinyinterp-kernels-sources.sha256")
    try:
        with open(record) as f:
            if f.read().strip() == stamp:
                return
    except OSError:
        pass
    try:
        names = _os.listdir(cache)
    except OSError:
        names = []
    for name in names:  # Numba's files: <module>.<function>-<line>.py<ver>[.<n>].nbi / .nbc
        if name.endswith((".nbi", ".nbc")) and name.split(".", 1)[0] in modules:
            try:
                _os.remove(_os.path.join(cache, name))
            except OSError:
                pass
    try:  # written whole, then renamed into place
        _os.makedirs(cache, exist_ok=True)
        tmp = f"{record}.{_os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(stamp + "\n")
        _os.replace(tmp, record)
    except OSError:  # a read-only install: Numba keeps its cache elsewhere, keyed on these files
        pass


_drop_stale_numba_caches()
