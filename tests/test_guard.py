"""`guard`, replayed step by step against a NumPy float64 reading of API.md's "Guard" section.

The reference below is written from the contract, not from the library: it sees only the float32
gradients and losses the library sees and recomputes in float64 the norm, every decision
(non-finite, over `max_norm`, norm spike, loss spike, forced), the statistics with their capped
feeding, the counters, and an Adam of its own. Then the scenarios the rule is for: a lasting
change of level is learned, while isolated spikes and bursts are skipped; the loss read from
`value=`/`loss=` (also through `flax.nnx.Optimizer.update`); the same decision on every device.
"""

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

RTOL = 1e-5
DIM = 6
LR = 1e-2
PARAMS = np.zeros(DIM, np.float32)
COUNTERS = (
    "skip_count",
    "skip_nonfinite",
    "skip_over_max",
    "skip_norm_spike",
    "skip_loss_spike",
    "forced_count",
    "consecutive",
    "norm_steps",
    "loss_steps",
)
REASONS = ("nonfinite", "over_max", "norm_spike", "loss_spike")


# ---------------------------------------------------------------------------------------------
# Data.


def unit_vectors(steps: int, seed: int, dim: int = DIM) -> np.ndarray:
    u = np.random.default_rng(seed).normal(size=(steps, dim))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def vectors(norms: Any, seed: int, dim: int = DIM) -> list[np.ndarray]:
    """One float32 vector per norm, in a random direction."""
    u = unit_vectors(len(norms), seed, dim)
    return [(n * v).astype(np.float32) for n, v in zip(norms, u, strict=True)]


def with_nan(g: np.ndarray) -> np.ndarray:
    g = g.copy()
    g[1], g[4] = np.nan, np.inf
    return g


def with_inf(g: np.ndarray) -> np.ndarray:
    g = g.copy()
    g[2] = -np.inf
    return g


def norm64(x: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64).ravel()))


# ---------------------------------------------------------------------------------------------
# The reference: API.md's "Guard" section in float64.


@dataclasses.dataclass
class Stats:
    """μ and m₂ of one statistic, and how many steps fed it."""

    mean: float = 0.0
    m2: float = 0.0
    steps: int = 0

    @property
    def sigma(self) -> float:
        return float(np.sqrt(max(self.m2 - self.mean**2, 0.0)))

    def check(
        self, x: float, z: float | None, warmup: int, margins: list[float]
    ) -> tuple[bool, float]:
        """Whether x spikes, and the value it feeds (capped at μ + z·σ on a spike)."""
        if z is None or self.steps < max(warmup, 1):
            return False, x
        limit = self.mean + z * self.sigma
        if np.isfinite(x):
            margins.append(abs(x - limit) / max(z * self.sigma, 1e-30))
        spike = bool(x - self.mean > z * self.sigma)
        return spike, (limit if spike else x)

    def feed(self, x: float, alpha: float) -> None:
        if self.steps == 0:
            self.mean, self.m2 = x, x * x
        else:
            self.mean = alpha * self.mean + (1 - alpha) * x
            self.m2 = alpha * self.m2 + (1 - alpha) * x * x
        self.steps += 1


