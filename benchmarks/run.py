"""Benchmarks: optaxclip side by side with optax and with the memory-bandwidth floor.

Run from the repository root:

    python benchmarks/run.py                 # full run
    python benchmarks/run.py --quick         # reduced run (a few minutes on a laptop CPU)
    python benchmarks/run.py --only norm step --repeats 21 --out /tmp/bench.json

Every run prints one table per benchmark, then the targets with PASS/FAIL, and
writes `benchmarks/results/<platform>-<full|quick>.json` (one record per
measurement, each with the machine it ran on). See `benchmarks/README.md` for the
method: interleaved repeats, medians, compile time apart from run time.
"""

import os

# The collectives benchmark needs several devices; on a CPU-only machine XLA
# simulates them. This must happen before JAX starts, and never overrides a
# device count the user chose.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"

# The targets of issue 6. A compile ratio within 10% of optax's counts as "no
# worse": two compiles of the same program differ by more than that under load.
NORM_MIN_FLOOR_RATIO = 0.8
STEP_MAX_FLOOR_RATIO = 1.05
TRAIN_MAX_OVERHEAD = 0.03
COMPILE_MAX_RATIO = 1.10
ALL_REDUCES_PER_TRANSFORM = 1

ADAPTIVE_POLICIES = ("autoclip", "zclip", "adagc", "quantile_clip", "guard")


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The small decoder-only transformer of the `train` benchmark."""

    vocab: int
    d_model: int
    heads: int
    layers: int
    seq: int
    batch: int


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and repeat counts of one run.

    Attributes:
      mode: "full" or "quick".
      repeats: interleaved rounds of every run-time measurement.
      compile_repeats: fresh compiles per implementation in the `compile` benchmark.
      min_sample_s: each sample times enough back-to-back calls to last this long.
      leaves: the leaf counts of `norm` and `step`.
      adaptive_leaves: the leaf counts of `adaptive`.
      dtypes: the gradient dtypes of `norm`.
      norm_bytes: total gradient bytes in `norm`, the same at every leaf count.
      step_bytes: total parameter bytes in `step` and `adaptive` (float32).
      compile_leaves: the leaf counts of `compile`.
      collective_leaves: the leaf count of `collectives`.
      model: the transformer of `train`.
    """

    mode: str
    repeats: int
    compile_repeats: int
    min_sample_s: float
    leaves: tuple[int, ...]
    adaptive_leaves: tuple[int, ...]
    dtypes: tuple[str, ...]
    norm_bytes: int
    step_bytes: int
    compile_leaves: tuple[int, ...]
    collective_leaves: int
    model: ModelConfig


def make_config(quick: bool, platform_name: str) -> Config:
    """Sizes per platform: an accelerator needs bigger buffers for launch cost to vanish."""
    accelerator = platform_name != "cpu"
    if quick:
        return Config(
            mode="quick",
            repeats=5,
            compile_repeats=2,
            min_sample_s=0.05,
            leaves=(1, 16, 64),
            adaptive_leaves=(16,),
            dtypes=("float32", "bfloat16"),
            norm_bytes=(256 if accelerator else 16) * MiB,
            step_bytes=(64 if accelerator else 16) * MiB,
            compile_leaves=(10, 30, 100),
            collective_leaves=50,
            model=(
                ModelConfig(vocab=1024, d_model=256, heads=4, layers=4, seq=128, batch=16)
                if accelerator
                else ModelConfig(vocab=256, d_model=64, heads=4, layers=2, seq=32, batch=4)
            ),
        )
    return Config(
        mode="full",
        repeats=15,
        compile_repeats=3,
        min_sample_s=0.1,
        leaves=(1, 200, 2000),
        adaptive_leaves=(1, 200),
        dtypes=("float32", "bfloat16"),
        norm_bytes=(1024 if accelerator else 64) * MiB,
        step_bytes=(256 if accelerator else 32) * MiB,
        compile_leaves=(100, 1000, 3000),
        collective_leaves=50,
        model=(
            ModelConfig(vocab=8192, d_model=512, heads=8, layers=8, seq=512, batch=16)
            if accelerator
            else ModelConfig(vocab=512, d_model=256, heads=4, layers=4, seq=128, batch=8)
        ),
    )


