"""`optaxclip.stats` finds every optaxclip state in any optimizer state, by name."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import optaxclip

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
GRADS = {"w": jnp.full((3, 2), 2.0), "b": jnp.ones(2)}
NORM = float(jnp.sqrt(6 * 4.0 + 2))


def step(tx: Any, grads: Any = GRADS) -> Any:
    _, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
    return state


def test_single_state_uses_plain_field_names() -> None:
    found = optaxclip.stats(step(optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))))
    assert set(found) == {"grad_norm", "clipped", "nonfinite", "scale"}
    assert found["grad_norm"] == pytest.approx(NORM)
    assert found["scale"] == pytest.approx(1.0 / NORM)
    assert bool(found["clipped"]) and int(found["nonfinite"]) == 0
    assert all(isinstance(v, jax.Array) for v in found.values())


def test_no_state_gives_an_empty_dict() -> None:
    assert optaxclip.stats(step(optax.adam(1e-3))) == {}


def test_several_states_are_keyed_by_name() -> None:
    tx = optax.chain(
        optaxclip.clip_by_value(1.5, name="value"),
        optaxclip.clip_by_global_norm(1.0, name="global"),
        optax.sgd(0.1),
    )
    found = optaxclip.stats(step(tx))
    assert found["value/grad_norm"] == pytest.approx(2.0)
    assert found["global/grad_norm"] == pytest.approx(float(jnp.sqrt(6 * 1.5**2 + 2)))
    assert {k.split("/")[0] for k in found} == {"value", "global"}


def test_repeated_default_names_are_numbered() -> None:
    tx = optax.chain(optaxclip.clip_by_global_norm(10.0), optaxclip.clip_by_global_norm(1.0))
    found = optaxclip.stats(step(tx))
    assert not bool(found["clip_by_global_norm/clipped"])
    assert bool(found["clip_by_global_norm_1/clipped"])


def test_group_norms_are_flattened_by_label() -> None:
    tx = optaxclip.clip_by_group_norm(1.0, {"w": "kernel", "b": "bias"})
    found = optaxclip.stats(step(tx))
    assert found["group_norm/kernel"] == pytest.approx(float(jnp.sqrt(24.0)))
    assert found["group_norm/bias"] == pytest.approx(float(jnp.sqrt(2.0)))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: optax.chain(optax.identity(), optax.chain(tx, optax.adam(1e-3))),
        lambda tx: optax.MultiSteps(optax.chain(tx, optax.sgd(0.1)), every_k_schedule=1),
        lambda tx: optax.masked(tx, {"w": True, "b": True}),
        lambda tx: optax.partition({"a": tx, "b": optax.set_to_zero()}, {"w": "a", "b": "a"}),
        lambda tx: optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=1.0),
    ],
    ids=["chain", "multisteps", "masked", "partition", "inject_hyperparams"],
)
def test_found_through_wrappers(wrap: Any) -> None:
    found = optaxclip.stats(step(wrap(optaxclip.clip_by_global_norm(1.0))))
    assert found["grad_norm"] == pytest.approx(NORM)
    assert bool(found["clipped"])


def test_optax_tree_get_finds_fields() -> None:
    state = step(optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3)))
    assert float(optax.tree.get(state, "grad_norm")) == pytest.approx(NORM)


def test_guard_and_its_inner_clip_both_reported() -> None:
    inner = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    found = optaxclip.stats(step(optaxclip.guard(inner, max_norm=100.0)))
    assert found["guard/grad_norm"] == pytest.approx(NORM)
    assert not bool(found["guard/skipped"])
    assert bool(found["clip_by_global_norm/clipped"])


def test_flax_nnx_optimizer() -> None:
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = optax.chain(optaxclip.clip_by_global_norm(0.1), optax.adam(1e-3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model: nnx.Linear, optimizer: nnx.Optimizer, x: jax.Array) -> None:
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)

    train_step(model, optimizer, jnp.ones((4, 3)))
    for source in (optimizer, optimizer.opt_state):
        found = optaxclip.stats(source)
        assert set(found) == {"grad_norm", "clipped", "nonfinite", "scale"}
        assert all(type(v) is type(jnp.zeros(())) for v in found.values())
        assert float(found["grad_norm"]) > 0.1 and bool(found["clipped"])
