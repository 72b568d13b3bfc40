"""Property tests of the norm-based static policies over generated trees.

Each policy is described by its clipping units (the sets of elements it scales together) and the
limit of each unit, linear in the threshold; every property is checked against that description
in float64 NumPy. Trees come from a few fixed layouts so that JAX compiles each policy only once
per layout; the threshold is a traced argument.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optaxclip

PROPERTY_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Float32 rounding of a norm and of a scaled update, with room for the error of summing a few
# dozen squares in float32.
RTOL = 1e-5
# Scaled elements may land below the smallest normal float32, where XLA on CPU flushes to zero.
FLUSH = 2.0**-125
TINY = float(np.finfo(np.float32).tiny)

# Leaf layouts (key, shape). Keys sort in order, so leaf i has label LABELS[i].
LAYOUTS = (
    (("w0", (3,)),),
    (("w0", ()), ("w1", (4,)), ("w2", (2, 3)), ("w3", (2, 1, 2, 3))),
    (("w0", (4,)), ("w1", (2, 3)), ("w2", (2, 1, 2, 3))),
)
LABELS = ("a", "b", "a", "a")
GROUP_FACTORS = {"a": 1.0, "b": 2.0}
# Mixed precision: (key, shape, dtype); values stay well inside float16's range.
MIXED_LAYOUT = (("h", (3,), np.float16), ("b", (2, 3), jnp.bfloat16), ("f", (2, 2), np.float32))
MIXED_RTOL = 2.0**-7
# Per element, the rounding of a result among float16's subnormals (spacing 2^-24).
MIXED_ATOL = 2.0**-24


# --- the reference -------------------------------------------------------------------------------


def _p(ord: Any) -> float:
    if ord is None:
        return 2.0
    return math.inf if isinstance(ord, str) else float(ord)


def ref_norm(values: np.ndarray, ord: Any) -> float:
    """The ord-norm of finite values in float64, scaled so that nothing over- or underflows."""
    mags = np.abs(np.asarray(values, np.float64)).ravel()
    if mags.size == 0 or mags.max() == 0:
        return 0.0
    top = mags.max()
    p = _p(ord)
    if math.isinf(p):
        return float(top)
    return float(top * np.sum((mags / top) ** p) ** (1.0 / p))


def unit_masks(shape: tuple[int, ...], axes: tuple[int, ...]) -> list[np.ndarray]:
    """One boolean mask per unit: the elements that share their indices along the other axes."""
    kept = [d for d in range(len(shape)) if d not in axes]
    if not kept:
        return [np.ones(shape, bool)]
    index = np.indices(shape)
    ids = np.ravel_multi_index(tuple(index[d] for d in kept), tuple(shape[d] for d in kept))
    return [ids == k for k in range(int(np.prod([shape[d] for d in kept])))]


def agc_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The default unit axes of `optax.adaptive_grad_clip`, by rank."""
    if sum(1 for d in shape if d != 1) <= 1:
        return tuple(range(len(shape)))
    return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[len(shape)]


