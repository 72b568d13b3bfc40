"""Adaptive clipping policies: thresholds learned from the stream of gradient norms.

Each policy is a decide step, pure scalar maths on the measured norm and its
statistics. The shared machinery around it measures the norm once (across
devices when `axis_name` is given), applies the scale, and commits the new
statistics only when the step's norm is finite, so a NaN or inf step leaves
them, counters included, exactly as if it had not happened.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _checks, _distributed, _measure, _percentile, _pipeline, _tree
from optaxclip._pipeline import Name

# The epsilon of ZClip's z-score, as in the paper's reference implementation.
ZCLIP_EPS = 1e-6


class AutoClipState(NamedTuple):
    """State of `autoclip`.

    Attributes:
      grad_norm: the global norm measured this step (float32).
      clipped: whether this step changed the updates.
      nonfinite: the number of non-finite elements this step (int32).
      scale: the factor the updates were multiplied by this step (float32), so the
        post-clip norm is `grad_norm * scale`; 1 when nothing was scaled (a non-finite
        norm under `nonfinite="propagate"` included), 0 on a step `"skip"` zeroed.
      threshold: the percentile of the norm history used as the threshold this step.
      history: ring buffer of the last `history_size` finite global norms.
      step_count: the number of finite norms seen (int32).
      name: the policy's name (static).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    scale: jax.Array
    threshold: jax.Array
    history: jax.Array
    step_count: jax.Array
    name: Name


class ZClipState(NamedTuple):
    """State of `zclip`.

    Attributes:
      grad_norm: the global norm measured this step (float32).
      clipped: whether this step changed the updates.
      nonfinite: the number of non-finite elements this step (int32).
      scale: the factor the updates were multiplied by this step (float32), so the
        post-clip norm is `grad_norm * scale`; 1 when nothing was scaled (a non-finite
        norm under `nonfinite="propagate"` included), 0 on a step `"skip"` zeroed.
      threshold: the effective threshold this step (the norm itself when no
        spike was detected, capped by `max_norm` when set).
      mean: μ, the EMA of the (clipped) norm; during warm-up the running mean.
      var: σ², the EMA of its variance; during warm-up the running population variance.
      step_count: the number of finite norms seen (int32).
      name: the policy's name (static).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    scale: jax.Array
    threshold: jax.Array
    mean: jax.Array
    var: jax.Array
    step_count: jax.Array
    name: Name


class QuantileClipState(NamedTuple):
    """State of `quantile_clip`.

    Attributes:
      grad_norm: the global norm measured this step (float32).
      clipped: whether this step changed the updates.
      nonfinite: the number of non-finite elements this step (int32).
      scale: the factor the updates were multiplied by this step (float32), so the
        post-clip norm is `grad_norm * scale`; 1 when nothing was scaled (a non-finite
        norm under `nonfinite="propagate"` included), 0 on a step `"skip"` zeroed.
      threshold: C_t, the clipping norm used this step.
      clip_norm: C_{t+1}, the clipping norm for the next step; it tracks the target quantile.
      step_count: the number of finite norms seen (int32).
      name: the policy's name (static).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    scale: jax.Array
    threshold: jax.Array
    clip_norm: jax.Array
    step_count: jax.Array
    name: Name


class AdaGCState(NamedTuple):
    """State of `adagc`.

    Attributes:
      grad_norm: the global norm measured this step (float32).
      clipped: whether this step changed the updates.
      nonfinite: the number of non-finite elements this step (int32).
      scale: the smallest factor a leaf was multiplied by this step (float32); 1
        when nothing was scaled, 0 on a step `nonfinite="skip"` zeroed.
      threshold: the global norm the updates were allowed this step: `warmup_max_norm`
        during warm-up, then the norm of the per-leaf limits `relative * gamma`.
      gamma: γ, one EMA of the clipped norm per leaf, in flattening order.
      step_count: the number of finite steps seen (int32).
      name: the policy's name (static).
    """

    grad_norm: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    scale: jax.Array
    threshold: jax.Array
    gamma: jax.Array
    step_count: jax.Array
    name: Name


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)


