"""The command line: which benchmarks, how many repeats, where the JSON goes; then the summary."""

import argparse
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks import harness, registry


def parse_args(argv: Sequence[str], prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark optaxclip against optax and the memory-bandwidth floor.",
    )
    names = list(registry.BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="reduced sizes and repeats")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=names,
        metavar="NAME",
        help=f"run only these benchmarks: {', '.join(names)}",
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


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks/run.py") -> int:
    """Runs the chosen benchmarks in registry order; 1 if any of them raised."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    machine = harness.machine_info()
    run = harness.make_run_config(
        args.quick, machine["platform"], args.repeats, args.compile_repeats
    )
    names = [n for n in registry.BENCHMARKS if args.only is None or n in args.only]
    stem = f"{machine['platform']}-{run.mode}"
    if args.only is not None:
        stem += "-" + "+".join(names)
    out = args.out or harness.RESULTS / f"{stem}.json"
    session = harness.Session(run, machine, out, [prog, *argv])

    print(
        f"optaxclip {machine['optaxclip']} ({machine['optaxclip_git']}), jax {machine['jax']}, "
        f"optax {machine['optax']}, flax {machine['flax']}"
    )
    print(
        f"device: {machine['platform']} / {machine['device_kind']} x{machine['device_count']}; "
        f"{machine['cpus_usable']} of {machine['cpu_count']} CPUs ({machine['cpu_model']}); "
        f"load average {machine['load_average']}"
    )
    print(f"run: {run.mode}, {run.repeats} interleaved repeats; writing {out}")
    failed = []
    started = time.perf_counter()
    for name in names:
        print(f"\n== {name}", flush=True)
        begun = time.perf_counter()
        try:
            module = registry.load(name)
            sizes = module.configure(run)
            session.sizes[name] = sizes
            module.run(session, sizes)
        except Exception as err:
            failed.append(name)
            traceback.print_exc()
            session.note(name, f"FAILED: {type(err).__name__}: {err}")
        print(f"  ({name}: {time.perf_counter() - begun:.0f} s)", flush=True)
        session.write()

    if session.targets:
        harness.print_table(
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
