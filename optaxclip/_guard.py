"""`guard`: skip bad steps before they reach the optimizer, keeping its state intact."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _checks, _distributed, _measure, _pipeline, _tree
from optaxclip._pipeline import Name

# The extra arguments of `update` that carry the step's loss, in the order they are read.
LOSS_ARGS = ("value", "loss")


class GuardState(NamedTuple):
    """State of `guard`.

    Attributes:
      grad_norm: the global L2 norm of the incoming updates this step (float32).
      clipped: whether this step changed the updates (it was skipped).
      nonfinite: the number of non-finite elements in this step's updates (int32).
      skipped: whether this step was skipped (all-zero updates, inner state kept).
      skip_count: the number of skipped steps so far (int32).
      skip_nonfinite: skipped steps with a non-finite element or loss (int32 total).
      skip_over_max: skipped steps whose norm exceeded `max_norm` (int32 total).
      skip_norm_spike: skipped steps whose norm spiked (int32 total).
      skip_loss_spike: skipped steps whose loss spiked (int32 total). A skipped step
        counts once, under the first of these four reasons that applies.
      forced_count: the number of bad steps applied because of `max_consecutive` (int32).
      loss: the loss of this step (float32; NaN when none was given).
      consecutive: the number of bad steps in a row just before this one (int32).
      mean: μ, the EMA of the norms fed to the statistics (float32).
      var: σ² = m₂ − μ², with m₂ the EMA of the squared norms fed, kept in the
        cancellation-free form σ² ← ασ² + α(1−α)(x − μ)², equal to it in exact arithmetic.
      norm_steps: the number of steps that fed the norm statistics (the warm-up count, int32).
      loss_mean: μ_L, the EMA of the losses fed to the loss statistics (float32).
      loss_var: σ_L², kept in the same form as `var`.
      loss_steps: the number of steps that fed the loss statistics (int32).
      inner_state: the state of the wrapped transform.
      name: the guard's name (static).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    skipped: jax.Array
    skip_count: jax.Array
    skip_nonfinite: jax.Array
    skip_over_max: jax.Array
    skip_norm_spike: jax.Array
    skip_loss_spike: jax.Array
    forced_count: jax.Array
    loss: jax.Array
    consecutive: jax.Array
    mean: jax.Array
    var: jax.Array
    norm_steps: jax.Array
    loss_mean: jax.Array
    loss_var: jax.Array
    loss_steps: jax.Array
    inner_state: Any
    name: Name


class _Stats(NamedTuple):
    mean: jax.Array
    var: jax.Array
    steps: jax.Array


def _keep_or_zero(keep: jax.Array, x: Any) -> Any:
    if x.dtype == jax.dtypes.float0:
        return x
    return jnp.where(keep, x, jnp.zeros_like(x))


def _count_if(flag: jax.Array, count: jax.Array) -> jax.Array:
    return jnp.where(flag, optax.safe_increment(count), count)


def _spike(x: jax.Array, stats: _Stats, z: Any, warmup_steps: Any) -> tuple[jax.Array, jax.Array]:
    """Whether x spikes above the statistics, and its excess over μ to feed them.

    The excess is x − μ, capped at z·σ on a spike: feeding the capped value rather
    than nothing lets a lasting change of level pull μ and σ after it, while one
    spike moves them no more than a value on the threshold would. It is computed
    as a difference, not as (μ + z·σ) − μ, so a small σ survives float32.
    """
    sigma = jnp.sqrt(jnp.maximum(stats.var, 0.0))
    limit = jnp.asarray(z).astype(jnp.float32) * sigma
    excess = x - stats.mean
    # Spike checks need statistics: at least one step has fed them, whatever the warm-up.
    warm = stats.steps >= jnp.maximum(jnp.asarray(warmup_steps), 1)
    spike = warm & (excess > limit)
    return spike, jnp.where(spike, limit, excess)


