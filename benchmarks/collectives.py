"""`collectives`: all-reduces per step in the compiled HLO of one update, under pmap and shard_map.

On a machine with fewer than two accelerators the simulated CPU devices are used
(the entry point sets `XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX
starts, unless `XLA_FLAGS` already sets a device count).
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip
from benchmarks.harness import RunConfig, Session, log, print_table
from benchmarks.hlo import count_collectives
from benchmarks.problems import relative_error

# issue 6: one transform, one all-reduce.
ALL_REDUCES_PER_TRANSFORM = 1


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of `collectives`.

    Attributes:
      leaves: leaves of the update (float32, `local` elements per device each).
      local: elements of each leaf on each device.
      devices: the most devices to use.
    """

    leaves: int
    local: int = 16
    devices: int = 8


def configure(run: RunConfig) -> Sizes:
    return Sizes(leaves=50)


def collective_devices() -> list[Any]:
    """The default backend's devices when it has several, else the (simulated) CPU devices."""
    devices = jax.devices()
    return devices if len(devices) >= 2 else jax.devices("cpu")


def one_all_reduce(impl: str, mode: str) -> str:
    return f"exactly {ALL_REDUCES_PER_TRANSFORM} all-reduce per step: {impl}, {mode}"


def run(session: Session, sizes: Sizes) -> None:
    devices = collective_devices()
    n = min(len(devices), sizes.devices)
    if n < 2:
        session.note(
            "collectives",
            "needs at least 2 devices; set XLA_FLAGS=--xla_force_host_platform_device_count=8",
        )
        return
    devices = devices[:n]
    leaves, local = sizes.leaves, sizes.local
    rng = np.random.default_rng(4)
    host = {f"w{i:03d}": rng.standard_normal((n, local)).astype(np.float32) for i in range(leaves)}
    labels = {key: "abc"[i % 3] for i, key in enumerate(host)}
    whole = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in host.values()))
    group_ref = {
        g: np.sqrt(
            sum(np.sum(np.square(v, dtype=np.float64)) for k, v in host.items() if labels[k] == g)
        )
        for g in "abc"
    }

    def transforms(axis_name: str | None) -> dict[str, optax.GradientTransformation]:
        out = {
            "optaxclip clip_by_global_norm": optaxclip.clip_by_global_norm(
                1.0, axis_name=axis_name
            ),
            "optaxclip clip_by_group_norm (3 groups)": optaxclip.clip_by_group_norm(
                1.0, labels, axis_name=axis_name
            ),
        }
        if axis_name is None:
            out["optax clip_by_global_norm"] = optax.clip_by_global_norm(1.0)
        return out

    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    sharded = NamedSharding(mesh, P("d"))
    replicated = NamedSharding(mesh, P())
    global_grads = {k: jax.device_put(v.reshape(-1), sharded) for k, v in host.items()}
    stacked = host

    def pmap_case(tx: optax.GradientTransformation) -> tuple[Any, Any]:
        fn = jax.pmap(
            lambda g, s: tx.update(g, s), axis_name="d", in_axes=(0, None), devices=devices
        )
        state = tx.init({k: v[0] for k, v in stacked.items()})
        compiled = fn.lower(stacked, state).compile()
        return compiled, jax.tree.map(lambda x: x[0], compiled(stacked, state)[1])

    def shard_map_case(check_vma: bool) -> Callable[[optax.GradientTransformation], Any]:
        def case(tx: optax.GradientTransformation) -> tuple[Any, Any]:
            body = jax.shard_map(
                lambda g, s: tx.update(g, s),
                mesh=mesh,
                in_specs=(P("d"), P()),
                out_specs=(P("d"), P()),
                check_vma=check_vma,
            )
            state = jax.device_put(tx.init(global_grads), replicated)
            compiled = jax.jit(body).lower(global_grads, state).compile()
            return compiled, compiled(global_grads, state)[1]

        return case

    def jit_case(tx: optax.GradientTransformation) -> tuple[Any, Any]:
        state = jax.device_put(tx.init(global_grads), replicated)
        compiled = jax.jit(lambda g, s: tx.update(g, s)).lower(global_grads, state).compile()
        return compiled, compiled(global_grads, state)[1]

    cases = [
        ("pmap", "d", pmap_case),
        ("shard_map", "d", shard_map_case(check_vma=True)),
        ("shard_map (check_vma=False)", "d", shard_map_case(check_vma=False)),
        ("jit (sharded inputs)", None, jit_case),
    ]
    rows: list[list[Any]] = []
    for mode, axis_name, case in cases:
        for impl, tx in transforms(axis_name).items():
            log(f"collectives {mode} {impl}")
            start = time.perf_counter()
            try:
                compiled, state = case(tx)
            except Exception as err:  # one failing case must not hide the others
                message = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                session.note("collectives", f"{impl} under {mode} failed: {message}")
                session.record(
                    "collectives",
                    impl,
                    leaves=leaves,
                    dtype="float32",
                    size_bytes=leaves * n * local * 4,
                    mode=mode,
                    error=message,
                )
                rows.append([mode, impl, "error", "-", "-", "-"])
                if axis_name is not None:
                    session.target("collectives", one_all_reduce(impl, mode), "error", False)
                continue
            seconds = time.perf_counter() - start
            counts = count_collectives(compiled.as_text())
            main = counts["all-reduce"]["main"]
            in_cond = counts["all-reduce"]["conditional"]
            others = {op: c["main"] for op, c in counts.items() if op != "all-reduce" and c["main"]}
            norm = optax.tree.get(state, "grad_norm") if impl.startswith("optaxclip") else None
            error = None if norm is None else relative_error(norm, whole)
            if impl.endswith("(3 groups)"):
                got = optax.tree.get(state, "group_norm")
                error = max([error or 0.0] + [relative_error(got[g], group_ref[g]) for g in "abc"])
            session.record(
                "collectives",
                impl,
                leaves=leaves,
                dtype="float32",
                size_bytes=leaves * n * local * 4,
                mode=mode,
                devices=n,
                device_platform=devices[0].platform,
                all_reduce=main,
                all_reduce_in_conditional=in_cond,
                collectives=counts,
                relative_error=error,
                compile_and_run_s=seconds,
            )
            others_text = ", ".join(f"{op} {c}" for op, c in others.items()) or "-"
            error_text = "-" if error is None else f"{error:.1e}"
            rows.append([mode, impl, main, in_cond, others_text, error_text])
            if axis_name is not None:
                session.target(
                    "collectives",
                    one_all_reduce(impl, mode),
                    f"{main}" + (f" (+{in_cond} in a conditional)" if in_cond else ""),
                    main == ALL_REDUCES_PER_TRANSFORM,
                )
    print_table(
        f"collectives in the compiled HLO of one update: {leaves} leaves, {n} "
        f"{devices[0].platform} devices (jit row: informational; rel err: norm vs float64)",
        ["mode", "implementation", "all-reduce", "in cond", "other collectives", "rel err"],
        rows,
    )