# ----------------------------------------------------------------------------- machine


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    device = jax.devices()[0]
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity) if affinity is not None else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "os": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "optax": optax.__version__,
        "optaxclip": optaxclip.__version__,
        "optaxclip_git": _git_revision(),
        "flax": _version("flax"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call of one implementation over interleaved samples.

    Attributes:
      median: the median over samples of the mean time per call.
      min: the fastest sample.
      repeats: the number of samples.
      number: back-to-back calls (each blocked on) per sample.
    """

    median: float
    min: float
    repeats: int
    number: int


def _seconds_per_call(call: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        jax.block_until_ready(call())
    return (time.perf_counter() - start) / number


def interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int, min_sample_s: float
) -> dict[str, Timing]:
    """Times compiled calls round-robin (A, B, C, A, B, C, ...), each call blocked on.

    Each implementation runs once to warm up, once more to size its samples (so
    that a sample lasts about `min_sample_s`), then `repeats` samples are taken
    in turn, so that drift and neighbours' load hit every implementation alike.
    """
    number = {}
    for name, call in calls.items():
        jax.block_until_ready(call())
        once = _seconds_per_call(call, 1)
        number[name] = max(1, min(100_000, math.ceil(min_sample_s / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            samples[name].append(_seconds_per_call(call, number[name]))
    return {
        name: Timing(statistics.median(s), min(s), len(s), number[name])
        for name, s in samples.items()
    }


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A jitted function bound to its arguments, with the time it took to build.

    Attributes:
      call: runs the compiled function on the bound arguments.
      lower_s: tracing and lowering to StableHLO.
      compile_s: XLA compilation.
    """

    call: Callable[[], Any]
    lower_s: float
    compile_s: float

    @property
    def total_s(self) -> float:
        return self.lower_s + self.compile_s


def compile_call(fn: Callable[..., Any], *args: Any, keep_unused: bool = False) -> Compiled:
    """Lowers and compiles `fn` for `args`; later calls of the jitted function reuse the result."""
    jitted = jax.jit(fn, keep_unused=keep_unused)
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return Compiled(functools.partial(jitted, *args), lowered_at - start, done - lowered_at)


def timing_fields(t: Timing, c: Compiled) -> dict[str, Any]:
    """The fields every run-time record shares: run time, then compile time apart."""
    return {
        "median_s": t.median,
        "min_s": t.min,
        "repeats": t.repeats,
        "calls_per_sample": t.number,
        "compile_s": c.total_s,
        "lower_s": c.lower_s,
        "xla_compile_s": c.compile_s,
    }


# ----------------------------------------------------------------------------- session


@dataclasses.dataclass(frozen=True)
class Target:
    """One target of issue 6, with the figure this run measured for it."""

    benchmark: str
    target: str
    figure: str
    passed: bool


@dataclasses.dataclass
class Session:
    """What a run has measured so far, written to JSON after every benchmark."""

    config: Config
    machine: dict[str, Any]
    out: Path
    command: list[str]
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[dict[str, str]] = dataclasses.field(default_factory=list)
    cache: dict[Any, Compiled] = dataclasses.field(default_factory=dict)

    def record(self, benchmark: str, implementation: str, **fields: Any) -> None:
        self.records.append(
            {"benchmark": benchmark, "implementation": implementation, **fields}
            | {"machine": self.machine}
        )

    def target(self, benchmark: str, target: str, figure: str, passed: bool) -> None:
        self.targets.append(Target(benchmark, target, figure, passed))

    def note(self, benchmark: str, text: str) -> None:
        """A line the reader must see: something skipped, unavailable or failed."""
        self.notes.append({"benchmark": benchmark, "note": text})
        print(f"  [{benchmark}] {text}", flush=True)

    def compiled(self, key: Any, build: Callable[[], Compiled]) -> Compiled:
        """Compiles once per key, so benchmarks that share an implementation share its compile.

        The cached call stays bound to the arguments it was built with; callers
        rebuild those arguments from the same seeds, so the data is the same.
        """
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def write(self) -> None:
        document = {
            "schema": 1,
            "name": self.out.stem,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": self.command,
            "config": dataclasses.asdict(self.config),
            "machine": self.machine,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "targets": [dataclasses.asdict(t) for t in self.targets],
            "notes": self.notes,
            "records": self.records,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=1, default=_json_default) + "\n")
        tmp.replace(self.out)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | jax.Array):
        return np.asarray(x).item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def log(text: str) -> None:
    print(f"    .. {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- output


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


_NUMBER = re.compile(r"[-+]?[\d.,]+(?:e[-+]?\d+)?%?|-")


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table: text columns aligned left, number columns right."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_NUMBER.fullmatch(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    print(f"\n{title}")
    print(line(list(headers)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    sys.stdout.flush()


# ----------------------------------------------------------------------------- data


def split_leaves(flat: jax.Array, leaves: int) -> dict[str, jax.Array]:
    """`leaves` equal 1-D leaves holding the elements of `flat`, each its own buffer."""
    parts = jax.jit(lambda x: tuple(jnp.split(x, leaves)))(flat)
    return {f"w{i:04d}": part for i, part in enumerate(parts)}


def random_flat(seed: int, elements: int, dtype: Any) -> jax.Array:
    return jax.jit(lambda key: jax.random.normal(key, (elements,), dtype))(jax.random.key(seed))


def floor_norm(flat: jax.Array) -> jax.Array:
    """The floor: one fused float32 sum of squares over one flat buffer."""
    return jnp.sqrt(jnp.sum(jnp.square(flat.astype(jnp.float32))))


def nothing(tree: Any) -> jax.Array:
    """Does no work: with `keep_unused=True` it measures passing the leaves to a jitted call."""
    del tree
    return jnp.zeros([], jnp.float32)


def optimizer_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def relative_error(value: Any, reference: float) -> float:
    return abs(float(value) - reference) / max(abs(reference), 1e-30)


# ----------------------------------------------------------------------------- norm


def bench_norm(session: Session) -> None:
    """Throughput of a global norm against the one-buffer floor, at constant total bytes."""
    cfg = session.config
    rows = []
    for dtype_name in cfg.dtypes:
        dtype = jnp.dtype(dtype_name)
        total = cfg.norm_bytes // dtype.itemsize
        data = random_flat(0, total, dtype)
        for leaves in cfg.leaves:
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


# ----------------------------------------------------------------------------- step


STEP_IMPLS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: optax.adam(1e-3),
    "optax clip+adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    "optaxclip clip+adam": lambda: optax.chain(
        optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3)
    ),
}


