"""`monitor`: the norms it records against float64 NumPy, and that it changes nothing.

Per leaf, per group (labels as a tree and as a callable) and per layer (`stacked`),
for `ord` 1, 2 and inf, float32 and bfloat16 leaves; the updates come out bit for bit;
under `shard_map` on 8 devices the norms equal the unsharded ones, from one all-reduce;
`host_stats` brings everything to the host in one transfer.
"""

import collections
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

ORDS = {"l1": 1.0, "l2": 2.0, "inf": math.inf}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SHAPES = {"w": (6, 5), "b": (5,), "s": ()}
STACKED_SHAPES = {"embed": (7, 4), "blocks": {"kernel": (3, 4, 4), "bias": (3, 4)}}


def tree(seed: int, shapes: Any, dtype: Any = jnp.float32, scale: float = 1.0) -> Any:
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), dtype),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def np_norm(arrays: list[Any], ord: float) -> float:
    flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in arrays])
    return float(np.linalg.norm(flat, ord)) if flat.size else 0.0


def close(got: Any, want: Any, what: str = "", rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=0, err_msg=what)


def bits(x: Any) -> bytes:
    return np.asarray(x).tobytes()


def stacked_blocks(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "blocks", tree)


def top_level(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: str(path[0].key), tree)


# ---------------------------------------------------------------------------------------------
# Norms against float64 NumPy


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("ord", list(ORDS.values()), ids=list(ORDS))
def test_leaf_norms_param_norms_and_ratio(dtype: Any, ord: float) -> None:
    grads, params = tree(0, SHAPES, dtype, 3.0), tree(1, SHAPES, dtype)
    tx = optaxclip.monitor(ord=ord)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert set(state.norms) == {"['w']", "['b']", "['s']"}
    for k in SHAPES:
        label = f"['{k}']"
        want, want_param = np_norm([grads[k]], ord), np_norm([params[k]], ord)
        for field in ("norms", "param_norms", "ratio"):
            assert getattr(state, field)[label].dtype == jnp.float32
            assert getattr(state, field)[label].shape == ()
        close(state.norms[label], want, label)
        close(state.param_norms[label], want_param, label)
        close(state.ratio[label], want / want_param, label)
    close(state.grad_norm, np_norm(jax.tree.leaves(grads), ord))
    assert state.grad_norm.dtype == jnp.float32
    assert not bool(state.clipped) and int(state.nonfinite) == 0


@pytest.mark.parametrize("ord", list(ORDS.values()), ids=list(ORDS))
def test_labels_as_tree_and_as_callable(ord: float) -> None:
    grads = tree(2, SHAPES, scale=2.0)
    as_tree = {"w": "dense", "b": "small", "s": "small"}
    callable_labels = lambda t: {k: "dense" if k == "w" else "small" for k in t}
    want = {
        "dense": np_norm([grads["w"]], ord),
        "small": np_norm([grads["b"], grads["s"]], ord),
    }
    for labels in (as_tree, callable_labels):
        tx = optaxclip.monitor(labels, ord=ord)
        _, state = jax.jit(tx.update)(grads, tx.init(grads))
        assert set(state.norms) == set(want)
        for label, value in want.items():
            close(state.norms[label], value, label)
        close(state.grad_norm, np_norm(jax.tree.leaves(grads), ord))


def test_a_label_prefix_covers_a_subtree() -> None:
    grads = tree(3, STACKED_SHAPES)
    tx = optaxclip.monitor({"embed": "embed", "blocks": "blocks"})
    _, state = tx.update(grads, tx.init(grads))
    close(state.norms["blocks"], np_norm(jax.tree.leaves(grads["blocks"]), 2.0))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("ord", list(ORDS.values()), ids=list(ORDS))
def test_stacked_leaves_have_one_norm_per_layer(dtype: Any, ord: float) -> None:
    grads, params = tree(4, STACKED_SHAPES, dtype, 2.0), tree(5, STACKED_SHAPES, dtype)
    for labels in (None, top_level):
        tx = optaxclip.monitor(labels, ord=ord, stacked=stacked_blocks)
        state = tx.init(params)
        _, state = jax.jit(tx.update)(grads, state, params)
        if labels is None:
            groups = {f"['blocks']['{k}']": [k] for k in ("kernel", "bias")}
        else:
            groups = {"blocks": ["kernel", "bias"]}
        for label, keys in groups.items():
            assert state.norms[label].shape == (3,) and state.norms[label].dtype == jnp.float32
            for tree_, field in ((grads, "norms"), (params, "param_norms")):
                for layer in range(3):
                    want = np_norm([tree_["blocks"][k][layer] for k in keys], ord)
                    close(getattr(state, field)[label][layer], want, f"{field}{label}[{layer}]")
        embed = "['embed']" if labels is None else "embed"
        assert state.norms[embed].shape == ()
        close(state.norms[embed], np_norm([grads["embed"]], ord))
        close(state.grad_norm, np_norm(jax.tree.leaves(grads), ord))


