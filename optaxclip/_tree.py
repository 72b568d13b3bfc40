"""Which leaves of a tree are clipped, done in Python at trace time."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KeyPath = tuple[Any, ...]


def leaf_dtype(x: Any) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.dtype(jnp.result_type(x))


def accumulation_dtype(dtype: Any) -> np.dtype:
    """float32 for every float or complex dtype up to 32 bits, float64 for 64-bit ones."""
    real = jnp.finfo(dtype).dtype
    return np.dtype(jnp.promote_types(real, jnp.float32))


@dataclasses.dataclass(frozen=True)
class TreeView:
    """A flattened tree split into the leaves a policy acts on and the ones it leaves alone.

    `None` and `optax.MaskedNode` hold no leaves, so they never appear; `float0`
    leaves (tangents of integer inputs) are kept but not touched.

    Attributes:
      treedef: the structure of the tree.
      leaves: every leaf, in flattening order.
      paths: the key path of every leaf.
      active: indices into `leaves` of the floating-point and complex leaves.
    """

    treedef: Any
    leaves: tuple[Any, ...]
    paths: tuple[KeyPath, ...]
    active: tuple[int, ...]

    @property
    def arrays(self) -> list[Any]:
        return [self.leaves[i] for i in self.active]

    @property
    def active_paths(self) -> list[KeyPath]:
        return [self.paths[i] for i in self.active]

    @property
    def dtype(self) -> np.dtype:
        """The accumulation dtype shared by every active leaf."""
        dtype = np.dtype(np.float32)
        for x in self.arrays:
            dtype = np.dtype(jnp.promote_types(dtype, accumulation_dtype(leaf_dtype(x))))
        return dtype

    def rebuild(self, new_active: Sequence[Any]) -> Any:
        leaves = list(self.leaves)
        for i, x in zip(self.active, new_active, strict=True):
            leaves[i] = x
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def view(tree: Any, where: str, strict: bool = True) -> TreeView:
    """Flattens `tree`, raising `TypeError` on an integer or bool leaf, naming its path.

    With `strict=False` such leaves are left out instead: parameters may hold
    integer leaves (counters) whose gradients are `float0`.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = tuple(path for path, _ in flat)
    leaves = tuple(x for _, x in flat)
    active = []
    for i, (path, x) in enumerate(flat):
        dtype = leaf_dtype(x)
        if dtype == jax.dtypes.float0:
            continue
        if not jnp.issubdtype(dtype, jnp.inexact):
            if not strict:
                continue
            raise TypeError(
                f"{where}: leaf {jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}; "
                "only floating-point and complex leaves can be clipped. Cast it, or exclude "
                "it with `optax.masked` / `optax.partition`."
            )
        active.append(i)
    return TreeView(treedef, leaves, paths, tuple(active))


def broadcast_prefix(
    prefix: Any, tree: Any, is_leaf: Callable[[Any], bool], what: str, where: str
) -> list[Any]:
    """Broadcasts a tree prefix (e.g. of labels) to one value per leaf of `tree`."""
    try:
        full = jax.tree_util.tree_map(
            lambda value, subtree: jax.tree_util.tree_map(lambda _: value, subtree),
            prefix,
            tree,
            is_leaf=is_leaf,
        )
        treedef = jax.tree_util.tree_structure(tree)
        return list(treedef.flatten_up_to(full))  # type: ignore[attr-defined]
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{where}: `{what}` must be a tree prefix of the updates "
            f"(one value per leaf or per subtree): {err}"
        ) from err
