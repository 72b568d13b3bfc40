"""`monitor`: what recording the norms costs, against one read of the bytes and against the clip.

Alone, `monitor`'s update (its state only: the updates pass through untouched, and a
jitted identity would time a copy) is compared with the floor, one fused sum of
squares over one flat buffer of the same bytes: the updates' for `monitor` without
params, the updates' and the params' for `monitor` with them. In a step, the chain of
the README (a monitor before the clip, one after adam, both given params) is compared
with clip + adam. All times are net of passing the leaves to the jitted call, as in `norm`.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import optax

import optaxclip
from benchmarks import step
from benchmarks.harness import (
    Compiled,
    MiB,
    RunConfig,
    Session,
    compile_call,
    interleaved,
    log,
    ms,
    print_table,
    timing_fields,
)
from benchmarks.problems import floor_norm, nothing, optimizer_step, random_flat, split_leaves

# issue 13: monitor costs at most one read of the updates (and one of the params); the
# margin is `norm`'s (global_norm at >= 0.8 of the floor's throughput).
MONITOR_MAX_FLOOR_RATIO = 1.25


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of `monitor`.

    Attributes:
      leaves: the leaf counts.
      total_bytes: float32 update bytes (the params are as many), at every leaf count.
    """

    leaves: tuple[int, ...]
    total_bytes: int


def configure(run: RunConfig) -> Sizes:
    if run.quick:
        return Sizes((200,), (64 if run.accelerator else 16) * MiB)
    return Sizes((1, 200), (256 if run.accelerator else 32) * MiB)


def _two_floors(a: Any, b: Any) -> Any:
    return floor_norm(a) + floor_norm(b)


def _monitor_state(grads: Any, state: Any) -> Any:
    return optaxclip.monitor().update(grads, state)[1]


def _monitor_state_with_params(params: Any, grads: Any, state: Any) -> Any:
    return optaxclip.monitor().update(grads, state, params)[1]


def _chain() -> optax.GradientTransformation:
    return optax.chain(
        optaxclip.monitor(name="grads"),
        optaxclip.clip_by_global_norm(1.0),
        optax.adam(1e-3),
        optaxclip.monitor(name="updates"),
    )


def run(session: Session, sizes: Sizes) -> None:
    cfg = session.run
    if getattr(optaxclip, "monitor", None) is None:
        session.note("monitor", "optaxclip.monitor is not available in this version: skipped")
        return
    rows = []
    for leaves in sizes.leaves:
        total = sizes.total_bytes // 4
        per_leaf = total // leaves
        param_flat = random_flat(1, per_leaf * leaves, jnp.float32)
        grad_flat = random_flat(2, per_leaf * leaves, jnp.float32)
        params, grads = split_leaves(param_flat, leaves), split_leaves(grad_flat, leaves)
        size = per_leaf * leaves * 4
        clip = optaxclip.clip_by_global_norm(1.0)
        chain = _chain()
        state = optaxclip.monitor().init(params)
        log(f"monitor {leaves} leaves: compiling")
        built: dict[str, Compiled] = {
            "monitor": compile_call(_monitor_state, grads, state),
            "monitor(params)": compile_call(_monitor_state_with_params, params, grads, state),
            "clip_by_global_norm": compile_call(clip.update, grads, clip.init(params)),
            "floor (updates)": compile_call(floor_norm, grad_flat),
            "floor (updates+params)": compile_call(_two_floors, grad_flat, param_flat),
            "dispatch (updates)": compile_call(nothing, (grads, state), keep_unused=True),
            "dispatch (updates+params)": compile_call(
                nothing, (params, grads, state), keep_unused=True
            ),
            "dispatch (flat)": compile_call(nothing, grad_flat, keep_unused=True),
            "dispatch (2 flat)": compile_call(nothing, (grad_flat, param_flat), keep_unused=True),
            "clip+adam": step.compiled_step(
                session, "optaxclip clip+adam", sizes.total_bytes, leaves, params, grads
            ),
            "monitor+clip+adam+monitor": compile_call(
                optimizer_step(chain), params, grads, chain.init(params)
            ),
        }
        log(f"monitor {leaves} leaves: timing")
        times = interleaved({k: c.call for k, c in built.items()}, cfg.repeats, cfg.min_sample_s)
        median = {k: t.median for k, t in times.items()}
        net = {
            "monitor": median["monitor"] - median["dispatch (updates)"],
            "monitor(params)": median["monitor(params)"] - median["dispatch (updates+params)"],
            "clip_by_global_norm": median["clip_by_global_norm"] - median["dispatch (updates)"],
            "floor (updates)": median["floor (updates)"] - median["dispatch (flat)"],
            "floor (updates+params)": median["floor (updates+params)"]
            - median["dispatch (2 flat)"],
            "clip+adam": median["clip+adam"],
            "monitor+clip+adam+monitor": median["monitor+clip+adam+monitor"],
        }
        floor_of = {
            "monitor": "floor (updates)",
            "monitor(params)": "floor (updates+params)",
            "clip_by_global_norm": "floor (updates)",
        }
        for impl, seconds in net.items():
            t, c = times[impl], built[impl]
            fields: dict[str, Any] = {"net_median_s": seconds}
            if impl in floor_of:
                fields["floor_ratio"] = seconds / max(net[floor_of[impl]], 1e-12)
                fields["clip_ratio"] = seconds / max(net["clip_by_global_norm"], 1e-12)
            if impl == "monitor+clip+adam+monitor":
                fields["overhead"] = seconds / median["clip+adam"] - 1
            session.record(
                "monitor",
                impl,
                leaves=leaves,
                dtype="float32",
                size_bytes=size,
                leaf_shape=[per_leaf],
                **timing_fields(t, c),
                **fields,
            )
            rows.append(
                [
                    impl,
                    leaves,
                    f"{size / MiB:.0f}",
                    ms(t.median),
                    ms(seconds),
                    f"{fields['floor_ratio']:.2f}" if "floor_ratio" in fields else "-",
                    f"{fields['clip_ratio']:.2f}" if "clip_ratio" in fields else "-",
                    f"{fields['overhead'] * 100:+.1f}%" if "overhead" in fields else "-",
                    f"{c.total_s:.2f}",
                ]
            )
        for impl in ("monitor", "monitor(params)"):
            ratio = net[impl] / max(net[floor_of[impl]], 1e-12)
            session.target(
                "monitor",
                f"{impl} <= {MONITOR_MAX_FLOOR_RATIO} x {floor_of[impl]} ({leaves} leaves)",
                f"{ratio:.2f}",
                ratio <= MONITOR_MAX_FLOOR_RATIO,
            )
        del params, grads, param_flat, grad_flat, built
    print_table(
        "monitor: net of argument passing; x floor = one read of the same bytes; "
        "overhead of the README chain over clip+adam",
        [
            "implementation",
            "leaves",
            "MiB",
            "median ms",
            "net ms",
            "x floor",
            "x clip",
            "overhead",
            "compile s",
        ],
        rows,
    )
