"""`step`: adam with and without clipping, against adam plus the floor's norm pass."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

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
from benchmarks.problems import (
    STEP_IMPLS,
    floor_norm,
    optimizer_step,
    random_flat,
    split_leaves,
)

# issue 6: optaxclip clip + adam within 5% of the two-pass floor.
STEP_MAX_FLOOR_RATIO = 1.05


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of `step`.

    Attributes:
      leaves: the leaf counts.
      total_bytes: float32 parameter bytes (the gradients are as many), at every leaf count.
    """

    leaves: tuple[int, ...]
    total_bytes: int


def configure(run: RunConfig) -> Sizes:
    if run.quick:
        return Sizes((1, 16, 64), (64 if run.accelerator else 16) * MiB)
    return Sizes((1, 200, 2000), (256 if run.accelerator else 32) * MiB)


def step_problem(total_bytes: int, leaves: int) -> tuple[Any, Any, jax.Array, int]:
    """Float32 params and gradients of `total_bytes` in `leaves` leaves, and a flat buffer."""
    total = total_bytes // 4
    per_leaf = total // leaves
    params = split_leaves(random_flat(1, per_leaf * leaves, jnp.float32), leaves)
    grad_flat = random_flat(2, per_leaf * leaves, jnp.float32)
    return params, split_leaves(grad_flat, leaves), grad_flat, per_leaf


def compiled_step(
    session: Session, impl: str, total_bytes: int, leaves: int, params: Any, grads: Any
) -> Compiled:
    """`STEP_IMPLS[impl]`'s step, compiled once per run for these sizes (`adaptive` reuses it)."""

    def build() -> Compiled:
        tx = STEP_IMPLS[impl]()
        return compile_call(optimizer_step(tx), params, grads, tx.init(params))

    return session.compiled(("step", impl, total_bytes, leaves), build)


def run(session: Session, sizes: Sizes) -> None:
    cfg = session.run
    rows = []
    for leaves in sizes.leaves:
        params, grads, grad_flat, per_leaf = step_problem(sizes.total_bytes, leaves)
        size = per_leaf * leaves * 4
        log(f"step {leaves} leaves: compiling")
        built = {
            impl: compiled_step(session, impl, sizes.total_bytes, leaves, params, grads)
            for impl in STEP_IMPLS
        }
        built["floor norm"] = compile_call(floor_norm, grad_flat)
        log(f"step {leaves} leaves: timing")
        times = interleaved({k: c.call for k, c in built.items()}, cfg.repeats, cfg.min_sample_s)
        two_pass = times["adam"].median + times["floor norm"].median
        for impl, c in built.items():
            t = times[impl]
            ratio = t.median / two_pass
            session.record(
                "step",
                impl,
                leaves=leaves,
                dtype="float32",
                size_bytes=size,
                leaf_shape=[per_leaf],
                **timing_fields(t, c),
                two_pass_floor_s=two_pass,
                two_pass_ratio=ratio,
            )
            rows.append(
                [
                    impl,
                    leaves,
                    f"{size / MiB:.0f}",
                    ms(t.median),
                    ms(t.min),
                    "-" if impl == "floor norm" else f"{ratio:.3f}",
                    "-" if impl == "floor norm" else f"{(ratio - 1) * 100:+.1f}%",
                    f"{c.total_s:.2f}",
                ]
            )
        ratio = times["optaxclip clip+adam"].median / two_pass
        session.target(
            "step",
            f"optaxclip clip+adam <= {STEP_MAX_FLOOR_RATIO} x (adam + floor norm) "
            f"({leaves} leaves)",
            f"{ratio:.3f}",
            ratio <= STEP_MAX_FLOOR_RATIO,
        )
        del params, grads, grad_flat, built
    print_table(
        "optimizer step (float32): two-pass floor = median(adam) + median(floor norm)",
        [
            "implementation",
            "leaves",
            "MiB",
            "median ms",
            "min ms",
            "x two-pass",
            "overhead",
            "compile s",
        ],
        rows,
    )
