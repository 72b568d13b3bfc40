"""Float16 training three ways: no loss scaling, a fixed loss scale, and `optaxclip.loss_scale`.

Run: python examples/mixed_precision.py [--steps N] [--out docs/mixed_precision.png]

A small MLP (8 → 64 → 64 → 32, tanh) learns a teacher network's outputs on CPU
with its forward and backward passes in float16: the parameters are cast to
float16, so the activations, their gradients and the parameter gradients are
all float16 arithmetic. The optimizer keeps float32 master weights, as every
mixed-precision recipe does (in float16 Adam's second moment g² underflows and
its eps = 1e-8 is 0). The targets are small (the model predicts 0.01 · its
output) and the loss averages 256 × 32 outputs, so the gradient reaching each
output is about 2 · 0.01² · error / 8192 ≈ 2e-8 · error: below float16's
smallest subnormal, 6e-8.

All three runs use the same optimizer, `chain(clip_by_global_norm(1.0),
adam(3e-3))`, the same initialization and the same batches:

- **no loss scaling**: nearly every gradient is exactly 0 after the first steps;
  Adam has nothing to follow and the loss stalls;
- **a fixed loss scale** (2^36 by default): the loss is multiplied by S and the
  gradients divided by it. The small gradients survive, but the larger ones of
  the first step overflow float16; inf reaches Adam and every weight is NaN;
- **`optaxclip.loss_scale`**, started at the same 2^36: the overflowing steps
  are skipped (zero updates, Adam untouched) while S halves, then S grows every
  `--growth-interval` finite steps and backs off again at each overflow, so it
  stays just below the edge of float16's range, where no gradient underflows.

The script prints a table (final loss, steps skipped, NaN or not) and writes a
PNG: the loss of each run and the loss scale over the steps, skipped steps marked.

Reference: P. Micikevicius et al., "Mixed Precision Training", ICLR 2018,
https://arxiv.org/abs/1710.03740.
"""

import argparse
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import optaxclip

INPUTS, TEACHER_HIDDEN, HIDDEN = 8, 8, 64
RUNS = ("no loss scaling", "fixed loss scale", "loss_scale")

Params = dict[str, jax.Array]


def init_params(key: jax.Array, outputs: int) -> Params:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (INPUTS, HIDDEN)) / math.sqrt(INPUTS),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, HIDDEN)) / math.sqrt(HIDDEN),
        "b2": jnp.zeros(HIDDEN),
        "w3": jax.random.normal(k3, (HIDDEN, outputs)) / math.sqrt(HIDDEN),
        "b3": jnp.zeros(outputs),
    }


def predict(params: Params, x: jax.Array, amplitude: float) -> jax.Array:
    """The MLP in float16: parameters, inputs and every activation."""
    p = jax.tree.map(lambda w: w.astype(jnp.float16), params)
    h = jnp.tanh(x.astype(jnp.float16) @ p["w1"] + p["b1"][None])
    h = jnp.tanh(h @ p["w2"] + p["b2"][None])
    return jnp.float16(amplitude) * (h @ p["w3"] + p["b3"][None])


def batch(key: jax.Array, teacher: Params, size: int, amplitude: float) -> tuple[Any, Any]:
    x = jax.random.normal(key, (size, INPUTS))
    return x, amplitude * (jnp.tanh(x @ teacher["w1"]) @ teacher["w2"])


def make_optimizer(run: str, scale: float, growth_interval: int, lr: float) -> Any:
    inner = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(lr))
    if run == "no loss scaling":
        return inner
    if run == "fixed loss scale":
        return optax.chain(optax.scale(1.0 / scale), inner)
    return optaxclip.loss_scale(
        inner, initial_scale=scale, max_scale=scale, growth_interval=growth_interval
    )


