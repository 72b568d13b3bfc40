"""optaxclip against the papers' rules, and against what the papers' own code does.

Float64 NumPy replays written here from the behaviour of the authors' public reference code
(ZClip: bluorion-com/ZClip `zclip/zclip.py`; AutoClip: pseeth/autoclip `autoclip.py`; AdaGC:
lishuai-97/AdaGC, the `AdaGC` class of its Megatron patch), not copied from it. Each model has a
switch for every way optaxclip deliberately differs from that code (README, "Differences from the
papers' code"). With the switches at optaxclip's choices a model is the rule of API.md, and
optaxclip must equal it step by step: the rescale, the warm-up, the statistics and the NaN step.
Flipping one switch gives the reference code's behaviour, and each test asserts that optaxclip
differs from it, by the size the README states.

The first part checks `autoclip`'s threshold against NumPy's percentile, exactly.
"""

import dataclasses
import functools
import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import jax
import numpy as np
import optax
import pytest

import optaxclip

# Every reference implementation divides by `norm + 1e-6`, as torch.nn.utils.clip_grad_norm_ does.
TORCH_EPS = 1e-6
DIM = 8


# ---------------------------------------------------------------------------------------------
# Streams and a jitted replay.


def vectors(norms: np.ndarray, seed: int, dim: int = DIM) -> np.ndarray:
    """One float32 row per norm, in a random direction; a NaN norm gives a row with one NaN."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(len(norms), dim))
    rows *= np.nan_to_num(norms, nan=1.0)[:, None] / np.linalg.norm(rows, axis=1, keepdims=True)
    rows[np.isnan(norms), 0] = np.nan
    return rows.astype(np.float32)


def norms64(rows: np.ndarray) -> np.ndarray:
    """What every model sees: the float64 norms of the float32 rows optaxclip receives."""
    return np.linalg.norm(np.asarray(rows, np.float64), axis=-1)


def run(tx: Any, grads: Any, fields: tuple[str, ...], params: Any = None) -> tuple[Any, dict]:
    """Each step's updates and the chosen state fields, from one jitted `lax.scan` over `grads`."""

    def step(state: Any, g: Any) -> tuple[Any, Any]:
        updates, state = tx.update(g, state, params)
        inner = getattr(state, "inner_state", state)
        return state, (updates, {f: getattr(inner, f) for f in fields})

    replay = jax.jit(lambda grads: jax.lax.scan(step, tx.init(params), grads)[1])
    return jax.device_get(replay(grads))