class AdamRef:
    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = np.zeros(DIM)
        self.v = np.zeros(DIM)
        self.t = 0

    def update(self, g: np.ndarray) -> np.ndarray:
        g = np.asarray(g, np.float64)
        if self.t == 0:
            self.m, self.v = np.zeros_like(g), np.zeros_like(g)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        return -self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def reference(
    grads: list[np.ndarray],
    losses: list[float] | None = None,
    *,
    nonfinite: bool = True,
    max_norm: float | None = None,
    z_threshold: float | None = None,
    loss_z_threshold: float | None = None,
    alpha: float = 0.99,
    warmup_steps: int = 64,
    max_consecutive: int | None = None,
) -> tuple[list[dict[str, Any]], list[float]]:
    """Every step's expected outcome, and each decision's relative distance from its boundary."""
    adam = AdamRef(LR)
    norm_stats, loss_stats = Stats(), Stats()
    totals = dict.fromkeys(COUNTERS, 0)
    out: list[dict[str, Any]] = []
    margins: list[float] = []
    for t, g in enumerate(grads):
        n = norm64(g)
        count = int(np.sum(~np.isfinite(g)))
        loss = None if losses is None else float(np.float32(losses[t]))
        finite = count == 0 and np.isfinite(n) and (loss is None or np.isfinite(loss))
        reasons = {
            "nonfinite": nonfinite and not finite,
            "over_max": max_norm is not None and n > max_norm,
            "norm_spike": False,
            "loss_spike": False,
        }
        if max_norm is not None and np.isfinite(n):
            margins.append(abs(n - max_norm) / max_norm)
        reasons["norm_spike"], norm_fed = norm_stats.check(n, z_threshold, warmup_steps, margins)
        loss_fed = loss
        if loss is not None:
            reasons["loss_spike"], loss_fed = loss_stats.check(
                loss, loss_z_threshold, warmup_steps, margins
            )
        bad = any(reasons.values())
        forced = bad and max_consecutive is not None and totals["consecutive"] >= max_consecutive
        applied = not bad or forced
        if applied:
            updates = adam.update(g)
            totals["consecutive"] = 0
        else:
            updates = np.zeros(np.shape(g))
            totals["consecutive"] += 1
            totals["skip_count"] += 1
            first = next(r for r in REASONS if reasons[r])
            totals[f"skip_{first}"] += 1
        totals["forced_count"] += forced
        if finite and not reasons["over_max"]:
            norm_stats.feed(n if forced else norm_fed, alpha)
            if loss is not None:
                loss_stats.feed(loss if forced else loss_fed, alpha)
        totals["norm_steps"], totals["loss_steps"] = norm_stats.steps, loss_stats.steps
        out.append(
            {
                "updates": updates,
                "grad_norm": n,
                "nonfinite": count,
                "loss": np.nan if loss is None else loss,
                "skipped": not applied,
                "forced": forced,
                "reasons": {r for r, v in reasons.items() if v},
                **totals,
                "mean": norm_stats.mean,
                "var": norm_stats.m2 - norm_stats.mean**2,
                "loss_mean": loss_stats.mean,
                "loss_var": loss_stats.m2 - loss_stats.mean**2,
                "adam": (adam.t, adam.m.copy(), adam.v.copy()),
            }
        )
    return out, margins


# ---------------------------------------------------------------------------------------------
# The library, one jitted step per configuration (traced once).


@dataclasses.dataclass
class Config:
    options: dict[str, Any]
    loss_arg: str | None = "value"  # how the loss is passed to `update`, None: not at all

    def make(self) -> Any:
        return optaxclip.guard(optax.adam(LR), **self.options)


FULL = {
    "max_norm": 4.0,
    "z_threshold": 3.0,
    "loss_z_threshold": 3.0,
    "alpha": 0.9,
    "warmup_steps": 10,
    "max_consecutive": 3,
}
CONFIGS = {
    "full": Config(FULL),
    "full_loss_arg": Config(FULL, loss_arg="loss"),
    "norm_only": Config({"z_threshold": 3.0, "alpha": 0.9, "warmup_steps": 10}, loss_arg=None),
    # The loss given but not watched: recorded, fed to its statistics, a NaN loss is still bad.
    "loss_unwatched": Config(
        {"max_norm": 4.0, "z_threshold": 3.0, "alpha": 0.9, "warmup_steps": 10}
    ),
    "short_warmup": Config({**FULL, "warmup_steps": 2}),
}


@functools.cache
def compiled(name: str) -> tuple[Any, Any, list[int]]:
    config = CONFIGS[name]
    tx = config.make()
    traces = [0]

    def step(g: Any, state: Any, loss: Any) -> Any:
        traces[0] += 1
        extra = {} if config.loss_arg is None else {config.loss_arg: loss}
        return tx.update(g, state, PARAMS, **extra)

    return tx, jax.jit(step), traces


def replay(
    name: str, grads: list[np.ndarray], losses: list[float] | None, *, jit: bool = True
) -> tuple[list[Any], list[Any]]:
    tx, step, traces = compiled(name)
    state = tx.init(PARAMS)
    outs, states = [], []
    for t, g in enumerate(grads):
        loss = np.float32(np.nan if losses is None else losses[t])
        if jit:
            u, state = step(g, state, loss)
        else:
            extra = {} if CONFIGS[name].loss_arg is None else {CONFIGS[name].loss_arg: loss}
            with jax.disable_jit():
                u, state = tx.update(jnp.asarray(g), state, PARAMS, **extra)
        outs.append(jax.device_get(u))
        states.append(jax.device_get(state))
    assert traces[0] <= 1, f"{name}: traced {traces[0]} times"
    return outs, states


