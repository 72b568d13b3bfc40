"""The measure step: partial sums in float32 in one pass, and a rescue for overflow.

The common path is one reduction per leaf (the sum of |x|^p, or max |x|) and a
sum across leaves, all in the accumulation dtype (float32, or float64 for
float64 leaves). Its result is trusted when it is finite and not so small that
squares could have underflowed; otherwise, under one `lax.cond`, a rescue path
measures again: per leaf the largest finite magnitude M, the count of
non-finite elements, then sum((|x| * 2^-e)^p) with 2^e the power of two
nearest M from below, which neither overflows nor underflows. So fp16 values of
300 and float32 values near 1e30 get the right norm, while well-scaled gradients
pay for exactly one pass.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# A p-sum below this may have lost elements to underflow (|x|^p below the smallest
# normal float32); the rescue path measures it again, scaled.
TINY = 2.0**-64


class Local(NamedTuple):
    """What one device knows about each group: the reduce step combines these.

    Attributes:
      norm: the norm of the finite elements of each group.
      nonfinite: the number of non-finite elements of each group.
      nan: whether each group holds a NaN.
      inf: whether each group holds an infinity.
    """

    norm: jax.Array
    nonfinite: jax.Array
    nan: jax.Array
    inf: jax.Array


class Norms(NamedTuple):
    """Reduced norms of each group.

    Attributes:
      norm: NaN if the group holds a NaN, else inf if it holds an inf, else its norm.
      finite: the norm of the group's finite elements.
      nonfinite: the number of non-finite elements (int32).
    """

    norm: jax.Array
    finite: jax.Array
    nonfinite: jax.Array


Reducer = Callable[[Local], Local]


def magnitude(x: jax.Array, dtype: Any) -> jax.Array:
    """|x| in `dtype`; the modulus of a complex leaf, overflow-free, finite gradient at 0."""
    if jnp.iscomplexobj(x):
        work = x.astype(jnp.promote_types(x.dtype, dtype))
        zero = work == 0
        return jnp.where(zero, 0.0, jnp.abs(jnp.where(zero, 1.0, work))).astype(dtype)
    return jnp.abs(x.astype(dtype))


def _abs_pow(x: jax.Array, p: float, dtype: Any) -> jax.Array:
    if p == 2:
        if jnp.iscomplexobj(x):
            return jnp.square(x.real.astype(dtype)) + jnp.square(x.imag.astype(dtype))
        return jnp.square(x.astype(dtype))
    a = magnitude(x, dtype)
    return a if p == 1 else a**p


def power_sum(x: jax.Array, p: float, dtype: Any, axis: Any = None) -> jax.Array:
    """The common-path partial: sum of |x|^p over `axis` (max |x| when p is inf)."""
    keepdims = axis is not None
    if math.isinf(p):
        return jnp.max(magnitude(x, dtype), axis=axis, keepdims=keepdims, initial=0.0)
    if p not in (1, 2) and axis is None and not jnp.iscomplexobj(x):
        return _real_power_sum(x, p, np.dtype(dtype))
    return jnp.sum(_abs_pow(x, p, dtype), axis=axis, keepdims=keepdims)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _real_power_sum(x: jax.Array, p: float, dtype: np.dtype) -> jax.Array:
    return jnp.sum(_abs_pow(x, p, dtype))


@_real_power_sum.defjvp
def _real_power_sum_jvp(
    p: float, dtype: np.dtype, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    # When the sum overflows the rescue path takes over; its derivative p|x|^(p-1) may
    # overflow too, and the zero cotangent it then receives would make 0 * inf = NaN.
    (x,), (t,) = primals, tangents
    out = _real_power_sum(x, p, dtype)
    xs = x.astype(dtype)
    slope = p * jnp.abs(xs) ** (p - 1) * jnp.sign(xs)
    slope = jnp.where(jnp.isfinite(out), slope, 0.0)
    return out, jnp.sum(slope * t.astype(dtype))


def safe_root(s: jax.Array, p: float) -> jax.Array:
    """s^(1/p) for s >= 0 (s itself for the max-norm), 0 at 0 with a finite gradient there."""
    if math.isinf(p):
        return s
    positive = s > 0
    safe = jnp.where(positive, s, 1.0)
    root = jnp.sqrt(safe) if p == 2 else (safe if p == 1 else safe ** (1.0 / p))
    return jnp.where(positive, root, 0.0)


def _power_of_two(exponent: jax.Array, dtype: np.dtype) -> jax.Array:
    """2^(exponent - bias) built from its bits; `exponent` is a biased exponent field."""
    info = np.finfo(dtype)
    bits = jnp.uint32 if info.bits == 32 else jnp.uint64
    return lax.bitcast_convert_type(exponent.astype(bits) << info.nmant, dtype)


def _binary_scales(top: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Powers of two (down, up) with top * down in [1, 2) and down * up = 1, from the bits."""
    dtype = np.dtype(top.dtype)
    info = np.finfo(dtype)
    bits = jnp.uint32 if info.bits == 32 else jnp.uint64
    bias = 2 ** (info.nexp - 1) - 1
    field = lax.bitcast_convert_type(top, bits) >> info.nmant & (2**info.nexp - 1)
    field = jnp.clip(field, 1, 2 * bias - 1)
    return _power_of_two(2 * bias - field, dtype), _power_of_two(field, dtype)


