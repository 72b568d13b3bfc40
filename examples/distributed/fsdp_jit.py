"""Fully sharded data parallelism under `jax.jit`: the clip needs nothing, and stays sharded.

Run: python examples/distributed/fsdp_jit.py [--steps N]

A one-axis mesh "fsdp" over 8 devices (simulated CPU devices when run as a script): every
weight matrix, and with it its gradient and Adam's moments, is split along its first axis;
the biases are replicated; the batch is split over the same axis. Under `jax.jit` with such
shardings `optaxclip.clip_by_global_norm` takes no `axis_name`: XLA turns each leaf's sum of
squares into a sum over the local shard plus an all-reduce of a few scalars.

The script compiles the optimizer update (`optax.chain(clip, adam).update`) for the sharded
gradients and prints its collectives: all-reduces only, no all-gather (no device ever holds
a whole matrix), and the updates come out with the shardings the gradients went in with.
Then it trains the sharded model and the same model on one device side by side: the
parameters agree to float32 rounding and keep their shardings.
"""

import os

if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

AXIS = "fsdp"
# Large leaves split along their first axis, small ones replicated.
SPECS = {"w1": P(AXIS), "b1": P(), "w2": P(AXIS), "b2": P(), "w3": P(AXIS), "b3": P()}
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\(")


def init_params(seed: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(size=(8, width)) / np.sqrt(8.0),
        "b1": np.zeros(width),
        "w2": rng.normal(size=(width, width)) / np.sqrt(width),
        "b2": np.zeros(width),
        "w3": rng.normal(size=(width, 1)) / np.sqrt(width),
        "b3": np.zeros(1),
    }
    return {k: v.astype(np.float32) for k, v in params.items()}


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    h = jnp.tanh(h @ params["w2"] + params["b2"][None, :])
    return jnp.mean(jnp.square(h @ params["w3"] + params["b3"][None, :] - y))


def collectives(hlo: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for match in COLLECTIVE.finditer(hlo):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--max-norm", type=float, default=5.0)
    args = parser.parse_args(argv)

    # Auto axes: XLA's sharding propagation (GSPMD) places every intermediate.
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    tx = optax.chain(optaxclip.clip_by_global_norm(args.max_norm), optax.adam(1e-2))

    params0 = init_params(0, args.width)
    params = jax.device_put(params0, shardings)
    # Adam's moments are sharded as the parameters they follow, the counters replicated.
    # (`init` makes zeros, which carry no sharding of their own: say where they go.)
    state_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params0),
        shardings,
        transform_non_params=lambda _: NamedSharding(mesh, P()),
    )
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)

    # The optimizer update alone, for sharded gradients: what does it communicate?
    compiled = jax.jit(tx.update).lower(params, opt_state, params).compile()
    counts = collectives(compiled.as_text())
    out_shardings = compiled.output_shardings[0]
    shardings_kept = all(
        out_shardings[k].is_equivalent_to(shardings[k], params0[k].ndim) for k in SPECS
    )
    print(f"mesh {dict(mesh.shape)}; the compiled optimizer update has collectives {counts}")
    print(f"updates keep the gradients' shardings: {shardings_kept}")

    def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(train_step)
    batch_sharding = NamedSharding(mesh, P(AXIS))
    ref_params, ref_state = params0, tx.init(params0)

    log = []
    print(f"{'step':>4} {'grad_norm (sharded)':>20} {'(one device)':>13} {'clipped':>7}")
    for t in range(args.steps):
        x = np.random.default_rng(t + 1).normal(size=(args.batch, 8)).astype(np.float32)
        y = np.sin(x[:, :1]) * np.float32(30.0 if t % 5 == 2 else 1.0)
        params, opt_state = step(params, opt_state, *jax.device_put((x, y), batch_sharding))
        ref_params, ref_state = step(ref_params, ref_state, x, y)
        stats, ref_stats = jax.device_get((optaxclip.stats(opt_state), optaxclip.stats(ref_state)))
        row = {
            "grad_norm": float(stats["grad_norm"]),
            "unsharded_grad_norm": float(ref_stats["grad_norm"]),
            "clipped": bool(stats["clipped"]),
        }
        log.append(row)
        print(
            f"{t:>4} {row['grad_norm']:>20.5f} {row['unsharded_grad_norm']:>13.5f} "
            f"{row['clipped']!s:>7}"
        )

    shardings_kept &= all(
        params[k].sharding.is_equivalent_to(shardings[k], params0[k].ndim) for k in SPECS
    ) and all(
        jax.tree.leaves(
            jax.tree.map(
                lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), opt_state, state_shardings
            )
        )
    )
    max_param_diff = max(
        float(np.max(np.abs(np.asarray(params[k]) - np.asarray(ref_params[k])))) for k in SPECS
    )
    print(f"parameters and optimizer state still sharded as at the start: {shardings_kept}")
    print(f"largest parameter difference, sharded vs one device: {max_param_diff:.2e}")
    return {
        "collectives": counts,
        "shardings_kept": shardings_kept,
        "max_param_diff": max_param_diff,
        "log": log,
    }


if __name__ == "__main__":
    main()
