"""Never clip per shard silently: inside `shard_map`, a forgotten `axis_name` is an error.

The scenario of the README's first distributed promise: gradients `{"w": sharded over "d",
"b": replicated}` inside `jax.shard_map` over 8 CPU devices, given to a norm-based transform
without `axis_name`. Each device would clip by its own shard's norm; instead tracing raises,
naming the leaf, the axis and the two ways out. Gradients reduced with `pmean` first vary over
no manual axis and pass without `axis_name`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

# Each entry: (gradients, params) -> something computed from the norm of `gradients`.
Measure = Callable[[Any, Any], Any]


def _update(tx: Any) -> Measure:
    def run(grads: Any, params: Any) -> Any:
        return tx.update(grads, tx.init(params), params)[0]

    return run


def _labels(tree: Any) -> Any:
    return {k: ("bias" if k == "b" else "dense") for k in tree}


NORM_BASED: dict[str, Callable[[], Measure]] = {
    "global_norm": lambda: lambda g, p: optaxclip.global_norm(g),
    "global_norm_inf": lambda: lambda g, p: optaxclip.global_norm(g, ord="inf"),
    "leaf_norms": lambda: lambda g, p: optaxclip.leaf_norms(g),
    "clip_by_global_norm": lambda: _update(optaxclip.clip_by_global_norm(1.0)),
    "clip_by_global_norm_skip": lambda: _update(
        optaxclip.clip_by_global_norm(1.0, nonfinite="skip")
    ),
    "clip_by_leaf_norm": lambda: _update(optaxclip.clip_by_leaf_norm(1.0)),
    "clip_by_group_norm": lambda: _update(optaxclip.clip_by_group_norm(1.0, _labels)),
    "clip_by_block_rms": lambda: _update(optaxclip.clip_by_block_rms(1.0)),
    "adaptive_grad_clip": lambda: _update(optaxclip.adaptive_grad_clip(0.01)),
    "autoclip": lambda: _update(optaxclip.autoclip(history_size=4)),
    "zclip": lambda: _update(optaxclip.zclip()),
    "quantile_clip": lambda: _update(optaxclip.quantile_clip()),
    "adagc": lambda: _update(optaxclip.adagc()),
    "guard": lambda: _update(optaxclip.guard(optax.sgd(0.1))),
    "guard(clip_by_global_norm)": lambda: _update(
        optaxclip.guard(optaxclip.clip_by_global_norm(1.0))
    ),
    "monitor": lambda: _update(optaxclip.monitor()),
    "loss_scale": lambda: _update(optaxclip.loss_scale(optax.sgd(0.1), initial_scale=4.0)),
}

SPECS = {"w": P("d"), "b": P()}


def _setup() -> tuple[jax.sharding.Mesh, dict[str, jax.Array]]:
    mesh = jax.make_mesh((8,), ("d",))
    rng = np.random.default_rng(0)
    grads = {"w": rng.normal(size=(16, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
    placed = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in grads.items()}
    return mesh, placed


def _smap(step: Callable[[Any], Any], mesh: jax.sharding.Mesh, **kw: Any) -> Any:
    return jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(SPECS,), out_specs=P(), **kw),
    )


def _scalar(out: Any) -> jax.Array:
    # A value invariant over "d", whatever the transform returned.
    return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("name", list(NORM_BASED))
def test_sharded_leaf_without_axis_name_is_a_trace_time_error(name: str) -> None:
    mesh, grads = _setup()
    measure = NORM_BASED[name]()

    def step(g: Any) -> Any:
        params = jax.tree.map(jnp.zeros_like, jax.lax.pmean(g, "d"))
        return jax.lax.pmean(_scalar(measure(g, params)), "d")

    with pytest.raises(ValueError, match=r"\['w'\] varies over mesh axis 'd'") as info:
        _smap(step, mesh).trace(grads)
    message = str(info.value)
    assert "axis_name is None" in message, message
    assert "jax.lax.pmean(grads, 'd')" in message, message
    assert "axis_name='d'" in message, message


@pytest.mark.parametrize("name", list(NORM_BASED))
def test_gradients_reduced_first_pass_without_axis_name(name: str) -> None:
    mesh, grads = _setup()
    measure = NORM_BASED[name]()

    def reduced(g: Any) -> Any:
        g = jax.lax.pmean(g, "d")
        return _scalar(measure(g, jax.tree.map(jnp.zeros_like, g)))

    out = _smap(reduced, mesh)(grads)
    # The same value as outside shard_map, on the mean of the shards.
    mean = {
        "w": np.asarray(grads["w"]).reshape(8, 2, 4).mean(axis=0),
        "b": np.asarray(grads["b"]),
    }
    local = {k: jnp.asarray(v) for k, v in mean.items()}
    want = _scalar(measure(local, jax.tree.map(jnp.zeros_like, local)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5)


def test_scenario_clips_the_whole_with_axis_name() -> None:
    """The README's scenario, done right: with axis_name the clipped `w` has norm <= 1."""
    mesh, grads = _setup()
    tx = optaxclip.clip_by_global_norm(1.0, axis_name="d")

    def step(g: Any) -> Any:
        out = tx.update(g, tx.init(g))[0]
        return optaxclip.global_norm(out, axis_name="d")

    norm = float(_smap(step, mesh)(grads))
    assert norm == pytest.approx(1.0, rel=1e-5)


def test_check_vma_false_cannot_be_checked() -> None:
    """Without varying-axis types nothing can be checked: the README says to pass axis_name."""
    mesh, grads = _setup()
    tx = optaxclip.clip_by_global_norm(1.0)

    def step(g: Any) -> Any:
        return jax.lax.pmax(optaxclip.global_norm(tx.update(g, tx.init(g))[0]), "d")

    # Runs (per shard, as documented); the per-shard clip leaves each shard at norm <= 1, so
    # the whole has norm above 1: why axis_name must be given there.
    local = float(_smap(step, mesh, check_vma=False)(grads))
    assert local <= 1.0 + 1e-6
