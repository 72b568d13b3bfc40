"""`adaptive`: adaptive policies and guard against clip_by_global_norm, each in a step with adam.

Whichever of the policies the installed optaxclip has; a missing one is noted and skipped.
"""

import dataclasses
from typing import Any

import optax

import optaxclip
from benchmarks import step
from benchmarks.harness import (
    Compiled,
    RunConfig,
    Session,
    compile_call,
    interleaved,
    log,
    ms,
    print_table,
    timing_fields,
)
from benchmarks.problems import optimizer_step

ADAPTIVE_POLICIES = ("autoclip", "zclip", "adagc", "quantile_clip", "guard")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of `adaptive`.

    Attributes:
      leaves: the leaf counts.
      total_bytes: float32 parameter bytes, as in `step` (whose compiled clip + adam is reused).
    """

    leaves: tuple[int, ...]
    total_bytes: int


def configure(run: RunConfig) -> Sizes:
    return Sizes((16,) if run.quick else (1, 200), step.configure(run).total_bytes)


def _adaptive_transform(name: str, factory: Any) -> optax.GradientTransformation:
    adam = optax.adam(1e-3)
    if name == "guard":
        return factory(optax.chain(optaxclip.clip_by_global_norm(1.0), adam), z_threshold=3.0)
    return optax.chain(factory(), adam)


def run(session: Session, sizes: Sizes) -> None:
    cfg = session.run
    available = {}
    for name in ADAPTIVE_POLICIES:
        factory = getattr(optaxclip, name, None)
        if factory is None:
            session.note("adaptive", f"optaxclip.{name} is not available in this version: skipped")
            continue
        available[name] = factory
    if not available:
        return
    rows = []
    for leaves in sizes.leaves:
        params, grads, _, per_leaf = step.step_problem(sizes.total_bytes, leaves)
        size = per_leaf * leaves * 4
        built: dict[str, Compiled] = {
            "clip_by_global_norm": step.compiled_step(
                session, "optaxclip clip+adam", sizes.total_bytes, leaves, params, grads
            )
        }
        for name, factory in available.items():
            label = "guard(clip+adam)" if name == "guard" else f"{name}+adam"
            log(f"adaptive {leaves} leaves: compiling {label}")
            try:
                tx = _adaptive_transform(name, factory)
                built[label] = compile_call(optimizer_step(tx), params, grads, tx.init(params))
            except Exception as err:  # a policy still in development must not stop the run
                session.note("adaptive", f"optaxclip.{name} failed ({type(err).__name__}: {err})")
        if len(built) == 1:
            continue
        log(f"adaptive {leaves} leaves: timing")
        times = interleaved({k: c.call for k, c in built.items()}, cfg.repeats, cfg.min_sample_s)
        base = times["clip_by_global_norm"].median
        for impl, c in built.items():
            t = times[impl]
            overhead = t.median / base - 1
            session.record(
                "adaptive",
                impl,
                leaves=leaves,
                dtype="float32",
                size_bytes=size,
                leaf_shape=[per_leaf],
                **timing_fields(t, c),
                overhead_vs_clip=overhead,
            )
            row = [impl, leaves, ms(t.median), ms(t.min), f"{overhead * 100:+.1f}%"]
            rows.append([*row, f"{c.total_s:.2f}"])
        del params, grads, built
    if rows:
        print_table(
            "adaptive policies and guard: a step with adam, overhead vs clip_by_global_norm+adam",
            ["implementation", "leaves", "median ms", "min ms", "overhead", "compile s"],
            rows,
        )
