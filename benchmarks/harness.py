"""The timing harness every benchmark uses: configuration, compile-then-time, JSON, tables.

A benchmark module (see `benchmarks/registry.py`) gets a `Session` and records into it;
the harness owns how things are timed (`compile_call`, `interleaved`), what a record
looks like (`Session.record`, one schema for every benchmark) and how the document is
written (`Session.write`, after every benchmark, so an interrupted run keeps what it
measured).
"""

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import optaxclip

MiB = 2**20
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# Version of the JSON document. 1: one flat `config` (run.py as a single file);
# 2: `config.benchmarks` holds each benchmark's own sizes, and the `lowering`
# benchmark's records.
SCHEMA = 2


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every benchmark of one run shares; each module sizes itself from it.

    Attributes:
      mode: "full" or "quick".
      accelerator: the default device is not a CPU (buffers grow so launch cost vanishes).
      repeats: interleaved rounds of every run-time measurement.
      compile_repeats: fresh compiles per implementation in the `compile` benchmark.
      min_sample_s: each sample times enough back-to-back calls to last this long.
    """

    mode: str
    accelerator: bool
    repeats: int
    compile_repeats: int
    min_sample_s: float

    @property
    def quick(self) -> bool:
        return self.mode == "quick"


def make_run_config(
    quick: bool,
    platform_name: str,
    repeats: int | None = None,
    compile_repeats: int | None = None,
) -> RunConfig:
    """Full: 15 interleaved repeats, 3 fresh compiles, 100 ms samples; quick: 5, 2, 50 ms."""
    return RunConfig(
        mode="quick" if quick else "full",
        accelerator=platform_name != "cpu",
        repeats=repeats or (5 if quick else 15),
        compile_repeats=compile_repeats or (2 if quick else 3),
        min_sample_s=0.05 if quick else 0.1,
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
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """The machine and software a record was measured with; every record carries it."""
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
    """Lowers and compiles `fn` for `args`; later calls of the jitted function reuse the result.

    `args` may be `jax.ShapeDtypeStruct`s when only the compile time is wanted
    (then `call` must not be used).
    """
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


def compile_samples_fields(runs: Sequence[Compiled]) -> dict[str, Any]:
    """The fields of a compile-time record: medians over fresh compiles, and every sample."""
    totals = [c.total_s for c in runs]
    return {
        "median_s": statistics.median(totals),
        "min_s": min(totals),
        "repeats": len(runs),
        "lower_s": statistics.median(c.lower_s for c in runs),
        "xla_compile_s": statistics.median(c.compile_s for c in runs),
        "samples_s": totals,
    }


# ----------------------------------------------------------------------------- session


@dataclasses.dataclass(frozen=True)
class Target:
    """One target, with the figure this run measured for it and whether it was met."""

    benchmark: str
    target: str
    figure: str
    passed: bool


@dataclasses.dataclass
class Session:
    """What a run has measured so far, written to JSON after every benchmark.

    Attributes:
      run: the shared configuration of this run.
      machine: `machine_info()`, copied into every record.
      out: the JSON file.
      command: the command line, for the document.
      sizes: each benchmark's own configuration (a dataclass), by benchmark name.
      records: one dict per measurement (see `record`).
      targets: every target checked so far.
      notes: lines the reader must see (skipped, unavailable, failed).
      cache: compiled steps shared between benchmarks (see `compiled`).
    """

    run: RunConfig
    machine: dict[str, Any]
    out: Path
    command: list[str]
    sizes: dict[str, Any] = dataclasses.field(default_factory=dict)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[dict[str, str]] = dataclasses.field(default_factory=list)
    cache: dict[Any, Compiled] = dataclasses.field(default_factory=dict)

    def record(
        self,
        benchmark: str,
        implementation: str,
        *,
        leaves: int | None,
        dtype: str | None,
        size_bytes: int | None,
        **fields: Any,
    ) -> None:
        """Appends one record. Every record of every benchmark has the same leading keys.

        `benchmark`, `implementation`, `leaves`, `dtype` and `size_bytes` (None where
        they do not apply), then the benchmark's own fields, then `machine`.
        """
        self.records.append(
            {
                "benchmark": benchmark,
                "implementation": implementation,
                "leaves": leaves,
                "dtype": dtype,
                "size_bytes": size_bytes,
                **fields,
                "machine": self.machine,
            }
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

    def document(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.out.stem,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": self.command,
            "config": dataclasses.asdict(self.run)
            | {"benchmarks": {name: _asdict(s) for name, s in self.sizes.items()}},
            "machine": self.machine,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "targets": [dataclasses.asdict(t) for t in self.targets],
            "notes": self.notes,
            "records": self.records,
        }

    def write(self) -> None:
        """Writes the document atomically (a reader never sees half a file)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.document(), indent=1, default=_json_default) + "\n")
        tmp.replace(self.out)


def _asdict(sizes: Any) -> Any:
    if dataclasses.is_dataclass(sizes) and not isinstance(sizes, type):
        return dataclasses.asdict(sizes)
    return sizes


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | jax.Array):
        return np.asarray(x).item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def log(text: str) -> None:
    """Progress, on stderr: what is compiling or timing now."""
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
