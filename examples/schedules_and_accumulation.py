"""A clipping threshold on a schedule, and clipping under gradient accumulation.

Run: python examples/schedules_and_accumulation.py [--steps N] [--micro-steps K]

1. Schedule. `optax.inject_hyperparams(optaxclip.clip_by_global_norm)` turns
   `max_norm` into a hyperparameter that a schedule sets every step: here
   `optax.linear_schedule` loosens the clip from 0.5 to 4 while a linear model
   is fitted with SGD. The script prints, per step, the threshold the schedule
   gave (read back from the optimizer state), the norm the clip measured, and
   the norm of the step it let through, min(norm, threshold).

2. Accumulation. `optax.MultiSteps(optax.chain(clip, adam), every_k_schedule=K)`
   averages the gradients of K micro-batches and hands the mean to the chain
   once every K calls, so the clip sees, measures and clips the *accumulated*
   gradient, as it would a K-times larger batch. Micro-batch gradients are
   noisy (K = 8 micro-batches of 4 examples): most have a norm above the
   threshold of 4, their mean mostly does not. Clipping before accumulating
   (`optax.chain(clip, optax.MultiSteps(adam, K))`) would clip the micro-batches
   and shrink the step even when the accumulated gradient is well within the
   threshold. The script prints,
   per optimizer step, the micro-batch norms, the norm of their mean, the norm
   the clip recorded (checked to equal the norm of the mean), and the norm of
   what reaches adam either way.
"""

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

DIM = 8
Params = dict[str, jax.Array]


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(x @ params["w"] + params["b"] - y))


class Problem:
    """A noisy linear regression whose batches are drawn from a seeded generator."""

    def __init__(self, seed: int, noise: float) -> None:
        self.rng = np.random.default_rng(seed)
        self.w = self.rng.standard_normal((DIM, 1)).astype(np.float32)
        self.noise = noise

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        x = self.rng.standard_normal((size, DIM)).astype(np.float32)
        y = x @ self.w + self.noise * self.rng.standard_normal((size, 1)).astype(np.float32)
        return x, y


def mean_tree(trees: list[Params]) -> Params:
    return jax.tree.map(lambda *leaves: jnp.mean(jnp.stack(leaves), axis=0), *trees)


def init_params() -> Params:
    return {"w": jnp.zeros((DIM, 1)), "b": jnp.zeros((1, 1))}


