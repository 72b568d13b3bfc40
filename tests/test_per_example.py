"""The contract's per-example clipping section: optax's results where they agree, and the
sensitivity bound DP rests on where they do not (NaN, inf, overflow, padding)."""

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _examples import load

import optaxclip
from optaxclip import _measure

B = 6


def per_example_tree(dtype: Any = jnp.float32, scale: float = 2.0, batch: int = B) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    return {
        "w": (scale * jax.random.normal(k1, (batch, 3, 4))).astype(dtype),
        "b": (scale * jax.random.normal(k2, (batch, 4))).astype(dtype),
        "v": (scale * jax.random.normal(k3, (batch,))).astype(dtype),
    }


def reference(
    grads: dict,
    bounds: dict[str, float],
    labels: dict[str, str],
    *,
    p: float = 2.0,
    nonfinite: str = "zero",
    mask: np.ndarray | None = None,
    reduce: str = "sum",
) -> tuple[dict, np.ndarray]:
    """Per-example clipping in float64 NumPy, one example at a time."""
    arrays = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    batch = next(iter(arrays.values())).shape[0]
    real = np.ones(batch, bool) if mask is None else np.asarray(mask)
    out = {k: np.zeros(v.shape[1:]) for k, v in arrays.items()}
    norms = np.zeros(batch)
    for b in range(batch):
        rows = {k: v[b] for k, v in arrays.items()}
        bad = any(not np.all(np.isfinite(r)) for r in rows.values())
        clean = {k: np.where(np.isfinite(r), r, 0.0) for k, r in rows.items()}
        group_norm = {}
        for group in sorted(set(labels.values())):
            flat = np.concatenate([clean[k].ravel() for k in clean if labels[k] == group])
            group_norm[group] = np.linalg.norm(flat, ord=p)
        norms[b] = np.linalg.norm(np.array(list(group_norm.values())), ord=p)
        if not real[b] or (bad and nonfinite == "skip"):
            continue
        for k, r in clean.items():
            n, bound = group_norm[labels[k]], bounds[labels[k]]
            out[k] += r * (min(1.0, bound / n) if n > 0 else 1.0)
    if reduce == "mean":
        out = {k: v / max(int(real.sum()), 1) for k, v in out.items()}
    return out, np.where(real, norms, 0.0)


def assert_close(got: dict, want: dict, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=rtol, atol=atol)


def conditionals(f: Any, *args: Any, platform: str) -> int:
    text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return sum(text.count(f"stablehlo.{op}") for op in ("case", "if", "while"))


