"""`monitor`: the norms of the updates passing through a chain, per group and per layer."""

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _checks, _distributed, _measure, _pipeline, _tree
from optaxclip._pipeline import Name


class MonitorState(NamedTuple):
    """State of `monitor`: what the updates that last passed through looked like.

    A group's entry is a float32 scalar, or with `stacked` a float32 vector with
    one norm per layer.

    Attributes:
      grad_norm: the norm of all the updates together this step (float32).
      clipped: always False: `monitor` never changes the updates.
      nonfinite: the number of non-finite elements in this step's updates (int32).
      norms: the norm of each group's updates, by label.
      param_norms: the norm of each group's parameters, by label; zeros when
        `update` is called without `params`.
      ratio: `norms / param_norms`, 0 where the parameter norm is 0; zeros when
        `update` is called without `params`.
      name: the transform's name (static; used by `optaxclip.stats`).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    norms: dict[str, jax.Array]
    param_norms: dict[str, jax.Array]
    ratio: dict[str, jax.Array]
    name: Name


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the active leaves fall into groups, decided in Python at trace time.

    Attributes:
      names: the group labels, sorted.
      layers: per group, None (one norm) or its number of stacked layers.
      segments: the group of each active leaf.
      stacked: whether each active leaf is stacked.
    """

    names: tuple[str, ...]
    layers: tuple[int | None, ...]
    segments: tuple[int, ...]
    stacked: tuple[bool, ...]

    @property
    def slots(self) -> list[int]:
        """The first of each group's entries in a vector of every group's norms, and the end."""
        return list(np.cumsum([0] + [1 if n is None else n for n in self.layers]))

    def zeros(self) -> dict[str, jax.Array]:
        return {
            name: jnp.zeros([] if n is None else [n], jnp.float32)
            for name, n in zip(self.names, self.layers, strict=True)
        }


def _path_label(path: _tree.KeyPath) -> str:
    # `flax.nnx.Optimizer` initialises on `nnx.Variable`s, whose arrays sit under a
    # `.value` attribute, and updates on plain arrays: the same leaf keeps one label.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return jax.tree_util.keystr(path)


def _layout(tree: Any, view: _tree.TreeView, labels: Any, stacked: Any, where: str) -> _Layout:
    paths = view.active_paths
    if labels is None:
        leaf_labels = [_path_label(path) for path in paths]
    else:
        given = labels(tree) if callable(labels) else labels
        found = _tree.broadcast_prefix(given, tree, lambda x: isinstance(x, str), "labels", where)
        leaf_labels = [found[i] for i in view.active]
        for label, path in zip(leaf_labels, paths, strict=True):
            if not isinstance(label, str):
                raise TypeError(
                    f"{where}: labels must be strings; leaf {jax.tree_util.keystr(path)} has "
                    f"label {label!r}."
                )
    if isinstance(stacked, bool):
        leaf_stacked = [stacked] * len(paths)
    else:
        given = stacked(tree) if callable(stacked) else stacked
        found = _tree.broadcast_prefix(given, tree, lambda x: isinstance(x, bool), "stacked", where)
        leaf_stacked = [found[i] for i in view.active]
        for flag, path in zip(leaf_stacked, paths, strict=True):
            if not isinstance(flag, bool):
                raise TypeError(
                    f"{where}: `stacked` must hold bools; got {flag!r} for leaf "
                    f"{jax.tree_util.keystr(path)}."
                )
    names = sorted(set(leaf_labels))
    index = {name: g for g, name in enumerate(names)}
    layers: list[int | None] = [None] * len(names)
    first: list[Any] = [None] * len(names)
    for x, path, label, flag in zip(view.arrays, paths, leaf_labels, leaf_stacked, strict=True):
        g, leaf = index[label], jax.tree_util.keystr(path)
        if flag and np.ndim(x) == 0:
            raise ValueError(
                f"{where}: leaf {leaf} is marked stacked but is a scalar; a stacked leaf's "
                "leading axis indexes layers. Leave it out of `stacked`."
            )
        n = int(np.shape(x)[0]) if flag else None
        if first[g] is None:
            first[g], layers[g] = (leaf, flag), n
        elif first[g][1] != flag or layers[g] != n:

            def what(f: bool, k: int | None) -> str:
                return f"stacked with {k} layers" if f else "not stacked"

            raise ValueError(
                f"{where}: group {label!r} holds leaf {first[g][0]} "
                f"({what(first[g][1], layers[g])}) and leaf {leaf} ({what(flag, n)}); the "
                "leaves of a group must all be stacked with the same number of layers, or "
                "all unstacked. Give them different labels."
            )
    return _Layout(
        tuple(names),
        tuple(layers),
        tuple(index[label] for label in leaf_labels),
        tuple(leaf_stacked),
    )


