"""XLA typed-FFI handlers for the attention kernels, as Numba ``@cfunc``s (no JAX import).

Each handler has the C signature ``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)`` and is compiled in
nopython mode, so it runs without the GIL. It reads and checks XLA's call frame directly; its
task (a second ``@cfunc``, see "Threads" below) wraps the argument and result buffers as numpy
arrays without copying (``numba.carray`` on XLA's pointers) and runs a kernel from
``kernels/attention.py`` or ``kernels/block.py`` on them. ``tinyinterp.attention`` registers the
handlers' addresses with ``jax.ffi.register_ffi_target(..., api_version=1)``.

Struct layouts are those of ``xla/ffi/api/c_api.h`` shipped with jaxlib 0.10.2 (XLA FFI API 0.3),
x86-64 / aarch64 LP64 (8-byte pointers, size_t and int64; 4-byte enums with padding):

    XLA_FFI_CallFrame   struct_size@0 extension_start@8 api@16 ctx@24 stage@32(i32)
                        args@40: {struct_size@40 extension_start@48 size@56 types@64 args@72}
                        rets@80: {struct_size@80 extension_start@88 size@96 types@104 rets@112}
                        attrs@120: {struct_size@120 ext@128 size@136 types@144 names@152 attrs@160}
                        future@168                       (XLA_FFI_CallFrame_STRUCT_SIZE = 168)
    XLA_FFI_Buffer      struct_size@0 extension_start@8 dtype@16(i32) data@24 rank@32 dims@40
    XLA_FFI_Scalar      dtype@0(i32) value@8             (a scalar attribute)
    XLA_FFI_Extension_Base      struct_size@0 type@8(i32) next@16
    XLA_FFI_Metadata_Extension  extension_base@0 metadata@24  (STRUCT_SIZE 32)
    XLA_FFI_Metadata    struct_size@0 api_version@8: {struct_size@8 ext@16 major@24 minor@28}
                        traits@32(u32) state_type_id@40  (STRUCT_SIZE 36)
    XLA_FFI_Api         struct_size@0 ext@8 api_version@16: {.. major@32 minor@36}
                        internal_api@40 XLA_FFI_Error_Create@48 XLA_FFI_Error_Destroy@64
                        XLA_FFI_ThreadPool_Schedule@136 XLA_FFI_ThreadPool_NumThreads@144
    XLA_FFI_Error_Create_Args   struct_size@0 ext@8 message@16 errc@24(i32)  (STRUCT_SIZE 28)
    XLA_FFI_Error_Destroy_Args  struct_size@0 ext@8 error@16                 (STRUCT_SIZE 24)
    XLA_FFI_ThreadPool_Schedule_Args   struct_size@0 ext@8 ctx@16 task@24 data@32  (SIZE 40)
    XLA_FFI_ThreadPool_NumThreads_Args struct_size@0 ext@8 ctx@16 num_threads@24   (SIZE 32)

The handshake: when XLA registers a handler it calls it once with a call frame whose extension
chain holds an ``XLA_FFI_Metadata_Extension``; the handler answers by writing the FFI API version
it was written against (0.3) and its traits (0) and returns NULL. Errors are reported by calling
``api->XLA_FFI_Error_Create`` and returning the error it makes; NULL means success.

Threads: the kernels are serial; a handler runs its kernel on XLA's own intra-op thread pool
(``api->XLA_FFI_ThreadPool_Schedule``, API 0.3), the pool that runs XLA's other work, so no second
pool competes with it for the cores. The handler puts a small job record on the heap (malloc):
a reference count, the shared item counter, the number of items done, the number of items, the
call frame and the scale. It schedules one task per other pool thread, runs the task itself,
then waits until every item is done (a spin of at most one item's time: it waits only for items
that a running thread has claimed, never for a task still in the queue, so two handlers running
at once cannot deadlock). A task that starts after all items were claimed finds nothing to do
and only drops its reference; the last reference frees the record. The task is a second
``@cfunc`` per target; its address reaches the handler as the int64 attribute ``task`` (a
cached handler must not hold an address from the process that compiled it). Tasks read the
call frame only after claiming an item, i.e. while the handler is still waiting for it. Without
a pool (or if scheduling fails), the handler's own call does every item.

Before a kernel runs, the task clears the upper vector-register state (``vzeroupper``): XLA's
AVX-512 code leaves it dirty, which made the kernels 1.8x slower under XLA than called directly.
"""

from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from tinyinterp.kernels.attention import (
    apply_bwd,
    apply_fwd,
    attention_bwd,
    attention_fwd,
    scores_bwd,
    scores_fwd,
    work_items,
)
from tinyinterp.kernels.block import CHUNK_ROWS, attention_block_fwd, attention_out_fwd, qkv_fwd

