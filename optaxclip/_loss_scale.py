"""`loss_scale`: dynamic loss scaling for float16 training, as `torch.amp.GradScaler` does it."""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _checks, _distributed, _measure, _pipeline, _stats, _tree
from optaxclip._pipeline import Name


class LossScaleState(NamedTuple):
    """State of `loss_scale`.

    Attributes:
      grad_norm: the global L2 norm of this step's unscaled updates (float32; NaN or inf
        on a step that overflowed).
      clipped: whether this step changed the updates (it was skipped).
      nonfinite: the number of non-finite elements in this step's updates (int32).
      skipped: whether this step was skipped (all-zero updates, inner state kept).
      skip_count: the number of skipped steps so far (int32).
      loss_scale: S after this step, the factor to multiply the next loss with (float32).
      growth_tracker: the number of finite steps in a row since S last grew or backed off
        (int32), as `torch.amp.GradScaler`'s `_growth_tracker`.
      inner_state: the state of the wrapped transform.
      name: the transform's name (static).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    skipped: jax.Array
    skip_count: jax.Array
    loss_scale: jax.Array
    growth_tracker: jax.Array
    inner_state: Any
    name: Name


def _concrete(value: Any, arg: str, where: str) -> float | None:
    """`value` as a Python float when concrete (None when traced), refusing non-numbers."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{where}: `{arg}` must be a number, got {value!r}.")
    if _checks.is_traced(value):
        if np.ndim(value) != 0:
            raise ValueError(f"{where}: `{arg}` must be a scalar, got shape {np.shape(value)}.")
        return None
    _checks.check_threshold(value, arg, where)
    return float(np.asarray(value))


def _check_options(
    initial_scale: Any,
    growth_factor: Any,
    backoff_factor: Any,
    growth_interval: Any,
    min_scale: Any,
    max_scale: Any,
    where: str,
) -> None:
    """Refuses concrete invalid options; traced ones (`inject_hyperparams`) pass through."""
    scales = {}
    for arg, value in (
        ("initial_scale", initial_scale),
        ("min_scale", min_scale),
        ("max_scale", max_scale),
    ):
        number = _concrete(value, arg, where)
        if number is not None and not number > 0:
            raise ValueError(
                f"{where}: `{arg}` must be positive, got {number}: the loss is multiplied by "
                "the scale and the gradients divided by it."
            )
        if number is not None and math.isinf(number) and arg != "max_scale":
            raise ValueError(f"{where}: `{arg}` must be finite, got {number}.")
        scales[arg] = number
    growth = _concrete(growth_factor, "growth_factor", where)
    if growth is not None and not growth > 1:
        raise ValueError(
            f"{where}: `growth_factor` must be greater than 1, got {growth}; "
            "to keep the scale fixed, set `growth_interval` larger than the number of steps."
        )
    if growth is not None and math.isinf(growth):
        raise ValueError(f"{where}: `growth_factor` must be finite, got {growth}.")
    backoff = _concrete(backoff_factor, "backoff_factor", where)
    if backoff is not None and not 0 < backoff < 1:
        raise ValueError(
            f"{where}: `backoff_factor` must be in (0, 1), got {backoff}: an overflow must "
            "lower the scale."
        )
    interval = _concrete(growth_interval, "growth_interval", where)
    if interval is not None:
        if not np.issubdtype(np.asarray(growth_interval).dtype, np.integer):
            raise ValueError(
                f"{where}: `growth_interval` must be an integer (a number of steps), "
                f"got {growth_interval!r}."
            )
        if interval < 1:
            raise ValueError(f"{where}: `growth_interval` must be at least 1, got {int(interval)}.")
    low, start, high = scales["min_scale"], scales["initial_scale"], scales["max_scale"]
    if low is not None and high is not None and low > high:
        raise ValueError(f"{where}: `min_scale` ({low}) must not exceed `max_scale` ({high}).")
    if start is not None and (
        (low is not None and start < low) or (high is not None and start > high)
    ):
        raise ValueError(
            f"{where}: `initial_scale` ({start}) must lie in [min_scale, max_scale] = "
            f"[{min_scale}, {max_scale}]."
        )