def _param_view(view: _tree.TreeView, params: Any, where: str) -> _tree.TreeView:
    """The parameters' leaves at the positions of the updates' leaves."""
    try:
        leaves = tuple(view.treedef.flatten_up_to(params))
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{where}: `params` must have the structure of the updates: {err}"
        ) from err
    for i in view.active:
        dtype = _tree.leaf_dtype(leaves[i])
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{where}: parameter {jax.tree_util.keystr(view.paths[i])} has dtype {dtype} "
                "but its update is floating-point; pass the parameters the updates belong to."
            )
    return _tree.TreeView(view.treedef, leaves, view.paths, view.active)


def _total(norms: jax.Array, p: float, axis: int | None = None) -> jax.Array:
    """The p-norm of norms along `axis`: NaN if one is NaN, else inf if one is inf."""
    finite = jnp.where(jnp.isfinite(norms), norms, 0.0)
    total = _measure.combine(finite, p, axis=axis)
    total = jnp.where(jnp.any(jnp.isinf(norms), axis=axis), jnp.inf, total)
    return jnp.where(jnp.any(jnp.isnan(norms), axis=axis), jnp.nan, total)


def _sliced_norms(
    trees: Sequence[list[jax.Array]],
    counted: Sequence[jax.Array | None],
    layout: _Layout,
    p: float,
    dtype: Any,
    reducer: Any,
) -> tuple[list[jax.Array], jax.Array]:
    """Every entry of every tree from one `group_norms`: each layer of a stacked leaf is
    its own slice, so any order and the cross-device reduce apply to layers as to groups.
    """
    slots = layout.slots
    arrays, segments, owners = [], [], []
    for t, leaves in enumerate(trees):
        offset = t * slots[-1]
        for j, (x, g) in enumerate(zip(leaves, layout.segments, strict=True)):
            if layout.layers[g] is None:
                arrays.append(x)
                segments.append(offset + slots[g])
                owners.append((t, j))
            else:
                for layer in range(int(np.shape(x)[0])):
                    arrays.append(x[layer])
                    segments.append(offset + slots[g] + layer)
                    owners.append((t, j))
    flags = None
    if all(c is not None for c in counted):
        # One flag per active leaf of each tree; each layer's slice inherits its leaf's.
        flags = jnp.concatenate([c for c in counted if c is not None])
        if len(owners) != flags.shape[0]:
            base = np.cumsum([0] + [len(leaves) for leaves in trees])
            flags = flags[np.asarray([base[t] + j for t, j in owners], dtype=np.int32)]
    # Only the NaN/inf-propagating norm is recorded, so the finite rest is not measured.
    norms = _measure.group_norms(
        arrays, segments, slots[-1] * len(trees), p, dtype, flags, reducer, masked=False
    )
    entries = [norms.norm[t * slots[-1] : (t + 1) * slots[-1]] for t in range(len(trees))]
    return entries, jnp.sum(norms.nonfinite[: slots[-1]])


