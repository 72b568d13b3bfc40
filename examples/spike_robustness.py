"""Gradient spikes at three loss scales: a fixed threshold fails at one, scale-free policies do not.

Run: python examples/spike_robustness.py [--steps N] [--seeds K] [--out spikes.png]

A student MLP learns a fixed teacher MLP with adam. On 1% of the steps the
targets are multiplied by 300, a gradient spike that, unclipped, fills adam's
second moment and stalls learning for hundreds of steps. The whole loss is
multiplied by a loss scale of 1e-3, 1 or 1e3, as mixed-precision loss scaling
or a change of loss normalisation would do. A fixed threshold of 1.0 is right
at one scale only: at 1e-3 every spike (norm ~0.3) passes under it. The
scale-free policies (zclip, autoclip, quantile_clip, guard with a z-score)
judge each norm against the history of norms and catch the spikes at every
scale.

Two thirds into the run the level shifts: the loss, and with it every gradient,
becomes 10 times larger for good (a new phase of training, a change of loss
weighting). A policy that judges norms against their history must learn the new
level rather than treat every later step as a spike: guard skips the first steps
after the shift, then applies steps again.

The script prints the median (over seeds) of the final clean test loss for
every policy and loss scale, the share of steps clipped or skipped, and the share
of steps applied from 100 steps after the shift on; it writes a PNG of loss and
gradient-norm traces at loss scale 1e-3 with the clip and skip events marked.
"""

import argparse
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

SCALES = (1e-3, 1.0, 1e3)
SPIKE_FACTOR = 300.0
SPIKE_PROBABILITY = 0.01
SHIFT_FACTOR = 10.0
# Steps after the level shift before its share of applied steps is counted.
SETTLE = 100
DIM, HIDDEN, BATCH = 8, 32, 64


def policies(guard_z: float = 4.0) -> dict[str, Callable[[optax.GradientTransformation], Any]]:
    """Each entry wraps the base optimizer with one way of handling spikes."""
    return {
        "no clipping": lambda opt: opt,
        "optax clip 1.0": lambda opt: optax.chain(optax.clip_by_global_norm(1.0), opt),
        "clip_by_global_norm 1.0": lambda opt: optax.chain(optaxclip.clip_by_global_norm(1.0), opt),
        "adaptive_grad_clip 0.01": lambda opt: optax.chain(optaxclip.adaptive_grad_clip(0.01), opt),
        "adagc": lambda opt: optax.chain(optaxclip.adagc(), opt),
        "autoclip p10": lambda opt: optax.chain(optaxclip.autoclip(10.0, history_size=256), opt),
        "quantile_clip q0.5": lambda opt: optax.chain(optaxclip.quantile_clip(), opt),
        "zclip": lambda opt: optax.chain(optaxclip.zclip(), opt),
        f"guard z={guard_z:g}": lambda opt: optaxclip.guard(
            opt, z_threshold=guard_z, warmup_steps=25
        ),
    }


def mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def init_mlp(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (DIM, HIDDEN)) / math.sqrt(DIM),
        "b1": jnp.zeros((1, HIDDEN)),
        "w2": jax.random.normal(k2, (HIDDEN, 1)) / math.sqrt(HIDDEN),
        "b2": jnp.zeros((1, 1)),
    }


def shift_step(steps: int) -> int:
    """The first step of the level shift."""
    return 2 * steps // 3


