"""The public norms: global, per leaf and unit-wise, all accumulated in float32."""

from typing import Any

import jax
import jax.numpy as jnp

from optaxclip import _checks, _distributed, _measure, _tree


def global_norm(
    tree: Any, *, ord: Any = None, axis_name: Any = None, replicated: Any = None
) -> jax.Array:
    """The `ord`-norm of all leaves of `tree` taken together, accumulated in float32.

    Unlike a norm taken in the leaves' dtype, bf16 and fp16 trees neither lose
    precision in the sum nor overflow: four fp16 values of 300 have norm 600.
    Any NaN element gives NaN; otherwise any infinite element gives inf; an
    empty tree gives 0.

    Args:
      tree: a tree of arrays. `None`, `optax.MaskedNode` and `float0` leaves are
        skipped; integer leaves raise `TypeError`.
      ord: None or 2 (Euclidean), 1, `inf` (also `"inf"`), or any real p >= 1.
      axis_name: under `pmap` or `shard_map`, the mesh axis name (or tuple of
        names) the leaves are sharded over; the norm is then the norm of the
        whole, identical on every device.
      replicated: with `axis_name`, a bool or a tree prefix of bools marking
        leaves that are replicated (counted once) rather than sharded.

    Returns:
      A float32 scalar (float64 when a leaf is float64).

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> float(optaxclip.global_norm({"a": jnp.full(4, 300.0, jnp.float16)}))
      600.0
    """
    where = "global_norm"
    p = _checks.parse_ord(ord, where)
    view = _tree.view(tree, where)
    arrays = view.arrays
    plan = _distributed.plan(view, axis_name, replicated, where)
    norms = _measure.group_norms(
        arrays, [0] * len(arrays), 1, p, view.dtype, plan.counted, plan.reducer(p), masked=False
    )
    return norms.norm[0]


def leaf_norms(tree: Any, *, ord: Any = None) -> Any:
    """The `ord`-norm of each leaf, as a tree of float32 scalars of the same structure.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> optaxclip.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.ones(4)})
      {'a': Array(5., dtype=float32), 'b': Array(2., dtype=float32)}
    """
    where = "leaf_norms"
    p = _checks.parse_ord(ord, where)
    view = _tree.view(tree, where)
    _distributed.refuse_unreduced(view, where)
    arrays = view.arrays
    norms = _measure.group_norms(
        arrays, list(range(len(arrays))), len(arrays), p, view.dtype, masked=False
    )
    out = [jnp.zeros([], jnp.float32)] * len(view.leaves)
    for k, i in enumerate(view.active):
        out[i] = norms.norm[k].astype(_tree.accumulation_dtype(_tree.leaf_dtype(view.leaves[i])))
    return jax.tree_util.tree_unflatten(view.treedef, out)


def unitwise_norm(x: Any, axis: Any = None) -> jax.Array:
    """The L2 norm of each unit of `x`, broadcast to `x.shape`, in float32.

    Compatible with `optax.transforms.unitwise_norm`: with `axis=None` a unit is
    the whole array for scalars and vectors, a slice along axis 0 for rank 2 and
    3 (linear layers), axes (0, 1, 2) for rank 4 (conv kernels) and (0, 1, 2, 3)
    for rank 5. Values are exact for any finite input.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> optaxclip.unitwise_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]))
      Array([[5., 1.],
             [5., 1.]], dtype=float32)
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(f"unitwise_norm: expected a float or complex array, got {x.dtype}.")
    axes = _measure.default_axes(x.shape) if axis is None else _measure.normalize_axes(axis, x.ndim)
    dtype = _tree.accumulation_dtype(x.dtype)
    (norm,), _ = _measure.unit_norms([x], [axes], dtype, rescue_tiny=True)
    return jnp.broadcast_to(norm, x.shape)
