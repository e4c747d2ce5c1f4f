"""The XLA typed-FFI binding of the kernels, as Numba ``@cfunc``s (no JAX import).

Three kinds of C functions, all compiled in nopython mode (so they run without the GIL):

  * one **handler**, ``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)``, registered with XLA under
    every target name of ``kernels/targets.py`` (``tinyinterp/fast/ffi.py`` does the
    registering). It answers XLA's metadata query, checks the call frame and the attributes,
    asks the call's kernel entry for the number of work items, and runs the generic task on
    XLA's thread pool until every item is done;
  * one generic **task**, ``void task(void* job)``, scheduled on XLA's pool: it claims an item and
    calls the kernel entry with it;
  * one **kernel entry** per target, ``int64 entry(void* frame, float scale, void* counter,
    int64 first)``, the only per-kernel code: it wraps the call's argument and result buffers
    as numpy arrays without copying (``numba.carray`` on XLA's pointers) and calls the kernel
    module's ``FfiKernel.run`` (kernels/work.py), which runs item ``first`` and every item it
    then claims from ``counter``, and returns how many it ran. Called with ``first == CHECK``
    it runs nothing and returns the number of work items of the call (``FfiKernel.items``), or
    ``WRONG_FRAME`` / ``WRONG_BUFFERS`` if the numbers of arguments, results and attributes or
    the buffers' dtypes and ranks are not what the kernel takes.

Why one entry per kernel, and not one task for all: a ``@cfunc`` is compiled into one native
function that contains (inlines or statically links) every Numba function it calls, and Numba can
call a kernel only by such a static call (its array arguments have Numba's own calling
convention, not a C one). A single task that could run any kernel would contain all eleven, so
the first run of a process would compile (or load from the cache) every kernel, ~3-5 s each,
where a training run needs two. Generating the entries from one template by a closure does not
work either: Numba keys a cached closure on a pickle of the objects it closes over, and the
pickle of a compiled kernel differs between processes, so every process recompiled them
(measured on this machine with Numba 0.68.1). So each entry is a one-line module-level function
calling the one template ``_entry`` with its kernel's description, and the call passes the
entry's index as an attribute.

Attributes of every call (found by name, in any order): ``target``, the int64 index of the
target in TARGETS (``attributes(target)``), and, for the kernels that take one, ``scale``
(float32). The handler finds the target's entry and the task in the address table
(``_ADDRESS_TABLE``, filled as each is compiled in this process) through a linker symbol resolved
whenever Numba links the handler: no address from another process is held by a cached handler,
and no address of this one appears in a program, so a program that calls the kernels is the same
in every process and JAX's persistent compilation cache can find it.

The call frame, XLA's API struct and the structs passed to its functions are read and written at
the offsets named in ``kernels/xla_ffi_abi.py`` (checked against jax's header by
tests/test_ffi_abi.py). The handshake: when XLA registers a handler it calls it once with a call
frame whose extension chain holds an ``XLA_FFI_Metadata_Extension``; the handler answers with the
FFI API version it implements (0.3) and its traits (0) and returns NULL. Errors are reported by
calling ``api->XLA_FFI_Error_Create`` and returning the error it makes; NULL means success.

Threads: the kernels are serial; the handler runs the task on XLA's own intra-op thread pool
(``api->XLA_FFI_ThreadPool_Schedule``, API 0.3), the pool that runs XLA's other work, so no second
pool competes with it for the cores. The handler puts a small job record on the heap (malloc):
a reference count, the shared item counter, the number of items done, the number of items, the
call frame, the entry and the scale. It schedules one task per other pool thread, runs the task
itself, then waits until every item is done (a spin of at most one item's time: it waits only
for items that a running thread has claimed, never for a task still in the queue, so two
handlers running at once cannot deadlock). A task that starts after all items were claimed finds
nothing to do and only drops its reference; the last reference frees the record. Tasks read the
call frame only after claiming an item, i.e. while the handler is still waiting for it. Without a
pool (or if scheduling fails), the handler's own call does every item.

Caching: the handler, the task and each entry are compiled on first use with ``cache=True``.
Numba checks only the source file of the function it caches, so an entry here would keep an
edited kernel's old code: the package's ``__init__`` drops its Numba cache files whenever any
kernel source changed (kernels/__init__.py).
"""