def check_step(t: int, u: Any, state: Any, prev_inner: Any, exp: dict[str, Any]) -> None:
    where = f"step {t}"
    assert u.dtype == np.float32, where
    if exp["skipped"]:
        np.testing.assert_array_equal(u, np.zeros(DIM, np.float32), err_msg=where)
        # The inner state is bit-identical to the one before the bad step.
        for x, y in zip(
            jax.tree.leaves(state.inner_state), jax.tree.leaves(prev_inner), strict=True
        ):
            np.testing.assert_array_equal(x, y, err_msg=where)
    else:
        np.testing.assert_allclose(u, exp["updates"], rtol=RTOL, atol=1e-5 * LR, err_msg=where)
    adam_state = state.inner_state[0]
    count, m, v = exp["adam"]
    assert int(adam_state.count) == count, where
    np.testing.assert_allclose(adam_state.mu, m, rtol=RTOL, atol=1e-7, err_msg=where)
    np.testing.assert_allclose(adam_state.nu, v, rtol=RTOL, atol=1e-9, err_msg=where)
    assert bool(state.skipped) == exp["skipped"], where
    assert bool(state.clipped) == exp["skipped"], where
    for field in COUNTERS:
        assert int(getattr(state, field)) == exp[field], f"{where}: {field}"
    assert int(state.nonfinite) == exp["nonfinite"], where
    for field in ("grad_norm", "loss"):
        want, got = exp[field], getattr(state, field)
        assert got.dtype == np.float32, f"{where}: {field}"
        if np.isfinite(want):
            np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{where}: {field}")
        else:
            assert np.isnan(got) == np.isnan(want), f"{where}: {field}"
            assert not np.isfinite(got), f"{where}: {field}"
    for mean, var in (("mean", "var"), ("loss_mean", "loss_var")):
        np.testing.assert_allclose(getattr(state, mean), exp[mean], rtol=RTOL, err_msg=where)
        # σ² = m₂ − μ², which the library keeps in cancellation-free form: equal up to
        # float32 rounding of m₂ ≈ μ².
        np.testing.assert_allclose(
            getattr(state, var), exp[var], rtol=1e-4, atol=1e-6 * exp[mean] ** 2, err_msg=where
        )


def check_replay(
    name: str, grads: list[np.ndarray], losses: list[float] | None, *, jit: bool = True
) -> list[dict[str, Any]]:
    expected, margins = reference(grads, losses, **CONFIGS[name].options)
    assert min(margins) > 0.02, "the data sits on a decision boundary"
    outs, states = replay(name, grads, None if CONFIGS[name].loss_arg is None else losses, jit=jit)
    prev = jax.device_get(compiled(name)[0].init(PARAMS)).inner_state
    for t, (u, s, e) in enumerate(zip(outs, states, expected, strict=True)):
        check_step(t, u, s, prev, e)
        prev = s.inner_state
    return expected


# ---------------------------------------------------------------------------------------------
# 1. The whole rule, step by step.

STEPS = 80
NORM_SPIKES = {3: 2.5, 8: 6.0, 15: 2.2, 25: 3.0, 50: 6.0, 60: 1.02}
NORM_SPIKES |= dict.fromkeys(range(65, 70), 6.0)  # over max_norm in a row: forced, feeds nothing
NORM_BURST = dict.fromkeys(range(40, 46), 3.4)  # set, not scaled: forced after 3 skips
LOSS_SPIKES = {20: 3.0, 25: 3.0, 31: 3.0, 50: 3.0} | dict.fromkeys(range(55, 60), 3.0)


def rule_data() -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(6)
    norms = np.exp(rng.normal(0.0, 0.15, STEPS))
    losses = 2.0 * np.exp(-np.arange(STEPS) / 100) * (1 + 0.03 * rng.normal(size=STEPS))
    for t, f in NORM_SPIKES.items():
        norms[t] *= f
    for t, n in NORM_BURST.items():
        norms[t] = n
    for t, f in LOSS_SPIKES.items():
        losses[t] *= f
    grads = vectors(norms, seed=40)
    grads[5] = with_nan(grads[5])
    grads[30] = with_inf(grads[30])
    grads[31] = with_nan(grads[31])
    losses[7] = np.nan  # a NaN loss with finite gradients
    return grads, list(losses)


