"""Data parallelism with `jax.pmap`: average the gradients over the devices, then clip.

Run: python examples/distributed/data_parallel_pmap.py [--steps N]

Every device (8 simulated CPU devices when run as a script) holds a replica of a small
MLP and gets its own batch of y = sin(3x). At one step a single device's batch has its
targets blown up (x100), a gradient spike that only it sees. The train step averages the
gradients with `jax.lax.pmean` *before* clipping: after the mean every device holds the same
gradient, so `optaxclip.clip_by_global_norm` measures the same norm on every device, takes
the same decision, and the parameters stay bit-identical on all of them, step after step.

Clipping each device's own gradient before the mean (what a clip placed inside the
per-device step does silently) would scale each replica by a different factor: the script
prints, at each step, the spread of the norms the devices would have used.
"""

import os

if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

AXIS = "devices"


def init_params(seed: int, hidden: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(size=(1, hidden)),
        "b1": np.zeros(hidden),
        "w2": rng.normal(size=(hidden, 1)) / np.sqrt(hidden),
        "b2": np.zeros(1),
    }
    return {k: v.astype(np.float32) for k, v in params.items()}


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return jnp.mean(jnp.square(h @ params["w2"] + params["b2"][None, :] - y))


def batches(step: int, devices: int, batch: int, spike: bool) -> tuple[np.ndarray, np.ndarray]:
    """One batch per device, shape (devices, batch, 1); with `spike`, device 0's is blown up."""
    x = np.random.default_rng(step + 1).uniform(-1, 1, (devices, batch, 1)).astype(np.float32)
    y = np.sin(3 * x)
    if spike:
        y[0] *= 100.0
    return x, y


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-norm", type=float, default=2.0)
    parser.add_argument("--spike-step", type=int, default=3)
    args = parser.parse_args(argv)

    devices = jax.local_device_count()
    tx = optax.chain(optaxclip.clip_by_global_norm(args.max_norm), optax.adam(1e-2))

    def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        # What a clip of this device's own gradient would measure (for the printout only).
        local_norm = optaxclip.global_norm(grads)
        # First the mean over devices: from here on the gradient is the same everywhere ...
        grads = jax.lax.pmean(grads, AXIS)
        # ... so the clip needs no `axis_name`, and every device takes the same decision.
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, jax.lax.pmean(loss, AXIS), local_norm

    step = jax.pmap(train_step, axis_name=AXIS)

    # The same initial values on every device: a leading axis of size `devices`.
    params = {k: np.broadcast_to(p, (devices, *p.shape)) for k, p in init_params(0).items()}
    opt_state = jax.pmap(tx.init)(params)

    log = []
    print(f"{devices} devices, max_norm={args.max_norm}")
    print(f"{'step':>4} {'loss':>10} {'grad_norm':>10} {'clipped':>7}  per-device norms (min..max)")
    for t in range(args.steps):
        x, y = batches(t, devices, args.batch, spike=t == args.spike_step)
        params, opt_state, loss, local_norms = step(params, opt_state, x, y)
        stats = jax.device_get(optaxclip.stats(opt_state))  # one value per device
        row = {
            "loss": float(np.asarray(loss)[0]),
            "grad_norm": float(stats["grad_norm"][0]),
            "clipped": bool(stats["clipped"][0]),
            "local_norms": np.asarray(local_norms).tolist(),
            "stats_identical": all(len(set(v.tolist())) == 1 for v in stats.values()),
        }
        log.append(row)
        print(
            f"{t:>4} {row['loss']:>10.4f} {row['grad_norm']:>10.4f} {row['clipped']!s:>7}  "
            f"{min(row['local_norms']):.3g}..{max(row['local_norms']):.3g}"
        )

    identical = all(
        all(leaf[0].tobytes() == leaf[d].tobytes() for d in range(devices))
        for leaf in jax.tree.leaves(jax.device_get(params))
    ) and all(row["stats_identical"] for row in log)
    print(f"parameters and clip statistics bit-identical on all {devices} devices: {identical}")
    return {"params": params, "log": log, "identical": identical, "spike_step": args.spike_step}


if __name__ == "__main__":
    main()