def scaled_norm(a: jax.Array, top: jax.Array, p: float, axis: Any, dtype: Any) -> jax.Array:
    """||a||_p for a >= 0 with max `top`, neither overflowing nor underflowing.

    `a` is scaled by the power of two that brings `top` into [1, 2), summed, and the
    root scaled back. Powers of two are exact, and a multiplication never makes the
    denormals that x / top can: XLA on CPU divides by way of the reciprocal, and
    1 / 1e38 flushes to zero. The powers are built from the exponent bits, which
    compiles to far less than `frexp` and `ldexp`.
    """
    down, up = _binary_scales(top)
    root = safe_root(jnp.sum(_abs_pow(a * down, p, dtype), axis=axis, keepdims=True), p)
    return root * up


def combine(norms: jax.Array, p: float, axis: Any = None) -> jax.Array:
    """The p-norm of a vector of norms without overflow."""
    if math.isinf(p):
        return jnp.max(norms, axis=axis, initial=0.0)
    top = jnp.max(norms, axis=axis, initial=0.0, keepdims=True)
    return jnp.squeeze(scaled_norm(norms, top, p, axis, norms.dtype), axis=axis)


def _segment(values: jax.Array, segments: np.ndarray, num: int, op: str) -> jax.Array:
    if num == 1:
        return jnp.max(values, keepdims=True) if op == "max" else jnp.sum(values, keepdims=True)
    if len(segments) == num and np.array_equal(segments, np.arange(num)):
        return values
    if op == "max":
        return jax.ops.segment_max(values, segments, num_segments=num)
    return jax.ops.segment_sum(values, segments, num_segments=num)


