"""A 16-float vector type for numba kernels, so an accumulator can live in a register.

Numba vectorises simple loops over arrays, but an accumulator that must stay in registers while an
outer loop walks a list of rows (``acc += v[k] * W[row[k]]``) ends up in memory: each step then
loads and stores it, several times slower (``benchmarks/RESULTS.md``). ``f32x16`` values are SSA
values of LLVM's ``<16 x float>``: ``load`` and ``store`` move 16 consecutive floats of a 1-d
float32 array (unaligned, no bounds check), ``splat`` repeats a scalar, ``fma`` is ``a * b + c``
rounded once; ``load_first`` / ``store_first`` touch only a row's last, partial vector; ``add``,
``sub``, ``mul``, ``where_positive`` and ``total`` (the lanes' sum) do lane arithmetic;
``nonzero_mask`` and ``trailing_zeros`` find the nonzero entries of 16 floats.

numba's on-disk cache checks only the calling module's timestamp: after editing this file, delete
``gradlab/__pycache__`` (or ``NUMBA_CACHE_DIR``) so that the kernels using it are compiled again.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_VECTOR = ir.VectorType(ir.FloatType(), LANES)


class F32x16(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _address(context, builder, array_type, array, index_type, index):
    data = context.make_array(array_type)(context, builder, array).data
    i = context.cast(builder, index, index_type, types.intp)
    return builder.bitcast(builder.gep(data, [i]), _VECTOR.as_pointer())


@intrinsic
def load(typingctx, array, index):
    """``array[index:index + 16]`` as a vector."""
    def codegen(context, builder, sig, args):
        return builder.load(_address(context, builder, sig.args[0], args[0], sig.args[1],
                                     args[1]), align=4)
    return f32x16(array, index), codegen


@intrinsic
def store(typingctx, array, index, value):
    """``array[index:index + 16] = value``."""
    def codegen(context, builder, sig, args):
        builder.store(args[2], _address(context, builder, sig.args[0], args[0], sig.args[1],
                                        args[1]), align=4)
        return context.get_dummy_value()
    return types.none(array, index, value), codegen


@intrinsic
def splat(typingctx, x):
    """A vector of 16 copies of the scalar ``x`` (as float32)."""
    def codegen(context, builder, sig, args):
        x = context.cast(builder, args[0], sig.args[0], types.float32)
        one = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), x,
                                     ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(_VECTOR, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                  [0] * LANES))
    return f32x16(x), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` per lane, rounded once."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3), "llvm.fma.v16f32")
        return builder.call(fn, args)
    return f32x16(f32x16, f32x16, f32x16), codegen


@intrinsic
def nonzero_mask(typingctx, array, index):
    """Bit i set where ``array[index + i] != 0`` (i < 16; nan counts as nonzero)."""
    def codegen(context, builder, sig, args):
        v = builder.load(_address(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                         align=4)
        bits = builder.fcmp_unordered("!=", v, ir.Constant(_VECTOR, None))
        return builder.zext(builder.bitcast(bits, ir.IntType(LANES)), ir.IntType(64))
    return types.uint64(array, index), codegen


@intrinsic
def trailing_zeros(typingctx, x):
    """The index of the lowest set bit of the uint64 ``x`` (64 if none)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(1)]),
            "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])
    return types.uint64(x), codegen


def _lanes_below(builder, count):
    """The <16 x i1> mask of lanes i < count."""
    count = builder.trunc(count, ir.IntType(32)) if count.type.width > 32 else count
    splat_count = builder.shuffle_vector(
        builder.insert_element(ir.Constant(ir.VectorType(ir.IntType(32), LANES), ir.Undefined),
                               count, ir.Constant(ir.IntType(32), 0)),
        ir.Constant(ir.VectorType(ir.IntType(32), LANES), ir.Undefined),
        ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))
    lanes = ir.Constant(ir.VectorType(ir.IntType(32), LANES), list(range(LANES)))
    return builder.icmp_signed("<", lanes, splat_count)


@intrinsic
def load_first(typingctx, array, index, count):
    """``array[index:index + count]`` (count <= 16) in the first lanes, zeros in the others;
    nothing past them is read."""
    def codegen(context, builder, sig, args):
        ptr = _address(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        mask = _lanes_below(builder, context.cast(builder, args[2], sig.args[2], types.int64))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VECTOR, [_VECTOR.as_pointer(), ir.IntType(32),
                                                      mask.type, _VECTOR]),
            "llvm.masked.load.v16f32.p0v16f32")
        return builder.call(fn, [ptr, ir.Constant(ir.IntType(32), 4), mask,
                                 ir.Constant(_VECTOR, None)])
    return f32x16(array, index, count), codegen


@intrinsic
def store_first(typingctx, array, index, count, value):
    """``array[index:index + count] = value[:count]`` (count <= 16); nothing else is written."""
    def codegen(context, builder, sig, args):
        ptr = _address(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        mask = _lanes_below(builder, context.cast(builder, args[2], sig.args[2], types.int64))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [_VECTOR, _VECTOR.as_pointer(),
                                                            ir.IntType(32), mask.type]),
            "llvm.masked.store.v16f32.p0v16f32")
        builder.call(fn, [args[3], ptr, ir.Constant(ir.IntType(32), 4), mask])
        return context.get_dummy_value()
    return types.none(array, index, count, value), codegen


@intrinsic
def total(typingctx, v):
    """The sum of the 16 lanes (as float32), added in halves."""
    def codegen(context, builder, sig, args):
        value = args[0]
        lanes = LANES
        while lanes > 1:
            lanes //= 2
            low = builder.shuffle_vector(value, value, ir.Constant(
                ir.VectorType(ir.IntType(32), lanes), list(range(lanes))))
            high = builder.shuffle_vector(value, value, ir.Constant(
                ir.VectorType(ir.IntType(32), lanes), list(range(lanes, 2 * lanes))))
            value = builder.fadd(low, high)
        return builder.extract_element(value, ir.Constant(ir.IntType(32), 0))
    return types.float32(f32x16), codegen


@intrinsic
def zeros(typingctx):
    """A vector of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_VECTOR, None)
    return f32x16(), codegen


def _binary(name):
    @intrinsic
    def op(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return getattr(builder, name)(*args)
        return f32x16(f32x16, f32x16), codegen
    return op


add, sub, mul = _binary("fadd"), _binary("fsub"), _binary("fmul")
add.__doc__, sub.__doc__, mul.__doc__ = "a + b per lane.", "a - b per lane.", "a * b per lane."


@intrinsic
def where_positive(typingctx, key, a, b):
    """Per lane: ``a`` where ``key > 0``, else ``b``."""
    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], ir.Constant(_VECTOR, None)),
                              args[1], args[2])
    return f32x16(f32x16, f32x16, f32x16), codegen