def step_problem(cfg: Config, leaves: int) -> tuple[Any, Any, jax.Array, int]:
    """Float32 params and gradients of `cfg.step_bytes` in `leaves` leaves, and a flat buffer."""
    total = cfg.step_bytes // 4
    per_leaf = total // leaves
    params = split_leaves(random_flat(1, per_leaf * leaves, jnp.float32), leaves)
    grad_flat = random_flat(2, per_leaf * leaves, jnp.float32)
    return params, split_leaves(grad_flat, leaves), grad_flat, per_leaf


def compiled_step(session: Session, impl: str, leaves: int, params: Any, grads: Any) -> Compiled:
    def build() -> Compiled:
        tx = STEP_IMPLS[impl]()
        return compile_call(optimizer_step(tx), params, grads, tx.init(params))

    return session.compiled(("step", impl, leaves), build)


def bench_step(session: Session) -> None:
    """Adam with and without clipping, against adam plus the floor's norm pass."""
    cfg = session.config
    rows = []
    for leaves in cfg.leaves:
        params, grads, grad_flat, per_leaf = step_problem(cfg, leaves)
        size = per_leaf * leaves * 4
        log(f"step {leaves} leaves: compiling")
        built = {impl: compiled_step(session, impl, leaves, params, grads) for impl in STEP_IMPLS}
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


# ----------------------------------------------------------------------------- train


