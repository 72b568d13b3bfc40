"""Every numeric row of docs/migrating.md, against the real PyTorch and Keras 3 (JAX backend).

Keras is imported lazily, by the `keras` fixture, after `KERAS_BACKEND=jax` is set: no other test
module imports it, and none is affected by the variable.
"""

import math
import os
import pathlib
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

import optaxclip

GUIDE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
SHAPES = [(4, 5), (7,), (), (2, 1, 3)]
TORCH_EPS = 1e-6


@pytest.fixture(scope="module")
def keras(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if "keras" in sys.modules:
        import keras

        assert keras.backend.backend() == "jax", "keras was imported before with another backend"
        return keras
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
    import keras

    assert keras.backend.backend() == "jax"
    return keras


def guide_blocks() -> dict[str, str]:
    """The guide's python blocks, each by the name in the `<!-- migrating: NAME -->` before it."""
    text = GUIDE.read_text()
    blocks = dict(re.findall(r"<!-- migrating: ([\w-]+) -->\n```python\n(.*?)```", text, re.S))
    assert len(blocks) == text.count("<!-- migrating:")
    return blocks


# The guide's code and Keras's layers broadcast a bias the way users write it: `x @ w + b`.
LOOSE_RANKS = jax.numpy_rank_promotion("allow")


def run_blocks(*names: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    blocks = guide_blocks()
    with LOOSE_RANKS:
        for name in names:
            exec(compile(blocks[name], f"{GUIDE}:{name}", "exec"), namespace)
    return namespace


def random_grads(seed: int = 0, scale: float = 4.0, dtype: Any = np.float64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(scale * rng.normal(size=s), dtype) for s in SHAPES]


def torch_params(grads: list[np.ndarray]) -> list[torch.Tensor]:
    params = []
    for g in grads:
        grad = torch.from_numpy(np.array(g))
        p = torch.zeros(grad.shape, dtype=grad.dtype, requires_grad=True)
        p.grad = grad.clone()
        params.append(p)
    return params


def torch_clip(grads: list[np.ndarray], max_norm: float, **options: Any) -> tuple[Any, list]:
    params = torch_params(grads)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, **options)
    return total, [p.grad.numpy() for p in params]


def tree(grads: list[np.ndarray]) -> dict[str, jax.Array]:
    return {f"g{i}": jnp.asarray(g) for i, g in enumerate(grads)}


def leaves(t: dict[str, jax.Array]) -> list[np.ndarray]:
    return [np.asarray(t[f"g{i}"]) for i in range(len(t))]


def clip(tx: Any, grads: list[np.ndarray]) -> tuple[list[np.ndarray], Any]:
    updates, state = jax.jit(tx.update)(tree(grads), tx.init(tree(grads)))
    return leaves(updates), state


def total_norm(arrays: list[np.ndarray], p: float) -> float:
    flat = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)
    return float(np.linalg.norm(flat, ord=p))


def test_every_row_of_the_guide_names_a_test_here() -> None:
    lines = GUIDE.read_text().splitlines()
    rows = [r for r in lines if r.startswith("| ") and not r.endswith("| test |")]
    assert len(rows) == 22
    for row in rows:
        names = re.findall(r"`(test_\w+)`", row.rsplit("|", 2)[1])
        assert names, f"a row without its test: {row[:60]}"
        for name in names:
            assert callable(globals().get(name)), (
                f"{name}, named by the guide, is not in {__file__}"
            )


