"""How a kernel's work is split and shared by threads, and how the FFI binding describes a kernel.

Work items: every kernel computes numbered work items (what an item is, each kernel module says:
(batch, head) slices in ``kernels/attention.py``, batch rows or chunks of rows in
``kernels/block.py``). A kernel is called with one item that its caller already claimed
(``first``) and claims more from a shared counter (``counter[0]`` is the next unclaimed item,
``claim``) until none are left; it returns how many items it computed. The FFI binding runs one
kernel call per thread of XLA's pool, all sharing one counter: that balances the load when a
thread is descheduled (shared machines). Each item is computed by one thread in a fixed order, so
results do not depend on the number of threads. To run a kernel on one thread:
``kernel(..., np.ones(1, np.int64), 0)``.

``FfiKernel`` is what a kernel module tells ``kernels/ffi.py`` about a kernel it exposes to XLA:
the ranks of its argument and result buffers, whether it takes the ``scale`` attribute, whether
leading (vmap) dimensions may be folded into its batch, the number of work items of a call (from
the shape of one buffer) and how to run items (``run``: the buffers in, the kernel called).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _fetch_add(typingctx, counter, value):
    """Atomically counter[0] += value; returns the old value (a work queue shared by threads)."""

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", ary.data, args[1], "monotonic")

    return types.int64(counter, types.int64), codegen


@njit(cache=True, inline="always")
def claim(counter):
    """The next unclaimed item of a shared counter (a 1-element int64 array); the caller stops
    once it is past the last item."""
    return _fetch_add(counter, 1)


class FfiKernel(NamedTuple):
    """A kernel as the XLA FFI binding runs it (a global of its kernel module; Numba freezes it).

    args, rets   the ranks of the argument and result buffers (float32, C-contiguous)
    scale        whether the call passes the float32 attribute ``scale``
    batched      whether every buffer may carry the same extra leading (vmap) dimensions, which
                 ``run`` folds into the batch; else the ranks are exact
    split        the buffer whose shape gives the number of work items: an index into
                 args + rets
    items        njit (shape: int64[:]) -> the number of work items of a call
    run          njit (bufs, shapes, scale, counter, first) -> items computed: runs item
                 ``first`` and those claimed from ``counter``; ``bufs[i]`` is buffer i of
                 args + rets as a flat float32 array, ``shapes[i]`` its dims (int64); both are
                 tuples of a fixed length (kernels/ffi.py: MAX_BUFFERS), empty past the
                 kernel's buffers
    """

    args: tuple[int, ...]
    rets: tuple[int, ...]
    scale: bool
    batched: bool
    split: int
    items: Callable
    run: Callable


@njit(cache=True, inline="always")
def lead_folded4(flat, shape):
    """A flat buffer of shape [*lead, a, b, c] as a [prod(lead), a, b, c] view (no copy)."""
    r = shape.shape[0]
    lead = 1
    for i in range(r - 3):
        lead *= shape[i]
    return flat.reshape((lead, shape[r - 3], shape[r - 2], shape[r - 1]))


@njit(cache=True, inline="always")
def lead_folded3(flat, shape):
    """A flat buffer of shape [*lead, a, b] as a [prod(lead), a, b] view (no copy)."""
    r = shape.shape[0]
    lead = 1
    for i in range(r - 2):
        lead *= shape[i]
    return flat.reshape((lead, shape[r - 2], shape[r - 1]))
