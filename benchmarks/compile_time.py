"""`compile`: trace + lower + XLA compile, fresh each time, against the leaf count.

Two programs, each optaxclip against optax:

- `update`: `clip_by_global_norm(1.0).update` alone (the figure of issue 6's target);
- `clip+adam step`: `chain(clip_by_global_norm(1.0), adam)` update + `apply_updates`,
  what a user's training step compiles (issue 10's target).

Every sample is a new Python function (JAX caches compiles by function), lowered
and compiled from `jax.ShapeDtypeStruct`s, so no sample reuses another's work.
Implementations are compiled round-robin, as run times are timed.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import optax

import optaxclip
from benchmarks.harness import (
    Compiled,
    RunConfig,
    Session,
    compile_call,
    compile_samples_fields,
    log,
    print_table,
)
from benchmarks.problems import STEP_IMPLS, abstract_tree, optimizer_step

# issue 6: the update's compile no worse than optax's (10% for run-to-run noise).
COMPILE_MAX_RATIO = 1.10
# issue 10: clip + adam's compile within 1.5x of optax clip + adam's.
STEP_COMPILE_MAX_RATIO = 1.5

LEAF_SHAPE = (128,)

UPDATE_IMPLS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optaxclip": lambda: optaxclip.clip_by_global_norm(1.0),
    "optax": lambda: optax.clip_by_global_norm(1.0),
}
STEP_COMPILE_IMPLS = ("optaxclip clip+adam", "optax clip+adam")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of `compile`.

    Attributes:
      update_leaves: leaf counts of the clip update alone.
      step_leaves: leaf counts of the clip + adam step.
      leaf_shape: every leaf's shape (float32).
    """

    update_leaves: tuple[int, ...]
    step_leaves: tuple[int, ...]
    leaf_shape: tuple[int, ...] = LEAF_SHAPE


def configure(run: RunConfig) -> Sizes:
    if run.quick:
        return Sizes(update_leaves=(10, 30, 100), step_leaves=(30, 100))
    return Sizes(update_leaves=(100, 1000, 3000), step_leaves=(300, 1000, 2000))


def _fresh_update(make: Callable[[], optax.GradientTransformation], tree: Any) -> Compiled:
    tx = make()
    # A new function object each time: JAX caches compiles by function.
    update = lambda g, s, tx=tx: tx.update(g, s)
    return compile_call(update, tree, jax.eval_shape(tx.init, tree))


def _fresh_step(make: Callable[[], optax.GradientTransformation], tree: Any) -> Compiled:
    tx = make()
    # optimizer_step returns a new closure each time.
    return compile_call(optimizer_step(tx), tree, tree, jax.eval_shape(tx.init, tree))


def _measure(
    session: Session,
    program: str,
    impls: dict[str, Callable[[], optax.GradientTransformation]],
    fresh: Callable[[Callable[[], optax.GradientTransformation], Any], Compiled],
    leaves: int,
    shape: tuple[int, ...],
    max_ratio: float,
    rows: list[list[Any]],
) -> None:
    tree = abstract_tree(leaves, shape)
    samples: dict[str, list[Compiled]] = {impl: [] for impl in impls}
    for round_ in range(session.run.compile_repeats):
        for impl, make in impls.items():
            log(f"compile {program}, {leaves} leaves, {impl}, round {round_ + 1}")
            samples[impl].append(fresh(make, tree))
    medians = {}
    for impl, runs in samples.items():
        fields = compile_samples_fields(runs)
        medians[impl] = fields["median_s"]
        session.record(
            "compile",
            impl,
            leaves=leaves,
            dtype="float32",
            size_bytes=leaves * math.prod(shape) * 4,
            program=program,
            leaf_shape=list(shape),
            **fields,
        )
        rows.append(
            [
                program,
                impl,
                leaves,
                f"{fields['median_s']:.3f}",
                f"{fields['min_s']:.3f}",
                f"{fields['lower_s']:.3f}",
                f"{fields['xla_compile_s']:.3f}",
            ]
        )
    mine, theirs = impls
    ratio = medians[mine] / medians[theirs]
    rows[-2].append(f"{ratio:.2f}")
    rows[-1].append("1.00")
    session.target(
        "compile",
        f"{mine} compile time <= {max_ratio} x {theirs} ({program}, {leaves} leaves)",
        f"{ratio:.2f}",
        ratio <= max_ratio,
    )


def run(session: Session, sizes: Sizes) -> None:
    rows: list[list[Any]] = []
    for leaves in sizes.update_leaves:
        _measure(
            session,
            "update",
            UPDATE_IMPLS,
            _fresh_update,
            leaves,
            sizes.leaf_shape,
            COMPILE_MAX_RATIO,
            rows,
        )
    step_impls = {impl: STEP_IMPLS[impl] for impl in STEP_COMPILE_IMPLS}
    for leaves in sizes.step_leaves:
        _measure(
            session,
            "clip+adam step",
            step_impls,
            _fresh_step,
            leaves,
            sizes.leaf_shape,
            STEP_COMPILE_MAX_RATIO,
            rows,
        )
    print_table(
        "compile time (trace+lower, then XLA compile; a fresh jit each sample): "
        "clip_by_global_norm's update alone, and a clip + adam step",
        ["program", "implementation", "leaves", "median s", "min s", "lower s", "xla s", "x optax"],
        rows,
    )