# PyTorch


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf, "inf"])
@pytest.mark.parametrize("regime", ["clipped", "unclipped", "just_below"])
def test_clip_grad_norm_(norm_type: Any, regime: str) -> None:
    """`clip_by_global_norm(eps=1e-6)` is `clip_grad_norm_`, at float64, for every `norm_type`."""
    p = float(norm_type)
    with jax.enable_x64(True):
        grads = random_grads()
        norm = total_norm(grads, p)
        max_norm = {"clipped": 0.3 * norm, "unclipped": 3.0 * norm, "just_below": norm + 5e-7}
        bound = max_norm[regime]
        total, expected = torch_clip(grads, bound, norm_type=norm_type)
        got, state = clip(optaxclip.clip_by_global_norm(bound, ord=norm_type, eps=TORCH_EPS), grads)
        default, _ = clip(optaxclip.clip_by_global_norm(bound, ord=norm_type), grads)

    for g, e, x, d in zip(grads, expected, got, default, strict=True):
        assert x.dtype == np.float64
        np.testing.assert_allclose(x, e, rtol=1e-13, atol=0)
        if regime == "unclipped":
            np.testing.assert_array_equal(e, g)
        else:
            # The documented difference of the default eps=0: max_norm / norm.
            np.testing.assert_allclose(d, e * (norm + TORCH_EPS) / max(norm, bound), rtol=1e-13)
    # A norm less than eps below max_norm is still scaled, by PyTorch and by eps=1e-6.
    assert bool(state.clipped) == (regime != "unclipped")
    assert total.dtype == torch.float64
    np.testing.assert_allclose(float(state.grad_norm), total.item(), rtol=1e-7)
    post = total_norm(got, p)
    np.testing.assert_allclose(post, float(state.grad_norm) * float(state.scale), rtol=1e-6)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grad_norm_foreach(foreach: bool | None) -> None:
    """`foreach` picks PyTorch's kernels, not the numbers."""
    grads = random_grads(dtype=np.float32)
    max_norm = 0.3 * total_norm(grads, 2.0)
    total, expected = torch_clip(grads, max_norm, foreach=foreach)
    got, state = clip(optaxclip.clip_by_global_norm(max_norm, eps=TORCH_EPS), grads)
    for x, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(x, e, rtol=1e-6, atol=0)
    np.testing.assert_allclose(float(state.grad_norm), total.item(), rtol=1e-6)


def test_norm_type_below_one() -> None:
    grads = [np.array([3.0, 4.0])]
    total, _ = torch_clip(grads, 1.0, norm_type=0.5)
    assert math.isfinite(total.item())
    for ord in (0.5, 0, -math.inf):
        with pytest.raises(ValueError, match="`ord` must be None, a real p >= 1"):
            optaxclip.clip_by_global_norm(1.0, ord=ord, eps=TORCH_EPS)


def test_float16_norm() -> None:
    """PyTorch returns the norm in the gradients' dtype: float16 overflows above 65504."""
    grads = [np.array([50000.0, 50000.0, 1.0], np.float16)]
    total, expected = torch_clip(grads, 1.0)
    assert total.dtype == torch.float16 and math.isinf(total.item())
    np.testing.assert_array_equal(expected[0], np.zeros(3, np.float16))

    got, state = clip(optaxclip.clip_by_global_norm(1.0, eps=TORCH_EPS), grads)
    exact = total_norm(grads, 2.0)
    assert state.grad_norm.dtype == jnp.float32
    np.testing.assert_allclose(float(state.grad_norm), exact, rtol=1e-6)
    assert got[0].dtype == np.float16
    np.testing.assert_allclose(got[0], grads[0].astype(np.float64) / exact, rtol=1e-3, atol=1e-7)


def test_overflowing_norm() -> None:
    """Float32 gradients of 1e30: PyTorch's norm is inf and it zeroes them; optaxclip clips."""
    grads = [np.array([1e30, 1e30], np.float32)]
    total, expected = torch_clip(grads, 1.0)
    assert math.isinf(total.item())
    np.testing.assert_array_equal(expected[0], np.zeros(2, np.float32))
    got, state = clip(optaxclip.clip_by_global_norm(1.0, eps=TORCH_EPS), grads)
    np.testing.assert_allclose(float(state.grad_norm), math.sqrt(2) * 1e30, rtol=1e-6)
    np.testing.assert_allclose(got[0], np.full(2, 1 / math.sqrt(2)), rtol=1e-6)


