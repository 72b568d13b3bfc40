"""`stats`: every optaxclip state in an optimizer state, by name."""

from collections import Counter
from typing import Any

import jax
import numpy as np

from optaxclip._pipeline import Name


def _is_clip_state(x: Any) -> bool:
    return isinstance(x, tuple) and isinstance(getattr(x, "name", None), Name)


def _value(x: Any) -> jax.Array:
    """The array inside `x`; `flax.nnx.Optimizer` wraps state arrays in variables."""
    if isinstance(x, jax.Array):
        return x
    if hasattr(x, "get_value"):
        return x.get_value()
    return x[...]


def _find(tree: Any) -> list[Any]:
    """Every optaxclip state in `tree`, outer before inner (`guard` holds its inner state)."""
    found = []
    for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_clip_state):
        if _is_clip_state(x):
            found.append(x)
            found.extend(_find([getattr(x, f) for f in x._fields if f == "inner_state"]))
    return found


def _fields(state: Any) -> dict[str, jax.Array]:
    out = {}
    for field in state._fields:
        value = getattr(state, field)
        if isinstance(value, Name) or field == "inner_state":
            continue
        if isinstance(value, dict):
            for key, sub in value.items():
                out[f"{field}/{key}"] = _value(sub)
        else:
            out[field] = _value(value)
    return out


def stats(opt_state: Any) -> dict[str, jax.Array]:
    """The fields of every optaxclip state found in `opt_state`, by name.

    Searches chains, `optax.inject_hyperparams`, `optax.MultiSteps`, `optax.masked`,
    `optax.partition` and `flax.nnx.Optimizer` (pass the optimizer or its
    `opt_state`). With one optaxclip transform the keys are its fields
    (`grad_norm`, `clipped`, `nonfinite`, ...); with several they are
    `"{name}/{field}"`, where `name` is the `name=` given at construction or the
    factory's name, numbered (`clip_by_global_norm_1`, ...) when repeated.

    Args:
      opt_state: an optimizer state, or an object with an `opt_state` attribute.

    Returns:
      A dict from key to `jax.Array`; empty when no optaxclip state is present.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optax.chain(optaxclip.clip_by_value(1.0, name="value"),
      ...                  optaxclip.clip_by_global_norm(1.0, name="norm"))
      >>> _, state = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))
      >>> sorted(optaxclip.stats(state))[:3]
      ['norm/clipped', 'norm/grad_norm', 'norm/nonfinite']
    """
    if not isinstance(opt_state, tuple) and hasattr(opt_state, "opt_state"):
        opt_state = opt_state.opt_state
    found = _find(opt_state)
    if len(found) == 1:
        return _fields(found[0])
    seen: Counter[str] = Counter()
    out = {}
    for state in found:
        base = state.name.value
        name = base if seen[base] == 0 else f"{base}_{seen[base]}"
        seen[base] += 1
        for key, value in _fields(state).items():
            out[f"{name}/{key}"] = value
    return out


def host_stats(opt_state: Any) -> dict[str, float | int | bool]:
    """`stats(opt_state)` as Python numbers, brought to the host in one transfer.

    Every array comes over in a single `jax.device_get`, so logging every step
    costs one device-to-host copy, not one per key. Float fields become `float`,
    counts `int`, flags `bool`; a vector field (e.g. `monitor`'s per-layer norms
    with `stacked`) becomes one key per element, `"{key}/{i}"`, so the dict is
    flat and scalar, ready for any logger (TensorBoard, CSV, W&B). Call it
    outside `jax.jit`.

    Args:
      opt_state: an optimizer state, or an object with an `opt_state` attribute.

    Returns:
      A dict from key to Python number.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optax.chain(optaxclip.clip_by_global_norm(2.5), optax.sgd(0.1))
      >>> _, state = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)), jnp.zeros(2))
      >>> optaxclip.host_stats(state)
      {'grad_norm': 5.0, 'clipped': True, 'nonfinite': 0, 'scale': 0.5}
    """
    found = stats(opt_state)
    # device_get returns dicts with sorted keys; the loop keeps the order of `stats`.
    host = jax.device_get(found)
    out: dict[str, float | int | bool] = {}
    for key in found:
        value = np.asarray(host[key])
        if value.ndim == 0:
            out[key] = value.item()
        else:
            for i, element in enumerate(value.reshape(-1)):
                out[f"{key}/{i}"] = element.item()
    return out