def _unit_and_group_norms(
    trees: Sequence[list[jax.Array]], layout: _Layout, p: float, dtype: Any
) -> tuple[list[jax.Array], jax.Array]:
    """Every entry of every tree, L2 on one device: stacked leaves by `unit_norms`
    (one reduction over the trailing axes per leaf), the others by `group_norms`.
    """
    flat_groups = [g for g, n in enumerate(layout.layers) if n is None]
    flat_index = {g: k for k, g in enumerate(flat_groups)}
    arrays, segments, units, unit_axes = [], [], [], []
    for t, leaves in enumerate(trees):
        for x, g, flag in zip(leaves, layout.segments, layout.stacked, strict=True):
            if flag:
                units.append(x)
                unit_axes.append(tuple(range(1, np.ndim(x))))
            else:
                arrays.append(x)
                segments.append(t * len(flat_groups) + flat_index[g])
    flat = _measure.group_norms(
        arrays, segments, len(flat_groups) * len(trees), p, dtype, masked=False
    )
    measured = _measure.unit_norms(units, unit_axes, dtype, rescue_tiny=True)
    per_layer = [n.reshape(n.shape[0]) for n in measured.norms]
    stacked_count = sum(layout.stacked)
    entries = []
    for t in range(len(trees)):
        by_group: dict[int, list[jax.Array]] = {}
        mine = per_layer[t * stacked_count : (t + 1) * stacked_count]
        leaf_groups = [g for g, f in zip(layout.segments, layout.stacked, strict=True) if f]
        for g, norm in zip(leaf_groups, mine, strict=True):
            by_group.setdefault(g, []).append(norm)
        pieces = []
        for g, layers in enumerate(layout.layers):
            if layers is None:
                pieces.append(flat.norm[t * len(flat_groups) + flat_index[g]][None])
            elif len(by_group[g]) == 1:
                pieces.append(by_group[g][0])
            else:
                pieces.append(_total(jnp.stack(by_group[g]), p, axis=0))
        entries.append(jnp.concatenate(pieces) if pieces else jnp.zeros([0], dtype))
    nonfinite = jnp.sum(flat.nonfinite[: len(flat_groups)]) + jnp.sum(
        measured.nonfinite[:stacked_count]
    )
    return entries, nonfinite.astype(jnp.int32)


