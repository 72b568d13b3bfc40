"""Distributed clipping: one global decision across devices and processes, in one all-reduce.

On 8 simulated CPU devices (set in conftest.py): `pmap`, `shard_map` on a 2-D mesh and
`jit` with FSDP-like shardings all give the result of clipping the whole, unsharded gradient
on one device; every device takes the same decision, bit for bit, even when only one of them
sees a NaN; the compiled update holds exactly one all-reduce per transform; two local
processes (`jax.distributed`, gloo) agree with one; and the examples in
`examples/distributed` run and show what they claim.
"""

import collections
import functools
import importlib.util
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "distributed"
WORKER = Path(__file__).resolve().parent / "_multiprocess_worker.py"
N = 8
RTOL = 1e-6
ATOL = 1e-7


# ---------------------------------------------------------------------------------------------
# Helpers


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _np_norm(tree: dict[str, np.ndarray], ord: float) -> float:
    flat = np.concatenate([np.ravel(x).astype(np.float64) for x in tree.values()])
    return float(np.linalg.norm(flat, ord))


def _np_clip(tree: dict[str, np.ndarray], max_norm: float, ord: float) -> dict[str, np.ndarray]:
    scale = min(1.0, max_norm / _np_norm(tree, ord))
    return {k: x.astype(np.float64) * scale for k, x in tree.items()}


def _assert_same_everywhere(values: list[Any], what: str) -> None:
    """Every device's copy holds the same bits."""
    first = np.asarray(values[0])
    for d, v in enumerate(values[1:], start=1):
        v = np.asarray(v)
        assert v.dtype == first.dtype and v.shape == first.shape, what
        assert v.tobytes() == first.tobytes(), f"{what}: device {d} has {v}, device 0 has {first}"


def _per_device(x: jax.Array) -> list[np.ndarray]:
    """Each device's own buffer of an array (for a replicated output: each device's copy)."""
    shards = sorted(x.addressable_shards, key=lambda s: s.device.id)
    return [np.asarray(s.data) for s in shards]


def _close(got: Any, want: Any, what: str, rtol: float = RTOL) -> None:
    np.testing.assert_allclose(
        np.asarray(got, np.float64), np.asarray(want, np.float64), rtol, ATOL, True, what
    )