def _feed(stats: _Stats, feed: jax.Array, x: jax.Array, excess: jax.Array, alpha: Any) -> _Stats:
    """The EMA step on μ and σ² = m₂ − μ² for a fed value x = μ + excess.

    The first value fed sets μ = x, m₂ = x² (σ² = 0). After it, μ ← αμ + (1−α)x and
    m₂ ← αm₂ + (1−α)x², which for σ² is σ² ← ασ² + α(1−α)(x − μ)²: that form has no
    cancellation, so a σ far below μ (steady norms) stays exact in float32.
    """
    a = jnp.asarray(alpha).astype(jnp.float32)
    first = stats.steps == 0
    mean = jnp.where(first, x, stats.mean + (1 - a) * excess)
    var = jnp.where(first, 0.0, a * stats.var + a * (1 - a) * jnp.square(excess))
    return _Stats(
        mean=jnp.where(feed, mean, stats.mean),
        var=jnp.where(feed, var, stats.var),
        steps=_count_if(feed, stats.steps),
    )


def _read_loss(extra_args: dict[str, Any], required: bool, where: str) -> jax.Array | None:
    """The step's loss from the extra arguments (`value` first), checked at trace time."""
    given = [extra_args[k] for k in LOSS_ARGS if extra_args.get(k) is not None]
    if not given:
        if required:
            raise ValueError(
                f"{where}: `loss_z_threshold` is set, so `update` needs this step's loss: pass "
                "it as the extra argument `value` (optax's name for it; "
                "`flax.nnx.Optimizer.update(model, grads, value=loss)` forwards it) or `loss`, "
                "e.g. `tx.update(grads, state, params, value=loss)`."
            )
        return None
    loss = jnp.asarray(given[0])
    if loss.ndim != 0:
        raise ValueError(
            f"{where}: the loss (extra argument `value` or `loss`) must be a scalar, got shape "
            f"{loss.shape}. Pass the mean loss of the step."
        )
    stray = sorted(_measure.varying_axes(loss))
    if stray:
        raise ValueError(
            f"{where}: the loss varies over mesh axis {stray[0]!r}, so each device would decide "
            "on its own loss. Pass the loss of the whole step, the same on every device: "
            f"`jax.lax.pmean(loss, {stray[0]!r})`."
        )
    if not jnp.issubdtype(loss.dtype, jnp.floating) and not jnp.issubdtype(loss.dtype, jnp.integer):
        raise TypeError(f"{where}: the loss must be a real number, got dtype {loss.dtype}.")
    return loss.astype(jnp.float32)


