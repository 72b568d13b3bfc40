"""One table, every policy: the conventions every optaxclip transform keeps.

A new policy joins `POLICIES` and is checked everywhere at once.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip


@dataclasses.dataclass(frozen=True)
class Policy:
    """How to build a policy with a threshold, and what that threshold means."""

    factory: Callable[..., Any]
    threshold_arg: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    needs_params: bool = False
    static_args: tuple[str, ...] = ()
    # Whether a small threshold clips on the very first step, and a zero one zeroes it.
    threshold_bounds_first_step: bool = True
    # Whether it is a clip, whose state records the `scale` it applied (wrappers are not).
    scales: bool = True

    def make(self, threshold: Any, **extra: Any) -> Any:
        return self.factory(**{self.threshold_arg: threshold}, **self.options, **extra)


def labels(tree: dict[str, Any]) -> dict[str, Any]:
    """Groups the bias apart from the rest, whatever else the tree holds."""
    return {
        k: jax.tree.map(lambda _, k=k: "bias" if k == "b" else "dense", v) for k, v in tree.items()
    }


POLICIES = {
    "clip_by_value": Policy(optaxclip.clip_by_value, "max_delta"),
    "clip_by_global_norm": Policy(optaxclip.clip_by_global_norm, "max_norm"),
    "clip_by_global_norm_inf": Policy(optaxclip.clip_by_global_norm, "max_norm", {"ord": "inf"}),
    "clip_by_global_norm_zero": Policy(
        optaxclip.clip_by_global_norm, "max_norm", {"nonfinite": "zero"}
    ),
    "clip_by_global_norm_skip": Policy(
        optaxclip.clip_by_global_norm, "max_norm", {"nonfinite": "skip"}
    ),
    "clip_by_leaf_norm": Policy(optaxclip.clip_by_leaf_norm, "max_norm"),
    "clip_by_leaf_norm_l1": Policy(
        optaxclip.clip_by_leaf_norm, "max_norm", {"ord": 1}, static_args=("ord",)
    ),
    "clip_by_group_norm": Policy(
        optaxclip.clip_by_group_norm, "max_norm", {"labels": labels}, static_args=("labels",)
    ),
    "clip_by_block_rms": Policy(optaxclip.clip_by_block_rms, "threshold"),
    "adaptive_grad_clip": Policy(optaxclip.adaptive_grad_clip, "clipping", needs_params=True),
    "autoclip": Policy(
        optaxclip.autoclip,
        "percentile",
        {"history_size": 16},
        static_args=("history_size",),
        threshold_bounds_first_step=False,
    ),
    "zclip": Policy(optaxclip.zclip, "max_norm", {"warmup_steps": 2}),
    "quantile_clip": Policy(optaxclip.quantile_clip, "initial_norm"),
    "adagc": Policy(optaxclip.adagc, "warmup_max_norm", {"warmup_steps": 2}),
    "guard": Policy(optaxclip.guard, "max_norm", {"inner": optax.identity()}, scales=False),
    "guard_spike": Policy(
        optaxclip.guard,
        "max_norm",
        {"inner": optax.identity(), "z_threshold": 3.0},
        scales=False,
    ),
    # No clipping threshold: the initial scale stands in for one (updates are divided by it).
    "loss_scale": Policy(
        optaxclip.loss_scale,
        "initial_scale",
        {"inner": optax.identity(), "min_scale": 2.0**-8},
        threshold_bounds_first_step=False,
        scales=False,
    ),
}

ALL = pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
BOUNDED = {k: p for k, p in POLICIES.items() if p.threshold_bounds_first_step}
BOUNDING = pytest.mark.parametrize("policy", list(BOUNDED.values()), ids=list(BOUNDED))


def make_tree(dtype: Any = jnp.float32, scale: float = 1.0) -> dict[str, jax.Array]:
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w": (scale * jax.random.normal(k1, (3, 4))).astype(dtype),
        "b": (scale * jax.random.normal(k2, (4,))).astype(dtype),
        "s": (scale * jax.random.normal(k3, ())).astype(dtype),
    }


PARAMS = jax.tree.map(lambda x: x + 0.5, make_tree())


def run(tx: Any, updates: Any, params: Any = PARAMS, state: Any = None, **extra: Any) -> Any:
    state = tx.init(params) if state is None else state
    return tx.update(updates, state, params, **extra)


def assert_tree_close(a: Any, b: Any, rtol: float = 1e-6, atol: float = 0.0) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


@ALL
def test_jit_matches_eager(policy: Policy) -> None:
    tx = policy.make(0.5)
    grads = make_tree(scale=3.0)
    eager, eager_state = run(tx, grads)
    jitted, jit_state = jax.jit(lambda g: run(tx, g))(grads)
    assert_tree_close(eager, jitted, rtol=1e-6)
    assert bool(eager_state.clipped) == bool(jit_state.clipped)
    assert bool(jit_state.clipped) == policy.threshold_bounds_first_step


@ALL
def test_no_recompile_on_second_call(policy: Policy) -> None:
    tx = policy.make(0.5)
    traces = []

    @jax.jit
    def step(updates: Any, state: Any) -> Any:
        traces.append(None)
        return tx.update(updates, state, PARAMS)

    state = tx.init(PARAMS)
    _, state = step(make_tree(scale=3.0), state)
    _, state = step(make_tree(scale=0.1), state)
    assert len(traces) == 1


@ALL
def test_state_can_be_donated(policy: Policy) -> None:
    tx = policy.make(0.5)
    step = jax.jit(lambda g, s: tx.update(g, s, PARAMS), donate_argnums=1)
    state = tx.init(PARAMS)
    for scale in (3.0, 0.1):
        _, state = step(make_tree(scale=scale), state)
    assert float(state.grad_norm) > 0


@ALL
def test_ignores_unknown_extra_args(policy: Policy) -> None:
    tx = policy.make(0.5)
    grads = make_tree(scale=3.0)
    plain, _ = run(tx, grads)
    extra, _ = run(tx, grads, value=jnp.ones([]), unknown_flag=True)
    assert_tree_close(plain, extra, rtol=0)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


@ALL
def test_inject_hyperparams_schedule(policy: Policy) -> None:
    schedule = optax.linear_schedule(2.0, 0.1, transition_steps=3)
    factory = optax.inject_hyperparams(policy.factory, static_args=policy.static_args)
    tx = factory(**{policy.threshold_arg: schedule}, **policy.options)
    state = tx.init(PARAMS)
    step = jax.jit(lambda g, s: tx.update(g, s, PARAMS))
    reference = policy.make(float(schedule(0))).init(PARAMS)
    for t in range(4):
        grads = make_tree(scale=3.0 + t)
        got, state = step(grads, state)
        want, reference = policy.make(float(schedule(t))).update(grads, reference, PARAMS)
        assert_tree_close(got, want, rtol=2e-6, atol=1e-7)
    assert float(state.hyperparams[policy.threshold_arg]) == pytest.approx(0.1)


@ALL
def test_multisteps_clips_the_accumulated_gradient(policy: Policy) -> None:
    tx = optax.MultiSteps(optax.chain(policy.make(0.5), optax.sgd(1.0)), every_k_schedule=2)
    state = tx.init(PARAMS)
    g1, g2 = make_tree(scale=3.0), make_tree(scale=1.0)
    step = jax.jit(lambda g, s: tx.update(g, s, PARAMS))
    first, state = step(g1, state)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(first))
    second, state = step(g2, state)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    want, _ = run(optax.chain(policy.make(0.5), optax.sgd(1.0)), mean)
    assert_tree_close(second, want, rtol=1e-5, atol=1e-7)
    assert "grad_norm" in optaxclip.stats(state)


@ALL
def test_init_on_shape_dtype_structs(policy: Policy) -> None:
    tx = policy.make(0.5)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    assert jax.tree.structure(tx.init(abstract)) == jax.tree.structure(tx.init(PARAMS))


@ALL
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_keeps_dtype_and_computes_in_float32(policy: Policy, dtype: Any) -> None:
    tx = policy.make(0.5)
    grads = make_tree(dtype, scale=3.0)
    out, state = run(tx, grads)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(out), strict=True):
        assert y.dtype == x.dtype and y.shape == x.shape
    want, want_state = run(tx, jax.tree.map(lambda x: x.astype(jnp.float32), grads))
    tol = {jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2, jnp.float32: 1e-6}[dtype]
    assert_tree_close(jax.tree.map(lambda x: x.astype(jnp.float32), out), want, rtol=tol, atol=tol)
    assert state.grad_norm.dtype == jnp.float32
    np.testing.assert_allclose(state.grad_norm, want_state.grad_norm, rtol=1e-6)


@ALL
def test_float64_under_x64(policy: Policy) -> None:
    with jax.enable_x64(True):
        grads = make_tree(jnp.float64, scale=3.0)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), PARAMS)
        tx = policy.make(0.5)
        out, state = run(tx, grads, params)
        for x in jax.tree.leaves(out):
            assert x.dtype == jnp.float64
        assert bool(state.clipped) == policy.threshold_bounds_first_step
        assert state.grad_norm.dtype == jnp.float32


@BOUNDING
def test_fp16_large_values_do_not_overflow(policy: Policy) -> None:
    grads = {"w": jnp.full((4, 4), 300.0, jnp.float16), "b": jnp.full((4,), 300.0, jnp.float16)}
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    out, state = policy.make(1.0).init(params), None
    out, state = policy.make(1.0).update(grads, out, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert bool(jnp.isfinite(state.grad_norm))
    assert bool(state.clipped)


@ALL
def test_empty_tree_and_none_leaves(policy: Policy) -> None:
    tx = policy.make(0.5)
    out, state = tx.update({}, tx.init({}), {})
    assert out == {}
    assert float(state.grad_norm) == 0
    grads = {**make_tree(scale=3.0), "frozen": None, "masked": optax.MaskedNode()}
    params = {**PARAMS, "frozen": None, "masked": optax.MaskedNode()}
    out, _ = tx.update(grads, tx.init(params), params)
    assert out["frozen"] is None and isinstance(out["masked"], optax.MaskedNode)
    want, _ = run(tx, make_tree(scale=3.0))
    assert_tree_close({k: out[k] for k in want}, want, rtol=0)


@ALL
def test_float0_leaves_pass_through(policy: Policy) -> None:
    tx = policy.make(0.5)
    zero = np.zeros((2,), jax.dtypes.float0)
    grads = {**make_tree(scale=3.0), "step": zero}
    params = {**PARAMS, "step": jnp.zeros((2,), jnp.int32)}
    out, _ = tx.update(grads, tx.init(params), params)
    assert out["step"].dtype == jax.dtypes.float0


@ALL
def test_zero_gradients_stay_zero(policy: Policy) -> None:
    tx = policy.make(0.5)
    zeros = jax.tree.map(jnp.zeros_like, make_tree())
    out, state = jax.jit(lambda g: run(tx, g))(zeros)
    for x in jax.tree.leaves(out):
        assert not bool(jnp.any(jnp.isnan(x)))
        assert float(jnp.max(jnp.abs(x))) == 0
    assert float(state.grad_norm) == 0 and not bool(state.clipped)


@BOUNDING
def test_threshold_zero_gives_zeros_not_nan(policy: Policy) -> None:
    tx = policy.make(0.0)
    for grads in (make_tree(scale=3.0), jax.tree.map(jnp.zeros_like, make_tree())):
        out, _ = run(tx, grads)
        for x in jax.tree.leaves(out):
            assert float(jnp.max(jnp.abs(x))) == 0 and not bool(jnp.any(jnp.isnan(x)))


@ALL
def test_nonfinite_elements_are_counted(policy: Policy) -> None:
    tx = policy.make(0.5)
    grads = make_tree(scale=3.0)
    grads["w"] = grads["w"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    grads["b"] = grads["b"].at[2].set(-jnp.inf)
    _, state = jax.jit(lambda g: run(tx, g))(grads)
    assert int(state.nonfinite) == 3
    _, state = run(tx, make_tree(scale=3.0))
    assert int(state.nonfinite) == 0


@ALL
def test_grad_through_clip_is_finite(policy: Policy) -> None:
    tx = policy.make(0.5)

    def loss(grads: Any) -> jax.Array:
        out, _ = run(tx, grads)
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

    for grads in (jax.tree.map(jnp.zeros_like, make_tree()), make_tree(scale=3.0)):
        g = jax.jit(jax.grad(loss))(grads)
        for x in jax.tree.leaves(g):
            assert bool(jnp.all(jnp.isfinite(x)))


@ALL
def test_state_fields_and_stats(policy: Policy) -> None:
    tx = policy.make(0.5)
    _, state = run(tx, make_tree(scale=3.0))
    found = optaxclip.stats(optax.chain(optax.identity(), tx).init(PARAMS))
    assert {"grad_norm", "clipped", "nonfinite"} <= set(found)
    assert state.grad_norm.dtype == jnp.float32 and state.grad_norm.shape == ()
    assert state.clipped.dtype == jnp.bool_ and state.nonfinite.dtype == jnp.int32
    assert float(optax.tree.get(state, "grad_norm")) == float(state.grad_norm)
    assert ("scale" in found) == policy.scales, (
        "a clip records `scale`; set scales=False in POLICIES for a transform that does not scale"
    )
    if policy.scales:
        assert state.scale.dtype == jnp.float32 and state.scale.shape == ()
        assert float(found["scale"]) == 1.0
        assert 0 < float(state.scale) <= 1 and bool(state.clipped) == bool(state.scale < 1)


@pytest.mark.parametrize(
    "policy",
    [p for p in POLICIES.values() if p.scales],
    ids=[k for k, p in POLICIES.items() if p.scales],
)
def test_scale_is_the_smallest_factor_applied(policy: Policy) -> None:
    tx = policy.make(0.5)
    grads = make_tree(scale=3.0)
    out, state = jax.jit(lambda g: run(tx, g))(grads)
    ratios = np.concatenate(
        [
            (np.abs(np.asarray(y, np.float64)) / np.abs(np.asarray(x, np.float64))).ravel()
            for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(out), strict=True)
        ]
    )
    np.testing.assert_allclose(ratios.min(), float(state.scale), rtol=1e-5)
    assert float(state.scale) <= 1


@ALL
def test_keyword_only_options_and_name(policy: Policy) -> None:
    tx = policy.make(0.5, name="mine")
    _, state = run(tx, make_tree(scale=3.0))
    assert state.name.value == "mine"
    with pytest.raises(TypeError):
        policy.factory(0.5, *policy.options.values(), "positional")


@ALL
@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_invalid_threshold_names_the_argument(policy: Policy, bad: float) -> None:
    with pytest.raises(ValueError, match=f"`{policy.threshold_arg}` must be non-negative"):
        policy.make(bad)


@ALL
def test_integer_leaf_is_a_type_error_naming_its_path(policy: Policy) -> None:
    tx = policy.make(0.5)
    grads = {**make_tree(), "count": jnp.zeros((2,), jnp.int32)}
    params = {**PARAMS, "count": jnp.zeros((2,), jnp.int32)}
    with pytest.raises(TypeError, match=r"leaf \['count'\] has dtype int32"):
        tx.update(grads, tx.init(params), params)


# ---------------------------------------------------------------------------------------------
# Transforms without a threshold (`monitor`): the same conventions, and the updates unchanged


def stack_w(tree: dict[str, Any]) -> dict[str, Any]:
    """Marks `w` stacked (its rows are layers), whatever else the tree holds."""
    return {k: jax.tree.map(lambda _, k=k: k == "w", v) for k, v in tree.items()}


IDENTITIES: dict[str, Callable[..., Any]] = {
    "monitor": optaxclip.monitor,
    "monitor_labels_l1": lambda **kw: optaxclip.monitor(labels, ord=1, **kw),
    "monitor_stacked": lambda **kw: optaxclip.monitor(stacked=stack_w, **kw),
    "monitor_stacked_inf": lambda **kw: optaxclip.monitor(stacked=stack_w, ord="inf", **kw),
}
IDENTITY = pytest.mark.parametrize("make", list(IDENTITIES.values()), ids=list(IDENTITIES))


def assert_unchanged(updates: Any, out: Any) -> None:
    assert jax.tree.structure(updates) == jax.tree.structure(out)
    for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(out), strict=True):
        assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()


@IDENTITY
def test_identity_changes_nothing_eager_or_jitted(make: Callable[..., Any]) -> None:
    tx = make()
    grads = make_tree(scale=3.0)
    eager, eager_state = run(tx, grads)
    jitted, jit_state = jax.jit(lambda g: run(tx, g))(grads)
    assert_unchanged(grads, eager)
    assert_unchanged(grads, jitted)
    assert not bool(jit_state.clipped) and float(jit_state.grad_norm) > 0
    assert_tree_close(eager_state.norms, jit_state.norms, rtol=1e-6)


@IDENTITY
def test_identity_no_recompile_donation_and_extra_args(make: Callable[..., Any]) -> None:
    tx = make()
    traces = []

    def update(updates: Any, state: Any) -> Any:
        traces.append(None)
        return tx.update(updates, state, PARAMS, value=jnp.ones([]), unknown_flag=True)

    step = jax.jit(update, donate_argnums=1)
    state = tx.init(PARAMS)
    for scale in (3.0, 0.1):
        out, state = step(make_tree(scale=scale), state)
    assert len(traces) == 1
    assert_unchanged(make_tree(scale=0.1), out)
    assert float(state.grad_norm) > 0


@IDENTITY
def test_identity_inject_hyperparams_multisteps_and_abstract_init(
    make: Callable[..., Any],
) -> None:
    injected = optax.inject_hyperparams(lambda: make())()
    _, state = injected.update(make_tree(scale=3.0), injected.init(PARAMS), PARAMS)
    assert "grad_norm" in optaxclip.stats(state)
    traced_ord = optax.inject_hyperparams(optaxclip.monitor)(ord=1)
    with pytest.raises(TypeError, match=r"`ord`.*static_args=\('ord',\)"):
        jax.jit(traced_ord.update)(make_tree(), traced_ord.init(PARAMS), PARAMS)

    tx = optax.MultiSteps(optax.chain(make(), optax.sgd(1.0)), every_k_schedule=2)
    state = tx.init(PARAMS)
    g1, g2 = make_tree(scale=3.0), make_tree(scale=1.0)
    for g in (g1, g2):
        _, state = jax.jit(lambda g, s: tx.update(g, s, PARAMS))(g, state)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    _, want = run(make(), mean)
    assert float(optaxclip.stats(state)["grad_norm"]) == pytest.approx(float(want.grad_norm))

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    assert jax.tree.structure(make().init(abstract)) == jax.tree.structure(make().init(PARAMS))


@IDENTITY
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_identity_keeps_dtype_and_measures_in_float32(make: Callable[..., Any], dtype: Any) -> None:
    tx = make()
    grads = make_tree(dtype, scale=3.0)
    out, state = run(tx, grads)
    assert_unchanged(grads, out)
    _, want = run(tx, jax.tree.map(lambda x: x.astype(jnp.float32), grads))
    for field in ("norms", "param_norms", "ratio"):
        for value in getattr(state, field).values():
            assert value.dtype == jnp.float32
        assert_tree_close(getattr(state, field), getattr(want, field), rtol=1e-6)
    assert state.grad_norm.dtype == jnp.float32


@IDENTITY
def test_identity_float64_under_x64(make: Callable[..., Any]) -> None:
    with jax.enable_x64(True):
        grads = make_tree(jnp.float64, scale=3.0)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), PARAMS)
        out, state = run(make(), grads, params)
        assert_unchanged(grads, out)
        assert state.grad_norm.dtype == jnp.float32
        assert all(v.dtype == jnp.float32 for v in state.norms.values())


@IDENTITY
def test_identity_empty_none_masked_and_float0_leaves(make: Callable[..., Any]) -> None:
    tx = make()
    out, state = tx.update({}, tx.init({}), {})
    assert out == {} and float(state.grad_norm) == 0
    grads = {
        **make_tree(scale=3.0),
        "frozen": None,
        "masked": optax.MaskedNode(),
        "step": np.zeros((2,), jax.dtypes.float0),
    }
    params = {**PARAMS, "frozen": None, "masked": optax.MaskedNode(), "step": jnp.zeros(2, int)}
    out, state = tx.update(grads, tx.init(params), params)
    assert out["frozen"] is None and isinstance(out["masked"], optax.MaskedNode)
    assert out["step"].dtype == jax.dtypes.float0
    _, want = run(tx, make_tree(scale=3.0))
    assert_tree_close(state.norms, want.norms, rtol=0)


@IDENTITY
def test_identity_zero_gradients_and_gradient_through_its_stats(make: Callable[..., Any]) -> None:
    tx = make()
    zeros = jax.tree.map(jnp.zeros_like, make_tree())
    _, state = jax.jit(lambda g: run(tx, g))(zeros)
    assert float(state.grad_norm) == 0
    for field in ("norms", "ratio"):
        assert all(not np.any(np.asarray(v)) for v in getattr(state, field).values())

    def loss(grads: Any) -> jax.Array:
        _, state = run(tx, grads)
        return state.grad_norm + sum(jnp.sum(v) for v in state.ratio.values())

    for grads in (zeros, make_tree(scale=3.0)):
        g = jax.jit(jax.grad(loss))(grads)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


@IDENTITY
def test_identity_counts_nonfinite_and_keeps_the_state_fields(make: Callable[..., Any]) -> None:
    tx = make(name="mine")
    grads = make_tree(scale=3.0)
    grads["w"] = grads["w"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    grads["b"] = grads["b"].at[2].set(-jnp.inf)
    out, state = jax.jit(lambda g: run(tx, g))(grads)
    assert_unchanged(grads, out)
    assert int(state.nonfinite) == 3 and math.isnan(float(state.grad_norm))
    assert state.name.value == "mine"
    assert state.clipped.dtype == jnp.bool_ and state.nonfinite.dtype == jnp.int32
    found = optaxclip.stats(optax.chain(optax.identity(), tx).init(PARAMS))
    assert {"grad_norm", "clipped", "nonfinite"} <= set(found)
    assert any(k.startswith("norms/") for k in found)
    assert float(optax.tree.get(state, "nonfinite")) == 3
    with pytest.raises(TypeError):
        optaxclip.monitor(None, "positional")


@IDENTITY
def test_identity_integer_leaf_is_a_type_error_naming_its_path(make: Callable[..., Any]) -> None:
    tx = make()
    grads = {**make_tree(), "count": jnp.zeros((2,), jnp.int32)}
    params = {**PARAMS, "count": jnp.zeros((2,), jnp.int32)}
    with pytest.raises(TypeError, match=r"leaf \['count'\] has dtype int32"):
        tx.update(grads, tx.init(params), params)