def train(run: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run: the loss, the scale, whether the step was skipped and how many gradient
    elements were exactly 0, at every step."""
    key = jax.random.key(args.seed)
    k_teacher, k_student, k_data = jax.random.split(key, 3)
    t1, t2 = jax.random.split(k_teacher)
    teacher = {
        "w1": 2 * jax.random.normal(t1, (INPUTS, TEACHER_HIDDEN)) / math.sqrt(INPUTS),
        "w2": jax.random.normal(t2, (TEACHER_HIDDEN, args.outputs)) / math.sqrt(TEACHER_HIDDEN),
    }
    scale = 2.0**args.scale_exponent
    tx = make_optimizer(run, scale, args.growth_interval, args.learning_rate)
    params = init_params(k_student, args.outputs)
    opt_state = tx.init(params)
    dynamic = run == "loss_scale"

    @jax.jit
    def step(params: Params, opt_state: Any, key: jax.Array) -> Any:
        x, y = batch(key, teacher, args.batch, args.amplitude)
        if dynamic:
            s = optaxclip.current_loss_scale(opt_state)
        else:
            s = jnp.float32(scale if run == "fixed loss scale" else 1.0)

        def scaled_loss(p: Params) -> jax.Array:
            error = predict(p, x, args.amplitude).astype(jnp.float32) - y
            return jnp.mean(jnp.square(error)) * s

        loss, grads = jax.value_and_grad(scaled_loss)(params)
        leaves = jax.tree.leaves(grads)
        zeros = sum(jnp.sum(g == 0) for g in leaves) / sum(g.size for g in leaves)
        updates, opt_state = tx.update(grads, opt_state, params)
        skipped = opt_state.skipped if dynamic else jnp.bool_(False)
        return optax.apply_updates(params, updates), opt_state, loss / s, s, skipped, zeros

    keys = jax.random.split(k_data, args.steps)
    trace: dict[str, list[Any]] = {"loss": [], "scale": [], "skipped": [], "zeros": []}
    for t in tqdm(range(args.steps), desc=run, leave=False, mininterval=0.5):
        params, opt_state, loss, s, skipped, zeros = step(params, opt_state, keys[t])
        for name, value in zip(trace, (loss, s, skipped, zeros), strict=True):
            trace[name].append(value)
    out = {name: np.asarray(jax.device_get(values)) for name, values in trace.items()}
    out["final_params_nan"] = any(bool(jnp.any(jnp.isnan(p))) for p in jax.tree.leaves(params))
    return out


def summarize(traces: dict[str, dict[str, Any]], last: int) -> dict[str, dict[str, Any]]:
    rows = {}
    for run, trace in traces.items():
        loss = trace["loss"]
        finite = np.isfinite(loss)
        rows[run] = {
            "final_loss": float(np.mean(loss[-last:])),
            "first_loss": float(loss[0]),
            "skipped": int(np.sum(trace["skipped"])),
            "nan": bool(trace["final_params_nan"] or not finite.all()),
            "first_nan_step": int(np.argmin(finite)) if not finite.all() else None,
            "zero_grads": float(np.mean(trace["zeros"][-last:])),
            "final_scale": float(trace["scale"][-1]),
        }
    return rows


def table(rows: dict[str, dict[str, Any]], args: argparse.Namespace, last: int) -> str:
    header = (
        f"| run | final loss (mean of last {last} steps) | steps skipped | NaN | "
        "gradient elements exactly 0 |"
    )
    lines = [header, "|---|---|---|---|---|"]
    labels = {
        "no loss scaling": "no loss scaling",
        "fixed loss scale": f"fixed loss scale 2^{args.scale_exponent}",
        "loss_scale": f"`loss_scale` (from 2^{args.scale_exponent})",
    }
    for run, row in rows.items():
        nan = f"yes, from step {row['first_nan_step']}" if row["nan"] else "no"
        skipped = str(row["skipped"]) if run == "loss_scale" else "-"
        lines.append(
            f"| {labels[run]} | {row['final_loss']:.3g} | {skipped} | {nan} | "
            f"{100 * row['zero_grads']:.0f}% |"
        )
    return "\n".join(lines)


def plot(traces: dict[str, dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(RUNS, ("tab:gray", "tab:orange", "tab:blue"), strict=True))
    fig, (ax_loss, ax_scale) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True)
    steps = np.arange(args.steps)
    for run, trace in traces.items():
        loss = trace["loss"]
        label = run if run != "fixed loss scale" else f"fixed loss scale 2^{args.scale_exponent}"
        ax_loss.semilogy(steps, loss, color=colors[run], lw=1, label=label)
        bad = ~np.isfinite(loss)
        if bad.any():
            first = int(np.argmax(bad))
            ax_loss.plot(first - 1, loss[first - 1], "X", color=colors[run], ms=10)
            ax_loss.annotate(
                f"NaN from step {first}",
                xy=(first, loss[first - 1]),
                xytext=(12, -4),
                textcoords="offset points",
                color=colors[run],
            )
    dynamic = traces["loss_scale"]
    skipped = np.flatnonzero(dynamic["skipped"])
    ax_loss.plot(
        skipped,
        dynamic["loss"][skipped],
        "v",
        color="tab:red",
        ms=4,
        label=f"skipped by loss_scale ({skipped.size} steps)",
    )
    ax_loss.set_ylabel("training loss (float32 of the float16 model)")
    ax_loss.set_title("Float16 training: gradients below 6e-8 underflow without a loss scale")
    ax_loss.legend(fontsize=8)

    ax_scale.plot(steps, np.log2(dynamic["scale"]), color="tab:blue", lw=1, label="loss_scale's S")
    ax_scale.axhline(
        args.scale_exponent, color="tab:orange", ls="--", lw=1, label="the fixed scale"
    )
    ax_scale.plot(
        skipped,
        np.log2(dynamic["scale"][skipped]),
        "v",
        color="tab:red",
        ms=4,
        label="skipped step (overflow): S halves",
    )
    ax_scale.set_xlabel("step")
    ax_scale.set_ylabel("log2 of the loss scale used")
    ax_scale.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600, help="Adam steps per run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--outputs", type=int, default=32, help="outputs per example")
    parser.add_argument("--amplitude", type=float, default=0.01, help="size of the targets")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--scale-exponent", type=int, default=36, help="the fixed scale and the initial S: 2^this"
    )
    parser.add_argument("--growth-interval", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="docs/mixed_precision.png", help="where to write the figure ('' for none)"
    )
    parser.add_argument("--smoke", action="store_true", help="a short run, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 120
    last = max(1, args.steps // 20)
    print(
        f"float16 MLP, batch {args.batch} x {args.outputs} outputs, {args.steps} steps "
        f"per run ({jax.devices()[0].platform})"
    )
    traces = {run: train(run, args) for run in RUNS}
    rows = summarize(traces, last)
    print()
    print(table(rows, args, last))
    if args.out:
        plot(traces, args, args.out)
        print(f"\nwrote {args.out}")
    for run in RUNS:
        rows[run]["trace"] = traces[run]
    return rows


if __name__ == "__main__":
    main()