# --- optax's two functions, on finite input ---------------------------------------------


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 3.0, 1e6, math.inf])
def test_equals_optax_per_example_global_norm_clip(max_norm: float) -> None:
    grads = per_example_tree()
    tx = optaxclip.per_example_clip(max_norm)
    out, state = jax.jit(tx.update)(grads, tx.init(None))
    want, count = optax.per_example_global_norm_clip(jax.tree.leaves(grads), max_norm)
    for got, ref in zip(jax.tree.leaves(out), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert int(state.clipped) == int(count)
    norms = jax.vmap(optax.tree.norm)(grads)
    np.testing.assert_allclose(state.grad_norm, norms, rtol=1e-6)


@pytest.mark.parametrize("uniform", [True, False])
def test_equals_optax_per_example_layer_norm_clip(uniform: bool) -> None:
    """optax's per-layer bounds are C/sqrt(K) (uniform) or C*sqrt(D_i/D): here, one group per
    leaf with a dict of those bounds. optax counts clipped examples per layer; the state
    counts examples clipped in any group, and its `group_norm` gives the per-layer counts."""
    grads = per_example_tree()
    leaves = jax.tree.leaves(grads)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
    c = 1.5
    sizes = [x[0].size for x in leaves]
    if uniform:
        bounds = {p: c / math.sqrt(len(leaves)) for p in paths}
    else:
        bounds = {p: c * math.sqrt(s / sum(sizes)) for p, s in zip(paths, sizes, strict=True)}
    labels = {k: jax.tree_util.keystr((jax.tree_util.DictKey(k),)) for k in grads}
    tx = optaxclip.per_example_clip(bounds, labels=labels)
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    want, counts = optax.per_example_layer_norm_clip(leaves, c, uniform=uniform)
    for got, ref in zip(jax.tree.leaves(out), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    for path, count in zip(paths, counts, strict=True):
        assert int(jnp.sum(state.group_norm[path] > bounds[path])) == int(count)
    clipped_any = jnp.any(jnp.stack([state.group_norm[p] > bounds[p] for p in paths]), axis=0)
    assert int(state.clipped) == int(jnp.sum(clipped_any))


def test_optax_passes_nan_examples_unclipped_and_inf_poisons_the_sum() -> None:
    """What the contract fixes: optax's `nan_to_num(min(C / norm, 1), nan=1)` lets a NaN
    example through at full size and makes an infinite one NaN (0 * inf)."""
    grads = per_example_tree(batch=3)
    grads["w"] = grads["w"].at[0, 0, 0].set(jnp.nan).at[1, 0, 0].set(jnp.inf)
    (want_w, _, _), _ = optax.per_example_global_norm_clip(
        [grads["w"], grads["b"], grads["v"]], 1.0
    )
    w = np.asarray(grads["w"], np.float64)
    m2 = min(1.0, 1.0 / np.linalg.norm([np.linalg.norm(np.asarray(g[2])) for g in grads.values()]))
    leaked = w[0] + m2 * w[2]  # example 0 at full size; example 1 scaled by 1/inf = 0
    got = np.asarray(want_w, np.float64)
    assert np.isnan(got[0, 0])  # 0 * inf
    np.testing.assert_allclose(got.ravel()[1:], leaked.ravel()[1:], rtol=1e-5)
    tx = optaxclip.per_example_clip(1.0)
    out, state = tx.update(grads, tx.init(None))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert int(state.nonfinite) == 2


# --- non-finite examples, the mask, the mean ---------------------------------------------


def poisoned(batch: int = B) -> dict:
    grads = per_example_tree(batch=batch, scale=3.0)
    grads["w"] = grads["w"].at[0, 1, 2].set(jnp.nan).at[2, 0, 0].set(-jnp.inf)
    grads["v"] = grads["v"].at[3].set(jnp.inf)
    return grads


@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_nonfinite_examples_against_numpy(nonfinite: str, reduce: str) -> None:
    grads = poisoned()
    tx = optaxclip.per_example_clip(2.0, nonfinite=nonfinite, reduce=reduce)
    out, state = jax.jit(tx.update)(grads, tx.init(None))
    labels = dict.fromkeys(grads, "all")
    want, norms = reference(grads, {"all": 2.0}, labels, nonfinite=nonfinite, reduce=reduce)
    assert_close(out, want)
    np.testing.assert_allclose(state.grad_norm, norms, rtol=1e-6)
    assert int(state.nonfinite) == 3
    skipped = np.array([b in (0, 2, 3) for b in range(B)]) if nonfinite == "skip" else 0
    assert int(state.clipped) == int(np.sum((norms > 2.0) & ~skipped))
    if nonfinite == "skip":
        np.testing.assert_array_equal(np.asarray(state.scale)[[0, 2, 3]], 0.0)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_mask_leaves_padding_out_exactly(reduce: str) -> None:
    grads = poisoned()
    grads["b"] = grads["b"].at[5].set(1e30)
    mask = jnp.array([True, True, False, True, True, False])
    tx = optaxclip.per_example_clip(1.0, reduce=reduce, batch_size=B)
    out, state = jax.jit(tx.update)(grads, tx.init(None), mask=mask)
    real = np.asarray(mask)
    subset = {k: v[real] for k, v in grads.items()}
    plain = optaxclip.per_example_clip(1.0, reduce=reduce)
    alone, _ = plain.update(subset, plain.init(None))
    assert_close(out, {k: np.asarray(v, np.float64) for k, v in alone.items()}, rtol=1e-6)
    labels = dict.fromkeys(grads, "all")
    want, norms = reference(grads, {"all": 1.0}, labels, mask=real, reduce=reduce)
    assert_close(out, want)
    np.testing.assert_allclose(state.grad_norm, norms, rtol=1e-6)
    assert np.all(np.asarray(state.scale)[~real] == 0) and np.all(state.grad_norm[~real] == 0)
    assert int(state.nonfinite) == 2  # the padding example 2 holds an inf but is not counted


def test_mean_divides_by_num_examples_and_all_padding_gives_zeros() -> None:
    grads = per_example_tree()
    tx = optaxclip.per_example_clip(1.0, reduce="mean")
    summed, _ = optaxclip.per_example_clip(1.0).update(grads, tx.init(None))
    out, _ = tx.update(grads, tx.init(None), num_examples=64.0)
    assert_close(out, {k: np.asarray(v, np.float64) / 64 for k, v in summed.items()})
    out, state = tx.update(grads, tx.init(None), mask=jnp.zeros([B], bool))
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(out))
    assert int(state.clipped) == 0


def test_groups_have_their_own_bounds() -> None:
    grads = per_example_tree(scale=3.0)
    labels = {"w": "dense", "b": "bias", "v": "bias"}
    bounds = {"dense": 2.0, "bias": 0.5}
    tx = optaxclip.per_example_clip(bounds, labels=labels, ord=1)
    out, state = tx.update(grads, tx.init(grads))
    want, norms = reference(grads, bounds, labels, p=1.0)
    assert_close(out, want, rtol=2e-6)
    np.testing.assert_allclose(state.grad_norm, norms, rtol=1e-6)
    assert set(state.group_norm) == {"dense", "bias"}
    callable_labels = optaxclip.per_example_clip(bounds, labels=lambda tree: labels, ord=1)
    again, _ = callable_labels.update(grads, callable_labels.init(grads))
    assert_close(again, want, rtol=2e-6)


@pytest.mark.parametrize("ord", [2, 1, 3, "inf"])
def test_norm_orders_against_numpy(ord: Any) -> None:
    grads = poisoned()
    p = math.inf if ord == "inf" else float(ord)
    tx = optaxclip.per_example_clip(1.0, ord=ord)
    out, state = jax.jit(tx.update)(grads, tx.init(None))
    want, norms = reference(grads, {"all": 1.0}, dict.fromkeys(grads, "all"), p=p)
    assert_close(out, want, rtol=2e-6)
    np.testing.assert_allclose(state.grad_norm, norms, rtol=2e-6)


# --- the sensitivity bound ---------------------------------------------------------------


def contributions(tx: Any, grads: dict) -> list[dict]:
    """Each example's contribution to the sum, alone (the others masked out)."""
    batch = jax.tree.leaves(grads)[0].shape[0]
    step = jax.jit(lambda g, m: tx.update(g, tx.init(None), mask=m)[0])
    return [step(grads, jnp.arange(batch) == b) for b in range(batch)]


def tree_norm(tree: dict, p: float) -> float:
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in tree.values()])
    return float(np.linalg.norm(flat, ord=p))