from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import attention, block
from . import xla_ffi_abi as abi
from .targets import (
    APPLY_BWD,
    APPLY_FWD,
    ATTENTION_BWD,
    ATTENTION_BWD_PACKED,
    ATTENTION_FWD,
    ATTENTION_FWD_PACKED,
    ATTENTION_OUT_FWD,
    KERNELS,
    QKV_FWD,
    SCORES_BWD,
    SCORES_FWD,
    SUBLAYER_FWD,
    TARGETS,
)

HANDLER_SIGNATURE = types.voidptr(types.voidptr)
TASK_SIGNATURE = types.void(types.voidptr)
ENTRY_SIGNATURE = types.int64(types.voidptr, types.float32, types.voidptr, types.int64)

# An entry called with first == CHECK returns the number of work items, or one of these.
CHECK = -1
WRONG_FRAME = -2
WRONG_BUFFERS = -3

# The job record a handler shares with its tasks: int64 slots (the scale a float32 in the last).
_JOB_REFS, _JOB_NEXT, _JOB_DONE, _JOB_ITEMS, _JOB_FRAME, _JOB_ENTRY, _JOB_SCALE = range(0, 56, 8)
_JOB_SIZE = 56

# The attribute names, as byte tuples (Numba freezes global tuples into the code).
_TARGET_NAME, _SCALE_NAME = tuple(b"target"), tuple(b"scale")

# The address table: slot i holds the address of target i's kernel entry (TARGETS' order), the
# last slot the generic task's; 0 until compiled in this process. The handler reads it through
# the linker symbol ADDRESS_TABLE_SYMBOL, resolved by name whenever Numba links the handler
# (compiled or loaded from its cache), so neither the handler nor a call holds an address from
# another process, and the calls' attributes (a target index) are the same in every process: JAX's
# persistent compilation cache finds the programs that call the kernels.
ADDRESS_TABLE_SYMBOL = "tinyinterp_ffi_address_table"
_N_SLOTS = len(TARGETS) + 1
_TASK_SLOT = len(TARGETS)
_ADDRESS_TABLE = np.zeros(_N_SLOTS, np.int64)

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
def _table_address(typingctx, slot):
    """The int64 in slot ``slot`` of the address table (ADDRESS_TABLE_SYMBOL, an external global
    resolved at link time); the caller keeps ``slot`` within [0, _N_SLOTS)."""

    def codegen(context, builder, signature, args):
        table_type = ir.ArrayType(_I64, _N_SLOTS)
        table = builder.module.globals.get(ADDRESS_TABLE_SYMBOL)
        if table is None:
            table = ir.GlobalVariable(builder.module, table_type, ADDRESS_TABLE_SYMBOL)
            table.linkage = "external"
        return builder.load(builder.gep(table, [ir.Constant(_I32, 0), args[0]]))

    return types.int64(types.int64), codegen


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
def _load_u8(typingctx, addr):
    def codegen(context, builder, signature, args):
        byte = builder.load(builder.inttoptr(args[0], ir.IntType(8).as_pointer()))
        return builder.zext(byte, _I64)

    return types.int64(types.int64), codegen


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




@intrinsic
def _call_entry(typingctx, fn_addr, frame, scale, counter, first):
    """Calls the C function int64 entry(void* frame, float scale, void* counter, int64 first) at
    fn_addr (a kernel entry, see the module docstring); returns its result."""

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(_I64, [i8p, ir.FloatType(), i8p, _I64])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, [builder.inttoptr(args[1], i8p), args[2],
                                 builder.inttoptr(args[3], i8p), args[4]])

    return types.int64(types.int64, types.int64, types.float32, types.int64, types.int64), codegen


# ---- calling the XLA_FFI_Api (its functions take one struct of arguments) -------------------


def _entry_alloca_i64(builder, count):
    """An entry-block alloca of `count` int64 slots."""
    with builder.goto_entry_block():
        return builder.alloca(_I64, size=ir.Constant(_I64, count))