def _stack(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Splits each whole leaf into N per-device blocks of rows: pmap's input."""
    return {k: x.reshape(N, x.shape[0] // N, *x.shape[1:]) for k, x in tree.items()}


def _unstack(x: Any) -> np.ndarray:
    x = np.asarray(x)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _mesh_2d() -> jax.sharding.Mesh:
    return jax.make_mesh((2, 4), ("data", "model"))


def _place(tree: Any, mesh: jax.sharding.Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def _smap(f: Callable[..., Any], mesh: Any, in_specs: Any, out_specs: Any, **kw: Any) -> Any:
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw))


def _grads(seed: int, shapes: dict[str, tuple[int, ...]], scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------------
# 1. pmap: per-device shards clipped as the concatenated gradient on one device

PMAP_SHAPES = {"a": (40, 3), "b": (56,)}
ORDS = {"l2": 2.0, "l1": 1.0, "inf": math.inf}


def _single_device(txs: dict[str, Any], whole: Any) -> dict[str, Any]:
    """Each transform's (updates, state) for the whole tree on one device, in one compile."""
    return jax.jit(lambda t: {k: tx.update(t, tx.init(t)) for k, tx in txs.items()})(whole)


def test_pmap_equals_single_device_clip_of_concatenated_gradient() -> None:
    full = _grads(0, PMAP_SHAPES)
    # Counted 8 times it would change the l1 and l2 norms; it also holds the largest element.
    rep = np.array([4.0, -6.0, 5.0, 3.0], np.float32)
    whole = {**full, "rep": rep}
    replicated = {"a": False, "b": False, "rep": True}
    max_norms = {name: 0.5 * _np_norm(whole, ord) for name, ord in ORDS.items()}

    def step(g: Any) -> Any:
        out = {}
        for name, ord in ORDS.items():
            tx = optaxclip.clip_by_global_norm(
                max_norms[name], ord=ord, axis_name="i", replicated=replicated
            )
            norm = optaxclip.global_norm(g, ord=ord, axis_name="i", replicated=replicated)
            out[name] = (*tx.update(g, tx.init(g)), norm)
        return out

    shards = {**_stack(full), "rep": np.broadcast_to(rep, (N, *rep.shape))}
    got = jax.device_get(jax.pmap(step, axis_name="i")(shards))
    want = _single_device(
        {n: optaxclip.clip_by_global_norm(max_norms[n], ord=o) for n, o in ORDS.items()}, whole
    )

    for name, ord in ORDS.items():
        updates, state, norm = got[name]
        want_updates, want_state = want[name]
        expected = _np_clip(whole, max_norms[name], ord)
        for field in ("grad_norm", "clipped", "nonfinite"):
            _assert_same_everywhere(list(getattr(state, field)), f"{name}: {field}")
        _assert_same_everywhere(list(norm), f"{name}: global_norm")
        _assert_same_everywhere(list(updates["rep"]), f"{name}: updates['rep']")
        _close(state.grad_norm[0], want_state.grad_norm, f"{name}: grad_norm vs single device")
        _close(state.grad_norm[0], _np_norm(whole, ord), f"{name}: grad_norm vs numpy")
        _close(norm[0], _np_norm(whole, ord), f"{name}: global_norm vs numpy")
        assert bool(state.clipped[0]) and int(state.nonfinite[0]) == 0, name
        for k in whole:
            got_k = updates[k][0] if k == "rep" else _unstack(updates[k])
            _close(got_k, want_updates[k], f"{name}: updates[{k!r}] vs single device")
            _close(got_k, expected[k], f"{name}: updates[{k!r}] vs numpy")


def test_pmap_every_unmarked_leaf_counts_as_sharded() -> None:
    x = np.full((N, 2), 3.0, np.float32)
    rep = np.broadcast_to(np.array([4.0], np.float32), (N, 1))

    def norms(x: Any, rep: Any) -> Any:
        tree = {"x": x, "rep": rep}
        return (
            optaxclip.global_norm(tree, axis_name="i"),
            optaxclip.global_norm(tree, axis_name="i", replicated={"x": False, "rep": True}),
            optaxclip.global_norm(tree, axis_name="i", replicated=True),
        )

    unmarked, marked, all_replicated = jax.pmap(norms, axis_name="i")(x, rep)
    _close(unmarked, np.full(N, np.sqrt(N * 2 * 9 + N * 16)), "rep counted on every device")
    _close(marked, np.full(N, np.sqrt(N * 2 * 9 + 16)), "rep counted once")
    _close(all_replicated, np.full(N, np.sqrt(2 * 9 + 16)), "everything counted once")


# ---------------------------------------------------------------------------------------------
# 2. shard_map on a ("data", "model") = (2, 4) mesh

SMAP_SHAPES = {"w": (8, 8), "v": (8,), "b": (5,)}
SMAP_CASES = {
    # w and v vary over "model"; b is invariant (replicated) and counts once.
    "model": ("model", {"w": P(None, "model"), "v": P("model"), "b": P()}),
    # w varies over both axes, v over "data" only (so it counts once over "model").
    "data_model": (("data", "model"), {"w": P("data", "model"), "v": P("data"), "b": P()}),
}


@pytest.mark.parametrize("case", list(SMAP_CASES))
def test_shard_map_equals_unsharded(case: str) -> None:
    axis_name, specs = SMAP_CASES[case]
    mesh = _mesh_2d()
    whole = _grads(1, SMAP_SHAPES)
    whole["b"] *= 4.0
    max_norms = {name: 0.5 * _np_norm(whole, ord) for name, ord in ORDS.items()}

    def step(g: Any) -> Any:
        out = {}
        for name, ord in ORDS.items():
            tx = optaxclip.clip_by_global_norm(max_norms[name], ord=ord, axis_name=axis_name)
            updates, state = tx.update(g, tx.init(g))
            norm = optaxclip.global_norm(g, ord=ord, axis_name=axis_name)
            out[name] = (updates, state.grad_norm, state.clipped, norm)
        return out

    out_specs = {name: (specs, P(), P(), P()) for name in ORDS}
    got = _smap(step, mesh, (specs,), out_specs)(_place(whole, mesh, specs))
    want = _single_device(
        {n: optaxclip.clip_by_global_norm(max_norms[n], ord=o) for n, o in ORDS.items()}, whole
    )

    for name, ord in ORDS.items():
        updates, grad_norm, clipped, norm = got[name]
        want_updates, want_state = want[name]
        for field, value in (("grad_norm", grad_norm), ("clipped", clipped), ("norm", norm)):
            _assert_same_everywhere(_per_device(value), f"{name}: {field}")
        _close(grad_norm, want_state.grad_norm, f"{name}: grad_norm vs single device")
        _close(norm, _np_norm(whole, ord), f"{name}: global_norm vs numpy")
        assert bool(clipped), name
        expected = _np_clip(whole, max_norms[name], ord)
        for k, x in whole.items():
            _close(updates[k], want_updates[k], f"{name}: updates[{k!r}] vs single device")
            _close(updates[k], expected[k], f"{name}: updates[{k!r}] vs numpy")
            assert updates[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), x.ndim)


def test_shard_map_group_norm_equals_unsharded() -> None:
    axis_name, specs = SMAP_CASES["data_model"]
    mesh = _mesh_2d()
    whole = _grads(2, SMAP_SHAPES)
    labels = {"w": "matrix", "v": "vector", "b": "vector"}
    max_norm = {"matrix": 1.0, "vector": 0.5}
    tx = optaxclip.clip_by_group_norm(max_norm, labels, axis_name=axis_name)

    def step(g: Any) -> Any:
        updates, state = tx.update(g, tx.init(g))
        return updates, state.group_norm

    fn = _smap(step, mesh, (specs,), (specs, P()))
    updates, group_norm = fn(_place(whole, mesh, specs))
    single = optaxclip.clip_by_group_norm(max_norm, labels)
    want, want_state = jax.jit(single.update)(whole, single.init(whole))
    for label in ("matrix", "vector"):
        _assert_same_everywhere(_per_device(group_norm[label]), f"group_norm[{label!r}]")
        _close(group_norm[label], want_state.group_norm[label], f"group_norm[{label!r}]")
    _close(
        group_norm["vector"],
        np.hypot(_np_norm({"v": whole["v"]}, 2), _np_norm({"b": whole["b"]}, 2)),
        "vector group",
    )
    for k in whole:
        _close(updates[k], want[k], f"updates[{k!r}]")


def test_shard_map_without_vma_types_uses_replicated_like_pmap() -> None:
    """With `check_vma=False` types say nothing: leaves count as sharded unless marked."""
    _, specs = SMAP_CASES["model"]
    mesh = _mesh_2d()
    whole = _grads(3, SMAP_SHAPES)
    tx = optaxclip.clip_by_global_norm(
        1.0, axis_name="model", replicated={"w": False, "v": False, "b": True}
    )

    def step(g: Any) -> Any:
        updates, state = tx.update(g, tx.init(g))
        return updates, state.grad_norm

    fn = _smap(step, mesh, (specs,), (specs, P()), check_vma=False)
    updates, grad_norm = fn(_place(whole, mesh, specs))
    single = optaxclip.clip_by_global_norm(1.0)
    want, want_state = jax.jit(single.update)(whole, single.init(whole))
    _assert_same_everywhere(_per_device(grad_norm), "grad_norm")
    _close(grad_norm, want_state.grad_norm, "grad_norm")
    for k in whole:
        _close(updates[k], want[k], f"updates[{k!r}]")


UNNAMED_AXIS_POLICIES: dict[str, Callable[[], Any]] = {
    "global_norm": lambda: None,
    "clip_by_global_norm": lambda: optaxclip.clip_by_global_norm(1.0, axis_name="model"),
    "clip_by_group_norm": lambda: optaxclip.clip_by_group_norm(
        1.0, {"emb": "a", "b": "b"}, axis_name="model"
    ),
    "autoclip": lambda: optaxclip.autoclip(axis_name="model", history_size=4),
    "zclip": lambda: optaxclip.zclip(axis_name="model"),
    "quantile_clip": lambda: optaxclip.quantile_clip(axis_name="model"),
    "guard": lambda: optaxclip.guard(optax.sgd(0.1), axis_name="model"),
}


@pytest.mark.parametrize("policy", list(UNNAMED_AXIS_POLICIES))
def test_shard_map_leaf_varying_over_unnamed_axis_is_a_trace_time_error(policy: str) -> None:
    mesh = _mesh_2d()
    # Un-reduced per-"data"-shard gradients: "emb" varies over "data", which is not named.
    specs = {"emb": P("data", "model"), "b": P()}
    grads = _place({"emb": np.ones((4, 8), np.float32), "b": np.ones(3, np.float32)}, mesh, specs)

    tx = UNNAMED_AXIS_POLICIES[policy]()

    def step(g: Any) -> Any:
        if tx is None:
            return optaxclip.global_norm(g, axis_name="model")
        return tx.update(g, tx.init(g))[0]["b"]

    fn = _smap(step, mesh, (specs,), P())
    with pytest.raises(ValueError, match=r"\['emb'\].*'data'") as info:
        fn.trace(grads)  # tracing only: nothing is compiled or run
    message = str(info.value)
    # It says what to do: reduce over "data" first, or name it.
    assert "axis_name" in message and "model" in message, message
    assert "pmean" in message or "psum" in message, message


# ---------------------------------------------------------------------------------------------
# 3. One transform, one collective

HLO_COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|collective-broadcast)"
    r"(?:-start)?\("
)
STABLEHLO_COLLECTIVE = re.compile(
    r"stablehlo\.(all_reduce|all_gather|all_to_all|collective_permute|reduce_scatter|"
    r"collective_broadcast)\b"
)


