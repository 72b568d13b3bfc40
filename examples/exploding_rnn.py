"""The exploding-gradient cliff of Pascanu et al. (2013), and how norm clipping gets past it.

Run: python examples/exploding_rnn.py [--steps N] [--seeds K] [--out exploding_rnn.png]

A one-unit tanh RNN, h_t = tanh(w·h_{t-1} + b + x_t), must remember the sign s
of its first input through T = 50 steps of noise: the target for h_T is 0.8·s.
With w > 1 the unit has two attractors that store the bit. The bias b tilts
them, and past a critical |b| (a saddle-node bifurcation) one attractor is gone:
every sequence ends on the same side and the loss jumps from ~0 to ~1.6 over a
sliver of b. That is the cliff: a wall in the (w, b) loss surface where the
gradient is orders of magnitude larger than anywhere else, as in the one-unit
example Pascanu et al. use to draw it.

Both optimizers start from the same K random points near the valley and see the
same batches, with the same learning rate (2; the clip's max_norm is 0.25, so a
clipped step is at most 0.5 long). Plain SGD often meets a wall, takes a step
proportional to its huge gradient and is thrown far out onto a plateau where
tanh saturates and the gradient vanishes; from there it does not come back. SGD
after `optaxclip.clip_by_global_norm` takes a bounded step at the wall and walks
down the valley. Its few failures are the paper's other problem: runs that
drift to w < 1, where the memory fades, the gradient vanishes and no clipping
helps.

The script prints, for each, the success rate (test loss < 0.01), the largest
gradient and step taken, and how the failures ended, and writes a PNG: the loss
surface with one start's two trajectories over it, the loss along b through the
cliff, and the loss and gradient norm per step.

Reference: R. Pascanu, T. Mikolov, Y. Bengio, "On the difficulty of training
recurrent neural networks", ICML 2013, https://arxiv.org/abs/1211.5063.
"""

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

TARGET = 0.8
NOISE = 0.1
BATCH = 64
TEST_SIZE = 512
SUCCESS_LOSS = 0.01
INIT_W = (1.5, 3.0)
INIT_B = 0.6

Params = dict[str, jax.Array]
Traces = dict[str, np.ndarray]
Data = tuple[np.ndarray, np.ndarray]


def final_state(params: Params, x: jax.Array) -> jax.Array:
    """h_T for each sequence in `x` (batch, time)."""

    def cell(h: jax.Array, x_t: jax.Array) -> tuple[jax.Array, None]:
        return jnp.tanh(params["w"] * h + params["b"] + x_t), None

    h, _ = jax.lax.scan(cell, jnp.zeros(x.shape[:1]), x.T)
    return h


def loss_fn(params: Params, x: jax.Array, sign: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(final_state(params, x) - TARGET * sign))


def sample(rng: np.random.Generator, shape: tuple[int, ...], length: int) -> Data:
    """Sequences whose first input is the sign to remember, then noise (NumPy: no compile)."""
    sign = rng.choice(np.float32([-1.0, 1.0]), size=shape)
    x = NOISE * rng.standard_normal((*shape, length), dtype=np.float32)
    x[..., 0] = sign
    return x, sign


def test_set(length: int) -> Data:
    return sample(np.random.default_rng(12345), (TEST_SIZE,), length)


def optimizers(learning_rate: float, max_norm: float) -> dict[str, optax.GradientTransformation]:
    return {
        "plain SGD": optax.sgd(learning_rate),
        "clipped SGD": optax.chain(
            optaxclip.clip_by_global_norm(max_norm), optax.sgd(learning_rate)
        ),
    }


def make_trainer(tx: optax.GradientTransformation, test: Data) -> Any:
    """A jitted `train(start, batches)`: all steps in one `lax.scan`."""

    def train(start: Params, batches: Data) -> dict[str, jax.Array]:
        def step(carry: Any, batch: Data) -> Any:
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            trace = {
                "w": params["w"],
                "b": params["b"],
                "loss": loss,
                "grad_norm": optaxclip.global_norm(grads),
                "step_size": optaxclip.global_norm(updates),
            }
            return (params, opt_state), trace

        (params, _), trace = jax.lax.scan(step, (start, tx.init(start)), batches)
        # The trajectory starts at the initial point, then one point per step.
        trace["w"] = jnp.concatenate([start["w"][None], trace["w"]])
        trace["b"] = jnp.concatenate([start["b"][None], trace["b"]])
        return {**trace, "test_loss": loss_fn(params, *test)}

    return jax.jit(train)