def _args_struct(builder, struct_size, fields):
    """A zeroed args struct on the stack: struct_size at STRUCT_SIZE, extension_start NULL, and
    each (offset, value) of ``fields`` (an i64 or i32 IR value, stored with its own width)."""
    slots = _entry_alloca_i64(builder, (struct_size + 7) // 8)
    for i in range((struct_size + 7) // 8):
        builder.store(ir.Constant(_I64, 0), builder.gep(slots, [ir.Constant(_I64, i)]))
    base = builder.bitcast(slots, ir.IntType(8).as_pointer())
    for offset, value in ((abi.STRUCT_SIZE, ir.Constant(_I64, struct_size)), *fields):
        ptr = builder.gep(base, [ir.Constant(_I64, offset)])
        builder.store(value, builder.bitcast(ptr, value.type.as_pointer()))
    return base


def _api_fn(builder, api_addr, offset, fnty):
    """The XLA_FFI_Api function pointer at ``offset`` (abi.API_*), as a callable IR value."""
    slot = builder.inttoptr(builder.add(api_addr, ir.Constant(_I64, offset)), _I64.as_pointer())
    return builder.inttoptr(builder.load(slot), fnty.as_pointer())


_I8P = ir.IntType(8).as_pointer()
_RETURNS_ERROR = ir.FunctionType(_I8P, [_I8P])  # XLA_FFI_Error* fn(XLA_FFI_..._Args*)


def _drop_error(builder, api_addr, err):
    """If err is not NULL: api->XLA_FFI_Error_Destroy(err). Returns err != NULL (i1)."""
    failed = builder.icmp_unsigned("!=", err, ir.Constant(_I64, 0))
    with builder.if_then(failed):
        args = _args_struct(builder, abi.ERROR_DESTROY_ARGS_STRUCT_SIZE,
                            [(abi.ERROR_DESTROY_ARGS_ERROR, err)])
        fn = _api_fn(builder, api_addr, abi.API_ERROR_DESTROY,
                     ir.FunctionType(ir.VoidType(), [_I8P]))
        builder.call(fn, [args])
    return failed


@intrinsic
def _pool_threads(typingctx, api, ctx):
    """api->XLA_FFI_ThreadPool_NumThreads(ctx); 0 if it fails (no pool)."""

    def codegen(context, builder, signature, args):
        out = _entry_alloca_i64(builder, 1)
        builder.store(ir.Constant(_I64, 0), out)
        call_args = _args_struct(builder, abi.NUM_THREADS_ARGS_STRUCT_SIZE, [
            (abi.NUM_THREADS_ARGS_CTX, args[1]),
            (abi.NUM_THREADS_ARGS_NUM_THREADS, builder.ptrtoint(out, _I64))])
        fn = _api_fn(builder, args[0], abi.API_THREAD_POOL_NUM_THREADS, _RETURNS_ERROR)
        err = builder.ptrtoint(builder.call(fn, [call_args]), _I64)
        failed = _drop_error(builder, args[0], err)
        return builder.select(failed, ir.Constant(_I64, 0), builder.load(out))

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def _pool_schedule(typingctx, api, ctx, task, data):
    """api->XLA_FFI_ThreadPool_Schedule(ctx, task, data); True if the task was scheduled."""

    def codegen(context, builder, signature, args):
        call_args = _args_struct(builder, abi.SCHEDULE_ARGS_STRUCT_SIZE, [
            (abi.SCHEDULE_ARGS_CTX, args[1]), (abi.SCHEDULE_ARGS_TASK, args[2]),
            (abi.SCHEDULE_ARGS_DATA, args[3])])
        fn = _api_fn(builder, args[0], abi.API_THREAD_POOL_SCHEDULE, _RETURNS_ERROR)
        err = builder.ptrtoint(builder.call(fn, [call_args]), _I64)
        return builder.not_(_drop_error(builder, args[0], err))

    return types.boolean(types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic(prefer_literal=True)
def _ffi_error(typingctx, api, code, message):
    """api->XLA_FFI_Error_Create({message, code}); returns the XLA_FFI_Error* as int64."""
    if not isinstance(message, types.StringLiteral):
        return None
    text = message.literal_value

    def codegen(context, builder, signature, args):
        cstr = context.insert_const_string(builder.module, text)
        call_args = _args_struct(builder, abi.ERROR_CREATE_ARGS_STRUCT_SIZE, [
            (abi.ERROR_CREATE_ARGS_MESSAGE, builder.ptrtoint(cstr, _I64)),
            (abi.ERROR_CREATE_ARGS_ERRC, builder.trunc(args[1], _I32))])
        fn = _api_fn(builder, args[0], abi.API_ERROR_CREATE, _RETURNS_ERROR)
        return builder.ptrtoint(builder.call(fn, [call_args]), _I64)

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

    XLA's own AVX-512 code can leave the upper halves of the vector registers dirty when it hands
    work to a handler or a pool thread; the kernels' vector code (kernels/simd.py: 512-bit
    registers on AVX-512 CPUs such as this machine's, pairs of 256-bit ones on AVX2-only CPUs)
    ran 1.8x slower under XLA than called directly until the tasks cleared that state first.
    Clearing it costs one instruction."""

    def codegen(context, builder, signature, args):
        if _host_has_avx():
            fn = builder.module.declare_intrinsic("llvm.x86.avx.vzeroupper",
                                                  fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


# ---- call-frame decoding ----------------------------------------------------------------------


def _njit_helper(fn):
    return njit(cache=True, inline="always")(fn)


@_njit_helper
def _answer_metadata(frame):
    """0: not a metadata query; 1: answered; -1: metadata struct too small."""
    ext = _load_i64(frame + abi.EXTENSION_START)
    if ext == 0 or _load_i32(ext + abi.EXTENSION_TYPE) != abi.EXTENSION_METADATA:
        return 0
    if _load_i64(ext + abi.STRUCT_SIZE) < abi.METADATA_EXTENSION_STRUCT_SIZE:
        return -1
    meta = _load_i64(ext + abi.METADATA_EXTENSION_METADATA)
    if _load_i64(meta + abi.STRUCT_SIZE) < abi.METADATA_STRUCT_SIZE:
        return -1
    _store_i64(meta + abi.METADATA_API_VERSION, abi.API_VERSION_STRUCT_SIZE)
    _store_i64(meta + abi.METADATA_API_VERSION_EXTENSION_START, 0)
    _store_i32(meta + abi.METADATA_API_MAJOR, abi.FFI_API_MAJOR)
    _store_i32(meta + abi.METADATA_API_MINOR, abi.FFI_API_MINOR)
    _store_i32(meta + abi.METADATA_TRAITS, 0)  # traits: none
    return 1


@_njit_helper
def _buffer(frame, i, n_args):
    """The XLA_FFI_Buffer* of buffer i of args + rets."""
    if i < n_args:
        return _load_i64(_load_i64(frame + abi.CALL_FRAME_ARGS) + abi.POINTER_BYTES * i)
    return _load_i64(_load_i64(frame + abi.CALL_FRAME_RETS) + abi.POINTER_BYTES * (i - n_args))


@_njit_helper
def _dims(buf):
    """A buffer's dims as a zero-copy int64 array."""
    return carray(_voidptr(_load_i64(buf + abi.BUFFER_DIMS)), (_load_i64(buf + abi.BUFFER_RANK),),
                  np.int64)


@_njit_helper
def _flat(buf):
    """A buffer's elements as a zero-copy 1-D float32 array."""
    dims = _dims(buf)
    n = 1
    for i in range(dims.shape[0]):
        n *= dims[i]
    return carray(_voidptr(_load_i64(buf + abi.BUFFER_DATA)), (n,), np.float32)


@_njit_helper
def _f32_rank(buf):
    """The rank of a buffer if it holds float32, else -1."""
    if _load_i32(buf + abi.BUFFER_DTYPE) != abi.DTYPE_F32:
        return -1
    return _load_i64(buf + abi.BUFFER_RANK)


@_njit_helper
def _name_is(span, name):
    """Whether the XLA_FFI_ByteSpan at ``span`` holds ``name`` (a tuple of byte values)."""
    if _load_i64(span + abi.BYTE_SPAN_LEN) != len(name):
        return False
    ptr = _load_i64(span + abi.BYTE_SPAN_PTR)
    for i in range(len(name)):
        if _load_u8(ptr + i) != name[i]:
            return False
    return True


@_njit_helper
def _attributes(frame):
    """(ok, entry, task, scale) from the call's attributes: 'target' (an int64 scalar, the target's
    index in TARGETS, whose entry and the task are read from the address table) and an optional
    'scale' (a float32 scalar); ok is False for anything else, and for a target whose entry or the
    task is not compiled in this process (a zero address)."""
    slot, scale, ok = -1, np.float32(0.0), True
    kinds = _load_i64(frame + abi.CALL_FRAME_ATTR_TYPES)
    names = _load_i64(frame + abi.CALL_FRAME_ATTR_NAMES)
    attrs = _load_i64(frame + abi.CALL_FRAME_ATTRS)
    for i in range(_load_i64(frame + abi.CALL_FRAME_ATTRS_SIZE)):
        if _load_i32(kinds + abi.ENUM_BYTES * i) != abi.ATTR_SCALAR:
            ok = False
            continue
        span = _load_i64(names + abi.POINTER_BYTES * i)
        scalar = _load_i64(attrs + abi.POINTER_BYTES * i)
        dtype, value = _load_i32(scalar + abi.SCALAR_DTYPE), _load_i64(scalar + abi.SCALAR_VALUE)
        if dtype == abi.DTYPE_S64 and _name_is(span, _TARGET_NAME):
            slot = _load_i64(value)
        elif dtype == abi.DTYPE_F32 and _name_is(span, _SCALE_NAME):
            scale = _load_f32(value)
        else:
            ok = False
    if not (0 <= slot < _TASK_SLOT):
        return False, 0, 0, scale
    entry_addr, task_addr = _table_address(slot), _table_address(_TASK_SLOT)
    return ok and entry_addr != 0 and task_addr != 0, entry_addr, task_addr, scale


# ---- the handler and the task -------------------------------------------------------------------


@_njit_helper
def _release(job):
    """Drops one reference to a job record; the last one frees it."""
    if _atomic_add(job + _JOB_REFS, -1) == 1:
        _free(job)


@_njit_helper
def _run_job(frame, task, entry, n_items, scale):
    """Runs `task` on this thread and on the other threads of XLA's pool until all `n_items`
    work items are done (see the module docstring). Returns 0, or an XLA_FFI_Error*."""
    api, ctx = _load_i64(frame + abi.CALL_FRAME_API), _load_i64(frame + abi.CALL_FRAME_CTX)
    job = _malloc(_JOB_SIZE)
    if job == 0:
        return _ffi_error(api, abi.ERR_RESOURCE_EXHAUSTED,
                          "tinyinterp FFI kernel: out of memory for a 56-byte job record")
    _store_i64(job + _JOB_REFS, 2)  # this handler and its own call of the task
    _store_i64(job + _JOB_NEXT, 0)
    _store_i64(job + _JOB_DONE, 0)
    _store_i64(job + _JOB_ITEMS, n_items)
    _store_i64(job + _JOB_FRAME, frame)
    _store_i64(job + _JOB_ENTRY, entry)
    _store_f32(job + _JOB_SCALE, scale)
    if _load_i64(api + abi.STRUCT_SIZE) >= abi.API_THREAD_POOL_END and n_items > 1:
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


def handler(call_frame):
    """The one XLA FFI handler of every target (module docstring). A failed check returns an
    XLA_FFI_Error* that says which check failed (XLA adds the custom call it came from)."""
    frame = _addr(call_frame)
    api = _load_i64(frame + abi.CALL_FRAME_API)
    meta = _answer_metadata(frame)
    if meta == 1 or (meta == 0 and _load_i32(frame + abi.CALL_FRAME_STAGE) != abi.STAGE_EXECUTE):
        return _voidptr(0)
    if meta == -1:
        return _voidptr(_ffi_error(api, abi.ERR_UNIMPLEMENTED,
                                   "tinyinterp FFI kernel: XLA FFI metadata struct too small"))
    if (_load_i64(frame + abi.STRUCT_SIZE) < abi.CALL_FRAME_STRUCT_SIZE
            or _load_i32(api + abi.API_MAJOR) != abi.FFI_API_MAJOR):
        return _voidptr(_ffi_error(api, abi.ERR_INVALID_ARGUMENT,
                                   "tinyinterp FFI kernel: unexpected XLA FFI call frame (struct"
                                   " size or API version)"))
    ok, entry_addr, task_addr, scale = _attributes(frame)
    if not ok:
        return _voidptr(_ffi_error(api, abi.ERR_INVALID_ARGUMENT,
                                   "tinyinterp FFI kernel: the attributes must be 'target' (the"
                                   " int64 index of kernels.ffi.attributes(target), whose entry is"
                                   " compiled in this process) and, for kernels with a scale,"
                                   " 'scale' (a float32 scalar)"))
    n_items = _call_entry(entry_addr, frame, scale, 0, CHECK)
    if n_items == WRONG_FRAME:
        return _voidptr(_ffi_error(api, abi.ERR_INVALID_ARGUMENT,
                                   "tinyinterp FFI kernel: unexpected XLA FFI call frame (the"
                                   " number of arguments, results or attributes)"))
    if n_items < 0:
        return _voidptr(_ffi_error(api, abi.ERR_INVALID_ARGUMENT,
                                   "tinyinterp FFI kernel: a buffer is not float32 or does not"
                                   " have the expected rank"))
    if n_items == 0:
        return _voidptr(0)
    return _voidptr(_run_job(frame, task_addr, entry_addr, n_items, scale))


def task(data):
    """The generic task (module docstring): claims an item of the job and, if there was one left,
    runs the job's kernel entry from it."""
    job = _addr(data)
    first = _atomic_add(job + _JOB_NEXT, 1)
    done = 0
    if first < _load_i64(job + _JOB_ITEMS):  # else the handler may have returned: touch nothing
        _clear_upper_vector_state()
        done = _call_entry(_load_i64(job + _JOB_ENTRY), _load_i64(job + _JOB_FRAME),
                           _load_f32(job + _JOB_SCALE), job + _JOB_NEXT, first)
        _atomic_add(job + _JOB_DONE, done)
    _release(job)


# ---- the kernel entries: one template, one line per kernel -------------------------------------


@_njit_helper
def _check(frame, kernel):
    """CHECK mode of an entry: the number of work items of the call, WRONG_FRAME or WRONG_BUFFERS."""
    n_args, n_rets = len(kernel.args), len(kernel.rets)
    if (_load_i64(frame + abi.CALL_FRAME_ARGS_SIZE) != n_args
            or _load_i64(frame + abi.CALL_FRAME_RETS_SIZE) != n_rets
            or _load_i64(frame + abi.CALL_FRAME_ATTRS_SIZE) != 1 + int(kernel.scale)):
        return WRONG_FRAME
    extra = _f32_rank(_buffer(frame, 0, n_args)) - kernel.args[0]  # leading (vmap) dims
    if extra < 0 or (extra > 0 and not kernel.batched):
        return WRONG_BUFFERS
    for i in range(n_args):
        if _f32_rank(_buffer(frame, i, n_args)) != kernel.args[i] + extra:
            return WRONG_BUFFERS
    for i in range(n_rets):
        if _f32_rank(_buffer(frame, n_args + i, n_args)) != kernel.rets[i] + extra:
            return WRONG_BUFFERS
    return kernel.items(_dims(_buffer(frame, kernel.split, n_args)))


@_njit_helper
def _flat_or_empty(frame, i, n_args, n):
    """Buffer i of args + rets as a flat float32 array (_flat), or an empty one if i >= n."""
    if i < n:
        return _flat(_buffer(frame, i, n_args))
    return carray(_voidptr(0), (0,), np.float32)


@_njit_helper
def _dims_or_empty(frame, i, n_args, n):
    """Buffer i's dims (_dims), or an empty array if i >= n."""
    if i < n:
        return _dims(_buffer(frame, i, n_args))
    return carray(_voidptr(0), (0,), np.int64)


MAX_BUFFERS = 9  # the most arguments + results of any kernel (attention's backward)


@_njit_helper
def _entry(frame_ptr, scale, counter, first, kernel):
    """The template of every kernel entry (module docstring) for the FfiKernel ``kernel``. The
    buffers go to ``kernel.run`` as tuples of MAX_BUFFERS views (empty past the kernel's own):
    tuples live on the stack, where lists would be a heap allocation per task."""
    frame = _addr(frame_ptr)
    if first == CHECK:
        return _check(frame, kernel)
    n_args, n = len(kernel.args), len(kernel.args) + len(kernel.rets)
    bufs = (_flat_or_empty(frame, 0, n_args, n), _flat_or_empty(frame, 1, n_args, n),
            _flat_or_empty(frame, 2, n_args, n), _flat_or_empty(frame, 3, n_args, n),
            _flat_or_empty(frame, 4, n_args, n), _flat_or_empty(frame, 5, n_args, n),
            _flat_or_empty(frame, 6, n_args, n), _flat_or_empty(frame, 7, n_args, n),
            _flat_or_empty(frame, 8, n_args, n))
    shapes = (_dims_or_empty(frame, 0, n_args, n), _dims_or_empty(frame, 1, n_args, n),
              _dims_or_empty(frame, 2, n_args, n), _dims_or_empty(frame, 3, n_args, n),
              _dims_or_empty(frame, 4, n_args, n), _dims_or_empty(frame, 5, n_args, n),
              _dims_or_empty(frame, 6, n_args, n), _dims_or_empty(frame, 7, n_args, n),
              _dims_or_empty(frame, 8, n_args, n))
    return kernel.run(bufs, shapes, scale, carray(counter, (1,), np.int64), first)


def attention_fwd_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, attention.ATTENTION_FWD)


def attention_bwd_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, attention.ATTENTION_BWD)


def attention_fwd_packed_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, attention.ATTENTION_FWD_PACKED)