def _rescue_leaf(x: jax.Array, p: float, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """One leaf measured again: the norm of its finite elements, scaled by their largest
    magnitude so that nothing overflows or underflows, and its count of non-finite ones.

    Each of the three reductions masks the non-finite elements in its own way rather
    than sharing one masked copy of the leaf. XLA:CPU still materialises each masked
    operand (it fuses no `select` into a reduction), so on CPU this branch reserves
    temporaries the size of the leaves even when it is not taken.
    """
    count = jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
    a = magnitude(x, dtype)
    top = jnp.max(jnp.where(a < jnp.inf, a, 0.0), initial=0.0)
    if not math.isinf(p):
        down, up = _binary_scales(top)
        # Finite elements are at most `top`, so scaled they are below 2; NaN and inf are not.
        work = x if jnp.iscomplexobj(x) else x.astype(dtype)
        scaled = magnitude(work * down, dtype)
        total = jnp.sum(_abs_pow(jnp.where(scaled < 2, scaled, 0.0), p, dtype))
        top = safe_root(total, p) * up
    return top, count


def _nonfinite_probe(
    arrays: Sequence[jax.Array],
    segments: np.ndarray,
    num: int,
    dtype: Any,
    counted: jax.Array | None,
    like: jax.Array,
) -> jax.Array:
    """Whether each group may hold a NaN that its max-norm partial lost.

    XLA:CPU (jax 0.10) reduces `max` with an instruction that drops NaN: the max of
    |x| over a large array holding a NaN comes out finite, and wrong. A sum does
    not drop NaN, so on CPU a second pass sums |x| * 0, which is NaN exactly when
    an element is NaN or inf. Other platforms propagate NaN through `max` as XLA
    specifies, and pay nothing.
    """

    def probe() -> jax.Array:
        sums = jnp.stack([jnp.sum(magnitude(x, dtype) * 0.0) for x in arrays])
        if counted is not None:
            sums = jnp.where(counted, sums, 0.0)
        return jnp.isnan(_segment(sums, segments, num, "sum"))

    def no() -> jax.Array:
        # zeros_like keeps the varying mesh axes of `like` (the totals), as `probe` has them.
        return jnp.zeros_like(like, bool)

    return lax.platform_dependent(cpu=probe, default=no)


def _rescue(
    arrays: Sequence[jax.Array],
    partials: jax.Array,
    segments: np.ndarray,
    num: int,
    p: float,
    dtype: Any,
    counted: jax.Array | None,
) -> Local:
    # Each leaf is measured again on its own and the leaf norms are combined per group
    # afterwards. Leaves are never concatenated: under jit with sharded leaves XLA would
    # gather them. The NaN flags come from the first pass: a leaf's sum of |x|^p is NaN
    # exactly when it holds a NaN, and a group with non-finite elements but no NaN holds
    # an inf.
    measured = [_rescue_leaf(x, p, dtype) for x in arrays]
    norm = jnp.stack([n for n, _ in measured])
    count = jnp.stack([c for _, c in measured])
    if math.isinf(p):
        # The max-norm partials may have lost their NaN (see `_nonfinite_probe`).
        has_nan = jnp.stack([jnp.any(jnp.isnan(x)) for x in arrays])
    else:
        has_nan = jnp.isnan(partials)
    if counted is not None:
        norm = jnp.where(counted, norm, 0.0)
        count = jnp.where(counted, count, 0)
        has_nan &= counted
    if math.isinf(p) or np.array_equal(segments, np.arange(num)):
        top = jnp.maximum(_segment(norm, segments, num, "max"), 0.0)
    else:
        top = jnp.stack([combine(norm[np.flatnonzero(segments == g)], p) for g in range(num)])
    count = _segment(count, segments, num, "sum").astype(jnp.int32)
    nan = _segment(has_nan, segments, num, "max")
    return Local(norm=top, nonfinite=count, nan=nan, inf=(count > 0) & ~nan)


def local_group_norms(
    arrays: Sequence[jax.Array],
    segments: Sequence[int],
    num: int,
    p: float,
    dtype: Any,
    counted: jax.Array | None = None,
) -> Local:
    """Per-group norms of this device's leaves: one pass, rescued by one `lax.cond`.

    Args:
      arrays: the leaves.
      segments: the group of each leaf.
      num: the number of groups.
      p: the norm order (`math.inf` for the max-norm).
      dtype: the accumulation dtype.
      counted: optional bool per leaf; a leaf marked False adds nothing (it is
        counted on another device).
    """
    return _local_group_norms(
        list(arrays), counted, segments=tuple(segments), num=num, p=p, dtype=np.dtype(dtype)
    )


# Jitted so that eager calls compile the `lax.cond` once per shape, not once per call;
# under an outer `jit` it is inlined.
@functools.partial(jax.jit, static_argnames=("segments", "num", "p", "dtype"))
def _local_group_norms(
    arrays: list[jax.Array],
    counted: jax.Array | None,
    *,
    segments: tuple[int, ...],
    num: int,
    p: float,
    dtype: np.dtype,
) -> Local:
    seg = np.asarray(segments, dtype=np.int32)
    if not arrays:
        zeros = jnp.zeros([num], dtype)
        return Local(zeros, jnp.zeros([num], jnp.int32), zeros > 0, zeros > 0)
    partials = jnp.stack([power_sum(x, p, dtype) for x in arrays])
    if counted is not None:
        partials = jnp.where(counted, partials, 0.0)
    op = "max" if math.isinf(p) else "sum"
    totals = _segment(partials, seg, num, op)
    trusted = jnp.isfinite(totals)
    if math.isinf(p):
        # A max reduction may lose a NaN; the rescue then finds it.
        trusted &= ~_nonfinite_probe(arrays, seg, num, dtype, counted, like=totals)
    else:
        trusted &= totals >= TINY

    def common() -> Local:
        # zeros_like keeps the totals' varying mesh axes, as the rescue's outputs have them.
        no = jnp.zeros_like(totals, bool)
        return Local(safe_root(totals, p), jnp.zeros_like(totals, jnp.int32), no, no)

    # The rescue reads only the NaN flags of the first pass; without stop_gradient a zero
    # cotangent would still flow through an overflowed |x|^p, and 0 * inf is NaN.
    flags = lax.stop_gradient(partials)
    return lax.cond(
        jnp.all(trusted), common, lambda: _rescue(arrays, flags, seg, num, p, dtype, counted)
    )


def finish(local: Local) -> Norms:
    norm = jnp.where(local.nan, jnp.nan, jnp.where(local.inf, jnp.inf, local.norm))
    return Norms(norm=norm, finite=local.norm, nonfinite=local.nonfinite.astype(jnp.int32))


def group_norms(
    arrays: Sequence[jax.Array],
    segments: Sequence[int],
    num: int,
    p: float,
    dtype: Any,
    counted: jax.Array | None = None,
    reduce: Reducer | None = None,
) -> Norms:
    """Measure and reduce: the norms of `num` groups of leaves, combined across devices."""
    local = local_group_norms(arrays, segments, num, p, dtype, counted)
    if reduce is not None:
        local = reduce(local)
    return finish(local)


def default_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The unit axes AGC uses by default, by rank, as in `optax.transforms.unitwise_norm`."""
    squeezed = sum(1 for d in shape if d != 1)
    if squeezed <= 1:
        return tuple(range(len(shape)))
    if len(shape) in (2, 3):
        return (0,)
    if len(shape) == 4:
        return (0, 1, 2)
    if len(shape) == 5:
        return (0, 1, 2, 3)
    raise ValueError(
        f"unitwise_norm: no default unit axes for shape {shape} (rank {len(shape)}); pass "
        "`axis` to name the axes a unit spans."
    )


def normalize_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not isinstance(a, int | np.integer) or not -ndim <= a < max(ndim, 1):
            raise ValueError(f"unitwise_norm: axis {a!r} is out of range for rank {ndim}.")
        out.append(int(a) % max(ndim, 1))
    return tuple(sorted(set(out)))


class UnitNorms(NamedTuple):
    """Per-unit L2 norms of each leaf (kept dims), with the count of non-finite elements."""

    norms: list[jax.Array]
    nonfinite: jax.Array


def unit_norms(
    arrays: Sequence[jax.Array],
    axes: Sequence[tuple[int, ...]],
    dtype: Any,
    rescue_tiny: bool,
) -> UnitNorms:
    """L2 norms over `axes` of each leaf, NaN/inf propagating, rescued by one `lax.cond`.

    With `rescue_tiny=False` only overflow is rescued: the policies that use it
    compare unit norms with thresholds far above 1e-19, where underflow cannot
    change a decision, and zero units (unused embedding rows) stay on the fast path.
    """
    return _unit_norms(
        list(arrays),
        axes=tuple(tuple(a) for a in axes),
        dtype=np.dtype(dtype),
        rescue_tiny=rescue_tiny,
    )


@functools.partial(jax.jit, static_argnames=("axes", "dtype", "rescue_tiny"))
def _unit_norms(
    arrays: list[jax.Array],
    *,
    axes: tuple[tuple[int, ...], ...],
    dtype: np.dtype,
    rescue_tiny: bool,
) -> UnitNorms:
    if not arrays:
        return UnitNorms([], jnp.zeros([0], jnp.int32))
    sums = [power_sum(x, 2.0, dtype, axis=ax) for x, ax in zip(arrays, axes, strict=True)]
    finite = jnp.stack([jnp.all(jnp.isfinite(s)) for s in sums])
    trusted = jnp.all(finite)
    if rescue_tiny:
        trusted &= jnp.all(jnp.stack([jnp.all(s >= TINY) for s in sums]))

    def common() -> UnitNorms:
        return UnitNorms([safe_root(s, 2.0) for s in sums], jnp.zeros_like(finite, jnp.int32))

    def rescue() -> UnitNorms:
        norms, counts = [], []
        for x, ax in zip(arrays, axes, strict=True):
            finite = jnp.isfinite(x)
            a = jnp.where(finite, magnitude(x, dtype), 0.0)
            top = jnp.max(a, axis=ax, keepdims=True, initial=0.0)
            n = scaled_norm(a, top, 2.0, ax, dtype)
            n = jnp.where(jnp.any(jnp.isinf(x), axis=ax, keepdims=True), jnp.inf, n)
            n = jnp.where(jnp.any(jnp.isnan(x), axis=ax, keepdims=True), jnp.nan, n)
            norms.append(n)
            counts.append(jnp.sum(~finite, dtype=jnp.int32))
        return UnitNorms(norms, jnp.stack(counts))

    return lax.cond(trusted, common, rescue)