def loss_surface(points: np.ndarray, test: Data) -> tuple[np.ndarray, np.ndarray]:
    """The test loss and the norm of its gradient at each (w, b) row of `points`."""

    def at(point: jax.Array) -> tuple[jax.Array, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)({"w": point[0], "b": point[1]}, *test)
        return loss, optaxclip.global_norm(grads)

    evaluate = jax.jit(lambda p: jax.lax.map(at, p, batch_size=512))
    loss, grad_norm = evaluate(jnp.asarray(points, jnp.float32))
    return np.asarray(loss), np.asarray(grad_norm)


def run(
    steps: int, seeds: int, length: int, learning_rate: float, max_norm: float
) -> dict[str, Traces]:
    """Trains each optimizer from each seed's starting point on that seed's batches."""
    test = test_set(length)
    trainers = {
        name: make_trainer(tx, test) for name, tx in optimizers(learning_rate, max_norm).items()
    }
    runs: dict[str, list[dict[str, jax.Array]]] = {name: [] for name in trainers}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        start = {
            "w": np.float32(rng.uniform(*INIT_W)),
            "b": np.float32(rng.uniform(-INIT_B, INIT_B)),
        }
        batches = sample(rng, (steps, BATCH), length)
        for name, train in trainers.items():
            runs[name].append(train(start, batches))
    return {
        name: {k: np.stack([np.asarray(r[k]) for r in per_seed]) for k in per_seed[0]}
        for name, per_seed in runs.items()
    }


def summary(results: dict[str, Traces]) -> dict[str, dict[str, float]]:
    """Per optimizer: success rate, median test loss, largest gradient norm and step, failures."""
    return {
        name: {
            "success": float(np.mean(t["test_loss"] < SUCCESS_LOSS)),
            "median_test_loss": float(np.median(t["test_loss"])),
            "max_grad_norm": float(np.max(t["grad_norm"])),
            "max_step": float(np.max(t["step_size"])),
            "thrown_out": float(np.mean(np.max(t["step_size"], axis=1) > 1.0)),
            "memory_lost": float(np.mean(t["w"][:, -1] < 1.0)),
        }
        for name, t in results.items()
    }


def table(rows: dict[str, dict[str, float]], seeds: int) -> str:
    lines = [
        f"| optimizer | success ({seeds} seeds) | median test loss | largest gradient norm "
        "| largest step | runs with a step > 1 | runs ending at w < 1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['success']:.0%} | {row['median_test_loss']:.4f} "
            f"| {row['max_grad_norm']:.3g} | {row['max_step']:.3g} | {row['thrown_out']:.0%} "
            f"| {row['memory_lost']:.0%} |"
        )
    return "\n".join(lines)


def pick_seed(results: dict[str, Traces]) -> int:
    """The first seed where plain SGD fails and clipped SGD succeeds (else seed 0)."""
    plain, clipped = (results[name]["test_loss"] for name in results)
    telling = np.flatnonzero((plain >= SUCCESS_LOSS) & (clipped < SUCCESS_LOSS))
    return int(telling[0]) if telling.size else 0