FFI_API_MAJOR = 0  # the XLA FFI API version these layouts were read from (c_api.h, jaxlib 0.10.2)
FFI_API_MINOR = 3
CALL_FRAME_STRUCT_SIZE = 168
METADATA_EXTENSION_STRUCT_SIZE = 32
METADATA_STRUCT_SIZE = 36
API_VERSION_STRUCT_SIZE = 24
EXTENSION_METADATA = 1
STAGE_EXECUTE = 3
DTYPE_S64 = 5
DTYPE_F32 = 11
ATTR_SCALAR = 3
API_THREAD_POOL_END = 152  # api->struct_size must reach past XLA_FFI_ThreadPool_NumThreads
ERR_INVALID_ARGUMENT = 3
ERR_RESOURCE_EXHAUSTED = 8
ERR_UNIMPLEMENTED = 12

HANDLER_SIGNATURE = types.voidptr(types.voidptr)
TASK_SIGNATURE = types.void(types.voidptr)

# The job record a handler shares with its tasks: int64 slots (see the module docstring).
_JOB_REFS, _JOB_NEXT, _JOB_DONE, _JOB_ITEMS, _JOB_FRAME, _JOB_SCALE = 0, 8, 16, 24, 32, 40
_JOB_SIZE = 48

_METADATA_TOO_SMALL = "tinyinterp attention: XLA FFI metadata struct too small"

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


# ---- raw memory access (addresses are int64) ------------------------------------------------


@intrinsic
def _addr(typingctx, ptr):
    """voidptr -> int64 address."""

    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], _I64)

    return types.int64(types.voidptr), codegen