def extreme_examples(dtype: Any) -> dict:
    """Examples that break naive norms: overflow, NaN beside huge, inf, tiny, denormal."""
    big = 1e30 if dtype == jnp.float32 else 300.0
    w = np.ones((7, 16), np.float64)
    w[0] = big
    w[1] = big
    w[1, 3] = np.nan
    w[2] = -big
    w[2, 0] = np.inf
    w[3] = 1e-30 if dtype == jnp.float32 else 1e-4
    w[4, :2] = 3e38 if dtype == jnp.float32 else 6e4  # the example's norm overflows the dtype
    w[5] = np.nan
    w[6] = big / 7
    b = np.full((7, 3), big, np.float64)
    b[3] = 0.0
    return {"w": jnp.asarray(w, dtype), "b": jnp.asarray(b, dtype)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("ord", [None, 1, "inf", 3])
@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
def test_no_example_contributes_more_than_max_norm(dtype: Any, ord: Any, nonfinite: str) -> None:
    """The DP sensitivity: every contribution is at most C (1 + 1e-6), in float32. A float16
    output is the float32 result rounded to float16, whose relative error is 2^-11 a value."""
    grads = extreme_examples(dtype)
    p = {None: 2.0, 1: 1.0, "inf": math.inf, 3: 3.0}[ord]
    c = 0.75
    tx = optaxclip.per_example_clip(c, ord=ord, nonfinite=nonfinite)
    slack = (1 + 1e-6) * (1 + (2.0**-11 if dtype == jnp.float16 else 0.0))
    sizes = []
    for out in contributions(tx, grads):
        assert all(x.dtype == dtype and bool(jnp.all(jnp.isfinite(x))) for x in out.values())
        size = tree_norm(out, p)
        assert size <= c * slack
        sizes.append(size)
    # Huge examples are clipped to C, not lost: 0, 2 (inf zeroed) and 6 are over C.
    for b in (0, 6) if nonfinite == "skip" else (0, 1, 2, 6):
        assert sizes[b] == pytest.approx(c, rel=2e-3 if dtype == jnp.float16 else 1e-5)


def test_huge_example_state_is_finite_and_float32() -> None:
    tx = optaxclip.per_example_clip(1.0)
    grads = {"w": jnp.full((2, 8), 300.0, jnp.float16)}
    out, state = tx.update(grads, tx.init(None))
    np.testing.assert_allclose(state.grad_norm, [300 * math.sqrt(8)] * 2, rtol=1e-6)
    assert state.grad_norm.dtype == jnp.float32 and out["w"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), 2 / math.sqrt(8), rtol=1e-3)
    state_big = tx.update({"w": jnp.full((2, 8), 1e30)}, tx.init(None))[1]
    np.testing.assert_allclose(state_big.grad_norm, [1e30 * math.sqrt(8)] * 2, rtol=1e-6)


