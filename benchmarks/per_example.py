"""`per_example`: a DP-SGD step's per-example gradients and clip, whole or in micro-batches.

Per-example gradients (`jax.vmap(jax.grad(loss))`) hold batch x parameters
floats, the memory DP-SGD is known for. Each implementation is one jitted
function of (params, batch) returning the clipped sum, timed per example, and its
compiled executable's temporary buffers (`memory_analysis().temp_size_in_bytes`,
what XLA reserves besides arguments and outputs) give the peak memory per example:

- `optax`: `vmap(grad)`, then `optax.per_example_global_norm_clip` (reference);
- `per_example_clip`: `vmap(grad)`, then `optaxclip.per_example_clip`'s update;
- `microbatched_clip xM`: `optaxclip.microbatched_clip` with M micro-batches, which
  computes and clips one chunk of the batch at a time.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaxclip
from benchmarks.harness import (
    Compiled,
    RunConfig,
    Session,
    compile_call,
    interleaved,
    log,
    print_table,
    timing_fields,
)

# Eight micro-batches hold an eighth of the per-example gradients at a time: their
# temporaries at most a quarter of one batch's (the rest is the model's own buffers).
MICROBATCH_MAX_MEMORY_RATIO = 0.25


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of `per_example`.

    Attributes:
      batch: examples per step.
      features: the MLP's input width.
      hidden: the MLP's hidden width (two hidden layers).
      classes: the MLP's output width.
      microbatches: the micro-batch counts compared.
    """

    batch: int
    features: int
    hidden: int
    classes: int
    microbatches: tuple[int, ...] = (1, 8)


def configure(run: RunConfig) -> Sizes:
    if run.accelerator:
        return Sizes(batch=256 if run.quick else 1024, features=256, hidden=1024, classes=10)
    return Sizes(batch=64 if run.quick else 256, features=128, hidden=512, classes=10)


def _problem(sizes: Sizes) -> tuple[Any, Any]:
    widths = [sizes.features, sizes.hidden, sizes.hidden, sizes.classes]
    keys = jax.random.split(jax.random.key(0), len(widths))
    params = [
        {"w": jax.random.normal(k, (a, b)) / math.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, widths[:-1], widths[1:], strict=False)
    ]
    x = jax.random.normal(keys[-1], (sizes.batch, sizes.features))
    y = jnp.arange(sizes.batch) % sizes.classes
    return params, (x, y)


def _loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"][None, :])
    logits = x @ params[-1]["w"] + params[-1]["b"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _per_example_grads(params: Any, batch: tuple[jax.Array, jax.Array]) -> Any:
    one = lambda p, x, y: _loss(p, x[None], y[None])[0]
    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, *batch)


def _implementations(sizes: Sizes) -> dict[str, Callable[[Any, Any], Any]]:
    clip = optaxclip.per_example_clip(1.0, batch_size=sizes.batch)

    def optax_clip(params: Any, batch: Any) -> Any:
        grads = _per_example_grads(params, batch)
        leaves, treedef = jax.tree.flatten(grads)
        summed, _ = optax.per_example_global_norm_clip(leaves, 1.0)
        return jax.tree.unflatten(treedef, summed)

    def whole(params: Any, batch: Any) -> Any:
        return clip.update(_per_example_grads(params, batch), clip.init(params), params)[0]

    impls = {"optax": optax_clip, "per_example_clip": whole}
    for m in sizes.microbatches:

        def chunked(params: Any, batch: Any, m: int = m) -> Any:
            return optaxclip.microbatched_clip(
                clip, _per_example_grads, params, batch, clip.init(params), num_microbatches=m
            )[0]

        impls[f"microbatched_clip x{m}"] = chunked
    return impls


def run(session: Session, sizes: Sizes) -> None:
    params, batch = _problem(sizes)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    built: dict[str, Compiled] = {}
    temp: dict[str, int] = {}
    for name, fn in _implementations(sizes).items():
        log(f"per_example: compiling {name}")
        built[name] = compile_call(fn, params, batch)
        memory = jax.jit(fn).lower(params, batch).compile().memory_analysis()
        temp[name] = int(memory.temp_size_in_bytes) if memory is not None else -1
    log("per_example: timing")
    timings = interleaved(
        {name: c.call for name, c in built.items()}, session.run.repeats, session.run.min_sample_s
    )
    grads_bytes = sizes.batch * n_params * 4
    rows = []
    for name, t in timings.items():
        session.record(
            "per_example",
            name,
            leaves=len(jax.tree.leaves(params)),
            dtype="float32",
            size_bytes=grads_bytes,
            batch=sizes.batch,
            parameters=n_params,
            seconds_per_example=t.median / sizes.batch,
            temp_bytes=temp[name],
            temp_bytes_per_example=temp[name] / sizes.batch,
            **timing_fields(t, built[name]),
        )
        rows.append(
            [
                name,
                f"{t.median * 1e3:.3g}",
                f"{t.median / sizes.batch * 1e6:.3g}",
                f"{temp[name] / 2**20:.3g}",
                f"{temp[name] / sizes.batch / 2**10:.3g}",
                f"{timings[name].median / timings['optax'].median:.2f}",
            ]
        )
    first, last = (
        f"microbatched_clip x{m}" for m in (sizes.microbatches[0], sizes.microbatches[-1])
    )
    ratio = temp[last] / temp[first]
    session.target(
        "per_example",
        f"{last} temporaries <= {MICROBATCH_MAX_MEMORY_RATIO} x {first}'s",
        f"{ratio:.3f}",
        0 <= ratio <= MICROBATCH_MAX_MEMORY_RATIO,
    )
    print_table(
        f"per-example gradients + clip: batch {sizes.batch}, MLP {sizes.features}-{sizes.hidden}-"
        f"{sizes.hidden}-{sizes.classes} ({n_params} parameters; per-example gradients "
        f"{grads_bytes / 2**20:.3g} MiB)",
        ["implementation", "ms/step", "µs/example", "temp MiB", "temp KiB/example", "x optax"],
        rows,
    )