@pytest.mark.parametrize("name", ["full", "full_loss_arg"])
def test_whole_rule_matches_reference(name: str) -> None:
    grads, losses = rule_data()
    expected = check_replay(name, grads, losses)
    first = {
        t: next(r for r in REASONS if r in e["reasons"])
        for t, e in enumerate(expected)
        if e["skipped"]
    }
    # The data exercises every reason, in warm-up and after it, and their order.
    assert {t for t, r in first.items() if r == "nonfinite"} == {5, 7, 30, 31}
    assert {8, 50, 65, 66, 67} <= {t for t, r in first.items() if r == "over_max"}
    assert {15, 25, 40, 41, 42} <= {t for t, r in first.items() if r == "norm_spike"}
    assert {20, 55, 56, 57} <= {t for t, r in first.items() if r == "loss_spike"}
    assert expected[25]["reasons"] >= {"norm_spike", "loss_spike"}
    assert expected[50]["reasons"] >= {"over_max", "loss_spike"}
    assert expected[31]["reasons"] >= {"nonfinite", "loss_spike"}
    # In warm-up (3) and a 2% rise (60) are no spikes.
    assert not expected[3]["reasons"] and not expected[60]["reasons"]
    forced = [t for t, e in enumerate(expected) if e["forced"]]
    assert {43, 58, 68} <= set(forced)
    # A forced step over max_norm feeds nothing; a forced spike its own value.
    assert expected[68]["norm_steps"] == expected[67]["norm_steps"]
    fed = 0.9 * expected[42]["mean"] + 0.1 * norm64(grads[43])
    assert expected[43]["mean"] == pytest.approx(fed, rel=1e-12)
    last = expected[-1]
    assert last["skip_count"] == sum(last[f"skip_{r}"] for r in REASONS)


def test_norm_only_matches_reference_and_records_no_loss() -> None:
    grads, _ = rule_data()
    expected = check_replay("norm_only", grads, None)
    assert {t for t, e in enumerate(expected) if e["skipped"]} >= {5, 30, 31, 40, 41}
    assert expected[-1]["loss_steps"] == 0 and np.isnan(expected[-1]["loss"])


def test_unwatched_loss_is_recorded_and_a_nan_loss_skipped() -> None:
    grads, losses = rule_data()
    expected = check_replay("loss_unwatched", grads, losses)
    assert expected[7]["skipped"] and expected[7]["reasons"] == {"nonfinite"}
    assert not expected[20]["skipped"], "a loss spike is no reason without loss_z_threshold"
    assert expected[-1]["loss_steps"] == expected[-1]["norm_steps"] > 0


def test_eager_matches_reference() -> None:
    """The same rule op by op (`jax.disable_jit`): short warm-ups reach the spike checks."""
    norms = [1.0, 1.2, 0.9, 1.1, 6.0, 0.95, 1.05, 1.0]
    losses = [2.0, 2.1, 1.9, 2.0, 2.0, 2.05, 9.0, 2.0]
    grads = vectors(norms, seed=15)
    grads[2] = with_nan(grads[2])
    expected = check_replay("short_warmup", grads, losses, jit=False)
    reasons = [next((r for r in REASONS if r in e["reasons"]), None) for e in expected]
    assert reasons == [None, None, "nonfinite", None, "over_max", None, "loss_spike", None]


def test_nonfinite_false_applies_nonfinite_steps_but_never_feeds_them() -> None:
    tx = optaxclip.guard(optax.sgd(1.0), nonfinite=False, z_threshold=3.0, warmup_steps=1)
    state = tx.init(jnp.zeros(2))
    g = jnp.array([0.6, 0.8])
    _, state = tx.update(g, state, value=1.0)
    before = state
    u, state = tx.update(g, state, value=jnp.nan)
    np.testing.assert_allclose(u, -g)
    u, state = tx.update(jnp.array([jnp.nan, 0.0]), state, value=1.0)
    assert bool(jnp.isnan(u[0])) and not bool(state.skipped) and int(state.skip_count) == 0
    for field in ("mean", "var", "norm_steps", "loss_mean", "loss_var", "loss_steps"):
        np.testing.assert_array_equal(getattr(state, field), getattr(before, field), field)


def test_steady_norms_float32_spikes_match_the_float64_rule() -> None:
    """Norms 1 ± 3e-4: σ² ≈ 1e-7, the size of float32's rounding of m₂ ≈ 1.

    Computed as m₂ − μ² in float32 it would be noise, often 0, and every norm above μ a spike.
    """
    norms = 1 + 3e-4 * np.random.default_rng(90).normal(size=100)
    grads = vectors(norms, seed=91)
    expected, margins = reference(grads, **CONFIGS["norm_only"].options)
    assert min(margins) > 0.1
    _, states = replay("norm_only", grads, None)
    want = [t for t, e in enumerate(expected) if e["skipped"]]
    assert want, "the float64 rule flags some steps"
    assert [t for t, s in enumerate(states) if bool(s.skipped)] == want


