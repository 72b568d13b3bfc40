"""NumPy's linear-interpolation percentile of a sorted float32 vector, exact in float32.

`numpy.percentile(x, q)` interpolates at the position q/100·(n−1) in float64.
Computed in float32, that position is off by half a float32 step of itself, so
its fraction, multiplied by the gap between neighbouring values, moves the
result by up to 1e-4 (relative) on long histories. Here every product is split
into 12-bit halves (exact in float32, whatever XLA fuses into an FMA), sums
carry their rounding errors (two-sum), and the result is rounded once:

- When q/100 is a fraction num/den with den < 4096 (every whole-number q,
  and 12.5, 37.5, ...; concrete, or traced and whole at run time), the position
  is split in int32 arithmetic and the result is the float32 nearest to the
  exact percentile, ties to even (an exact sign test settles the midpoint).
- Otherwise q/100 is carried to 72 bits (a concrete q: NumPy's float64 q/100
  exactly) and the result is the float32 nearest to the percentile unless that
  lies within about 1e-13 (relative) of a float32 rounding midpoint.

So the result is `numpy.float32(numpy.percentile(x, q))`, except where the
exact percentile is (within NumPy's own float64 error of) a float32 rounding
midpoint: there NumPy's rounding errors pick the neighbour, one ulp apart.
Branch-free, O(1) scalar work, for values in [1e-30, 1e36] and up to 2**24 of them.
"""

from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MAX_SIZE = 2**24  # positions split into two 12-bit halves; num * position fits int32


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x = hi + lo exactly, hi its 12 leading significant bits, lo the other 12."""
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000)
    hi = lax.bitcast_convert_type(bits, jnp.float32)
    return hi, x - hi


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s = fl(a + b) and its rounding error e: s + e = a + b exactly (Knuth)."""
    s = a + b
    v = s - a
    return s, (a - (s - v)) + (b - v)


def _times(x: jax.Array, y: jax.Array) -> list[jax.Array]:
    """x·y as four float32 products of 12-bit halves, each exact."""
    xh, xl = _split(x)
    yh, yl = _split(y)
    return [xh * yh, xh * yl, xl * yh, xl * yl]


def _times_small(x: jax.Array, k: jax.Array) -> list[jax.Array]:
    """x·k exactly, for an integer k < 4096 held in a float32."""
    xh, xl = _split(x)
    return [xh * k, xl * k]