def attention_bwd_packed_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, attention.ATTENTION_BWD_PACKED)


def scores_fwd_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, attention.SCORES_FWD)


def scores_bwd_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, attention.SCORES_BWD)


def apply_fwd_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, attention.APPLY_FWD)


def apply_bwd_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, attention.APPLY_BWD)


def sublayer_fwd_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, block.SUBLAYER_FWD)


def attention_out_fwd_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, block.ATTENTION_OUT_FWD)


def qkv_fwd_entry(frame, scale, counter, first):
    return _entry(frame, scale, counter, first, block.QKV_FWD)


# target (kernels/targets.py) -> its entry. Each is compiled (or loaded from Numba's cache) on its
# first use only: compiling an entry links a whole kernel into it, ~3-5 s each.
ENTRIES = {
    ATTENTION_FWD: attention_fwd_entry,
    ATTENTION_BWD: attention_bwd_entry,
    ATTENTION_FWD_PACKED: attention_fwd_packed_entry,
    ATTENTION_BWD_PACKED: attention_bwd_packed_entry,
    SCORES_FWD: scores_fwd_entry,
    SCORES_BWD: scores_bwd_entry,
    APPLY_FWD: apply_fwd_entry,
    APPLY_BWD: apply_bwd_entry,
    SUBLAYER_FWD: sublayer_fwd_entry,
    ATTENTION_OUT_FWD: attention_out_fwd_entry,
    QKV_FWD: qkv_fwd_entry,
}
assert tuple(ENTRIES) == TARGETS, "kernels/targets.py and ENTRIES must list the same targets"
assert all(len(k.args) + len(k.rets) <= MAX_BUFFERS for k in (
    getattr({"attention": attention, "block": block}[module], name)
    for module, name in KERNELS.values())), "raise MAX_BUFFERS (and _entry's tuples)"

