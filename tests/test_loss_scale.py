"""`loss_scale`: torch.amp.GradScaler's rule, exact unscaling, skipped steps, composition.

The scale sequence is replayed against `torch.amp.GradScaler` itself (on CPU, through its
public `scale`/`step`/`update`), step by step, on the same overflow pattern.
"""

import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _examples import load
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip


def _bitwise_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), (x, y)


def _torch_scales(pattern: list[bool], **options: Any) -> tuple[list[float], list[int], list[Any]]:
    """GradScaler's scale and growth tracker after each step, and SGD(lr=1)'s step.

    Each step backpropagates the scaled loss p·(1, 2) and, where `pattern` says so,
    overwrites a gradient with inf, as an fp16 overflow would.
    """
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", **options)
    scales, trackers, steps = [], [], []
    for overflow in pattern:
        opt.zero_grad()
        with torch.no_grad():
            p.zero_()  # so that p after the step is the step itself, not rounded into a sum
        scaler.scale((p * torch.tensor([1.0, 2.0])).sum()).backward()
        if overflow:
            p.grad[0] = math.inf
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        trackers.append(int(scaler._growth_tracker))
        steps.append(p.detach().numpy().copy())
    return scales, trackers, steps


def _ours(pattern: list[bool], tx: Any) -> tuple[list[float], list[int], list[Any]]:
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    scales, trackers, steps = [], [], []
    for overflow in pattern:
        s = optaxclip.current_loss_scale(state)
        grads = jnp.array([1.0, 2.0]) * s
        if overflow:
            grads = grads.at[0].set(jnp.inf)
        updates, state = update(grads, state)
        scales.append(float(state.loss_scale))
        trackers.append(int(state.growth_tracker))
        steps.append(np.asarray(updates))
    return scales, trackers, steps


