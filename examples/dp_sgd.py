"""DP-SGD on scikit-learn's digits: per-example clipping, Gaussian noise, and the privacy spent.

Run: python examples/dp_sgd.py [--epochs N] [--noise-multipliers 1 2 4] [--out docs/dp_sgd.png]

Differentially private SGD (Abadi et al. 2016) trains so that the model reveals
little about any one training example. Each step here:

1. samples a batch by Poisson sampling: every training example joins with
   probability q = L / N (L the expected batch size). The batch is padded to a
   fixed capacity and the padding marked by `mask`, so the step compiles once;
2. computes per-example gradients with `jax.vmap(jax.grad(loss))`;
3. clips each example's gradient to norm C and averages over L with
   `optaxclip.per_example_clip(C, reduce="mean")` (extra arguments `mask` and
   `num_examples=L`): no example moves the average by more than C / L, NaN or
   not;
4. adds Gaussian noise of standard deviation σ·C / L (`optax.add_noise`), and
5. takes an Adam step.

The privacy spent, ε at δ = 1e-5, is computed by Google's `dp_accounting` (its
RDP accountant, for the steps so far of a Poisson-subsampled Gaussian mechanism
with noise multiplier σ) and printed each epoch. The script trains once
without privacy and once per noise multiplier, prints a table of test accuracy
and ε, and draws accuracy and ε against epochs. With `--microbatches M` the
per-example gradients are computed and clipped M chunks at a time
(`optaxclip.microbatched_clip`), which bounds their memory and gives the same
result.
"""

import argparse
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
from dp_accounting import rdp
from tqdm.auto import tqdm

import optaxclip

DELTA = 1e-5


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


def init_mlp(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (n_in, n_out)) * math.sqrt(1.0 / n_in),
            "b": jnp.zeros(n_out),
        }
        for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def logits(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    # tanh rather than relu: bounded activations keep per-example gradients small,
    # so less of them is lost to clipping (Papernot et al. 2021).
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"][None, :])
    return x @ params[-1]["w"] + params[-1]["b"][None, :]


def example_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """The loss of one example: `jax.vmap(jax.grad(...))` turns it into per-example gradients."""
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x[None]), y[None])[0]


def batch_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


per_example_grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int) -> float:
    """ε at δ = 1e-5 after `steps` Poisson-subsampled Gaussian steps, by RDP accounting."""
    event = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant = rdp.RdpAccountant()
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(DELTA))


