"""Quick start: a clip chained into adam on a small regression model, with its statistics per step.

Run: python examples/quickstart.py [--steps N]

A two-layer MLP learns y = sin(3x); one batch in ten has its targets blown up
(x100) to make a gradient spike. `optaxclip.clip_by_global_norm` keeps the step
bounded and reports, at no extra cost, the norm it measured, whether it clipped,
and how many non-finite elements it saw.
"""

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaxclip


def init_params(key: jax.Array, hidden: int = 32) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (1, hidden)),
        "b1": jnp.zeros((1, hidden)),
        "w2": jax.random.normal(k2, (hidden, 1)) / jnp.sqrt(hidden),
        "b2": jnp.zeros((1, 1)),
    }


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean(jnp.square(h @ params["w2"] + params["b2"] - y))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-norm", type=float, default=1.0)
    args = parser.parse_args(argv)

    tx = optax.chain(optaxclip.clip_by_global_norm(args.max_norm), optax.adam(1e-2))
    params = init_params(jax.random.key(0))
    opt_state = tx.init(params)

    @jax.jit
    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    log = []
    print(f"{'step':>4} {'loss':>10} {'grad_norm':>10} {'clipped':>7} {'nonfinite':>9}")
    for t in range(args.steps):
        x = jax.random.uniform(jax.random.key(t + 1), (64, 1), minval=-1, maxval=1)
        y = jnp.sin(3 * x) * (100.0 if t % 10 == 9 else 1.0)
        params, opt_state, loss = step(params, opt_state, x, y)
        stats = optaxclip.stats(opt_state)
        log.append({"loss": float(loss), **{k: v.item() for k, v in stats.items()}})
        print(
            f"{t:>4} {float(loss):>10.4f} {float(stats['grad_norm']):>10.4f} "
            f"{bool(stats['clipped'])!s:>7} {int(stats['nonfinite']):>9}"
        )
    return log


if __name__ == "__main__":
    main()
