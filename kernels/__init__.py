"""Numba CPU kernels (numpy in, numpy out, no JAX import). Installed as ``tinyinterp.kernels``.

    attention.py    causal attention kernels: fused forward / backward, scores, apply_pattern
    block.py        the fused attention sublayer; q/k/v and attention-output kernels for caches
    simd.py         explicit 16-lane float32 vectors; the fast-math flags the kernels use
    work.py         work items shared by threads (claim); FfiKernel, how the binding runs a kernel
    ffi.py          the XLA typed-FFI binding: one handler, one task, one entry per kernel
    xla_ffi_abi.py  XLA's FFI struct offsets and enum values, named (checked against jax's header)
    targets.py      the one table of FFI target names

Nothing is imported here: import the module you need (``tinyinterp.kernels.attention``).
"""
