"""optaxclip's flagship demo: data-parallel training under gradient trouble.

Run: make demo   (or: python examples/demo.py [--steps N] [--seeds K] [--devices D])

A student MLP learns a teacher MLP with adam, data-parallel over D devices
(`jax.jit` with a batch sharded over a device mesh; on a CPU, D simulated
devices). The training run is made hard on purpose:

- gradient spikes: on a few steps the targets are multiplied by 300;
- one NaN batch halfway through;
- a loss-scale sweep: the loss is multiplied by 1e-3, 1 or 1e3, as a change of
  loss normalisation or mixed-precision loss scaling would do.

Six ways of handling it are compared: no clipping, optax's fixed clip, optaxclip's
fixed clip, zclip, autoclip and guard. The script prints a table (final clean
test loss per loss scale, steps clipped and skipped, whether the run survived
the NaN batch) and writes demo.png: loss curves and gradient-norm traces with
clip thresholds and skip events. It uses a GPU or TPU when JAX has one.
"""

import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    count = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    )

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import optaxclip

SCALES = (1e-3, 1.0, 1e3)
DIM, HIDDEN, BATCH = 16, 64, 256
SPIKE_FACTOR = 300.0
FIXED = 1.0

POLICIES: dict[str, Callable[[optax.GradientTransformation], Any]] = {
    "no clipping": lambda opt: opt,
    "optax clip_by_global_norm": lambda opt: optax.chain(optax.clip_by_global_norm(FIXED), opt),
    "optaxclip clip_by_global_norm": lambda opt: optax.chain(
        optaxclip.clip_by_global_norm(FIXED, nonfinite="skip"), opt
    ),
    "optaxclip zclip": lambda opt: optax.chain(optaxclip.zclip(nonfinite="skip"), opt),
    "optaxclip autoclip": lambda opt: optax.chain(
        optaxclip.autoclip(10.0, history_size=256, nonfinite="skip"), opt
    ),
    "optaxclip guard": lambda opt: optaxclip.guard(opt, z_threshold=4.0, warmup_steps=25),
}
# Policies that skip a step with a non-finite element (nonfinite="skip"); guard reports its own.
SKIP_ON_NONFINITE = {"optaxclip clip_by_global_norm", "optaxclip zclip", "optaxclip autoclip"}


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


def trouble(steps: int) -> tuple[np.ndarray, int]:
    """The steps with a spike (about 1 in 100, at fixed places) and the NaN step."""
    spikes = np.zeros(steps, bool)
    spikes[np.arange(37, steps, 97)] = True
    nan_step = steps // 2
    spikes[nan_step] = False
    return spikes, nan_step


def _field(stats: dict[str, jax.Array], field: str, default: Any) -> jax.Array:
    values = [v for k, v in stats.items() if k.split("/")[-1] == field]
    return values[0] if values else jnp.asarray(default)


def make_step(tx: Any, mesh: jax.sharding.Mesh) -> Callable[..., Any]:
    """The jitted training step: gradients of the sharded batch, the update, and what to plot."""
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def step(
        params: Any,
        opt_state: Any,
        x: jax.Array,
        y: jax.Array,
        scale: jax.Array,
        x_test: jax.Array,
        y_test: jax.Array,
    ) -> Any:
        def loss_fn(p: Any) -> jax.Array:
            return scale * jnp.mean(jnp.square(mlp(p, x) - y))

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = optaxclip.stats(opt_state)
        trace = {
            "loss": jnp.mean(jnp.square(mlp(params, x_test) - y_test)),
            "norm": optaxclip.global_norm(grads),
            "clipped": _field(stats, "clipped", False),
            "skipped": _field(stats, "skipped", False),
            "nonfinite": _field(stats, "nonfinite", 0),
            "thr": _field(stats, "threshold", jnp.nan),
        }
        return params, opt_state, trace

    return jax.jit(
        step,
        in_shardings=(replicated, replicated, batch, batch, replicated, replicated, replicated),
        out_shardings=replicated,
        donate_argnums=(0, 1),
    )


def train(
    name: str, scale: float, seed: int, steps: int, mesh: jax.sharding.Mesh, step_fn: Any
) -> dict[str, np.ndarray]:
    """One run; returns per-step traces."""
    key = jax.random.key(seed)
    k_teacher, k_student, k_test, k_data = jax.random.split(key, 4)
    teacher, params = init_mlp(k_teacher), init_mlp(k_student)
    x_test = jax.random.normal(k_test, (1024, DIM))
    y_test = mlp(teacher, x_test)
    tx = POLICIES[name](optax.adam(3e-3))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    opt_state = tx.init(params)
    reports = bool(optaxclip.stats(opt_state))
    spikes, nan_step = trouble(steps)
    traces = []
    for t in tqdm(range(steps), desc=f"{name} @ {scale:g}", leave=False, mininterval=0.5):
        x = jax.random.normal(jax.random.fold_in(k_data, t), (BATCH, DIM))
        y = mlp(teacher, x) * (SPIKE_FACTOR if spikes[t] else 1.0)
        if t == nan_step:
            x = x.at[0, 0].set(jnp.nan)
        params, opt_state, trace = step_fn(
            params, opt_state, x, y, jnp.float32(scale), x_test, y_test
        )
        traces.append(trace)
    # Stacked on the host: one device program over hundreds of replicated arrays would
    # be a large collective for nothing.
    fetched = jax.device_get(traces)
    out = {k: np.asarray([t[k] for t in fetched], np.float64) for k in fetched[0]}
    out["clipped"] = out["clipped"] > 0
    out["skipped"] = (out["skipped"] > 0) | ((out["nonfinite"] > 0) & (name in SKIP_ON_NONFINITE))
    out["reports"] = np.asarray(reports)
    return out