def _count(pattern: re.Pattern[str], text: str) -> dict[str, int]:
    return dict(collections.Counter(m.group(1) for m in pattern.finditer(text)))


def _collectives(lowered: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Collective ops before XLA's passes (StableHLO) and after them (compiled HLO).

    Each op is counted once where it is written, inside a `lax.cond` branch or not; an async
    pair counts its `-start` only. Counting before the passes too means XLA's all-reduce
    combiner cannot hide a second collective the library asked for.
    """
    before = _count(STABLEHLO_COLLECTIVE, lowered.as_text())
    return before, _count(HLO_COLLECTIVE, lowered.compile().as_text())


def test_collective_counter_sees_every_collective_also_inside_cond() -> None:
    def two(x: Any) -> Any:
        return lax.psum(x, "i"), lax.pmax(2 * x, "i")

    def in_branch(x: Any) -> Any:
        return lax.cond(jnp.sum(x) > 0, lambda: lax.psum(x, "i"), lambda: x)

    x = np.ones((N, 3), np.float32)
    assert _collectives(jax.pmap(two, axis_name="i").lower(x)) == (
        {"all_reduce": 2},
        {"all-reduce": 2},
    )
    assert _collectives(jax.pmap(in_branch, axis_name="i").lower(x)) == (
        {"all_reduce": 1},
        {"all-reduce": 1},
    )


FIFTY = {f"layer{i:02d}": (3 + i % 5, 2 + i % 3) for i in range(50)}
FIFTY_LABELS = {k: ("attention", "mlp", "norm")[i % 3] for i, k in enumerate(FIFTY)}
ONE_COLLECTIVE = {
    "clip_by_global_norm_skip": lambda: optaxclip.clip_by_global_norm(
        1.0, axis_name="i", nonfinite="skip"
    ),
    "clip_by_group_norm_3_groups": lambda: optaxclip.clip_by_group_norm(
        1.0, FIFTY_LABELS, axis_name="i", nonfinite="zero"
    ),
    "clip_by_global_norm_inf": lambda: optaxclip.clip_by_global_norm(1.0, ord="inf", axis_name="i"),
}
# Statistics and counters travel in the same collective; checked before XLA's passes only,
# since compiling 50 leaves takes seconds.
ONE_COLLECTIVE_LOWERED = {
    "global_norm": lambda: None,
    "zclip": lambda: optaxclip.zclip(axis_name="i", nonfinite="skip"),
    "autoclip": lambda: optaxclip.autoclip(axis_name="i", history_size=8),
    "quantile_clip": lambda: optaxclip.quantile_clip(axis_name="i"),
    "guard": lambda: optaxclip.guard(optax.adam(0.1), axis_name="i", z_threshold=3.0),
}


def _lower_fifty(tx: Any) -> Any:
    grads = {k: jax.ShapeDtypeStruct((N, *s), jnp.float32) for k, s in FIFTY.items()}
    if tx is None:
        norm = lambda g: optaxclip.global_norm(g, axis_name="i")
        return jax.pmap(norm, axis_name="i").lower(grads)
    state = jax.eval_shape(jax.pmap(tx.init), grads)
    return jax.pmap(lambda g, s: tx.update(g, s, g), axis_name="i").lower(grads, state)


@pytest.mark.parametrize("policy", list(ONE_COLLECTIVE))
def test_one_all_reduce_for_fifty_leaves(policy: str) -> None:
    before, after = _collectives(_lower_fifty(ONE_COLLECTIVE[policy]()))
    assert before == {"all_reduce": 1}, before
    assert after == {"all-reduce": 1}, after


@pytest.mark.parametrize("policy", list(ONE_COLLECTIVE_LOWERED))
def test_one_all_reduce_for_fifty_leaves_with_statistics(policy: str) -> None:
    lowered = _lower_fifty(ONE_COLLECTIVE_LOWERED[policy]())
    before = _count(STABLEHLO_COLLECTIVE, lowered.as_text())
    assert before == {"all_reduce": 1}, before


# ---------------------------------------------------------------------------------------------
# 4. jit with FSDP-like shardings: nothing to add

FSDP_SHAPES = {"embed": (64, 16), "w1": (16, 32), "w2": (32, 8), "b1": (32,), "scale": ()}
FSDP_SPECS = {"embed": P("fsdp"), "w1": P("fsdp"), "w2": P("fsdp"), "b1": P(), "scale": P()}
FSDP_GROUPS = {k: "matrix" if len(s) == 2 else "vector" for k, s in FSDP_SHAPES.items()}
EXPLICIT, AUTO = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
# name: (transform, its max_norm and ord, whether it clips by group, the mesh's axis type)
JIT_POLICIES = {
    "clip_by_global_norm": (optaxclip.clip_by_global_norm(1.0), 1.0, 2, False, EXPLICIT),
    "clip_by_global_norm_auto_axes": (optaxclip.clip_by_global_norm(1.0), 1.0, 2, False, AUTO),
    "clip_by_global_norm_inf_skip": (
        optaxclip.clip_by_global_norm(0.5, ord="inf", nonfinite="skip"),
        0.5,
        math.inf,
        False,
        EXPLICIT,
    ),
    "clip_by_group_norm": (
        optaxclip.clip_by_group_norm(1.0, lambda t: {k: FSDP_GROUPS[k] for k in t}),
        1.0,
        2,
        True,
        EXPLICIT,
    ),
}


@pytest.mark.parametrize("policy", list(JIT_POLICIES))
def test_jit_with_fsdp_shardings_has_no_all_gather_and_keeps_shardings(policy: str) -> None:
    tx, max_norm, ord, grouped, axis_type = JIT_POLICIES[policy]
    mesh = jax.make_mesh((N,), ("fsdp",), axis_types=(axis_type,))
    whole = _grads(4, FSDP_SHAPES)
    grads = _place(whole, mesh, FSDP_SPECS)
    state = tx.init(grads)
    update = jax.jit(tx.update)
    compiled = update.lower(grads, state).compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert "all-reduce" in hlo  # the norm is reduced across the shards, not gathered

    updates, new_state = update(grads, state)
    out_shardings = compiled.output_shardings[0]
    for k, x in whole.items():
        want = NamedSharding(mesh, FSDP_SPECS[k])
        assert out_shardings[k].is_equivalent_to(want, x.ndim), (k, out_shardings[k])
        assert updates[k].sharding.is_equivalent_to(want, x.ndim), (k, updates[k].sharding)
        assert updates[k].dtype == x.dtype and updates[k].shape == x.shape

    # The unsharded result, in float64 NumPy.
    labels = sorted(set(FSDP_GROUPS.values()))
    groups = [{g} for g in labels] if grouped else [set(labels)]
    expected = {}
    for labels in groups:
        expected |= _np_clip(
            {k: whole[k] for k in whole if FSDP_GROUPS[k] in labels}, max_norm, ord
        )
    _close(new_state.grad_norm, _np_norm(whole, ord), "grad_norm")
    assert bool(new_state.clipped)
    for k in whole:
        _close(updates[k], expected[k], f"updates[{k!r}]")


# ---------------------------------------------------------------------------------------------
# 5. Consistency under faults: a NaN (or inf) on one device only

FAULT_SHAPES = {"a": (16, 6), "b": (8, 3)}
# Row 7 of "a" is in the 4th block of 2 rows: on one device only.
FAULT_AT = (7, 1)
FAULT_SPECS = {"a": P(("data", "model")), "b": P(("data", "model"))}
FAULT_AXES = ("data", "model")
MODES = ("propagate", "zero", "skip")
FIELDS = ("grad_norm", "clipped", "nonfinite")


def _faulty(seed: int, value: float) -> dict[str, np.ndarray]:
    grads = _grads(seed, FAULT_SHAPES)
    grads["a"][FAULT_AT] = value
    return grads


@functools.cache
def _static_fault_reference(value: float) -> dict[str, Any]:
    txs = {mode: optaxclip.clip_by_global_norm(1.0, nonfinite=mode) for mode in MODES}
    return _single_device(txs, _faulty(5, value))


def _check_static_faults(value: float, got: dict[str, tuple[Any, dict[str, list[Any]]]]) -> None:
    """`got`: per mode, the whole updates and each field's per-device values."""
    whole = _faulty(5, value)
    want = _static_fault_reference(value)
    for mode in MODES:
        updates, stats = got[mode]
        want_updates, want_state = want[mode]
        for field, values in stats.items():
            _assert_same_everywhere(values, f"{mode}: {field}")
        assert int(stats["nonfinite"][0]) == 1, mode
        assert bool(stats["clipped"][0]) == bool(want_state.clipped) == (mode != "propagate")
        _close(stats["grad_norm"][0], want_state.grad_norm, f"{mode}: grad_norm")
        for k in whole:
            _close(updates[k], want_updates[k], f"{mode}: updates[{k!r}]")
        if mode == "propagate":
            for k in whole:  # the norm is not finite: nothing is scaled, on any device
                np.testing.assert_array_equal(updates[k], whole[k])
        elif mode == "zero":
            finite = {k: np.where(np.isfinite(x), x, 0.0) for k, x in whole.items()}
            assert float(stats["grad_norm"][0]) == pytest.approx(_np_norm(finite, 2), rel=RTOL)
            for k, x in _np_clip(finite, 1.0, 2).items():
                _close(updates[k], x, f"zero: updates[{k!r}] vs numpy")
        else:
            for k in whole:
                assert not np.any(np.asarray(updates[k])), k


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_pmap_fault_on_one_device_same_decision_everywhere(value: float) -> None:
    whole = _faulty(5, value)

    def step(g: Any) -> Any:
        txs = {m: optaxclip.clip_by_global_norm(1.0, axis_name="i", nonfinite=m) for m in MODES}
        return {m: tx.update(g, tx.init(g)) for m, tx in txs.items()}

    out = jax.device_get(jax.pmap(step, axis_name="i")(_stack(whole)))
    got = {
        mode: (
            {k: _unstack(v) for k, v in updates.items()},
            {f: list(getattr(state, f)) for f in FIELDS},
        )
        for mode, (updates, state) in out.items()
    }
    _check_static_faults(value, got)


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_shard_map_fault_on_one_device_same_decision_everywhere(value: float) -> None:
    mesh = _mesh_2d()
    whole = _faulty(5, value)

    def step(g: Any) -> Any:
        out = {}
        for mode in MODES:
            tx = optaxclip.clip_by_global_norm(1.0, axis_name=FAULT_AXES, nonfinite=mode)
            updates, state = tx.update(g, tx.init(g))
            out[mode] = (updates, {f: getattr(state, f) for f in FIELDS})
        return out

    out_specs = {mode: (FAULT_SPECS, dict.fromkeys(FIELDS, P())) for mode in MODES}
    out = _smap(step, mesh, (FAULT_SPECS,), out_specs)(_place(whole, mesh, FAULT_SPECS))
    got = {
        mode: (
            {k: np.asarray(v) for k, v in updates.items()},
            {f: _per_device(v) for f, v in stats.items()},
        )
        for mode, (updates, stats) in out.items()
    }
    _check_static_faults(value, got)


ADAPTIVE = {
    "zclip": lambda axis: optaxclip.zclip(warmup_steps=2, axis_name=axis),
    "autoclip": lambda axis: optaxclip.autoclip(50.0, history_size=4, axis_name=axis),
    "quantile_clip": lambda axis: optaxclip.quantile_clip(initial_norm=5.0, axis_name=axis),
    "guard": lambda axis: optaxclip.guard(
        optax.sgd(0.1, momentum=0.9), z_threshold=3.0, warmup_steps=2, axis_name=axis
    ),
}
# Norms about 11, a NaN on one device at step 2, and a spike at step 4.
ADAPTIVE_SCALES = (1.0, 1.2, 1.0, 0.9, 20.0)
NAN_STEP = 2


def _adaptive_grads() -> list[dict[str, np.ndarray]]:
    steps = []
    for t, scale in enumerate(ADAPTIVE_SCALES):
        grads = _grads(10 + t, FAULT_SHAPES, scale)
        if t == NAN_STEP:
            grads["a"][FAULT_AT] = np.nan
        steps.append(grads)
    return steps


@functools.cache
def _adaptive_reference(policy: str) -> list[tuple[Any, Any]]:
    tx = ADAPTIVE[policy](None)
    update = jax.jit(tx.update)
    state = tx.init(_adaptive_grads()[0])
    out = []
    for grads in _adaptive_grads():
        updates, state = update(grads, state)
        out.append((updates, state))
    return out


def _stat_leaves(tx: Any, state: Any) -> tuple[list[Any], list[bool]]:
    """The state's leaves, and for each whether it is a statistic (not shaped like a param)."""
    kinds = optax.tree_map_params(tx, lambda _: False, state, transform_non_params=lambda _: True)
    return jax.tree.leaves(state), jax.tree.leaves(kinds)


def _check_adaptive_step(policy: str, t: int, want: Any, got: Any) -> None:
    """`got`: (whole updates, [(whole-or-per-device leaf, is_stat)]) for step t."""
    want_updates, want_state = want
    updates, leaves = got
    for k in want_updates:
        _close(updates[k], want_updates[k], f"step {t}: updates[{k!r}]")
    want_leaves, _ = _stat_leaves(ADAPTIVE[policy](None), want_state)
    assert len(leaves) == len(want_leaves)
    for i, ((value, is_stat), w) in enumerate(zip(leaves, want_leaves, strict=True)):
        if is_stat:
            _assert_same_everywhere(value, f"step {t}: state leaf {i}")
            value = value[0]
        _close(value, w, f"step {t}: state leaf {i}")


def _check_adaptive_outcome(policy: str, states: list[Any]) -> None:
    nan_state, last = states[NAN_STEP], states[-1]
    assert int(nan_state.nonfinite) == 1
    if policy == "guard":
        assert bool(nan_state.skipped) and int(last.skip_count) == 2  # the NaN and the spike
        # Fed by the good steps and, capped at the spike threshold, by the spike; not by the NaN.
        assert bool(last.skipped) and int(last.norm_steps) == 4
    else:
        assert int(nan_state.step_count) == NAN_STEP  # the NaN step left no trace
        assert int(last.step_count) == len(ADAPTIVE_SCALES) - 1
        assert bool(last.clipped)


@pytest.mark.parametrize("policy", list(ADAPTIVE))
def test_pmap_adaptive_statistics_identical_with_nan_on_one_device(policy: str) -> None:
    tx = ADAPTIVE[policy]("i")
    reference = _adaptive_reference(policy)
    steps = [_stack(g) for g in _adaptive_grads()]
    state = jax.pmap(tx.init, axis_name="i")(steps[0])
    update = jax.pmap(lambda g, s: tx.update(g, s), axis_name="i")
    states = []
    for t, grads in enumerate(steps):
        updates, state = update(grads, state)
        leaves, is_stat = _stat_leaves(tx, jax.device_get(state))
        got_leaves = [
            (list(x) if stat else _unstack(x), stat)
            for x, stat in zip(leaves, is_stat, strict=True)
        ]
        whole = {k: _unstack(v) for k, v in updates.items()}
        _check_adaptive_step(policy, t, reference[t], (whole, got_leaves))
        states.append(jax.tree.map(lambda x: np.asarray(x)[0], state))
    _check_adaptive_outcome(policy, states)


@pytest.mark.parametrize("policy", list(ADAPTIVE))
def test_shard_map_adaptive_statistics_identical_with_nan_on_one_device(policy: str) -> None:
    mesh = _mesh_2d()
    tx = ADAPTIVE[policy](FAULT_AXES)
    reference = _adaptive_reference(policy)
    steps = _adaptive_grads()
    shapes = jax.eval_shape(tx.init, steps[0])
    state_specs = optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        shapes,
        FAULT_SPECS,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
    init = _smap(tx.init, mesh, (FAULT_SPECS,), state_specs)
    update = _smap(tx.update, mesh, (FAULT_SPECS, state_specs), (FAULT_SPECS, state_specs))
    state = init(_place(steps[0], mesh, FAULT_SPECS))
    states = []
    for t, grads in enumerate(steps):
        updates, state = update(_place(grads, mesh, FAULT_SPECS), state)
        leaves, is_stat = _stat_leaves(tx, state)
        got_leaves = [
            (_per_device(x) if stat else np.asarray(x), stat)
            for x, stat in zip(leaves, is_stat, strict=True)
        ]
        whole = {k: np.asarray(v) for k, v in updates.items()}
        _check_adaptive_step(policy, t, reference[t], (whole, got_leaves))
        states.append(state)
    _check_adaptive_outcome(policy, states)


# ---------------------------------------------------------------------------------------------
# 6. Two processes x two CPU devices, as one process

MULTIPROCESS_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_with_devices(count: int) -> dict[str, str]:
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    flags = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def multiprocess(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("multiprocess")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), "2", str(i), str(out / f"{i}.pkl")],
            env=_env_with_devices(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + MULTIPROCESS_TIMEOUT_S
    logs, timed_out = [], False
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            timed_out = True
            for p in procs:
                p.kill()
            logs.append(proc.communicate())
    for proc in procs[len(logs) :]:
        logs.append(proc.communicate())
    report = "\n".join(
        f"--- process {i} (exit {p.returncode}) stderr:\n{err[-4000:]}\nstdout:\n{o[-2000:]}"
        for i, (p, (o, err)) in enumerate(zip(procs, logs, strict=True))
    )
    if timed_out or any(p.returncode != 0 for p in procs):
        pytest.fail(f"multi-process workers failed (timed out: {timed_out}):\n{report}")
    results = []
    for i in range(2):
        with open(out / f"{i}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _assemble(per_process: list[list[tuple[Any, np.ndarray, int]]], like: np.ndarray) -> Any:
    """The whole array from every device's shard; replicas must agree bit for bit."""
    whole = np.zeros(like.shape, like.dtype)
    seen = np.zeros(like.shape, bool)
    for p, shards in enumerate(per_process):
        for index, data, device in shards:
            if seen[index].any():
                assert seen[index].all()
                assert whole[index].tobytes() == data.tobytes(), (
                    f"process {p}, device {device}: {data} differs from {whole[index]}"
                )
            whole[index] = data
            seen[index] = True
    assert seen.all()
    return whole


MULTIPROCESS_CASES = ["jit", "jit_nan_skip", "shard_map", "shard_map_nan_zero"]


@pytest.mark.parametrize("case", MULTIPROCESS_CASES)
def test_two_processes_equal_one(multiprocess: list[dict[str, Any]], case: str) -> None:
    worker = _load(WORKER, "_multiprocess_worker_in_test")
    assert list(worker.CASES) == MULTIPROCESS_CASES
    assert [r["process_index"] for r in multiprocess] == [0, 1]
    assert all(r["local_devices"] == 2 and r["devices"] == 4 for r in multiprocess)
    errors = [r[case]["error"] for r in multiprocess if r[case]["error"]]
    assert not errors, "\n".join(errors)

    _, nan, _ = worker.CASES[case]
    grads = worker.gradients(nan=nan)
    tx = worker.transform(case, distributed=False)
    want_updates, want_state = jax.jit(tx.update)(grads, tx.init(grads))
    want = {f"updates/{k}": np.asarray(v) for k, v in want_updates.items()}
    want["grad_norm"] = np.asarray(want_state.grad_norm)
    want["nonfinite"] = np.asarray(want_state.nonfinite)
    assert int(want["nonfinite"]) == int(nan)
    for name, w in want.items():
        got = _assemble([r[case]["arrays"][name] for r in multiprocess], w)
        _close(got, w, f"{case}: {name}")


# ---------------------------------------------------------------------------------------------
# 7. The examples run, and show what they claim


def test_example_data_parallel_pmap() -> None:
    example = _load(EXAMPLES / "data_parallel_pmap.py", "example_data_parallel_pmap")
    result = example.main(["--steps", "6"])
    params = result["params"]
    for k, leaf in params.items():
        _assert_same_everywhere(list(np.asarray(leaf)), f"params[{k!r}]")
    assert result["identical"] is True
    # At the spike (one device's batch blown up) the averaged gradient is clipped, while the
    # devices' own norms disagree: a per-device clip would scale each replica differently.
    spike = result["log"][result["spike_step"]]
    assert spike["clipped"] and spike["grad_norm"] > 10
    assert max(spike["local_norms"]) > 10 * min(spike["local_norms"])
    assert not all(row["clipped"] for row in result["log"])


def test_example_shard_map_model_parallel() -> None:
    example = _load(EXAMPLES / "shard_map_model_parallel.py", "example_shard_map_model_parallel")
    result = example.main(["--steps", "4"])
    for row in result["log"]:
        _close(row["grad_norm"], row["unsharded_grad_norm"], "grad_norm", rtol=1e-5)
    assert any(row["clipped"] for row in result["log"])
    assert result["max_param_diff"] < 1e-5
    assert result["stats_identical"] is True


def test_example_fsdp_jit() -> None:
    example = _load(EXAMPLES / "fsdp_jit.py", "example_fsdp_jit")
    result = example.main(["--steps", "4"])
    assert result["collectives"].get("all-gather", 0) == 0
    assert result["collectives"].get("all-to-all", 0) == 0
    assert result["collectives"]["all-reduce"] >= 1
    assert result["shardings_kept"] is True
    assert result["max_param_diff"] < 1e-5
    assert any(row["clipped"] for row in result["log"])


def test_example_multi_process() -> None:
    example = _load(EXAMPLES / "multi_process.py", "example_multi_process")
    result = example.main(["--num-processes", "2", "--devices-per-process", "2"])
    assert result["num_processes"] == 2
    assert result["identical_across_processes"] is True
    assert result["max_diff_vs_single_process"] < 1e-6
