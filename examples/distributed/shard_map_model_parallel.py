"""Model parallelism with `jax.shard_map`: a sharded MLP, clipped by the norm of the whole.

Run: python examples/distributed/shard_map_model_parallel.py [--steps N]

A mesh ("data", "model") = (2, 4) of 8 devices (simulated CPU devices when run as a
script). The batch is split over "data"; the hidden layer of a two-layer MLP is split over
"model": each device holds a quarter of w1's columns, of b1 and of w2's rows, while the
output bias b2 is replicated. Inside `shard_map` every device sees only its slice of the
gradient, so its own norm is not the global norm. Two things make the clip global:

- the gradients are reduced over "data" (here by `shard_map` itself: the parameters are
  invariant over "data", so the transpose of their implicit broadcast sums their gradients);
- `clip_by_global_norm(max_norm, axis_name="model")` adds the partial norms of the leaves
  that vary over "model" and counts b2, invariant over "model", once: one all-reduce.

Had the gradients still varied over "data", the clip would refuse them at trace time rather
than clip each data shard by a different norm. The script trains the sharded model and the
same model on one device side by side and prints the norms both measured; they agree to
float32 rounding, and so do the parameters at the end.
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


def init_params(seed: int, hidden: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(size=(1, hidden)),
        "b1": np.zeros(hidden),
        "w2": rng.normal(size=(hidden, 1)) / np.sqrt(hidden),
        "b2": np.zeros(1),
    }
    return {k: v.astype(np.float32) for k, v in params.items()}


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """The mean squared error of the whole batch, on one device."""
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return jnp.mean(jnp.square(h @ params["w2"] + params["b2"][None, :] - y))


def sharded_loss_fn(
    params: dict[str, jax.Array], x: jax.Array, y: jax.Array, batch: int
) -> jax.Array:
    """The same loss inside `shard_map`: this device's hidden units and rows of the batch."""
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    out = jax.lax.psum(h @ params["w2"], "model") + params["b2"][None, :]
    # Summed over "data" by the gradient (see the module docstring), so divide by the
    # whole batch size.
    return jnp.sum(jnp.square(out - y)) / batch


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--max-norm", type=float, default=1.0)
    args = parser.parse_args(argv)

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    clip = optaxclip.clip_by_global_norm(args.max_norm, axis_name="model")
    tx = optax.chain(clip, optax.adam(1e-2))
    reference_tx = optax.chain(optaxclip.clip_by_global_norm(args.max_norm), optax.adam(1e-2))

    def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        grads = jax.grad(sharded_loss_fn)(params, x, y, args.batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # The optimizer state holds copies of the parameters (Adam's moments): shard them alike.
    params0 = init_params(0, args.hidden)
    state_specs = optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        jax.eval_shape(tx.init, params0),
        SPECS,
        transform_non_params=lambda _: P(),
        is_leaf=lambda s: isinstance(s, P),
    )
    data_spec = P("data", None)
    step = jax.jit(
        jax.shard_map(
            train_step,
            mesh=mesh,
            in_specs=(SPECS, state_specs, data_spec, data_spec),
            out_specs=(SPECS, state_specs),
        )
    )
    init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(SPECS,), out_specs=state_specs))

    @jax.jit
    def reference_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = reference_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params0.items()}
    opt_state = init(params)
    ref_params, ref_state = params0, reference_tx.init(params0)

    log = []
    print(f"mesh {dict(mesh.shape)}, hidden units split over 'model', batch over 'data'")
    print(f"{'step':>4} {'grad_norm (sharded)':>20} {'(one device)':>13} {'clipped':>7}")
    for t in range(args.steps):
        x = np.random.default_rng(t + 1).uniform(-1, 1, (args.batch, 1)).astype(np.float32)
        y = np.sin(3 * x) * np.float32(20.0 if t % 5 == 2 else 1.0)
        sharding = NamedSharding(mesh, data_spec)
        params, opt_state = step(params, opt_state, *jax.device_put((x, y), sharding))
        ref_params, ref_state = reference_step(ref_params, ref_state, x, y)
        stats = optaxclip.stats(opt_state)
        ref_stats = jax.device_get(optaxclip.stats(ref_state))
        # Each device's own copy of the (replicated) statistics: they must all agree.
        copies = [
            {s.device.id: np.asarray(s.data).tobytes() for s in v.addressable_shards}
            for v in stats.values()
        ]
        row = {
            "grad_norm": float(stats["grad_norm"]),
            "unsharded_grad_norm": float(ref_stats["grad_norm"]),
            "clipped": bool(stats["clipped"]),
            "stats_identical": all(len(set(c.values())) == 1 for c in copies),
        }
        log.append(row)
        print(
            f"{t:>4} {row['grad_norm']:>20.5f} {row['unsharded_grad_norm']:>13.5f} "
            f"{row['clipped']!s:>7}"
        )

    max_param_diff = max(
        float(np.max(np.abs(np.asarray(params[k]) - np.asarray(ref_params[k])))) for k in params
    )
    stats_identical = all(row["stats_identical"] for row in log)
    print(f"largest parameter difference, sharded vs one device: {max_param_diff:.2e}")
    print(f"clip statistics identical on all {mesh.size} devices: {stats_identical}")
    return {"log": log, "max_param_diff": max_param_diff, "stats_identical": stats_identical}


if __name__ == "__main__":
    main()