def bench_train(session: Session) -> None:
    """A full training step of a small flax.nnx transformer, with and without clipping."""
    try:
        from flax import nnx
    except ImportError:
        session.note("train", "flax is not installed: skipped (pip install 'optaxclip[examples]')")
        return
    m = session.config.model

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.ln1 = nnx.LayerNorm(m.d_model, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(
                num_heads=m.heads, in_features=m.d_model, decode=False, rngs=rngs
            )
            self.ln2 = nnx.LayerNorm(m.d_model, rngs=rngs)
            self.up = nnx.Linear(m.d_model, 4 * m.d_model, rngs=rngs)
            self.down = nnx.Linear(4 * m.d_model, m.d_model, rngs=rngs)

        def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
            x = x + self.attn(self.ln1(x), mask=mask)
            return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))

    class Transformer(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Embed(m.vocab, m.d_model, rngs=rngs)
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (m.seq, m.d_model)))
            self.blocks = nnx.List([Block(rngs) for _ in range(m.layers)])
            self.ln = nnx.LayerNorm(m.d_model, rngs=rngs)
            self.head = nnx.Linear(m.d_model, m.vocab, rngs=rngs)

        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = self.embed(tokens) + self.pos[...]
            mask = nnx.make_causal_mask(tokens)
            for block in self.blocks:
                x = block(x, mask)
            return self.head(self.ln(x))

    graphdef, params, rest = nnx.split(Transformer(nnx.Rngs(0)), nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(3), (m.batch, m.seq + 1), 0, m.vocab)
    count = sum(x.size for x in jax.tree.leaves(params))
    leaves = len(jax.tree.leaves(params))

    def loss_fn(params: Any, tokens: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def train_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
        def step(params: Any, state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        return step

    built = {}
    for impl, make in STEP_IMPLS.items():
        log(f"train {impl}: compiling")
        tx = make()
        built[impl] = compile_call(train_step(tx), params, tx.init(params), tokens)
    log("train: timing")
    cfg = session.config
    times = interleaved({k: c.call for k, c in built.items()}, cfg.repeats, cfg.min_sample_s)
    base = times["adam"].median
    rows = []
    for impl, c in built.items():
        t = times[impl]
        overhead = t.median / base - 1
        session.record(
            "train",
            impl,
            leaves=leaves,
            dtype="float32",
            size_bytes=count * 4,
            model=dataclasses.asdict(m),
            parameters=count,
            **timing_fields(t, c),
            overhead=overhead,
        )
        row = [impl, leaves, f"{count:,}", ms(t.median), ms(t.min), f"{overhead * 100:+.2f}%"]
        rows.append([*row, f"{c.total_s:.2f}"])
    overhead = times["optaxclip clip+adam"].median / base - 1
    session.target(
        "train",
        f"full-step overhead of optaxclip clipping < {TRAIN_MAX_OVERHEAD:.0%}",
        f"{overhead * 100:+.2f}%",
        overhead < TRAIN_MAX_OVERHEAD,
    )
    print_table(
        f"training step of a flax.nnx transformer (d={m.d_model}, layers={m.layers}, "
        f"seq={m.seq}, batch={m.batch}): forward + backward + update, overhead vs adam alone",
        ["implementation", "leaves", "params", "median ms", "min ms", "overhead", "compile s"],
        rows,
    )


# ----------------------------------------------------------------------------- compile


COMPILE_IMPLS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optaxclip": lambda: optaxclip.clip_by_global_norm(1.0),
    "optax": lambda: optax.clip_by_global_norm(1.0),
}


def bench_compile(session: Session) -> None:
    """Trace + lower + XLA compile of a clip update, fresh each time, against the leaf count."""
    cfg = session.config
    rows = []
    for leaves in cfg.compile_leaves:
        tree = {f"w{i:04d}": jax.ShapeDtypeStruct((128,), jnp.float32) for i in range(leaves)}
        samples: dict[str, list[Compiled]] = {impl: [] for impl in COMPILE_IMPLS}
        for round_ in range(cfg.compile_repeats):
            for impl, make in COMPILE_IMPLS.items():
                log(f"compile {leaves} leaves, {impl}, round {round_ + 1}")
                tx = make()
                # A new function object each time: JAX caches compiles by function.
                update = lambda g, s, tx=tx: tx.update(g, s)
                samples[impl].append(compile_call(update, tree, jax.eval_shape(tx.init, tree)))
        medians = {}
        for impl, runs in samples.items():
            totals = [c.total_s for c in runs]
            medians[impl] = statistics.median(totals)
            lower = statistics.median(c.lower_s for c in runs)
            xla = statistics.median(c.compile_s for c in runs)
            session.record(
                "compile",
                impl,
                leaves=leaves,
                dtype="float32",
                size_bytes=leaves * 128 * 4,
                leaf_shape=[128],
                median_s=medians[impl],
                min_s=min(totals),
                repeats=len(runs),
                lower_s=lower,
                xla_compile_s=xla,
                samples_s=totals,
            )
            rows.append([impl, leaves, f"{medians[impl]:.3f}", f"{min(totals):.3f}"])
            rows[-1] += [f"{lower:.3f}", f"{xla:.3f}"]
        ratio = medians["optaxclip"] / medians["optax"]
        rows[-2].append(f"{ratio:.2f}")
        rows[-1].append("1.00")
        session.target(
            "compile",
            f"optaxclip compile time <= {COMPILE_MAX_RATIO} x optax ({leaves} leaves)",
            f"{ratio:.2f}",
            ratio <= COMPILE_MAX_RATIO,
        )
    print_table(
        "compile time of clip_by_global_norm's update (trace+lower, then XLA compile; fresh jit)",
        ["implementation", "leaves", "median s", "min s", "lower s", "xla s", "x optax"],
        rows,
    )


# ----------------------------------------------------------------------------- collectives


COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_BRANCHES = re.compile(r"\b(?:true_computation|false_computation)=%?([\w.\-]+)")


def _op_pattern(op: str) -> re.Pattern[str]:
    # The opcode follows the result shape: "... f32[8]{0} all-reduce(...)"; GPU splits
    # async collectives into -start/-done pairs, counted once by their -start.
    return re.compile(rf"(?<![\w%.\-]){re.escape(op)}(?:-start)?\(")


def count_collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Collective instructions in compiled HLO text, on the main path and inside conditionals.

    "main" counts those reachable from the entry computation without entering a
    `conditional` branch (every step runs them; a loop body counts once);
    "conditional" counts those only reachable through a branch (a rare path).
    """
    bodies: dict[str, list[str]] = {}
    entry = None
    current: list[str] | None = None
    for line in hlo.splitlines():
        if current is None:
            match = _HEADER.match(line)
            if match and "->" in line:
                current = bodies.setdefault(match.group(1), [])
                if line.startswith("ENTRY"):
                    entry = match.group(1)
        elif line.strip() == "}":
            current = None
        else:
            current.append(line)
    calls: dict[str, set[str]] = {}
    branches: dict[str, set[str]] = {}
    for name, lines in bodies.items():
        calls[name], branches[name] = set(), set()
        for line in lines:
            found = set(_CALLEE.findall(line))
            for group in _CALLEE_LIST.findall(line):
                found |= {c.strip().lstrip("%") for c in group.split(",") if c.strip()}
            if re.search(r"\bconditional\(", line):
                listed = set(_BRANCHES.findall(line))
                for group in re.findall(r"\bbranch_computations=\{([^}]*)\}", line):
                    listed |= {c.strip().lstrip("%") for c in group.split(",") if c.strip()}
                branches[name] |= listed
                found -= listed
            calls[name] |= found

    def reach(start: set[str], follow_branches: bool) -> set[str]:
        seen, todo = set(), list(start)
        while todo:
            name = todo.pop()
            if name in seen or name not in bodies:
                continue
            seen.add(name)
            todo += calls[name]
            if follow_branches:
                todo += branches[name]
        return seen

    main = reach({entry} if entry else set(bodies), follow_branches=False)
    conditional = reach({b for n in main for b in branches[n]}, follow_branches=True) - main
    counts = {}
    for op in COLLECTIVE_OPS:
        pattern = _op_pattern(op)
        counts[op] = {
            "main": sum(len(pattern.findall(line)) for n in main for line in bodies[n]),
            "conditional": sum(
                len(pattern.findall(line)) for n in conditional for line in bodies[n]
            ),
        }
    return counts


def one_all_reduce(impl: str, mode: str) -> str:
    return f"exactly {ALL_REDUCES_PER_TRANSFORM} all-reduce per step: {impl}, {mode}"


def collective_devices() -> list[Any]:
    """The default backend's devices when it has several, else the (simulated) CPU devices."""
    devices = jax.devices()
    return devices if len(devices) >= 2 else jax.devices("cpu")


def bench_collectives(session: Session) -> None:
    """All-reduces per step in the compiled HLO of a 50-leaf update under pmap and shard_map."""
    devices = collective_devices()
    n = min(len(devices), 8)
    if n < 2:
        session.note(
            "collectives",
            "needs at least 2 devices; set XLA_FLAGS=--xla_force_host_platform_device_count=8",
        )
        return
    devices = devices[:n]
    leaves = session.config.collective_leaves
    local = 16
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
    for mode, axis_name, run in cases:
        for impl, tx in transforms(axis_name).items():
            log(f"collectives {mode} {impl}")
            start = time.perf_counter()
            try:
                compiled, state = run(tx)
            except Exception as err:  # one failing case must not hide the others
                message = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                session.note("collectives", f"{impl} under {mode} failed: {message}")
                session.record("collectives", impl, mode=mode, leaves=leaves, error=message)
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
                mode=mode,
                leaves=leaves,
                dtype="float32",
                devices=n,
                device_platform=devices[0].platform,
                size_bytes=leaves * n * local * 4,
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


# ----------------------------------------------------------------------------- adaptive


def _adaptive_transform(name: str, factory: Any) -> optax.GradientTransformation:
    adam = optax.adam(1e-3)
    if name == "guard":
        return factory(optax.chain(optaxclip.clip_by_global_norm(1.0), adam), z_threshold=3.0)
    return optax.chain(factory(), adam)


def bench_adaptive(session: Session) -> None:
    """Adaptive policies and guard against clip_by_global_norm, each in a step with adam."""
    cfg = session.config
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
    for leaves in cfg.adaptive_leaves:
        params, grads, _, per_leaf = step_problem(cfg, leaves)
        size = per_leaf * leaves * 4
        built = {
            "clip_by_global_norm": compiled_step(
                session, "optaxclip clip+adam", leaves, params, grads
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


# ----------------------------------------------------------------------------- main


BENCHMARKS: dict[str, Callable[[Session], None]] = {
    "norm": bench_norm,
    "step": bench_step,
    "train": bench_train,
    "compile": bench_compile,
    "collectives": bench_collectives,
    "adaptive": bench_adaptive,
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark optaxclip against optax and the memory-bandwidth floor.",
    )
    parser.add_argument("--quick", action="store_true", help="reduced sizes and repeats")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only these benchmarks: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="interleaved samples per run-time measurement (default 15, quick 5)",
    )
    parser.add_argument(
        "--compile-repeats",
        type=int,
        help="fresh compiles per implementation in `compile` (default 3, quick 2)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the JSON file to write "
        "(default benchmarks/results/<platform>-<full|quick>[-<only>].json)",
    )
    args = parser.parse_args(argv)
    for flag in ("repeats", "compile_repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    config = make_config(args.quick, machine["platform"])
    overrides = {}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.compile_repeats is not None:
        overrides["compile_repeats"] = args.compile_repeats
    config = dataclasses.replace(config, **overrides)
    names = [n for n in BENCHMARKS if args.only is None or n in args.only]
    stem = f"{machine['platform']}-{config.mode}"
    if args.only is not None:
        stem += "-" + "+".join(names)
    out = args.out or RESULTS / f"{stem}.json"
    session = Session(config, machine, out, ["benchmarks/run.py", *sys.argv[1:]])

    print(
        f"optaxclip {machine['optaxclip']} ({machine['optaxclip_git']}), jax {machine['jax']}, "
        f"optax {machine['optax']}, flax {machine['flax']}"
    )
    print(
        f"device: {machine['platform']} / {machine['device_kind']} x{machine['device_count']}; "
        f"{machine['cpus_usable']} of {machine['cpu_count']} CPUs ({machine['cpu_model']}); "
        f"load average {machine['load_average']}"
    )
    print(f"run: {config.mode}, {config.repeats} interleaved repeats; writing {out}")
    failed = []
    started = time.perf_counter()
    for name in names:
        print(f"\n== {name}", flush=True)
        begun = time.perf_counter()
        try:
            BENCHMARKS[name](session)
        except Exception as err:
            failed.append(name)
            traceback.print_exc()
            session.note(name, f"FAILED: {type(err).__name__}: {err}")
        print(f"  ({name}: {time.perf_counter() - begun:.0f} s)", flush=True)
        session.write()

    if session.targets:
        print_table(
            "targets",
            ["benchmark", "target", "figure", "result"],
            [
                [t.benchmark, t.target, t.figure, "PASS" if t.passed else "FAIL"]
                for t in session.targets
            ],
        )
    for note in session.notes:
        print(f"note [{note['benchmark']}]: {note['note']}")
    missed = sum(not t.passed for t in session.targets)
    print(
        f"\n{len(session.records)} records, {missed} of {len(session.targets)} targets missed, "
        f"{time.perf_counter() - started:.0f} s; written to {out}"
    )
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
