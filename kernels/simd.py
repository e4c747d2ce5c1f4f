"""Explicit 16-lane float32 vectors for Numba kernels.

Numba has no SIMD type, and LLVM's auto-vectoriser handles the short loops of attention on small
heads badly: a loop over a few dozen keys spends much of its time in scalar remainders and
horizontal reductions, and accumulators that it cannot prove unaliased go through memory on every
step. These intrinsics give kernels a value type ``f32v`` that lowers to LLVM's ``<16 x float>``,
so tiles of scores and accumulators stay in registers and every loop has a whole number of
vectors.

Width: ``LANES`` = 16 floats, one AVX-512 register; where the CPU has narrower vectors LLVM
legalises one ``f32v`` into two AVX or four SSE/NEON registers, so the code is portable (the tile
shapes, not the instruction set, fix the width). The kernels' shape rules follow from it: the
fused sublayer needs d_model and head_index * d_head to be multiples of 16
(``tinyinterp.fast.plan.LANES``). (LLVM's own vectoriser chooses a width per loop and CPU: on
this machine's AMD EPYC (Zen 4, AVX-512) it used 16-lane zmm vectors for a plain dot-product
loop as well.)

Floating-point semantics: the primitives emit plain LLVM instructions without fast-math flags,
but every kernel that uses them is compiled with ``fastmath=FASTMATH`` and Numba's fast-math pass
adds those flags to every float add, subtract, multiply, divide and compare in the kernel, the
vector ones from here included (checked in the LLVM IR of a kernel). So inside the kernels:
``contract`` lets LLVM fuse a multiply and an add (``vfma`` is ``llvm.fmuladd``: fused where the
CPU has FMA), ``reassoc`` lets it regroup sums (``vhsum`` emits a fixed pairwise tree, which
the compiler may regroup), ``nsz``, ``arcp`` (x / y may become x * (1 / y)) and ``afn``
(approximate library functions). Never ``nnan`` or ``ninf``: NaN and inf propagate as in the XLA
reference. Results are deterministic: a compiled kernel is a fixed sequence of instructions, so
the same inputs give the same bits on every run and for any number of threads, though not
necessarily the bits of an unfused, unreassociated evaluation (the tests compare to float64
references with float32 tolerances).

Loads and stores take a 1-D contiguous float32 array and an element offset; the caller guarantees
that ``offset + LANES <= len(array)`` (kernels pad their scratch buffers to whole vectors). With
the environment variable TINYINTERP_KERNEL_BOUNDS=1 (a debugging aid, with NUMBA_CACHE_DIR set to
a separate folder so that no unchecked cached kernel is reused) every vector load, store and
broadcast checks this and traps (SIGILL, at the faulty access) when it does not hold.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

LANES = 16

# The fast-math flags every kernel is compiled with (see the module docstring). No 'nnan'/'ninf':
# NaN and inf must propagate exactly as in the XLA reference.
FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_VEC = ir.VectorType(_F32, LANES)
_IVEC = ir.VectorType(_I32, LANES)


class F32Vec(types.Type):
    """Numba type of a LANES-lane float32 vector (an SSA value, normally held in registers)."""

    def __init__(self):
        super().__init__(name=f"f32x{LANES}")


f32v = F32Vec()


@register_model(F32Vec)
class _F32VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VEC)


_CHECK_BOUNDS = os.environ.get("TINYINTERP_KERNEL_BOUNDS") == "1"


def _check_bounds(context, builder, arr, offset, width):
    """Trap unless 0 <= offset and offset + width <= the array's length (TINYINTERP_KERNEL_BOUNDS)."""
    from numba.core import cgutils

    n = builder.extract_value(arr.shape, 0)
    end = builder.add(offset, ir.Constant(offset.type, width))
    bad = builder.or_(builder.icmp_signed("<", offset, ir.Constant(offset.type, 0)),
                      builder.icmp_signed(">", end, n))
    with builder.if_then(bad, likely=False):
        trap = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                              "llvm.trap")
        builder.call(trap, [])


def _vec_ptr(context, builder, ary_type, ary, offset):
    arr = context.make_array(ary_type)(context, builder, ary)
    if _CHECK_BOUNDS:
        _check_bounds(context, builder, arr, offset, LANES)
    ptr = builder.gep(arr.data, [offset])
    return builder.bitcast(ptr, _VEC.as_pointer())