def test_bad_steps_leave_everything_but_counters_as_if_removed() -> None:
    """A non-finite or over-max step: the inner state and the statistics as if it never came."""
    norms = np.exp(np.random.default_rng(5).normal(0.0, 0.15, 40))
    clean = vectors(norms, seed=32)
    clean_losses = list(2 + 0.05 * np.random.default_rng(6).normal(size=40))
    bad_at = {5: with_nan, 12: with_inf, 20: lambda g: g * np.float32(10.0), 27: None}
    grads, losses, origin = [], [], []
    j = 0
    for t in range(40 + len(bad_at)):
        if t in bad_at:
            make = bad_at[t]
            grads.append(clean[j] if make is None else make(clean[j]))
            losses.append(np.nan if make is None else clean_losses[j])
            origin.append(None)
        else:
            grads.append(clean[j])
            losses.append(clean_losses[j])
            origin.append(j)
            j += 1
    _, clean_states = replay("full", clean, clean_losses)
    outs, states = replay("full", grads, losses)
    kept = ("inner_state", "mean", "var", "norm_steps", "loss_mean", "loss_var", "loss_steps")
    for t, j in enumerate(origin):
        want = states[t - 1] if j is None else clean_states[j]
        for field in kept:
            for x, y in zip(
                jax.tree.leaves(getattr(states[t], field)),
                jax.tree.leaves(getattr(want, field)),
                strict=True,
            ):
                np.testing.assert_array_equal(x, y, err_msg=f"step {t}: {field}")
        if j is None:
            assert bool(states[t].skipped) and not np.any(outs[t]), f"step {t}"
    last = states[-1]
    assert (int(last.skip_nonfinite), int(last.skip_over_max), int(last.skip_count)) == (3, 1, 4)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_decisions_are_scale_free(scale: float) -> None:
    grads, _ = rule_data()
    _, base = replay("norm_only", grads, None)
    _, scaled = replay("norm_only", [g * np.float32(scale) for g in grads], None)
    decisions = [bool(s.skipped) for s in base]
    assert 3 <= sum(decisions) < len(decisions) - 3
    assert [bool(s.skipped) for s in scaled] == decisions


def test_zero_warmup_is_harmless() -> None:
    """Spike checks wait for one fed step whatever `warmup_steps`: steady norms go through."""
    tx = optaxclip.guard(optax.sgd(1.0), z_threshold=3.0, loss_z_threshold=3.0, warmup_steps=0)
    params = jnp.zeros(2)
    state = tx.init(params)
    with jax.disable_jit():
        for _ in range(3):
            updates, state = tx.update(jnp.array([0.6, 0.8]), state, params, value=1.0)
    assert int(state.skip_count) == 0 and np.any(np.asarray(updates) != 0)


# ---------------------------------------------------------------------------------------------
# 2. Scenarios: guard never stalls, and still skips spikes.


@functools.cache
def scan_guard(dim: int = 4, **options: Any) -> Callable[[jax.Array], jax.Array]:
    """A jitted run of guard over a [steps, dim] array of gradients: the `skipped` flags."""
    tx = optaxclip.guard(optax.identity(), **options)

    def run(grads: jax.Array) -> jax.Array:
        def step(state: Any, g: jax.Array) -> Any:
            _, state = tx.update(g, state)
            return state, state.skipped

        return lax.scan(step, tx.init(jnp.zeros(dim)), grads)[1]

    return jax.jit(run)


def noisy(levels: np.ndarray, seed: int, noise: float = 0.05, dim: int = 4) -> np.ndarray:
    """Gradients of norm level × (1 + noise · N(0, 1)), in random directions."""
    norms = levels * (1 + noise * np.random.default_rng(seed).normal(size=levels.size))
    return (norms[:, None] * unit_vectors(levels.size, seed + 1000, dim)).astype(np.float32)


SCENARIO = {"z_threshold": 4.0, "alpha": 0.99, "warmup_steps": 20}
SHIFT = 200


def level_shift_applied(seed: int) -> np.ndarray:
    """A permanent ×10 rise of the norm at step SHIFT: which steps after it were applied."""
    levels = np.where(np.arange(SHIFT + 400) < SHIFT, 1.0, 10.0)
    skipped = np.asarray(scan_guard(**SCENARIO)(noisy(levels, seed)))
    assert not skipped[:SHIFT].any() or skipped[:SHIFT].mean() < 0.01
    return ~skipped[SHIFT:]


