"""The measure step: per-group partial sums in one read of each leaf, branch-free where it matters.

**Accelerators (GPU, TPU): fixed-scale bands, no branch.** As LAPACK's `nrm2` since
Anderson (2017), the magnitudes are split at fixed powers of two into bands, and each
band sums |x · 2^shift|^p at its own fixed scale, chosen so that the p-th powers of its
magnitudes lie far from overflow and underflow. For p = 2 in float32 that is three
bands (below 2^-50, up to 2^44, above), for p = 1 two; fp16 leaves need only the
middle one. The band sums and the non-finite count are independent sibling reductions
over the leaf, so XLA fuses them into one read. The bands of all leaves and devices
add without overflow (40 bits of headroom), so a single `psum` of O(groups) values
carries them across devices, and the root is taken once, on scalars. NaN falls into
the middle band and inf into the top one, so both propagate by themselves.

**CPU: one pass, and a rescue.** XLA:CPU fuses neither sibling reductions nor the
selects of the bands, so there each band would cost a whole pass. The common path
is one plain sum of |x|^p per leaf; it is trusted when the group sums are finite,
not so small that squares could have underflowed and not so large that adding them
across devices could overflow. Otherwise one `lax.cond` measures again with the
bands. The two paths hand the reduce step the same record.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core
from jax.interpreters import ad, batching, mlir
from jax.sharding import PartitionSpec

# A p-sum below this may have lost elements to underflow (|x|^p below the smallest
# normal float32); the CPU common path then hands over to the bands.
TINY = 2.0**-64

# Bits between the largest p-th power a band holds and overflow: room to add 2^40
# such values, over all leaves and devices, before a band sum could overflow.
HEADROOM = 40

# Non-finite counts cross devices as base-256 digits inside the float payload of the
# one all-reduce: each digit sums exactly in float32 over up to 65,000 devices.
DIGITS = 4
DIGIT_BITS = 8


@dataclasses.dataclass(frozen=True)
class Band:
    """Magnitudes in [2^lo, 2^hi) (the middle band: [2^lo, 2^hi]), summed as |x · 2^shift|^p."""

    lo: int
    hi: int
    shift: int


@functools.cache
def bands(p: float, dtype: np.dtype) -> tuple[tuple[Band, ...], int]:
    """The fixed-scale bands for the p-norm accumulated in `dtype`, lowest first.

    Returns the bands and the index of the middle one (shift 0, holding 1). Each
    band's scaled p-th powers lie in [2^-(N - P), 2^(M - HEADROOM)], N and M the
    exponent range of `dtype` and P a margin of its mantissa bits plus two, so
    that nothing overflows and what underflows is below rounding of the total.
    """
    info = np.finfo(dtype)
    top, bottom = int(info.maxexp), -int(info.minexp)
    hi_safe = top - HEADROOM
    lo_safe = bottom - (int(info.nmant) + 2)
    width = max(int((hi_safe + lo_safe) / p), 1)
    middle_hi = math.floor(hi_safe / p)
    # For p = 1 the powers of normal numbers are normal: no band below is needed.
    middle_lo = -bottom if p == 1 else -math.floor(lo_safe / p)
    middle = Band(middle_lo, middle_hi, 0)
    upper, hi = [], middle_hi
    while hi < top:
        lo, hi = hi, min(hi + width, top)
        upper.append(Band(lo, hi, -math.ceil(hi - hi_safe / p)))
    lower, lo = [], middle_lo
    while lo > -bottom:
        hi, lo = lo, max(lo - width, -bottom)
        lower.append(Band(lo, hi, math.ceil(-lo_safe / p - lo)))
    return (*reversed(lower), middle, *upper), len(lower)


def is_banded(p: float, dtype: np.dtype) -> bool:
    """Whether the p-norm is measured in fixed-scale bands (else: a running scale, or the max).

    The bands serve the orders users clip with, 1 and 2 (three bands at most). Other
    orders would need ever more (p = 100: 254), and take a running scale instead.
    """
    del dtype
    return p in (1.0, 2.0)


def width(p: float, dtype: np.dtype) -> int:
    """Values per group in the measure's record: the bands, (max, scaled sum), or the max."""
    if math.isinf(p):
        return 1
    return len(bands(p, dtype)[0]) if is_banded(p, dtype) else 2


