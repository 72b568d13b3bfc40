"""`lowering`: what each transform puts into a training step, per platform, without the hardware.

Two facts, read from programs rather than timed:

- **Control flow and reductions.** Each transform, chained before adam at 20 leaves, is
  traced once and lowered for cpu, cuda and tpu on this machine
  (`jax.jit(tx.update).trace(g, s, p).lower(lowering_platforms=(platform,))`); its
  StableHLO is searched for data-dependent control flow (`stablehlo.case`,
  `stablehlo.if`, `stablehlo.while`) and reductions (`stablehlo.reduce` ops, divided by
  the leaf count). On GPU a conditional costs a host round trip and splits CUDA graphs.
- **All-reduce payload.** `clip_by_global_norm(axis_name=...)` and `clip_by_group_norm`
  under `jax.shard_map` are compiled on 4 and on 8 devices (the simulated CPU devices
  unless there are 8 accelerators); the bytes every all-reduce of the compiled HLO
  carries are summed. A payload that grows with the device count does not scale to pods.

Transforms the installed optaxclip lacks (`getattr(optaxclip, name, None)` is None) are
noted and skipped, so the benchmark runs before and after they land.
"""

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip
from benchmarks.harness import RunConfig, Session, log, print_table
from benchmarks.hlo import collective_bytes, count_collectives

PLATFORMS = ("cpu", "cuda", "tpu")
ACCELERATORS = ("cuda", "tpu")
# issue 10: at most 5 reductions per leaf for clip_by_global_norm + adam on GPU/TPU.
MAX_REDUCTIONS_PER_LEAF = 5.0
PAYLOAD_DEVICES = (4, 8)