PATTERNS = {
    "random": [bool(b) for b in np.random.default_rng(0).random(120) < 0.25],
    "bursts": [False] * 7 + [True] * 5 + [False] * 9 + [True, False] * 4 + [False] * 12,
}
TORCH_OPTIONS = {
    "default_factors_interval_3": {"init_scale": 2.0**10, "growth_interval": 3},
    "interval_1": {"init_scale": 4.0, "growth_interval": 1},
    "factors_3_and_0.25": {
        "init_scale": 2.0**6,
        "growth_factor": 3.0,
        "backoff_factor": 0.25,
        "growth_interval": 2,
    },
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("options", list(TORCH_OPTIONS))
def test_scale_sequence_equals_torch_grad_scaler(pattern: str, options: str) -> None:
    torch_options = TORCH_OPTIONS[options]
    want_scales, want_trackers, want_steps = _torch_scales(PATTERNS[pattern], **torch_options)
    # torch bounds the scale by nothing: no floor, and growth only while it stays finite.
    tx = optaxclip.loss_scale(
        optax.sgd(1.0),
        initial_scale=torch_options["init_scale"],
        growth_factor=torch_options.get("growth_factor", 2.0),
        backoff_factor=torch_options.get("backoff_factor", 0.5),
        growth_interval=torch_options["growth_interval"],
        min_scale=2.0**-100,
        max_scale=math.inf,
    )
    scales, trackers, steps = _ours(PATTERNS[pattern], tx)
    assert scales == want_scales
    assert trackers == want_trackers
    assert len(set(scales)) > 3  # the pattern exercised both growth and backoff
    for got, want in zip(steps, want_steps, strict=True):
        # Both multiply by the float32 reciprocal of S: the same bits, powers of two or not.
        assert got.tobytes() == want.tobytes(), (got, want)


def test_growth_that_overflows_float32_keeps_the_scale_as_torch() -> None:
    # GradScaler.update's own kernel, fed "no inf found" four times from 2**126.
    scale, tracker = torch.tensor([2.0**126]), torch.tensor([0], dtype=torch.int32)
    want = []
    for _ in range(4):
        torch._amp_update_scale_(scale, tracker, torch.tensor([0.0]), 2.0, 0.5, 1)
        want.append(float(scale))
    tx = optaxclip.loss_scale(
        optax.sgd(1.0), initial_scale=2.0**126, growth_interval=1, max_scale=math.inf
    )
    state = tx.init(jnp.zeros(2))
    got = []
    for _ in range(4):
        _, state = tx.update(jnp.ones(2), state)
        got.append(float(state.loss_scale))
    assert got == want == [2.0**127] * 4


def test_min_and_max_scale_bound_the_scale() -> None:
    tx = optaxclip.loss_scale(
        optax.identity(), initial_scale=4.0, growth_interval=2, min_scale=1.0, max_scale=16.0
    )
    state = tx.init(jnp.zeros(2))
    got = []
    for overflow in [True, True, True, False, False, False, False, False, False]:
        grads = jnp.array([jnp.nan, 1.0]) if overflow else jnp.ones(2)
        _, state = tx.update(grads, state)
        got.append((float(state.loss_scale), int(state.growth_tracker)))
    assert got == [
        (2.0, 0),
        (1.0, 0),
        (1.0, 0),
        (1.0, 1),
        (2.0, 0),
        (2.0, 1),
        (4.0, 0),
        (4.0, 1),
        (8.0, 0),
    ]
    for _ in range(6):
        _, state = tx.update(jnp.ones(2), state)
    assert float(state.loss_scale) == 16.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_unscaling_is_exact(dtype: Any) -> None:
    rng = np.random.default_rng(1)
    grads = {
        "w": (rng.normal(size=(17, 5)) * 1e-3).astype(dtype),
        # fp16 subnormals survive a power-of-two round trip too
        "tiny": (rng.normal(size=(9,)) * 2.0**-20).astype(dtype),
    }
    scale = 2.0**12
    tx = optaxclip.loss_scale(optax.identity(), initial_scale=scale)
    scaled = jax.tree.map(lambda g: (g.astype(np.float32) * scale).astype(dtype), grads)
    out, state = jax.jit(tx.update)(scaled, tx.init(grads))
    _bitwise_equal(out, grads)
    assert not bool(state.skipped)
    want_norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads.values()))
    np.testing.assert_allclose(float(state.grad_norm), want_norm, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_unscaling_is_in_float32_and_casts_back(dtype: Any) -> None:
    # 2**20 + 3 is no power of two, and it is inf in float16: unscaling in float16 would
    # give zeros. The result is the float32 product with 1/S (torch's unscale_ rule),
    # rounded once to the leaf dtype.
    scale = 2.0**20 + 3
    rng = np.random.default_rng(2)
    grads = {"w": (rng.normal(size=(33,)) * 3e4).clip(-65504, 65504).astype(dtype)}
    tx = optaxclip.loss_scale(optax.identity(), initial_scale=scale)
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    inverse = np.float32(1) / np.float32(scale)
    want = (grads["w"].astype(np.float32) * inverse).astype(dtype)
    assert out["w"].dtype == dtype
    assert np.asarray(out["w"]).tobytes() == want.tobytes()
    assert np.count_nonzero(want) == want.size
    np.testing.assert_allclose(want, grads["w"].astype(np.float64) / scale, rtol=1e-3)


def test_float64_leaves_unscale_in_float64() -> None:
    with jax.enable_x64(True):
        g = jnp.array([1.0 / 3.0, 1e-200], jnp.float64)
        tx = optaxclip.loss_scale(optax.identity(), initial_scale=3.0)
        out, state = tx.update(g, tx.init(g))
        assert out.dtype == jnp.float64
        # 1e-200 / 3 is far below float32's range: only a float64 product keeps it.
        np.testing.assert_array_equal(out, np.asarray(g) * (1.0 / 3.0))
        assert state.loss_scale.dtype == jnp.float32


def _params() -> dict[str, jax.Array]:
    return {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}


def _grads(seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w": scale * jax.random.normal(k1, (3, 4)),
        "b": scale * jax.random.normal(k2, (4,)),
    }


def _inner() -> Any:
    return optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-2))