def _sum(terms: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The sum as hi + lo, to about 2**-48 of the terms' magnitude."""
    hi, lo = terms[0], jnp.zeros_like(terms[0])
    for t in terms[1:]:
        hi, err = _two_sum(hi, t)
        lo = lo + err
    return hi, lo


def _sign(terms: list[jax.Array]) -> jax.Array:
    """The exact sign of a sum of float32 terms.

    Shewchuk's grow-expansion keeps the sum as non-overlapping parts of increasing
    magnitude; the largest non-zero part carries the sign.
    """
    parts: list[jax.Array] = []
    for t in terms:
        carry, grown = t, []
        for p in parts:
            carry, err = _two_sum(carry, p)
            grown.append(err)
        parts = [*grown, carry]
    sign = jnp.zeros([], jnp.float32)
    for p in parts:
        sign = jnp.where(p != 0, jnp.sign(p), sign)
    return sign


def _fraction(q: Any, size: int) -> tuple[int, int] | None:
    """q / 100 as num / den with den < 4096 and num·(size − 1) < 2**31, for a concrete q."""
    if isinstance(q, jax.core.Tracer):
        return None
    f = Fraction(float(q)) / 100
    if f.denominator < 4096 and f.numerator * max(size - 1, 1) < 2**31:
        return f.numerator, f.denominator
    return None


def _truncate(x: Any, xp: Any) -> Any:
    """x (float64) rounded towards zero to float32; x ≥ 0."""
    y = x.astype(np.float32)
    return xp.where(y.astype(x.dtype) > x, xp.nextafter(y, np.float32(0)), y)


def _less_hundred(x: jax.Array, c: jax.Array) -> jax.Array:
    """x − 100·c, exact when c ≈ x / 100 (Sterbenz)."""
    ch, cl = _split(c)
    return (x - ch * 100) - cl * 100


def _hundredth(q: Any) -> tuple[Any, Any, Any]:
    """q / 100 as three float32 pieces, the first two non-negative, to about 2**-70."""
    traced = isinstance(q, jax.core.Tracer)
    if not traced or q.dtype == jnp.float64:
        xp = jnp if traced else np
        c = (q if traced else np.float64(float(q))) / 100
        c1 = _truncate(c, xp)
        r = c - c1.astype(c.dtype)
        c2 = _truncate(r, xp)
        return c1, c2, (r - c2.astype(c.dtype)).astype(np.float32)
    q = q.astype(jnp.float32)
    # Long division, rounding the first quotient down so that every remainder is ≥ 0.
    c1 = q / 100
    c1 = jnp.where(_less_hundred(q, c1) < 0, jnp.nextafter(c1, 0.0), c1)
    r1 = _less_hundred(q, c1)
    c2 = r1 / 100
    return c1, c2, _less_hundred(r1, c2) / 100


def _float_position(m: jax.Array, q: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """floor(q/100·m) and its fraction as hi + lo, q/100 carried in float32 pieces."""
    c1, c2, c3 = _hundredth(q)
    m_hi = (m >> 12) << 12
    halves = [m_hi.astype(jnp.float32), (m - m_hi).astype(jnp.float32)]
    # Each product is exact and non-negative, so its floor and fraction are too.
    whole, fractions = jnp.zeros([], jnp.int32), []
    for c in (c1, c2):
        for half in halves:
            for t in _times(c, half):
                f = jnp.floor(t)
                whole = whole + f.astype(jnp.int32)
                fractions.append(t - f)
    fractions.append(c3 * m.astype(jnp.float32))
    hi, lo = _sum(fractions)
    k = jnp.floor(jnp.maximum(hi, 0.0))
    return whole + k.astype(jnp.int32), hi - k, lo


def _exact_position(
    m: jax.Array, num: jax.Array, den: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """floor(num·m / den), its fraction rem/den as hi + lo, and rem (float32)."""
    x = num * m
    low = x // den
    rem = (x - low * den).astype(jnp.float32)
    d = den.astype(jnp.float32)
    g_hi = rem / d
    gh, gl = _split(g_hi)
    g_lo = ((rem - gh * d) - gl * d) / d
    return low, g_hi, g_lo, rem


def _interpolate(
    a: jax.Array,
    b: jax.Array,
    g_hi: jax.Array,
    g_lo: jax.Array,
    exact: tuple[Any, jax.Array, jax.Array] | None,
) -> jax.Array:
    """a + (b − a)·(g_hi + g_lo) rounded once; exactly rounded when `exact` = (use, rem, den)."""
    d_hi, d_lo = _two_sum(b, -a)
    hi, lo = _sum([a, *_times(d_hi, g_hi), d_hi * g_lo, d_lo * g_hi])
    r0, err = _two_sum(hi, lo)
    if exact is None:
        return r0
    # r0 is within an ulp of the exact ((den − rem)·a + rem·b) / den. Which side of the
    # midpoint towards its error the exact value lies is the sign of
    # (den − rem)·a + rem·b − den·midpoint, a sum of exact float32 products.
    use, rem, den = exact
    toward = jnp.nextafter(r0, jnp.where(err < 0, -jnp.inf, jnp.inf).astype(jnp.float32))
    half = (toward - r0) * 0.5
    terms = [*_times_small(a, den - rem), *_times_small(b, rem)]
    terms += [-t for t in _times_small(r0, den)] + [-(half * den)]
    side = _sign(terms)
    even = (lax.bitcast_convert_type(toward, jnp.uint32) & 1) == 0
    beyond = (side * half > 0) | ((side == 0) & even & (half != 0))
    return jnp.where(use & beyond, toward, r0)


def percentile(ordered: jax.Array, valid: jax.Array, q: Any) -> jax.Array:
    """The `q` percentile of `ordered[:valid]` (sorted float32), NumPy's "linear" method.

    Args:
      ordered: a sorted float32 vector of at most `MAX_SIZE` values.
      valid: how many leading values count (int32, at least 1).
      q: the percentile in [0, 100]: a Python or NumPy number, or a traced scalar.

    Returns:
      A float32 scalar: the exact percentile rounded to float32 (see the module's
      docstring for the guarantee). Its gradient is that of a + (b − a)·fraction.
    """
    m = valid - 1
    if isinstance(q, jax.core.Tracer):
        q = lax.stop_gradient(q)
    frac = _fraction(q, ordered.shape[0])
    exact: tuple[Any, jax.Array, jax.Array] | None
    if frac is not None:
        num, den = jnp.int32(frac[0]), jnp.int32(frac[1])
        low, g_hi, g_lo, rem = _exact_position(m, num, den)
        exact = (True, rem, den.astype(jnp.float32))
    else:
        low, g_hi, g_lo = _float_position(m, q)
        exact = None
        if isinstance(q, jax.core.Tracer):
            qf = q if q.dtype == jnp.float64 else q.astype(jnp.float32)
            whole = (qf == jnp.floor(qf)) & (qf >= 0) & (qf <= 100)
            e = _exact_position(m, jnp.clip(qf, 0, 100).astype(jnp.int32), jnp.int32(100))
            pairs = zip(e[:3], (low, g_hi, g_lo), strict=True)
            low, g_hi, g_lo = (jnp.where(whole, x, y) for x, y in pairs)
            exact = (whole, e[3], jnp.float32(100))
    low = jnp.clip(low, 0, m)
    a, b = ordered[low], ordered[jnp.minimum(low + 1, m)]
    value = _interpolate(lax.stop_gradient(a), lax.stop_gradient(b), g_hi, g_lo, exact)
    # The exact value forwards; the plain interpolation carries the gradient.
    approx = a + (b - a) * g_hi
    return value + (approx - lax.stop_gradient(approx))
