"""`train`: a full training step of a small flax.nnx transformer, with and without clipping."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from benchmarks.harness import (
    RunConfig,
    Session,
    compile_call,
    interleaved,
    log,
    ms,
    print_table,
    timing_fields,
)
from benchmarks.problems import STEP_IMPLS

# issue 6: full-step overhead of clipping under 3%.
TRAIN_MAX_OVERHEAD = 0.03


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The decoder-only transformer of `train`.

    Attributes:
      vocab: vocabulary size (embedding and output head).
      d_model: width.
      heads: attention heads.
      layers: transformer blocks.
      seq: tokens per sequence.
      batch: sequences per step.
    """

    vocab: int
    d_model: int
    heads: int
    layers: int
    seq: int
    batch: int


def configure(run: RunConfig) -> Sizes:
    if run.quick:
        if run.accelerator:
            return Sizes(vocab=1024, d_model=256, heads=4, layers=4, seq=128, batch=16)
        return Sizes(vocab=256, d_model=64, heads=4, layers=2, seq=32, batch=4)
    if run.accelerator:
        return Sizes(vocab=8192, d_model=512, heads=8, layers=8, seq=512, batch=16)
    return Sizes(vocab=512, d_model=256, heads=4, layers=4, seq=128, batch=8)


def run(session: Session, m: Sizes) -> None:
    try:
        from flax import nnx
    except ImportError:
        session.note("train", "flax is not installed: skipped (pip install 'optaxclip[examples]')")
        return

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.ln1 = nnx.LayerNorm(m.d_model, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(
                num_heads=m.heads, in_features=m.d_model, decode=False, rngs=rngs
            )
            self.ln2 = nnx.LayerNorm(m.d_model, rngs=rngs)
            self.up = nnx.Linear(m.d_model, 4 * m.d_model, rngs=rngs)
            self.down = nnx.Linear(4 * m.d_model, m.d_model, rngs=rngs)

        def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
            x = x + self.attn(self.ln1(x), mask=mask)
            return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))

    class Transformer(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Embed(m.vocab, m.d_model, rngs=rngs)
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (m.seq, m.d_model)))
            self.blocks = nnx.List([Block(rngs) for _ in range(m.layers)])
            self.ln = nnx.LayerNorm(m.d_model, rngs=rngs)
            self.head = nnx.Linear(m.d_model, m.vocab, rngs=rngs)

        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = self.embed(tokens) + self.pos[...]
            mask = nnx.make_causal_mask(tokens)
            for block in self.blocks:
                x = block(x, mask)
            return self.head(self.ln(x))

    graphdef, params, rest = nnx.split(Transformer(nnx.Rngs(0)), nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(3), (m.batch, m.seq + 1), 0, m.vocab)
    count = sum(x.size for x in jax.tree.leaves(params))
    leaves = len(jax.tree.leaves(params))

    def loss_fn(params: Any, tokens: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def train_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
        def step(params: Any, state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        return step

    built = {}
    for impl, make in STEP_IMPLS.items():
        log(f"train {impl}: compiling")
        tx = make()
        built[impl] = compile_call(train_step(tx), params, tx.init(params), tokens)
    log("train: timing")
    cfg = session.run
    times = interleaved({k: c.call for k, c in built.items()}, cfg.repeats, cfg.min_sample_s)
    base = times["adam"].median
    rows = []
    for impl, c in built.items():
        t = times[impl]
        overhead = t.median / base - 1
        session.record(
            "train",
            impl,
            leaves=leaves,
            dtype="float32",
            size_bytes=count * 4,
            model=dataclasses.asdict(m),
            parameters=count,
            **timing_fields(t, c),
            overhead=overhead,
        )
        row = [impl, leaves, f"{count:,}", ms(t.median), ms(t.min), f"{overhead * 100:+.2f}%"]
        rows.append([*row, f"{c.total_s:.2f}"])
    overhead = times["optaxclip clip+adam"].median / base - 1
    session.target(
        "train",
        f"full-step overhead of optaxclip clipping < {TRAIN_MAX_OVERHEAD:.0%}",
        f"{overhead * 100:+.2f}%",
        overhead < TRAIN_MAX_OVERHEAD,
    )
    print_table(
        f"training step of a flax.nnx transformer (d={m.d_model}, layers={m.layers}, "
        f"seq={m.seq}, batch={m.batch}): forward + backward + update, overhead vs adam alone",
        ["implementation", "leaves", "params", "median ms", "min ms", "overhead", "compile s"],
        rows,
    )
