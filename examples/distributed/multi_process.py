"""Several processes, one clip: `jax.distributed` on one machine gives one process's results.

Run: python examples/distributed/multi_process.py [--num-processes N] [--devices-per-process D]

The script launches N local processes of itself (each with D simulated CPU devices), which
join one `jax.distributed` cluster on 127.0.0.1 with gloo CPU collectives. Together they
clip the same gradients on a mesh over all N * D devices, twice:

- under `jax.jit` with FSDP-like shardings (no `axis_name`), and
- under `jax.shard_map` with `clip_by_global_norm(axis_name="x")`, a replicated leaf counted once.

Each process gathers the results and writes them out; the launcher checks that every process
holds the same bits, and that they equal clipping the whole gradient in this one process.
"""

import os
import sys

if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

AXIS = "x"
SPECS = {"w": P(AXIS), "v": P(AXIS), "b": P()}
MAX_NORM = 1.0


def gradients(devices: int) -> dict[str, np.ndarray]:
    """The whole gradient, the same in every process: rows divisible by the device count."""
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(4 * devices, 6)).astype(np.float32),
        "v": (2.0 * rng.normal(size=(2 * devices,))).astype(np.float32),
        "b": (3.0 * rng.normal(size=(5,))).astype(np.float32),
    }


def clip_in_cluster(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """In a worker: clip on a mesh over every process's devices, under jit and shard_map."""
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
    placed = {
        k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, SPECS[k]), lambda i, v=v: v[i])
        for k, v in grads.items()
    }
    jit_tx = optaxclip.clip_by_global_norm(MAX_NORM)
    map_tx = optaxclip.clip_by_global_norm(MAX_NORM, axis_name=AXIS)

    def jit_update(g: Any) -> Any:
        updates, state = jit_tx.update(g, jit_tx.init(g))
        return updates, state.grad_norm

    def map_update(g: Any) -> Any:
        updates, state = map_tx.update(g, map_tx.init(g))
        return updates, state.grad_norm

    results = {
        "jit": jax.jit(jit_update)(placed),
        "shard_map": jax.jit(
            jax.shard_map(map_update, mesh=mesh, in_specs=(SPECS,), out_specs=(SPECS, P()))
        )(placed),
    }
    # Replicate every result on every device, so each process can read the whole of it.
    results = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(results)
    out = {}
    for how, (updates, grad_norm) in results.items():
        for k, v in updates.items():
            out[f"{how}/updates/{k}"] = np.asarray(v.addressable_data(0))
        out[f"{how}/grad_norm"] = np.asarray(grad_norm.addressable_data(0))
    return out


def worker(port: int, num_processes: int, process_id: int, out: Path, timeout: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
        coordinator_bind_address=f"127.0.0.1:{port}",
        shutdown_timeout_seconds=timeout,
    )
    results = clip_in_cluster(gradients(jax.device_count()))
    np.savez(out / f"process{process_id}.npz", **results)
    print(
        f"process {jax.process_index()}: devices {[d.id for d in jax.local_devices()]}, "
        f"grad_norm jit {results['jit/grad_norm']:.6f}, "
        f"shard_map {results['shard_map/grad_norm']:.6f}"
    )
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(num_processes: int, devices_per_process: int, timeout: int, out: Path) -> None:
    """Runs the workers, each with its own device count, and waits for them (bounded)."""
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices_per_process}",
        "JAX_PLATFORMS": "cpu",
    }
    port = _free_port()
    common = ["--port", str(port), "--out", str(out), "--num-processes", str(num_processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(i), *common, "--timeout", str(timeout)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        lines = log.strip().splitlines()
        if proc.returncode != 0:
            raise RuntimeError(f"process {i} failed (exit {proc.returncode}):\n{log}")
        print(lines[-1] if lines else f"process {i}: no output")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=120, help="seconds, for all processes")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        worker(args.port, args.num_processes, args.worker, args.out, args.timeout)
        return {}

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        launch(args.num_processes, args.devices_per_process, args.timeout, out)
        per_process = []
        for i in range(args.num_processes):
            with np.load(out / f"process{i}.npz") as f:
                per_process.append({k: f[k] for k in f.files})

    identical = all(
        all(r[k].tobytes() == per_process[0][k].tobytes() for k in per_process[0])
        for r in per_process
    )
    # The same clip in this one process, on one device, of the whole gradient.
    grads = gradients(args.num_processes * args.devices_per_process)
    tx = optaxclip.clip_by_global_norm(MAX_NORM)
    updates, state = tx.update(grads, tx.init(grads))
    single = {f"updates/{k}": np.asarray(v) for k, v in updates.items()}
    single["grad_norm"] = np.asarray(state.grad_norm)
    max_diff = max(
        float(np.max(np.abs(per_process[0][f"{how}/{k}"] - v)) / max(1.0, float(np.max(np.abs(v)))))
        for how in ("jit", "shard_map")
        for k, v in single.items()
    )
    print(f"results bit-identical on all {args.num_processes} processes: {identical}")
    print(f"largest relative difference from one process: {max_diff:.2e}")
    return {
        "num_processes": len(per_process),
        "identical_across_processes": identical,
        "max_diff_vs_single_process": max_diff,
    }


if __name__ == "__main__":
    main()