@intrinsic
def _voidptr(typingctx, addr):
    """int64 address -> voidptr."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(types.int64), codegen


@intrinsic
def _load_i64(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], _I64.as_pointer()))

    return types.int64(types.int64), codegen


@intrinsic
def _load_i32(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], _I32.as_pointer()))

    return types.int32(types.int64), codegen


@intrinsic
def _load_f32(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.FloatType().as_pointer()))

    return types.float32(types.int64), codegen


@intrinsic
def _store_i32(typingctx, addr, value):
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], _I32.as_pointer())
        builder.store(builder.trunc(args[1], _I32), ptr)
        return context.get_dummy_value()

    return types.none(types.int64, types.int64), codegen


@intrinsic
def _store_f32(typingctx, addr, value):
    def codegen(context, builder, signature, args):
        builder.store(args[1], builder.inttoptr(args[0], ir.FloatType().as_pointer()))
        return context.get_dummy_value()

    return types.none(types.int64, types.float32), codegen


@intrinsic
def _store_i64(typingctx, addr, value):
    def codegen(context, builder, signature, args):
        builder.store(args[1], builder.inttoptr(args[0], _I64.as_pointer()))
        return context.get_dummy_value()

    return types.none(types.int64, types.int64), codegen


@intrinsic
def _atomic_add(typingctx, addr, value):
    """Atomically *addr += value (int64); returns the old value."""

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], _I64.as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def _malloc(typingctx, size):
    """C malloc; returns the address (0 if out of memory)."""

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i8p, [_I64]), "malloc")
        return builder.ptrtoint(builder.call(fn, [args[0]]), _I64)

    return types.int64(types.int64), codegen


@intrinsic
def _free(typingctx, addr):
    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p]),
                                            "free")
        builder.call(fn, [builder.inttoptr(args[0], i8p)])
        return context.get_dummy_value()

    return types.none(types.int64), codegen


def _host_is_x86() -> bool:
    try:
        from llvmlite import binding

        return binding.get_process_triple().startswith(("x86_64", "i686", "i386"))
    except Exception:  # noqa: BLE001 - unknown: do not emit the instruction
        return False


@intrinsic
def _spin_pause(typingctx):
    """The x86 'pause' hint inside a spin-wait loop (nothing elsewhere)."""

    def codegen(context, builder, signature, args):
        if _host_is_x86():
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause",
                                                  fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _call_task(typingctx, fn_addr, data):
    """Calls the C function void task(void* data) at fn_addr."""

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.inttoptr(args[1], i8p)])
        return context.get_dummy_value()

    return types.none(types.int64, types.int64), codegen


def _api_call(builder, api_addr, offset, values):
    """Calls the XLA_FFI_Api function at `offset` with a freshly filled args struct of int64
    slots (`values`); returns the XLA_FFI_Error* (or NULL) as int64 and the struct."""
    frame = _entry_alloca_i64(builder, len(values))
    for i, value in enumerate(values):
        builder.store(value, builder.gep(frame, [ir.Constant(_I64, i)]))
    i8p = ir.IntType(8).as_pointer()
    fn_addr = builder.load(
        builder.inttoptr(builder.add(api_addr, ir.Constant(_I64, offset)), _I64.as_pointer()))
    fn = builder.inttoptr(fn_addr, ir.FunctionType(i8p, [i8p]).as_pointer())
    return builder.ptrtoint(builder.call(fn, [builder.bitcast(frame, i8p)]), _I64), frame


def _drop_error(builder, api_addr, err):
    """If err is not NULL: api->XLA_FFI_Error_Destroy(err). Returns err != NULL (i1)."""
    failed = builder.icmp_unsigned("!=", err, ir.Constant(_I64, 0))
    with builder.if_then(failed):
        frame = _entry_alloca_i64(builder, 3)
        for i, value in enumerate((ir.Constant(_I64, 24), ir.Constant(_I64, 0), err)):
            builder.store(value, builder.gep(frame, [ir.Constant(_I64, i)]))
        i8p = ir.IntType(8).as_pointer()
        fn_addr = builder.load(
            builder.inttoptr(builder.add(api_addr, ir.Constant(_I64, 64)), _I64.as_pointer()))
        fn = builder.inttoptr(fn_addr, ir.FunctionType(ir.VoidType(), [i8p]).as_pointer())
        builder.call(fn, [builder.bitcast(frame, i8p)])
    return failed


@intrinsic
def _pool_threads(typingctx, api, ctx):
    """api->XLA_FFI_ThreadPool_NumThreads(ctx); 0 if it fails (no pool)."""

    def codegen(context, builder, signature, args):
        out = _entry_alloca_i64(builder, 1)
        builder.store(ir.Constant(_I64, 0), out)
        err, _ = _api_call(builder, args[0], 144, [
            ir.Constant(_I64, 32), ir.Constant(_I64, 0), args[1], builder.ptrtoint(out, _I64)])
        failed = _drop_error(builder, args[0], err)
        return builder.select(failed, ir.Constant(_I64, 0), builder.load(out))

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def _pool_schedule(typingctx, api, ctx, task, data):
    """api->XLA_FFI_ThreadPool_Schedule(ctx, task, data); True if the task was scheduled."""

    def codegen(context, builder, signature, args):
        err, _ = _api_call(builder, args[0], 136, [
            ir.Constant(_I64, 40), ir.Constant(_I64, 0), args[1], args[2], args[3]])
        return builder.not_(_drop_error(builder, args[0], err))

    return types.boolean(types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic(prefer_literal=True)
def _ffi_error(typingctx, api, code, message):
    """Call api->XLA_FFI_Error_Create({message, code}); returns the XLA_FFI_Error* as int64."""
    if not isinstance(message, types.StringLiteral):
        return None
    text = message.literal_value

    def codegen(context, builder, signature, args):
        api_addr, errc = args[0], args[1]
        i8p = ir.IntType(8).as_pointer()
        cstr = context.insert_const_string(builder.module, text)
        frame = _entry_alloca_i64(builder, 4)  # XLA_FFI_Error_Create_Args (32 bytes)
        slot = [builder.gep(frame, [ir.Constant(_I64, i)]) for i in range(4)]
        builder.store(ir.Constant(_I64, 28), slot[0])  # struct_size
        builder.store(ir.Constant(_I64, 0), slot[1])  # extension_start
        builder.store(builder.ptrtoint(cstr, _I64), slot[2])  # message
        builder.store(ir.Constant(_I64, 0), slot[3])
        builder.store(builder.trunc(errc, _I32), builder.bitcast(slot[3], _I32.as_pointer()))
        fn_addr = builder.load(
            builder.inttoptr(builder.add(api_addr, ir.Constant(_I64, 48)), _I64.as_pointer()))
        fnty = ir.FunctionType(i8p, [i8p])
        fn = builder.inttoptr(fn_addr, fnty.as_pointer())
        err = builder.call(fn, [builder.bitcast(frame, i8p)])
        return builder.ptrtoint(err, _I64)

    return types.int64(types.int64, types.int64, message), codegen


def _host_has_avx() -> bool:
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("avx", False))
    except Exception:  # noqa: BLE001 - unknown: do not emit the instruction
        return False


@intrinsic
def _clear_upper_vector_state(typingctx):
    """vzeroupper on x86 with AVX (a no-op elsewhere).

    XLA's own AVX-512 code can leave the upper halves of the vector registers dirty when it calls
    a handler. Our kernels use 256-bit vectors, and with a dirty upper state every one of their
    vector instructions pays a penalty: measured 1.8x slower kernels. Clearing the state on entry
    costs one instruction."""

    def codegen(context, builder, signature, args):
        if _host_has_avx():
            fn = builder.module.declare_intrinsic("llvm.x86.avx.vzeroupper",
                                                  fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


def _entry_alloca_i64(builder, count):
    """An entry-block alloca of `count` int64 slots."""
    with builder.goto_entry_block():
        return builder.alloca(_I64, size=ir.Constant(_I64, count))


# ---- call-frame decoding --------------------------------------------------------------------


def _njit_helper(fn):
    return njit(cache=True, inline="always")(fn)


@_njit_helper
def _answer_metadata(frame):
    """0: not a metadata query; 1: answered; -1: metadata struct too small."""
    ext = _load_i64(frame + 8)
    if ext == 0 or _load_i32(ext + 8) != EXTENSION_METADATA:
        return 0
    if _load_i64(ext) < METADATA_EXTENSION_STRUCT_SIZE:
        return -1
    meta = _load_i64(ext + 24)
    if _load_i64(meta) < METADATA_STRUCT_SIZE:
        return -1
    _store_i64(meta + 8, API_VERSION_STRUCT_SIZE)  # api_version.struct_size
    _store_i64(meta + 16, 0)  # api_version.extension_start
    _store_i32(meta + 24, FFI_API_MAJOR)
    _store_i32(meta + 28, FFI_API_MINOR)
    _store_i32(meta + 32, 0)  # traits: none
    return 1


@_njit_helper
def _prologue(frame):
    """What a handler does before its kernel. 1: nothing more (the metadata query was answered,
    or a stage other than execute); -1: the metadata struct is too small; 0: run the kernel."""
    meta = _answer_metadata(frame)
    if meta != 0:
        return meta
    return 0 if _load_i32(frame + 32) == STAGE_EXECUTE else 1


@_njit_helper
def _frame_ok(frame, n_args, n_rets, n_attrs):
    """Checks struct sizes, API major version and the numbers of arguments/results/attributes."""
    if _load_i64(frame) < CALL_FRAME_STRUCT_SIZE:
        return False
    api = _load_i64(frame + 16)
    if _load_i32(api + 32) != FFI_API_MAJOR:
        return False
    return (_load_i64(frame + 56) == n_args and _load_i64(frame + 96) == n_rets
            and _load_i64(frame + 136) == n_attrs)


@_njit_helper
def _arg(frame, i):
    return _load_i64(_load_i64(frame + 72) + 8 * i)  # XLA_FFI_Buffer*


@_njit_helper
def _ret(frame, i):
    return _load_i64(_load_i64(frame + 112) + 8 * i)


@_njit_helper
def _f32_buffer_rank(buf):
    """The rank of an XLA_FFI_Buffer if it holds float32, else -1."""
    if _load_i32(buf + 16) != DTYPE_F32:
        return -1
    return _load_i64(buf + 32)


@_njit_helper
def _dim(buf, i):
    return _load_i64(_load_i64(buf + 40) + 8 * i)


@_njit_helper
def _view4(buf):
    """[*lead, pos, head, d] -> a zero-copy [prod(lead), pos, head, d] view (vmap adds lead dims)."""
    rank = _load_i64(buf + 32)
    lead = 1
    for i in range(rank - 3):
        lead *= _dim(buf, i)
    shape = (lead, _dim(buf, rank - 3), _dim(buf, rank - 2), _dim(buf, rank - 1))
    return carray(_voidptr(_load_i64(buf + 24)), shape, np.float32)


@_njit_helper
def _view3(buf):
    """[*lead, head, pos] -> a zero-copy [prod(lead), head, pos] view."""
    rank = _load_i64(buf + 32)
    lead = 1
    for i in range(rank - 2):
        lead *= _dim(buf, i)
    shape = (lead, _dim(buf, rank - 2), _dim(buf, rank - 1))
    return carray(_voidptr(_load_i64(buf + 24)), shape, np.float32)


@_njit_helper
def _view1(buf):
    """Any buffer as a zero-copy 1-D view of all its elements."""
    n = 1
    for i in range(_load_i64(buf + 32)):
        n *= _dim(buf, i)
    return carray(_voidptr(_load_i64(buf + 24)), (n,), np.float32)


@_njit_helper
def _view_packed(buf):
    """[*lead, pos, 3, head, d] (q, k, v packed) -> a zero-copy [prod(lead), pos, 3 * head, d]
    view and the number of heads: q, k, v of head h are at head index h, head + h, 2 head + h."""
    rank = _load_i64(buf + 32)
    lead = 1
    for i in range(rank - 4):
        lead *= _dim(buf, i)
    n_heads = _dim(buf, rank - 2)
    shape = (lead, _dim(buf, rank - 4), 3 * n_heads, _dim(buf, rank - 1))
    return carray(_voidptr(_load_i64(buf + 24)), shape, np.float32), n_heads


@_njit_helper
def _scalar_attr(frame, i):
    """(dtype, address of the value) of the i-th attribute if it is a scalar, else (-1, 0)."""
    if _load_i32(_load_i64(frame + 144) + 4 * i) != ATTR_SCALAR:
        return -1, 0
    scalar = _load_i64(_load_i64(frame + 160) + 8 * i)
    return _load_i32(scalar), _load_i64(scalar + 8)


@_njit_helper
def _all_f32_rank(frame, n_args, n_rets, ranks_args, ranks_rets):
    """All buffers float32 with the given ranks, plus the same number of leading (vmap) dims."""
    extra = _f32_buffer_rank(_arg(frame, 0)) - ranks_args[0]
    if extra < 0:
        return False
    for i in range(n_args):
        if _f32_buffer_rank(_arg(frame, i)) != ranks_args[i] + extra:
            return False
    for i in range(n_rets):
        if _f32_buffer_rank(_ret(frame, i)) != ranks_rets[i] + extra:
            return False
    return True


_RUN = -1  # from _enter: go on and run the kernel (anything else is the handler's return value)


@_njit_helper
def _enter(call_frame, ranks_args, ranks_rets, with_scale):
    """What every handler does first: (frame address, _RUN or the address to return, scale, task).

    Answers XLA's metadata query and the stages other than execute (return NULL); checks the call
    frame (FFI API major version, numbers of arguments, results and attributes), that every
    buffer is float32 with the given rank (plus the same leading vmap dims) and that the
    attributes are the task's address (an int64 scalar) and, if ``with_scale``, the scale (a
    float32 scalar). A failed check returns an XLA_FFI_Error* that says which check failed (XLA
    adds the custom call it came from)."""
    frame = _addr(call_frame)
    api = _load_i64(frame + 16)
    scale = np.float32(0.0)
    status = _prologue(frame)
    if status == 1:
        return frame, 0, scale, 0
    if status == -1:
        return frame, _ffi_error(api, ERR_UNIMPLEMENTED, _METADATA_TOO_SMALL), scale, 0
    n_args, n_rets = len(ranks_args), len(ranks_rets)
    n_attrs = 2 if with_scale else 1
    if not _frame_ok(frame, n_args, n_rets, n_attrs):
        return frame, _ffi_error(api, ERR_INVALID_ARGUMENT,
                                 "tinyinterp attention kernel: unexpected XLA FFI call frame (API"
                                 " version, or the number of arguments, results or attributes)"
                                 ), scale, 0
    if not _all_f32_rank(frame, n_args, n_rets, ranks_args, ranks_rets):
        return frame, _ffi_error(api, ERR_INVALID_ARGUMENT,
                                 "tinyinterp attention kernel: a buffer is not float32 or does not"
                                 " have the expected rank"), scale, 0
    task, n_scales = 0, 0
    for i in range(n_attrs):
        dtype, value = _scalar_attr(frame, i)
        if dtype == DTYPE_F32:
            scale, n_scales = _load_f32(value), n_scales + 1
        elif dtype == DTYPE_S64:
            task = _load_i64(value)
    if task == 0 or n_scales != n_attrs - 1:
        return frame, _ffi_error(api, ERR_INVALID_ARGUMENT,
                                 "tinyinterp attention kernel: the attributes must be 'task' (the"
                                 " int64 address of the target's task) and, for kernels with a"
                                 " scale, 'scale' (a float32 scalar)"), scale, 0
    return frame, _RUN, scale, task


@_njit_helper
def _release(job):
    """Drops one reference to a job record; the last one frees it."""
    if _atomic_add(job + _JOB_REFS, -1) == 1:
        _free(job)


@_njit_helper
def _run_job(frame, task, n_items, scale):
    """Runs `task` on this thread and on the other threads of XLA's pool until all `n_items`
    (batch, head) items are done (see the module docstring). Returns 0, or an XLA_FFI_Error*."""
    api, ctx = _load_i64(frame + 16), _load_i64(frame + 24)
    job = _malloc(_JOB_SIZE)
    if job == 0:
        return _ffi_error(api, ERR_RESOURCE_EXHAUSTED,
                          "tinyinterp attention kernel: out of memory for a 48-byte job record")
    _store_i64(job + _JOB_REFS, 2)  # this handler and its own call of the task
    _store_i64(job + _JOB_NEXT, 0)
    _store_i64(job + _JOB_DONE, 0)
    _store_i64(job + _JOB_ITEMS, n_items)
    _store_i64(job + _JOB_FRAME, frame)
    _store_f32(job + _JOB_SCALE, scale)
    if _load_i64(api) >= API_THREAD_POOL_END and n_items > 1:
        for _ in range(min(_pool_threads(api, ctx) - 1, n_items - 1)):
            _atomic_add(job + _JOB_REFS, 1)
            if not _pool_schedule(api, ctx, task, job):
                _atomic_add(job + _JOB_REFS, -1)  # not scheduled: no reference to drop later
                break
    _call_task(task, job)
    while _atomic_add(job + _JOB_DONE, 0) < n_items:  # items claimed by a running pool thread
        _spin_pause()
    _release(job)
    return 0


@_njit_helper
def _handle(call_frame, ranks_args, ranks_rets, with_scale, items_in_ret, items_index):
    """A whole handler: _enter, then run the target's task on the pool (_run_job) over the work
    items of the [*lead, pos, head, d] buffer that is result (or argument) ``items_index``."""
    frame, status, scale, task = _enter(call_frame, ranks_args, ranks_rets, with_scale)
    if status == _RUN:
        buf = _ret(frame, items_index) if items_in_ret else _arg(frame, items_index)
        status = _run_job(frame, task, _n_items(buf), scale)
    return _voidptr(status)


@_njit_helper
def _task_begin(data):
    """(job, first item claimed) for a task; first is -1 when every item was already claimed
    (the task must then not touch the call frame: its handler may have returned)."""
    job = _addr(data)
    first = _atomic_add(job + _JOB_NEXT, 1)
    if first >= _load_i64(job + _JOB_ITEMS):
        return job, -1
    _clear_upper_vector_state()
    return job, first


@_njit_helper
def _task_end(job, n_done):
    if n_done > 0:
        _atomic_add(job + _JOB_DONE, n_done)
    _release(job)


@_njit_helper
def _job_counter(job):
    """The job's item counter as the 1-element int64 array the kernels claim items from."""
    return carray(_voidptr(job + _JOB_NEXT), (1,), np.int64)