_CONDITIONAL = {"case": re.compile(r"stablehlo\.case\b"), "if": re.compile(r"stablehlo\.if\b")}
_WHILE = re.compile(r"stablehlo\.while\b")
_REDUCE = re.compile(r"stablehlo\.reduce\b")  # not reduce_precision / reduce_window


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of `lowering`.

    Attributes:
      leaves: leaves of the lowered update.
      leaf_shape: each leaf's shape (float32).
      batch: the leading per-example axis of `per_example_clip`'s incoming updates.
      payload_leaves: leaves of the update whose all-reduce payload is measured.
      payload_local: elements of each of those leaves on each device.
      payload_devices: the device counts the payload is compared at.
    """

    leaves: int = 20
    leaf_shape: tuple[int, ...] = (64, 64)
    batch: int = 4
    payload_leaves: int = 20
    payload_local: int = 16
    payload_devices: tuple[int, ...] = PAYLOAD_DEVICES


def configure(run: RunConfig) -> Sizes:
    return Sizes()


# ----------------------------------------------------------------------------- counting


@dataclasses.dataclass(frozen=True)
class Facts:
    """What one lowered program holds.

    Attributes:
      case: `stablehlo.case` ops (what `lax.cond` and `lax.switch` lower to).
      if_: `stablehlo.if` ops.
      while_: `stablehlo.while` ops (`lax.while_loop`, `lax.fori_loop`, `lax.scan`).
      reduce: `stablehlo.reduce` ops.
      leaves: the leaf count the reductions are divided by.
    """

    case: int
    if_: int
    while_: int
    reduce: int
    leaves: int

    @property
    def conditionals(self) -> int:
        return self.case + self.if_

    @property
    def branch_free(self) -> bool:
        return self.conditionals == 0 and self.while_ == 0

    @property
    def reductions_per_leaf(self) -> float:
        return self.reduce / max(self.leaves, 1)


def count_ops(stablehlo: str, leaves: int) -> Facts:
    """Counts control flow and reductions in StableHLO text (`Lowered.as_text()`)."""
    return Facts(
        case=len(_CONDITIONAL["case"].findall(stablehlo)),
        if_=len(_CONDITIONAL["if"].findall(stablehlo)),
        while_=len(_WHILE.findall(stablehlo)),
        reduce=len(_REDUCE.findall(stablehlo)),
        leaves=leaves,
    )


def lowering_facts(
    tx: optax.GradientTransformation,
    updates: Any,
    params: Any,
    platforms: Sequence[str] = PLATFORMS,
) -> dict[str, Facts]:
    """Traces `tx.update(updates, tx.init(params), params)` once and counts its ops per platform.

    `updates` and `params` may be arrays or `jax.ShapeDtypeStruct`s (nothing runs).
    The leaf count is that of `params`.
    """
    state = jax.eval_shape(tx.init, params)
    traced = jax.jit(tx.update).trace(updates, state, params)
    leaves = len(jax.tree.leaves(params))
    return {
        p: count_ops(traced.lower(lowering_platforms=(p,)).as_text(), leaves) for p in platforms
    }


def all_reduce_payload(compiled_hlo: str) -> dict[str, int]:
    """Bytes and count of the all-reduces one step runs (main path) or may run (in a branch)."""
    payload = collective_bytes(compiled_hlo, "all-reduce")
    counts = count_collectives(compiled_hlo)
    return {
        "all_reduce_bytes": payload["main"],
        "all_reduce_bytes_in_conditional": payload["conditional"],
        "all_reduce": counts["all-reduce"]["main"],
        "all_reduce_in_conditional": counts["all-reduce"]["conditional"],
        "all_gather_bytes": collective_bytes(compiled_hlo, "all-gather")["main"],
    }


# ----------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Case:
    """One transform of the lowering table.

    Attributes:
      label: its row in the table and its records' `implementation`.
      factory: the optaxclip attribute it needs (None: optax's, always there).
      build: (factory, labels, adam) -> the transformation to lower.
      per_example: its incoming updates carry a leading batch axis.
    """

    label: str
    factory: str | None
    build: Callable[[Any, Any, optax.GradientTransformation], optax.GradientTransformation]
    per_example: bool = False


def _chain(*options: Any, **kw: Any) -> Callable[..., optax.GradientTransformation]:
    return lambda f, labels, adam: optax.chain(f(*options, **kw), adam)


CASES: tuple[Case, ...] = (
    Case(
        "optax clip_by_global_norm",
        None,
        lambda f, labels, adam: optax.chain(optax.clip_by_global_norm(1.0), adam),
    ),
    Case("clip_by_global_norm", "clip_by_global_norm", _chain(1.0)),
    Case(
        "clip_by_global_norm nonfinite=zero", "clip_by_global_norm", _chain(1.0, nonfinite="zero")
    ),
    Case(
        "clip_by_global_norm nonfinite=skip", "clip_by_global_norm", _chain(1.0, nonfinite="skip")
    ),
    Case("clip_by_global_norm ord=1", "clip_by_global_norm", _chain(1.0, ord=1)),
    Case("clip_by_global_norm ord=inf", "clip_by_global_norm", _chain(1.0, ord="inf")),
    Case("clip_by_leaf_norm", "clip_by_leaf_norm", _chain(1.0)),
    Case(
        "clip_by_group_norm (2 groups)",
        "clip_by_group_norm",
        lambda f, labels, adam: optax.chain(f(1.0, labels), adam),
    ),
    Case("clip_by_block_rms", "clip_by_block_rms", _chain(1.0)),
    Case("adaptive_grad_clip", "adaptive_grad_clip", _chain(0.01)),
    Case("clip_by_value", "clip_by_value", _chain(1.0)),
    Case("autoclip", "autoclip", _chain()),
    Case("zclip", "zclip", _chain()),
    Case("adagc", "adagc", _chain()),
    Case("quantile_clip", "quantile_clip", _chain()),
    Case("guard(adam, z_threshold=3)", "guard", lambda f, labels, adam: f(adam, z_threshold=3.0)),
    Case("monitor", "monitor", _chain()),
    Case("loss_scale(adam)", "loss_scale", lambda f, labels, adam: f(adam)),
    Case("per_example_clip", "per_example_clip", _chain(1.0), per_example=True),
)


def _problem(sizes: Sizes, per_example: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    params = {
        f"w{i:03d}": jax.ShapeDtypeStruct(sizes.leaf_shape, jnp.float32)
        for i in range(sizes.leaves)
    }
    if not per_example:
        return params, params
    batched = (sizes.batch, *sizes.leaf_shape)
    return {k: jax.ShapeDtypeStruct(batched, jnp.float32) for k in params}, params


# ----------------------------------------------------------------------------- benchmark


def _ops(session: Session, sizes: Sizes) -> None:
    labels = {f"w{i:03d}": "ab"[i % 2] for i in range(sizes.leaves)}
    size = sizes.leaves * int(np.prod(sizes.leaf_shape)) * 4
    rows: list[list[Any]] = []
    facts_by_case: dict[str, dict[str, Facts]] = {}
    failed: list[str] = []
    for case in CASES:
        factory = optax if case.factory is None else getattr(optaxclip, case.factory, None)
        if factory is None:
            session.note("lowering", f"optaxclip.{case.factory} is not available: skipped")
            continue
        log(f"lowering {case.label}")
        updates, params = _problem(sizes, case.per_example)
        try:
            tx = case.build(factory, labels, optax.adam(1e-3))
            facts = lowering_facts(tx, updates, params)
        except Exception as err:  # a transform still in development must not stop the run
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            session.note("lowering", f"{case.label} failed to lower: {message}")
            session.record(
                "lowering",
                case.label,
                leaves=sizes.leaves,
                dtype="float32",
                size_bytes=size,
                fact="ops",
                error=message,
            )
            failed.append(case.label)
            rows.append([case.label, *(["error"] * (3 * len(PLATFORMS)))])
            continue
        facts_by_case[case.label] = facts
        for p, f in facts.items():
            session.record(
                "lowering",
                case.label,
                leaves=sizes.leaves,
                dtype="float32",
                size_bytes=size,
                fact="ops",
                lowering_platform=p,
                leaf_shape=list(sizes.leaf_shape),
                batch=sizes.batch if case.per_example else None,
                case=f.case,
                **{"if": f.if_, "while": f.while_},
                conditionals=f.conditionals,
                reduce=f.reduce,
                reductions_per_leaf=f.reductions_per_leaf,
            )
        rows.append(
            [
                case.label,
                *(facts[p].conditionals for p in PLATFORMS),
                *(facts[p].while_ for p in PLATFORMS),
                *(f"{facts[p].reductions_per_leaf:.2f}" for p in PLATFORMS),
            ]
        )
    print_table(
        f"lowering of each update chained before adam, {sizes.leaves} leaves of "
        f"{sizes.leaf_shape} float32, per platform: cond = stablehlo.case + stablehlo.if, "
        "while = stablehlo.while, red/leaf = stablehlo.reduce ops / leaves",
        [
            "transform",
            *(f"cond {p}" for p in PLATFORMS),
            *(f"while {p}" for p in PLATFORMS),
            *(f"red/leaf {p}" for p in PLATFORMS),
        ],
        rows,
    )
    for p in ACCELERATORS:
        offenders = [k for k, f in facts_by_case.items() if not f[p].branch_free]
        figure = f"{len(offenders)} of {len(facts_by_case)} hold one"
        if failed:
            figure += f" ({len(failed)} failed to lower)"
        session.target(
            "lowering",
            f"no stablehlo.case/if/while in any update's {p} lowering",
            figure,
            not offenders and not failed,
        )
        clip = facts_by_case.get("clip_by_global_norm")
        if clip is not None:
            r = clip[p].reductions_per_leaf
            session.target(
                "lowering",
                f"clip_by_global_norm + adam <= {MAX_REDUCTIONS_PER_LEAF:g} reductions per leaf "
                f"({p} lowering)",
                f"{r:.2f}",
                r <= MAX_REDUCTIONS_PER_LEAF,
            )


def payload_devices() -> list[Any]:
    """Accelerators when there are enough for every count in the payload table, else CPUs."""
    devices = jax.devices()
    return devices if len(devices) >= max(PAYLOAD_DEVICES) else jax.devices("cpu")


def _payload(session: Session, sizes: Sizes) -> None:
    devices = payload_devices()
    counts = [n for n in sizes.payload_devices if n <= len(devices)]
    if len(counts) < 2:
        session.note(
            "lowering",
            f"the payload table needs {max(sizes.payload_devices)} devices, found "
            f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count=8",
        )
        return
    keys = [f"w{i:03d}" for i in range(sizes.payload_leaves)]
    labels = {k: "abc"[i % 3] for i, k in enumerate(keys)}
    transforms: dict[str, Callable[[], optax.GradientTransformation]] = {
        "clip_by_global_norm(axis_name='d')": lambda: optaxclip.clip_by_global_norm(
            1.0, axis_name="d"
        ),
        "clip_by_group_norm(3 groups, axis_name='d')": lambda: optaxclip.clip_by_group_norm(
            1.0, labels, axis_name="d"
        ),
    }
    measured: dict[str, dict[int, int]] = {name: {} for name in transforms}
    rows: list[list[Any]] = []
    for name, make in transforms.items():
        for n in counts:
            log(f"payload {name}, {n} devices")
            mesh = jax.sharding.Mesh(np.array(devices[:n]), ("d",))
            sharding = NamedSharding(mesh, P("d"))
            grads = {
                k: jax.ShapeDtypeStruct((n * sizes.payload_local,), jnp.float32, sharding=sharding)
                for k in keys
            }
            tx = make()
            state = jax.eval_shape(tx.init, grads)
            body = jax.shard_map(
                lambda g, s, tx=tx: tx.update(g, s),
                mesh=mesh,
                in_specs=(P("d"), P()),
                out_specs=(P("d"), P()),
            )
            try:
                hlo = jax.jit(body).lower(grads, state).compile().as_text() or ""
            except Exception as err:  # one failing case must not hide the others
                message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                session.note("lowering", f"payload of {name} on {n} devices failed: {message}")
                rows.append([name, n, "error", "-", "-", "-"])
                continue
            facts = all_reduce_payload(hlo)
            measured[name][n] = facts["all_reduce_bytes"]
            session.record(
                "lowering",
                name,
                leaves=sizes.payload_leaves,
                dtype="float32",
                size_bytes=sizes.payload_leaves * n * sizes.payload_local * 4,
                fact="all-reduce payload",
                mode="shard_map",
                devices=n,
                device_platform=devices[0].platform,
                **facts,
            )
            rows.append(
                [
                    name,
                    n,
                    facts["all_reduce"],
                    facts["all_reduce_bytes"],
                    facts["all_reduce_bytes_in_conditional"],
                    facts["all_gather_bytes"],
                ]
            )
    print_table(
        f"all-reduce payload of one update under jax.shard_map ({sizes.payload_leaves} leaves, "
        f"{devices[0].platform} devices; bytes from the compiled HLO's all-reduce shapes)",
        ["transform", "devices", "all-reduces", "bytes", "bytes in cond", "all-gather bytes"],
        rows,
    )
    for name, by_count in measured.items():
        figure = " vs ".join(f"{by_count.get(n, 'error')} B" for n in counts)
        session.target(
            "lowering",
            f"all-reduce payload independent of the device count: {name} "
            f"({' vs '.join(map(str, counts))} devices)",
            figure,
            len(by_count) == len(counts) and len(set(by_count.values())) == 1,
        )


def run(session: Session, sizes: Sizes) -> None:
    _ops(session, sizes)
    _payload(session, sizes)