def ratios(updates: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """The factor each row was multiplied by, measured from the output."""
    return norms64(updates) / norms64(grads)


def lognormal(
    steps: int, seed: int, level: float, spikes: dict[int, float], sigma: float = 0.1
) -> np.ndarray:
    norms = level * np.exp(np.random.default_rng(seed).normal(0.0, sigma, steps))
    for t, factor in spikes.items():
        norms[t] *= factor
    return norms


def without(values: np.ndarray, t: int) -> np.ndarray:
    return np.delete(values, t, axis=0)


def assert_as_if_absent(outs: Any, clean: Any, t_bad: int) -> None:
    """Every step of the run with a NaN step at `t_bad` equals the run without it, bit for bit."""
    for got, want in zip(jax.tree.leaves(outs), jax.tree.leaves(clean), strict=True):
        np.testing.assert_array_equal(without(got, t_bad), want)


# ---------------------------------------------------------------------------------------------
# 1. autoclip's threshold is NumPy's percentile of the kept history, rounded once to float32.


def spiky_norms(steps: int, seed: int) -> np.ndarray:
    """A drifting level; 15% spikes up to 1000x and 15% dips to 1e-3x, so that the 10th and 90th
    percentiles sit among sparse values; a NaN step every 487 steps."""
    rng = np.random.default_rng(seed)
    norms = np.exp(np.cumsum(rng.normal(0.0, 0.02, steps)) + rng.normal(0.0, 0.3, steps))
    kind = rng.random(steps)
    factors = np.exp(rng.uniform(np.log(3.0), np.log(1000.0), steps))
    norms = np.where(kind < 0.15, norms * factors, np.where(kind > 0.85, norms / factors, norms))
    norms[100::487] = np.nan
    return norms


def nearest_float32(x: Fraction) -> tuple[np.float32, bool]:
    """The float32 nearest to x > 0 (ties to even), and whether x is a tie, halfway between two."""
    near = float(x)  # correctly rounded to float64
    f = np.float32(near)  # and again: wrong only if `near` landed on a float32 midpoint
    other = np.nextafter(f, np.float32(np.inf) if near > float(f) else np.float32(0))
    midpoint = (float(f) + float(other)) / 2  # exact in float64
    if near != midpoint:
        return f, False
    if x == Fraction(midpoint):
        return f, True  # float32() rounded the tie to even
    return (other if (x > Fraction(midpoint)) == (other > f) else f), False


def exact_percentile(ordered: np.ndarray, q: Fraction) -> tuple[Fraction, Fraction]:
    """NumPy's "linear" percentile of sorted values in exact rational arithmetic, and the upper
    of the two values it interpolates between."""
    position = q / 100 * (len(ordered) - 1)
    low = math.floor(position)
    a = Fraction(float(ordered[low]))
    b = Fraction(float(ordered[min(low + 1, len(ordered) - 1)]))
    return a + (b - a) * (position - low), b


def float32_position_percentile(ordered: np.ndarray, q: float) -> np.float32:
    """The interpolation as it was, in float32 (the position off by half its float32 step)."""
    f32 = np.float32
    position = f32(q) / f32(100) * f32(len(ordered) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(ordered) - 1)
    a, b = f32(ordered[low]), f32(ordered[high])
    return a + (b - a) * (position - f32(low))


def kept_windows(recorded: np.ndarray, history_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Each finite step and the sorted last `history_size` finite norms, the current included."""
    steps = np.flatnonzero(np.isfinite(recorded))
    finite = recorded[steps].astype(np.float64)
    for k, t in enumerate(steps):
        yield int(t), np.sort(finite[max(0, k + 1 - history_size) : k + 1])


@functools.cache
def percentile_replay(history_size: int, steps: int, q: float, traced: bool) -> dict:
    norms = spiky_norms(steps, seed=history_size + int(q))
    grads = vectors(norms, seed=1)
    if traced:
        tx = optax.inject_hyperparams(optaxclip.autoclip, static_args=("history_size",))(
            percentile=q, history_size=history_size
        )
    else:
        tx = optaxclip.autoclip(q, history_size=history_size)
    _, fields = run(tx, grads, ("grad_norm", "threshold"))
    return fields


LONG_RUNS = [(1000, 1500), (4096, 4600)]  # (history_size, steps): the history wraps around


def check_against_numpy(history_size: int, steps: int, q: float) -> dict[str, Any]:
    """Every threshold of a run against the exact percentile and NumPy's; what differed."""
    fields = percentile_replay(history_size, steps, q, traced=False)
    seen = {"steps": 0, "full": 0, "off": 0, "numpy_ties": 0, "float32_off": 0, "worst": 0.0}
    for t, ordered in kept_windows(fields["grad_norm"], history_size):
        seen["steps"] += 1
        seen["full"] += len(ordered) == history_size
        got = fields["threshold"][t]
        exact, upper = exact_percentile(ordered, Fraction(q))
        nearest, tie = nearest_float32(exact)
        seen["off"] += got != nearest
        numpy64 = np.percentile(ordered, q, method="linear")
        if got != np.float32(numpy64):
            assert tie, f"step {t}: {got} != float32(numpy) {numpy64!r}, not at a tie"
            # NumPy's float64 position and interpolation are off by at most ~2**-41 of `upper`.
            assert abs(Fraction(numpy64) - exact) <= upper / 2**40, f"step {t}"
            seen["numpy_ties"] += 1
        old = float32_position_percentile(ordered, q)
        seen["float32_off"] += old != np.float32(numpy64)
        seen["worst"] = max(seen["worst"], abs(float(old) / numpy64 - 1))
    return seen


@pytest.mark.parametrize("q", [10.0, 50.0, 90.0])
@pytest.mark.parametrize(("history_size", "steps"), LONG_RUNS)
def test_autoclip_threshold_is_numpys_percentile_rounded_once(
    history_size: int, steps: int, q: float
) -> None:
    """For a whole-number percentile the threshold is the exactly rounded percentile.

    NumPy computes in float64; it differs from that only where the exact value is a float32
    rounding midpoint, by NumPy's own float64 error (which picks a neighbour, one ulp away).
    """
    seen = check_against_numpy(history_size, steps, q)
    assert seen["full"] > 400, "the history wraps around"
    assert seen["off"] == 0, f"{seen['off']} thresholds not the exactly rounded percentile"
    assert seen["numpy_ties"] <= 0.1 * seen["steps"], seen
    if q != 50:  # the data moves a float32 position (exact for q = 50): it would fail this test
        assert seen["float32_off"] > 0.3 * seen["steps"] and seen["worst"] > 5e-7, seen


@pytest.mark.parametrize("q", [10.0, 50.0, 90.0])
@pytest.mark.parametrize(("history_size", "steps"), LONG_RUNS)
def test_autoclip_traced_percentile_gives_the_same_thresholds(
    history_size: int, steps: int, q: float
) -> None:
    """Under `inject_hyperparams` q is a float32 scalar, whole at run time: the same exact path."""
    concrete = percentile_replay(history_size, steps, q, traced=False)
    traced = percentile_replay(history_size, steps, q, traced=True)
    np.testing.assert_array_equal(traced["threshold"], concrete["threshold"])


@pytest.mark.parametrize("traced", [False, True], ids=["concrete", "traced"])
def test_autoclip_threshold_with_a_fractional_percentile(traced: bool) -> None:
    """q/100 with no small denominator: correctly rounded but within 2**-40 of a midpoint."""
    q = 33.3
    fields = percentile_replay(1000, 1500, q, traced)
    numpy_q = float(np.float32(q)) if traced else q
    near = 0
    for t, ordered in kept_windows(fields["grad_norm"], 1000):
        got, numpy64 = fields["threshold"][t], np.percentile(ordered, numpy_q, method="linear")
        want = np.float32(numpy64)
        if got != want:  # then neighbours, and NumPy's value all but on their midpoint
            assert abs(int(got.view(np.int32)) - int(want.view(np.int32))) == 1, f"step {t}"
            midpoint = (Fraction(float(got)) + Fraction(float(want))) / 2
            assert abs(Fraction(numpy64) - midpoint) <= Fraction(numpy64) / 2**40, f"step {t}"
            near += 1
    assert near <= 5


@pytest.mark.parametrize("traced", [False, True], ids=["concrete", "traced"])
def test_autoclip_ties_round_to_even(traced: bool) -> None:
    """The median of two neighbouring floats is their midpoint: the even one is the threshold."""
    one, odd = np.float32(1.0), np.nextafter(np.float32(1.0), np.float32(2))
    norms = np.array([one, odd, odd, np.nextafter(odd, np.float32(2))])  # even, odd; odd, even
    if traced:
        factory = optax.inject_hyperparams(optaxclip.autoclip, static_args=("history_size",))
        tx = factory(percentile=50.0, history_size=2)
    else:
        tx = optaxclip.autoclip(50.0, history_size=2)
    _, fields = run(tx, norms[:, None], ("grad_norm", "threshold"))
    np.testing.assert_array_equal(fields["grad_norm"], norms)
    np.testing.assert_array_equal(fields["threshold"][[1, 3]], [norms[0], norms[3]])


def test_autoclip_history_size_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"`history_size` must be at most 2\*\*24"):
        optaxclip.autoclip(history_size=2**24 + 1)


# ---------------------------------------------------------------------------------------------
# 2. ZClip (zscore mode, "adaptive_scaling").


@dataclasses.dataclass
class ZClip:
    """ZClip on a stream of global norms, in float64; `factor(n)` is the step's rescale.

    The defaults are optaxclip's rule. The reference class differs by `eps=TORCH_EPS` (it scales
    by threshold / (n + 1e-6)), `max_norm=1.0` (its default `max_grad_norm`, applied in warm-up by
    `torch.nn.utils.clip_grad_norm_`) and `nan_as_absent=False` (a NaN norm enters its warm-up
    buffer or its EMA).
    """

    alpha: float = 0.97
    z_threshold: float = 2.5
    warmup_steps: int = 25
    max_norm: float | None = None
    eps: float = 0.0
    nan_as_absent: bool = True
    buffer: list[float] = dataclasses.field(default_factory=list)
    mean: float | None = None
    var: float = 0.0
    margins: list[float] = dataclasses.field(default_factory=list)

    def factor(self, n: float) -> float:
        if self.nan_as_absent and not np.isfinite(n):
            return 1.0
        if self.mean is None:
            self.buffer.append(n)
            if len(self.buffer) == self.warmup_steps:
                self.mean, self.var = float(np.mean(self.buffer)), float(np.var(self.buffer))
            if self.max_norm is None:
                return 1.0
            if self.eps:  # clip_grad_norm_: min(1, max / (n + eps)), NaN in, NaN out
                return float(np.minimum(1.0, self.max_norm / (n + self.eps)))
            return self.max_norm / n if n > self.max_norm else 1.0
        std = math.sqrt(self.var)
        z = (n - self.mean) / (std + 1e-6)
        self.margins.append(abs(z / self.z_threshold - 1))
        spike = z > self.z_threshold
        x = self.mean + self.z_threshold**2 * std / z if spike else n
        # Python's min(x, max_norm), as the reference calls it: a NaN x stays NaN.
        limit = self.max_norm if self.max_norm is not None and self.max_norm < x else x
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return limit / (n + self.eps) if n > limit else 1.0

    def stats(self) -> tuple[float, float]:
        """(μ, σ²); during warm-up the running mean and population variance, as optaxclip keeps."""
        if self.mean is None:
            return float(np.mean(self.buffer)), float(np.var(self.buffer))
        return self.mean, self.var


def replay_model(model: Any, norms: np.ndarray) -> tuple[np.ndarray, list]:
    factors, stats = [], []
    for n in norms:
        factors.append(model.factor(float(n)))
        stats.append(model.stats() if hasattr(model, "stats") else None)
    return np.array(factors), stats


# Norms near 0.05 (where eps / n is 2e-5) with single and back-to-back spikes after warm-up.
ZCLIP_SPIKES = {40: 2.0, 41: 1.8, 70: 4.0, 100: 1.5, 130: 3.0, 131: 2.5, 132: 2.0, 160: 6.0}
ZCLIP_GRADS = vectors(lognormal(200, 0, 0.05, ZCLIP_SPIKES), seed=2)
ZCLIP_FIELDS = ("clipped", "threshold", "mean", "var", "step_count")


@functools.cache
def zclip_run(name: str, **options: Any) -> tuple[Any, dict]:
    grads = {"plain": ZCLIP_GRADS, "nan": ZCLIP_NAN, "nan_warmup": ZCLIP_NAN_WARMUP}[name]
    return run(optaxclip.zclip(**options), grads, ZCLIP_FIELDS)


def test_zclip_is_the_papers_rule() -> None:
    updates, fields = zclip_run("plain")
    model = ZClip()
    factors, stats = replay_model(model, norms64(ZCLIP_GRADS))
    assert min(model.margins) > 1e-2, "a z-score sits on the threshold"
    # Warm-up: nothing clipped; after it μ, σ² are the mean and population variance.
    warm = norms64(ZCLIP_GRADS[:25])
    assert not fields["clipped"][:25].any()
    np.testing.assert_allclose(fields["mean"][24], np.mean(warm), rtol=1e-6)
    np.testing.assert_allclose(fields["var"][24], np.var(warm), rtol=1e-4)
    # The rescale threshold / n on exactly the spike steps, and the EMA statistics.
    np.testing.assert_array_equal(fields["clipped"], factors < 1)
    assert set(ZCLIP_SPIKES) <= set(np.flatnonzero(factors < 1)) and (factors < 1).sum() < 12
    np.testing.assert_allclose(ratios(updates, ZCLIP_GRADS), factors, rtol=2e-6)
    np.testing.assert_allclose(fields["mean"], [s[0] for s in stats], rtol=2e-6)
    np.testing.assert_allclose(fields["var"], [s[1] for s in stats], rtol=1e-4)
    np.testing.assert_array_equal(fields["step_count"], np.arange(1, 201))


def test_zclip_reference_divides_by_norm_plus_eps() -> None:
    """The reference scales by τ / (n + 1e-6): smaller than optaxclip's τ / n by 1e-6 / n."""
    updates, fields = zclip_run("plain")
    norms = norms64(ZCLIP_GRADS)
    factors, _ = replay_model(ZClip(eps=TORCH_EPS), norms)
    clipped = fields["clipped"]
    np.testing.assert_array_equal(clipped, factors < 1)
    measured = ratios(updates, ZCLIP_GRADS)[clipped] / factors[clipped] - 1
    np.testing.assert_allclose(measured, TORCH_EPS / norms[clipped], atol=2e-6)
    assert measured.max() > 1e-5


# Early in training norms sit above 1, where the reference class's default cap clips every step.
ZCLIP_HIGH = vectors(lognormal(200, 3, 2.0, ZCLIP_SPIKES), seed=4)


def test_zclip_reference_class_caps_at_one_by_default() -> None:
    norms = norms64(ZCLIP_HIGH)
    factors, _ = replay_model(ZClip(max_norm=1.0, eps=TORCH_EPS), norms)
    assert (factors < 1).all(), "the class default max_grad_norm=1.0 clips every step"
    tx_fields = ("clipped",)
    updates, fields = run(optaxclip.zclip(), ZCLIP_HIGH, tx_fields)
    assert fields["clipped"].sum() < 12, "zclip() clips the spikes only"
    unclipped = ~fields["clipped"]
    np.testing.assert_allclose(
        (ratios(updates, ZCLIP_HIGH) / factors)[unclipped], norms[unclipped] + TORCH_EPS, rtol=1e-6
    )
    # zclip(max_norm=1.0) is the class: the same decisions, within its eps.
    capped, fields = run(optaxclip.zclip(max_norm=1.0), ZCLIP_HIGH, tx_fields)
    assert fields["clipped"].all()
    measured = ratios(capped, ZCLIP_HIGH) / factors - 1
    np.testing.assert_allclose(measured, TORCH_EPS / norms, atol=3e-7)


ZCLIP_NAN = np.insert(ZCLIP_GRADS, 60, np.nan, axis=0)  # after warm-up
ZCLIP_NAN_WARMUP = np.insert(ZCLIP_GRADS, 5, np.nan, axis=0)


@pytest.mark.parametrize(("name", "t_bad"), [("nan", 60), ("nan_warmup", 5)])
def test_zclip_nan_step(name: str, t_bad: int) -> None:
    """The reference's μ turns NaN for good: it never clips again. optaxclip steps as if absent."""
    grads = ZCLIP_NAN if name == "nan" else ZCLIP_NAN_WARMUP
    factors, stats = replay_model(ZClip(nan_as_absent=False), norms64(grads))
    assert np.isnan(stats[-1][0])
    assert not (factors[t_bad + 1 :] < 1).any(), "the reference should never clip again"
    outs = zclip_run(name)
    assert_as_if_absent(outs, zclip_run("plain"), t_bad)
    later = [t for t in ZCLIP_SPIKES if t >= t_bad]
    assert outs[1]["clipped"][t_bad + 1 :].sum() >= len(later) > 0, "optaxclip clips them"


# ---------------------------------------------------------------------------------------------
# 3. AutoClip.


@dataclasses.dataclass
class AutoClip:
    """AutoClip on a stream of global norms, in float64; `factor(n)` is the step's rescale.

    With `eps=0`, `history_size` set and `nan_as_absent`, optaxclip's rule. The reference keeps
    every norm (`history_size=None`), rescales with `torch.nn.utils.clip_grad_norm_(params, τ)`,
    min(1, τ / (n + 1e-6)) on every step (`eps=TORCH_EPS`: the step whose norm *is* τ shrinks
    too), and appends a NaN norm to its history (`nan_as_absent=False`).
    """

    percentile: float = 10.0
    history_size: int | None = 1000
    eps: float = 0.0
    nan_as_absent: bool = True
    norms: list[float] = dataclasses.field(default_factory=list)
    thresholds: list[float] = dataclasses.field(default_factory=list)

    def factor(self, n: float) -> float:
        if self.nan_as_absent and not np.isfinite(n):
            self.thresholds.append(np.nan)
            return 1.0
        self.norms.append(n)
        window = self.norms[-self.history_size :] if self.history_size else self.norms
        tau = float(np.percentile(window, self.percentile, method="linear"))
        self.thresholds.append(tau)
        return float(np.minimum(1.0, tau / (n + self.eps)))


AUTOCLIP_SPIKES = {7: 10.0, 20: 30.0, 21: 8.0, 90: 5.0, 150: 50.0, 151: 3.0, 220: 4.0}
AUTOCLIP_GRADS = vectors(lognormal(300, 5, 0.05, AUTOCLIP_SPIKES), seed=6)
AUTOCLIP_NAN = np.insert(AUTOCLIP_GRADS, 100, np.nan, axis=0)
AUTOCLIP_FIELDS = ("clipped", "threshold", "step_count")


@functools.cache
def autoclip_run(name: str, history_size: int = 1000) -> tuple[Any, dict]:
    grads = {"plain": AUTOCLIP_GRADS, "nan": AUTOCLIP_NAN, "rise": AUTOCLIP_RISE}[name]
    return run(optaxclip.autoclip(10.0, history_size=history_size), grads, AUTOCLIP_FIELDS)


def test_autoclip_is_the_papers_rule() -> None:
    updates, fields = autoclip_run("plain")
    model = AutoClip()
    factors, _ = replay_model(model, norms64(AUTOCLIP_GRADS))
    # No warm-up: the first threshold is the first norm itself, which passes unclipped.
    assert fields["threshold"][0] == norms64(AUTOCLIP_GRADS)[0].astype(np.float32)
    assert not fields["clipped"][0]
    np.testing.assert_allclose(fields["threshold"], model.thresholds, rtol=1e-6)
    np.testing.assert_array_equal(fields["clipped"], factors < 1)
    assert 20 < fields["clipped"].sum() < 280
    np.testing.assert_allclose(ratios(updates, AUTOCLIP_GRADS), factors, rtol=1e-6)
    np.testing.assert_array_equal(fields["step_count"], np.arange(1, 301))


def test_autoclip_reference_shrinks_by_eps_and_at_its_percentile() -> None:
    updates, fields = autoclip_run("plain")
    norms = norms64(AUTOCLIP_GRADS)
    reference = AutoClip(eps=TORCH_EPS)
    factors, _ = replay_model(reference, norms)
    clipped = fields["clipped"]
    measured = ratios(updates, AUTOCLIP_GRADS) / factors - 1
    np.testing.assert_allclose(measured[clipped], TORCH_EPS / norms[clipped], atol=3e-7)
    # Where optaxclip leaves the step alone the reference still shrinks it if n + 1e-6 > τ,
    # always at the first step (τ = n) and whenever the norm is the percentile itself.
    at_percentile = ~clipped & (factors < 1)
    assert at_percentile[0] and at_percentile.sum() >= 2
    np.testing.assert_array_equal(
        norms[at_percentile], np.array(reference.thresholds)[at_percentile]
    )
    np.testing.assert_array_equal(updates[at_percentile], AUTOCLIP_GRADS[at_percentile])
    np.testing.assert_allclose(
        1 - factors[at_percentile], TORCH_EPS / (norms[at_percentile] + TORCH_EPS), rtol=1e-3
    )


# The norms rise tenfold at step 300; the reference's percentile of everything lags behind.
AUTOCLIP_RISE = vectors(
    np.concatenate([lognormal(300, 7, 0.05, {}), lognormal(300, 8, 0.5, {})]), seed=9
)


def test_autoclip_reference_keeps_every_norm() -> None:
    norms = norms64(AUTOCLIP_RISE)
    model = AutoClip(history_size=None)
    factors, _ = replay_model(model, norms)
    # A history of 100 steps has learned the new level by step 400 and scales the updates
    # by ~0.9 (the 10th percentile of steady norms); the reference still clips to the old level.
    updates, short = autoclip_run("rise", 100)
    late = slice(400, None)
    assert np.median(short["threshold"][late] / np.array(model.thresholds)[late]) > 5
    assert np.median(factors[late]) < 0.2 < 0.8 < np.median(ratios(updates, AUTOCLIP_RISE)[late])
    # A history longer than the run is the reference's: the same thresholds and decisions.
    _, long = autoclip_run("rise", 1000)
    np.testing.assert_allclose(long["threshold"], model.thresholds, rtol=1e-6)
    np.testing.assert_array_equal(long["clipped"], factors < 1)


def test_autoclip_nan_step() -> None:
    """The reference's percentile is NaN once a NaN is in its history: every later update is NaN."""
    factors, _ = replay_model(AutoClip(nan_as_absent=False), norms64(AUTOCLIP_NAN))
    assert np.isnan(factors[100:]).all()
    outs = autoclip_run("nan")
    assert_as_if_absent(outs, autoclip_run("plain"), 100)
    assert np.isfinite(without(outs[0], 100)).all()


# ---------------------------------------------------------------------------------------------
# 4. AdaGC.


@dataclasses.dataclass
class AdaGC:
    """AdaGC on a stream of per-leaf norms, in float64; `factors(norms)` is each leaf's rescale.

    The defaults are optaxclip's (`adagc()`). The released code differs by its defaults
    (`relative=1.04, beta=0.99`: its `clip_ratio` and `beta`), by `eps=TORCH_EPS` (it scales by
    limit / (n + 1e-6)), and by `nan_as_absent=False`: a NaN step counts towards the warm-up, and a
    leaf's NaN norm enters its EMA, after which `n > λ·NaN` never holds again.
    """

    relative: float = 1.05
    beta: float = 0.98
    warmup_max_norm: float = 1.0
    warmup_steps: int = 100
    eps: float = 0.0
    nan_as_absent: bool = True
    gamma: np.ndarray | None = None
    steps: int = 0
    warming: list[bool] = dataclasses.field(default_factory=list)
    margins: list[float] = dataclasses.field(default_factory=list)

    def factors(self, norms: np.ndarray) -> np.ndarray:
        if self.nan_as_absent and not np.isfinite(norms).all():
            return np.ones_like(norms)
        total = math.sqrt(float(np.sum(norms**2)))
        self.steps += 1
        self.warming.append(self.steps <= self.warmup_steps)
        if self.warming[-1]:
            coef = self.warmup_max_norm / (total + self.eps)
            factor = coef if coef < 1 else 1.0  # a NaN coefficient scales nothing
            self.margins.append(abs(total / self.warmup_max_norm - 1))
            clipped = norms * factor
            # The smallest clipped norm of the warm-up; `clipped < γ` is False for a NaN.
            first = self.gamma is None
            self.gamma = clipped if first else np.where(clipped < self.gamma, clipped, self.gamma)
            return np.full_like(norms, factor)
        limit = self.relative * self.gamma
        self.margins.extend(abs(norms / limit - 1))
        over = norms > limit
        factors = np.where(over, limit / (norms + self.eps), 1.0)
        self.gamma = self.beta * self.gamma + (1 - self.beta) * np.where(over, limit, norms)
        return factors


ADAGC_SHAPES = {"a": (4,), "b": (2, 3), "c": ()}
ADAGC_LEVELS = {"a": 0.5, "b": 0.05, "c": 0.8}
ADAGC_SPIKES = {"a": {150: 3.0, 170: 1.3, 200: 4.0, 250: 2.0}, "b": {120: 2.0, 121: 1.5}}
ADAGC_STEPS = 300


def adagc_grads(nan_at: int | None = None) -> dict[str, np.ndarray]:
    grads = {}
    for i, (k, shape) in enumerate(ADAGC_SHAPES.items()):
        norms = lognormal(ADAGC_STEPS, 10 + i, ADAGC_LEVELS[k], ADAGC_SPIKES.get(k, {}))
        rows = vectors(norms, seed=20 + i, dim=max(math.prod(shape), 1))
        grads[k] = rows.reshape((ADAGC_STEPS, *shape))
    if nan_at is not None:
        grads = {k: np.insert(v, nan_at, v[nan_at], axis=0) for k, v in grads.items()}
        grads["a"][nan_at, 0] = np.nan
    return grads


def leaf_norms(grads: dict[str, np.ndarray]) -> np.ndarray:
    """[steps, leaves] float64 norms, leaves in flattening order."""
    return np.stack([norms64(grads[k].reshape(len(grads[k]), -1)) for k in ADAGC_SHAPES], axis=1)


def leaf_ratios(updates: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack(
        [
            ratios(updates[k].reshape(len(grads[k]), -1), grads[k].reshape(len(grads[k]), -1))
            for k in ADAGC_SHAPES
        ],
        axis=1,
    )


ADAGC_PARAMS = {k: np.zeros(shape, np.float32) for k, shape in ADAGC_SHAPES.items()}
ADAGC_FIELDS = ("clipped", "gamma", "step_count")


@functools.cache
def adagc_run(nan_at: int | None = None, **options: Any) -> tuple[Any, dict]:
    return run(optaxclip.adagc(**options), adagc_grads(nan_at), ADAGC_FIELDS, ADAGC_PARAMS)


def replay_adagc(model: AdaGC, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    factors, gammas = [], []
    for n in norms:
        factors.append(model.factors(n))
        gammas.append(model.gamma.copy())
    return np.array(factors), np.array(gammas)


def test_adagc_is_the_papers_rule() -> None:
    grads = adagc_grads()
    updates, fields = adagc_run()
    model = AdaGC()
    factors, gammas = replay_adagc(model, leaf_norms(grads))
    assert min(model.margins) > 1e-4, "a norm sits on its limit"
    # Warm-up: one global clip to warmup_max_norm for every leaf; γ the smallest clipped norm.
    warm = factors[:100]
    assert (warm == warm[:, :1]).all() and 0 < (warm[:, 0] < 1).sum() < 100
    np.testing.assert_allclose(gammas[99], np.min(leaf_norms(grads)[:100] * warm, axis=0))
    # After it each leaf against its own EMA: the spikes clipped, the rest left alone.
    np.testing.assert_allclose(leaf_ratios(updates, grads), factors, rtol=2e-6)
    np.testing.assert_allclose(fields["gamma"], gammas, rtol=1e-5)
    late = factors[100:] < 1
    assert 0 < late.sum() < late.size
    assert late[:, 0][[50, 100, 150]].all() and late[:, 1][20]
    np.testing.assert_array_equal(fields["clipped"], (factors < 1).any(axis=1))
    np.testing.assert_array_equal(fields["step_count"], np.arange(1, ADAGC_STEPS + 1))


def test_adagc_reference_divides_by_norm_plus_eps() -> None:
    grads = adagc_grads()
    updates, _ = adagc_run()
    norms = leaf_norms(grads)
    factors, _ = replay_adagc(AdaGC(eps=TORCH_EPS), norms)
    contract, _ = replay_adagc(AdaGC(), norms)
    np.testing.assert_array_equal(factors < 1, contract < 1)
    clipped = factors < 1
    measured = (leaf_ratios(updates, grads) / factors - 1)[clipped]
    total = np.sqrt(np.sum(norms**2, axis=1, keepdims=True)) * np.ones_like(norms)
    # Warm-up: the global factor 1/(total + eps); after: each leaf's limit / (n + eps), with
    # limits from a γ that started 1e-6/total lower.
    predicted = np.where(
        np.arange(ADAGC_STEPS)[:, None] < 100, TORCH_EPS / total, TORCH_EPS / norms
    )
    np.testing.assert_allclose(measured, predicted[clipped], atol=2e-6)
    assert measured.max() > 1e-5


def test_adagc_released_defaults() -> None:
    """The released code's defaults: clip_ratio=1.04, beta=0.99; API.md's: 1.05, 0.98."""
    grads = adagc_grads()
    norms = leaf_norms(grads)
    factors, _ = replay_adagc(AdaGC(relative=1.04, beta=0.99, eps=TORCH_EPS), norms)
    updates, _ = adagc_run()
    ours = leaf_ratios(updates, grads)
    late = slice(100, None)
    differ = (factors[late] < 1) != (ours[late] < 1)
    assert differ.sum() >= 3, "the defaults take different decisions"
    assert np.max(np.abs(ours[late] / factors[late] - 1)) > 0.01
    released, _ = adagc_run(relative=1.04, beta=0.99)
    measured = leaf_ratios(released, grads) / factors - 1
    np.testing.assert_array_equal(leaf_ratios(released, grads) < 1, factors < 1)
    assert np.max(np.abs(measured)) < 3e-5


@pytest.mark.parametrize("nan_at", [50, 160])
def test_adagc_nan_step(nan_at: int) -> None:
    """A NaN in leaf `a`: after warm-up the reference's γ_a turns NaN and it never clips `a`
    again; during warm-up the NaN step counts as a warm-up step. optaxclip steps as if absent."""
    grads = adagc_grads(nan_at)
    reference = AdaGC(nan_as_absent=False)
    factors, gammas = replay_adagc(reference, leaf_norms(grads))
    rule = AdaGC()
    contract, _ = replay_adagc(rule, leaf_norms(adagc_grads()))
    outs = adagc_run(nan_at)
    assert_as_if_absent(outs, adagc_run(), nan_at)
    ours = without(leaf_ratios(outs[0], grads), nan_at)
    np.testing.assert_allclose(ours, contract, rtol=2e-6)
    if nan_at >= 100:
        assert np.isnan(gammas[-1][0])
        assert not (factors[nan_at + 1 :, 0] < 1).any(), "the reference should not clip `a`"
        assert (ours[nan_at:, 0] < 1).sum() > 10, "optaxclip goes on clipping `a`"
    else:  # the reference spends a warm-up step on the NaN: its warm-up ends a step early
        assert sum(without(np.array(reference.warming), nan_at)) == 99
        assert sum(rule.warming) == 100 and outs[1]["step_count"][nan_at] == nan_at