def _unscale(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x · (1/S) in float32 (float64 for float64 leaves), cast back to the leaf's dtype."""
    dtype = _tree.accumulation_dtype(x.dtype)
    work = jnp.promote_types(x.dtype, dtype)
    return (x.astype(work) * (1 / scale.astype(dtype))).astype(x.dtype)


def _keep_or_zero(keep: jax.Array, x: Any) -> Any:
    if x.dtype == jax.dtypes.float0:
        return x
    return jnp.where(keep, x, jnp.zeros_like(x))


def loss_scale(
    inner: optax.GradientTransformation,
    *,
    initial_scale: Any = 2.0**15,
    growth_factor: Any = 2.0,
    backoff_factor: Any = 0.5,
    growth_interval: Any = 2000,
    min_scale: Any = 1.0,
    max_scale: Any = 2.0**24,
    axis_name: Any = None,
    replicated: Any = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Dynamic loss scaling: unscales the gradients, skips steps that overflowed.

    In float16 small gradients underflow to zero. The remedy is to differentiate
    loss × S, S a large scale, so the backward pass stays in float16's range, and
    to divide the gradients by S before the optimizer sees them. The incoming
    updates are those gradients of (loss × S), S = `current_loss_scale(state)`.
    They are divided by S (multiplied by the float32 reciprocal 1/S, as torch does:
    exact for powers of two) in float32 (float64 for float64 leaves), cast back to
    each leaf's dtype, and counted for non-finite elements in the same pass
    (one collective with `axis_name`). Then, as `torch.amp.GradScaler`:

    - a step with a non-finite element outputs all-zero updates, leaves `inner`'s
      state untouched, and backs off: S ← max(S · `backoff_factor`, `min_scale`);
    - a finite step is passed to `inner` unscaled; after `growth_interval` finite
      steps in a row (counted since S last changed) S ← min(S · `growth_factor`,
      `max_scale`), and S stays where it is if S · `growth_factor` overflows float32.

    Clipping goes inside: `loss_scale(optax.chain(clip_by_global_norm(1.0),
    optax.adam(1e-3)))` clips the unscaled gradients. Put the scaler outermost,
    around `guard` and around `optax.MultiSteps` (it then unscales each micro-batch,
    and a micro-batch that overflowed is dropped, not accumulated). The inner update
    runs every step and its result is selected with `jnp.where`: no branch.

    Every numeric option may be traced (`optax.inject_hyperparams`); with float16
    params pass `hyperparam_dtype=jnp.float32` there, since optax casts the options
    to the params' dtype and 2**24 is inf in float16.

    Args:
      inner: the transform that receives the unscaled gradients (the optimizer).
      initial_scale: S at the first step.
      growth_factor: the factor S grows by (> 1).
      backoff_factor: the factor S shrinks by on overflow (in (0, 1)).
      growth_interval: the number of finite steps in a row before S grows (an int >= 1).
      min_scale: the smallest S (> 0).
      max_scale: the largest S (may be `inf`).
      axis_name: under `shard_map`/`pmap`, the mesh axis (or axes) of the updates,
        so every device skips and rescales alike.
      replicated: with `axis_name`, which leaves are replicated.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optaxclip.loss_scale(optax.sgd(1.0), initial_scale=1024.0)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([512.0, 2048.0]), state, params)
      >>> updates, float(optaxclip.current_loss_scale(state))
      (Array([-0.5, -2. ], dtype=float32), 1024.0)
      >>> updates, state = tx.update(jnp.array([jnp.inf, 1.0]), state, params)
      >>> updates, bool(state.skipped), float(optaxclip.current_loss_scale(state))
      (Array([0., 0.], dtype=float32), True, 512.0)

    References:
      Micikevicius et al., 2018, Mixed Precision Training, https://arxiv.org/abs/1710.03740
    """
    where = "loss_scale"
    _check_options(
        initial_scale, growth_factor, backoff_factor, growth_interval, min_scale, max_scale, where
    )
    _distributed.normalize_axis_name(axis_name, where)
    _checks.check_name(name, where)
    label = Name(name or where)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> LossScaleState:
        # Distinct arrays per field, so that the state can be donated to a jitted step.
        return LossScaleState(
            **_pipeline.initial_fields(),
            skipped=jnp.zeros([], bool),
            skip_count=jnp.zeros([], jnp.int32),
            loss_scale=_pipeline.as_scalar(initial_scale, jnp.float32),
            growth_tracker=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
            name=label,
        )

    def update_fn(
        updates: Any, state: LossScaleState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LossScaleState]:
        scale = state.loss_scale.astype(jnp.float32)
        view = _tree.view(updates, where)
        plan = _distributed.plan(view, axis_name, replicated, where)
        # Unscaling multiplies by 1/S: XLA turns a division by a scalar into that product
        # anyway, and torch's `unscale_` is the same product, so the two agree bit for
        # bit (for the power-of-two scales of the defaults it is the exact quotient).
        # The unscaled leaves are measured as the inner transform will see them, in
        # their own dtype, so a value that overflows only once unscaled is caught too.
        # XLA:GPU fuses the product into the norm's read of the leaf; XLA:CPU, which
        # does not fuse producers into its reductions, writes the unscaled leaves once.
        unscaled = [_unscale(x, scale) for x in view.arrays]
        norms = _measure.group_norms(
            unscaled,
            [0] * len(unscaled),
            1,
            2.0,
            view.dtype,
            plan.counted,
            plan.reducer(2.0),
            masked=False,
        )
        count = norms.nonfinite[0]
        finite = count == 0

        candidate, candidate_state = inner.update(
            view.rebuild(unscaled), state.inner_state, params, **extra_args
        )
        new_updates = jax.tree.map(lambda u: _keep_or_zero(finite, u), candidate)
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), candidate_state, state.inner_state
        )

        f32 = jnp.float32
        backed_off = jnp.maximum(
            scale * _pipeline.as_scalar(backoff_factor, f32), _pipeline.as_scalar(min_scale, f32)
        )
        grown = scale * _pipeline.as_scalar(growth_factor, f32)
        grown = jnp.minimum(
            jnp.where(jnp.isfinite(grown), grown, scale), _pipeline.as_scalar(max_scale, f32)
        )
        successful = optax.safe_increment(state.growth_tracker)
        grow = successful >= jnp.asarray(growth_interval)
        new_scale = jnp.where(finite, jnp.where(grow, grown, scale), backed_off)
        tracker = jnp.where(finite & ~grow, successful, 0)
        return new_updates, state._replace(
            grad_norm=norms.norm[0].astype(f32),
            clipped=~finite,
            nonfinite=count,
            skipped=~finite,
            skip_count=jnp.where(finite, state.skip_count, optax.safe_increment(state.skip_count)),
            loss_scale=new_scale,
            growth_tracker=tracker.astype(jnp.int32),
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def current_loss_scale(opt_state: Any) -> jax.Array:
    """The loss scale S to multiply the next loss with, from anywhere in an optimizer state.

    Searches the state as `optaxclip.stats` does: chains, `optax.inject_hyperparams`,
    `optax.MultiSteps`, `optax.masked`, `optax.partition` and `flax.nnx.Optimizer`
    (pass the optimizer or its `opt_state`).

    Args:
      opt_state: an optimizer state holding one `loss_scale` state, or an object with
        an `opt_state` attribute.

    Returns:
      S, a float32 scalar.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optax.chain(optax.identity(), optaxclip.loss_scale(optax.adam(1e-3)))
      >>> float(optaxclip.current_loss_scale(tx.init(jnp.zeros(3))))
      32768.0
    """
    if not isinstance(opt_state, tuple) and hasattr(opt_state, "opt_state"):
        opt_state = opt_state.opt_state
    found = [s for s in _stats._find(opt_state) if isinstance(s, LossScaleState)]
    if not found:
        raise ValueError(
            "current_loss_scale: no `loss_scale` state in this optimizer state. Wrap the "
            "optimizer, e.g. `optaxclip.loss_scale(optax.adam(1e-3))`, and pass the state "
            "its `init`/`update` returned (or the `flax.nnx.Optimizer`)."
        )
    if len(found) > 1:
        names = ", ".join(repr(s.name.value) for s in found)
        raise ValueError(
            f"current_loss_scale: {len(found)} `loss_scale` states found ({names}); one loss "
            "has one scale. Pass the part of the state that holds the one you mean."
        )
    return jnp.asarray(_stats._value(found[0].loss_scale)).astype(jnp.float32)
