"""The decide helpers and the apply step shared by every policy, and the states they record."""

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optaxclip import _checks, _measure, _tree


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Name:
    """A policy's name, kept in its state as static data: it holds no arrays."""

    value: str


class ClipState(NamedTuple):
    """State of a static clipping policy: what the last step measured and did.

    Attributes:
      grad_norm: the norm the policy measured this step (float32).
      clipped: whether this step changed the updates.
      nonfinite: the number of non-finite elements in this step's updates (int32).
      scale: the factor the updates were multiplied by this step (float32): for a
        global clip the one factor, so the post-clip norm is `grad_norm * scale`; for
        per-leaf, per-unit and element-wise clips the smallest factor applied. It is
        1 when nothing was scaled, a non-finite norm under `nonfinite="propagate"`
        included, and 0 on a step that `nonfinite="skip"` zeroed.
      name: the policy's name (static; used by `optaxclip.stats`).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    scale: jax.Array
    name: Name


class GroupClipState(NamedTuple):
    """State of `clip_by_group_norm`.

    Attributes:
      grad_norm: the norm of all groups together this step (float32).
      clipped: whether this step changed the updates.
      nonfinite: the number of non-finite elements in this step's updates (int32).
      scale: the smallest factor a group was multiplied by this step (float32); 1
        when nothing was scaled, 0 on a step that `nonfinite="skip"` zeroed.
      group_norm: the norm of each group this step, by label (float32).
      name: the policy's name (static; used by `optaxclip.stats`).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    scale: jax.Array
    group_norm: dict[str, jax.Array]
    name: Name


def initial_fields() -> dict[str, jax.Array]:
    return {
        "grad_norm": jnp.zeros([], jnp.float32),
        "clipped": jnp.zeros([], bool),
        "nonfinite": jnp.zeros([], jnp.int32),
    }


def clip_fields() -> dict[str, jax.Array]:
    """The initial fields of a clip's state: those of every policy, and `scale`."""
    return {**initial_fields(), "scale": jnp.ones([], jnp.float32)}


def as_scalar(value: Any, dtype: Any) -> jax.Array:
    return jnp.asarray(value).astype(dtype)


def norm_scale(
    norm: jax.Array, max_norm: jax.Array, divisor_floor: float = 0.0, eps: Any = None
) -> jax.Array:
    """min(1, max_norm / max(norm, divisor_floor)), and 1 where the norm is zero or not finite.

    With `eps` the divisor is `norm + eps`, PyTorch's `clip_grad_norm_` rule: a norm
    within `eps` below `max_norm` is still scaled, by a factor just under 1. Both
    `jnp.where`s guard the division, so neither the value nor the gradient ever
    sees 0/0 or x/inf, and `max_norm = 0` gives a scale of exactly 0.
    """
    divisor = jnp.maximum(norm, divisor_floor) if divisor_floor else norm
    if eps is None:
        over = jnp.isfinite(norm) & (norm > max_norm)
    else:
        divisor = divisor + as_scalar(eps, divisor.dtype)
        over = jnp.isfinite(norm) & (norm > 0) & (divisor > max_norm)
    return jnp.where(over, max_norm / jnp.where(over, divisor, 1.0), 1.0)


def smallest_scale(
    scale: jax.Array, norms: _measure.Norms, nonfinite: _checks.NonFinite
) -> jax.Array:
    """The `scale` a group policy records: its smallest factor, 0 on a skipped step."""
    smallest = jnp.min(scale, initial=1.0).astype(jnp.float32)
    if nonfinite == "skip":
        smallest = jnp.where(jnp.sum(norms.nonfinite) > 0, 0.0, smallest)
    return smallest


def scale_leaf(
    x: jax.Array, scale: jax.Array, nonfinite: _checks.NonFinite, skip: jax.Array | None
) -> jax.Array:
    """Multiplies `x` by `scale` in float32 (or wider) and casts back to `x.dtype`."""
    dtype = x.dtype
    work = jnp.promote_types(dtype, _tree.accumulation_dtype(dtype))
    y = x.astype(work) * scale.astype(_tree.accumulation_dtype(dtype))
    if nonfinite == "zero":
        y = jnp.where(jnp.isfinite(x), y, jnp.zeros_like(y))
    if skip is not None:
        y = jnp.where(skip, jnp.zeros_like(y), y)
    return y.astype(dtype)


class Decision(NamedTuple):
    """What a norm-clipping step did."""

    updates: Any
    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    norms: jax.Array
    scale: jax.Array


def total_norm(norms: _measure.Norms, p: float, nonfinite: _checks.NonFinite) -> jax.Array:
    """The norm of several groups together, NaN/inf as the groups report them."""
    norm = _measure.combine(norms.finite, p)
    if nonfinite == "zero":
        return norm
    norm = jnp.where(jnp.any(jnp.isinf(norms.norm)), jnp.inf, norm)
    return jnp.where(jnp.any(jnp.isnan(norms.norm)), jnp.nan, norm)


def clip_groups(
    view: _tree.TreeView,
    norms: _measure.Norms,
    segments: Sequence[int],
    max_norm: jax.Array,
    p: float,
    nonfinite: _checks.NonFinite,
    eps: Any = None,
) -> Decision:
    """Decide and apply for the norm policies: scale each group to at most `max_norm`.

    `eps` (None for none) is added to each norm before dividing, as PyTorch does.
    """
    used = norms.finite if nonfinite == "zero" else norms.norm
    scale = norm_scale(used, max_norm, eps=eps)
    updates, clipped, count = apply_scales(view, scale, segments, norms, nonfinite)
    grad_norm = used[0] if used.shape[0] == 1 else total_norm(norms, p, nonfinite)
    smallest = smallest_scale(scale, norms, nonfinite)
    return Decision(updates, grad_norm.astype(jnp.float32), clipped, count, used, smallest)


def apply_scales(
    view: _tree.TreeView,
    scale: jax.Array,
    segments: Sequence[int],
    norms: _measure.Norms,
    nonfinite: _checks.NonFinite,
) -> tuple[Any, jax.Array, jax.Array]:
    """The apply step of the group policies: each leaf times its group's scale, with the
    `nonfinite` handling. Returns the updates, whether they changed, and the non-finite count.
    """
    count = jnp.sum(norms.nonfinite)
    skip = count > 0 if nonfinite == "skip" else None
    updates = view.rebuild(
        [
            scale_leaf(x, scale[g], nonfinite, skip)
            for x, g in zip(view.arrays, segments, strict=True)
        ]
    )
    clipped = jnp.any(scale < 1)
    if nonfinite != "propagate":
        clipped |= count > 0
    return updates, clipped, count