@_njit_helper
def _job_frame(job):
    return _load_i64(job + _JOB_FRAME), _load_f32(job + _JOB_SCALE)


@_njit_helper
def _n_items(buf):
    """The number of work items of a kernel whose (batch, head) slices are those of a
    [*lead, pos, head, d] buffer (kernels/attention.py: work_items)."""
    x = _view4(buf)
    return work_items(x.shape[0], x.shape[2])[0]


# ---- handlers -------------------------------------------------------------------------------


def attention_fwd_handler(call_frame):
    """args q, k, v [b, pos, h, d]; attrs scale (f32), task; rets z [b, pos, h, d],
    lse [b, h, pos], scores and pattern [b, h, q, k]; an empty scores or pattern is not written."""
    return _handle(call_frame, (4, 4, 4), (4, 3, 4, 4), True, True, 0)


def attention_fwd_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, scale = _job_frame(job)
        done = attention_fwd(_view4(_arg(frame, 0)), _view4(_arg(frame, 1)),
                             _view4(_arg(frame, 2)), (0, 0, 0), scale, _view4(_ret(frame, 0)),
                             _view3(_ret(frame, 1)), _view4(_ret(frame, 2)),
                             _view4(_ret(frame, 3)), _job_counter(job), first)
    _task_end(job, done)