def test_overflow_zeroes_the_step_and_leaves_inner_state_bitwise_untouched() -> None:
    params = _params()
    tx = optaxclip.loss_scale(_inner(), initial_scale=2.0**10)
    step = jax.jit(tx.update)
    state = tx.init(params)
    for seed in range(2):
        _, state = step(jax.tree.map(lambda g: g * 2.0**10, _grads(seed)), state, params)
    before = state
    bad = jax.tree.map(lambda g: g * 2.0**10, _grads(2))
    bad["w"] = bad["w"].at[1, 2].set(jnp.nan)
    bad["b"] = bad["b"].at[0].set(jnp.inf)
    out, state = step(bad, state, params)
    for x in jax.tree.leaves(out):
        assert not np.any(np.asarray(x))
    _bitwise_equal(state.inner_state, before.inner_state)
    assert bool(state.skipped) and bool(state.clipped)
    assert int(state.skip_count) == 1 and int(state.nonfinite) == 2
    assert float(state.loss_scale) == 2.0**9 and int(state.growth_tracker) == 0
    assert math.isnan(float(state.grad_norm))

    # The next step resumes as if the bad one had never happened.
    out, state = step(jax.tree.map(lambda g: g * 2.0**9, _grads(3)), state, params)
    reference = _inner()
    ref_step = jax.jit(reference.update)
    ref_state = reference.init(params)
    for seed in (0, 1, 3):
        want, ref_state = ref_step(_grads(seed), ref_state, params)
    assert int(state.inner_state[1][0].count) == int(ref_state[1][0].count) == 3
    # Another compiled program: XLA may fuse Adam's arithmetic differently (1 ulp).
    for got, ref in zip(
        jax.tree.leaves((out, state.inner_state)), jax.tree.leaves((want, ref_state)), strict=True
    ):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)


def test_clip_inside_sees_the_unscaled_gradients() -> None:
    params = _params()
    g = _grads(0, scale=3.0)
    tx = optaxclip.loss_scale(optaxclip.clip_by_global_norm(1.0), initial_scale=2.0**14)
    out, state = tx.update(jax.tree.map(lambda x: x * 2.0**14, g), tx.init(params), params)
    clip = optaxclip.clip_by_global_norm(1.0)
    want, clip_state = clip.update(g, clip.init(params))
    _bitwise_equal(out, want)
    stats = optaxclip.stats(state)
    assert float(stats["loss_scale/grad_norm"]) == float(clip_state.grad_norm)
    assert float(stats["clip_by_global_norm/grad_norm"]) == float(clip_state.grad_norm)
    assert bool(stats["clip_by_global_norm/clipped"]) and not bool(stats["loss_scale/skipped"])
    assert float(stats["loss_scale/loss_scale"]) == 2.0**14


def test_around_guard_the_guard_sees_unscaled_norms_and_never_an_overflow() -> None:
    params = _params()
    tx = optaxclip.loss_scale(optaxclip.guard(optax.adam(1e-2), max_norm=10.0), name="scaler")
    state = tx.init(params)
    g = _grads(0)
    s = optaxclip.current_loss_scale(state)
    _, state = tx.update(jax.tree.map(lambda x: x * s, g), state, params)
    assert float(state.inner_state.grad_norm) == pytest.approx(float(optaxclip.global_norm(g)))
    assert not bool(state.inner_state.skipped)
    guard_before = state.inner_state
    s = optaxclip.current_loss_scale(state)
    bad = jax.tree.map(lambda x: x * s, g)
    bad["b"] = bad["b"].at[0].set(jnp.inf)
    _, state = tx.update(bad, state, params)
    _bitwise_equal(state.inner_state, guard_before)
    stats = optaxclip.stats(state)
    assert bool(stats["scaler/skipped"]) and int(stats["guard/skip_count"]) == 0