def _with_nonfinite(grads: list[np.ndarray], value: float) -> list[np.ndarray]:
    out = [g.copy() for g in grads]
    out[0][1, 2] = value
    return out


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_gradients(bad: float) -> None:
    grads = _with_nonfinite(random_grads(dtype=np.float32), bad)
    finite_rest = [np.where(np.isfinite(g), g, 0) for g in grads]
    max_norm = 0.3 * total_norm(finite_rest, 2.0)
    _, expected = torch_clip(grads, max_norm)
    if math.isnan(bad):
        # PyTorch: a NaN norm makes every gradient NaN.
        assert all(np.all(np.isnan(e)) for e in expected)
    else:
        # An inf norm: the finite gradients become 0, the inf ones NaN.
        for g, e in zip(grads, expected, strict=True):
            np.testing.assert_array_equal(np.isnan(e), ~np.isfinite(g))
            np.testing.assert_array_equal(e[np.isfinite(g)], 0)

    propagate, state = clip(optaxclip.clip_by_global_norm(max_norm, eps=TORCH_EPS), grads)
    for g, x in zip(grads, propagate, strict=True):
        np.testing.assert_array_equal(x, g)
    assert int(state.nonfinite) == 1 and float(state.scale) == 1

    # "zero" is PyTorch on the gradients with the non-finite element zeroed.
    _, on_rest = torch_clip(finite_rest, max_norm)
    zero, _ = clip(optaxclip.clip_by_global_norm(max_norm, eps=TORCH_EPS, nonfinite="zero"), grads)
    for x, e in zip(zero, on_rest, strict=True):
        np.testing.assert_allclose(x, e, rtol=1e-6)

    skip, state = clip(
        optaxclip.clip_by_global_norm(max_norm, eps=TORCH_EPS, nonfinite="skip"), grads
    )
    assert all(np.all(x == 0) for x in skip) and float(state.scale) == 0


@pytest.mark.parametrize("case", ["finite", "nan", "inf", "overflow"])
def test_error_if_nonfinite(case: str) -> None:
    """PyTorch raises where `guard` skips, but for a norm that overflows the gradients' dtype."""
    grads = random_grads(dtype=np.float32)
    if case in ("nan", "inf"):
        grads = _with_nonfinite(grads, math.nan if case == "nan" else math.inf)
    elif case == "overflow":
        grads[0] = np.full_like(grads[0], 1e30)
    try:
        torch_clip(grads, 1.0, error_if_nonfinite=True)
        raised = False
    except RuntimeError as err:
        assert "non-finite" in str(err)
        raised = True

    inner = optax.chain(optaxclip.clip_by_global_norm(1.0, eps=TORCH_EPS), optax.adam(1e-3))
    tx = optaxclip.guard(inner)
    params = tree([np.zeros_like(g) for g in grads])
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(tree(grads), state, params)
    found = optaxclip.stats(new_state)
    skipped = bool(found["guard/skipped"])
    assert raised == (case != "finite")
    assert skipped == (case in ("nan", "inf"))
    if skipped:
        assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
        adam, before = new_state.inner_state[1], state.inner_state[1]
        for a, b in zip(jax.tree.leaves(adam), jax.tree.leaves(before), strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        assert math.isfinite(float(found["clip_by_global_norm/grad_norm"]))


@pytest.mark.parametrize("case", ["finite", "nonfinite"])
def test_clip_grad_value_(case: str) -> None:
    with jax.enable_x64(True):
        grads = random_grads()
        if case == "nonfinite":
            grads[0][0, :3] = [math.nan, math.inf, -math.inf]
        params = torch_params(grads)
        assert torch.nn.utils.clip_grad_value_(params, 2.5) is None
        got, state = clip(optaxclip.clip_by_value(2.5), grads)
    for x, p in zip(got, params, strict=True):
        np.testing.assert_array_equal(x, p.grad.numpy())
    if case == "finite":
        largest = max(float(np.max(np.abs(g), initial=0)) for g in grads)
        np.testing.assert_allclose(float(state.grad_norm), largest, rtol=1e-7)
        np.testing.assert_allclose(float(state.scale), 2.5 / largest, rtol=1e-6)
    else:
        assert float(state.scale) == 1 and int(state.nonfinite) == 3


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_get_total_norm_and_clip_grads_with_norm_(norm_type: float) -> None:
    with jax.enable_x64(True):
        grads = random_grads(seed=3)
        params = torch_params(grads)
        total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        mine = optaxclip.global_norm(tree(grads), ord=norm_type)
        max_norm = 0.4 * total.item()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        got, _ = clip(optaxclip.clip_by_global_norm(max_norm, ord=norm_type, eps=TORCH_EPS), grads)
    np.testing.assert_allclose(float(mine), total.item(), rtol=1e-7)
    for x, p in zip(got, params, strict=True):
        np.testing.assert_allclose(x, p.grad.numpy(), rtol=1e-13)
    assert torch.nn.utils.get_total_norm([]).item() == 0 == float(optaxclip.global_norm({}))


def test_sharded_gradients() -> None:
    """What FSDP's clip_grad_norm_ all-reduces: the norm of the whole, sharded leaves included."""
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(5)
    grads = {
        "w": rng.normal(size=(16, 3)).astype(np.float32),
        "b": rng.normal(size=(8,)).astype(np.float32),
        "s": rng.normal(size=(3,)).astype(np.float32),
    }
    keys = sorted(grads)
    max_norm = 0.3 * total_norm(list(grads.values()), 2.0)
    total, expected = torch_clip([grads[k] for k in keys], max_norm)
    specs = {"w": PartitionSpec("data"), "b": PartitionSpec("data"), "s": PartitionSpec()}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in grads.items()}
    tx = optaxclip.clip_by_global_norm(max_norm, eps=TORCH_EPS)
    out, state = jax.jit(tx.update)(sharded, tx.init(sharded))
    for k, e in zip(keys, expected, strict=True):
        assert out[k].sharding.is_equivalent_to(sharded[k].sharding, out[k].ndim)
        np.testing.assert_allclose(np.asarray(out[k]), e, rtol=1e-6)
    np.testing.assert_allclose(float(state.grad_norm), total.item(), rtol=1e-6)

    def per_device(g: dict[str, jax.Array]) -> dict[str, jax.Array]:
        tx = optaxclip.clip_by_global_norm(max_norm, eps=TORCH_EPS, axis_name="data")
        return tx.update(g, tx.init(g))[0]

    mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(specs,), out_specs=specs))
    for k, e in zip(keys, expected, strict=True):
        np.testing.assert_allclose(np.asarray(mapped(sharded)[k]), e, rtol=1e-6)