def attention_bwd_handler(call_frame):
    """args q, k, v, z, lse, dz; attrs scale (f32), task; rets dq, dk, dv [b, pos, h, d]."""
    return _handle(call_frame, (4, 4, 4, 4, 3, 4), (4, 4, 4), True, False, 3)


def attention_bwd_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, scale = _job_frame(job)
        done = attention_bwd(_view4(_arg(frame, 0)), _view4(_arg(frame, 1)),
                             _view4(_arg(frame, 2)), (0, 0, 0), _view4(_arg(frame, 3)),
                             _view3(_arg(frame, 4)), _view4(_arg(frame, 5)), scale,
                             _view4(_ret(frame, 0)), _view4(_ret(frame, 1)),
                             _view4(_ret(frame, 2)), _job_counter(job), first)
    _task_end(job, done)


def attention_fwd_qkv_handler(call_frame):
    """args qkv [b, pos, 3, h, d]; attrs scale (f32), task; rets z [b, pos, h, d],
    lse [b, h, pos], scores and pattern [b, h, q, k] (each written only if not empty)."""
    return _handle(call_frame, (5,), (4, 3, 4, 4), True, True, 0)


def attention_fwd_qkv_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, scale = _job_frame(job)
        x, n_heads = _view_packed(_arg(frame, 0))
        done = attention_fwd(x, x, x, (0, n_heads, 2 * n_heads), scale, _view4(_ret(frame, 0)),
                             _view3(_ret(frame, 1)), _view4(_ret(frame, 2)),
                             _view4(_ret(frame, 3)), _job_counter(job), first)
    _task_end(job, done)