def make_trainer(
    wrap: Callable[[optax.GradientTransformation], Any], steps: int, learning_rate: float
) -> Callable[[jax.Array, jax.Array], dict[str, jax.Array]]:
    """Returns a jitted `train(seed_key, loss_scale)` that runs all steps in one `lax.scan`."""
    tx = wrap(optax.adam(learning_rate))
    shift = shift_step(steps)

    def train(key: jax.Array, loss_scale: jax.Array) -> dict[str, jax.Array]:
        k_teacher, k_student, k_test, k_data = jax.random.split(key, 4)
        teacher = init_mlp(k_teacher)
        params = init_mlp(k_student)
        x_test = jax.random.normal(k_test, (512, DIM))
        y_test = mlp(teacher, x_test)

        def step(carry: Any, inputs: tuple[jax.Array, jax.Array]) -> Any:
            params, opt_state = carry
            key, t = inputs
            k_x, k_spike = jax.random.split(key)
            x = jax.random.normal(k_x, (BATCH, DIM))
            spike = jax.random.uniform(k_spike) < SPIKE_PROBABILITY
            y = mlp(teacher, x) * jnp.where(spike, SPIKE_FACTOR, 1.0)
            level = loss_scale * jnp.where(t >= shift, SHIFT_FACTOR, 1.0)

            def loss_fn(p: Any) -> jax.Array:
                return level * jnp.mean(jnp.square(mlp(p, x) - y))

            grads = jax.grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            stats = optaxclip.stats(opt_state)
            trace = {
                "test_loss": jnp.mean(jnp.square(mlp(params, x_test) - y_test)),
                "grad_norm": optaxclip.global_norm(grads),
                "spike": spike,
                "clipped": _any_flag(stats, "clipped"),
                "skipped": _any_flag(stats, "skipped"),
                "threshold": _first(stats, "threshold"),
                "reports": jnp.bool_(bool(stats)),
            }
            return (params, opt_state), trace

        inputs = (jax.random.split(k_data, steps), jnp.arange(steps))
        _, traces = jax.lax.scan(step, (params, tx.init(params)), inputs)
        return traces

    return jax.jit(jax.vmap(train, in_axes=(0, None)))


def _any_flag(stats: dict[str, jax.Array], field: str) -> jax.Array:
    flags = [v for k, v in stats.items() if k.split("/")[-1] == field]
    return jnp.any(jnp.stack(flags)) if flags else jnp.bool_(False)


def _first(stats: dict[str, jax.Array], field: str) -> jax.Array:
    values = [v for k, v in stats.items() if k.split("/")[-1] == field]
    return values[0] if values else jnp.float32(jnp.nan)


def run(
    steps: int,
    seeds: int,
    learning_rate: float,
    only: list[str] | None = None,
    progress: bool = True,
) -> dict[str, dict[float, dict[str, np.ndarray]]]:
    """Trains each policy (or those in `only`) at each loss scale: traces[policy][scale][field]."""
    keys = jax.random.split(jax.random.key(0), seeds)
    results: dict[str, dict[float, dict[str, np.ndarray]]] = {}
    chosen = {k: v for k, v in policies().items() if only is None or k in only}
    unknown = set(only or ()) - set(chosen)
    if unknown:
        raise SystemExit(f"unknown policies {sorted(unknown)}; choose from {list(policies())}")
    for name, wrap in chosen.items():
        train = make_trainer(wrap, steps, learning_rate)
        results[name] = {}
        for scale in SCALES:
            traces = train(keys, jnp.float32(scale))
            results[name][scale] = {k: np.asarray(v) for k, v in traces.items()}
        if progress:
            print(f"  trained {name}", flush=True)
    return results


def final_losses(results: dict[str, dict[float, dict[str, np.ndarray]]]) -> dict[str, list[float]]:
    """Median over seeds of the final clean test loss, per policy and loss scale."""
    return {
        name: [float(np.median(by_scale[s]["test_loss"][:, -1])) for s in SCALES]
        for name, by_scale in results.items()
    }


def applied_after_shift(trace: dict[str, np.ndarray]) -> float:
    """The share of steps applied (not skipped) from SETTLE steps after the shift on."""
    start = shift_step(trace["skipped"].shape[-1]) + SETTLE
    return float(np.mean(~trace["skipped"][..., start:]))


