"""See inside the step: per-layer gradient norms, pre- and post-clip, logged every step.

Run: python examples/monitoring.py [--steps N] [--layers L] [--logdir DIR] [--out PNG]

A small character-level transformer (flax nnx, its blocks stacked for `nnx.scan`)
learns to continue the source of Python's own `argparse` module (it ships with
the interpreter; nothing is downloaded). The optimizer is one chain:

    optax.chain(
        optaxclip.monitor(top_level, stacked=in_blocks, name="grads"),  # raw gradients
        optaxclip.clip_by_global_norm(max_norm, name="clip"),
        optax.adam(learning_rate),
        optaxclip.monitor(name="updates"),                              # what is applied
    )

so one step records the raw gradient norm of every layer of the stack, the clip's
decision and scale, and the norm of every update and its ratio to its parameter.
After every step `optaxclip.host_stats(optimizer)` brings all of it to the host in
one transfer; it goes to TensorBoard event files (tensorboardX) and to a CSV, and
at the end a figure shows the per-layer gradient norms (layer x step) with the
clip events marked, and the global norm before and after the clip.

    tensorboard --logdir runs/monitoring      # to browse the event files
"""

import argparse
import csv
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import optaxclip


def load_text() -> np.ndarray:
    """The source of `argparse` as byte codes below 128 (anything else becomes '?')."""
    source = Path(argparse.__file__).read_text(encoding="utf-8")
    return np.frombuffer(source.encode("ascii", "replace"), np.uint8).astype(np.int32)


class Block(nnx.Module):
    """Pre-norm attention and MLP, each with a residual connection."""

    def __init__(self, d_model: int, heads: int, rngs: nnx.Rngs) -> None:
        self.attn_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d_model, decode=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.mlp_norm(x))))