def attention_bwd_qkv_handler(call_frame):
    """args qkv [b, pos, 3, h, d], z, lse, dz; attrs scale (f32), task; ret dqkv (as qkv)."""
    return _handle(call_frame, (5, 4, 3, 4), (5,), True, False, 1)


def attention_bwd_qkv_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, scale = _job_frame(job)
        x, n_heads = _view_packed(_arg(frame, 0))
        dx, _ = _view_packed(_ret(frame, 0))
        done = attention_bwd(x, x, x, (0, n_heads, 2 * n_heads), _view4(_arg(frame, 1)),
                             _view3(_arg(frame, 2)), _view4(_arg(frame, 3)), scale, dx, dx, dx,
                             _job_counter(job), first)
    _task_end(job, done)


def scores_fwd_handler(call_frame):
    """args q, k [b, pos, h, d]; attrs scale (f32), task; ret scores [b, h, q, k]."""
    return _handle(call_frame, (4, 4), (4,), True, False, 0)


def scores_fwd_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, scale = _job_frame(job)
        done = scores_fwd(_view4(_arg(frame, 0)), _view4(_arg(frame, 1)), scale,
                          _view4(_ret(frame, 0)), _job_counter(job), first)
    _task_end(job, done)


def scores_bwd_handler(call_frame):
    """args q, k, dscores; attrs scale (f32), task; rets dq, dk."""
    return _handle(call_frame, (4, 4, 4), (4, 4), True, False, 0)


