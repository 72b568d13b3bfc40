"""A Flax linen `TrainState` with zclip in its chain, checkpointed mid-run with orbax and resumed.

Run: python examples/flax_linen_trainstate.py [--steps N] [--ckpt-dir DIR]

A linen MLP learns a fixed random teacher with
`optax.chain(optaxclip.zclip(...), optax.adamw(...))` in a
`flax.training.train_state.TrainState`. zclip is stateful: it keeps running
statistics of the gradient norm (mean, variance, number of steps seen) that
decide what counts as a spike, so a checkpoint must carry them. One batch after
the checkpoint has its targets multiplied by 100, a spike that zclip must
judge against the statistics it restored.

The script trains N steps without a break; then trains again, saves the
`TrainState` with `orbax.checkpoint.StandardCheckpointer` halfway (to
--ckpt-dir, default a temporary folder), restores it into a freshly built state
(as a restarted job would, through its abstract shapes and dtypes) and trains
the remaining steps. Batches come from a NumPy generator seeded by the step
number, so both runs see the same data. It prints the clip's statistics before
the save, after the restore and at the end, and checks that the resumed run's
parameters and optimizer state are bitwise identical to the uninterrupted run's.
"""

import argparse
import functools
import math
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

import optaxclip

FEATURES, HIDDEN, BATCH = 16, 64, 32
SPIKE_FACTOR = 100.0


class MLP(nn.Module):
    hidden: int
    outputs: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.tanh(nn.Dense(self.hidden)(x))
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.outputs)(x)


MODEL = MLP(HIDDEN, 1)


@functools.cache
def optimizer(learning_rate: float) -> optax.GradientTransformation:
    """The chain, built once: a `TrainState` holds `tx` as static data, and `jax.jit` would
    compile `train_step` again for every newly built (equal but not identical) chain."""
    return optax.chain(
        optaxclip.zclip(warmup_steps=10, max_norm=10.0),
        optax.adamw(learning_rate, weight_decay=1e-4),
    )


def create_state(seed: int, learning_rate: float) -> TrainState:
    """A fresh `TrainState`; a restarted job builds this before restoring into it."""
    params = MODEL.init(jax.random.key(seed), jnp.zeros((1, FEATURES)))
    state = TrainState.create(apply_fn=MODEL.apply, params=params, tx=optimizer(learning_rate))
    # `create` starts `step` as the Python int 0, which the abstract target would keep as a
    # Python int (restored as one) and `jax.jit` would trace apart from the int32 array that
    # `apply_gradients` makes of it. An int32 array from the start: one type, one compile.
    return state.replace(step=jnp.zeros([], jnp.int32))


def batch(step: int, spike_step: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch of step `step`, the same whichever run asks for it."""
    teacher = np.random.default_rng(seed + 1)
    w = teacher.standard_normal((FEATURES, 1)).astype(np.float32) / np.sqrt(FEATURES)
    rng = np.random.default_rng([seed, step])
    x = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    y = np.sin(x @ w) * (SPIKE_FACTOR if step == spike_step else 1.0)
    return x, y.astype(np.float32)


@jax.jit
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
    def loss_fn(params: Any) -> jax.Array:
        return jnp.mean(jnp.square(state.apply_fn(params, x) - y))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def train(
    state: TrainState, first: int, last: int, spike_step: int, seed: int, clips: list[str]
) -> TrainState:
    """Trains steps `first` to `last - 1`; appends a line to `clips` for each step zclip clipped."""
    for step in range(first, last):
        state, _ = train_step(state, *batch(step, spike_step, seed))
        stats = optaxclip.stats(state.opt_state)
        if stats["clipped"]:
            clips.append(
                f"step {step}: norm {float(stats['grad_norm']):.4g} -> "
                f"threshold {float(stats['threshold']):.4g}"
            )
    return state


def describe(state: TrainState) -> str:
    stats = optaxclip.stats(state.opt_state)
    shown = ("grad_norm", "threshold", "clipped", "mean", "var", "step_count")
    values = {k: np.asarray(stats[k]).item() for k in shown}
    return ", ".join(
        f"{k}={v}" if isinstance(v, bool) else f"{k}={v:.4g}" for k, v in values.items()
    )


def compare(a: Any, b: Any) -> tuple[bool, float]:
    """Whether two trees are bitwise equal, and their largest absolute difference."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False, math.inf
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    same = all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )
    diff = max(
        (
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0))
            for x, y in zip(leaves_a, leaves_b, strict=True)
        ),
        default=0.0,
    )
    return same, diff


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps in all")
    parser.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: a temp one)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny run, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 40
    save_at = args.steps // 2
    spike_step = save_at + max(1, (args.steps - save_at) // 2)
    print(
        f"{args.steps} steps, checkpoint after step {save_at}, targets x{SPIKE_FACTOR:g} "
        f"at step {spike_step} ({jax.devices()[0].platform})\n"
    )

    clips_uninterrupted: list[str] = []
    clips_resumed: list[str] = []
    uninterrupted = train(
        create_state(args.seed, args.learning_rate),
        0,
        args.steps,
        spike_step,
        args.seed,
        clips_uninterrupted,
    )

    state = train(
        create_state(args.seed, args.learning_rate),
        0,
        save_at,
        spike_step,
        args.seed,
        clips_resumed,
    )
    print(f"saved at step {int(state.step)}:    {describe(state)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.ckpt_dir or tmp).resolve() / f"step_{save_at}"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(folder, state, force=True)
            checkpointer.wait_until_finished()
            # A restarted job has no trained state: it builds a fresh one and restores into
            # its abstract shapes, which also carries the optaxclip states' static names.
            fresh = create_state(args.seed, args.learning_rate)
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
            restored = checkpointer.restore(folder, target)
    print(f"restored at step {int(restored.step)}: {describe(restored)}")
    state_same, _ = compare(
        (state.step, state.params, state.opt_state),
        (restored.step, restored.params, restored.opt_state),
    )

    resumed = train(restored, save_at, args.steps, spike_step, args.seed, clips_resumed)
    print(f"final, uninterrupted: {describe(uninterrupted)}")
    print(f"final, resumed:       {describe(resumed)}")
    print(f"zclip clipped, uninterrupted: {'; '.join(clips_uninterrupted) or 'none'}")
    print(f"zclip clipped, resumed:       {'; '.join(clips_resumed) or 'none'}")
    params_same, params_diff = compare(uninterrupted.params, resumed.params)
    opt_same, opt_diff = compare(uninterrupted.opt_state, resumed.opt_state)
    print(
        f"\ncheckpoint round trip exact: {state_same}\n"
        f"resumed == uninterrupted, bitwise: params {params_same}, opt_state {opt_same} "
        f"(largest difference {max(params_diff, opt_diff):.3g})"
    )
    return {
        "identical": params_same and opt_same,
        "round_trip_exact": state_same,
        "max_abs_diff": max(params_diff, opt_diff),
        "step": int(resumed.step),
        "spike_clipped": any(c.startswith(f"step {spike_step}:") for c in clips_resumed),
        "same_clips": clips_uninterrupted == clips_resumed,
        "restored_stats": {k: np.asarray(v) for k, v in optaxclip.stats(restored).items()},
        "final_stats": {k: np.asarray(v) for k, v in optaxclip.stats(resumed).items()},
    }


if __name__ == "__main__":
    main()
