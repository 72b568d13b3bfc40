"""`guard`: skip bad steps before they reach the optimizer, keeping its state intact."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _checks, _distributed, _measure, _pipeline, _tree
from optaxclip._pipeline import Name


class GuardState(NamedTuple):
    """State of `guard`.

    Attributes:
      grad_norm: the global L2 norm of the incoming updates this step (float32).
      clipped: whether this step changed the updates (it was skipped).
      nonfinite: the number of non-finite elements this step (int32).
      skipped: whether this step was skipped (all-zero updates, inner state kept).
      skip_count: the number of skipped steps so far (int32).
      forced_count: the number of bad steps applied because of `max_consecutive` (int32).
      consecutive: the number of bad steps in a row just before this one (int32).
      good_steps: the number of good steps so far (int32).
      mean: μ, the EMA of the norm of good steps.
      var: σ² = m₂ − μ², with m₂ the EMA of the squared norm of good steps, kept in the
        cancellation-free form σ² ← ασ² + α(1−α)(n − μ)², equal to it in exact arithmetic.
      inner_state: the state of the wrapped transform.
      name: the guard's name (static).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    skipped: jax.Array
    skip_count: jax.Array
    forced_count: jax.Array
    consecutive: jax.Array
    good_steps: jax.Array
    mean: jax.Array
    var: jax.Array
    inner_state: Any
    name: Name


def _keep_or_zero(keep: jax.Array, x: Any) -> Any:
    if x.dtype == jax.dtypes.float0:
        return x
    return jnp.where(keep, x, jnp.zeros_like(x))


def guard(
    inner: optax.GradientTransformation,
    *,
    nonfinite: bool = True,
    max_norm: Any = None,
    z_threshold: Any = None,
    alpha: Any = 0.99,
    warmup_steps: Any = 64,
    max_consecutive: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips bad steps: all-zero updates, and the inner optimizer's state left untouched.

    The incoming global L2 norm n is measured once. A step is *bad* when it has
    a non-finite element (if `nonfinite`), when n > `max_norm`, or, after
    `warmup_steps` good steps, when it spikes: n − μ > `z_threshold` · σ, where
    μ and m₂ start at n and n² on the first good step and then follow
    μ ← αμ + (1−α)n, m₂ ← αm₂ + (1−α)n² after each good step, and
    σ = sqrt(max(m₂ − μ², 0)). The inner transform never sees a bad step, so
    Adam's moments are never fed a NaN or a spike. After `max_consecutive` bad
    steps in a row the next one is applied regardless (counted in
    `forced_count`); being bad, it does not move μ and m₂. Spike detection needs
    at least one good step, whatever `warmup_steps`.

    Args:
      inner: the transform to protect (typically the whole optimizer).
      nonfinite: skip steps with a NaN or inf element.
      max_norm: skip steps whose norm exceeds this (default: no limit).
      z_threshold: skip spikes more than this many σ above μ (default: off).
      alpha: the EMA factor of μ and m₂ (m₂ enters through σ²).
      warmup_steps: good steps before spike detection starts.
      max_consecutive: apply a step after this many skips in a row (default: never).
      axis_name: under `shard_map`/`pmap`, the mesh axis (or axes) of the updates,
        so every device takes the same decision.
      replicated: with `axis_name`, which leaves are replicated.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optaxclip.guard(optax.adam(0.1))
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([jnp.nan, 1.0]), state, params)
      >>> updates, bool(state.skipped), int(state.skip_count)
      (Array([0., 0.], dtype=float32), True, 1)
    """
    where = "guard"
    if not isinstance(nonfinite, bool):
        raise TypeError(f"{where}: `nonfinite` must be a bool, got {nonfinite!r}.")
    if max_norm is not None:
        _checks.check_threshold(max_norm, "max_norm", where)
    if z_threshold is not None:
        _checks.check_threshold(z_threshold, "z_threshold", where)
    _checks.check_threshold(alpha, "alpha", where)
    _checks.check_threshold(warmup_steps, "warmup_steps", where)
    if max_consecutive is not None:
        _checks.check_static(max_consecutive, "max_consecutive", where)
        _checks.check_threshold(max_consecutive, "max_consecutive", where)
    _distributed.normalize_axis_name(axis_name, where)
    _checks.check_name(name, where)
    label = Name(name or where)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> GuardState:
        # Distinct arrays per field, so that the state can be donated to a jitted step.
        return GuardState(
            **_pipeline.initial_fields(),
            skipped=jnp.zeros([], bool),
            skip_count=jnp.zeros([], jnp.int32),
            forced_count=jnp.zeros([], jnp.int32),
            consecutive=jnp.zeros([], jnp.int32),
            good_steps=jnp.zeros([], jnp.int32),
            mean=jnp.zeros([], jnp.float32),
            var=jnp.zeros([], jnp.float32),
            inner_state=inner.init(params),
            name=label,
        )

    def update_fn(
        updates: Any, state: GuardState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, GuardState]:
        view = _tree.view(updates, where)
        plan = _distributed.plan(view, axis_name, replicated, where)
        norms = _measure.group_norms(
            view.arrays, [0] * len(view.arrays), 1, 2.0, view.dtype, plan.counted, plan.reducer(2.0)
        )
        norm = norms.norm[0].astype(jnp.float32)
        count = norms.nonfinite[0]
        bad = jnp.bool_(False)
        if nonfinite:
            bad |= count > 0
        if max_norm is not None:
            bad |= norm > jnp.asarray(max_norm).astype(jnp.float32)
        if z_threshold is not None:
            sigma = jnp.sqrt(jnp.maximum(state.var, 0.0))
            warm = state.good_steps >= jnp.maximum(jnp.asarray(warmup_steps), 1)
            spike = norm - state.mean > jnp.asarray(z_threshold).astype(jnp.float32) * sigma
            bad |= warm & spike
        forced = jnp.bool_(False)
        if max_consecutive is not None:
            forced = bad & (state.consecutive >= max_consecutive)
        apply = ~bad | forced

        # The inner update is computed every step and its results are kept only when the
        # step is applied: a skipped step's output is zeros and the inner state is the old
        # one, bit for bit. Selecting, rather than branching with lax.cond, lets XLA fuse
        # the choice into the optimizer's own element-wise pass instead of copying its state.
        candidate, candidate_state = inner.update(updates, state.inner_state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: _keep_or_zero(apply, u), candidate)
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(apply, new, old), candidate_state, state.inner_state
        )
        learn = ~bad & jnp.isfinite(norm)
        a = jnp.asarray(alpha).astype(jnp.float32)
        first = state.good_steps == 0
        mean = jnp.where(first, norm, a * state.mean + (1 - a) * norm)
        var = jnp.where(first, 0.0, a * state.var + a * (1 - a) * jnp.square(norm - state.mean))
        return new_updates, state._replace(
            grad_norm=norm,
            clipped=~apply,
            nonfinite=count,
            skipped=~apply,
            skip_count=jnp.where(apply, state.skip_count, optax.safe_increment(state.skip_count)),
            forced_count=jnp.where(
                forced, optax.safe_increment(state.forced_count), state.forced_count
            ),
            consecutive=jnp.where(apply, 0, optax.safe_increment(state.consecutive)),
            good_steps=jnp.where(learn, optax.safe_increment(state.good_steps), state.good_steps),
            mean=jnp.where(learn, mean, state.mean),
            var=jnp.where(learn, var, state.var),
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