def test_outside_multisteps_each_micro_batch_is_unscaled_and_an_overflow_dropped() -> None:
    params = _params()
    inner = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0))
    tx = optaxclip.loss_scale(optax.MultiSteps(inner, every_k_schedule=2), initial_scale=2.0**8)
    step = jax.jit(tx.update)
    state = tx.init(params)
    g1, g2 = _grads(0, 3.0), _grads(1, 0.5)
    first, state = step(jax.tree.map(lambda x: x * 2.0**8, g1), state, params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(first))
    bad = jax.tree.map(lambda x: x * 2.0**8, g2)
    bad["w"] = bad["w"].at[0, 0].set(jnp.inf)
    _, state = step(bad, state, params)  # dropped: the accumulation still waits for one
    assert float(optaxclip.current_loss_scale(state)) == 2.0**7
    second, state = step(jax.tree.map(lambda x: x * 2.0**7, g2), state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    want, _ = inner.update(mean, inner.init(params), params)
    for got, ref in zip(jax.tree.leaves(second), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert int(optaxclip.stats(state)["loss_scale/skip_count"]) == 1


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
def test_inject_hyperparams_traces_every_numeric_option(param_dtype: Any) -> None:
    options = {"initial_scale": 8.0, "growth_interval": 2, "backoff_factor": 0.25}
    factory = optax.inject_hyperparams(optaxclip.loss_scale, hyperparam_dtype=jnp.float32)
    tx = factory(optax.sgd(1.0), **options)
    plain = optaxclip.loss_scale(optax.sgd(1.0), **options)
    params = jnp.zeros(3, param_dtype)
    state, ref = tx.init(params), plain.init(params)
    step = jax.jit(tx.update)
    for overflow in [False, False, True, False, True, False, False]:
        g = jnp.ones(3, param_dtype) * optaxclip.current_loss_scale(state).astype(param_dtype)
        if overflow:
            g = g.at[1].set(jnp.inf)
        got, state = step(g, state, params)
        want, ref = plain.update(g, ref, params)
        _bitwise_equal(got, want)
        assert float(optaxclip.current_loss_scale(state)) == float(ref.loss_scale)
    assert optaxclip.current_loss_scale(state).dtype == jnp.float32
    assert set(options) <= set(state.hyperparams)


def test_flax_nnx_optimizer() -> None:
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optaxclip.loss_scale(optax.sgd(0.1), initial_scale=2.0**10), wrt=nnx.Param
    )
    x = jnp.ones((4, 3))

    @nnx.jit
    def train_step(model: nnx.Linear, optimizer: nnx.Optimizer, poison: jax.Array) -> None:
        scale = optaxclip.current_loss_scale(optimizer)
        grads = nnx.grad(lambda m: jnp.mean(m(x * poison) ** 2) * scale)(model)
        optimizer.update(model, grads)

    train_step(model, optimizer, jnp.float32(1.0))
    kernel = np.asarray(model.kernel[...])
    train_step(model, optimizer, jnp.float32(jnp.inf))
    np.testing.assert_array_equal(model.kernel[...], kernel)
    stats = optaxclip.stats(optimizer)
    assert bool(stats["skipped"]) and int(stats["skip_count"]) == 1
    assert float(optaxclip.current_loss_scale(optimizer)) == 2.0**9


def test_orbax_round_trip_resumes_the_same_scale(tmp_path: Path) -> None:
    import orbax.checkpoint as ocp

    params = _params()
    tx = optaxclip.loss_scale(_inner(), initial_scale=2.0**6, growth_interval=2)
    step = jax.jit(tx.update)

    def run(state: Any, seeds: range) -> tuple[Any, list[float]]:
        scales = []
        for seed in seeds:
            s = optaxclip.current_loss_scale(state)
            g = jax.tree.map(lambda x, s=s: x * s, _grads(seed))
            if seed % 3 == 1:
                g["b"] = g["b"].at[0].set(jnp.nan)
            _, state = step(g, state, params)
            scales.append(float(state.loss_scale))
        return state, scales

    state, _ = run(tx.init(params), range(5))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", state)
        checkpointer.wait_until_finished()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(params))
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    _bitwise_equal(restored, state)
    assert isinstance(restored, optaxclip.LossScaleState)
    assert optaxclip.current_loss_scale(restored) == optaxclip.current_loss_scale(state)
    resumed, resumed_scales = run(restored, range(5, 12))
    uninterrupted, scales = run(state, range(5, 12))
    assert resumed_scales == scales and len(set(scales)) > 1
    _bitwise_equal(resumed, uninterrupted)


SHARD_SPECS = {"a": P("d"), "b": P()}


def _shard_map_step(axis_name: Any) -> Any:
    mesh = jax.make_mesh((8,), ("d",))
    tx = optaxclip.loss_scale(optax.adam(0.1), initial_scale=2.0**8, axis_name=axis_name)
    fields = ("skipped", "skip_count", "nonfinite", "loss_scale", "grad_norm", "growth_tracker")

    def step(first: Any, second: Any, p: Any) -> Any:
        state = tx.init(p)
        _, state = tx.update(first, state, p)  # so the inner state is not its init
        kept = state.inner_state
        updates, state = tx.update(second, state, p)
        # Each device's own copy of the inner state, compared bit for bit.
        same = jax.tree.map(lambda x, y: jnp.all(x == y), kept, state.inner_state)
        kept_here = jnp.all(jnp.stack(jax.tree.leaves(same))) & (lax.axis_index("d") >= 0)
        return updates, {f: getattr(state, f) for f in fields}, kept_here[None]

    specs = (SHARD_SPECS, dict.fromkeys(fields, P()), P("d"))
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(SHARD_SPECS,) * 3, out_specs=specs))
    place = lambda t: jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, SHARD_SPECS
    )
    return fn, place


