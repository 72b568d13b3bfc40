"""The reduce step across devices: which leaves count where, and the one collective.

Policies never call a collective themselves. At trace time `plan` decides, for
each leaf, on which devices its partial norm counts:

- under `jax.shard_map` with varying-axis types, a leaf that varies over a named
  axis is sharded over it (its partials add up); a leaf invariant over a named
  axis is counted once (on index 0 of that axis); a leaf that varies over a mesh
  axis that is *not* named is refused, since clipping un-reduced per-device
  gradients is almost always a bug;
- under `jax.pmap` (or `shard_map(check_vma=False)`), where types carry no such
  information, every leaf is sharded unless `replicated` marks it.

At run time the reducer combines each device's per-group partials in a single
all-reduce whose payload is O(groups), whatever the number of devices: the
fixed-scale band sums of the measure step add without overflow, so one `psum`
carries them with the non-finite counts (as exact base-256 digits) and the NaN
flags; the root is then taken once, identically on every device. NaN is never
sent. The max-norm gathers one small record per device instead, since maxima
do not add.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optaxclip import _measure, _tree


def normalize_axis_name(axis_name: Any, where: str) -> tuple[str, ...] | None:
    if axis_name is None:
        return None
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, tuple) or not names or not all(isinstance(a, str) for a in names):
        raise TypeError(
            f"{where}: `axis_name` must be a string, a non-empty tuple of strings, or None; "
            f"got {axis_name!r}."
        )
    return names


def _vma_checked(axes: tuple[str, ...]) -> bool:
    """Whether we are under `shard_map` with varying-axis types (not `pmap`)."""
    return bool(_measure.varying_axes(lax.axis_index(axes)))


def _mesh_axes() -> frozenset[str]:
    mesh = jax.sharding.get_abstract_mesh()
    return frozenset(getattr(mesh, "manual_axes", ()) or ())


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each leaf's partial norm counts, and how per-device records combine.

    Attributes:
      axes: the named mesh axes, or None on one device / under plain jit.
      counted: None, or a bool per active leaf: False where this device's copy
        of the leaf is a replica counted on another device.
    """

    axes: tuple[str, ...] | None
    counted: jax.Array | None

    def reducer(self, p: float) -> Callable[[_measure.Local], _measure.Local] | None:
        if self.axes is None:
            return None
        axes = self.axes
        return lambda local: all_reduce(local, axes, p)


def refuse_unreduced(view: _tree.TreeView, where: str, axes: tuple[str, ...] = ()) -> None:
    """Raises when a counted leaf varies over a manual mesh axis that is not in `axes`.

    Under `shard_map` such a leaf holds a different value on each device along that
    axis, so each device would clip by its own shard's norm. Outside `shard_map`, or
    under `shard_map(check_vma=False)` and `pmap` (whose types carry no varying axes),
    there is nothing to check.
    """
    unnamed = _mesh_axes() - set(axes)
    if not unnamed:
        return
    for i in view.active:
        stray = sorted(_measure.varying_axes(view.leaves[i]) & unnamed)
        if not stray:
            continue
        leaf = jax.tree_util.keystr(view.paths[i]) or "<root>"
        if axes:
            named, fix = f"which is not in axis_name={axes!r}", f"add {stray[0]!r} to `axis_name`"
        else:
            named, fix = "and axis_name is None", f"pass `axis_name={stray[0]!r}`"
        raise ValueError(
            f"{where}: leaf {leaf} varies over mesh axis {stray[0]!r}, {named}. Each device "
            "would clip by the norm of its own shard. Reduce the gradients first "
            f"(`jax.lax.pmean(grads, {stray[0]!r})`) or {fix} if the leaf is sharded over it."
        )