_compiled: dict = {}
_lock = threading.Lock()


def _compiled_cfunc(key, fn, signature):
    with _lock:
        if not _compiled:  # before the handler is linked: its one external symbol
            from llvmlite import binding

            binding.add_symbol(ADDRESS_TABLE_SYMBOL, _ADDRESS_TABLE.ctypes.data)
        if key not in _compiled:
            _compiled[key] = cfunc(signature, nopython=True, cache=True)(fn)
            slot = TARGETS.index(key) if key in ENTRIES else _TASK_SLOT if key == "task" else None
            if slot is not None:
                _ADDRESS_TABLE[slot] = _compiled[key].address
        return _compiled[key]


def handler_address() -> int:
    """The address of the one handler (the C function pointer to register for every target)."""
    return _compiled_cfunc("handler", handler, HANDLER_SIGNATURE).address


def entry_address(target: str) -> int:
    """The address of a target's kernel entry (compiled, or loaded from Numba's cache, on the
    first call for that target)."""
    if target not in ENTRIES:
        raise ValueError(f"unknown FFI target {target!r}; known: {TARGETS}")
    return _compiled_cfunc(target, ENTRIES[target], ENTRY_SIGNATURE).address


def attributes(target: str) -> dict[str, np.int64]:
    """The attributes every call of ``target`` passes besides its ``scale``: ``target``, its index
    in TARGETS (the same in every process). Compiles (or loads) its kernel entry and the generic
    task first and puts their addresses in the address table, where the handler finds them."""
    entry_address(target)
    _compiled_cfunc("task", task, TASK_SIGNATURE)
    return {"target": np.int64(TARGETS.index(target))}