Decide = Callable[[jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


def _global_policy(
    where: str,
    name: str | None,
    initial: Callable[[], Any],
    decide: Decide,
    axis_name: Any,
    replicated: Any,
    nonfinite: _checks.NonFinite,
) -> optax.GradientTransformationExtraArgs:
    """Measure, reduce, decide, apply for the policies that threshold the global L2 norm.

    `decide(norm, state)` returns the threshold for this step and the candidate
    statistics (state fields); they are committed only when the norm is finite.
    """
    mode = _checks.check_nonfinite(nonfinite, where)
    _distributed.normalize_axis_name(axis_name, where)
    _checks.check_name(name, where)
    label = Name(name or where)

    def init_fn(params: Any) -> Any:
        del params
        return initial()._replace(name=label)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
        del params, extra_args
        view = _tree.view(updates, where)
        plan = _distributed.plan(view, axis_name, replicated, where)
        segments = [0] * len(view.arrays)
        norms = _measure.group_norms(
            view.arrays,
            segments,
            1,
            2.0,
            view.dtype,
            plan.counted,
            plan.reducer(2.0),
            masked=mode == "zero",
        )
        used = (norms.finite if mode == "zero" else norms.norm)[0].astype(jnp.float32)
        threshold, candidate = decide(used, state)
        # Decide in float32, where the statistics live: a threshold that is not below
        # the float32 norm (e.g. the norm itself) does not clip a float64 tree either.
        limit = jnp.where(threshold >= used, jnp.inf, threshold).astype(view.dtype)
        decision = _pipeline.clip_groups(view, norms, segments, limit[None], 2.0, mode)
        stats = _select(
            jnp.isfinite(norms.norm[0]), candidate, {k: getattr(state, k) for k in candidate}
        )
        new_state = state._replace(
            grad_norm=decision.grad_norm,
            clipped=decision.clipped,
            nonfinite=decision.nonfinite,
            scale=decision.scale,
            threshold=threshold,
            **stats,
        )
        return decision.updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _f32(value: Any) -> jax.Array:
    return jnp.asarray(value).astype(jnp.float32)


def _base_fields() -> dict[str, jax.Array]:
    return {**_pipeline.clip_fields(), "threshold": jnp.full([], jnp.inf, jnp.float32)}


def autoclip(
    percentile: Any = 10.0,
    *,
    history_size: int = 1000,
    axis_name: Any = None,
    replicated: Any = None,
    nonfinite: _checks.NonFinite = "propagate",
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AutoClip: clip to a percentile of the global norms seen so far.

    The threshold for step t is the `percentile` (NumPy's linear interpolation)
    of the finite global L2 norms of the last `history_size` steps, the current
    one included, kept in a fixed-size ring buffer (jit-friendly). Scale-free:
    the same decisions at any loss scale.

    Args:
      percentile: the percentile in [0, 100] of past norms to clip to.
      history_size: how many past norms to keep (fixes the state's shape: name it
        in `static_args` under `optax.inject_hyperparams`).
      axis_name: under `shard_map`/`pmap`, the mesh axis (or axes) of the updates.
      replicated: with `axis_name`, which leaves are replicated.
      nonfinite: `"propagate"`, `"zero"` or `"skip"`, as in `clip_by_global_norm`.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.autoclip(50.0, history_size=8)
      >>> state = tx.init(None)
      >>> for g in (1.0, 3.0, 100.0):
      ...     updates, state = tx.update(jnp.array([g]), state)
      >>> updates, float(state.threshold)
      (Array([3.], dtype=float32), 3.0)

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020.
    """
    where = "autoclip"
    _checks.check_static(history_size, "history_size", where)
    if not isinstance(history_size, int) or isinstance(history_size, bool) or history_size < 1:
        raise ValueError(f"{where}: `history_size` must be a positive int, got {history_size!r}.")
    if history_size > _percentile.MAX_SIZE:
        raise ValueError(
            f"{where}: `history_size` must be at most 2**24 = {_percentile.MAX_SIZE}, got "
            f"{history_size}: the percentile's position is exact only up to that size."
        )
    _checks.check_threshold(percentile, "percentile", where)
    if not _checks.is_traced(percentile) and float(percentile) > 100:
        raise ValueError(f"{where}: `percentile` must be in [0, 100], got {percentile}.")

    def initial() -> AutoClipState:
        return AutoClipState(
            **_base_fields(),
            history=jnp.zeros([history_size], jnp.float32),
            step_count=jnp.zeros([], jnp.int32),
            name=Name(where),
        )

    def decide(norm: jax.Array, state: AutoClipState) -> tuple[jax.Array, dict[str, jax.Array]]:
        history = state.history.at[state.step_count % history_size].set(norm)
        valid = jnp.minimum(state.step_count + 1, history_size)
        ordered = jnp.sort(jnp.where(jnp.arange(history_size) < valid, history, jnp.inf))
        threshold = _percentile.percentile(ordered, valid, percentile)
        return threshold, {"history": history, "step_count": optax.safe_increment(state.step_count)}

    return _global_policy(where, name, initial, decide, axis_name, replicated, nonfinite)


def zclip(
    *,
    alpha: Any = 0.97,
    z_threshold: Any = 2.5,
    warmup_steps: Any = 25,
    max_norm: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
    nonfinite: _checks.NonFinite = "propagate",
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ZClip: clip gradient-norm spikes detected by a z-score against EMA statistics.

    With n_t the global L2 norm and μ, σ² the state: during the first
    `warmup_steps` finite norms nothing is clipped (but by `max_norm` if set),
    and μ, σ² become their mean and population variance. Then

    .. math::
      z = \frac{n_t - \mu}{\sigma + \epsilon}, \quad
      \tau = \begin{cases} \mu + z_{thr}^2 \sigma / z & z > z_{thr} \\ n_t & \text{else}
      \end{cases}

    updates scale by min(1, min(τ, max_norm) / n_t), and with x = τ,
    μ ← αμ + (1−α)x, σ² ← ασ² + (1−α)(x − μ)² (with the new μ). Scale-free
    unless `max_norm` is set.

    Args:
      alpha: the EMA factor of μ and σ².
      z_threshold: the z-score above which a norm is a spike.
      warmup_steps: the number of finite norms that initialise μ and σ².
      max_norm: an optional fixed cap on the threshold (default: none).
      axis_name: under `shard_map`/`pmap`, the mesh axis (or axes) of the updates.
      replicated: with `axis_name`, which leaves are replicated.
      nonfinite: `"propagate"`, `"zero"` or `"skip"`, as in `clip_by_global_norm`.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.zclip(warmup_steps=4)
      >>> state = tx.init(None)
      >>> for g in (1.0, 1.2, 0.8, 1.0, 50.0):
      ...     updates, state = tx.update(jnp.array([g]), state)
      >>> bool(state.clipped), bool(updates[0] < 2.0)
      (True, True)

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025.
    """
    where = "zclip"
    _checks.check_threshold(alpha, "alpha", where)
    _checks.check_threshold(z_threshold, "z_threshold", where)
    _checks.check_threshold(warmup_steps, "warmup_steps", where)
    if not _checks.is_traced(warmup_steps) and float(warmup_steps) < 1:
        raise ValueError(
            f"{where}: `warmup_steps` must be at least 1, got {warmup_steps}: μ and σ start "
            "as the mean and variance of the warm-up norms."
        )
    if max_norm is not None:
        _checks.check_threshold(max_norm, "max_norm", where)

    def initial() -> ZClipState:
        return ZClipState(
            **_base_fields(),
            mean=jnp.zeros([], jnp.float32),
            var=jnp.zeros([], jnp.float32),
            step_count=jnp.zeros([], jnp.int32),
            name=Name(where),
        )

    def decide(norm: jax.Array, state: ZClipState) -> tuple[jax.Array, dict[str, jax.Array]]:
        a, zt = _f32(alpha), _f32(z_threshold)
        warming = state.step_count < jnp.asarray(warmup_steps)
        # Welford's running mean and population variance of the warm-up norms.
        k = (state.step_count + 1).astype(jnp.float32)
        delta = norm - state.mean
        warm_mean = state.mean + delta / k
        warm_var = (state.var * (k - 1) + delta * (norm - warm_mean)) / k
        std = jnp.sqrt(jnp.maximum(state.var, 0.0))
        z = (norm - state.mean) / (std + ZCLIP_EPS)
        spike = z > zt
        adaptive = jnp.where(spike, state.mean + zt * zt * std / jnp.where(spike, z, 1.0), norm)
        ema_mean = a * state.mean + (1 - a) * adaptive
        ema_var = a * state.var + (1 - a) * jnp.square(adaptive - ema_mean)
        threshold = jnp.where(warming, norm, adaptive)
        if max_norm is not None:
            threshold = jnp.minimum(threshold, _f32(max_norm))
        return threshold, {
            "mean": jnp.where(warming, warm_mean, ema_mean),
            "var": jnp.where(warming, warm_var, ema_var),
            "step_count": optax.safe_increment(state.step_count),
        }

    return _global_policy(where, name, initial, decide, axis_name, replicated, nonfinite)


def quantile_clip(
    *,
    target_quantile: Any = 0.5,
    learning_rate: Any = 0.2,
    initial_norm: Any = 0.1,
    axis_name: Any = None,
    replicated: Any = None,
    nonfinite: _checks.NonFinite = "propagate",
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Clip to a streaming estimate of a quantile of the global norm, in O(1) state.

    Updates are clipped to C_t by global norm; then with b_t = 1 if n_t ≤ C_t
    else 0, the geometric update of Andrew et al.

    .. math::
      C_{t+1} = C_t \exp(-\eta\,(b_t - q))

    moves C towards the `target_quantile` q of the norms.

    Args:
      target_quantile: q in [0, 1], the fraction of steps that should go unclipped.
      learning_rate: η, how fast C adapts.
      initial_norm: C_0.
      axis_name: under `shard_map`/`pmap`, the mesh axis (or axes) of the updates.
      replicated: with `axis_name`, which leaves are replicated.
      nonfinite: `"propagate"`, `"zero"` or `"skip"`, as in `clip_by_global_norm`.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.quantile_clip(initial_norm=1.0)
      >>> updates, state = tx.update(jnp.array([3.0, 4.0]), tx.init(None))
      >>> updates, round(float(state.threshold), 6)
      (Array([0.6, 0.8], dtype=float32), 1.0)

    References:
      Andrew et al., `Differentially Private Learning with Adaptive Clipping
      <https://arxiv.org/abs/1905.03871>`_, 2021.
    """
    where = "quantile_clip"
    _checks.check_threshold(target_quantile, "target_quantile", where)
    if not _checks.is_traced(target_quantile) and float(target_quantile) > 1:
        raise ValueError(f"{where}: `target_quantile` must be in [0, 1], got {target_quantile}.")
    _checks.check_threshold(learning_rate, "learning_rate", where)
    _checks.check_threshold(initial_norm, "initial_norm", where)

    def initial() -> QuantileClipState:
        return QuantileClipState(
            **_base_fields(),
            clip_norm=jnp.array(initial_norm, jnp.float32),
            step_count=jnp.zeros([], jnp.int32),
            name=Name(where),
        )

    def decide(norm: jax.Array, state: QuantileClipState) -> tuple[jax.Array, dict[str, jax.Array]]:
        below = (norm <= state.clip_norm).astype(jnp.float32)
        step = -_f32(learning_rate) * (below - _f32(target_quantile))
        return state.clip_norm, {
            "clip_norm": state.clip_norm * jnp.exp(step),
            "step_count": optax.safe_increment(state.step_count),
        }

    return _global_policy(where, name, initial, decide, axis_name, replicated, nonfinite)


def adagc(
    *,
    relative: Any = 1.05,
    beta: Any = 0.98,
    warmup_max_norm: Any = 1.0,
    warmup_steps: Any = 100,
    nonfinite: _checks.NonFinite = "propagate",
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGC: per-leaf thresholds from an EMA of each leaf's clipped norm.

    With n_{t,i} the norm of leaf i, n_t the global norm and γ_i in the state:
    during warm-up (t < `warmup_steps`) every leaf scales by
    min(1, warmup_max_norm / n_t) and γ_i tracks the smallest clipped leaf norm;
    after it

    .. math::
      h_i = \min\left(1, \frac{\lambda \gamma_i}{n_{t,i}}\right), \quad
      \gamma_i \leftarrow \beta \gamma_i + (1 - \beta)\, h_i n_{t,i}

    and leaf i scales by h_i.

    Args:
      relative: λ, how far above its EMA a leaf's norm may go.
      beta: β, the EMA factor of γ.
      warmup_max_norm: the global-norm clip during warm-up.
      warmup_steps: the number of finite steps of warm-up.
      nonfinite: `"propagate"`, `"zero"` or `"skip"`, as in `clip_by_global_norm`.
      name: a name for this transform's entries in `optaxclip.stats`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.adagc(warmup_steps=1)
      >>> params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"a": jnp.array([0.6]), "b": jnp.array([0.8])}, state)
      >>> updates, state = tx.update({"a": jnp.array([6.0]), "b": jnp.array([0.8])}, state)
      >>> updates["a"], updates["b"]
      (Array([0.63], dtype=float32), Array([0.8], dtype=float32))

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language Model
      Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.
    """
    where = "adagc"
    _checks.check_threshold(relative, "relative", where)
    _checks.check_threshold(beta, "beta", where)
    _checks.check_threshold(warmup_max_norm, "warmup_max_norm", where)
    _checks.check_threshold(warmup_steps, "warmup_steps", where)
    mode = _checks.check_nonfinite(nonfinite, where)
    _checks.check_name(name, where)
    label = Name(name or where)

    def init_fn(params: Any) -> AdaGCState:
        leaves = len(_tree.view(params, where, strict=False).active)
        return AdaGCState(
            **_base_fields(),
            gamma=jnp.zeros([leaves], jnp.float32),
            step_count=jnp.zeros([], jnp.int32),
            name=label,
        )

    def update_fn(
        updates: Any, state: AdaGCState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, AdaGCState]:
        del params, extra_args
        view = _tree.view(updates, where)
        _distributed.refuse_unreduced(view, where)
        leaves = len(view.arrays)
        if leaves != state.gamma.shape[0]:
            raise ValueError(
                f"{where}: the updates have {leaves} floating-point leaves but the state was "
                f"initialised for {state.gamma.shape[0]}; init with the parameters' tree."
            )
        segments = list(range(leaves))
        norms = _measure.group_norms(
            view.arrays, segments, leaves, 2.0, view.dtype, masked=mode == "zero"
        )
        used = (norms.finite if mode == "zero" else norms.norm).astype(jnp.float32)
        total = _pipeline.total_norm(norms, 2.0, mode).astype(jnp.float32)
        warming = state.step_count < jnp.asarray(warmup_steps)
        warm_limit = _f32(warmup_max_norm)
        warm_scale = _pipeline.norm_scale(total, warm_limit)
        warm_clipped = warm_scale * used
        warm_gamma = jnp.where(
            state.step_count == 0, warm_clipped, jnp.minimum(state.gamma, warm_clipped)
        )
        limits = _f32(relative) * state.gamma
        h = _pipeline.norm_scale(used, limits)
        ema_gamma = _f32(beta) * state.gamma + (1 - _f32(beta)) * h * used
        scale = jnp.where(warming, warm_scale, h)
        new_updates, clipped, count = _pipeline.apply_scales(view, scale, segments, norms, mode)
        finite = jnp.all(jnp.isfinite(norms.norm))
        gamma = jnp.where(finite, jnp.where(warming, warm_gamma, ema_gamma), state.gamma)
        threshold = jnp.where(warming, warm_limit, _measure.combine(limits, 2.0))
        return new_updates, state._replace(
            grad_norm=total,
            clipped=clipped,
            nonfinite=count,
            scale=_pipeline.smallest_scale(scale, norms, mode),
            threshold=threshold,
            gamma=gamma,
            step_count=jnp.where(finite, optax.safe_increment(state.step_count), state.step_count),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