@dataclasses.dataclass(frozen=True)
class Unit:
    """Elements clipped together (a mask per leaf key) and their limit per unit of threshold."""

    masks: dict[str, np.ndarray]
    base: float

    def values(self, tree: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate(
            [np.asarray(tree[k], np.float64)[m].ravel() for k, m in self.masks.items()]
        )


def _whole(tree):
    return {k: np.ones(np.shape(v), bool) for k, v in tree.items()}


def units_global(tree, params):
    del params
    return [Unit(_whole(tree), 1.0)]


def units_leaf(tree, params):
    del params
    return [Unit({k: np.ones(np.shape(v), bool)}, 1.0) for k, v in tree.items()]


def units_group(tree, params, factors=None):
    del params
    out = []
    for label in sorted(set(LABELS[: len(tree)])):
        keys = [k for i, k in enumerate(sorted(tree)) if LABELS[i] == label]
        masks = {k: np.ones(np.shape(tree[k]), bool) for k in keys}
        out.append(Unit(masks, factors[label] if factors else 1.0))
    return out


def units_block(tree, params, stacked=False):
    del params
    out = []
    for k, v in tree.items():
        shape = np.shape(v)
        axes = tuple(range(1 if stacked else 0, len(shape)))
        size = int(np.prod([shape[a] for a in axes]))
        out += [Unit({k: m}, math.sqrt(size)) for m in unit_masks(shape, axes)]
    return out


def units_agc(tree, params, eps=1e-3):
    out = []
    for k, v in tree.items():
        for m in unit_masks(np.shape(v), agc_axes(np.shape(v))):
            w = ref_norm(np.asarray(params[k], np.float64)[m], None)
            out.append(Unit({k: m}, max(w, eps)))
    return out


def units_value(tree, params):
    del params
    out = []
    for k, v in tree.items():
        for index in np.ndindex(np.shape(v)):
            mask = np.zeros(np.shape(v), bool)
            mask[index] = True
            out.append(Unit({k: mask}, 1.0))
    return out


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy under test: how to build it, its units, and the orders it measures in.

    Attributes:
      build: (threshold, labels) -> transformation.
      units: (tree, params) -> list of `Unit`.
      ord: the order of the unit norms.
      state_ord: the order of the `grad_norm` it records.
      unitwise: whether it measures units without the underflow rescue (AGC, block RMS): such
        policies are exercised on magnitudes >= 1e-15, where underflow cannot change a decision.
      needs_params: whether `update` needs `params` (AGC).
      divisor_floor: the floor on a unit's norm where it divides the limit; optax's AGC
        scales by limit / max(norm, 1e-6), so units below 1e-6 land under the limit.
      layouts: indices into LAYOUTS it runs on.
    """

    build: Callable[[Any, dict[str, str]], Any]
    units: Callable[[Any, Any], list[Unit]]
    ord: Any = None
    state_ord: Any = None
    unitwise: bool = False
    needs_params: bool = False
    divisor_floor: float = 0.0
    layouts: tuple[int, ...] = (0, 1)


def _norm_policies() -> dict[str, Policy]:
    out = {}
    for ord in [None, 1, 1.5, "inf"]:
        out[f"global-{ord}"] = Policy(
            lambda t, labels, ord=ord: optaxclip.clip_by_global_norm(t, ord=ord),
            units_global,
            ord,
            ord,
        )
    for ord in [None, "inf"]:
        out[f"leaf-{ord}"] = Policy(
            lambda t, labels, ord=ord: optaxclip.clip_by_leaf_norm(t, ord=ord),
            units_leaf,
            ord,
            ord,
        )
        out[f"group-{ord}"] = Policy(
            lambda t, labels, ord=ord: optaxclip.clip_by_group_norm(t, labels, ord=ord),
            units_group,
            ord,
            ord,
        )
    out["group-dict"] = Policy(
        lambda t, labels: optaxclip.clip_by_group_norm(
            {k: f * t for k, f in GROUP_FACTORS.items()}, labels
        ),
        functools.partial(units_group, factors=GROUP_FACTORS),
    )
    out["block-rms"] = Policy(
        lambda t, labels: optaxclip.clip_by_block_rms(t), units_block, unitwise=True
    )
    out["block-rms-stacked"] = Policy(
        lambda t, labels: optaxclip.clip_by_block_rms(t, stacked=True),
        functools.partial(units_block, stacked=True),
        unitwise=True,
        layouts=(0, 2),
    )
    out["agc"] = Policy(
        lambda t, labels: optaxclip.adaptive_grad_clip(t),
        units_agc,
        unitwise=True,
        needs_params=True,
        divisor_floor=1e-6,
    )
    out["value"] = Policy(lambda t, labels: optaxclip.clip_by_value(t), units_value, "inf", "inf")
    return out


POLICIES = _norm_policies()
NAMES = list(POLICIES)
# Mixed precision goes through the same apply step in every policy; one variant of each suffices.
MIXED_NAMES = [
    "global-None",
    "leaf-None",
    "group-dict",
    "block-rms",
    "block-rms-stacked",
    "agc",
    "value",
]


@functools.partial(jax.jit, static_argnames="name")
def apply(name, updates, params, threshold):
    """One step of policy `name` from a fresh state; the threshold is traced."""
    labels = {k: LABELS[i] for i, k in enumerate(sorted(updates))}
    tx = POLICIES[name].build(threshold, labels)
    return tx.update(updates, tx.init(updates), params)


# --- strategies ----------------------------------------------------------------------------------


def _scaled(sign: float, mantissa: float, exponent: int) -> float:
    return float(np.float32(sign * mantissa * 10.0**exponent))


@st.composite
def arrays(draw, shape, low, high, dtype=np.float32):
    """Finite values whose magnitudes cluster around a random power of ten, with zeros.

    Values are drawn as float32 already rounded to `dtype`, then cast to it.
    """
    centre = draw(st.integers(low, high))
    spread = draw(st.integers(0, 10))
    exponents = st.integers(max(low, centre - spread), min(high, centre + spread))
    nonzero = st.builds(_scaled, st.sampled_from([-1.0, 1.0]), st.floats(1.0, 9.99), exponents).map(
        lambda v: float(np.asarray(v, dtype))
    )
    elements = st.one_of(st.sampled_from([0.0, -0.0]), nonzero, nonzero, nonzero)
    return draw(hnp.arrays(np.float32, shape, elements=elements)).astype(dtype)


def _ratio(policy: Policy, tree, params) -> float:
    """The smallest threshold under which no unit would be clipped."""
    worst = 0.0
    for unit in policy.units(tree, params):
        worst = max(worst, ref_norm(unit.values(tree), policy.ord) / unit.base)
    return worst


@dataclasses.dataclass
class Case:
    name: str
    policy: Policy
    updates: dict[str, np.ndarray]
    params: dict[str, np.ndarray] | None
    threshold: float

    def run(self, updates=None):
        updates = self.updates if updates is None else updates
        jax_updates = {k: jnp.asarray(v) for k, v in updates.items()}
        jax_params = None
        if self.params is not None:
            jax_params = {k: jnp.asarray(v) for k, v in self.params.items()}
        out, state = apply(self.name, jax_updates, jax_params, np.float32(self.threshold))
        return {k: np.asarray(v) for k, v in out.items()}, state

    def units(self):
        return self.policy.units(self.updates, self.params)


@st.composite
def cases(draw, name, mixed=False, below=False):
    """A policy, an update tree, params for AGC and a threshold (0 included)."""
    policy = POLICIES[name]
    low, high = (-15, 35) if policy.unitwise else (-36, 35)
    if mixed:
        layout = [(k, s, d) for k, s, d in MIXED_LAYOUT]
        low, high = -3, 3
    else:
        layout = [(k, s, np.float32) for k, s in LAYOUTS[draw(st.sampled_from(policy.layouts))]]
    updates = {k: draw(arrays(s, low, high, d)) for k, s, d in layout}
    params = None
    if policy.needs_params:
        params = {k: draw(arrays(s, low, high, d)) for k, s, d in layout}
    ratio = _ratio(policy, updates, params)
    if below:
        # Strictly above every unit's need, so that nothing may be clipped.
        factor = draw(st.floats(1.001, 1e6))
        # A subnormal threshold reads as 0 on XLA's CPU backend: raise it to the smallest normal.
        # Past float32's range only inf is above the need (AGC's limit divides by eps = 1e-3).
        need = ratio * factor
        threshold = math.inf if need > 3e38 else float(np.float32(max(need, TINY)))
        if ratio == 0:
            threshold = draw(st.sampled_from([0.0, 1.0]))
    else:
        t_low = -15 if policy.unitwise else -30
        relative = st.floats(-3.0, 3.0).map(lambda e: ratio * 10.0**e)
        absolute = st.builds(_scaled, st.just(1.0), st.floats(1.0, 9.99), st.integers(t_low, 30))
        threshold = draw(st.one_of(st.just(0.0), absolute, relative, relative))
        threshold = float(np.float32(min(threshold, 3e38)))
        if 0 < threshold < (10.0**t_low if policy.unitwise else TINY):
            threshold = 0.0
    return Case(name, policy, updates, params, threshold)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).view(np.dtype(f"u{np.asarray(x).dtype.itemsize}"))


# --- properties ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_clipped_norm_never_exceeds_threshold(name, data):
    case = data.draw(cases(name))
    out, state = case.run()
    for k, x in case.updates.items():
        assert out[k].dtype == np.float32, k
        assert out[k].shape == x.shape, k
        assert np.isfinite(out[k]).all(), k
    t = case.threshold
    for unit in case.units():
        limit = t * unit.base
        norm_in = ref_norm(unit.values(case.updates), case.policy.ord)
        norm_out = ref_norm(unit.values(out), case.policy.ord)
        assert norm_out <= limit * (1 + RTOL), (unit.masks, norm_in, norm_out, limit)
        if norm_in > limit * (1 + RTOL) and limit >= norm_in * 1e-30:
            # Clipping lands on the limit, not below it.
            expected = limit * norm_in / max(norm_in, case.policy.divisor_floor)
            np.testing.assert_allclose(norm_out, expected, rtol=RTOL, err_msg=str(unit.masks))
    needs_clip = any(
        ref_norm(u.values(case.updates), case.policy.ord) > t * u.base * (1 + RTOL)
        for u in case.units()
    )
    if needs_clip:
        assert bool(state.clipped)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_direction_is_kept(name, data):
    case = data.draw(cases(name))
    out, _ = case.run()
    for unit in case.units():
        x = unit.values(case.updates)
        y = unit.values(out)
        top = np.abs(x).max()
        if top == 0:
            np.testing.assert_array_equal(y, 0.0)
            continue
        # The least-squares multiple s in y = s x, then y must be s x elementwise.
        s = float(np.dot(y / top, x / top) / np.dot(x / top, x / top))
        assert -1e-12 <= s <= 1 + 1e-6, (unit.masks, s)
        np.testing.assert_allclose(y, s * x, rtol=4 * 2.0**-24, atol=FLUSH, err_msg=f"s={s}")
        assert np.all(np.sign(y) * np.sign(x) >= 0)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_clipping_is_idempotent(name, data):
    case = data.draw(cases(name))
    once, _ = case.run()
    twice, _ = case.run(once)
    for unit in case.units():
        limit = case.threshold * unit.base
        if limit < case.policy.divisor_floor:
            # optax's AGC rule: a unit a rounding error over a limit below 1e-6 is scaled by
            # limit / 1e-6, not limit / norm; only the bound survives a second pass.
            assert ref_norm(unit.values(twice), case.policy.ord) <= limit * (1 + RTOL)
            continue
        np.testing.assert_allclose(
            unit.values(twice), unit.values(once), rtol=RTOL, atol=FLUSH, err_msg=str(unit.masks)
        )


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_updates_below_threshold_are_bit_identical(name, data):
    case = data.draw(cases(name, below=True))
    out, state = case.run()
    for k, x in case.updates.items():
        assert out[k].dtype == x.dtype
        np.testing.assert_array_equal(_bits(out[k]), _bits(x), err_msg=k)
    assert not bool(state.clipped)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_state_records_the_input_norm(name, data):
    case = data.draw(cases(name))
    _, state = case.run()
    everything = np.concatenate([np.ravel(v) for v in case.updates.values()])
    expected = ref_norm(everything, case.policy.state_ord)
    assert state.grad_norm.dtype == jnp.float32
    assert state.grad_norm.shape == ()
    np.testing.assert_allclose(float(state.grad_norm), expected, rtol=RTOL, atol=0)
    assert int(state.nonfinite) == 0
    if hasattr(state, "group_norm"):
        for unit, label in zip(case.units(), sorted(state.group_norm), strict=True):
            np.testing.assert_allclose(
                float(state.group_norm[label]),
                ref_norm(unit.values(case.updates), case.policy.ord),
                rtol=RTOL,
                atol=0,
                err_msg=label,
            )


@pytest.mark.parametrize("name", MIXED_NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_outputs_keep_dtype_and_shape(name, data):
    case = data.draw(cases(name, mixed=True))
    out, state = case.run()
    assert sorted(out) == sorted(case.updates)
    for k, x in case.updates.items():
        assert out[k].dtype == x.dtype, k
        assert out[k].shape == x.shape, k
        assert np.isfinite(np.asarray(out[k], np.float32)).all(), k
    assert state.grad_norm.dtype == jnp.float32
    for unit in case.units():
        norm_out = ref_norm(unit.values(out), case.policy.ord)
        size = unit.values(out).size
        limit = case.threshold * unit.base
        assert norm_out <= limit * (1 + MIXED_RTOL) + size * MIXED_ATOL, unit.masks