def poisson_batches(
    rng: np.random.Generator, n: int, rate: float, capacity: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Poisson-sampled batches, padded to `capacity`: (indices, mask)."""
    while True:
        chosen = np.flatnonzero(rng.random(n) < rate)
        if len(chosen) > capacity:
            # Truncating would change the sampling the accounting assumes.
            raise RuntimeError(f"a Poisson batch of {len(chosen)} exceeds capacity {capacity}")
        index = np.zeros(capacity, np.int64)
        index[: len(chosen)] = chosen
        yield index, np.arange(capacity) < len(chosen)


def shuffled_batches(rng: np.random.Generator, n: int, size: int) -> Iterator[np.ndarray]:
    while True:
        order = rng.permutation(n)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def make_private_step(
    clip: Any, rest: Any, expected: int, microbatches: int
) -> Callable[..., tuple[Any, Any, Any, Any]]:
    @jax.jit
    def step(params: Any, clip_state: Any, opt_state: Any, x: Any, y: Any, mask: Any) -> Any:
        if microbatches == 1:
            grads = per_example_grads(params, x, y)
            mean, clip_state = clip.update(
                grads, clip_state, params, mask=mask, num_examples=expected
            )
        else:
            mean, clip_state = optaxclip.microbatched_clip(
                clip,
                lambda p, chunk: per_example_grads(p, *chunk),
                params,
                (x, y),
                clip_state,
                num_microbatches=microbatches,
                mask=mask,
                num_examples=expected,
            )
        updates, opt_state = rest.update(mean, opt_state, params)
        return optax.apply_updates(params, updates), clip_state, opt_state, clip_state.clipped

    return step


@jax.jit
def accuracy(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits(params, x), axis=-1) == y)


def train(
    noise_multiplier: float | None, data: tuple[np.ndarray, ...], args: argparse.Namespace
) -> dict[str, Any]:
    """One run: DP-SGD with this noise multiplier, or non-private Adam when it is None."""
    x_train, y_train, x_test, y_test = data
    n = len(x_train)
    rate = args.batch_size / n
    steps_per_epoch = n // args.batch_size
    params = init_mlp(jax.random.key(args.seed), [x_train.shape[1], args.hidden, 10])
    adam = optax.adam(args.learning_rate)
    rng = np.random.default_rng(args.seed)
    name = "non-private" if noise_multiplier is None else f"DP-SGD σ={noise_multiplier:g}"
    log: dict[str, list[float]] = {"accuracy": [], "epsilon": [], "clipped": []}

    if noise_multiplier is None:
        opt_state = adam.init(params)

        @jax.jit
        def plain_step(params: Any, opt_state: Any, x: Any, y: Any) -> Any:
            grads = jax.grad(batch_loss)(params, x, y)
            updates, opt_state = adam.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        batches: Iterator[Any] = shuffled_batches(rng, n, args.batch_size)
    else:
        # Capacity 8 standard deviations above the expected batch size, a multiple of
        # the micro-batch count: a larger Poisson batch is astronomically unlikely.
        capacity = args.batch_size + math.ceil(8 * math.sqrt(args.batch_size))
        capacity = -(-capacity // args.microbatches) * args.microbatches
        clip = optaxclip.per_example_clip(args.max_norm, reduce="mean", batch_size=capacity)
        rest = optax.chain(
            optax.add_noise(
                (noise_multiplier * args.max_norm / args.batch_size) ** 2, 0.0, key=args.seed
            ),
            adam,
        )
        clip_state, opt_state = clip.init(params), rest.init(params)
        private_step = make_private_step(clip, rest, args.batch_size, args.microbatches)
        batches = poisson_batches(rng, n, rate, capacity)

    bar = tqdm(range(args.epochs), desc=name, leave=False, mininterval=0.5)
    for epoch in bar:
        clipped = seen = 0
        for _ in range(steps_per_epoch):
            batch = next(batches)
            if noise_multiplier is None:
                params, opt_state = plain_step(params, opt_state, x_train[batch], y_train[batch])
            else:
                index, mask = batch
                params, clip_state, opt_state, count = private_step(
                    params, clip_state, opt_state, x_train[index], y_train[index], mask
                )
                clipped, seen = clipped + int(count), seen + int(mask.sum())
        acc = float(accuracy(params, x_test, y_test))
        log["accuracy"].append(acc)
        if noise_multiplier is not None:
            eps = epsilon(noise_multiplier, rate, (epoch + 1) * steps_per_epoch)
            log["epsilon"].append(eps)
            log["clipped"].append(clipped / max(seen, 1))
            bar.set_postfix(acc=f"{acc:.3f}", eps=f"{eps:.2f}")
            tqdm.write(
                f"{name}  epoch {epoch + 1:>3}: test accuracy {acc:.3f}, ε = {eps:.3f} "
                f"(δ = {DELTA:g}), {clipped / max(seen, 1):.0%} of examples clipped"
            )
        else:
            bar.set_postfix(acc=f"{acc:.3f}")
            tqdm.write(f"{name}  epoch {epoch + 1:>3}: test accuracy {acc:.3f}")
    bar.close()
    return {
        "noise_multiplier": noise_multiplier,
        "accuracy": log["accuracy"][-1],
        "epsilon": log["epsilon"][-1] if log["epsilon"] else None,
        "accuracy_per_epoch": log["accuracy"],
        "epsilon_per_epoch": log["epsilon"],
        "clipped_per_epoch": log["clipped"],
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| training | noise multiplier σ | test accuracy | ε (δ = 1e-5) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        sigma = "–" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:g}"
        eps = "∞ (no privacy)" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        lines.append(f"| {name} | {sigma} | {row['accuracy']:.1%} | {eps} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, row in rows.items():
        epochs = np.arange(1, len(row["accuracy_per_epoch"]) + 1)
        style = "k--" if row["epsilon"] is None else "-"
        left.plot(epochs, row["accuracy_per_epoch"], style, label=name)
        if row["epsilon"] is not None:
            right.plot(epochs, row["epsilon_per_epoch"], label=name)
    left.set(xlabel="epoch", ylabel="test accuracy", title="digits, test accuracy")
    left.axhline(0.1, color="0.7", lw=0.8, ls=":")
    left.legend()
    right.set(xlabel="epoch", ylabel="ε", yscale="log", title="privacy spent, ε at δ = 1e-5 (RDP)")
    right.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64, help="expected batch size L")
    parser.add_argument("--max-norm", type=float, default=1.0, help="per-example bound C")
    parser.add_argument(
        "--noise-multipliers", type=float, nargs="+", default=[1.0, 2.0, 4.0], metavar="σ"
    )
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument(
        "--microbatches", type=int, default=1, help="compute and clip in this many chunks"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/dp_sgd.png", help="where to write the figure")
    parser.add_argument("--smoke", action="store_true", help="a tiny run, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.noise_multipliers = 3, [1.0]

    data = load_digits(args.seed)
    n = len(data[0])
    print(
        f"digits: {n} train / {len(data[2])} test images; {args.epochs} epochs of "
        f"{n // args.batch_size} steps, expected batch {args.batch_size} (q = "
        f"{args.batch_size / n:.4f}), C = {args.max_norm:g}, adam({args.learning_rate:g}) "
        f"({jax.devices()[0].platform})\n"
    )
    start = time.perf_counter()
    rows = {}
    for sigma in [None, *args.noise_multipliers]:
        row = train(sigma, data, args)
        rows["non-private" if sigma is None else f"DP-SGD σ={sigma:g}"] = row
    text = table(rows)
    print(f"\n{text}\n\n({time.perf_counter() - start:.0f} s)")
    title = (
        f"MLP 64-{args.hidden}-10, {args.epochs} epochs, expected batch {args.batch_size}, "
        f"C = {args.max_norm:g}, Adam {args.learning_rate:g}"
    )
    plot(rows, args.out, title)
    print(f"figure: {args.out}")
    return {"rows": rows, "table": text}


if __name__ == "__main__":
    main()