# --- dtypes, jit, gradients ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_keeps_dtype_and_computes_in_float32(dtype: Any) -> None:
    grads = per_example_tree(dtype)
    tx = optaxclip.per_example_clip(1.0)
    out, state = tx.update(grads, tx.init(None))
    for k in grads:
        assert out[k].dtype == dtype and out[k].shape == grads[k].shape[1:]
    as32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
    want, want_state = tx.update(as32, tx.init(None))
    tol = {jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2, jnp.float32: 1e-7}[dtype]
    assert_close(jax.tree.map(lambda x: x.astype(jnp.float32), out), want, rtol=tol, atol=tol)
    assert state.grad_norm.dtype == jnp.float32
    np.testing.assert_allclose(state.grad_norm, want_state.grad_norm, rtol=1e-6)


def test_float64_under_x64() -> None:
    with jax.enable_x64(True):
        grads = jax.tree.map(lambda x: x.astype(jnp.float64), per_example_tree())
        tx = optaxclip.per_example_clip(1.0)
        out, state = tx.update(grads, tx.init(None))
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(out))
        assert state.grad_norm.dtype == jnp.float32
        want, _ = reference(grads, {"all": 1.0}, dict.fromkeys(grads, "all"))
        assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_grad_through_clip_is_finite_at_zero_and_under_clipping() -> None:
    tx = optaxclip.per_example_clip(0.5)

    def loss(grads: dict) -> jax.Array:
        out, _ = tx.update(grads, tx.init(None))
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

    for grads in (jax.tree.map(jnp.zeros_like, per_example_tree()), per_example_tree()):
        for x in jax.tree.leaves(jax.jit(jax.grad(loss))(grads)):
            assert bool(jnp.all(jnp.isfinite(x)))


def test_none_masked_and_float0_leaves() -> None:
    grads = {**per_example_tree(), "frozen": None, "masked": optax.MaskedNode()}
    grads["step"] = np.zeros((B, 2), jax.dtypes.float0)
    tx = optaxclip.per_example_clip(1.0)
    out, _ = tx.update(grads, tx.init(None))
    assert out["frozen"] is None and isinstance(out["masked"], optax.MaskedNode)
    assert out["step"].dtype == jax.dtypes.float0
    want, _ = tx.update(per_example_tree(), tx.init(None))
    assert_close({k: out[k] for k in want}, {k: np.asarray(v) for k, v in want.items()}, rtol=0)
    empty, state = tx.update({}, tx.init({}), mask=jnp.ones([3], bool))
    assert empty == {} and state.grad_norm.shape == (3,)


