"""One process of the multi-process test in `test_distributed.py`; pytest does not collect it.

The test runs it as `python _multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID OUT` with
XLA_FLAGS giving each process 2 CPU devices. The process joins a `jax.distributed` cluster on
127.0.0.1 with gloo CPU collectives, clips the gradients of `gradients()` (the same in every
process and in the test) on a mesh over all processes' devices, and pickles to OUT, for every
case, each of its devices' shards of the results (or the traceback of a failure), so that the
test can put the whole arrays together and compare the processes bit for bit.
"""

import pickle
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

AXIS = "x"
# FSDP-like: the large leaves split along their first axis, the small one replicated.
SPECS = {"w": P(AXIS), "v": P(AXIS), "b": P()}
MAX_NORM = 1.0
# An element of "w" in the last block of rows, so on one device of one process only.
NAN_AT = (13, 4)
TIMEOUT_S = 60


def gradients(nan: bool = False) -> dict[str, np.ndarray]:
    """The whole gradients, the same in every process and in the test (norm about 12)."""
    rng = np.random.default_rng(7)
    grads = {
        "w": rng.normal(size=(16, 6)),
        "v": 2.0 * rng.normal(size=(8,)),
        "b": 3.0 * rng.normal(size=(5,)),
    }
    grads = {k: v.astype(np.float32) for k, v in grads.items()}
    if nan:
        grads["w"][NAN_AT] = np.nan
    return grads


# Each case: how the update runs, whether one element of "w" is NaN, the options of the clip.
CASES: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "jit": ("jit", False, {}),
    "jit_nan_skip": ("jit", True, {"nonfinite": "skip"}),
    "shard_map": ("shard_map", False, {}),
    "shard_map_nan_zero": ("shard_map", True, {"nonfinite": "zero"}),
}


def transform(case: str, *, distributed: bool = True) -> Any:
    """The case's clip; with `distributed=False`, its twin for one process and one device."""
    kind, _, options = CASES[case]
    axis_name = AXIS if distributed and kind == "shard_map" else None
    return optaxclip.clip_by_global_norm(MAX_NORM, axis_name=axis_name, **options)


def _shards(x: jax.Array) -> list[tuple[Any, np.ndarray, int]]:
    return [(s.index, np.asarray(s.data), s.device.id) for s in x.addressable_shards]


def _run(kind: str, tx: Any, grads: dict[str, np.ndarray]) -> dict[str, Any]:
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
    placed = {
        k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, SPECS[k]), lambda i, v=v: v[i])
        for k, v in grads.items()
    }

    def update(g: Any) -> tuple[Any, Any, Any]:
        updates, state = tx.update(g, tx.init(g))
        return updates, state.grad_norm, state.nonfinite

    if kind == "jit":
        fn: Callable[..., Any] = jax.jit(update)
    else:
        fn = jax.jit(
            jax.shard_map(update, mesh=mesh, in_specs=(SPECS,), out_specs=(SPECS, P(), P()))
        )
    updates, grad_norm, nonfinite = fn(placed)
    arrays = {f"updates/{k}": _shards(v) for k, v in updates.items()}
    arrays["grad_norm"] = _shards(grad_norm)
    arrays["nonfinite"] = _shards(nonfinite)
    return arrays


def main(argv: list[str]) -> None:
    port, num_processes, process_id, out = argv
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=int(num_processes),
        process_id=int(process_id),
        initialization_timeout=TIMEOUT_S,
        coordinator_bind_address=f"127.0.0.1:{port}",
        shutdown_timeout_seconds=TIMEOUT_S,
    )
    results: dict[str, Any] = {
        "process_index": jax.process_index(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
    }
    for case, (kind, nan, _) in CASES.items():
        try:
            arrays = _run(kind, transform(case), gradients(nan=nan))
            results[case] = {"error": None, "arrays": arrays}
        except Exception:
            results[case] = {"error": traceback.format_exc(), "arrays": {}}
    with open(out, "wb") as f:
        pickle.dump(results, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