@pytest.mark.parametrize("seed", range(3))
def test_level_shift_is_learned(seed: int) -> None:
    applied = level_shift_applied(seed)
    assert applied[150:300].mean() >= 0.95
    assert applied[100:].mean() >= 0.99
    # Within tens of steps: the first 20-step window with >= 95% applied.
    windows = np.convolve(applied, np.ones(20) / 20, "valid")
    assert 30 <= int(np.argmax(windows >= 0.95)) <= 80
    # And the NumPy rule agrees step by step.
    levels = np.where(np.arange(SHIFT + 400) < SHIFT, 1.0, 10.0)
    expected, _ = reference(list(noisy(levels, seed)), **SCENARIO)
    np.testing.assert_array_equal(applied, [not e["skipped"] for e in expected[SHIFT:]])


def test_isolated_spikes_are_skipped() -> None:
    steps = 3000
    spikes = np.zeros(steps, bool)
    spikes[np.arange(100, steps, 37)] = True
    levels = np.where(spikes, 10.0, 1.0)
    skipped = np.asarray(scan_guard(**SCENARIO)(noisy(levels, 7)))
    assert skipped[spikes].mean() >= 0.95
    assert skipped[~spikes].mean() < 0.01


def test_bursts_of_five_are_skipped() -> None:
    steps = 3000
    spikes = np.zeros(steps, bool)
    for start in range(100, steps - 5, 100):
        spikes[start : start + 5] = True
    levels = np.where(spikes, 10.0, 1.0)
    skipped = np.asarray(scan_guard(**SCENARIO)(noisy(levels, 8)))
    assert skipped[spikes].mean() >= 0.95
    assert skipped[~spikes].mean() < 0.01


# ---------------------------------------------------------------------------------------------
# 3. The loss: a loss spike with normal gradients, and how the loss is passed.


def test_loss_spike_with_normal_gradients_is_skipped() -> None:
    tx = optaxclip.guard(
        optax.adam(LR), z_threshold=4.0, loss_z_threshold=4.0, alpha=0.9, warmup_steps=20
    )
    step = jax.jit(lambda g, s, loss: tx.update(g, s, PARAMS, value=loss))
    grads = vectors(np.exp(np.random.default_rng(3).normal(0, 0.1, 60)), seed=4)
    losses = 1.0 + 0.02 * np.random.default_rng(5).normal(size=60)
    losses[45] = 3.0  # bad labels: the loss triples, the gradient looks like any other
    state = tx.init(PARAMS)
    for t, (g, loss) in enumerate(zip(grads, losses, strict=True)):
        before = state
        _, state = step(g, state, np.float32(loss))
        assert bool(state.skipped) == (t == 45), t
    assert int(state.skip_loss_spike) == 1 and int(state.skip_count) == 1
    assert int(state.skip_norm_spike) == 0
    _, state = step(grads[0], before, np.float32(3.0))
    assert bool(state.skipped)


class Regression(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x)[:, 0]


def test_flax_nnx_optimizer_forwards_the_loss_as_value() -> None:
    """`nnx.Optimizer.update(model, grads, value=loss)` hands the loss to guard (flax 0.12)."""
    model = Regression(nnx.Rngs(0))
    tx = optaxclip.guard(optax.adam(1e-2), loss_z_threshold=4.0, alpha=0.9, warmup_steps=10)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    w_true = jnp.array([1.0, -2.0, 0.5, 3.0])

    @nnx.jit
    def train_step(model: Regression, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> Any:
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads, value=loss)
        return loss

    key = jax.random.key(1)
    for t in range(30):
        x = jax.random.normal(jax.random.fold_in(key, t), (256, 4))
        y = x @ w_true + (20.0 if t == 25 else 0.0)  # step 25: bad labels
        params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        inner = jax.tree.map(np.asarray, nnx.state(optimizer.opt_state)["inner_state"])
        loss = train_step(model, optimizer, x, y)
        found = optaxclip.stats(optimizer)
        assert bool(found["skipped"]) == (t == 25), t
        assert float(found["loss"]) == float(loss)
        moved = [
            bool(np.any(a != np.asarray(b)))
            for a, b in zip(
                jax.tree.leaves(params), jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True
            )
        ]
        assert any(moved) == (t != 25), t
        if t == 25:
            now = jax.tree.leaves(nnx.state(optimizer.opt_state)["inner_state"])
            for a, b in zip(jax.tree.leaves(inner), now, strict=True):
                np.testing.assert_array_equal(a, np.asarray(b))
    assert int(found["skip_loss_spike"]) == 1 and int(found["skip_count"]) == 1