def run(
    steps: int, seeds: int, devices: int
) -> tuple[dict[str, dict[float, list[dict[str, np.ndarray]]]], int]:
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    results: dict[str, dict[float, list[dict[str, np.ndarray]]]] = {}
    bar = tqdm(total=len(POLICIES) * len(SCALES) * seeds, desc="runs", position=0)
    for name in POLICIES:
        step_fn = make_step(POLICIES[name](optax.adam(3e-3)), mesh)
        results[name] = {}
        for scale in SCALES:
            results[name][scale] = []
            for seed in range(seeds):
                results[name][scale].append(train(name, scale, seed, steps, mesh, step_fn))
                bar.update()
    bar.close()
    return results, trouble(steps)[1]


def summary(
    results: dict[str, dict[float, list[dict[str, np.ndarray]]]],
) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, by_scale in results.items():
        finals = [float(np.median([r["loss"][-1] for r in runs])) for runs in by_scale.values()]
        at_one = by_scale[1.0]
        reports = bool(at_one[0]["reports"])
        rows[name] = {
            "final": finals,
            "clipped": int(np.sum(at_one[0]["clipped"])) if reports else None,
            "skipped": int(np.sum(at_one[0]["skipped"])) if reports else None,
            "survived": all(np.isfinite(r["loss"][-1]) for runs in by_scale.values() for r in runs),
        }
    return rows


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = " | ".join(f"loss @ scale {s:g}" for s in SCALES)
    lines = [f"| policy | {head} | steps clipped | steps skipped | NaN survived |"]
    lines.append("|---|" + "---:|" * len(SCALES) + "---:|---:|:---:|")
    for name, row in rows.items():
        finals = " | ".join(f"{v:.4g}" for v in row["final"])
        clipped = "not reported" if row["clipped"] is None else str(row["clipped"])
        skipped = "not reported" if row["skipped"] is None else str(row["skipped"])
        survived = "yes" if row["survived"] else "no"
        lines.append(f"| {name} | {finals} | {clipped} | {skipped} | {survived} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[float, list[dict[str, np.ndarray]]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    steps = len(next(iter(results.values()))[1.0][0]["loss"])
    spikes, nan_step = trouble(steps)
    for ax, scale in ((axes[0, 0], 1e-3), (axes[0, 1], 1.0)):
        for name, by_scale in results.items():
            loss = by_scale[scale][0]["loss"]
            ax.semilogy(np.where(np.isfinite(loss), loss, np.nan), label=name, color=colors[name])
            if not np.isfinite(loss[-1]):
                ax.plot([nan_step], [1.0], "x", color=colors[name], ms=10)
        ax.axvline(nan_step, color="black", ls=":", lw=1)
        ax.set_title(f"clean test loss, loss scale {scale:g} (dotted: NaN batch; x: run died)")
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    ax = axes[1, 0]
    scale = 1e-3
    zclip = results["optaxclip zclip"][scale][0]
    ax.semilogy(zclip["norm"], color="0.6", lw=0.8, label="gradient norm")
    for t in np.flatnonzero(spikes):
        ax.axvline(t, color="red", alpha=0.2, lw=3)
    for name in ("optaxclip zclip", "optaxclip autoclip"):
        run = results[name][scale][0]
        clipped = np.flatnonzero(run["clipped"] & spikes)
        ax.semilogy(run["thr"], lw=1, color=colors[name], label=f"{name} threshold")
        ax.scatter(clipped, run["norm"][clipped], marker="x", color=colors[name], s=25)
    guard = results["optaxclip guard"][scale][0]
    skipped = np.flatnonzero(guard["skipped"])
    ax.scatter(
        skipped,
        guard["norm"][skipped],
        marker="o",
        facecolors="none",
        s=60,
        color=colors["optaxclip guard"],
        label="guard: skipped step",
    )
    ax.set_title("loss scale 1e-3: gradient norm, thresholds, clip (x) and skip (o) events")
    ax.set_xlabel("step (red bands: spike steps)")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    rows = summary(results)
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        finals = np.asarray(row["final"])
        shown = np.where(np.isfinite(finals), finals, 1e3)
        positions = np.arange(len(SCALES)) + i * width
        bars = ax.bar(positions, shown, width, color=colors[name], label=name)
        for bar, value in zip(bars, finals, strict=True):
            if not np.isfinite(value):
                ax.text(bar.get_x() + width / 2, 1.2e3, "NaN", ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(SCALES)) + 0.4 - width / 2, [f"loss scale {s:g}" for s in SCALES])
    ax.set_title("final clean test loss (median over seeds; NaN: diverged)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per policy and loss scale")
    parser.add_argument("--devices", type=int, default=None, help="data-parallel devices")
    parser.add_argument("--out", default="demo.png", help="where to write the figure ('' for none)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 120
    devices = args.devices or len(jax.devices())
    if devices > len(jax.devices()):
        parser.error(f"--devices {devices}: only {len(jax.devices())} devices are available")
    print(
        f"{len(POLICIES)} policies x {len(SCALES)} loss scales x {args.seeds} seed(s), "
        f"{args.steps} steps, data-parallel over {devices} {jax.devices()[0].platform} device(s)"
    )
    results, _ = run(args.steps, args.seeds, devices)
    rows = summary(results)
    print()
    print(table(rows))
    if args.out:
        plot(results, args.out)
        print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