class Transformer(nnx.Module):
    def __init__(
        self, vocab: int, d_model: int, heads: int, layers: int, seq: int, rngs: nnx.Rngs
    ) -> None:
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d_model)))

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(d_model, heads, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.position[...][None, : tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def through(x: jax.Array, block: Block) -> jax.Array:
            return block(x, mask)

        return self.head(self.final_norm(through(x, self.blocks)))


def top_level(tree: Any) -> Any:
    """One group per attribute of the model: `embed`, `position`, `blocks`, ..."""
    return jax.tree_util.tree_map_with_path(lambda path, _: str(path[0].key), tree)


def in_blocks(tree: Any) -> Any:
    """The leaves of the scan-stacked blocks, whose leading axis is the layer."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "blocks", tree)


def loss_fn(model: Transformer, tokens: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def train_step(model: Transformer, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss


def tag(key: str) -> str:
    """A stats key as a TensorBoard tag: `norms/['blocks']['up']` becomes `norms/blocks.up`.

    TensorBoard would replace the brackets and quotes with underscores; dots read better.
    """
    return re.sub(r"\['([^']*)'\]", r".\1", key).replace("/.", "/")


def draw(rows: list[dict[str, Any]], layers: int, max_norm: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    steps = np.array([row["step"] for row in rows])
    per_layer = np.array([[row[f"grads/norms/blocks/{i}"] for i in range(layers)] for row in rows])
    clipped = np.array([bool(row["clip/clipped"]) for row in rows])
    pre = np.array([row["clip/grad_norm"] for row in rows])
    post = pre * np.array([row["clip/scale"] for row in rows])

    fig, ((heat, bar), (line, spare)) = plt.subplots(
        2,
        2,
        figsize=(9, 6.5),
        sharex="col",
        layout="constrained",
        gridspec_kw={"height_ratios": [1, 1.1], "width_ratios": [40, 1]},
    )
    spare.axis("off")
    image = heat.imshow(
        per_layer.T,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, layers - 0.5),
        norm=LogNorm(vmin=max(per_layer.min(), 1e-6), vmax=per_layer.max()),
        cmap="viridis",
    )
    heat.plot(
        steps[clipped],
        np.full(clipped.sum(), 1.025),
        "|",
        color="crimson",
        markersize=7,
        transform=heat.get_xaxis_transform(),  # x in steps, y just above the top edge
        clip_on=False,
        label=f"clip event ({clipped.sum()} of {len(steps)} steps)",
    )
    heat.set_yticks(range(layers))
    heat.set_ylabel("layer of the stack")
    heat.set_title("Raw gradient norm of each layer: monitor(stacked=...) before the clip", pad=12)
    heat.legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.colorbar(image, cax=bar, label="per-layer gradient norm")

    line.plot(steps, pre, color="tab:blue", lw=1.2, label="pre-clip: clip/grad_norm")
    line.plot(
        steps, post, color="tab:orange", lw=1.2, label="post-clip: clip/grad_norm * clip/scale"
    )
    line.axhline(max_norm, color="black", ls="--", lw=0.8, label=f"max_norm = {max_norm:g}")
    line.set_yscale("log")
    line.set_xlabel("step")
    line.set_ylabel("global gradient norm")
    line.set_title("Global norm before and after clip_by_global_norm")
    line.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--layers", type=int, default=6, help="blocks in the scanned stack")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="characters per example")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-norm", type=float, default=1.0, help="clipping threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs/monitoring", help="event files and stats.csv")
    parser.add_argument("--out", default="monitoring.png", help="the figure ('' for none)")
    args = parser.parse_args(argv)

    from tensorboardX import SummaryWriter

    text = load_text()
    rng = np.random.default_rng(args.seed)
    model = Transformer(128, args.d_model, args.heads, args.layers, args.seq, nnx.Rngs(args.seed))
    tx = optax.chain(
        optaxclip.monitor(top_level, stacked=in_blocks, name="grads"),
        optaxclip.clip_by_global_norm(args.max_norm, name="clip"),
        optax.adam(args.learning_rate),
        optaxclip.monitor(name="updates"),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    print(
        f"argparse.py: {len(text):,} characters; {args.layers} stacked blocks of d={args.d_model}; "
        f"{args.steps} steps of {args.batch_size} x {args.seq} ({jax.devices()[0].platform})"
    )

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with (
        SummaryWriter(str(logdir)) as writer,
        (logdir / "stats.csv").open("w", newline="") as csv_file,
    ):
        table = None
        bar = tqdm(range(args.steps), desc="train", mininterval=0.5)
        for step in bar:
            starts = rng.integers(0, len(text) - args.seq - 1, args.batch_size)
            tokens = np.stack([text[s : s + args.seq + 1] for s in starts])
            loss = train_step(model, optimizer, jnp.asarray(tokens))
            row = {"step": step, "loss": float(loss), **optaxclip.host_stats(optimizer)}
            rows.append(row)
            for key, value in row.items():
                if key != "step":
                    writer.add_scalar(tag(key), float(value), step)
            if table is None:
                table = csv.DictWriter(csv_file, fieldnames=[tag(k) for k in row])
                table.writeheader()
            table.writerow({tag(k): v for k, v in row.items()})
            bar.set_postfix(loss=f"{row['loss']:.3f}", grad_norm=f"{row['clip/grad_norm']:.2f}")
    seconds = time.perf_counter() - started

    clipped = sum(bool(row["clip/clipped"]) for row in rows)
    last = rows[-1]
    print(f"loss {rows[0]['loss']:.3f} -> {last['loss']:.3f}; clipped {clipped} of {len(rows)}")
    print(f"{len(rows)} steps in {seconds:.1f}s; {len(last) - 2} stats per step logged to {logdir}")
    per_layer = [last[f"grads/norms/blocks/{i}"] for i in range(args.layers)]
    print("last step, gradient norm per layer: " + " ".join(f"{n:.3f}" for n in per_layer))
    if args.out:
        draw(rows, args.layers, args.max_norm, Path(args.out))
        print(f"figure: {args.out}")
    return {"rows": rows, "logdir": logdir, "csv": logdir / "stats.csv", "seconds": seconds}


if __name__ == "__main__":
    main()