def test_missing_loss_is_a_trace_time_error_naming_both_arguments() -> None:
    tx = optaxclip.guard(optax.sgd(1.0), loss_z_threshold=3.0)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"(?s)loss_z_threshold.*`value`.*`loss`"):
        jax.jit(lambda g, s: tx.update(g, s, PARAMS)).trace(PARAMS, state)
    with pytest.raises(ValueError, match="`value`"):
        tx.update(PARAMS, state, PARAMS, value=None)


def test_loss_must_be_a_scalar() -> None:
    tx = optaxclip.guard(optax.sgd(1.0), loss_z_threshold=3.0)
    with pytest.raises(ValueError, match=r"must be a scalar, got shape \(3,\)"):
        tx.update(PARAMS, tx.init(PARAMS), PARAMS, value=jnp.ones(3))


def test_loss_under_inject_hyperparams_and_no_conditional_on_accelerators() -> None:
    factory = optax.inject_hyperparams(optaxclip.guard, static_args=("max_consecutive",))
    schedule = optax.linear_schedule(5.0, 3.0, transition_steps=10)
    tx = factory(optax.adam(LR), loss_z_threshold=schedule, z_threshold=4.0, max_consecutive=2)
    state = tx.init(PARAMS)
    traces = [0]

    @jax.jit
    def step(g: Any, s: Any, loss: Any) -> Any:
        traces[0] += 1
        return tx.update(g, s, PARAMS, value=loss)

    for t in range(3):
        _, state = step(vectors([1.0], t)[0], state, np.float32(1.0 + 0.01 * t))
    assert traces[0] == 1 and int(state.inner_state.loss_steps) == 3
    for platform in ("cuda", "tpu"):
        text = step.trace(PARAMS, state, np.float32(1.0)).lower(lowering_platforms=(platform,))
        assert not re.search(r"stablehlo\.(case|if|while)", text.as_text()), platform


def test_every_field_in_stats() -> None:
    tx = optaxclip.guard(optax.adam(LR), z_threshold=3.0, loss_z_threshold=3.0)
    _, state = jax.jit(lambda g, s: tx.update(g, s, PARAMS, loss=2.0))(PARAMS, tx.init(PARAMS))
    found = optaxclip.stats(state)
    assert set(found) == set(optaxclip.GuardState._fields) - {"inner_state", "name"}
    assert {f"skip_{r}" for r in REASONS} | {"forced_count", "loss"} <= set(found)
    for field in COUNTERS:
        assert found[field].dtype == jnp.int32, field
    assert found["loss"].dtype == jnp.float32 and float(found["loss"]) == 2.0
    assert np.isnan(float(optaxclip.stats(tx.init(PARAMS))["loss"]))


# ---------------------------------------------------------------------------------------------
# 4. A NaN on one device: the same decision everywhere (8 CPU devices).

N = 8
DIST_OPTIONS = {"z_threshold": 3.0, "loss_z_threshold": 3.0, "warmup_steps": 2, "alpha": 0.9}
# Per step: the norm scale, whether device 3 gets a NaN, and the loss scale.
DIST_STEPS = [(1.0, False, 1.0), (1.2, False, 1.1), (1.0, False, 0.9), (1.1, True, 1.0)]
DIST_STEPS += [(0.9, False, 1.0), (20.0, False, 1.0), (1.0, False, 30.0), (1.0, False, 1.0)]


def dist_data() -> list[tuple[np.ndarray, np.ndarray]]:
    """Per step: the whole gradient [N * 3] and per-device losses [N]."""
    rng = np.random.default_rng(11)
    out = []
    for scale, nan, loss in DIST_STEPS:
        g = (scale * rng.normal(size=N * 3)).astype(np.float32)
        if nan:
            g[3 * 3 + 1] = np.nan
        out.append((g, (loss * (1 + 0.1 * rng.normal(size=N))).astype(np.float32)))
    return out


def dist_tx(axis: Any) -> Any:
    return optaxclip.guard(optax.sgd(0.1, momentum=0.9), axis_name=axis, **DIST_OPTIONS)


def dist_reference() -> list[tuple[Any, Any]]:
    tx = dist_tx(None)
    update = jax.jit(lambda g, s, loss: tx.update(g, s, value=loss))
    state = tx.init(np.zeros(N * 3, np.float32))
    out = []
    for g, losses in dist_data():
        u, state = update(g, state, np.mean(losses, dtype=np.float32))
        out.append(jax.device_get((u, state)))
    return out