def scheduled_clip(steps: int, learning_rate: float, seed: int) -> list[dict[str, Any]]:
    """Part 1: SGD after a clip whose threshold follows a linear schedule."""
    schedule = optax.linear_schedule(init_value=0.5, end_value=4.0, transition_steps=steps - 1)
    tx = optax.chain(
        optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=schedule),
        optax.sgd(learning_rate),
    )

    @jax.jit
    def step(params: Params, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optaxclip.global_norm(updates)

    problem = Problem(seed, noise=0.1)
    params = init_params()
    opt_state = tx.init(params)
    rows = []
    print(
        f"{'step':>4} {'schedule':>8} {'threshold':>9} {'grad_norm':>9} {'clipped':>7} "
        f"{'applied':>8}"
    )
    for t in range(steps):
        params, opt_state, update_norm = step(params, opt_state, *problem.batch(32))
        stats = optaxclip.stats(opt_state)
        row = {
            "step": t,
            "schedule": float(schedule(t)),
            # inject_hyperparams keeps the value it used this step in its state.
            "threshold": float(opt_state[0].hyperparams["max_norm"]),
            "grad_norm": float(stats["grad_norm"]),
            "clipped": bool(stats["clipped"]),
            "applied_norm": float(update_norm) / learning_rate,
        }
        rows.append(row)
        print(
            f"{t:>4} {row['schedule']:>8.3f} {row['threshold']:>9.3f} {row['grad_norm']:>9.3f} "
            f"{row['clipped']!s:>7} {row['applied_norm']:>8.3f}"
        )
    thresholds = np.array([r["threshold"] for r in rows])
    np.testing.assert_allclose(thresholds, [r["schedule"] for r in rows], rtol=1e-6)
    np.testing.assert_allclose(
        [r["applied_norm"] for r in rows],
        np.minimum([r["grad_norm"] for r in rows], thresholds),
        rtol=1e-4,
    )
    print("check: threshold == schedule(step) and applied == min(grad_norm, threshold)")
    return rows


def accumulated_clip(
    steps: int, micro_steps: int, max_norm: float, learning_rate: float, seed: int
) -> list[dict[str, Any]]:
    """Part 2: `MultiSteps` around a clip; the clip sees the mean of the micro-batch gradients."""
    accumulate_then_clip = optax.MultiSteps(
        optax.chain(optaxclip.clip_by_global_norm(max_norm), optax.adam(learning_rate)),
        every_k_schedule=micro_steps,
    )

    @jax.jit
    def micro_step(params: Params, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = accumulate_then_clip.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    clip = optaxclip.clip_by_global_norm(max_norm)

    @jax.jit
    def clip_then_average(grads: list[Params]) -> jax.Array:
        """The norm of what would reach adam if each micro-batch were clipped first."""
        clipped = [clip.update(g, clip.init(g))[0] for g in grads]
        return optaxclip.global_norm(mean_tree(clipped))

    problem = Problem(seed, noise=2.0)
    params = init_params()
    opt_state = accumulate_then_clip.init(params)
    rows = []
    print(
        f"{'step':>4} {'micro-batch norms':>17} {'> max_norm':>10} {'norm of mean':>12} "
        f"{'recorded':>8} {'clipped':>7} {'to adam: clip mean':>18} {'clip each':>9}"
    )
    for t in range(steps):
        grads = []
        for _ in range(micro_steps):
            params, opt_state, g = micro_step(params, opt_state, *problem.batch(4))
            grads.append(g)
        stats = optaxclip.stats(opt_state)
        norm_of_mean = float(optaxclip.global_norm(mean_tree(grads)))
        row = {
            "step": t,
            "micro_norms": [float(optaxclip.global_norm(g)) for g in grads],
            "norm_of_mean": norm_of_mean,
            "recorded": float(stats["grad_norm"]),
            "clipped": bool(stats["clipped"]),
            "average_then_clip": min(norm_of_mean, max_norm),
            "clip_then_average": float(clip_then_average(grads)),
        }
        rows.append(row)
        micro = f"{min(row['micro_norms']):.2f} .. {max(row['micro_norms']):.2f}"
        above = sum(n > max_norm for n in row["micro_norms"])
        print(
            f"{t:>4} {micro:>17} {f'{above}/{micro_steps}':>10} {norm_of_mean:>12.3f} "
            f"{row['recorded']:>8.3f} {row['clipped']!s:>7} {row['average_then_clip']:>18.3f} "
            f"{row['clip_then_average']:>9.3f}"
        )
    np.testing.assert_allclose(
        [r["recorded"] for r in rows], [r["norm_of_mean"] for r in rows], rtol=1e-5
    )
    print(
        f"check: the clip recorded the norm of the mean of the {micro_steps} micro-batch gradients"
    )
    micro = np.array([r["micro_norms"] for r in rows])
    print(
        f"\nmicro-batches above max_norm: {np.mean(micro > max_norm):.0%}; accumulated gradients "
        f"clipped: {np.mean([r['clipped'] for r in rows]):.0%}.\nMean norm reaching adam: "
        f"{np.mean([r['average_then_clip'] for r in rows]):.3f} (MultiSteps outside: the mean "
        f"is clipped) vs {np.mean([r['clip_then_average'] for r in rows]):.3f} (clip outside: "
        "each micro-batch is clipped)"
    )
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps in each part")
    parser.add_argument("--micro-steps", type=int, default=8, help="micro-batches per step (K)")
    parser.add_argument("--max-norm", type=float, default=4.0, help="threshold in part 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny run, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 6
    print(f"1. max_norm on a linear schedule, via optax.inject_hyperparams ({args.steps} steps)\n")
    schedule = scheduled_clip(args.steps, 0.1, args.seed)
    print(
        f"\n2. optax.MultiSteps(chain(clip_by_global_norm({args.max_norm:g}), adam), "
        f"every_k_schedule={args.micro_steps}): the clip acts on the mean gradient\n"
    )
    accumulation = accumulated_clip(args.steps, args.micro_steps, args.max_norm, 0.05, args.seed)
    return {"schedule": schedule, "accumulation": accumulation}


if __name__ == "__main__":
    main()