def monitor(
    labels: Any = None,
    *,
    ord: Any = None,
    stacked: Any = False,
    axis_name: Any = None,
    replicated: Any = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Records the norms of the updates passing through, per group; changes nothing.

    Put one before a clip to see the raw gradients and one after the optimizer to
    see the updates applied: `optax.chain(monitor(name="grads"),
    clip_by_global_norm(1.0), optax.adam(1e-3), monitor(name="updates"))`. The
    updates come out unchanged (the same arrays), and the state records, per
    group g of leaves,

    .. math::
      \text{norms}_g = \|u_g\|_{\text{ord}}, \quad
      \text{param\_norms}_g = \|w_g\|_{\text{ord}}, \quad
      \text{ratio}_g = \text{norms}_g / \text{param\_norms}_g

    (the ratio 0 where the parameter norm is 0), with `grad_norm` the norm of all
    the updates, `nonfinite` their count of non-finite elements and `clipped`
    always False, as every optaxclip state has them. `optaxclip.stats` flattens
    the dicts as `"norms/{label}"`, ...; `optaxclip.host_stats` brings them to
    the host as Python numbers for a logger. Without `params` the parameter norms
    and ratios are zeros, so the state keeps its structure.

    The step reads the updates once and the parameters once, and under
    `axis_name` every group's norms, both trees' and the non-finite counts travel
    in one collective. A stacked leaf's layers are measured in the same pass; with
    the default `ord` and no `axis_name` each stacked leaf is one reduction over
    its trailing axes, otherwise each layer is measured as its own slice (more
    work at trace time). Under `axis_name` the layer axis must not be sharded.

    Args:
      labels: None (one group per leaf, labelled by `jax.tree_util.keystr` of its
        path, without the `.value` of an `nnx.Variable`), a tree (prefix) of str
        labels, or a callable params -> such a tree, as in `clip_by_group_norm`.
      ord: the norm order: None or 2, 1, `inf`, or any real p >= 1.
      stacked: whether a leaf's leading axis indexes layers (scan-stacked layers):
        a bool for every leaf, a tree prefix of bools, or a callable params ->
        such a tree. A stacked group's entries are vectors, one norm per layer;
        the leaves of a group are all stacked with the same number of layers or
        all unstacked.
      axis_name: under `shard_map`/`pmap`, the mesh axis (or axes) the updates are
        sharded over, so every device records the norms of the whole.
      replicated: with `axis_name`, a bool or tree prefix of bools marking leaves
        replicated over it (counted once).
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a `MonitorState`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.monitor()
      >>> params = {"w": jnp.array([1.0, 0.0]), "b": jnp.array([2.0])}
      >>> grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> updates is grads
      True
      >>> optaxclip.host_stats(state)["ratio/['w']"], optaxclip.host_stats(state)["ratio/['b']"]
      (5.0, 0.5)
    """
    where = "monitor"
    p = _checks.parse_ord(ord, where)
    _distributed.normalize_axis_name(axis_name, where)
    _checks.check_name(name, where)
    if not callable(stacked):
        for flag in jax.tree_util.tree_leaves(stacked):
            _checks.check_static(flag, "stacked", where)
    if labels is not None and not callable(labels):
        for label in jax.tree_util.tree_leaves(labels):
            _checks.check_static(label, "labels", where)
    label = Name(name or where)

    def init_fn(params: Any) -> MonitorState:
        view = _tree.view(params, where, strict=False)
        layout = _layout(params, view, labels, stacked, where)
        return MonitorState(
            **_pipeline.initial_fields(),
            norms=layout.zeros(),
            param_norms=layout.zeros(),
            ratio=layout.zeros(),
            name=label,
        )

    def update_fn(
        updates: Any, state: MonitorState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, MonitorState]:
        del extra_args
        view = _tree.view(updates, where)
        layout = _layout(params if params is not None else updates, view, labels, stacked, where)
        for g, group in enumerate(layout.names):
            if group not in state.norms:
                raise ValueError(
                    f"{where}: group {group!r} of the updates was not among the groups at init "
                    f"({sorted(state.norms)}). Labels must not change between init and update."
                )
            layers = layout.layers[g]
            want, got = np.shape(state.norms[group]), () if layers is None else (layers,)
            if want != got:

                def count(shape: tuple[int, ...]) -> str:
                    return f"{shape[0]} layers" if shape else "no layer axis"

                raise ValueError(
                    f"{where}: group {group!r} has {count(got)} in the updates but "
                    f"{count(want)} at init; the updates must have the parameters' shapes."
                )
        plans = [_distributed.plan(view, axis_name, replicated, where)]
        trees = [view.arrays]
        dtype = view.dtype
        if params is not None:
            param_view = _param_view(view, params, where)
            plans.append(_distributed.plan(param_view, axis_name, replicated, where))
            trees.append(param_view.arrays)
            dtype = np.dtype(jnp.promote_types(dtype, param_view.dtype))
        if any(layout.stacked) and p == 2 and plans[0].axes is None:
            entries, nonfinite = _unit_and_group_norms(trees, layout, p, dtype)
        else:
            entries, nonfinite = _sliced_norms(
                trees, [plan.counted for plan in plans], layout, p, dtype, plans[0].reducer(p)
            )
        entries = [e.astype(jnp.float32) for e in entries]
        slots = layout.slots

        def by_group(vector: jax.Array) -> dict[str, jax.Array]:
            out = {}
            for g, group in enumerate(layout.names):
                start = slots[g]
                out[group] = (
                    vector[start] if layout.layers[g] is None else vector[start : slots[g + 1]]
                )
            return out

        norms = by_group(entries[0])
        if params is None:
            param_norms, ratio = layout.zeros(), layout.zeros()
        else:
            param_entries = entries[1]
            positive = param_entries > 0
            quotient = entries[0] / jnp.where(positive, param_entries, 1.0)
            param_norms = by_group(param_entries)
            ratio = by_group(jnp.where(positive, quotient, 0.0))
        grad_norm = _total(entries[0], p) if slots[-1] else jnp.zeros([], jnp.float32)
        return updates, state._replace(
            grad_norm=grad_norm.astype(jnp.float32),
            clipped=jnp.zeros([], bool),
            nonfinite=nonfinite.astype(jnp.int32),
            norms=norms,
            param_norms=param_norms,
            ratio=ratio,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