def check_dist(t: int, updates: np.ndarray, per_device: list[Any], want: Any) -> None:
    want_updates, want_state = want
    np.testing.assert_allclose(updates, want_updates, rtol=RTOL, atol=1e-7, err_msg=f"step {t}")
    for field in optaxclip.GuardState._fields:
        if field in ("inner_state", "name"):
            continue
        values = [np.asarray(getattr(s, field)) for s in per_device]
        for v in values[1:]:
            np.testing.assert_array_equal(v, values[0], err_msg=f"step {t}: {field} differs")
        np.testing.assert_allclose(
            values[0], getattr(want_state, field), rtol=RTOL, err_msg=f"step {t}: {field}"
        )


def check_dist_outcome(states: list[Any]) -> None:
    skipped = [bool(s.skipped) for s in states]
    assert skipped == [False, False, False, True, False, True, True, False]
    last = states[-1]
    assert (int(last.skip_nonfinite), int(last.skip_norm_spike), int(last.skip_loss_spike)) == (
        1,
        1,
        1,
    )


def test_pmap_nan_on_one_device_same_skip_everywhere() -> None:
    tx = dist_tx("i")
    want = dist_reference()

    def step(g: Any, s: Any, loss: Any) -> Any:
        return tx.update(g, s, value=lax.pmean(loss, "i"))

    update = jax.pmap(step, axis_name="i")
    state = jax.pmap(tx.init)(np.zeros((N, 3), np.float32))
    states = []
    for t, (g, losses) in enumerate(dist_data()):
        u, state = update(g.reshape(N, 3), state, losses)
        host = jax.device_get(state)
        per_device = [jax.tree.map(lambda x, i=i: x[i], host) for i in range(N)]
        check_dist(t, np.asarray(u).reshape(-1), per_device, want[t])
        states.append(per_device[0])
    check_dist_outcome(states)


def shard_map_update(tx: Any, pmean: bool = True) -> tuple[Any, Any, Any]:
    mesh = jax.make_mesh((N,), ("d",))
    shapes = jax.eval_shape(tx.init, jax.ShapeDtypeStruct((N * 3,), jnp.float32))
    specs = optax.tree_map_params(tx, lambda _: P("d"), shapes, transform_non_params=lambda _: P())

    def step(g: Any, s: Any, loss: Any) -> Any:
        return tx.update(g, s, value=lax.pmean(loss[0], "d") if pmean else loss[0])

    smap = functools.partial(jax.shard_map, mesh=mesh)
    init = jax.jit(smap(tx.init, in_specs=(P("d"),), out_specs=specs))
    update = jax.jit(smap(step, in_specs=(P("d"), specs, P("d")), out_specs=(P("d"), specs)))
    return mesh, init, update


def test_shard_map_nan_on_one_device_same_skip_everywhere() -> None:
    tx = dist_tx("d")
    want = dist_reference()
    mesh, init, update = shard_map_update(tx)
    place = lambda x: jax.device_put(x, NamedSharding(mesh, P("d")))
    state = init(place(np.zeros(N * 3, np.float32)))
    states = []
    for t, (g, losses) in enumerate(dist_data()):
        u, state = update(place(g), state, place(losses))
        # Each device's own copy of every statistic.
        per_device = []
        for i in range(N):
            per_device.append(
                jax.tree.map(
                    lambda x, i=i: (
                        np.asarray(x.addressable_shards[i].data) if x.ndim == 0 else np.asarray(x)
                    ),
                    state,
                )
            )
        check_dist(t, np.asarray(u), per_device, want[t])
        states.append(per_device[0])
    check_dist_outcome(states)


def test_shard_map_loss_that_varies_over_devices_is_refused() -> None:
    tx = dist_tx("d")
    mesh, init, update = shard_map_update(tx, pmean=False)
    place = lambda x: jax.device_put(x, NamedSharding(mesh, P("d")))
    g, losses = dist_data()[0]
    state = init(place(np.zeros(N * 3, np.float32)))
    with pytest.raises(ValueError, match=r"loss varies over mesh axis 'd'.*pmean\(loss, 'd'\)"):
        update(place(g), state, place(losses))


def test_one_all_reduce_with_the_loss() -> None:
    tx = dist_tx("i")
    grads = jax.ShapeDtypeStruct((N, 3), jnp.float32)
    state = jax.eval_shape(jax.pmap(tx.init), grads)
    lowered = jax.pmap(lambda g, s, loss: tx.update(g, s, value=loss), axis_name="i").lower(
        grads, state, jax.ShapeDtypeStruct((N,), jnp.float32)
    )
    found = re.findall(
        r"stablehlo\.(all_reduce|all_gather|all_to_all|collective_permute)\b", lowered.as_text()
    )
    assert found == ["all_reduce"]