# --- in a training loop -------------------------------------------------------------------


def loss_fn(params: dict, example: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = example
    return jnp.sum((jnp.tanh(x @ params["w"]) + params["b"] - y) ** 2)


def data(batch: int, steps: int = 1) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(2))
    return (
        3 * jax.random.normal(kx, (steps, batch, 5)),
        jax.random.normal(ky, (steps, batch, 2)),
    )


PARAMS = {"w": jnp.full((5, 2), 0.1, jnp.float32), "b": jnp.zeros(2, jnp.float32)}
per_example_grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))


def test_with_batch_size_a_scan_training_loop_compiles_once() -> None:
    tx = optax.chain(optaxclip.per_example_clip(1.0, batch_size=8), optax.adam(1e-2))
    xs, ys = data(8, steps=5)

    def body(carry: Any, example: Any) -> Any:
        params, state = carry
        updates, state = tx.update(per_example_grads(params, example), state, params)
        return (optax.apply_updates(params, updates), state), optaxclip.stats(state)["grad_norm"]

    (_, state), norms = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), (xs, ys)))(PARAMS)
    assert norms.shape == (5, 8) and bool(jnp.all(norms > 0))
    assert optaxclip.stats(state)["clipped"].dtype == jnp.int32

    traces = []

    @jax.jit
    def step(params: Any, state: Any, example: Any) -> Any:
        traces.append(None)
        return tx.update(per_example_grads(params, example), state, params)

    state = tx.init(PARAMS)
    for t in range(3):
        _, state = step(PARAMS, state, (xs[t], ys[t]))
    assert len(traces) == 1


def test_without_batch_size_the_state_takes_its_shape_at_the_first_update() -> None:
    """The documented trade-off: a Python loop works, a `scan` carry cannot change shape."""
    tx = optax.chain(optaxclip.per_example_clip(1.0), optax.adam(1e-2))
    state = tx.init(PARAMS)
    assert state[0].grad_norm.shape == (0,)
    xs, ys = data(8)
    _, state = tx.update(per_example_grads(PARAMS, (xs[0], ys[0])), state, PARAMS)
    assert state[0].grad_norm.shape == (8,)

    def body(carry: Any, example: Any) -> Any:
        _, carry = tx.update(per_example_grads(PARAMS, example), carry, PARAMS)
        return carry, None

    with pytest.raises(TypeError, match="carry"):
        jax.lax.scan(body, tx.init(PARAMS), (xs, ys))


def test_inject_hyperparams_schedule_and_stats() -> None:
    schedule = optax.linear_schedule(2.0, 0.1, transition_steps=3)
    factory = optax.inject_hyperparams(optaxclip.per_example_clip, static_args=("batch_size",))
    tx = factory(max_norm=schedule, batch_size=8)
    state = tx.init(PARAMS)
    xs, ys = data(8, steps=4)
    step = jax.jit(lambda g, s: tx.update(g, s, PARAMS))
    for t in range(4):
        grads = per_example_grads(PARAMS, (xs[t], ys[t]))
        got, state = step(grads, state)
        fixed = optaxclip.per_example_clip(float(schedule(t)))
        want, _ = fixed.update(grads, fixed.init(PARAMS))
        assert_close(got, {k: np.asarray(v) for k, v in want.items()}, rtol=2e-6, atol=1e-7)
    found = optaxclip.stats(optax.chain(optax.identity(), tx).init(PARAMS))
    assert {"grad_norm", "scale", "clipped", "nonfinite"} <= set(found)
    assert float(optax.tree.get(state, "grad_norm")[0]) > 0