def test_stacked_true_stacks_every_leaf() -> None:
    grads = {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones((3,))}
    tx = optaxclip.monitor(stacked=True)
    _, state = tx.update(grads, tx.init(grads))
    close(state.norms["['kernel']"], np.linalg.norm(np.arange(12.0).reshape(3, 4), axis=1))
    close(state.norms["['bias']"], np.ones(3))


def test_norms_of_huge_and_tiny_values_are_right() -> None:
    grads = {
        "huge": jnp.full((4, 3), 1e30, jnp.float32),
        "tiny": jnp.full((4, 3), 1e-30, jnp.float32),
    }
    for stacked in (False, True):
        tx = optaxclip.monitor(stacked=stacked)
        _, state = jax.jit(tx.update)(grads, tx.init(grads))
        for k, value in (("huge", 1e30), ("tiny", 1e-30)):
            n = math.sqrt(3 if stacked else 12)
            close(state.norms[f"['{k}']"], value * n * np.ones((4,) if stacked else ()), k)
        close(state.grad_norm, 1e30 * math.sqrt(12))


# ---------------------------------------------------------------------------------------------
# Observe, never change


@pytest.mark.parametrize("stacked", [False, True])
def test_updates_come_out_bit_for_bit(stacked: bool) -> None:
    grads = {
        "w": jnp.asarray(np.random.default_rng(6).normal(size=(3, 4)), jnp.bfloat16),
        "f": jnp.asarray([[1.0, -0.0], [np.nan, np.inf]], jnp.float32),
        "c": jnp.asarray([[1 + 2j, 3 - 1j]], jnp.complex64),
        "none": None,
    }
    params = jax.tree.map(lambda x: x.real.astype(jnp.float32) + 1, grads)
    tx = optax.chain(optaxclip.monitor(stacked=stacked), optaxclip.monitor(name="second"))
    eager, _ = tx.update(grads, tx.init(params), params)
    jitted, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert eager["w"] is grads["w"]
    for out in (eager, jitted):
        assert jax.tree.structure(out) == jax.tree.structure(grads)
        for k in ("w", "f", "c"):
            assert out[k].dtype == grads[k].dtype and bits(out[k]) == bits(grads[k]), k


def test_without_params_the_state_keeps_its_structure_with_zeros() -> None:
    grads, params = tree(7, STACKED_SHAPES, scale=2.0), tree(8, STACKED_SHAPES)
    tx = optaxclip.monitor(stacked=stacked_blocks)
    state = tx.init(params)
    _, with_params = tx.update(grads, state, params)
    _, without = tx.update(grads, with_params, None)
    assert jax.tree.structure(without) == jax.tree.structure(state)
    for field in ("param_norms", "ratio"):
        for label, value in getattr(without, field).items():
            assert value.shape == state.norms[label].shape
            assert not np.any(np.asarray(value)), (field, label)
    for label in state.norms:
        assert bits(without.norms[label]) == bits(with_params.norms[label])
        assert np.all(np.asarray(with_params.param_norms[label]) > 0)


def test_ratio_is_zero_where_the_parameter_norm_is_zero() -> None:
    grads = {"w": jnp.array([[3.0, 4.0], [0.0, 0.0]]), "b": jnp.array([1.0])}
    params = {"w": jnp.array([[0.0, 0.0], [1.0, 0.0]]), "b": jnp.zeros(1)}
    tx = optaxclip.monitor(stacked={"w": True, "b": False})
    _, state = tx.update(grads, tx.init(params), params)
    close(state.ratio["['w']"], [0.0, 0.0])
    assert float(state.ratio["['b']"]) == 0.0
    assert np.all(np.isfinite(np.asarray(state.ratio["['w']"])))