def _splat(builder, x):
    undef = ir.Constant(_VEC, ir.Undefined)
    v = builder.insert_element(undef, x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(_IVEC, [0] * LANES))


def _vec_intrinsic(builder, name, n_args):
    """Declare llvm.<name>.v16f32 taking n_args vectors (llvmlite cannot mangle vector types)."""
    from numba.core import cgutils

    fnty = ir.FunctionType(_VEC, [_VEC] * n_args)
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.{name}.v{LANES}f32")


@intrinsic
def vload(typingctx, ary, offset):
    """ary[offset:offset + LANES] as a vector (1-D contiguous float32 array)."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.float32 and ary.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        ptr = _vec_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load(ptr, align=4)

    return f32v(ary, types.intp), codegen


@intrinsic
def vstore(typingctx, ary, offset, value):
    """ary[offset:offset + LANES] = value."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.float32 and ary.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        ptr = _vec_ptr(context, builder, signature.args[0], args[0], args[1])
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()

    return types.none(ary, types.intp, f32v), codegen


@intrinsic
def vbroadcast(typingctx, ary, offset):
    """ary[offset] in every lane, loaded straight from memory: the same as vsplat(ary[offset])
    without Numba's negative-index wraparound on offset, so that a broadcast folds into the FMA
    that uses it (matmul tiles load one per FMA row)."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.float32 and ary.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        if _CHECK_BOUNDS:
            _check_bounds(context, builder, arr, args[1], 1)
        return _splat(builder, builder.load(builder.gep(arr.data, [args[1]]), align=4))

    return f32v(ary, types.intp), codegen


@intrinsic
def vsplat(typingctx, x):
    """A vector with x in every lane."""

    def codegen(context, builder, signature, args):
        return _splat(builder, args[0])

    return f32v(types.float32), codegen


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(_VEC, [0.0] * LANES)

    return f32v(), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, lane-wise (fused where the CPU has FMA: llvm.fmuladd)."""

    def codegen(context, builder, signature, args):
        fn = _vec_intrinsic(builder, "fmuladd", 3)
        return builder.call(fn, args)

    return f32v(f32v, f32v, f32v), codegen


def _binary(op):
    @intrinsic
    def fn(typingctx, a, b):
        def codegen(context, builder, signature, args):
            return getattr(builder, op)(args[0], args[1])

        return f32v(f32v, f32v), codegen

    return fn


vadd = _binary("fadd")
vsub = _binary("fsub")
vmul = _binary("fmul")
vdiv = _binary("fdiv")


@intrinsic
def vmax(typingctx, a, b):
    """Lane-wise llvm.maxnum (a NaN lane takes the other operand: only for shifts, see kernels)."""

    def codegen(context, builder, signature, args):
        fn = _vec_intrinsic(builder, "maxnum", 2)
        return builder.call(fn, args)

    return f32v(f32v, f32v), codegen


def _pairwise(builder, v, combine):
    """Reduce the lanes in a fixed tree: lane i with lane i + LANES/2, then halves again."""
    undef = ir.Constant(_VEC, ir.Undefined)
    width = LANES
    while width > 1:
        half = width // 2
        hi = builder.shuffle_vector(v, undef, ir.Constant(_IVEC, [half + i if i < half else i
                                                                  for i in range(LANES)]))
        v = combine(v, hi)
        width = half
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def vhsum(typingctx, v):
    """The sum of the lanes (fixed pairwise order)."""

    def codegen(context, builder, signature, args):
        return _pairwise(builder, args[0], builder.fadd)

    return types.float32(f32v), codegen


@intrinsic
def vhmax(typingctx, v):
    """The maximum of the lanes (llvm.maxnum: NaN lanes are skipped unless all are NaN)."""

    def codegen(context, builder, signature, args):
        fn = _vec_intrinsic(builder, "maxnum", 2)
        return _pairwise(builder, args[0], lambda a, b: builder.call(fn, [a, b]))

    return types.float32(f32v), codegen


