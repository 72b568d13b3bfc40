"""A `flax.nnx.Optimizer` with an optaxclip chain, logging `optaxclip.stats` every step.

Run: python examples/flax_nnx.py [--steps N] [--log-every K] [--max-norm C]

An MLP (64 -> 128 -> 128 -> 10) classifies scikit-learn's `digits` (1,797 8x8
images of handwritten digits; the data ships with scikit-learn, nothing is
downloaded) with `optax.chain(optaxclip.clip_by_global_norm(C), optax.adamw(...))`
inside an `nnx.Optimizer`. After every step `optaxclip.stats(optimizer)` reads
the clip's statistics straight from the optimizer (the norm it measured,
whether it clipped, the count of non-finite elements); the script prints them
every K steps, then the share of steps clipped and the test accuracy.
"""

import argparse
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip


class MLP(nnx.Module):
    def __init__(self, features: int, hidden: int, classes: int, rngs: nnx.Rngs) -> None:
        self.hidden1 = nnx.Linear(features, hidden, rngs=rngs)
        self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.hidden1(x))
        x = nnx.relu(self.hidden2(x))
        return self.out(x)


def load_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test splits of scikit-learn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    x, y = sklearn_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype(np.int32), test_size=0.25, stratify=y, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def minibatches(rng: np.random.Generator, n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Indices of shuffled minibatches, epoch after epoch (the last partial batch is dropped)."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-norm", type=float, default=1.0, help="clipping threshold")
    parser.add_argument("--log-every", type=int, default=50, help="print the stats every K steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny run, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.log_every = 120, 40

    x_train, y_train, x_test, y_test = load_digits(args.seed)
    model = MLP(x_train.shape[1], 128, 10, rngs=nnx.Rngs(args.seed))
    tx = optax.chain(
        optaxclip.clip_by_global_norm(args.max_norm),
        optax.adamw(args.learning_rate, weight_decay=1e-4),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    print(
        f"digits: {len(x_train)} train / {len(x_test)} test images; {args.steps} steps of "
        f"{args.batch_size}, clip_by_global_norm({args.max_norm:g}) + adamw "
        f"({jax.devices()[0].platform})\n"
    )
    print(f"{'step':>5} {'loss':>8} {'grad_norm':>9} {'clipped':>7} {'nonfinite':>9}")

    log = []
    batches = minibatches(np.random.default_rng(args.seed), len(x_train), args.batch_size)
    for step, batch in zip(range(args.steps), batches, strict=False):
        loss = train_step(model, optimizer, x_train[batch], y_train[batch])
        stats = optaxclip.stats(optimizer)
        log.append({"step": step, "loss": float(loss), **{k: v.item() for k, v in stats.items()}})
        if step % args.log_every == 0 or step == args.steps - 1:
            row = log[-1]
            print(
                f"{step:>5} {row['loss']:>8.4f} {row['grad_norm']:>9.4f} "
                f"{row['clipped']!s:>7} {row['nonfinite']:>9}"
            )

    test_accuracy = float(accuracy(model, x_test, y_test))
    clipped = float(np.mean([row["clipped"] for row in log]))
    print(f"\nsteps clipped: {clipped:.1%} (max_norm {args.max_norm:g})")
    print(f"test accuracy: {test_accuracy:.2%} (chance: 10%)")
    return {"log": log, "test_accuracy": test_accuracy, "clipped_share": clipped}


if __name__ == "__main__":
    main()