def scores_bwd_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, scale = _job_frame(job)
        done = scores_bwd(_view4(_arg(frame, 0)), _view4(_arg(frame, 1)), _view4(_arg(frame, 2)),
                          scale, _view4(_ret(frame, 0)), _view4(_ret(frame, 1)),
                          _job_counter(job), first)
    _task_end(job, done)


def apply_fwd_handler(call_frame):
    """args pattern [b, h, q, k], v [b, pos, h, d]; attr task; ret z [b, pos, h, d]."""
    return _handle(call_frame, (4, 4), (4,), False, False, 1)


def apply_fwd_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, _ = _job_frame(job)
        done = apply_fwd(_view4(_arg(frame, 0)), _view4(_arg(frame, 1)), _view4(_ret(frame, 0)),
                         _job_counter(job), first)
    _task_end(job, done)


def apply_bwd_handler(call_frame):
    """args pattern, v, dz; attr task; rets dpattern, dv."""
    return _handle(call_frame, (4, 4, 4), (4, 4), False, False, 1)


def apply_bwd_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, _ = _job_frame(job)
        done = apply_bwd(_view4(_arg(frame, 0)), _view4(_arg(frame, 1)), _view4(_arg(frame, 2)),
                         _view4(_ret(frame, 0)), _view4(_ret(frame, 1)), _job_counter(job), first)
    _task_end(job, done)


def attention_block_fwd_handler(call_frame):
    """args resid [b, pos, d_model], W [d_model, 3n], bias [3n], W_O [h, d, d_model],
    b_O [d_model], consts [3] (kernels/block.py); attr task; ret out [b, pos, d_model]. Work
    items are the batch rows. (Called with vmap_method="sequential": no leading vmap dims.)"""
    frame, status, _, task = _enter(call_frame, (3, 2, 1, 3, 1, 1), (3,), False)
    if status == _RUN:
        status = _run_job(frame, task, _view3(_arg(frame, 0)).shape[0], np.float32(0.0))
    return _voidptr(status)


def attention_block_fwd_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, _ = _job_frame(job)
        done = attention_block_fwd(
            _view3(_arg(frame, 0)), _view1(_arg(frame, 1)), _view1(_arg(frame, 2)),
            _view3(_arg(frame, 3)), _view1(_arg(frame, 4)), _view1(_arg(frame, 5)),
            _view3(_ret(frame, 0)), _job_counter(job), first)
    _task_end(job, done)