def test_multisteps_after_the_clip_accumulates_micro_batches() -> None:
    """The `optax.MultiSteps` pattern: the clip outside, the optimizer inside, so the inner
    optimizer sees the mean of the micro-batches' clipped sums."""
    xs, ys = data(8)
    grads = per_example_grads(PARAMS, (xs[0], ys[0]))
    tx = optax.chain(
        optaxclip.per_example_clip(1.0, batch_size=4), optax.MultiSteps(optax.sgd(1.0), 2)
    )
    state = tx.init(PARAMS)
    first, state = tx.update(jax.tree.map(lambda g: g[:4], grads), state, PARAMS)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(first))
    second, state = tx.update(jax.tree.map(lambda g: g[4:], grads), state, PARAMS)
    whole = optaxclip.per_example_clip(1.0)
    want, _ = whole.update(grads, whole.init(PARAMS))
    assert_close(second, {k: -np.asarray(v) / 2 for k, v in want.items()}, rtol=1e-6)


# --- micro-batching -----------------------------------------------------------------------


@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_microbatched_clip_equals_one_batch(num_microbatches: int, reduce: str) -> None:
    xs, ys = data(8)
    batch = (xs[0].at[3, 0].set(jnp.nan), ys[0])
    mask = jnp.arange(8) != 6
    labels = {"w": "w", "b": "b"}
    clip = optaxclip.per_example_clip(
        {"w": 1.0, "b": 0.3}, labels=labels, reduce=reduce, batch_size=8
    )
    step = jax.jit(
        lambda p, s: optaxclip.microbatched_clip(
            clip, per_example_grads, p, batch, s, num_microbatches=num_microbatches, mask=mask
        )
    )
    got, state = step(PARAMS, clip.init(PARAMS))
    want, want_state = clip.update(
        per_example_grads(PARAMS, batch), clip.init(PARAMS), PARAMS, mask=mask
    )
    assert_close(got, {k: np.asarray(v) for k, v in want.items()}, rtol=1e-6)
    for field in ("grad_norm", "scale", "clipped", "nonfinite"):
        np.testing.assert_allclose(getattr(state, field), getattr(want_state, field), rtol=1e-6)
    for label in labels.values():
        np.testing.assert_allclose(state.group_norm[label], want_state.group_norm[label], rtol=1e-6)
    assert int(state.nonfinite) == 1 and state.grad_norm.shape == (8,)


def test_microbatched_clip_bounds_the_temporaries() -> None:
    """Eight micro-batches hold an eighth of the per-example gradients at a time."""
    k = jax.random.split(jax.random.key(3), 2)
    params = {"w": jax.random.normal(k[0], (64, 256)), "b": jnp.zeros(256)}
    batch = (jax.random.normal(k[1], (256, 64)), jnp.zeros((256, 256)))
    clip = optaxclip.per_example_clip(1.0, batch_size=256)

    def temp_bytes(m: int) -> int:
        f = jax.jit(
            lambda p, s: optaxclip.microbatched_clip(
                clip, per_example_grads, p, batch, s, num_microbatches=m
            )
        )
        memory = f.lower(params, clip.init(params)).compile().memory_analysis()
        return int(memory.temp_size_in_bytes)

    per_example_bytes = 256 * (64 * 256 + 256) * 4
    assert temp_bytes(1) >= per_example_bytes
    assert temp_bytes(8) < temp_bytes(1) / 4


# --- branch-free, and the errors ----------------------------------------------------------


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
    "options",
    [{}, {"nonfinite": "skip", "reduce": "mean"}, {"ord": 1}, {"ord": "inf"}],
    ids=["default", "skip-mean", "l1", "inf"],
)
def test_update_has_no_conditional_on_accelerators(platform: str, options: dict) -> None:
    grads = per_example_tree()
    tx = optaxclip.per_example_clip(1.0, labels={"w": "a", "b": "a", "v": "c"}, **options)
    state = tx.init(grads)
    found = conditionals(
        lambda g, s: tx.update(g, s, mask=jnp.ones([B], bool)), grads, state, platform=platform
    )
    # The L2 norms come from the shared measure step; the rest adds no conditional.
    axes = [tuple(range(1, x.ndim)) for x in jax.tree.leaves(grads)]
    measured = 0
    if options.get("ord") is None:
        measured = conditionals(
            lambda a: _measure.unit_norms(a, axes, np.float32, False).norms,
            jax.tree.leaves(grads),
            platform=platform,
        )
    assert found == measured
    if measured:
        pytest.xfail(f"_measure.unit_norms holds {measured} conditional(s) on {platform}")
    assert found == 0