@pytest.mark.parametrize("stacked", [False, True])
def test_nonfinite_elements_are_counted_and_propagate_to_their_group(stacked: bool) -> None:
    grads = tree(9, {"a": (2, 3), "b": (2, 3), "c": (2, 3)})
    grads["a"] = grads["a"].at[1, 0].set(jnp.nan)
    grads["b"] = grads["b"].at[0, 2].set(-jnp.inf).at[1, 1].set(jnp.inf)
    tx = optaxclip.monitor(stacked=stacked)
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert int(state.nonfinite) == 3
    assert math.isnan(float(state.grad_norm))
    a, b, c = (np.asarray(state.norms[f"['{k}']"]) for k in "abc")
    if stacked:
        assert np.isfinite(a[0]) and np.isnan(a[1])
        assert np.all(np.isinf(b))
    else:
        assert np.isnan(a) and np.isinf(b)
    close(c, np.linalg.norm(np.asarray(grads["c"], np.float64), axis=1 if stacked else None))


def test_empty_tree_none_masked_and_float0_leaves() -> None:
    tx = optaxclip.monitor()
    out, state = tx.update({}, tx.init({}), {})
    assert out == {} and state.norms == {} and float(state.grad_norm) == 0
    grads = {
        "w": jnp.ones((2, 2)),
        "frozen": None,
        "masked": optax.MaskedNode(),
        "step": np.zeros((), jax.dtypes.float0),
    }
    params = {**grads, "step": jnp.zeros((), jnp.int32)}
    out, state = tx.update(grads, tx.init(params), params)
    assert set(state.norms) == {"['w']"}
    assert out["step"].dtype == jax.dtypes.float0 and out["frozen"] is None
    close(state.norms["['w']"], 2.0)


def test_no_recompile_on_the_second_call() -> None:
    tx = optaxclip.monitor(top_level, stacked=stacked_blocks)
    params = tree(10, STACKED_SHAPES)
    traces = []

    @jax.jit
    def step(g: Any, s: Any) -> Any:
        traces.append(None)
        return tx.update(g, s, params)

    state = tx.init(params)
    _, state = step(tree(11, STACKED_SHAPES), state)
    _, state = step(tree(12, STACKED_SHAPES), state)
    assert len(traces) == 1


def test_no_conditional_on_accelerators() -> None:
    params = tree(10, STACKED_SHAPES)
    for ord in ORDS.values():
        for stacked in (False, stacked_blocks):
            t = optaxclip.monitor(ord=ord, stacked=stacked)
            traced = jax.jit(t.update).trace(params, t.init(params), params)
            for platform in ("cuda", "tpu"):
                text = traced.lower(lowering_platforms=(platform,)).as_text()
                found = re.findall(r"stablehlo\.(case|if|while)\b", text)
                assert not found, (ord, stacked, platform, collections.Counter(found))


# ---------------------------------------------------------------------------------------------
# Errors that say what to do


def test_errors_name_the_leaf_and_the_fix() -> None:
    grads = {"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2)), "s": jnp.ones(())}
    with pytest.raises(ValueError, match=r"group 'g' holds leaf \['a'\].*3 layers.*\['b'\]"):
        optaxclip.monitor(lambda t: {k: "g" for k in t}, stacked=True).init(
            {k: grads[k] for k in "ab"}
        )
    with pytest.raises(ValueError, match=r"leaf \['s'\] is marked stacked but is a scalar"):
        optaxclip.monitor(stacked=True).init(grads)
    with pytest.raises(TypeError, match=r"labels must be strings; leaf \['a'\]"):
        optaxclip.monitor({"a": 1, "b": "x", "s": "x"}).init(grads)
    with pytest.raises(TypeError, match=r"leaf \['c'\] has dtype int32"):
        tx = optaxclip.monitor()
        tx.update({**grads, "c": jnp.ones(2, jnp.int32)}, tx.init(grads))
    with pytest.raises(ValueError, match="`params` must have the structure of the updates"):
        tx = optaxclip.monitor()
        tx.update(grads, tx.init(grads), {"a": grads["a"]})
    with pytest.raises(ValueError, match="`ord` must be None"):
        optaxclip.monitor(ord=0.5)
    with pytest.raises(TypeError, match="static_args"):
        optaxclip.monitor(stacked=jnp.bool_(True))


def test_labels_changed_between_init_and_update_is_an_error() -> None:
    grads = {"a": jnp.ones(2), "b": jnp.ones(2)}
    names = iter([{"a": "x", "b": "y"}, {"a": "x", "b": "z"}])
    tx = optaxclip.monitor(lambda t: next(names))
    message = r"group 'z'.*not among the groups at init \(\['x', 'y'\]\)"
    with pytest.raises(ValueError, match=message):
        tx.update(grads, tx.init(grads))


def test_layers_changed_between_init_and_update_is_an_error() -> None:
    tx = optaxclip.monitor(stacked=True)
    state = tx.init({"w": jnp.ones((3, 2))})
    with pytest.raises(
        ValueError, match=r"group \"\['w'\]\" has 4 layers in the updates but 3 layers at init"
    ):
        tx.update({"w": jnp.ones((4, 2))}, state)


# ---------------------------------------------------------------------------------------------
# stats and host_stats


def test_stats_keys_and_host_stats_in_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    grads, params = tree(13, STACKED_SHAPES, scale=5.0), tree(14, STACKED_SHAPES)
    tx = optax.chain(
        optaxclip.monitor(top_level, stacked=stacked_blocks, name="grads"),
        optaxclip.clip_by_global_norm(1.0),
        optax.adam(1e-3),
        optaxclip.monitor(name="updates"),
    )
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    found = optaxclip.stats(state)
    assert found["grads/norms/blocks"].shape == (3,)
    assert "updates/ratio/['blocks']['kernel']" in found
    assert {k.split("/")[0] for k in found} == {"grads", "clip_by_global_norm", "updates"}

    calls = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(None) or device_get(x))
    host = optaxclip.host_stats(state)
    assert len(calls) == 1
    assert list(host)[:3] == ["grads/grad_norm", "grads/clipped", "grads/nonfinite"]
    for layer in range(3):
        value = host[f"grads/norms/blocks/{layer}"]
        assert type(value) is float
        assert value == float(found["grads/norms/blocks"][layer])
    assert "grads/norms/blocks" not in host
    assert type(host["grads/clipped"]) is bool and type(host["grads/nonfinite"]) is int
    assert host["grads/grad_norm"] == host["clip_by_global_norm/grad_norm"]
    assert host["clip_by_global_norm/clipped"] is True