def test_shard_map_nan_on_one_device_every_device_skips_and_backs_off_alike() -> None:
    fn, place = _shard_map_step("d")
    grads = {"a": np.ones((16, 3), np.float32), "b": np.ones((5,), np.float32)}
    bad = jax.tree.map(np.copy, grads)
    bad["a"][9, 1] = np.nan  # rows 8-9 live on device 4 only
    params = jax.tree.map(np.zeros_like, grads)
    updates, fields, kept = fn(place(grads), place(bad), place(params))
    for name, value in fields.items():
        values = [
            np.asarray(s.data) for s in sorted(value.addressable_shards, key=lambda s: s.device.id)
        ]
        assert all(v.tobytes() == values[0].tobytes() for v in values), name
    assert bool(fields["skipped"]) and int(fields["skip_count"]) == 1
    assert int(fields["nonfinite"]) == 1
    assert float(fields["loss_scale"]) == 2.0**7
    assert kept.shape == (8,) and bool(np.all(kept))
    for x in jax.tree.leaves(updates):
        assert not np.any(np.asarray(x))


def test_shard_map_finite_norm_counts_replicated_leaves_once() -> None:
    fn, place = _shard_map_step("d")
    grads = {"a": np.full((16, 3), 2.0**9, np.float32), "b": np.full((5,), 2.0**9, np.float32)}
    params = jax.tree.map(np.zeros_like, grads)
    _, fields, _ = fn(place(grads), place(grads), place(params))
    assert not bool(fields["skipped"]) and float(fields["loss_scale"]) == 2.0**8
    # 2**9 at S = 2**8: unscaled, every element is 2, and the replicated "b" counts once.
    assert float(fields["grad_norm"]) == pytest.approx(2.0 * math.sqrt(16 * 3 + 5), rel=1e-6)


def test_shard_map_without_axis_name_refuses_per_shard_decisions() -> None:
    fn, place = _shard_map_step(None)
    grads = {"a": np.ones((16, 3), np.float32), "b": np.ones((5,), np.float32)}
    with pytest.raises(ValueError, match=r"loss_scale: leaf \['a'\] varies over mesh axis 'd'"):
        fn(place(grads), place(grads), place(jax.tree.map(np.zeros_like, grads)))


def test_one_all_reduce_with_axis_name() -> None:
    tx = optaxclip.loss_scale(_inner(), axis_name="i")
    grads = {f"layer{i}": jax.ShapeDtypeStruct((8, 3, 2), jnp.float32) for i in range(20)}
    state = jax.eval_shape(jax.pmap(tx.init), grads)
    text = jax.pmap(lambda g, s: tx.update(g, s, g), axis_name="i").lower(grads, state).as_text()
    # The scaler's one collective; the clip inside has no axis_name and adds none.
    assert len(re.findall(r"stablehlo\.all_reduce\b", text)) == 1
    assert not re.search(r"stablehlo\.(all_gather|all_to_all|collective_permute)", text)


CONDITIONALS = re.compile(r"stablehlo\.(case|if|while)\b")


def _conditionals(fn: Any, *args: Any, platform: str) -> int:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return len(CONDITIONALS.findall(text))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_update_is_branch_free_on_accelerators(platform: str) -> None:
    tx = optaxclip.loss_scale(_inner())
    params = _params()
    assert _conditionals(tx.update, _grads(0), tx.init(params), params, platform=platform) == 0


def test_state_fields_and_stats() -> None:
    tx = optax.chain(optaxclip.loss_scale(optax.sgd(1.0)), optax.identity())
    state = tx.init(_params())
    found = optaxclip.stats(state)
    assert set(found) == {
        "grad_norm",
        "clipped",
        "nonfinite",
        "skipped",
        "skip_count",
        "loss_scale",
        "growth_tracker",
    }
    assert found["loss_scale"].dtype == jnp.float32 and float(found["loss_scale"]) == 2.0**15
    assert float(optax.tree.get(state, "loss_scale")) == 2.0**15


