"""Adaptive policies, replayed step by step against NumPy float64 references (`guard`'s own replay
is in tests/test_guard.py).

Each reference below is written from the rules in `API.md` ("Adaptive policies"), not from
the library: it sees only the float32 gradients the library sees and recomputes norms, thresholds,
outputs and statistics in float64. One jitted step function per configuration is compiled once and
reused by every test (the trace counters check that nothing recompiles).
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip

RTOL = 1e-5
DIM = 6
STEPS = 50
MODES = ("propagate", "zero", "skip")
# State fields that describe the current step; every other field (but `name`) is a statistic.
PER_STEP = {"grad_norm", "clipped", "nonfinite", "scale", "threshold"}


# ---------------------------------------------------------------------------------------------
# Data: gradients whose global norms follow a chosen sequence.


def lognormal_norms(steps: int, seed: int, spikes: dict[int, float], sigma: float = 0.2) -> Any:
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, sigma, steps))
    for step, factor in spikes.items():
        norms[step] *= factor
    return norms


def vectors(norms: Any, seed: int, dim: int = DIM) -> list[np.ndarray]:
    """One float32 vector per norm, in a random direction."""
    rng = np.random.default_rng(seed)
    out = []
    for n in norms:
        u = rng.normal(size=dim)
        out.append((n * u / np.linalg.norm(u)).astype(np.float32))
    return out


def with_nan(g: np.ndarray) -> np.ndarray:
    """Two NaNs and one inf (3 bad elements): the norm is NaN."""
    g = g.copy()
    g[1], g[4], g[5] = np.nan, np.nan, np.inf
    return g


def with_inf(g: np.ndarray) -> np.ndarray:
    """One -inf (1 bad element): the norm is inf."""
    g = g.copy()
    g[2] = -np.inf
    return g


def norm64(x: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64).ravel()))


def finite_norm64(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return norm64(np.where(np.isfinite(x), x, 0.0))


# ---------------------------------------------------------------------------------------------
# Compiled step functions, one per configuration, with a trace counter.

LEAF_KEYS = ("a", "b", "c")  # flattening order of the AdaGC tree
ADAGC_PARAMS = {"a": np.zeros(4, np.float32), "b": np.zeros((2, 3), np.float32), "c": np.float32(0)}
GUARD_PARAMS = np.zeros(DIM, np.float32)

ZCLIP = {"alpha": 0.9, "z_threshold": 2.5, "warmup_steps": 10}
ADAGC = {"relative": 1.2, "beta": 0.9, "warmup_max_norm": 2.0, "warmup_steps": 10}
# Short warm-ups, so that the short eager replays reach the adaptive phase.
ZCLIP_W3 = {**ZCLIP, "warmup_steps": 3}
ADAGC_W2 = {**ADAGC, "warmup_steps": 2}
EAGER_ONLY = ("zclip_w3", "adagc_w2")

CONFIGS: dict[str, Callable[[], Any]] = {
    "autoclip": lambda: optaxclip.autoclip(10.0, history_size=16),
    "autoclip_p37": lambda: optaxclip.autoclip(37.5, history_size=7),
    "zclip": lambda: optaxclip.zclip(**ZCLIP),
    "zclip_max": lambda: optaxclip.zclip(**ZCLIP, max_norm=1.25),
    "quantile_clip": lambda: optaxclip.quantile_clip(),
    "adagc": lambda: optaxclip.adagc(**ADAGC),
    "zclip_w3": lambda: optaxclip.zclip(**ZCLIP_W3),
    "adagc_w2": lambda: optaxclip.adagc(**ADAGC_W2),
}
for _mode in ("zero", "skip"):
    CONFIGS[f"autoclip_{_mode}"] = functools.partial(
        optaxclip.autoclip, 10.0, history_size=16, nonfinite=_mode
    )
    CONFIGS[f"zclip_{_mode}"] = functools.partial(optaxclip.zclip, **ZCLIP, nonfinite=_mode)
    CONFIGS[f"quantile_clip_{_mode}"] = functools.partial(optaxclip.quantile_clip, nonfinite=_mode)
    CONFIGS[f"adagc_{_mode}"] = functools.partial(optaxclip.adagc, **ADAGC, nonfinite=_mode)


def config_name(policy: str, mode: str) -> str:
    return policy if mode == "propagate" else f"{policy}_{mode}"


def init_params(name: str) -> Any:
    if name.startswith("adagc"):
        return ADAGC_PARAMS
    return None


@dataclasses.dataclass
class Compiled:
    tx: Any
    step: Any
    traces: list[int]


@functools.cache
def compiled(name: str) -> Compiled:
    tx = CONFIGS[name]()
    traces = [0]
    params = init_params(name)

    def step(updates: Any, state: Any) -> Any:
        traces[0] += 1
        return tx.update(updates, state, params)

    return Compiled(tx, jax.jit(step), traces)


def replay(name: str, grads: list[Any], *, jit: bool = True) -> tuple[list[Any], list[Any]]:
    """Runs a configuration over `grads`: the updates and the state after each step.

    With `jit=False` the steps run under `jax.disable_jit()` (op by op, `lax.cond` in Python).
    """
    c = compiled(name)
    params = init_params(name)
    state = c.tx.init(params)
    outs, states = [], []
    for g in grads:
        if jit:
            u, state = c.step(g, state)
        else:
            with jax.disable_jit():
                u, state = c.tx.update(jax.tree.map(jnp.asarray, g), state, params)
        outs.append(jax.device_get(u))
        states.append(jax.device_get(state))
    assert c.traces[0] <= 1, f"{name}: the step function was traced {c.traces[0]} times"
    return outs, states


# ---------------------------------------------------------------------------------------------
# References for the global-norm policies: `decide(norm, stats) -> (threshold, new stats)`.


@dataclasses.dataclass
class Rule:
    init: Callable[[], dict[str, Any]]
    decide: Callable[[float, dict[str, Any]], tuple[float, dict[str, Any]]]
    check_stats: Callable[[Any, dict[str, Any]], None]
    # Relative distance of each decision from its boundary, for the data sanity checks.
    margins: list[float] = dataclasses.field(default_factory=list)


def autoclip_rule(percentile: float, history_size: int) -> Rule:
    def decide(n: float, s: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        seen = [*s["norms"], n]
        window = seen[-history_size:]
        return float(np.percentile(window, percentile, method="linear")), {"norms": seen}

    def check_stats(state: Any, s: dict[str, Any]) -> None:
        window = s["norms"][-history_size:]
        padded = np.zeros(history_size)
        padded[: len(window)] = window
        np.testing.assert_allclose(np.sort(state.history), np.sort(padded), rtol=RTOL)
        assert int(state.step_count) == len(s["norms"])

    return Rule(lambda: {"norms": []}, decide, check_stats)


def zclip_rule(
    alpha: float, z_threshold: float, warmup_steps: int, max_norm: float | None = None
) -> Rule:
    eps = 1e-6
    rule: Rule

    def decide(n: float, s: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        if len(s["warm"]) < warmup_steps:
            warm = [*s["warm"], n]
            # During warm-up the state holds the running mean and population variance.
            new = {"warm": warm, "mean": np.mean(warm), "var": np.var(warm), "count": len(warm)}
            threshold = n
        else:
            mu, var = s["mean"], s["var"]
            sd = np.sqrt(var)
            z = (n - mu) / (sd + eps)
            rule.margins.append(abs(z - z_threshold) / z_threshold)
            threshold = mu + z_threshold**2 * sd / z if z > z_threshold else n
            new_mu = alpha * mu + (1 - alpha) * threshold
            new_var = alpha * var + (1 - alpha) * (threshold - new_mu) ** 2
            new = {"warm": s["warm"], "mean": new_mu, "var": new_var, "count": s["count"] + 1}
        if max_norm is not None:
            rule.margins.append(abs(n - max_norm) / max_norm)
            threshold = min(threshold, max_norm)
        return threshold, new

    def check_stats(state: Any, s: dict[str, Any]) -> None:
        np.testing.assert_allclose(state.mean, s["mean"], rtol=RTOL)
        np.testing.assert_allclose(state.var, s["var"], rtol=RTOL, atol=1e-9)
        assert int(state.step_count) == s["count"]

    init = lambda: {"warm": [], "mean": 0.0, "var": 0.0, "count": 0}
    rule = Rule(init, decide, check_stats)
    return rule


def quantile_rule(target_quantile: float, learning_rate: float, initial_norm: float) -> Rule:
    rule: Rule

    def decide(n: float, s: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        c = s["c"]
        rule.margins.append(abs(n - c) / c)
        b = 1.0 if n <= c else 0.0
        return c, {"c": c * np.exp(-learning_rate * (b - target_quantile)), "count": s["count"] + 1}

    def check_stats(state: Any, s: dict[str, Any]) -> None:
        np.testing.assert_allclose(state.clip_norm, s["c"], rtol=RTOL)
        assert int(state.step_count) == s["count"]

    rule = Rule(lambda: {"c": initial_norm, "count": 0}, decide, check_stats)
    return rule


RULES: dict[str, Callable[[], Rule]] = {
    "autoclip": lambda: autoclip_rule(10.0, 16),
    "autoclip_p37": lambda: autoclip_rule(37.5, 7),
    "zclip": lambda: zclip_rule(**ZCLIP),
    "zclip_max": lambda: zclip_rule(**ZCLIP, max_norm=1.25),
    "zclip_w3": lambda: zclip_rule(**ZCLIP_W3),
    "quantile_clip": lambda: quantile_rule(0.5, 0.2, 0.1),
}


@dataclasses.dataclass
class Expected:
    """What a step should do: updates, the recorded fields, and the statistics after it."""

    updates: Any
    grad_norm: float
    clipped: bool
    nonfinite: int
    threshold: float | None
    stats: dict[str, Any]
    bad: bool


def scale_for(norm: float, threshold: float) -> float:
    return threshold / norm if np.isfinite(norm) and norm > threshold else 1.0


def reference_global(rule: Rule, grads: list[np.ndarray], mode: str) -> list[Expected]:
    s = rule.init()
    out = []
    for g in grads:
        g64 = np.asarray(g, np.float64)
        finite = np.isfinite(g64)
        count = int(np.sum(~finite))
        full = norm64(g)
        used = finite_norm64(g) if mode == "zero" else full
        threshold = None
        if np.isfinite(full):
            threshold, s = rule.decide(used, s)
        elif mode == "zero":
            threshold, _ = rule.decide(used, s)  # decides this step, commits nothing
        if mode == "skip" and count:
            updates, clipped = np.zeros_like(g64), True
        elif threshold is None:  # "propagate" with a non-finite norm: unchanged
            updates, clipped = g64, False
        else:
            scale = scale_for(used, threshold)
            updates = np.where(finite, g64 * scale, 0.0)
            clipped = scale < 1 or count > 0
        out.append(Expected(updates, used, clipped, count, threshold, dict(s), count > 0))
    return out


def check_step(step: int, got: Any, state: Any, exp: Expected, mode: str, rule: Rule) -> None:
    """The library's step against the reference's."""
    where = f"step {step}"
    leaves_got, leaves_exp = jax.tree.leaves(got), jax.tree.leaves(exp.updates)
    for x, y in zip(leaves_got, leaves_exp, strict=True):
        assert x.dtype == np.float32, where
        # NaN and inf compare equal to themselves, in place.
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=1e-7, err_msg=where)
    assert int(state.nonfinite) == exp.nonfinite, where
    assert bool(state.clipped) == exp.clipped, where
    if np.isfinite(exp.grad_norm):
        np.testing.assert_allclose(state.grad_norm, exp.grad_norm, rtol=RTOL, err_msg=where)
    else:
        assert not np.isfinite(state.grad_norm), where
    if exp.threshold is not None and (not exp.bad or mode == "zero"):
        np.testing.assert_allclose(state.threshold, exp.threshold, rtol=RTOL, err_msg=where)
    try:
        rule.check_stats(state, exp.stats)
    except AssertionError as err:
        raise AssertionError(f"{where}: {err}") from err


def check_replay(name: str, grads: list[Any], mode: str = "propagate", jit: bool = True) -> Any:
    rule = RULES[name]()
    expected = reference_global(rule, grads, mode)
    outs, states = replay(config_name(name, mode), grads, jit=jit)
    for t, (u, s, e) in enumerate(zip(outs, states, expected, strict=True)):
        check_step(t, u, s, e, mode, rule)
    return rule, expected, states


# Norm sequences with spikes, some of them two in a row.
AUTOCLIP_NORMS = lognormal_norms(STEPS, 1, {7: 10.0, 20: 30.0, 21: 8.0, 33: 0.05, 40: 50.0})
ZCLIP_NORMS = lognormal_norms(STEPS, 2, {4: 3.0, 15: 5.0, 30: 4.0, 31: 3.5, 45: 20.0})
QUANTILE_NORMS = lognormal_norms(STEPS, 3, {30: 10.0, 31: 10.0, 44: 100.0})
NORMS = {
    "autoclip": AUTOCLIP_NORMS,
    "autoclip_p37": AUTOCLIP_NORMS,
    "zclip": ZCLIP_NORMS,
    "zclip_max": ZCLIP_NORMS,
    "quantile_clip": QUANTILE_NORMS,
}


# ---------------------------------------------------------------------------------------------
# 1. Step-by-step replays.


@pytest.mark.parametrize("name", [n for n in RULES if n not in EAGER_ONLY])
def test_global_policy_matches_reference(name: str) -> None:
    grads = vectors(NORMS[name], seed=10)
    rule, expected, _ = check_replay(name, grads)
    clipped = [e.clipped for e in expected]
    assert 3 <= sum(clipped) < len(clipped) - 3, "the data must exercise both decisions"
    assert min(rule.margins, default=1.0) > 1e-3, "the data sits on a decision boundary"


def test_autoclip_threshold_is_numpy_percentile_of_the_last_history_size_norms() -> None:
    """Directly: threshold_t == np.percentile(finite norms[max(0, t-H+1) : t+1], p)."""
    grads = vectors(AUTOCLIP_NORMS, seed=11)
    grads[25] = with_nan(grads[25])
    grads[26] = with_inf(grads[26])
    _, states = replay("autoclip", grads)
    norms = [norm64(g) for g in grads]
    finite = []
    for t, (n, state) in enumerate(zip(norms, states, strict=True)):
        if not np.isfinite(n):
            continue
        finite.append(n)
        want = np.percentile(finite[-16:], 10.0, method="linear")
        np.testing.assert_allclose(state.threshold, want, rtol=RTOL, err_msg=f"step {t}")
    assert len(finite) > 16 + 10


def test_zclip_statistics_after_warmup_are_mean_and_population_variance() -> None:
    grads = vectors(ZCLIP_NORMS, seed=12)
    _, states = replay("zclip", grads[:10])
    warm = [norm64(g) for g in grads[:10]]
    np.testing.assert_allclose(states[-1].mean, np.mean(warm), rtol=RTOL)
    np.testing.assert_allclose(states[-1].var, np.var(warm), rtol=RTOL)
    assert not any(bool(s.clipped) for s in states), "no adaptive clip during warm-up"


def test_zclip_max_norm_caps_warmup_and_spikes() -> None:
    grads = vectors(ZCLIP_NORMS, seed=13)
    _, _, states = check_replay("zclip_max", grads)
    capped = [t for t, s in enumerate(states) if np.isclose(s.threshold, 1.25, rtol=1e-6)]
    assert any(t < 10 for t in capped) and any(t >= 10 for t in capped)


# AdaGC: several leaves of different norms.


def adagc_grads(steps: int, seed: int, spikes: dict[int, dict[str, float]]) -> list[dict]:
    rng = np.random.default_rng(seed)
    scales = {"a": 1.0, "b": 0.2, "c": 3.0}
    out = []
    for t in range(steps):
        g = {}
        for k in LEAF_KEYS:
            shape = np.shape(ADAGC_PARAMS[k])
            x = rng.normal(size=shape) if shape else rng.normal()
            n = scales[k] * np.exp(rng.normal(0.0, 0.2)) * spikes.get(t, {}).get(k, 1.0)
            x = n * np.asarray(x) / np.linalg.norm(np.ravel(x))
            g[k] = np.asarray(x, np.float32)
        out.append(g)
    return out


ADAGC_SPIKES = {4: {"c": 3.0}, 20: {"a": 10.0}, 30: {"c": 5.0}, 40: {"a": 4, "b": 4, "c": 4}}


def reference_adagc(
    grads: list[dict], mode: str, margins: list[float], options: dict[str, Any] = ADAGC
) -> list[Expected]:
    rel, beta = options["relative"], options["beta"]
    wmax, warmup = options["warmup_max_norm"], options["warmup_steps"]
    gamma, count = np.zeros(len(LEAF_KEYS)), 0
    out = []
    for g in grads:
        leaves = [np.asarray(g[k], np.float64) for k in LEAF_KEYS]
        bad = int(sum(np.sum(~np.isfinite(x)) for x in leaves))
        full = np.array([norm64(x) for x in leaves])
        rest = np.array([finite_norm64(x) for x in leaves])
        used = rest if mode == "zero" else full
        total = float(np.sqrt(np.sum(used**2)))
        if count < warmup:
            if np.isfinite(total):
                margins.append(abs(total - wmax) / wmax)
            scales = np.full(len(leaves), scale_for(total, wmax))
            clipped_norms = scales * used
            new_gamma = clipped_norms if count == 0 else np.minimum(gamma, clipped_norms)
            threshold = wmax
        else:
            limits = rel * gamma
            scales = np.array([scale_for(n, lim) for n, lim in zip(used, limits, strict=True)])
            margins.extend(abs(n - lim) / lim for n, lim in zip(used, limits, strict=True))
            new_gamma = beta * gamma + (1 - beta) * scales * used
            threshold = norm64(limits)
        if np.all(np.isfinite(full)):
            gamma, count = new_gamma, count + 1
        if mode == "skip" and bad:
            updates, clipped = [np.zeros_like(x) for x in leaves], True
        else:
            keep = mode == "propagate"
            updates = [
                np.where(np.isfinite(x) | keep, x * s, 0.0)
                for x, s in zip(leaves, scales, strict=True)
            ]
            clipped = bool(np.any(scales < 1)) or (mode != "propagate" and bad > 0)
        stats = {"gamma": gamma.copy(), "count": count}
        out.append(
            Expected(
                dict(zip(LEAF_KEYS, updates, strict=True)),
                total,
                clipped,
                bad,
                threshold,
                stats,
                bad > 0,
            )
        )
    return out


def check_adagc_stats(state: Any, s: dict[str, Any]) -> None:
    np.testing.assert_allclose(state.gamma, s["gamma"], rtol=RTOL)
    assert int(state.step_count) == s["count"]


# AdaGC's reference is per leaf (`reference_adagc`); only its statistics plug into `check_step`.
ADAGC_RULE = lambda: Rule(dict, lambda n, s: (n, s), check_adagc_stats)


def check_adagc_replay(grads: list[dict], mode: str) -> tuple[list[Expected], list[Any]]:
    margins: list[float] = []
    expected = reference_adagc(grads, mode, margins)
    outs, states = replay(config_name("adagc", mode), grads)
    for t, (u, s, e) in enumerate(zip(outs, states, expected, strict=True)):
        check_step(t, u, s, e, mode, ADAGC_RULE())
    assert min(margins) > 1e-3, "the data sits on a decision boundary"
    return expected, states


def test_adagc_matches_reference() -> None:
    grads = adagc_grads(STEPS, 20, ADAGC_SPIKES)
    expected, states = check_adagc_replay(grads, "propagate")
    # Warm-up clips; after it some leaves are clipped and others left alone.
    assert any(e.clipped for e in expected[:10])
    changed = np.array(
        [
            [not np.allclose(e.updates[k], g[k]) for k in LEAF_KEYS]
            for e, g in zip(expected, grads, strict=True)
        ]
    )
    assert 0 < changed[10:].sum() < changed[10:].size, "leaves clipped and left alone"
    assert np.ptp(states[-1].gamma) > 0.5


# ---------------------------------------------------------------------------------------------
# 2. NaN/inf steps: statistics and counters exactly as if the step had not happened.

BAD_STEPS = {0: with_nan, 3: with_inf, 22: with_nan, 23: with_inf}


def insert_bad(clean: list[Any], make_bad: Callable[[Any, int], Any]) -> tuple[list[Any], list]:
    """The clean sequence with a bad step at each position of BAD_STEPS; `origin` maps back."""
    full, origin = [], []
    it = iter(range(len(clean)))
    for t in range(len(clean) + len(BAD_STEPS)):
        if t in BAD_STEPS:
            full.append(make_bad(clean[min(t, len(clean) - 1)], t))
            origin.append(None)
        else:
            j = next(it)
            full.append(clean[j])
            origin.append(j)
    return full, origin


def stat_fields(state: Any) -> list[str]:
    return [f for f in state._fields if f not in PER_STEP and f != "name"]


def assert_states_equal(a: Any, b: Any, fields: list[str], where: str) -> None:
    for f in fields:
        for x, y in zip(
            jax.tree.leaves(getattr(a, f)), jax.tree.leaves(getattr(b, f)), strict=True
        ):
            np.testing.assert_array_equal(x, y, err_msg=f"{where}: field {f}")


def check_as_if_removed(
    name: str, clean: list[Any], full: list[Any], origin: list
) -> tuple[list, list]:
    c = compiled(name)
    initial = jax.device_get(c.tx.init(init_params(name)))
    clean_outs, clean_states = replay(name, clean)
    outs, states = replay(name, full)
    fields = stat_fields(initial)
    assert "step_count" in fields
    for t, j in enumerate(origin):
        if j is None:
            before = states[t - 1] if t else initial
            assert_states_equal(states[t], before, fields, f"{name} bad step {t}")
        else:
            assert_states_equal(states[t], clean_states[j], list(states[t]._fields), f"step {t}")
            for x, y in zip(jax.tree.leaves(outs[t]), jax.tree.leaves(clean_outs[j]), strict=True):
                np.testing.assert_array_equal(x, y, err_msg=f"{name} step {t}")
    return outs, states


def spiky_bad(g: Any, t: int) -> Any:
    """A bad step whose finite rest is a spike, so "zero" has something to clip."""
    return (with_nan if BAD_STEPS[t] is with_nan else with_inf)(g * np.float32(6.0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["autoclip", "zclip", "quantile_clip"])
def test_nonfinite_step_is_as_if_removed(name: str, mode: str) -> None:
    clean = vectors(NORMS[name][:40], seed=30)
    full, origin = insert_bad(clean, spiky_bad)
    outs, states = check_as_if_removed(config_name(name, mode), clean, full, origin)
    if mode == "propagate":  # unchanged, bit for bit
        for t in BAD_STEPS:
            np.testing.assert_array_equal(outs[t], full[t], err_msg=f"step {t}")
    # What each mode outputs on the bad steps, against the reference.
    _, expected, _ = check_replay(name, full, mode)
    for t in BAD_STEPS:
        assert int(states[t].nonfinite) == (3 if BAD_STEPS[t] is with_nan else 1)
        assert expected[t].bad
    if mode == "zero":  # the finite rest of some bad step is clipped, not only zeroed
        assert any(norm64(expected[t].updates) < 0.99 * finite_norm64(full[t]) for t in BAD_STEPS)


@pytest.mark.parametrize("mode", MODES)
def test_adagc_nonfinite_step_is_as_if_removed(mode: str) -> None:
    clean = adagc_grads(40, 31, ADAGC_SPIKES)

    def bad(g: dict, t: int) -> dict:
        g = {k: v * np.float32(4.0) for k, v in g.items()}
        a = g["a"].copy()
        a[1] = np.nan if BAD_STEPS[t] is with_nan else -np.inf
        b = g["b"].copy()
        b[1, 2] = np.inf
        return {**g, "a": a, "b": b}

    full, origin = insert_bad(clean, bad)
    config = config_name("adagc", mode)
    _, states = check_as_if_removed(config, clean, full, origin)
    check_adagc_replay(full, mode)
    for t in BAD_STEPS:
        assert int(states[t].nonfinite) == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: optaxclip.zclip(warmup_steps=0),
    ],
    ids=["zclip"],
)
def test_zero_warmup_is_refused_or_harmless(make: Callable[[], Any]) -> None:
    """With no warm-up there are no statistics to start from (API.md defines none).

    Either the factory refuses `warmup_steps=0` (ValueError naming it), or steady norms of 1 go
    through: what a user would expect, not every update zeroed or skipped forever.
    """
    try:
        tx = make()
    except ValueError as err:
        assert "warmup_steps" in str(err)
        return
    params = np.zeros(2, np.float32)
    state = tx.init(params)
    with jax.disable_jit():
        for _ in range(3):
            updates, state = tx.update(np.array([0.6, 0.8], np.float32), state, params)
    assert np.any(np.asarray(updates) != 0), "every update is zeroed"


# ---------------------------------------------------------------------------------------------
# The same rules without `jax.jit` (under `jax.disable_jit`, so that `lax.cond` takes its branch
# in Python): short replays, one per policy. (`tests/test_conformance.py` checks plain eager calls.)

EAGER_NORMS = [1.0, 1.2, 0.9, 1.1, 6.0, 0.7]


@pytest.mark.parametrize("name", ["autoclip_p37", "zclip_w3", "quantile_clip", "adagc_w2"])
def test_replay_eager_matches_reference(name: str) -> None:
    grads = vectors(EAGER_NORMS, seed=15)
    if name == "adagc_w2":
        grads = adagc_grads(5, 21, {3: {"a": 10.0}})
        margins: list[float] = []
        expected = reference_adagc(grads, "propagate", margins, ADAGC_W2)
        assert min(margins) > 1e-3
        outs, states = replay(name, grads, jit=False)
        for t, (u, s, e) in enumerate(zip(outs, states, expected, strict=True)):
            check_step(t, u, s, e, "propagate", ADAGC_RULE())
    else:
        _, expected, _ = check_replay(name, grads, jit=False)
        assert any(e.clipped for e in expected)


# ---------------------------------------------------------------------------------------------
# 3. Loss-scale invariance of the scale-free policies.


@pytest.mark.parametrize(("name", "field"), [("autoclip", "clipped"), ("zclip", "clipped")])
def test_scale_free_decisions(name: str, field: str) -> None:
    grads = vectors(NORMS[name], seed=50)
    decisions = {}
    for scale in (1.0, 1e-3, 1e3):
        _, states = replay(name, [g * np.float32(scale) for g in grads])
        decisions[scale] = [bool(getattr(s, field)) for s in states]
    assert 3 <= sum(decisions[1.0]) < len(grads) - 3
    assert decisions[1e-3] == decisions[1.0]
    assert decisions[1e3] == decisions[1.0]


# ---------------------------------------------------------------------------------------------
# 4. jit: one trace per configuration, whatever the number of steps and tests.


def test_every_configuration_traced_once() -> None:
    for name in CONFIGS:
        if name in EAGER_ONLY:
            continue
        c = compiled(name)
        if c.traces[0] == 0:  # not yet run by another test
            params = init_params(name)
            grads = adagc_grads(3, 60, {}) if name.startswith("adagc") else vectors([1, 2, 3], 60)
            state = c.tx.init(params)
            for g in grads:
                _, state = c.step(g, state)
        assert c.traces[0] == 1, name


# ---------------------------------------------------------------------------------------------
# 5. `inject_hyperparams`: `history_size` fixes a shape.


def test_inject_hyperparams_needs_history_size_static() -> None:
    params = jnp.zeros(DIM)
    with pytest.raises(TypeError, match=r"(?s)history_size.*static_args"):
        tx = optax.inject_hyperparams(optaxclip.autoclip)(percentile=30.0)
        tx.init(params)


def test_inject_hyperparams_with_history_size_static() -> None:
    tx = optax.inject_hyperparams(optaxclip.autoclip, static_args=("history_size",))(
        percentile=30.0, history_size=8
    )
    traces = [0]

    @jax.jit
    def step(g: Any, state: Any) -> Any:
        traces[0] += 1
        return tx.update(g, state, GUARD_PARAMS)

    grads = vectors(AUTOCLIP_NORMS[:20], seed=70)
    state = tx.init(GUARD_PARAMS)
    seen = []
    for t, g in enumerate(grads):
        percentile = 30.0 if t < 12 else 80.0
        state.hyperparams["percentile"] = jnp.asarray(percentile)
        u, state = step(g, state)
        seen.append(norm64(g))
        threshold = np.percentile(seen[-8:], percentile, method="linear")
        np.testing.assert_allclose(state.inner_state.threshold, threshold, rtol=RTOL)
        np.testing.assert_allclose(u, g * min(1.0, threshold / seen[-1]), rtol=RTOL)
    assert traces[0] == 1


# ---------------------------------------------------------------------------------------------
# 6. `optaxclip.stats` on chains and on a guard around a chain.


def test_stats_of_zclip_in_a_chain() -> None:
    tx = optax.chain(optaxclip.zclip(warmup_steps=2), optax.adam(1e-3))
    state = tx.init(GUARD_PARAMS)
    with jax.disable_jit():  # cheaper than a compile, for three steps
        for g in vectors([1.0, 1.2, 9.0], seed=80):
            _, state = tx.update(g, state)
    found = optaxclip.stats(state)
    assert set(found) == set(optaxclip.ZClipState._fields) - {"name"}
    assert {"grad_norm", "clipped", "nonfinite", "threshold"} <= set(found)
    zstate = state[0]
    for k, v in found.items():
        np.testing.assert_array_equal(v, getattr(zstate, k))
    assert bool(found["clipped"])


@pytest.mark.parametrize("names", [(None, None), ("g", "c")])
def test_stats_of_guard_around_a_clipping_chain(names: tuple[Any, Any]) -> None:
    guard_name, clip_name = names
    tx = optaxclip.guard(
        optax.chain(optaxclip.clip_by_global_norm(1.0, name=clip_name), optax.adam(1e-3)),
        max_norm=10.0,
        name=guard_name,
    )
    grads = vectors([3.0, 20.0], seed=81)
    state = tx.init(GUARD_PARAMS)
    with jax.disable_jit():
        _, state = tx.update(grads[0], state, GUARD_PARAMS)
        _, state = tx.update(grads[1], state, GUARD_PARAMS)  # skipped: the clip keeps step 0
    found = optaxclip.stats(state)
    g_name, c_name = guard_name or "guard", clip_name or "clip_by_global_norm"
    guard_keys = {"grad_norm", "clipped", "nonfinite", "skipped", "skip_count"}
    clip_keys = {"grad_norm", "clipped", "nonfinite", "scale"}
    assert {f"{g_name}/{k}" for k in guard_keys} <= set(found)
    assert {f"{c_name}/{k}" for k in clip_keys} == {k for k in found if k.startswith(c_name + "/")}
    assert {k.split("/")[0] for k in found} == {g_name, c_name}
    np.testing.assert_allclose(found[f"{g_name}/grad_norm"], norm64(grads[1]), rtol=RTOL)
    assert bool(found[f"{g_name}/skipped"]) and int(found[f"{g_name}/skip_count"]) == 1
    np.testing.assert_allclose(found[f"{c_name}/grad_norm"], norm64(grads[0]), rtol=RTOL)
    assert bool(found[f"{c_name}/clipped"])
