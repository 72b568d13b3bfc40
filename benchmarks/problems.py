"""Inputs and reference programs that several benchmarks share."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaxclip

# The optimizer steps compared by `step`, `train`, `adaptive` and `compile`, by name.
STEP_IMPLS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: optax.adam(1e-3),
    "optax clip+adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    "optaxclip clip+adam": lambda: optax.chain(
        optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3)
    ),
}


def split_leaves(flat: jax.Array, leaves: int) -> dict[str, jax.Array]:
    """`leaves` equal 1-D leaves holding the elements of `flat`, each its own buffer."""
    parts = jax.jit(lambda x: tuple(jnp.split(x, leaves)))(flat)
    return {f"w{i:04d}": part for i, part in enumerate(parts)}


def random_flat(seed: int, elements: int, dtype: Any) -> jax.Array:
    return jax.jit(lambda key: jax.random.normal(key, (elements,), dtype))(jax.random.key(seed))


def abstract_tree(leaves: int, shape: tuple[int, ...], dtype: Any = jnp.float32) -> dict[str, Any]:
    """`leaves` leaves of `jax.ShapeDtypeStruct`s: for compiling or lowering, no data."""
    return {f"w{i:04d}": jax.ShapeDtypeStruct(shape, dtype) for i in range(leaves)}


def floor_norm(flat: jax.Array) -> jax.Array:
    """The floor: one fused float32 sum of squares over one flat buffer."""
    return jnp.sqrt(jnp.sum(jnp.square(flat.astype(jnp.float32))))


def nothing(tree: Any) -> jax.Array:
    """Does no work: with `keep_unused=True` it measures passing the leaves to a jitted call."""
    del tree
    return jnp.zeros([], jnp.float32)


def optimizer_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    """update + apply_updates: what a training step does after the backward pass."""

    def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def relative_error(value: Any, reference: float) -> float:
    return abs(float(value) - reference) / max(abs(reference), 1e-30)