def test_current_loss_scale_without_a_scaler_is_a_clear_error() -> None:
    state = optax.adam(1e-3).init(_params())
    with pytest.raises(ValueError, match=r"no `loss_scale` state.*optaxclip\.loss_scale\("):
        optaxclip.current_loss_scale(state)
    two = optax.chain(
        optaxclip.loss_scale(optax.identity(), name="a"),
        optaxclip.loss_scale(optax.identity(), name="b"),
    ).init(_params())
    with pytest.raises(ValueError, match=r"2 `loss_scale` states found \('a', 'b'\)"):
        optaxclip.current_loss_scale(two)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backoff_factor": 1.0}, r"`backoff_factor` must be in \(0, 1\), got 1.0"),
        ({"backoff_factor": 0.0}, r"`backoff_factor` must be in \(0, 1\), got 0.0"),
        ({"backoff_factor": -0.5}, r"`backoff_factor` must be non-negative"),
        ({"growth_factor": 1.0}, r"`growth_factor` must be greater than 1, got 1.0"),
        ({"growth_factor": math.nan}, r"`growth_factor` must be non-negative"),
        ({"growth_interval": 0}, r"`growth_interval` must be at least 1, got 0"),
        ({"growth_interval": 2.5}, r"`growth_interval` must be an integer"),
        ({"initial_scale": 0.0}, r"`initial_scale` must be positive, got 0.0"),
        ({"min_scale": 0.0}, r"`min_scale` must be positive, got 0.0"),
        ({"max_scale": -1.0}, r"`max_scale` must be non-negative"),
        ({"initial_scale": math.inf}, r"`initial_scale` must be finite"),
        ({"min_scale": 4.0, "max_scale": 2.0}, r"`min_scale` \(4.0\) must not exceed `max_scale`"),
        ({"initial_scale": 0.5}, r"`initial_scale` \(0.5\) must lie in \[min_scale, max_scale\]"),
        ({"initial_scale": 2.0**25}, r"`initial_scale` \(33554432.0\) must lie in"),
    ],
)
def test_invalid_options_name_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"loss_scale: {message}"):
        optaxclip.loss_scale(optax.identity(), **options)


def test_non_numbers_and_positional_options_are_type_errors() -> None:
    with pytest.raises(TypeError, match="`growth_factor` must be a number"):
        optaxclip.loss_scale(optax.identity(), growth_factor=None)
    with pytest.raises(TypeError, match="`name` must be a string"):
        optaxclip.loss_scale(optax.identity(), name=3)
    with pytest.raises(TypeError):
        optaxclip.loss_scale(optax.identity(), 2.0**15)  # type: ignore[misc]


def test_example_scaled_float16_run_trains_where_the_others_fail(tmp_path: Path) -> None:
    png = tmp_path / "mixed_precision.png"
    rows = load("mixed_precision.py").main(["--smoke", "--out", str(png)])
    plain, fixed, scaled = rows["no loss scaling"], rows["fixed loss scale"], rows["loss_scale"]
    # No loss scaling: the gradients underflow to exactly 0 and the loss stalls.
    assert plain["zero_grads"] > 0.9 and not plain["nan"]
    third = plain["trace"]["loss"][len(plain["trace"]["loss"]) // 3]
    assert plain["final_loss"] > 0.6 * third
    # A fixed large scale: the first step overflows and the weights turn NaN.
    assert fixed["nan"] and fixed["first_nan_step"] == 1
    # loss_scale from the same scale: skips the overflowing steps, then trains.
    assert not scaled["nan"] and scaled["zero_grads"] < 0.01
    assert scaled["final_loss"] < plain["final_loss"] / 5
    assert scaled["final_loss"] < scaled["first_loss"] / 20
    trace = scaled["trace"]
    assert 1 <= scaled["skipped"] < 10 and bool(trace["skipped"][0])
    for t in np.flatnonzero(trace["skipped"][:-1]):
        assert trace["scale"][t + 1] == trace["scale"][t] / 2
    assert png.stat().st_size > 10_000
