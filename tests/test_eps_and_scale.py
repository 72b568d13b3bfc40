"""`eps` of the norm clips (PyTorch's `norm + 1e-6`), and the `scale` every clip records."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip

NORM_CLIPS = {
    "clip_by_global_norm": lambda m, **kw: optaxclip.clip_by_global_norm(m, **kw),
    "clip_by_leaf_norm": lambda m, **kw: optaxclip.clip_by_leaf_norm(m, **kw),
    "clip_by_group_norm": lambda m, **kw: optaxclip.clip_by_group_norm(m, lambda t: "all", **kw),
}
EPS_CLIPS = pytest.mark.parametrize("make", list(NORM_CLIPS.values()), ids=list(NORM_CLIPS))
GRADS = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.6, 0.8]), "c": jnp.array([12.0, 5.0])}


def step(tx: Any, grads: Any, params: Any = None) -> tuple[Any, Any]:
    params = grads if params is None else params
    return jax.jit(tx.update)(grads, tx.init(params), params)


def norm(tree: Any) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in tree)))


# eps


@EPS_CLIPS
@pytest.mark.parametrize("bad", [-1e-6, math.nan, math.inf])
def test_invalid_eps_names_it(make: Any, bad: float) -> None:
    with pytest.raises(ValueError, match="`eps` must be"):
        make(1.0, eps=bad)


def test_eps_is_torch_formula_at_float64() -> None:
    with jax.enable_x64(True):
        g = jnp.array([3.0, 4.0], jnp.float64)
        for max_norm in (1.0, 5.0 - 0.5e-6, 5.0 - 2e-6, 5.0, 10.0):
            out, state = step(optaxclip.clip_by_global_norm(max_norm, eps=1e-6), g)
            want = np.asarray(g) * min(1.0, max_norm / (5.0 + 1e-6))
            np.testing.assert_allclose(np.asarray(out), want, rtol=1e-14)
            # Clipped exactly when norm + eps > max_norm: just below max_norm too.
            assert bool(state.clipped) == (max_norm < 5.0 + 1e-6)
            unchanged, _ = step(optaxclip.clip_by_global_norm(max_norm), g)
            assert np.array_equal(np.asarray(unchanged), np.asarray(g)) == (max_norm >= 5.0)


@EPS_CLIPS
def test_eps_per_group(make: Any) -> None:
    out, state = step(make(1.0, eps=0.5), GRADS)
    norms = {"a": 5.0, "b": 1.0, "c": 13.0}
    for k, x in out.items():
        if make is NORM_CLIPS["clip_by_leaf_norm"]:
            factor = min(1.0, 1.0 / (norms[k] + 0.5))
        else:
            factor = 1.0 / (math.sqrt(25 + 1 + 169) + 0.5)
        np.testing.assert_allclose(np.asarray(x), np.asarray(GRADS[k]) * factor, rtol=1e-6)
    assert bool(state.clipped)


@EPS_CLIPS
def test_eps_zero_norm_and_zero_max_norm(make: Any) -> None:
    zeros = jax.tree.map(jnp.zeros_like, GRADS)
    out, state = step(make(1e-9, eps=1e-6), zeros)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(out))
    assert float(state.scale) == 1 and not bool(state.clipped)
    out, state = step(make(0.0, eps=1e-6), GRADS)
    for x in jax.tree.leaves(out):
        assert float(jnp.max(jnp.abs(x))) == 0 and not bool(jnp.any(jnp.isnan(x)))
    assert float(state.scale) == 0

    def loss(g: Any) -> jax.Array:
        tx = make(0.5, eps=1e-6)
        out, _ = tx.update(g, tx.init(g))
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

    for g in (zeros, GRADS):
        for x in jax.tree.leaves(jax.jit(jax.grad(loss))(g)):
            assert bool(jnp.all(jnp.isfinite(x)))


@EPS_CLIPS
def test_eps_default_is_zero(make: Any) -> None:
    a, _ = step(make(1.0), GRADS)
    b, _ = step(make(1.0, eps=0.0), GRADS)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", list(NORM_CLIPS))
def test_traced_eps(name: str) -> None:
    factory = {
        "clip_by_global_norm": optaxclip.clip_by_global_norm,
        "clip_by_leaf_norm": optaxclip.clip_by_leaf_norm,
        "clip_by_group_norm": optaxclip.clip_by_group_norm,
    }[name]
    extra: dict[str, Any] = {"labels": lambda t: "all"} if name == "clip_by_group_norm" else {}
    schedule = optax.linear_schedule(0.5, 0.0, transition_steps=2)
    static = ("labels",) if extra else ()
    tx = optax.inject_hyperparams(factory, static_args=static)(max_norm=1.0, eps=schedule, **extra)
    state = tx.init(GRADS)
    update = jax.jit(tx.update)
    for t in range(3):
        got, state = update(GRADS, state, GRADS)
        want, _ = step(NORM_CLIPS[name](1.0, eps=float(schedule(t))), GRADS)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6)
    lowered = jax.jit(tx.update).trace(GRADS, state, GRADS).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    for op in ("stablehlo.case", "stablehlo.if", "stablehlo.while"):
        assert op not in text


# scale


@pytest.mark.parametrize("ord", [1, 2, "inf"])
def test_global_scale_gives_the_post_clip_norm(ord: Any) -> None:
    out, state = step(optaxclip.clip_by_global_norm(2.0, ord=ord), GRADS)
    post = float(optaxclip.global_norm(out, ord=ord))
    np.testing.assert_allclose(post, float(state.grad_norm) * float(state.scale), rtol=1e-6)
    np.testing.assert_allclose(post, 2.0, rtol=1e-6)


def test_leaf_and_group_scale_is_the_smallest() -> None:
    _, state = step(optaxclip.clip_by_leaf_norm(2.0), GRADS)
    np.testing.assert_allclose(float(state.scale), 2.0 / 13.0, rtol=1e-6)
    labels = {"a": "x", "b": "x", "c": "y"}
    _, state = step(optaxclip.clip_by_group_norm({"x": 1.0, "y": 26.0}, labels), GRADS)
    np.testing.assert_allclose(float(state.scale), 1.0 / math.sqrt(26.0), rtol=1e-6)
    _, state = step(optaxclip.clip_by_group_norm(100.0, labels), GRADS)
    assert float(state.scale) == 1 and not bool(state.clipped)
    found = optaxclip.stats(state)
    assert "scale" in found and "group_norm/x" in found


@EPS_CLIPS
def test_scale_on_nonfinite_steps(make: Any) -> None:
    bad = {**GRADS, "a": jnp.array([jnp.nan, 4.0])}
    if make is not NORM_CLIPS["clip_by_leaf_norm"]:
        _, state = step(make(1.0), bad)
        assert float(state.scale) == 1  # "propagate": nothing scaled when the norm is NaN...
    _, state = step(make(1.0, nonfinite="skip"), bad)
    assert float(state.scale) == 0  # ...and a skipped step is multiplied by 0.
    out, state = step(make(1.0, nonfinite="zero"), bad)
    assert 0 < float(state.scale) < 1
    assert float(out["a"][0]) == 0


def test_leaf_scale_with_one_nonfinite_leaf() -> None:
    """Per leaf under "propagate", the NaN leaf is left alone and the others still clip."""
    bad = {**GRADS, "a": jnp.array([jnp.nan, 4.0])}
    _, state = step(optaxclip.clip_by_leaf_norm(1.0), bad)
    np.testing.assert_allclose(float(state.scale), 1.0 / 13.0, rtol=1e-6)


def test_clip_by_value_scale() -> None:
    out, state = step(optaxclip.clip_by_value(2.0), GRADS)
    largest = float(jnp.max(jnp.abs(out["c"])))
    np.testing.assert_allclose(largest, float(state.grad_norm) * float(state.scale), rtol=1e-6)
    np.testing.assert_allclose(float(state.scale), 2.0 / 12.0, rtol=1e-6)
    _, state = step(optaxclip.clip_by_value(2.0), {"a": jnp.array([jnp.inf, 1.0])})
    assert float(state.scale) == 1


def test_unit_policies_scale_is_the_smallest_unit() -> None:
    x = jnp.array([[4.0, 4.0], [0.5, 0.5], [2.0, 2.0]])
    _, state = step(optaxclip.clip_by_block_rms(1.0, stacked=True), x)
    np.testing.assert_allclose(float(state.scale), 0.25, rtol=1e-6)
    params = jnp.ones((3, 2))
    _, state = step(optaxclip.adaptive_grad_clip(0.1, axis=1), x, params)
    unit = float(jnp.sqrt(2.0))
    np.testing.assert_allclose(float(state.scale), 0.1 * unit / (4.0 * unit), rtol=1e-6)


@pytest.mark.parametrize(
    "tx",
    [
        optaxclip.autoclip(0.0, history_size=4),
        optaxclip.zclip(warmup_steps=2, max_norm=1.0),
        optaxclip.quantile_clip(initial_norm=1.0),
    ],
    ids=["autoclip", "zclip", "quantile_clip"],
)
def test_adaptive_global_scale(tx: Any) -> None:
    state = tx.init(GRADS)
    update = jax.jit(tx.update)
    for factor in (1.0, 0.1, 3.0):
        grads = jax.tree.map(lambda g, f=factor: g * f, GRADS)
        out, state = update(grads, state)
        post = norm(jax.tree.leaves(out))
        np.testing.assert_allclose(post, float(state.grad_norm) * float(state.scale), rtol=1e-5)
    assert float(state.scale) < 1


def test_adagc_scale_is_the_smallest_leaf() -> None:
    tx = optaxclip.adagc(warmup_steps=1, warmup_max_norm=100.0)
    state = tx.init(GRADS)
    _, state = tx.update(GRADS, state)
    assert float(state.scale) == 1
    spiked = {**GRADS, "b": GRADS["b"] * 10}
    out, state = tx.update(spiked, state)
    ratios = [float(jnp.linalg.norm(out[k]) / jnp.linalg.norm(spiked[k])) for k in GRADS]
    np.testing.assert_allclose(float(state.scale), min(ratios), rtol=1e-6)
    assert float(state.scale) < 1


def test_empty_tree_scale_is_one() -> None:
    for tx in (
        optaxclip.clip_by_global_norm(1.0),
        optaxclip.clip_by_leaf_norm(1.0),
        optaxclip.clip_by_group_norm(1.0, {}),
        optaxclip.clip_by_block_rms(1.0),
        optaxclip.adagc(),
    ):
        _, state = tx.update({}, tx.init({}), {})
        assert float(state.scale) == 1