def backed_off_and_grew(scales: list[float]) -> bool:
    changes = np.diff(scales)
    return bool(np.any(changes < 0) and np.any(changes > 0))


def test_grad_scaler() -> None:
    """`loss_scale` around the clip is `torch.amp.GradScaler` with `unscale_` before the clip."""
    rng = np.random.default_rng(7)
    steps = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(7)]
    steps[2][0, 1] = np.inf
    steps[5][1, 0] = np.nan
    w0 = rng.normal(size=(2, 3)).astype(np.float32)
    options = {"growth_interval": 2}

    weight = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, **options)
    torch_weights, torch_scales = [], []
    for g in steps:
        optimizer.zero_grad()
        scaler.scale((weight * torch.from_numpy(g)).sum()).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([weight], 1.0)
        scaler.step(optimizer)
        scaler.update()
        torch_weights.append(weight.detach().numpy().copy())
        torch_scales.append(scaler.get_scale())

    inner = optax.chain(optaxclip.clip_by_global_norm(1.0, eps=TORCH_EPS), optax.sgd(0.1))
    tx = optaxclip.loss_scale(inner, initial_scale=2.0**16, **options)
    params = jnp.asarray(w0)
    state = tx.init(params)

    @jax.jit
    def step(params: jax.Array, state: Any, g: jax.Array) -> tuple[jax.Array, Any]:
        scale = optaxclip.current_loss_scale(state)
        grads = jax.grad(lambda p: jnp.sum(p * g) * scale)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for g, want_w, want_scale in zip(steps, torch_weights, torch_scales, strict=True):
        params, state = step(params, state, jnp.asarray(g))
        assert float(optaxclip.current_loss_scale(state)) == want_scale
        np.testing.assert_allclose(np.asarray(params), want_w, rtol=1e-6, atol=1e-7)
    assert backed_off_and_grew([2.0**16, *torch_scales])


