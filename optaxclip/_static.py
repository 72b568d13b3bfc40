"""The static clipping policies: a fixed threshold, one decide step each."""

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _checks, _distributed, _measure, _pipeline, _tree
from optaxclip._pipeline import ClipState, GroupClipState, Name


def _clip_state(name: Name) -> ClipState:
    return ClipState(**_pipeline.clip_fields(), name=name)


def _check_eps(eps: Any, where: str) -> Any:
    """Checks `eps`; returns None for a concrete 0, so the default adds nothing to the step."""
    _checks.check_threshold(eps, "eps", where)
    if _checks.is_traced(eps):
        return eps
    value = float(np.asarray(eps))
    if math.isinf(value):
        raise ValueError(
            f"{where}: `eps` must be finite, got {value}: it is added to the norm before "
            "dividing, and an infinite one would zero every update. PyTorch's "
            "`clip_grad_norm_` uses eps=1e-6."
        )
    return None if value == 0 else eps


def _norm_policy(
    where: str,
    name: str | None,
    update: Callable[[Any, ClipState, Any], tuple[Any, ClipState]],
) -> optax.GradientTransformationExtraArgs:
    label = Name(name or where)

    def init_fn(params: Any) -> ClipState:
        del params
        return _clip_state(label)

    def update_fn(
        updates: Any, state: ClipState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ClipState]:
        del extra_args
        return update(updates, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _record(state: Any, decision: _pipeline.Decision, **extra: Any) -> Any:
    return state._replace(
        grad_norm=decision.grad_norm,
        clipped=decision.clipped,
        nonfinite=decision.nonfinite,
        scale=decision.scale,
        **extra,
    )


def clip_by_value(
    max_delta: Any, *, name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """Clips every element to [-max_delta, max_delta], as `optax.clip`.

    The state records the largest magnitude seen as `grad_norm` (the max-norm),
    whether any element was clipped, the count of non-finite elements, and as
    `scale` the smallest factor an element was multiplied by, min(1, max_delta /
    grad_norm), so the largest magnitude after the clip is `grad_norm * scale`
    (1 when the max-norm is not finite: NaN elements stay NaN, ±inf become
    ±max_delta).

    Args:
      max_delta: the largest magnitude an element may keep (>= 0).
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.clip_by_value(1.0)
      >>> updates, state = tx.update(jnp.array([-3.0, 0.5]), tx.init(None))
      >>> updates, float(state.grad_norm)
      (Array([-1. ,  0.5], dtype=float32), 3.0)
    """
    where = "clip_by_value"
    _checks.check_threshold(max_delta, "max_delta", where)
    _checks.check_name(name, where)

    def update(updates: Any, state: ClipState, params: Any) -> tuple[Any, ClipState]:
        del params
        view = _tree.view(updates, where)
        norms = _measure.group_norms(
            view.arrays, [0] * len(view.arrays), 1, math.inf, view.dtype, masked=False
        )
        new = []
        for x in view.arrays:
            dtype = _tree.accumulation_dtype(x.dtype)
            bound = _pipeline.as_scalar(max_delta, dtype)
            if jnp.iscomplexobj(x):
                y = x * _pipeline.norm_scale(_measure.magnitude(x, dtype), bound)
            else:
                y = jnp.clip(x.astype(dtype), -bound, bound)
            new.append(y.astype(x.dtype))
        norm = norms.norm[0]
        scale = _pipeline.norm_scale(norm, _pipeline.as_scalar(max_delta, norm.dtype))
        return view.rebuild(new), state._replace(
            grad_norm=norm.astype(jnp.float32),
            clipped=scale < 1,
            nonfinite=norms.nonfinite[0],
            scale=scale.astype(jnp.float32),
        )

    return _norm_policy(where, name, update)


def clip_by_global_norm(
    max_norm: Any,
    *,
    ord: Any = None,
    eps: Any = 0.0,
    axis_name: Any = None,
    replicated: Any = None,
    nonfinite: _checks.NonFinite = "propagate",
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales all updates together so that their global norm is at most `max_norm`.

    .. math::
      u \leftarrow u \cdot \min\left(1,
        \frac{\text{max\_norm}}{\|u\|_{\text{ord}} + \text{eps}}\right)

    The norm is accumulated in float32 whatever the updates' dtype, a zero norm
    scales by 1, and `max_norm = 0` gives zeros, never NaN. The norm is kept in
    the state as `grad_norm` and the factor applied as `scale` (so the post-clip
    norm is `grad_norm * scale`): logging them costs nothing. `eps=1e-6` is
    `torch.nn.utils.clip_grad_norm_` exactly, whose returned total norm is
    `grad_norm`.

    Args:
      max_norm: the largest global norm the updates may have (>= 0).
      ord: the norm order: None or 2, 1, `inf`, or any real p >= 1.
      eps: added to the norm before dividing (>= 0, finite). With `eps > 0` a norm
        within `eps` below `max_norm` is scaled by a factor just under 1, as in
        PyTorch; the default 0 leaves it alone.
      axis_name: under `shard_map`/`pmap`, the mesh axis (or axes) the updates are
        sharded over, so every device clips by the norm of the whole.
      replicated: with `axis_name`, a bool or tree prefix of bools marking leaves
        replicated over it (counted once).
      nonfinite: `"propagate"` (leave the updates alone when the norm is not
        finite), `"zero"` (zero non-finite elements, clip by the norm of the rest)
        or `"skip"` (all-zero updates for a step with any non-finite element).
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optax.chain(optaxclip.clip_by_global_norm(2.5), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> {k: v.item() for k, v in optaxclip.stats(state).items()}
      {'grad_norm': 5.0, 'clipped': True, 'nonfinite': 0, 'scale': 0.5}

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013.
    """
    where = "clip_by_global_norm"
    _checks.check_threshold(max_norm, "max_norm", where)
    p = _checks.parse_ord(ord, where)
    eps = _check_eps(eps, where)
    mode = _checks.check_nonfinite(nonfinite, where)
    _distributed.normalize_axis_name(axis_name, where)
    _checks.check_name(name, where)

    def update(updates: Any, state: ClipState, params: Any) -> tuple[Any, ClipState]:
        del params
        view = _tree.view(updates, where)
        plan = _distributed.plan(view, axis_name, replicated, where)
        segments = [0] * len(view.arrays)
        norms = _measure.group_norms(
            view.arrays,
            segments,
            1,
            p,
            view.dtype,
            plan.counted,
            plan.reducer(p),
            masked=mode == "zero",
        )
        bound = _pipeline.as_scalar(max_norm, view.dtype)[None]
        decision = _pipeline.clip_groups(view, norms, segments, bound, p, mode, eps)
        return decision.updates, _record(state, decision)

    return _norm_policy(where, name, update)


def clip_by_leaf_norm(
    max_norm: Any,
    *,
    ord: Any = None,
    eps: Any = 0.0,
    nonfinite: _checks.NonFinite = "propagate",
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Scales each leaf so that its own norm is at most `max_norm`.

    Leaf i is scaled by min(1, max_norm / (‖u_i‖ + eps)). The state's `grad_norm`
    is the norm of all leaves together and `scale` the smallest leaf's factor.
    With `ord=None` this is Keras's `clipnorm`.

    Args:
      max_norm: the largest norm each leaf may have (>= 0).
      ord: the norm order: None or 2, 1, `inf`, or any real p >= 1.
      eps: added to each leaf's norm before dividing (>= 0, finite), as in
        `clip_by_global_norm`.
      nonfinite: `"propagate"`, `"zero"` or `"skip"`, as in `clip_by_global_norm`.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.clip_by_leaf_norm(1.0)
      >>> updates, _ = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}, tx.init(None))
      >>> updates["a"], updates["b"]
      (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))
    """
    where = "clip_by_leaf_norm"
    _checks.check_threshold(max_norm, "max_norm", where)
    p = _checks.parse_ord(ord, where)
    eps = _check_eps(eps, where)
    mode = _checks.check_nonfinite(nonfinite, where)
    _checks.check_name(name, where)

    def update(updates: Any, state: ClipState, params: Any) -> tuple[Any, ClipState]:
        del params
        view = _tree.view(updates, where)
        _distributed.refuse_unreduced(view, where)
        segments = list(range(len(view.arrays)))
        norms = _measure.group_norms(
            view.arrays, segments, len(segments), p, view.dtype, masked=mode == "zero"
        )
        bound = jnp.broadcast_to(_pipeline.as_scalar(max_norm, view.dtype), [len(segments)])
        decision = _pipeline.clip_groups(view, norms, segments, bound, p, mode, eps)
        return decision.updates, _record(state, decision)

    return _norm_policy(where, name, update)


def _check_labels(labels: list[Any], paths: list[Any], where: str) -> list[str]:
    for label, path in zip(labels, paths, strict=True):
        if not isinstance(label, str):
            raise TypeError(
                f"{where}: labels must be strings; leaf {jax.tree_util.keystr(path)} has "
                f"label {label!r}."
            )
    return labels


def clip_by_group_norm(
    max_norm: Any,
    labels: Any,
    *,
    ord: Any = None,
    eps: Any = 0.0,
    axis_name: Any = None,
    replicated: Any = None,
    nonfinite: _checks.NonFinite = "propagate",
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips each group of leaves by the norm of that group, all groups measured in one pass.

    Leaves are grouped as in `optax.partition`: `labels` is a tree of strings
    with the structure of the parameters (or a prefix of it), or a callable
    mapping the parameters to such a tree. Group k is scaled by
    min(1, max_norm_k / (‖u_k‖ + eps)); the state's `scale` is the smallest factor.

    Args:
      max_norm: the largest norm of each group (>= 0): one number for all groups,
        or a dict from label to number.
      labels: a tree (prefix) of str labels, or a callable params -> such a tree.
      ord: the norm order: None or 2, 1, `inf`, or any real p >= 1.
      eps: added to each group's norm before dividing (>= 0, finite), as in
        `clip_by_global_norm`.
      axis_name: under `shard_map`/`pmap`, the mesh axis (or axes) the updates are
        sharded over; all group norms travel in one collective.
      replicated: with `axis_name`, a bool or tree prefix of bools marking
        replicated leaves.
      nonfinite: `"propagate"`, `"zero"` or `"skip"`, as in `clip_by_global_norm`;
        `"skip"` skips the whole step.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state keeps each group's
      norm in `group_norm`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> grads = {"enc": jnp.array([3.0, 4.0]), "dec": jnp.array([0.3, 0.4])}
      >>> tx = optaxclip.clip_by_group_norm(1.0, {"enc": "encoder", "dec": "decoder"})
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> updates["enc"], updates["dec"]
      (Array([0.6, 0.8], dtype=float32), Array([0.3, 0.4], dtype=float32))
    """
    where = "clip_by_group_norm"
    if isinstance(max_norm, Mapping):
        for label, value in max_norm.items():
            if not isinstance(label, str):
                raise TypeError(f"{where}: `max_norm` keys must be str labels, got {label!r}.")
            _checks.check_threshold(value, f"max_norm[{label!r}]", where)
    else:
        _checks.check_threshold(max_norm, "max_norm", where)
    p = _checks.parse_ord(ord, where)
    eps = _check_eps(eps, where)
    mode = _checks.check_nonfinite(nonfinite, where)
    _distributed.normalize_axis_name(axis_name, where)
    _checks.check_name(name, where)
    label = Name(name or where)

    def leaf_labels(tree: Any) -> list[Any]:
        tree_labels = labels(tree) if callable(labels) else labels
        return _tree.broadcast_prefix(
            tree_labels, tree, lambda x: isinstance(x, str), "labels", where
        )

    def group_names(params: Any) -> list[str]:
        view = _tree.view(params, where, strict=False)
        found = leaf_labels(params)
        names = sorted(
            set(_check_labels([found[i] for i in view.active], view.active_paths, where))
        )
        if isinstance(max_norm, Mapping):
            missing = [n for n in names if n not in max_norm]
            if missing:
                raise ValueError(
                    f"{where}: `max_norm` has no threshold for group(s) {missing}; give one "
                    "per label or a single number for all."
                )
        return names

    def init_fn(params: Any) -> GroupClipState:
        group_norm = {n: jnp.zeros([], jnp.float32) for n in group_names(params)}
        return GroupClipState(**_pipeline.clip_fields(), group_norm=group_norm, name=label)

    def update_fn(
        updates: Any, state: GroupClipState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, GroupClipState]:
        del extra_args
        view = _tree.view(updates, where)
        names = list(state.group_norm)
        found = leaf_labels(params if params is not None else updates)
        index = {n: i for i, n in enumerate(names)}
        segments = []
        for i, path in zip(view.active, view.active_paths, strict=True):
            leaf_label = found[i]
            if leaf_label not in index:
                raise ValueError(
                    f"{where}: leaf {jax.tree_util.keystr(path)} has label {leaf_label!r}, "
                    f"which was not among the labels at init ({names}). Labels must not change "
                    "between init and update."
                )
            segments.append(index[leaf_label])
        plan = _distributed.plan(view, axis_name, replicated, where)
        norms = _measure.group_norms(
            view.arrays,
            segments,
            len(names),
            p,
            view.dtype,
            plan.counted,
            plan.reducer(p),
            masked=mode == "zero",
        )
        if isinstance(max_norm, Mapping):
            bound = jnp.stack([_pipeline.as_scalar(max_norm[n], view.dtype) for n in names])
        else:
            bound = jnp.broadcast_to(_pipeline.as_scalar(max_norm, view.dtype), [len(names)])
        decision = _pipeline.clip_groups(view, norms, segments, bound, p, mode, eps)
        group_norm = {n: decision.norms[i].astype(jnp.float32) for i, n in enumerate(names)}
        return decision.updates, _record(state, decision, group_norm=group_norm)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unit_count(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def _units_total(norms: list[jax.Array]) -> jax.Array:
    """The global L2 norm from per-unit norms, NaN/inf propagating."""
    if not norms:
        return jnp.zeros([], jnp.float32)
    flat = jnp.concatenate([n.ravel().astype(jnp.float32) for n in norms])
    finite = jnp.where(jnp.isfinite(flat), flat, 0.0)
    total = _measure.combine(finite, 2.0)
    total = jnp.where(jnp.any(jnp.isinf(flat)), jnp.inf, total)
    return jnp.where(jnp.any(jnp.isnan(flat)), jnp.nan, total)


def _unit_clip(
    view: _tree.TreeView,
    norms: list[jax.Array],
    limits: list[jax.Array],
    state: ClipState,
    nonfinite: jax.Array,
    divisor_floor: float = 0.0,
) -> tuple[Any, ClipState]:
    """Apply for the unit-wise policies: each unit scaled to at most its limit."""
    scales = [_pipeline.norm_scale(n, m, divisor_floor) for n, m in zip(norms, limits, strict=True)]
    updates = view.rebuild(
        [
            _pipeline.scale_leaf(x, s, "propagate", None)
            for x, s in zip(view.arrays, scales, strict=True)
        ]
    )
    clipped = jnp.any(jnp.stack([jnp.any(s < 1) for s in scales])) if scales else jnp.bool_(False)
    smallest = jnp.ones([], jnp.float32)
    for s in scales:
        smallest = jnp.minimum(smallest, jnp.min(s, initial=1.0).astype(jnp.float32))
    return updates, state._replace(
        grad_norm=_units_total(norms),
        clipped=clipped,
        nonfinite=jnp.sum(nonfinite),
        scale=smallest,
    )


def clip_by_block_rms(
    threshold: Any, *, stacked: bool = False, name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """Scales each block so that its root-mean-square is at most `threshold`, as optax.

    A block is a leaf; with `stacked=True` it is each slice along a leaf's
    leading axis, for layers stacked for `jax.lax.scan`, so each layer keeps its
    own limit as it would unstacked.

    Args:
      threshold: the largest RMS a block may have (>= 0).
      stacked: whether the leading axis of every leaf indexes independent blocks.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.clip_by_block_rms(1.0, stacked=True)
      >>> updates, _ = tx.update(jnp.array([[4.0, 4.0], [0.5, 0.5]]), tx.init(None))
      >>> updates
      Array([[1. , 1. ],
             [0.5, 0.5]], dtype=float32)
    """
    where = "clip_by_block_rms"
    _checks.check_threshold(threshold, "threshold", where)
    _checks.check_static(stacked, "stacked", where)
    _checks.check_name(name, where)

    def update(updates: Any, state: ClipState, params: Any) -> tuple[Any, ClipState]:
        del params
        view = _tree.view(updates, where)
        _distributed.refuse_unreduced(view, where)
        axes = []
        for x, path in zip(view.arrays, view.active_paths, strict=True):
            if stacked and np.ndim(x) == 0:
                raise ValueError(
                    f"{where}: with stacked=True every leaf needs a leading block axis; leaf "
                    f"{jax.tree_util.keystr(path)} is a scalar."
                )
            axes.append(tuple(range(1 if stacked else 0, np.ndim(x))))
        units = _measure.unit_norms(view.arrays, axes, view.dtype, rescue_tiny=False)
        limits = []
        for x, ax in zip(view.arrays, axes, strict=True):
            dtype = _tree.accumulation_dtype(x.dtype)
            size = _unit_count(np.shape(x), ax)
            limits.append(_pipeline.as_scalar(threshold, dtype) * np.sqrt(size).astype(dtype))
        return _unit_clip(view, units.norms, limits, state, units.nonfinite)

    return _norm_policy(where, name, update)


# As optax's `unitwise_clip`: a unit norm below this is divided as if it were this, so
# results match `optax.adaptive_grad_clip` when `clipping * max(|w|, eps)` is below it.
AGC_DIVISOR_FLOOR = 1e-6


def _is_axes(a: Any) -> bool:
    return (
        a is None
        or isinstance(a, int)
        or (isinstance(a, tuple) and all(isinstance(i, int) for i in a))
    )


def adaptive_grad_clip(
    clipping: Any, *, eps: Any = 1e-3, axis: Any = None, name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive gradient clipping (AGC): each unit's update at most λ times its weight's norm.

    .. math::
      g_u \leftarrow g_u \cdot \min\left(1, \frac{\lambda \max(\|w_u\|, \epsilon)}{\|g_u\|}\right)

    Same results as `optax.adaptive_grad_clip` for finite input, with norms in
    float32 and overflow-safe.

    Args:
      clipping: the largest ratio of update norm to parameter norm, λ (>= 0).
      eps: the floor on parameter norms, so zero-initialised units can move.
      axis: the axes a unit spans: None (by rank, as optax), an int or tuple for
        every leaf, a tree prefix of such per leaf, or a callable
        `(path, leaf) -> axes`.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`; its `update` needs `params`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.adaptive_grad_clip(0.1)
      >>> params = jnp.array([3.0, 4.0])
      >>> updates, _ = tx.update(jnp.array([6.0, 8.0]), tx.init(params), params)
      >>> updates
      Array([0.3, 0.4], dtype=float32)

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
    """
    where = "adaptive_grad_clip"
    _checks.check_threshold(clipping, "clipping", where)
    _checks.check_threshold(eps, "eps", where)
    _checks.check_name(name, where)
    if not callable(axis):
        for a in jax.tree_util.tree_leaves(axis, is_leaf=_is_axes):
            _checks.check_static(a, "axis", where)

    def leaf_axes(view: _tree.TreeView, tree: Any) -> list[tuple[int, ...]]:
        if callable(axis):
            chosen = [axis(view.paths[i], view.leaves[i]) for i in view.active]
        elif _is_axes(axis):
            chosen = [axis] * len(view.active)
        else:
            per_leaf = _tree.broadcast_prefix(axis, tree, _is_axes, "axis", where)
            chosen = [per_leaf[i] for i in view.active]
        out = []
        for a, x, path in zip(chosen, view.arrays, view.active_paths, strict=True):
            try:
                if a is None:
                    out.append(_measure.default_axes(np.shape(x)))
                else:
                    out.append(_measure.normalize_axes(a, np.ndim(x)))
            except ValueError as err:
                raise ValueError(f"{where}: leaf {jax.tree_util.keystr(path)}: {err}") from err
        return out

    def update(updates: Any, state: ClipState, params: Any) -> tuple[Any, ClipState]:
        if params is None:
            raise ValueError(
                f"{where}: `update` needs `params` (AGC compares each update with its "
                "parameter); call `tx.update(updates, state, params)`."
            )
        view = _tree.view(updates, where)
        _distributed.refuse_unreduced(view, where)
        try:
            param_leaves = view.treedef.flatten_up_to(params)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{where}: `params` must have the structure of the updates: {err}"
            ) from err
        weights = [param_leaves[i] for i in view.active]
        axes = leaf_axes(view, updates)
        units = _measure.unit_norms(
            view.arrays + weights, axes + axes, view.dtype, rescue_tiny=False
        )
        count = len(view.arrays)
        limits = []
        for x, w_norm in zip(view.arrays, units.norms[count:], strict=True):
            dtype = _tree.accumulation_dtype(x.dtype)
            floor = jnp.maximum(w_norm.astype(dtype), _pipeline.as_scalar(eps, dtype))
            limits.append(_pipeline.as_scalar(clipping, dtype) * floor)
        return _unit_clip(
            view, units.norms[:count], limits, state, units.nonfinite[:count], AGC_DIVISOR_FLOOR
        )

    return _norm_policy(where, name, update)