def plot(results: dict[str, Traces], path: str, length: int, max_norm: float, grid: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = pick_seed(results)
    w_grid = np.linspace(0.0, 4.0, grid)
    b_grid = np.linspace(-2.5, 2.5, grid)
    start = results[next(iter(results))]
    w_cut = float(np.clip(start["w"][seed, 0], 1.2, 4.0))
    b_fine = np.linspace(-2.5, 2.5, 4 * grid)
    w_mesh, b_mesh = np.meshgrid(w_grid, b_grid)
    # One evaluation (one compile) for the surface and the cut through it.
    points = np.concatenate(
        [
            np.stack([w_mesh.ravel(), b_mesh.ravel()], axis=1),
            np.stack([np.full_like(b_fine, w_cut), b_fine], axis=1),
        ]
    )
    loss, grad_norm = loss_surface(points, test_set(length))
    surface = loss[: w_mesh.size].reshape(w_mesh.shape)
    cut, cut_grad = loss[w_mesh.size :], grad_norm[w_mesh.size :]
    colors = {name: c for name, c in zip(results, ("tab:red", "white"), strict=True)}

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    mesh = ax.pcolormesh(w_grid, b_grid, np.log10(surface), cmap="viridis", shading="auto")
    fig.colorbar(mesh, ax=ax, label="log10 test loss")
    for name, trace in results.items():
        w, b = trace["w"][seed], trace["b"][seed]
        ax.plot(w, b, "-o", color=colors[name], ms=2.5, lw=1, label=name)
        if not (w_grid[0] <= w[-1] <= w_grid[-1] and b_grid[0] <= b[-1] <= b_grid[-1]):
            ax.annotate(
                f"{name} ends at\n(w, b) = ({w[-1]:.1f}, {b[-1]:.1f})",
                xy=(0.03, 0.03),
                xycoords="axes fraction",
                fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8},
            )
    ax.plot(start["w"][seed, 0], start["b"][seed, 0], "*", color="gold", ms=14, label="start")
    ax.set_xlim(w_grid[0], w_grid[-1])
    ax.set_ylim(b_grid[0], b_grid[-1])
    ax.set_xlabel("recurrent weight w")
    ax.set_ylabel("bias b")
    ax.set_title(f"Loss surface of h_t = tanh(w h_(t-1) + b + x_t), T = {length} (seed {seed})")
    ax.legend(fontsize=8, loc="upper right", facecolor="0.35", labelcolor="white")

    ax = axes[0, 1]
    ax.plot(b_fine, cut, color="tab:blue", label="test loss")
    ax.set_xlabel("bias b")
    ax.set_ylabel("test loss", color="tab:blue")
    ax.set_title(f"The cliff: loss along b at w = {w_cut:.2f}")
    twin = ax.twinx()
    twin.semilogy(b_fine, cut_grad, color="tab:orange", lw=0.8)
    twin.axhline(max_norm, color="tab:orange", ls="--", lw=0.8)
    twin.set_ylabel(f"gradient norm (dashed: max_norm = {max_norm:g})", color="tab:orange")

    ax_loss, ax_norm = axes[1]
    for name, trace in results.items():
        color = "black" if colors[name] == "white" else colors[name]
        ax_loss.semilogy(trace["loss"][seed], color=color, lw=1, label=name)
        # A saturated run's gradient underflows to 0; the floor keeps it on the log axis.
        floored = np.maximum(trace["grad_norm"][seed], 1e-8)
        ax_norm.semilogy(floored, color=color, lw=1, label=name)
    ax_norm.axhline(max_norm, color="0.5", ls="--", lw=1, label=f"max_norm = {max_norm:g}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"training loss (seed {seed})")
    ax_loss.legend(fontsize=8)
    ax_norm.set_xlabel("step")
    ax_norm.set_ylabel("gradient norm before clipping (floor 1e-8)")
    ax_norm.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="SGD steps per run")
    parser.add_argument("--seeds", type=int, default=100, help="random starting points")
    parser.add_argument("--length", type=int, default=50, help="sequence length T")
    parser.add_argument("--learning-rate", type=float, default=2.0)
    parser.add_argument("--max-norm", type=float, default=0.25, help="clipping threshold")
    parser.add_argument("--grid", type=int, default=161, help="loss-surface grid points per axis")
    parser.add_argument(
        "--out", default="exploding_rnn.png", help="where to write the figure ('' for none)"
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny run, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.grid = 150, 8, 41
    print(
        f"Plain and clipped SGD (learning rate {args.learning_rate:g}) from {args.seeds} starts, "
        f"{args.steps} steps, T = {args.length} ({jax.devices()[0].platform})"
    )
    results = run(args.steps, args.seeds, args.length, args.learning_rate, args.max_norm)
    rows = summary(results)
    print()
    print(table(rows, args.seeds))
    print(
        f"\nsuccess: test loss < {SUCCESS_LOSS:g}; clipped SGD's steps are at most "
        f"learning rate x max_norm = {args.learning_rate * args.max_norm:g}"
    )
    if args.out:
        plot(results, args.out, args.length, args.max_norm, args.grid)
        print(f"\nwrote {args.out} (trajectories of seed {pick_seed(results)})")
    return rows


if __name__ == "__main__":
    main()