def table(results: dict[str, dict[float, dict[str, np.ndarray]]]) -> str:
    losses = final_losses(results)
    header = (
        f"| policy | {' | '.join(f'loss scale {s:g}' for s in SCALES)} | clipped or skipped "
        f"(scale 1) | applied {SETTLE}+ steps after the shift |"
    )
    lines = [header, "|---|" + "---:|" * len(SCALES) + "---:|---:|"]
    for name, row in losses.items():
        at_one = results[name][1.0]
        events = at_one["clipped"] | at_one["skipped"]
        reports = at_one["reports"].all()
        share = f"{float(np.mean(events)):.1%}" if reports else "not reported"
        applied = f"{applied_after_shift(at_one):.1%}" if reports else "not reported"
        cells = " | ".join(f"{v:.4f}" for v in row)
        lines.append(f"| {name} | {cells} | {share} | {applied} |")
    return "\n".join(lines)


def plot(
    results: dict[str, dict[float, dict[str, np.ndarray]]], path: str, scale: float = 1e-3
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [n for n in results if not n.startswith(("adaptive_grad", "adagc", "clip_by"))]
    reference = results["zclip" if "zclip" in results else shown[0]][scale]
    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    ax_norm.semilogy(
        reference["grad_norm"][0], color="0.6", lw=0.8, label="gradient norm (zclip run)"
    )
    for t in np.flatnonzero(reference["spike"][0]):
        ax_norm.axvline(t, color="red", alpha=0.2, lw=3)
    for name in shown:
        trace = results[name][scale]
        (line,) = ax_loss.semilogy(trace["test_loss"][0], label=name, lw=1.2)
        # zclip's threshold is the norm itself except on spikes; the markers show those.
        if name in ("autoclip p10", "quantile_clip q0.5"):
            ax_norm.semilogy(
                trace["threshold"][0], color=line.get_color(), lw=1, label=f"{name} threshold"
            )
        quiet = np.flatnonzero(trace["skipped"][0] & ~trace["spike"][0])
        if quiet.size:
            ax_norm.scatter(
                quiet,
                trace["grad_norm"][0][quiet],
                facecolors="none",
                edgecolors=line.get_color(),
                s=30,
                marker="o",
                label=f"{name}: skipped, no spike",
            )
        events = np.flatnonzero(trace["spike"][0] & (trace["clipped"][0] | trace["skipped"][0]))
        if events.size == 0:
            continue
        ax_norm.scatter(
            events,
            trace["grad_norm"][0][events],
            color=line.get_color(),
            s=18,
            marker="x",
            label=f"{name}: spike clipped/skipped",
        )
    for ax in (ax_loss, ax_norm):
        ax.axvline(shift_step(reference["grad_norm"].shape[-1]), color="black", ls="--", lw=1)
    ax_loss.set_ylabel("clean test loss (seed 0)")
    ax_loss.set_title(f"Gradient spikes (targets x{SPIKE_FACTOR:g}) at loss scale {scale:g}")
    ax_loss.legend(fontsize=8, ncol=2)
    ax_norm.set_ylabel("norm")
    ax_norm.set_xlabel("step (red bands: spike steps; dashed: the level shift, x10 for good)")
    ax_norm.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict[str, dict[float, dict[str, np.ndarray]]]) -> dict[str, dict[str, Any]]:
    """Per policy: the final losses (one per loss scale) and, where the policy reports its
    steps, the share applied after the shift at loss scale 1."""
    losses = final_losses(results)
    rows = {}
    for name, by_scale in results.items():
        at_one = by_scale[1.0]
        reports = bool(at_one["reports"].all())
        rows[name] = {
            "final": losses[name],
            "applied_after_shift": applied_after_shift(at_one) if reports else None,
        }
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--out", default="spike_robustness.png", help="PNG path ('' for none)")
    parser.add_argument("--only", nargs="*", help="train only these policies (names as printed)")
    args = parser.parse_args(argv)
    print(
        f"Training {len(args.only or policies())} policies x {len(SCALES)} loss scales x "
        f"{args.seeds} seeds, {args.steps} steps each ({jax.devices()[0].platform})"
    )
    results = run(args.steps, args.seeds, args.learning_rate, args.only)
    print("\nFinal clean test loss, median over seeds:\n")
    print(table(results))
    if args.out:
        plot(results, args.out)
        print(f"\nwrote {args.out}")
    return summary(results)


if __name__ == "__main__":
    main()
