"""`norm`: throughput of a global L2 norm against the one-buffer floor, at constant total bytes."""

import dataclasses

import jax.numpy as jnp
import optax

import optaxclip
from benchmarks.harness import (
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
from benchmarks.problems import floor_norm, nothing, random_flat, relative_error, split_leaves

# issue 6: global_norm at >= 0.8 of the floor's throughput.
NORM_MIN_FLOOR_RATIO = 0.8


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of `norm`.

    Attributes:
      leaves: the leaf counts.
      dtypes: the gradient dtypes.
      total_bytes: gradient bytes, the same at every leaf count.
    """

    leaves: tuple[int, ...]
    dtypes: tuple[str, ...]
    total_bytes: int


def configure(run: RunConfig) -> Sizes:
    if run.quick:
        return Sizes((1, 16, 64), ("float32", "bfloat16"), (256 if run.accelerator else 16) * MiB)
    return Sizes((1, 200, 2000), ("float32", "bfloat16"), (1024 if run.accelerator else 64) * MiB)


def run(session: Session, sizes: Sizes) -> None:
    """Times optaxclip.global_norm, optax.tree.norm and the floor, net of argument passing."""
    cfg = session.run
    rows = []
    for dtype_name in sizes.dtypes:
        dtype = jnp.dtype(dtype_name)
        total = sizes.total_bytes // dtype.itemsize
        data = random_flat(0, total, dtype)
        for leaves in sizes.leaves:
            per_leaf = total // leaves
            flat = data[: per_leaf * leaves]
            tree = split_leaves(flat, leaves)
            size = per_leaf * leaves * dtype.itemsize
            log(f"norm {dtype_name} {leaves} leaves: compiling")
            built = {
                "optaxclip": compile_call(optaxclip.global_norm, tree),
                "optax": compile_call(optax.tree.norm, tree),
                "floor": compile_call(floor_norm, flat),
                "dispatch (tree)": compile_call(nothing, tree, keep_unused=True),
                "dispatch (flat)": compile_call(nothing, flat, keep_unused=True),
            }
            log(f"norm {dtype_name} {leaves} leaves: timing")
            times = interleaved(
                {k: c.call for k, c in built.items()}, cfg.repeats, cfg.min_sample_s
            )
            reference = float(floor_norm(flat))
            net = {
                "optaxclip": times["optaxclip"].median - times["dispatch (tree)"].median,
                "optax": times["optax"].median - times["dispatch (tree)"].median,
                "floor": times["floor"].median - times["dispatch (flat)"].median,
            }
            for impl in ("optaxclip", "optax", "floor"):
                t, c = times[impl], built[impl]
                seconds = max(net[impl], 1e-12)
                ratio = max(net["floor"], 1e-12) / seconds
                raw_ratio = times["floor"].median / t.median
                error = relative_error(c.call(), reference)
                session.record(
                    "norm",
                    impl,
                    leaves=leaves,
                    dtype=dtype_name,
                    size_bytes=size,
                    leaf_shape=[per_leaf],
                    **timing_fields(t, c),
                    dispatch_s=times[
                        "dispatch (flat)" if impl == "floor" else "dispatch (tree)"
                    ].median,
                    net_median_s=net[impl],
                    gb_per_s=size / seconds / 1e9,
                    floor_ratio=ratio,
                    floor_ratio_raw=raw_ratio,
                    relative_error=error,
                )
                rows.append(
                    [
                        impl,
                        leaves,
                        dtype_name,
                        f"{size / MiB:.0f}",
                        ms(t.median),
                        ms(t.min),
                        ms(net[impl]),
                        f"{size / seconds / 1e9:.2f}",
                        f"{ratio:.2f}",
                        f"{raw_ratio:.2f}",
                        f"{c.total_s:.2f}",
                        f"{error:.1e}",
                    ]
                )
            ratio = max(net["floor"], 1e-12) / max(net["optaxclip"], 1e-12)
            session.target(
                "norm",
                f"global_norm >= {NORM_MIN_FLOOR_RATIO} x floor GB/s "
                f"({dtype_name}, {leaves} leaves)",
                f"{ratio:.2f}",
                ratio >= NORM_MIN_FLOOR_RATIO,
            )
            del tree, flat, built
        del data
    print_table(
        "norm throughput: global norm of a tree vs one fused pass over one buffer "
        "(net = median minus the cost of passing the leaves to a jitted call)",
        [
            "implementation",
            "leaves",
            "dtype",
            "MiB",
            "median ms",
            "min ms",
            "net ms",
            "GB/s (net)",
            "x floor",
            "x floor raw",
            "compile s",
            "rel err",
        ],
        rows,
    )