@_njit_helper
def _handle_chunks(call_frame, ranks_args, ranks_rets):
    """A whole handler for the row-chunked kernels (kernels/block.py): _enter, then the task on
    the pool over chunks of CHUNK_ROWS rows of argument 0 [batch, pos, ...]. (Called with
    vmap_method="sequential": no leading vmap dims.)"""
    frame, status, _, task = _enter(call_frame, ranks_args, ranks_rets, False)
    if status == _RUN:
        arg = _arg(frame, 0)
        n_rows = _dim(arg, 0) * _dim(arg, 1)
        status = _run_job(frame, task, (n_rows + CHUNK_ROWS - 1) // CHUNK_ROWS, np.float32(0.0))
    return _voidptr(status)


def qkv_fwd_handler(call_frame):
    """args x [b, pos, d_model], W [d_model, 3n], bias [3n]; attr task; rets q, k, v
    [b, pos, h, d] (kernels/block.py)."""
    return _handle_chunks(call_frame, (3, 2, 1), (4, 4, 4))


def qkv_fwd_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, _ = _job_frame(job)
        x = _view3(_arg(frame, 0))
        n_rows, d_model = x.shape[0] * x.shape[1], x.shape[2]
        q = _view1(_ret(frame, 0))
        n = q.shape[0] // n_rows
        done = qkv_fwd(x.reshape((n_rows, d_model)),
                       _view1(_arg(frame, 1)).reshape((d_model, 3 * n)),
                       _view1(_arg(frame, 2)), q.reshape((n_rows, n)),
                       _view1(_ret(frame, 1)).reshape((n_rows, n)),
                       _view1(_ret(frame, 2)).reshape((n_rows, n)), _job_counter(job), first)
    _task_end(job, done)


def attention_out_fwd_handler(call_frame):
    """args z [b, pos, h, d], W_O [h, d, d_model], b_O [d_model]; attr task; rets result
    [b, pos, h, d_model], out [b, pos, d_model] (kernels/block.py)."""
    return _handle_chunks(call_frame, (4, 3, 1), (4, 3))


def attention_out_fwd_task(data):
    job, first = _task_begin(data)
    done = 0
    if first >= 0:
        frame, _ = _job_frame(job)
        z = _view4(_arg(frame, 0))
        n_rows, n_heads = z.shape[0] * z.shape[1], z.shape[2]
        W_O = _view3(_arg(frame, 1))
        d_model = W_O.shape[2]
        done = attention_out_fwd(
            z.reshape((n_rows, n_heads, z.shape[3])), W_O, _view1(_arg(frame, 2)),
            _view1(_ret(frame, 0)).reshape((n_rows, n_heads, d_model)),
            _view1(_ret(frame, 1)).reshape((n_rows, d_model)), _job_counter(job), first)
    _task_end(job, done)


# target name -> (handler, task). Both are compiled (or loaded from Numba's cache) on first use
# only: compiling a task links a whole kernel into it, ~3-5 s each, and a training run needs 2.
_HANDLERS = {
    "tinyinterp_attention_fwd": (attention_fwd_handler, attention_fwd_task),
    "tinyinterp_attention_fwd_qkv": (attention_fwd_qkv_handler, attention_fwd_qkv_task),
    "tinyinterp_attention_bwd_qkv": (attention_bwd_qkv_handler, attention_bwd_qkv_task),
    "tinyinterp_attention_bwd": (attention_bwd_handler, attention_bwd_task),
    "tinyinterp_scores_fwd": (scores_fwd_handler, scores_fwd_task),
    "tinyinterp_scores_bwd": (scores_bwd_handler, scores_bwd_task),
    "tinyinterp_apply_fwd": (apply_fwd_handler, apply_fwd_task),
    "tinyinterp_apply_bwd": (apply_bwd_handler, apply_bwd_task),
    "tinyinterp_attention_block_fwd": (attention_block_fwd_handler, attention_block_fwd_task),
    "tinyinterp_attention_out_fwd": (attention_out_fwd_handler, attention_out_fwd_task),
    "tinyinterp_qkv_fwd": (qkv_fwd_handler, qkv_fwd_task),
}
TARGETS = tuple(_HANDLERS)
_compiled: dict = {}
_lock = threading.Lock()


def _compile(target: str):
    with _lock:
        if target not in _compiled:
            py_handler, py_task = _HANDLERS[target]
            _compiled[target] = (cfunc(HANDLER_SIGNATURE, nopython=True, cache=True)(py_handler),
                                 cfunc(TASK_SIGNATURE, nopython=True, cache=True)(py_task))
        return _compiled[target]


def handler(target: str):
    """The compiled @cfunc handler of an FFI target (its ``.address`` is the C function pointer
    to register); compiled, or loaded from Numba's cache, on the first call for that target."""
    return _compile(target)[0]


def task_address(target: str) -> int:
    """The address of the target's task, which every call must pass as the int64 attribute
    ``task`` (see the module docstring)."""
    return _compile(target)[1].address