def test_guide_torch_loop_and_port() -> None:
    torch_side = run_blocks("data", "torch-loop")
    port = run_blocks("data", "torch-port")
    model, params = torch_side["model"], port["params"]
    np.testing.assert_allclose(np.asarray(params["w"]), model.weight.detach().numpy().T, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(params["b"]), model.bias.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(port["norms"], torch_side["norms"], rtol=1e-5)
    assert max(torch_side["norms"]) > 0.5  # the clip was active


def test_guide_grad_scaler_port() -> None:
    """The scaled port takes the unscaled port's steps: the scale is a power of two."""
    unscaled = run_blocks("data", "torch-port")
    ns = run_blocks("data", "torch-port", "grad-scaler-port")
    params = {"w": jnp.asarray(ns["w0"]), "b": jnp.asarray(ns["b0"])}
    opt_state = ns["opt_state"]
    with LOOSE_RANKS:
        for x, y in ns["batches"]:
            params, opt_state = ns["train_step"](params, opt_state, x, y)
    assert float(optaxclip.current_loss_scale(opt_state)) == 2.0**16
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(unscaled["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


# Keras 3


def keras_run(keras: Any, steps: list[list[np.ndarray]], optimizer: Any) -> list[list[np.ndarray]]:
    """The variables after each `optimizer.apply` of `steps`, starting from `start(steps)`."""
    variables = [keras.Variable(v) for v in start(steps)]
    out = []
    for grads in steps:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        out.append([np.asarray(v.value) for v in variables])
    return out


def optax_run(tx: Any, steps: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    params = [jnp.asarray(v) for v in start(steps)]
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for grads in steps:
        updates, state = update([jnp.asarray(g) for g in grads], state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.asarray(p) for p in params])
    return out


def start(steps: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [np.linspace(-1, 1, g.size, dtype=np.float32).reshape(g.shape) for g in steps[0]]


def keras_steps(count: int = 3, seed: int = 1) -> list[list[np.ndarray]]:
    """Gradients of two variables at different scales: one clipped by 1.0, one not."""
    rng = np.random.default_rng(seed)
    return [
        [
            (3.0 * rng.normal(size=(3, 4))).astype(np.float32),
            (0.1 * rng.normal(size=(4,))).astype(np.float32),
        ]
        for _ in range(count)
    ]


def assert_runs_close(a: list, b: list, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    for step_a, step_b in zip(a, b, strict=True):
        for x, y in zip(step_a, step_b, strict=True):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


LR = 0.1


def sgd_with(*clips: Any) -> Any:
    return optax.chain(*clips, optax.sgd(LR))


def test_keras_clipnorm(keras: Any) -> None:
    steps = keras_steps()
    want = keras_run(keras, steps, keras.optimizers.SGD(LR, clipnorm=1.0))
    assert_runs_close(optax_run(sgd_with(optaxclip.clip_by_leaf_norm(1.0)), steps), want)
    # Per variable: the global clip is a different transform.
    other = optax_run(sgd_with(optaxclip.clip_by_global_norm(1.0)), steps)
    assert not np.allclose(other[0][1], want[0][1], rtol=1e-3)


def test_keras_global_clipnorm(keras: Any) -> None:
    steps = keras_steps()
    want = keras_run(keras, steps, keras.optimizers.SGD(LR, global_clipnorm=1.0))
    assert_runs_close(optax_run(sgd_with(optaxclip.clip_by_global_norm(1.0)), steps), want)


def test_keras_clipvalue(keras: Any) -> None:
    steps = keras_steps()
    steps[1][0][0, :3] = [np.nan, np.inf, -np.inf]
    want = keras_run(keras, steps, keras.optimizers.SGD(LR, clipvalue=0.5))
    got = optax_run(sgd_with(optaxclip.clip_by_value(0.5)), steps)
    for step_a, step_b in zip(got, want, strict=True):
        for x, y in zip(step_a, step_b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("option", ["clipnorm", "global_clipnorm", "clipvalue"])
def test_keras_zero_means_off(keras: Any, option: str) -> None:
    steps = keras_steps(count=1)
    want = keras_run(keras, steps, keras.optimizers.SGD(LR, **{option: 0.0}))
    assert_runs_close(optax_run(sgd_with(), steps), want)
    zero = {
        "clipnorm": optaxclip.clip_by_leaf_norm(0.0),
        "global_clipnorm": optaxclip.clip_by_global_norm(0.0),
        "clipvalue": optaxclip.clip_by_value(0.0),
    }[option]
    assert_runs_close(optax_run(sgd_with(zero), steps), [start(steps)], rtol=0, atol=0)
    off = optaxclip.clip_by_global_norm(float("inf"))
    assert_runs_close(optax_run(sgd_with(off), steps), want)


def test_keras_one_clip_only(keras: Any) -> None:
    with pytest.raises(
        ValueError, match="Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"
    ):
        keras.optimizers.SGD(LR, clipvalue=0.5, global_clipnorm=1.0)
    steps = keras_steps(count=1)
    both = optax_run(
        sgd_with(optaxclip.clip_by_value(0.5), optaxclip.clip_by_global_norm(1.0)), steps
    )
    value_then_norm = [[np.clip(g, -0.5, 0.5) for g in steps[0]]]
    then = keras_run(keras, value_then_norm, keras.optimizers.SGD(LR, global_clipnorm=1.0))
    assert_runs_close(both, then)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_keras_nonfinite(keras: Any, bad: float) -> None:
    steps = keras_steps(count=1)
    steps[0][0][1, 1] = bad
    is_bad = ~np.isfinite(steps[0][0])
    plain = optax_run(sgd_with(), steps)[0]

    # global_clipnorm: every update NaN.
    glob = keras_run(keras, steps, keras.optimizers.SGD(LR, global_clipnorm=1.0))[0]
    assert all(np.all(np.isnan(v)) for v in glob)
    # clipnorm: that variable's update NaN (NaN), or 0 with NaN at the inf (inf); others clipped.
    per = keras_run(keras, steps, keras.optimizers.SGD(LR, clipnorm=1.0))[0]
    if np.isnan(bad):
        assert np.all(np.isnan(per[0]))
    else:
        np.testing.assert_array_equal(np.isnan(per[0]), is_bad)
        np.testing.assert_array_equal(per[0][~is_bad], start(steps)[0][~is_bad])
    leaf = optax_run(sgd_with(optaxclip.clip_by_leaf_norm(1.0)), steps)[0]
    np.testing.assert_allclose(per[1], leaf[1], rtol=1e-6)

    # optaxclip's "propagate": the updates as they are, non-finite only where they were.
    for clip_tx in (optaxclip.clip_by_global_norm(1.0), optaxclip.clip_by_leaf_norm(1.0)):
        got = optax_run(sgd_with(clip_tx), steps)[0]
        np.testing.assert_array_equal(~np.isfinite(got[0]), is_bad)
        np.testing.assert_array_equal(got[0][~is_bad], plain[0][~is_bad])
    skipped = optax_run(sgd_with(optaxclip.clip_by_global_norm(1.0, nonfinite="skip")), steps)
    assert_runs_close(skipped, [start(steps)], rtol=0, atol=0)


def test_keras_overflow(keras: Any) -> None:
    """A float32 sum of squares that overflows: Keras's clips give zeros or NaN."""
    steps = [[np.full((2,), 1e20, np.float32), np.full((2,), 0.1, np.float32)]]
    per = keras_run(keras, steps, keras.optimizers.SGD(LR, clipnorm=1.0))[0]
    np.testing.assert_array_equal(per[0], start(steps)[0])  # a zero update
    glob = keras_run(keras, steps, keras.optimizers.SGD(LR, global_clipnorm=1.0))[0]
    assert all(np.all(np.isnan(v)) for v in glob)
    want = start(steps)[0] - LR / math.sqrt(2)
    for clip_tx in (optaxclip.clip_by_leaf_norm(1.0), optaxclip.clip_by_global_norm(1.0)):
        got = optax_run(sgd_with(clip_tx), steps)[0]
        np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_keras_loss_scale_factor(keras: Any) -> None:
    s = 128.0
    steps = [[g * np.float32(s) for g in grads] for grads in keras_steps()]
    want = keras_run(keras, steps, keras.optimizers.SGD(LR, clipnorm=1.0, loss_scale_factor=s))
    got = optax_run(sgd_with(optax.scale(1 / s), optaxclip.clip_by_leaf_norm(1.0)), steps)
    assert_runs_close(got, want)


def test_keras_loss_scale_optimizer(keras: Any) -> None:
    steps = keras_steps(count=7, seed=4)
    steps[2][0][0, 0] = np.inf
    steps[5][1][2] = np.nan
    options = {"initial_scale": 2.0**15}
    inner = keras.optimizers.SGD(LR, global_clipnorm=1.0)
    optimizer = keras.optimizers.LossScaleOptimizer(inner, dynamic_growth_steps=2, **options)
    variables = [keras.Variable(v) for v in start(steps)]
    optimizer.build(variables)
    # As Keras's JAX trainer does it: `stateless_apply` on the variables' values.
    index = next(i for i, v in enumerate(optimizer.variables) if v is optimizer.dynamic_scale)
    trainable = [v.value for v in variables]
    optimizer_values = [v.value for v in optimizer.variables]
    keras_weights, keras_scales = [], []
    for grads in steps:
        scale = np.float32(optimizer_values[index])
        trainable, optimizer_values = optimizer.stateless_apply(
            optimizer_values, [jnp.asarray(g * scale) for g in grads], trainable
        )
        keras_weights.append([np.asarray(t) for t in trainable])
        keras_scales.append(float(optimizer_values[index]))

    tx = optaxclip.loss_scale(
        sgd_with(optaxclip.clip_by_global_norm(1.0)), growth_interval=2, **options
    )
    params = [jnp.asarray(v) for v in start(steps)]
    state = tx.init(params)
    for grads, want_w, want_scale in zip(steps, keras_weights, keras_scales, strict=True):
        scale = optaxclip.current_loss_scale(state)
        updates, state = jax.jit(tx.update)([jnp.asarray(g) * scale for g in grads], state, params)
        params = optax.apply_updates(params, updates)
        assert float(optaxclip.current_loss_scale(state)) == want_scale
        for x, y in zip(params, want_w, strict=True):
            np.testing.assert_allclose(np.asarray(x), y, rtol=1e-6, atol=1e-7)
    assert backed_off_and_grew([options["initial_scale"], *keras_scales])


def _accumulate(k: int, *clips: Any) -> Any:
    return optax.MultiSteps(sgd_with(*clips), every_k_schedule=k)


def test_keras_gradient_accumulation(keras: Any) -> None:
    steps = keras_steps(count=4)
    optimizer = keras.optimizers.SGD(LR, global_clipnorm=1.0, gradient_accumulation_steps=2)
    want = keras_run(keras, steps, optimizer)
    got = optax_run(_accumulate(2, optaxclip.clip_by_global_norm(1.0)), steps)
    assert_runs_close(got, want)
    for x, y in zip(want[0], start(steps), strict=True):
        np.testing.assert_array_equal(x, y)  # nothing moves between updates


def test_keras_loss_scale_and_accumulation(keras: Any) -> None:
    s = 64.0
    steps = [[g * np.float32(s) for g in grads] for grads in keras_steps(count=4, seed=2)]
    optimizer = keras.optimizers.SGD(
        LR, clipnorm=1.0, loss_scale_factor=s, gradient_accumulation_steps=2
    )
    want = keras_run(keras, steps, optimizer)
    got = optax_run(_accumulate(2, optax.scale(1 / s), optaxclip.clip_by_leaf_norm(1.0)), steps)
    assert_runs_close(got, want)


def test_guide_keras_compile_and_port(keras: Any) -> None:
    keras_side = run_blocks("data", "keras-compile")
    port = run_blocks("data", "torch-port", "keras-port")
    # `get_weights()` warns under NumPy 2 (Keras's `__array__` takes no `copy`): read the values.
    kernel, bias = (np.asarray(v.value) for v in keras_side["model"].weights)
    np.testing.assert_allclose(np.asarray(port["params"]["w"]), kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(port["params"]["b"]), bias, rtol=1e-5, atol=1e-6)
    moved = np.abs(kernel - keras_side["w0"]).max()
    assert moved > 0.01