def plan(view: _tree.TreeView, axis_name: Any, replicated: Any, where: str) -> Plan:
    axes = normalize_axis_name(axis_name, where)
    if axes is None:
        if replicated is not None:
            raise ValueError(f"{where}: `replicated` only has a meaning with `axis_name`.")
        refuse_unreduced(view, where)
        return Plan(None, None)
    marks: list[Any] = [None] * len(view.leaves)
    if replicated is not None:
        marks = _tree.broadcast_prefix(
            replicated,
            jax.tree_util.tree_unflatten(view.treedef, list(view.leaves)),
            lambda r: isinstance(r, bool) or r is None,
            "replicated",
            where,
        )
        for path, mark in zip(view.paths, marks, strict=True):
            if mark is not None and not isinstance(mark, bool):
                raise TypeError(
                    f"{where}: `replicated` must hold bools; got {mark!r} for leaf "
                    f"{jax.tree_util.keystr(path)}."
                )
    try:
        checked = _vma_checked(axes)
    except NameError as err:
        raise ValueError(
            f"{where}: axis name {axes} is not bound. `axis_name` is for use inside "
            "`jax.shard_map` or `jax.pmap`; under plain `jax.jit` with sharded arrays, "
            "leave it None."
        ) from err
    if checked:
        refuse_unreduced(view, where, axes)
    flags = []
    for i in view.active:
        x, mark = view.leaves[i], marks[i]
        if checked:
            varying = _measure.varying_axes(x)
            invariant = [a for a in axes if a not in varying]
            if mark is True:
                invariant = list(axes)
        else:
            invariant = list(axes) if mark else []
        flag = jnp.bool_(True)
        for a in invariant:
            flag &= lax.axis_index(a) == 0
        flags.append(flag)
    counted = jnp.stack(flags) if flags else None
    return Plan(axes, counted)


def _digits(count: jax.Array, dtype: Any) -> jax.Array:
    """An int32 count as base-256 digits in `dtype`, lowest first: sums of them are exact."""
    base = 2**_measure.DIGIT_BITS
    digits = [(count >> (_measure.DIGIT_BITS * k)) & (base - 1) for k in range(_measure.DIGITS)]
    return jnp.stack(digits, axis=-1).astype(dtype)


def _undigits(digits: jax.Array) -> jax.Array:
    """The count from summed digits, saturating at the int32 maximum."""
    total = jnp.zeros(digits.shape[:-1], jnp.float32)
    for k in reversed(range(_measure.DIGITS)):
        total = total * 2.0**_measure.DIGIT_BITS + digits[..., k].astype(jnp.float32)
    exact = jnp.zeros(digits.shape[:-1], jnp.int32)
    for k in reversed(range(_measure.DIGITS)):
        exact = exact * 2**_measure.DIGIT_BITS + jnp.round(digits[..., k]).astype(jnp.int32)
    return jnp.where(total < 2.0**31 - 2**_measure.DIGIT_BITS, exact, jnp.iinfo(jnp.int32).max)


def all_reduce(local: _measure.Local, axes: tuple[str, ...], p: float) -> _measure.Local:
    """Combines per-device partials in one all-reduce; identical on every device.

    For a finite order the band sums, the non-finite counts (as base-256 digits)
    and the NaN flags travel as one float array of O(groups) values through a
    single `psum`: the band sums add without overflow, the digits add exactly,
    and NaN is never sent. For the max-norm and orders above about 3.5 (measured
    with a running scale), maxima do not add: each device's record is gathered
    (one small record per device, through the same single psum) and combined locally.
    """
    dtype = local.acc.dtype
    width = local.acc.shape[1]
    record = jnp.concatenate(
        [local.acc, _digits(local.nonfinite, dtype), local.nan.astype(dtype)[:, None]], axis=1
    )
    if not _measure.is_banded(p, dtype):
        # Each device writes its record into its own row and a psum hands every device
        # every row: unlike an all-gather's, a psum's result is typed invariant.
        size = lax.axis_size(axes)
        rows = jnp.zeros((size, *record.shape), dtype).at[lax.axis_index(axes)].set(record)
        rows = lax.psum(rows, axes)
        if math.isinf(p):
            acc = jnp.max(rows[..., :width], axis=0)
        else:
            devices, groups = rows.shape[0], rows.shape[1]
            flat = rows[..., :width].reshape(devices * groups, width)
            acc = _measure.merge_scaled(flat, np.tile(np.arange(groups), devices), groups, p)
        rest = jnp.sum(rows[..., width:], axis=0)
    else:
        total = lax.psum(record, axes)
        acc, rest = total[:, :width], total[:, width:]
    return _measure.Local(
        acc=acc, nonfinite=_undigits(rest[:, : _measure.DIGITS]), nan=rest[:, -1] > 0
    )
