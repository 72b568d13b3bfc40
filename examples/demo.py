"""optaxclip's flagship demo: data-parallel training under gradient trouble.

Run: make demo   (or: python examples/demo.py [--steps N] [--seeds K] [--devices D])

A student MLP learns a teacher MLP with adam, data-parallel over D devices
(`jax.jit` with a batch sharded over a device mesh; on a CPU, D simulated
devices). The training run is made hard on purpose:

- gradient spikes: on a few steps the targets are multiplied by 300;
- one batch with bad labels (label noise): its loss is several times the usual,
  its gradient norm hardly stands out;
- one NaN batch halfway through;
- a level shift: from 5/8 of the run on the loss is 10 times larger for good (a
  new phase of training, a change of loss weighting), and so is every gradient;
- a loss-scale sweep: the loss is multiplied by 1e-3, 1 or 1e3, as a change of
  loss normalisation or mixed-precision loss scaling would do.

Six ways of handling it are compared: no clipping, optax's fixed clip, optaxclip's
fixed clip, zclip, autoclip and guard (watching the gradient norm and the loss,
passed as `value=loss`). The script prints a table (final clean test loss per
loss scale, steps clipped and skipped, what happened to the bad-label batch, the
share of steps applied once the level shift is 50 steps old, whether the run
survived the NaN batch) and writes demo.png: loss curves and gradient-norm traces
with clip thresholds and skip events. It uses a GPU or TPU when JAX has one.
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
from typing import Any, NamedTuple

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
SHIFT_FACTOR = 10.0
# The bad labels: the true targets plus noise of this many times their spread.
LABEL_NOISE = 0.8
# Steps after the level shift before its share of applied steps is counted.
SETTLE = 50
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
    # alpha=0.95: statistics over the last ~20 steps, so that in a run of a few hundred steps
    # they forget the first steps' large norms and losses soon enough.
    "optaxclip guard": lambda opt: optaxclip.guard(
        opt, z_threshold=4.0, loss_z_threshold=4.0, alpha=0.95, warmup_steps=25
    ),
}
# Why guard skips a step, as its state counts them.
SKIP_REASONS = {
    "nonfinite": "non-finite",
    "over_max": "over max_norm",
    "norm_spike": "norm spikes",
    "loss_spike": "loss spikes",
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


class Trouble(NamedTuple):
    """Where the run is made hard."""

    spikes: np.ndarray  # bool per step: targets x SPIKE_FACTOR
    bad_labels: int  # the batch with label noise
    nan_step: int  # the batch with a NaN input
    shift: int  # the first step of the level shift


def trouble(steps: int) -> Trouble:
    """Spikes about 1 step in 100 (at fixed places), then the other events, in order."""
    spikes = np.zeros(steps, bool)
    spikes[np.arange(37, steps, 97)] = True
    bad_labels, nan_step, shift = 3 * steps // 8, steps // 2, 5 * steps // 8
    spikes[[bad_labels, nan_step, shift]] = False
    return Trouble(spikes, bad_labels, nan_step, shift)


def _field(stats: dict[str, jax.Array], field: str, default: Any) -> jax.Array:
    values = [v for k, v in stats.items() if k.split("/")[-1] == field]
    return values[0] if values else jnp.asarray(default)


def _z(x: jax.Array, stats: dict[str, jax.Array], mean: str, var: str) -> jax.Array:
    mu, sigma2 = _field(stats, mean, jnp.nan), _field(stats, var, jnp.nan)
    return (x - mu) / jnp.sqrt(jnp.maximum(sigma2, 1e-30))


def make_step(tx: Any, mesh: jax.sharding.Mesh) -> Callable[..., Any]:
    """The jitted training step: gradients of the sharded batch, the update, and what to plot."""
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    tx = optax.with_extra_args_support(tx)

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

        # The loss of the whole (sharded) batch: the same on every device, as guard needs.
        loss, grads = jax.value_and_grad(loss_fn)(params)
        before = optaxclip.stats(opt_state)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
        stats = optaxclip.stats(opt_state)
        norm = optaxclip.global_norm(grads)
        trace = {
            "loss": jnp.mean(jnp.square(mlp(params, x_test) - y_test)),
            "norm": norm,
            "clipped": _field(stats, "clipped", False),
            "skipped": _field(stats, "skipped", False),
            "nonfinite": _field(stats, "nonfinite", 0),
            "thr": _field(stats, "threshold", jnp.nan),
            **{f"skip_{r}": _field(stats, f"skip_{r}", 0) for r in SKIP_REASONS},
            # How far this step stood out of guard's statistics (NaN for the others).
            "norm_z": _z(norm, before, "mean", "var"),
            "loss_z": _z(loss, before, "loss_mean", "loss_var"),
        }
        return params, opt_state, trace

    return jax.jit(
        step,
        in_shardings=(replicated, replicated, batch, batch, replicated, replicated, replicated),
        out_shardings=replicated,
        donate_argnums=(0, 1),
    )


@jax.jit
def make_batch(
    teacher: Any, k_data: jax.Array, t: int, factor: Any, noise: Any, nan: bool
) -> tuple[jax.Array, jax.Array]:
    """Batch t, made hard as asked: one dispatch per step rather than one per array op.

    The teacher's targets are multiplied by `factor`, get label noise of `noise` times their
    spread, and the first input is NaN if `nan`.
    """
    k_x, k_noise = jax.random.split(jax.random.fold_in(k_data, t))
    x = jax.random.normal(k_x, (BATCH, DIM))
    y = mlp(teacher, x) * factor
    y = y + noise * jnp.std(y) * jax.random.normal(k_noise, y.shape)
    return x.at[0, 0].set(jnp.where(nan, jnp.nan, x[0, 0])), y


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
    plan = trouble(steps)
    traces = []
    for t in tqdm(range(steps), desc=f"{name} @ {scale:g}", leave=False, mininterval=0.5):
        x, y = make_batch(
            teacher,
            k_data,
            t,
            np.float32(SPIKE_FACTOR if plan.spikes[t] else 1.0),
            np.float32(LABEL_NOISE if t == plan.bad_labels else 0.0),
            t == plan.nan_step,
        )
        level = scale * (SHIFT_FACTOR if t >= plan.shift else 1.0)
        params, opt_state, trace = step_fn(
            params, opt_state, x, y, jnp.float32(level), x_test, y_test
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
    steps: int, seeds: int, devices: int, only: list[str] | None = None
) -> dict[str, dict[float, list[dict[str, np.ndarray]]]]:
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    results: dict[str, dict[float, list[dict[str, np.ndarray]]]] = {}
    chosen = [name for name in POLICIES if only is None or name in only]
    bar = tqdm(total=len(chosen) * len(SCALES) * seeds, desc="runs", position=0)
    for name in chosen:
        step_fn = make_step(POLICIES[name](optax.adam(3e-3)), mesh)
        results[name] = {}
        for scale in SCALES:
            results[name][scale] = []
            for seed in range(seeds):
                results[name][scale].append(train(name, scale, seed, steps, mesh, step_fn))
                bar.update()
    bar.close()
    return results


def summary(
    results: dict[str, dict[float, list[dict[str, np.ndarray]]]],
) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, by_scale in results.items():
        finals = [float(np.median([r["loss"][-1] for r in runs])) for runs in by_scale.values()]
        run = by_scale[1.0][0]
        plan = trouble(len(run["loss"]))
        reports = bool(run["reports"])
        bad = plan.bad_labels
        rows[name] = {
            "final": finals,
            "clipped": int(np.sum(run["clipped"])) if reports else None,
            "skipped": int(np.sum(run["skipped"])) if reports else None,
            "bad_labels": (
                None
                if not reports
                else "skipped on its loss"
                if run["skip_loss_spike"][bad] > run["skip_loss_spike"][bad - 1]
                else "skipped"
                if run["skipped"][bad]
                else "clipped"
                if run["clipped"][bad]
                else "applied"
            ),
            "applied_after_shift": (
                float(np.mean(~run["skipped"][plan.shift + SETTLE :])) if reports else None
            ),
            "survived": all(np.isfinite(r["loss"][-1]) for runs in by_scale.values() for r in runs),
        }
    return rows


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = " | ".join(f"loss @ scale {s:g}" for s in SCALES)
    lines = [
        f"| policy | {head} | steps clipped | steps skipped | bad-label batch "
        f"| applied {SETTLE}+ steps after the shift | NaN survived |"
    ]
    lines.append("|---|" + "---:|" * len(SCALES) + "---:|---:|:---:|---:|:---:|")
    for name, row in rows.items():
        finals = " | ".join(f"{v:.4g}" for v in row["final"])
        clipped = "not reported" if row["clipped"] is None else str(row["clipped"])
        skipped = "not reported" if row["skipped"] is None else str(row["skipped"])
        bad = "not reported" if row["bad_labels"] is None else row["bad_labels"]
        share = row["applied_after_shift"]
        applied = "not reported" if share is None else f"{share:.0%}"
        survived = "yes" if row["survived"] else "no"
        lines.append(
            f"| {name} | {finals} | {clipped} | {skipped} | {bad} | {applied} | {survived} |"
        )
    return "\n".join(lines)


def guard_report(results: dict[str, dict[float, list[dict[str, np.ndarray]]]]) -> str:
    """Why guard skipped, and how the bad-label batch looked to it, at loss scale 1."""
    run = results["optaxclip guard"][1.0][0]
    t = trouble(len(run["loss"])).bad_labels
    why = ", ".join(f"{int(run[f'skip_{r}'][-1])} {text}" for r, text in SKIP_REASONS.items())
    return (
        f"guard skipped {int(np.sum(run['skipped']))} steps: {why}.\n"
        f"The bad-label batch (step {t}) against guard's statistics: gradient norm "
        f"z = {run['norm_z'][t]:.1f}, loss z = {run['loss_z'][t]:.1f} (both thresholds 4)."
    )


def plot(results: dict[str, dict[float, list[dict[str, np.ndarray]]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    steps = len(next(iter(results.values()))[1.0][0]["loss"])
    plan = trouble(steps)
    spikes = plan.spikes

    def events(ax: Any) -> None:
        ax.axvline(plan.bad_labels, color="black", ls="-.", lw=1)
        ax.axvline(plan.nan_step, color="black", ls=":", lw=1)
        ax.axvline(plan.shift, color="black", ls="--", lw=1)

    for ax, scale in ((axes[0, 0], 1e-3), (axes[0, 1], 1.0)):
        for name, by_scale in results.items():
            loss = by_scale[scale][0]["loss"]
            ax.semilogy(np.where(np.isfinite(loss), loss, np.nan), label=name, color=colors[name])
            if not np.isfinite(loss[-1]):
                ax.plot([plan.nan_step], [1.0], "x", color=colors[name], ms=10)
        events(ax)
        ax.set_title(f"clean test loss, loss scale {scale:g} (x: run died)", fontsize=10)
        ax.set_xlabel("step (dash-dot: bad labels; dotted: NaN batch; dashed: level shift x10)")
    axes[0, 0].legend(fontsize=8)
    ax = axes[1, 0]
    scale = 1e-3
    zclip = results["optaxclip zclip"][scale][0]
    ax.semilogy(zclip["norm"], color="0.6", lw=0.8, label="gradient norm")
    for t in np.flatnonzero(spikes):
        ax.axvline(t, color="red", alpha=0.2, lw=3)
    events(ax)
    for name in ("optaxclip zclip", "optaxclip autoclip"):
        if name not in results:
            continue
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
    ax.set_ylim(bottom=np.nanmin(zclip["norm"][np.isfinite(zclip["norm"])]) / 2)
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
    parser.add_argument("--only", nargs="*", help="run only these policies (names as printed)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 160
    unknown = set(args.only or ()) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; choose from {list(POLICIES)}")
    devices = args.devices or len(jax.devices())
    if devices > len(jax.devices()):
        parser.error(f"--devices {devices}: only {len(jax.devices())} devices are available")
    print(
        f"{len(args.only or POLICIES)} policies x {len(SCALES)} loss scales x "
        f"{args.seeds} seed(s), "
        f"{args.steps} steps, data-parallel over {devices} {jax.devices()[0].platform} device(s)"
    )
    results = run(args.steps, args.seeds, devices, args.only)
    rows = summary(results)
    print()
    print(table(rows))
    if "optaxclip guard" in results:
        print(guard_report(results))
    if args.out and "optaxclip zclip" in results and "optaxclip guard" in results:
        plot(results, args.out)
        print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