def test_errors_name_the_leaf_and_say_what_to_do() -> None:
    tx = optaxclip.per_example_clip(1.0)
    state = tx.init(None)
    with pytest.raises(ValueError, match=r"leaf \['s'\] is a scalar, but every leaf needs a "):
        tx.update({"w": jnp.ones((3, 2)), "s": jnp.ones(())}, state)
    with pytest.raises(ValueError, match=r"leaf \['w'\] has batch size 3 .* leaf \['b'\] has 4"):
        tx.update({"b": jnp.ones((4, 2)), "w": jnp.ones((3, 2))}, state)
    grads = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"`mask` must be a bool array of shape \(3,\).*int32"):
        tx.update(grads, state, mask=jnp.ones([3], jnp.int32))
    with pytest.raises(ValueError, match=r"shape \(3,\).*got shape \(4,\)"):
        tx.update(grads, state, mask=jnp.ones([4], bool))
    with pytest.raises(TypeError, match=r"leaf \['n'\] has dtype int32"):
        tx.update({"n": jnp.ones((3, 2), jnp.int32)}, state)
    sized = optaxclip.per_example_clip(1.0, batch_size=4)
    with pytest.raises(ValueError, match=r"holds norms for 4 examples .* have 3"):
        sized.update(grads, sized.init(None))


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="`max_norm` must be non-negative"):
        optaxclip.per_example_clip(-1.0)
    with pytest.raises(ValueError, match=r"`max_norm\['a'\]` must be non-negative"):
        optaxclip.per_example_clip({"a": math.nan}, labels="a")
    with pytest.raises(ValueError, match=r"dict `max_norm` .* needs `labels`"):
        optaxclip.per_example_clip({"a": 1.0})
    with pytest.raises(ValueError, match="no bound for group"):
        optaxclip.per_example_clip({"a": 1.0}, labels={"w": "a", "b": "z"}).init(
            {"w": jnp.ones(2), "b": jnp.ones(2)}
        )
    with pytest.raises(ValueError, match="'propagate' would let a non-finite example"):
        optaxclip.per_example_clip(1.0, nonfinite="propagate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`reduce` must be one of"):
        optaxclip.per_example_clip(1.0, reduce="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`ord` must be"):
        optaxclip.per_example_clip(1.0, ord=0.5)
    with pytest.raises(TypeError, match="`batch_size` fixes a shape"):
        optaxclip.per_example_clip(1.0, batch_size=jnp.int32(4))
    with pytest.raises(TypeError):
        optaxclip.per_example_clip(1.0, None)  # type: ignore[misc]


def test_microbatched_clip_errors() -> None:
    clip = optaxclip.per_example_clip(1.0)
    xs, ys = data(6)
    with pytest.raises(ValueError, match="num_microbatches=4 does not divide the batch of 6"):
        optaxclip.microbatched_clip(
            clip, per_example_grads, PARAMS, (xs[0], ys[0]), clip.init(PARAMS), num_microbatches=4
        )
    with pytest.raises(TypeError, match="must be the state of a `per_example_clip`"):
        optaxclip.microbatched_clip(
            clip, per_example_grads, PARAMS, (xs[0], ys[0]), (), num_microbatches=2
        )


def test_dp_sgd_example_reports_a_finite_epsilon_and_learns(tmp_path: Path) -> None:
    png = tmp_path / "dp_sgd.png"
    result = load("dp_sgd.py").main(["--smoke", "--out", str(png)])
    rows = result["rows"]
    assert rows["non-private"]["epsilon"] is None
    private = [r for name, r in rows.items() if name != "non-private"]
    assert private
    for row in private:
        assert math.isfinite(row["epsilon"]) and row["epsilon"] > 0
        assert row["accuracy"] > 0.3  # chance is 0.1
        assert all(math.isfinite(e) for e in row["epsilon_per_epoch"])
        assert row["epsilon_per_epoch"] == sorted(row["epsilon_per_epoch"])
    assert rows["non-private"]["accuracy"] > 0.8
    assert png.stat().st_size > 10_000