def test_nnx_optimizer_labels_match_between_init_and_update() -> None:
    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.dense = nnx.Linear(3, 2, rngs=rngs)

    model = Model(nnx.Rngs(0))
    tx = optax.chain(optaxclip.monitor(name="grads"), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), grads)
    optimizer.update(model, grads)
    host = optaxclip.host_stats(optimizer)
    assert host["norms/['dense']['kernel']"] == pytest.approx(2.0 * math.sqrt(6))
    assert host["norms/['dense']['bias']"] == pytest.approx(2.0 * math.sqrt(2))


# ---------------------------------------------------------------------------------------------
# shard_map on 8 devices: the unsharded norms, from one all-reduce

MESH_SHAPES = {"w": (16, 6), "b": (5,), "layers": (3, 16)}
SPECS = {"w": P("data"), "b": P(), "layers": P(None, "data")}
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\(")


@pytest.mark.parametrize("ord", list(ORDS.values()), ids=list(ORDS))
def test_shard_map_equals_unsharded_with_one_all_reduce(ord: float) -> None:
    mesh = jax.make_mesh((8,), ("data",))
    grads, params = tree(15, MESH_SHAPES, scale=2.0), tree(16, MESH_SHAPES)
    stacked = {"w": False, "b": False, "layers": True}
    tx = optaxclip.monitor(ord=ord, stacked=stacked, axis_name="data")

    def step(g: Any, w: Any) -> Any:
        updates, state = tx.update(g, tx.init(w), w)
        return updates, state.norms, state.param_norms, state.ratio, state.grad_norm

    fn = jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(SPECS, SPECS), out_specs=(SPECS, P(), P(), P(), P())
        )
    )
    place = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, SPECS)
    lowered = fn.lower(place(grads), place(params))
    collectives = collections.Counter(COLLECTIVE.findall(lowered.compile().as_text()))
    # One collective for both trees, every group and layer; the max-norm may gather one
    # small record per device instead of reducing.
    allowed = [{"all-reduce": 1}, {"all-gather": 1}] if math.isinf(ord) else [{"all-reduce": 1}]
    assert collectives in allowed, collectives
    updates, norms, param_norms, ratio, grad_norm = fn(place(grads), place(params))

    single = optaxclip.monitor(ord=ord, stacked=stacked)
    _, want = jax.jit(single.update)(grads, single.init(params), params)
    for k in MESH_SHAPES:
        assert bits(updates[k]) == bits(grads[k])
        label = f"['{k}']"
        for got, field in ((norms, "norms"), (param_norms, "param_norms"), (ratio, "ratio")):
            close(got[label], getattr(want, field)[label], f"{field}[{label}]")
    for layer in range(3):
        close(norms["['layers']"][layer], np_norm([grads["layers"][layer]], ord))
    close(norms["['b']"], np_norm([grads["b"]], ord))
    close(grad_norm, np_norm(jax.tree.leaves(grads), ord))