_LOG2E = 1.4426950408889634
_C1 = 0.693359375  # ln 2 split in two (Cody-Waite)
_C2 = -2.12194440e-4
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
      5.0000001201e-1)  # Cephes expf minimax polynomial on [-ln2/2, ln2/2]
_XMIN = -87.0  # exp(-87) ~ 1.6e-38, still a normal float32; below it the result is 0


@intrinsic
def vexp_le0(typingctx, x):
    """exp(x) lane-wise for x <= ~0 (softmax shifts). Cody-Waite reduction, Cephes polynomial,
    2^k built from exponent bits; 0 below -87 and for -inf; NaN stays NaN."""

    def codegen(context, builder, signature, args):
        x = args[0]

        def c(value):
            return ir.Constant(_VEC, [float(np.float32(value))] * LANES)

        under = builder.fcmp_ordered("<", x, c(_XMIN))  # false for NaN
        xc = builder.select(under, c(_XMIN), x)
        t = builder.call(_vec_intrinsic(builder, "fmuladd", 3), [xc, c(_LOG2E), c(0.5)])
        floor = _vec_intrinsic(builder, "floor", 1)
        kf = builder.call(floor, [t])
        r = builder.fsub(builder.fsub(xc, builder.fmul(kf, c(_C1))), builder.fmul(kf, c(_C2)))
        fma = _vec_intrinsic(builder, "fmuladd", 3)
        p = c(_P[0])
        for coef in _P[1:]:
            p = builder.call(fma, [p, r, c(coef)])
        poly = builder.fadd(builder.call(fma, [builder.fmul(p, r), r, r]), c(1.0))
        ki = builder.fptosi(kf, _IVEC)  # in [-126, 0] for x in [-87, ~0]
        bits = builder.shl(builder.add(ki, ir.Constant(_IVEC, [127] * LANES)),
                           ir.Constant(_IVEC, [23] * LANES))
        two_k = builder.bitcast(bits, _VEC)
        return builder.select(under, c(0.0), builder.fmul(poly, two_k))

    return f32v(f32v), codegen


@intrinsic
def vmask_after(typingctx, v, first, limit):
    """v with lane i set to -inf where first + i > limit (the causal mask of a tile of keys that
    starts at key ``first``, for query ``limit``)."""

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        lanes = ir.VectorType(i64, LANES)
        undef = ir.Constant(lanes, ir.Undefined)
        first = builder.insert_element(undef, args[1], ir.Constant(_I32, 0))
        first = builder.shuffle_vector(first, undef, ir.Constant(_IVEC, [0] * LANES))
        keys = builder.add(first, ir.Constant(lanes, list(range(LANES))))
        lim = builder.insert_element(undef, args[2], ir.Constant(_I32, 0))
        lim = builder.shuffle_vector(lim, undef, ir.Constant(_IVEC, [0] * LANES))
        after = builder.icmp_signed(">", keys, lim)
        return builder.select(after, ir.Constant(_VEC, [float("-inf")] * LANES), args[0])

    return f32v(f32v, types.intp, types.intp), codegen


@intrinsic
def vtranspose(typingctx, rows):
    """Transpose a LANES x LANES tile given as a tuple of LANES row vectors: returns the tuple of
    its column vectors.

    log2(LANES) levels of two-source shuffles; the level for block size b swaps bit b of the row
    index with bit b of the lane index (the off-diagonal b x b blocks of every 2b x 2b block)."""
    if rows != types.UniTuple(f32v, LANES):
        return None

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        vecs = list(cgutils.unpack_tuple(builder, args[0], LANES))
        block = LANES // 2
        while block >= 1:
            low = [lane if not lane & block else LANES + lane - block for lane in range(LANES)]
            high = [lane + block if not lane & block else LANES + lane for lane in range(LANES)]
            out = list(vecs)
            for i in range(LANES):
                if i & block:
                    continue
                a, b = vecs[i], vecs[i + block]
                out[i] = builder.shuffle_vector(a, b, ir.Constant(_IVEC, low))
                out[i + block] = builder.shuffle_vector(a, b, ir.Constant(_IVEC, high))
            vecs = out
            block //= 2
        return context.make_tuple(builder, signature.return_type, vecs)

    return rows(rows), codegen