def _ratio(m: jax.Array, top: jax.Array, p: float) -> jax.Array:
    """(m / top)^p for 0 <= m <= top, and 0 where top is 0 (finite gradients there).

    Both are first scaled by the power of two that brings `top` into [1, 2): XLA:CPU
    divides by way of the reciprocal, and 1 / 1e38 flushes to zero.
    """
    positive = top > 0
    safe = jnp.where(positive, top, 1.0)
    down = lax.stop_gradient(_binary_scales(safe)[0])
    return jnp.where(positive, ((m * down) / (safe * down)) ** p, 0.0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _running_scale(x: jax.Array, p: float, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """(M, S) with M the largest finite magnitude and S = sum((|x| / M)^p), in one reduction.

    For high orders, where fixed bands would be too many: the pairwise combination
    rescales to the larger maximum, so nothing overflows and what underflows is
    negligible. Non-finite elements add nothing.
    """
    a = magnitude(x, dtype)
    a = jnp.where(jnp.isfinite(a), a, 0.0)

    def combine(u: tuple[jax.Array, jax.Array], v: tuple[jax.Array, jax.Array]) -> Any:
        top = jnp.maximum(u[0], v[0])
        return top, u[1] * _ratio(u[0], top, p) + v[1] * _ratio(v[0], top, p)

    init = (jnp.zeros((), dtype), jnp.zeros((), dtype))
    ones = jnp.where(a > 0, 1.0, 0.0).astype(dtype)
    return lax.reduce((a, ones), init, combine, tuple(range(np.ndim(x))))


@_running_scale.defjvp
def _running_scale_jvp(
    p: float, dtype: np.dtype, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[Any, Any]:
    # The norm M · S^(1/p) does not depend on which M scales it, so M may be held
    # fixed: its tangent is 0 and S's is that of sum((|x| / M)^p) at fixed M, exactly.
    (x,), (t,) = primals, tangents
    top, total = _running_scale(x, p, dtype)

    def scaled_sum(y: jax.Array) -> jax.Array:
        a = magnitude(y, dtype)
        return jnp.sum(_ratio(jnp.where(jnp.isfinite(a), a, 0.0), top, p))

    _, d_total = jax.jvp(scaled_sum, (x,), (t,))
    return (top, total), (jnp.zeros_like(top), d_total)


def merge_scaled(rows: jax.Array, segments: Any, num: int, p: float) -> jax.Array:
    """Per-group (M, S) from per-row (M, S) pairs, `[rows, 2]` -> `[num, 2]`."""
    top = _segment(rows[:, 0], segments, num, "max")
    rescaled = rows[:, 1] * _ratio(rows[:, 0], top[np.asarray(segments, np.int32)], p)
    return jnp.stack([top, _segment(rescaled, segments, num, "sum")], axis=1)


def _leaf_bands(p: float, dtype: np.dtype, leaf: Any) -> list[int]:
    """Indices of the bands that magnitudes of `leaf`'s dtype can fall into."""
    info = np.finfo(jnp.finfo(leaf).dtype)
    smallest, largest = int(info.minexp) - int(info.nmant), int(info.maxexp)
    found, _ = bands(p, dtype)
    return [i for i, b in enumerate(found) if b.hi > smallest and b.lo < largest]


def times_pow2(x: jax.Array, exponent: float) -> jax.Array:
    """x · 2^exponent for scalars of partial sums, exact, whatever the size of `exponent`.

    `ldexp` works on the exponent bits, so XLA's simplifier cannot fold it into its
    neighbours (a product by a constant it would: (x · 2^-100) · 2^-68 becomes x · 0).
    """
    whole = math.floor(exponent)
    y = jnp.ldexp(x, jnp.int32(whole)) if whole else x
    return y * 2.0 ** (exponent - whole) if exponent != whole else y


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _scaled(a: jax.Array, shift: int, dtype: np.dtype) -> jax.Array:
    """a · 2^shift for the magnitudes of one band, by adding to the exponent bits.

    A float product would not do: XLA's simplifier rewrites (a · c)² as a² · c², and
    with c = 2^76 or 2^-84 that is 0 · inf = NaN in float32. Integer arithmetic on the
    bits it leaves alone. Valid for normal numbers whose shifted exponent stays normal,
    which the bands guarantee; zeros and subnormals (below a band scaled up) become 0
    and infinities (in the top band) stay infinite.
    """
    info = np.finfo(dtype)
    ints = jnp.int32 if info.bits == 32 else jnp.int64
    bits = lax.bitcast_convert_type(a, ints) + ints(shift << int(info.nmant))
    out = lax.bitcast_convert_type(bits, dtype)
    if shift > 0:
        return jnp.where(a >= info.tiny, out, jnp.zeros_like(out))
    return jnp.where(jnp.isinf(a), a, out)


@_scaled.defjvp
def _scaled_jvp(
    shift: int, dtype: np.dtype, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (a,), (t,) = primals, tangents
    return _scaled(a, shift, dtype), t * jnp.asarray(2.0**shift, dtype)


class Local(NamedTuple):
    """What one device knows about each group: what the reduce step adds up.

    Attributes:
      acc: `[groups, bands]` band sums of the finite elements (for the max-norm,
        `[groups, 1]`: the largest finite magnitude).
      nonfinite: the number of non-finite elements of each group (int32).
      nan: whether each group holds a NaN.
    """

    acc: jax.Array
    nonfinite: jax.Array
    nan: jax.Array


class Norms(NamedTuple):
    """Reduced norms of each group.

    Attributes:
      norm: NaN if the group holds a NaN, else inf if it holds an inf, else its norm.
      finite: the norm of the group's finite elements (measured with `masked=True`;
        otherwise exact only where the group is finite).
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


def _pow(a: jax.Array, p: float) -> jax.Array:
    return jnp.square(a) if p == 2 else (a if p == 1 else a**p)


def power_sum(x: jax.Array, p: float, dtype: Any, axis: Any = None) -> jax.Array:
    """The CPU common-path partial: sum of |x|^p over `axis` (max |x| when p is inf)."""
    keepdims = axis is not None
    if math.isinf(p):
        return jnp.max(magnitude(x, dtype), axis=axis, keepdims=keepdims, initial=0.0)
    if p not in (1, 2) and not jnp.iscomplexobj(x):
        return _real_power_sum(x, p, np.dtype(dtype), axis)
    return jnp.sum(_abs_pow(x, p, dtype), axis=axis, keepdims=keepdims)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _real_power_sum(x: jax.Array, p: float, dtype: np.dtype, axis: Any) -> jax.Array:
    return jnp.sum(_abs_pow(x, p, dtype), axis=axis, keepdims=axis is not None)


@_real_power_sum.defjvp
def _real_power_sum_jvp(
    p: float, dtype: np.dtype, axis: Any, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    # When the sum overflows the bands take over; the derivative p|x|^(p-1) may
    # overflow too, and the zero cotangent it then receives would make 0 * inf = NaN.
    (x,), (t,) = primals, tangents
    out = _real_power_sum(x, p, dtype, axis)
    xs = x.astype(dtype)
    slope = p * jnp.abs(xs) ** (p - 1) * jnp.sign(xs)
    slope = jnp.where(jnp.isfinite(xs), slope, 0.0)
    return out, jnp.sum(slope * t.astype(dtype), axis=axis, keepdims=axis is not None)


def band_terms(
    x: jax.Array, p: float, dtype: np.dtype, masked: bool, tiny: bool = True
) -> dict[int, jax.Array]:
    """The elementwise terms of each band one leaf reaches: |x · 2^shift|^p inside it, else 0.

    Bands the leaf's dtype cannot reach have no term. The lowest band a leaf uses has
    no lower limit and the highest no upper one. Unmasked, NaN (which fails every
    comparison) lands in the middle band and inf in the top one, so both propagate;
    masked, non-finite elements add nothing. With `tiny=False` the bands below the
    middle are left out and tiny magnitudes are taken unscaled (their squares may
    underflow to 0).
    """
    found, middle = bands(p, dtype)
    used = [i for i in _leaf_bands(p, dtype, x) if tiny or i >= middle]
    a = magnitude(x, dtype)
    if masked:
        a = jnp.where(jnp.isfinite(a), a, 0.0)
    terms = {}
    for i in used:
        band = found[i]
        low_check, high_check = i != used[0], i != used[-1]
        if i == middle:
            outside = jnp.zeros(a.shape, bool)
            if low_check:
                outside |= a < 2.0**band.lo
            if high_check:
                outside |= a > 2.0**band.hi
            terms[i] = jnp.where(outside, 0.0, _pow(a, p))
        else:
            inside = jnp.ones(a.shape, bool)
            # Only inner limits are compared: the outermost (2^1024 in float64) would
            # not even be a Python float.
            if low_check:
                inside &= a >= 2.0**band.lo if i < middle else a > 2.0**band.lo
            if high_check:
                inside &= a < 2.0**band.hi if i < middle else a <= 2.0**band.hi
            terms[i] = jnp.where(inside, _pow(_scaled(a, band.shift, dtype), p), 0.0)
    return terms


def _reduced_shape(shape: tuple[int, ...], axis: Any) -> tuple[int, ...]:
    if axis is None:
        return ()
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(1 if d in axes else n for d, n in enumerate(shape))


def band_sums(
    x: jax.Array,
    p: float,
    dtype: np.dtype,
    masked: bool,
    axis: Any = None,
    tiny: bool = True,
) -> list[jax.Array]:
    """The band sums of one leaf over `axis`: one sibling reduction per band it reaches."""
    found, _ = bands(p, dtype)
    terms = band_terms(x, p, dtype, masked, tiny)
    keepdims = axis is not None
    zeros = jnp.zeros(_reduced_shape(np.shape(x), axis), dtype)
    return [
        jnp.sum(terms[i], axis=axis, keepdims=keepdims) if i in terms else zeros
        for i in range(len(found))
    ]


def combine_bands(acc: Sequence[jax.Array], p: float, dtype: np.dtype) -> jax.Array:
    """The p-norm from band sums (finite, >= 0), elementwise: rooted once, at the top band."""
    found, _ = bands(p, dtype)
    result = jnp.zeros_like(acc[0])
    for t in range(len(found)):
        # Lower bands brought to band t's scale, smallest first; what underflows there is
        # below rounding of band t's own sum.
        total = jnp.zeros_like(acc[0])
        for i in range(t + 1):
            total = total + times_pow2(acc[i], p * (found[t].shift - found[i].shift))
        candidate = times_pow2(safe_root(total, p), -found[t].shift)
        result = jnp.where(acc[t] > 0, candidate, result)
    return result


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

    For small arrays of norms (scalars already reduced): `a` is scaled by the power
    of two that brings `top` into [1, 2), summed, and the root scaled back. Powers
    of two are exact, and a multiplication never makes the denormals that x / top
    can: XLA on CPU divides by way of the reciprocal, and 1 / 1e38 flushes to zero.
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


def _segment(values: jax.Array, segments: Any, num: int, op: str) -> jax.Array:
    """Per-group sums (or maxima) along the leading axis of `values`, one row per leaf."""
    segments = np.asarray(segments, np.int32)
    if len(segments) == num and np.array_equal(segments, np.arange(num)):
        return values
    if num == 1:
        reduce = jnp.max if op == "max" else jnp.sum
        return reduce(values, axis=0, keepdims=True)
    if op == "max":
        return jax.ops.segment_max(values, segments, num_segments=num)
    return jax.ops.segment_sum(values, segments, num_segments=num)


def _count(x: jax.Array) -> jax.Array:
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def _mask_rows(values: jax.Array, counted: jax.Array | None) -> jax.Array:
    if counted is None:
        return values
    where = counted.reshape(counted.shape + (1,) * (values.ndim - 1))
    return jnp.where(where, values, jnp.zeros_like(values))


def _banded(
    arrays: Sequence[jax.Array],
    seg: np.ndarray,
    num: int,
    p: float,
    dtype: np.dtype,
    counted: jax.Array | None,
    masked: bool,
) -> Local:
    """The branch-free measure: per leaf, independent sibling reductions, then per group."""
    counts = _mask_rows(jnp.stack([_count(x) for x in arrays]), counted)
    nonfinite = _segment(counts, seg, num, "sum").astype(jnp.int32)
    if math.isinf(p) or masked:
        nans = _mask_rows(jnp.stack([jnp.any(jnp.isnan(x)) for x in arrays]), counted)
        nan = _segment(nans, seg, num, "max")
    if math.isinf(p):
        # A masked max and a NaN flag: XLA:CPU's max drops NaN, other backends keep it.
        tops = []
        for x in arrays:
            a = magnitude(x, dtype)
            tops.append(jnp.max(jnp.where(jnp.isfinite(a), a, 0.0), initial=0.0))
        acc = _mask_rows(jnp.stack(tops)[:, None], counted)
        return Local(_segment(acc, seg, num, "max"), nonfinite, nan)
    if not is_banded(p, dtype):
        rows = _mask_rows(
            jnp.stack([jnp.stack(_running_scale(x, p, dtype)) for x in arrays]), counted
        )
        if not masked:
            nans = _mask_rows(jnp.stack([jnp.any(jnp.isnan(x)) for x in arrays]), counted)
            nan = _segment(nans, seg, num, "max")
        return Local(merge_scaled(rows, seg, num, p), nonfinite, nan)
    rows = jnp.stack([jnp.stack(band_sums(x, p, dtype, masked)) for x in arrays])
    acc = _segment(_mask_rows(rows, counted), seg, num, "sum")
    if not masked:
        nan = jnp.isnan(jnp.sum(acc, axis=1))
    return Local(jnp.where(jnp.isfinite(acc), acc, 0.0), nonfinite, nan)


def _nan_probe(
    arrays: Sequence[jax.Array], seg: np.ndarray, num: int, dtype: Any, counted: jax.Array | None
) -> jax.Array:
    """Whether each group may hold a NaN that its max partial lost, for XLA:CPU only.

    XLA:CPU (jax 0.10) reduces `max` with an instruction that drops NaN: the max of
    |x| over a large array holding a NaN comes out finite, and wrong. A sum does
    not drop NaN: the sum of |x| * 0 is NaN exactly when an element is NaN or inf.
    """
    sums = _mask_rows(jnp.stack([jnp.sum(magnitude(x, dtype) * 0.0) for x in arrays]), counted)
    return jnp.isnan(_segment(sums, seg, num, "sum"))


def _cpu(
    arrays: Sequence[jax.Array],
    seg: np.ndarray,
    num: int,
    p: float,
    dtype: np.dtype,
    counted: jax.Array | None,
    masked: bool,
) -> Local:
    """One plain pass, trusted when safe; otherwise the bands, under one `lax.cond`.

    Orders other than 1, 2 and inf are one running-scale pass on every platform: the
    record then holds (M, S), which a plain sum cannot give.
    """
    if not math.isinf(p) and not is_banded(p, dtype):
        return _banded(arrays, seg, num, p, dtype, counted, masked)
    partials = _mask_rows(jnp.stack([power_sum(x, p, dtype) for x in arrays]), counted)
    totals = _segment(partials, seg, num, "max" if math.isinf(p) else "sum")
    if math.isinf(p):
        trusted = jnp.isfinite(totals) & ~_nan_probe(arrays, seg, num, dtype, counted)
    else:
        hi_safe = int(np.finfo(dtype).maxexp) - HEADROOM
        trusted = jnp.isfinite(totals) & (totals >= TINY) & (totals <= 2.0**hi_safe)
    # The record holds the plain sum where the measure would: in the middle band, or as
    # the scaled sum S of (M, S) = (1, total), or as the max.
    slot = bands(p, dtype)[1] if is_banded(p, dtype) else (1 if not math.isinf(p) else 0)
    size = width(p, dtype)

    def common() -> Local:
        # zeros_like keeps the totals' varying mesh axes, as the bands' outputs have them.
        acc = jnp.zeros_like(totals, shape=(num, size)).at[:, slot].set(totals)
        if slot == 1 and size == 2:
            acc = acc.at[:, 0].set(jnp.ones_like(totals))
        return Local(acc, jnp.zeros_like(totals, jnp.int32), jnp.zeros_like(totals, bool))

    return lax.cond(
        jnp.all(trusted),
        common,
        lambda: _banded(arrays, seg, num, p, dtype, counted, masked),
    )


def varying_axes(x: Any) -> frozenset[str]:
    """The manual mesh axes `x` varies over under `shard_map` (none elsewhere)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", ()))


class _ByPlatform:
    """One function, lowered to `cpu` on CPU and to `default` on every other platform.

    `lax.platform_dependent` would do, but jax 0.10 lowers it to a `stablehlo.case` on a
    constant index even for a single platform, and a case is what the GPU/TPU step must
    not hold. A primitive with a lowering rule per platform leaves no trace of the other
    platform's code. Both functions compute the same values; derivatives and batching
    go through `default`, which is branch-free.
    """

    def __init__(
        self,
        name: str,
        cpu: Callable[..., list[Any]],
        default: Callable[..., list[Any]],
        shapes: Callable[..., list[tuple[tuple[int, ...], Any]]],
    ):
        self.cpu, self.default, self.shapes = cpu, default, shapes
        self.prim = core.Primitive(name)
        self.prim.multiple_results = True
        self.prim.def_impl(self._impl)
        self.prim.def_abstract_eval(self._abstract)
        mlir.register_lowering(self.prim, mlir.lower_fun(default, multiple_results=True))
        mlir.register_lowering(
            self.prim, mlir.lower_fun(cpu, multiple_results=True), platform="cpu"
        )
        ad.primitive_jvps[self.prim] = self._jvp
        batching.primitive_batchers[self.prim] = self._batch

    def __call__(self, *args: jax.Array, **params: Any) -> list[jax.Array]:
        # Under shard_map every operand gets the union of their varying axes, so the
        # outputs can take the type of the first one (a no-op at run time).
        varying = frozenset().union(*(varying_axes(x) for x in args))
        args = tuple(
            lax.pcast(x, tuple(sorted(varying - varying_axes(x))), to="varying")
            if varying - varying_axes(x)
            else x
            for x in args
        )
        return self.prim.bind(*args, **params)

    def _impl(self, *args: jax.Array, **params: Any) -> list[jax.Array]:
        # Reached eagerly only under `jax.disable_jit`: op by op, on the default backend.
        chosen = self.cpu if jax.default_backend() == "cpu" else self.default
        return chosen(*args, **params)

    def _abstract(self, *avals: Any, **params: Any) -> list[Any]:
        # The output types are computed, not traced: tracing `default` here would double
        # the trace time of every step.
        like = avals[0]
        return [
            like.update(
                shape=shape,
                dtype=np.dtype(dtype),
                weak_type=False,
                sharding=like.sharding.update(spec=PartitionSpec()),
            )
            for shape, dtype in self.shapes(*avals, **params)
        ]

    def _jvp(
        self, primals: Sequence[jax.Array], tangents: Sequence[Any], **params: Any
    ) -> tuple[list[jax.Array], list[jax.Array]]:
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        outs = self.prim.bind(*primals, **params)
        _, out_tangents = jax.jvp(
            functools.partial(self.default, **params), tuple(primals), tuple(tangents)
        )
        return outs, out_tangents

    def _batch(
        self, args: Sequence[jax.Array], dims: Sequence[Any], **params: Any
    ) -> tuple[list[jax.Array], list[int]]:
        # An unbatched operand's dimension is None (`batching.not_mapped`), as vmap spells it.
        outs = jax.vmap(functools.partial(self.default, **params), in_axes=list(dims))(*args)
        return outs, [0] * len(outs)


def _group_args(flat: Sequence[jax.Array], has_counted: bool) -> tuple[list[Any], Any]:
    return (list(flat[:-1]), flat[-1]) if has_counted else (list(flat), None)


def _group_cpu(*flat: jax.Array, has_counted: bool, **params: Any) -> list[jax.Array]:
    arrays, counted = _group_args(flat, has_counted)
    return list(_cpu(arrays, counted=counted, **params))


def _group_default(*flat: jax.Array, has_counted: bool, **params: Any) -> list[jax.Array]:
    arrays, counted = _group_args(flat, has_counted)
    return list(_banded(arrays, counted=counted, **params))


def _group_shapes(
    *avals: Any, num: int, p: float, dtype: np.dtype, **params: Any
) -> list[tuple[tuple[int, ...], Any]]:
    del avals, params
    return [((num, width(p, dtype)), dtype), ((num,), np.int32), ((num,), np.bool_)]


_GROUP_NORMS = _ByPlatform("optaxclip_group_partials", _group_cpu, _group_default, _group_shapes)


def local_group_norms(
    arrays: Sequence[jax.Array],
    segments: Sequence[int],
    num: int,
    p: float,
    dtype: Any,
    counted: jax.Array | None = None,
    masked: bool = True,
) -> Local:
    """Per-group partials of this device's leaves, by the platform's measure.

    Args:
      arrays: the leaves.
      segments: the group of each leaf.
      num: the number of groups.
      p: the norm order (`math.inf` for the max-norm).
      dtype: the accumulation dtype.
      counted: optional bool per leaf; a leaf marked False adds nothing (it is
        counted on another device).
      masked: whether the band sums skip non-finite elements, so that
        `Norms.finite` is the norm of the finite rest (one more reduction per leaf
        on accelerators); unmasked, NaN and inf propagate into the norm by themselves.
    """
    return _local_group_norms(
        list(arrays),
        counted,
        segments=tuple(segments),
        num=num,
        p=p,
        dtype=np.dtype(dtype),
        masked=masked,
    )


# Jitted so that eager calls compile once per shape, not once per call; under an outer
# `jit` it is inlined.
@functools.partial(jax.jit, static_argnames=("segments", "num", "p", "dtype", "masked"))
def _local_group_norms(
    arrays: list[jax.Array],
    counted: jax.Array | None,
    *,
    segments: tuple[int, ...],
    num: int,
    p: float,
    dtype: np.dtype,
    masked: bool,
) -> Local:
    if not arrays:
        zeros = jnp.zeros([num], dtype)
        return Local(
            jnp.zeros([num, width(p, dtype)], dtype), jnp.zeros([num], jnp.int32), zeros > 0
        )
    flat = [*arrays, counted] if counted is not None else arrays
    acc, nonfinite, nan = _GROUP_NORMS(
        *flat,
        has_counted=counted is not None,
        seg=segments,
        num=num,
        p=p,
        dtype=dtype,
        masked=masked,
    )
    return Local(acc, nonfinite, nan)


def finish(local: Local, p: float) -> Norms:
    """The norms from reduced partials: the root, taken once, and NaN/inf as counted."""
    dtype = np.dtype(local.acc.dtype)
    if math.isinf(p):
        finite = local.acc[:, 0]
    elif is_banded(p, dtype):
        finite = combine_bands(list(local.acc.T), p, dtype)
    else:
        finite = local.acc[:, 0] * safe_root(local.acc[:, 1], p)
    inf = local.nonfinite > 0
    norm = jnp.where(local.nan, jnp.nan, jnp.where(inf, jnp.inf, finite))
    return Norms(norm=norm, finite=finite, nonfinite=local.nonfinite.astype(jnp.int32))


def group_norms(
    arrays: Sequence[jax.Array],
    segments: Sequence[int],
    num: int,
    p: float,
    dtype: Any,
    counted: jax.Array | None = None,
    reduce: Reducer | None = None,
    masked: bool = True,
) -> Norms:
    """Measure and reduce: the norms of `num` groups of leaves, combined across devices."""
    local = local_group_norms(arrays, segments, num, p, dtype, counted, masked)
    if reduce is not None:
        local = reduce(local)
    return finish(local, p)


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
    """L2 norms over `axes` of each leaf, NaN/inf propagating, by the platform's measure.

    With `rescue_tiny=False` units whose squares underflow may come out as 0: the
    policies that use it compare unit norms with thresholds far above 1e-19, where
    that cannot change a decision, and they skip the lowest band.
    """
    return _unit_norms(
        list(arrays),
        axes=tuple(tuple(a) for a in axes),
        dtype=np.dtype(dtype),
        rescue_tiny=rescue_tiny,
    )


def _unit_banded(
    arrays: Sequence[jax.Array],
    axes: tuple[tuple[int, ...], ...],
    dtype: np.dtype,
    rescue_tiny: bool,
) -> UnitNorms:
    norms = []
    for x, ax in zip(arrays, axes, strict=True):
        sums = band_sums(x, 2.0, dtype, masked=False, axis=ax, tiny=rescue_tiny)
        total = sum(sums[1:], sums[0])
        n = combine_bands([jnp.where(jnp.isfinite(s), s, 0.0) for s in sums], 2.0, dtype)
        n = jnp.where(jnp.isinf(total), jnp.inf, n)
        norms.append(jnp.where(jnp.isnan(total), jnp.nan, n))
    return UnitNorms(norms, jnp.stack([_count(x) for x in arrays]))


def _unit_cpu(
    arrays: Sequence[jax.Array],
    axes: tuple[tuple[int, ...], ...],
    dtype: np.dtype,
    rescue_tiny: bool,
) -> UnitNorms:
    sums = [power_sum(x, 2.0, dtype, axis=ax) for x, ax in zip(arrays, axes, strict=True)]
    trusted = jnp.all(jnp.stack([jnp.all(jnp.isfinite(s)) for s in sums]))
    if rescue_tiny:
        trusted &= jnp.all(jnp.stack([jnp.all(s >= TINY) for s in sums]))

    def common() -> UnitNorms:
        counts = jnp.zeros_like(jnp.stack([s.ravel()[0] for s in sums]), jnp.int32)
        return UnitNorms([safe_root(s, 2.0) for s in sums], counts)

    return lax.cond(trusted, common, lambda: _unit_banded(arrays, axes, dtype, rescue_tiny))


def _unit_flat(fn: Callable[..., UnitNorms]) -> Callable[..., list[jax.Array]]:
    def flat(*arrays: jax.Array, **params: Any) -> list[jax.Array]:
        out = fn(list(arrays), **params)
        return [*out.norms, out.nonfinite]

    return flat


def _unit_shapes(
    *avals: Any, axes: tuple[tuple[int, ...], ...], dtype: np.dtype, **params: Any
) -> list[tuple[tuple[int, ...], Any]]:
    del params
    norms = [(_reduced_shape(a.shape, ax), dtype) for a, ax in zip(avals, axes, strict=True)]
    return [*norms, ((len(avals),), np.int32)]


_UNIT_NORMS = _ByPlatform(
    "optaxclip_unit_norms", _unit_flat(_unit_cpu), _unit_flat(_unit_banded), _unit_shapes
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
    *norms, counts = _UNIT_NORMS(*arrays, axes=axes, dtype=dtype, rescue_tiny=rescue_tiny)
    return UnitNorms(list(norms), counts)