def guard(
    inner: optax.GradientTransformation,
    *,
    nonfinite: bool = True,
    max_norm: Any = None,
    z_threshold: Any = None,
    loss_z_threshold: Any = None,
    alpha: Any = 0.99,
    warmup_steps: Any = 64,
    max_consecutive: int | None = None,
    axis_name: Any = None,
    replicated: Any = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips bad steps: all-zero updates, and the inner optimizer's state left untouched.

    The incoming global L2 norm n is measured once; the step's loss L is read
    from the extra argument `value` (optax's name for it) or `loss`. A step is
    *bad* when:

    - `nonfinite` and it has a NaN or inf element, or L is not finite;
    - n > `max_norm`;
    - its norm spikes: after `warmup_steps` steps that fed the norm statistics,
      n − μ > z·σ with z = `z_threshold`;
    - its loss spikes: after `warmup_steps` steps that fed the loss statistics,
      L − μ_L > z_L·σ_L with z_L = `loss_z_threshold` (only a rise is a spike).

    The statistics (μ, m₂ for the norm; μ_L, m₂_L for the loss, and σ =
    sqrt(max(m₂ − μ², 0))) are set to x and x² by the first step that feeds
    them, then follow μ ← αμ + (1−α)x, m₂ ← αm₂ + (1−α)x². A good or a forced
    step feeds its own value; a spike step feeds its value capped at the spike
    threshold μ + z·σ for the statistic that spiked (the other one gets its own
    value), so an isolated spike barely moves them while a lasting change of
    level is learned within tens of steps; a non-finite step or one over
    `max_norm` feeds nothing. So guard never stalls: after a permanent ×10 rise
    of the norm (5% noise, α = 0.99, z = 4) it applies steps again 52–56 steps
    later. Right after the first steps of training, whose norms and losses are
    often far above the later ones, σ is large until α forgets them.

    The inner transform's results are kept only for applied steps, so Adam's
    moments never see a NaN or a spike. After `max_consecutive` bad steps in a
    row the next one is applied regardless (counted in `forced_count`, not in
    `skip_count`). Each skipped step is counted once, under its first reason in
    the order above: `skip_nonfinite`, `skip_over_max`, `skip_norm_spike`,
    `skip_loss_spike`.

    Under `axis_name` the norm and the non-finite count come from one collective,
    so every device takes the same decision; the loss takes no collective and
    must already be the same on every device (the usual `jax.lax.pmean`-ed loss
    is; under `shard_map` a loss that varies over a mesh axis is refused).

    Args:
      inner: the transform to protect (typically the whole optimizer).
      nonfinite: skip steps with a NaN or inf element or loss.
      max_norm: skip steps whose norm exceeds this (default: no limit).
      z_threshold: skip norm spikes more than this many σ above μ (default: off).
      loss_z_threshold: skip loss spikes more than this many σ_L above μ_L
        (default: off). `update` must then be given the loss, as `value=` or `loss=`.
      alpha: the EMA factor of the statistics.
      warmup_steps: steps that feed a statistic before its spike checks start.
      max_consecutive: apply a step after this many skips in a row (default: never).
      axis_name: under `shard_map`/`pmap`, the mesh axis (or axes) of the updates,
        so every device takes the same decision.
      replicated: with `axis_name`, which leaves are replicated.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optaxclip.guard(optax.adam(0.1), loss_z_threshold=4.0, warmup_steps=2)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([jnp.nan, 1.0]), state, params, value=0.5)
      >>> updates, bool(state.skipped), int(state.skip_nonfinite)
      (Array([0., 0.], dtype=float32), True, 1)
      >>> for loss in (0.5, 0.52, 0.49, 5.0):
      ...     _, state = tx.update(jnp.array([0.6, 0.8]), state, params, value=loss)
      >>> bool(state.skipped), int(state.skip_loss_spike), int(state.skip_count)
      (True, 1, 2)
    """
    where = "guard"
    if not isinstance(nonfinite, bool):
        raise TypeError(f"{where}: `nonfinite` must be a bool, got {nonfinite!r}.")
    if max_norm is not None:
        _checks.check_threshold(max_norm, "max_norm", where)
    if z_threshold is not None:
        _checks.check_threshold(z_threshold, "z_threshold", where)
    if loss_z_threshold is not None:
        _checks.check_threshold(loss_z_threshold, "loss_z_threshold", where)
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
        def count() -> jax.Array:
            return jnp.zeros([], jnp.int32)

        def real() -> jax.Array:
            return jnp.zeros([], jnp.float32)

        return GuardState(
            **_pipeline.initial_fields(),
            skipped=jnp.zeros([], bool),
            skip_count=count(),
            skip_nonfinite=count(),
            skip_over_max=count(),
            skip_norm_spike=count(),
            skip_loss_spike=count(),
            forced_count=count(),
            loss=jnp.full([], jnp.nan, jnp.float32),
            consecutive=count(),
            mean=real(),
            var=real(),
            norm_steps=count(),
            loss_mean=real(),
            loss_var=real(),
            loss_steps=count(),
            inner_state=inner.init(params),
            name=label,
        )

    def update_fn(
        updates: Any, state: GuardState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, GuardState]:
        loss = _read_loss(extra_args, loss_z_threshold is not None, where)
        view = _tree.view(updates, where)
        plan = _distributed.plan(view, axis_name, replicated, where)
        norms = _measure.group_norms(
            view.arrays,
            [0] * len(view.arrays),
            1,
            2.0,
            view.dtype,
            plan.counted,
            plan.reducer(2.0),
            masked=False,
        )
        norm = norms.norm[0].astype(jnp.float32)
        count = norms.nonfinite[0]

        # Decide: every check is a scalar `where`, so the step holds no conditional.
        finite = (count == 0) & jnp.isfinite(norm)
        if loss is not None:
            finite &= jnp.isfinite(loss)
        no = jnp.bool_(False)
        bad_nonfinite = ~finite if nonfinite else no
        over_max = no if max_norm is None else norm > jnp.asarray(max_norm).astype(jnp.float32)
        norm_stats = _Stats(state.mean, state.var, state.norm_steps)
        loss_stats = _Stats(state.loss_mean, state.loss_var, state.loss_steps)
        norm_spike, norm_excess = no, norm - state.mean
        if z_threshold is not None:
            norm_spike, norm_excess = _spike(norm, norm_stats, z_threshold, warmup_steps)
        loss_spike = no
        if loss is not None:
            loss_excess = loss - state.loss_mean
            if loss_z_threshold is not None:
                loss_spike, loss_excess = _spike(loss, loss_stats, loss_z_threshold, warmup_steps)
        bad = bad_nonfinite | over_max | norm_spike | loss_spike
        forced = no
        if max_consecutive is not None:
            forced = bad & (state.consecutive >= max_consecutive)
        apply = ~bad | forced
        skip = ~apply
        # A forced step is applied as it is, so it feeds its own value, uncapped.
        feed = finite & ~over_max
        norm_stats = _feed(
            norm_stats, feed, norm, jnp.where(forced, norm - state.mean, norm_excess), alpha
        )
        if loss is not None:
            loss_stats = _feed(
                loss_stats,
                feed,
                loss,
                jnp.where(forced, loss - state.loss_mean, loss_excess),
                alpha,
            )

        # The inner update is computed every step and its results are kept only when the
        # step is applied: a skipped step's output is zeros and the inner state is the old
        # one, bit for bit. Selecting, rather than branching with lax.cond, lets XLA fuse
        # the choice into the optimizer's own element-wise pass instead of copying its state.
        candidate, candidate_state = inner.update(updates, state.inner_state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: _keep_or_zero(apply, u), candidate)
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(apply, new, old), candidate_state, state.inner_state
        )
        # The first reason that applies, in the documented order.
        first_nonfinite = skip & bad_nonfinite
        first_over_max = skip & ~bad_nonfinite & over_max
        first_norm_spike = skip & ~bad_nonfinite & ~over_max & norm_spike
        first_loss_spike = skip & ~bad_nonfinite & ~over_max & ~norm_spike & loss_spike
        return new_updates, state._replace(
            grad_norm=norm,
            clipped=skip,
            nonfinite=count,
            skipped=skip,
            skip_count=_count_if(skip, state.skip_count),
            skip_nonfinite=_count_if(first_nonfinite, state.skip_nonfinite),
            skip_over_max=_count_if(first_over_max, state.skip_over_max),
            skip_norm_spike=_count_if(first_norm_spike, state.skip_norm_spike),
            skip_loss_spike=_count_if(first_loss_spike, state.skip_loss_spike),
            forced_count=_count_if(forced, state.forced_count),
            loss=jnp.full([], jnp.nan, jnp.float32) if loss is None else loss,
            consecutive=jnp.where(apply, 0, optax.safe_increment(state.consecutive)),
            mean=norm_stats.mean,
            var=norm_stats.var,
            norm_steps=norm_stats.steps,
            loss_mean=loss_stats.mean,
            loss_var=loss_stats.var,
            loss_steps=loss_stats.steps,
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
