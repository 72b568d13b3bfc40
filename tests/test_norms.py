"""The norms section of the contract, edge case by edge case, against a float64 NumPy reference.

Every expected value here comes from `reference_norm` / `reference_unitwise`, written in plain
NumPy in float64 (scaled by the largest magnitude, so it neither overflows nor underflows),
never from the library itself.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip

# 2 and the other spellings of inf are checked against these in their own tests.
ORDS = [None, 1, 3, 1.5, "inf"]
ORD_IDS = ["None", "1", "3", "1.5", "inf"]

RTOL = 1e-5


# --- the reference -------------------------------------------------------------------------------


def _p(ord):
    if ord is None:
        return 2.0
    if isinstance(ord, str):
        return math.inf
    return float(ord)


def _magnitudes(arrays):
    """|x| of every element of every array, in float64 (the modulus for complex)."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        wide = a.astype(np.complex128) if np.iscomplexobj(a) else a.astype(np.float64)
        out.append(np.abs(wide).ravel())
    return np.concatenate(out) if out else np.zeros([0])


def reference_norm(arrays, ord=None):
    """The ord-norm of all elements together, in float64, NaN first, then inf."""
    mags = _magnitudes(arrays)
    if np.isnan(mags).any():
        return math.nan
    if np.isinf(mags).any():
        return math.inf
    if mags.size == 0 or mags.max() == 0:
        return 0.0
    p = _p(ord)
    top = mags.max()
    if math.isinf(p):
        return float(top)
    return float(top * np.sum((mags / top) ** p) ** (1.0 / p))


def reference_unitwise(x, axes):
    """The L2 norm over `axes`, broadcast to the shape of `x`, in float64."""
    x = np.asarray(x)
    mags = np.abs(x.astype(np.complex128) if np.iscomplexobj(x) else x.astype(np.float64))
    top = np.max(mags, axis=axes, keepdims=True, initial=0.0)
    safe = np.where(top > 0, top, 1.0)
    norm = top * np.sqrt(np.sum((mags / safe) ** 2, axis=axes, keepdims=True))
    return np.broadcast_to(norm, x.shape)


def default_unit_axes(shape):
    """The unit axes of `optax.transforms.unitwise_norm`, by rank."""
    if sum(1 for d in shape if d != 1) <= 1:
        return tuple(range(len(shape)))
    return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[len(shape)]


def assert_norm(actual, expected, rtol=RTOL):
    actual = np.asarray(actual)
    assert actual.shape == ()
    if math.isnan(expected):
        assert np.isnan(actual), f"expected NaN, got {actual}"
    elif math.isinf(expected):
        assert np.isposinf(actual), f"expected inf, got {actual}"
    else:
        assert np.isfinite(actual), f"expected {expected}, got {actual}"
        np.testing.assert_allclose(np.float64(actual), expected, rtol=rtol, atol=0)


RNG = np.random.default_rng(0)


def _tree_mixed():
    return {
        "w": RNG.standard_normal((3, 4)).astype(np.float32),
        "b": RNG.standard_normal((4,)).astype(np.float32),
        "s": np.float32(-2.5),
        "nested": [RNG.standard_normal((2, 2, 3)).astype(np.float32)],
    }


def _pair(a, b):
    """Most float32 cases share one layout, so that they share compilations."""
    return {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}


# Trees whose norm every function must get right: (id, tree).
TREES = [
    ("moderate", _pair([3.0, -4.0, 0.0], [1.5, 2.0])),
    ("f32-1e30", _pair([1e30, 1e30, 1e30], [-2e30, 5e29])),
    ("f32-1e38", _pair([1e38, 1e38, -1e38], [0.0, 0.0])),
    ("f32-1e38-mixed", _pair([1e38, 0.0, 0.0], [5e37, -5e37])),
    ("f32-1e-25", _pair([1e-25, 1e-25, 1e-25], [-3e-25, 0.0])),
    ("f32-1e-30", _pair([1e-30, 2e-30, -3e-30], [0.0, 0.0])),
    ("huge-and-tiny", _pair([1e30, -2e30, 1e10], [1e-30, 1e-30])),
    ("moderate-and-tiny", _pair([3.0, 4.0, 0.0], [1e-25, -1e-25])),
    ("with-zeros", _pair([0.0, 0.0, 0.0], [0.0, 2.0])),
    ("mixed-layout", jax.tree_util.tree_map(jnp.asarray, _tree_mixed())),
    ("tiny-underflowing", {"a": jnp.full(100, 1e-20), "b": jnp.array([1e-19])}),
    ("fp16-300", {"a": jnp.full(4, 300.0, jnp.float16)}),
    ("fp16-split", [jnp.full(2, 300.0, jnp.float16), jnp.full(2, -300.0, jnp.float16)]),
    ("bf16", {"a": jnp.full((3, 5), 1000.0, jnp.bfloat16), "b": jnp.ones(7, jnp.bfloat16)}),
    ("scalar-leaf", jnp.asarray(7.0, jnp.float32)),
]
TREE_IDS = [name for name, _ in TREES]

# Module-level, so that a compiled version is reused for every tree of the same layout.
JIT = {
    fn: jax.jit(fn, static_argnames="ord") for fn in (optaxclip.global_norm, optaxclip.leaf_norms)
}
JIT[optaxclip.unitwise_norm] = jax.jit(optaxclip.unitwise_norm)


def _call(fn, mode, tree, ord=None):
    if fn is optaxclip.unitwise_norm:
        return JIT[fn](tree) if mode == "jit" else fn(tree)
    return JIT[fn](tree, ord=ord) if mode == "jit" else fn(tree, ord=ord)


# --- global_norm and leaf_norms against the reference --------------------------------------------


# Every order eagerly; under jit a few (the code is the same, inlined in the caller's jit).
ORD_MODES = [(o, "eager") for o in ORDS] + [(o, "jit") for o in (None, 1.5, "inf")]
ORD_MODE_IDS = [f"{o}-{m}" for o, m in ORD_MODES]


@pytest.mark.parametrize(("ord", "mode"), ORD_MODES, ids=ORD_MODE_IDS)
@pytest.mark.parametrize(("name", "tree"), TREES, ids=TREE_IDS)
def test_global_norm_matches_reference(name, tree, ord, mode):
    del name
    got = _call(optaxclip.global_norm, mode, tree, ord)
    assert got.dtype == jnp.float32
    assert_norm(got, reference_norm(jax.tree_util.tree_leaves(tree), ord))


@pytest.mark.parametrize(("ord", "mode"), ORD_MODES, ids=ORD_MODE_IDS)
@pytest.mark.parametrize(("name", "tree"), TREES, ids=TREE_IDS)
def test_leaf_norms_match_reference(name, tree, ord, mode):
    del name
    got = _call(optaxclip.leaf_norms, mode, tree, ord)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(tree)
    for leaf, norm in zip(
        jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(got), strict=True
    ):
        assert norm.dtype == jnp.float32
        assert_norm(norm, reference_norm([leaf], ord))


@pytest.mark.parametrize("ord", [2, 2.0, np.float32(2), np.int64(2), jnp.asarray(2.0)])
def test_ord_two_spellings_equal_default(ord):
    tree = _tree_mixed()
    expected = optaxclip.global_norm(tree)
    assert float(optaxclip.global_norm(tree, ord=ord)) == float(expected)
    assert_norm(expected, reference_norm(jax.tree_util.tree_leaves(tree), None))


@pytest.mark.parametrize("ord", [math.inf, "inf", "INF", jnp.inf, np.inf, float("inf")])
def test_inf_spellings_give_the_max_norm(ord):
    tree = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([[0.5, -7.25], [1.0, 2.0]])}
    assert float(optaxclip.global_norm(tree, ord=ord)) == 7.25
    assert [float(n) for n in jax.tree_util.tree_leaves(optaxclip.leaf_norms(tree, ord=ord))] == [
        4.0,
        7.25,
    ]


@pytest.mark.parametrize("ord", [7, 100.0, 1.0001])
def test_large_and_near_one_orders(ord):
    tree = _tree_mixed()
    assert_norm(
        optaxclip.global_norm(tree, ord=ord), reference_norm(jax.tree_util.tree_leaves(tree), ord)
    )


# --- float32 accumulation for half-precision trees -----------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_four_half_values_of_300_have_norm_600(dtype):
    x = jnp.full(4, 300.0, dtype)
    assert float(optaxclip.global_norm({"a": x})) == 600.0
    assert float(optaxclip.global_norm([x[:1], x[1:2], x[2:3], x[3:]])) == 600.0
    assert float(optaxclip.leaf_norms({"a": x})["a"]) == 600.0
    np.testing.assert_array_equal(optaxclip.unitwise_norm(x), np.full(4, 600.0, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_norms_are_float32(dtype):
    x = jnp.ones(3, dtype)
    assert optaxclip.global_norm([x]).dtype == jnp.float32
    assert optaxclip.leaf_norms([x])[0].dtype == jnp.float32
    assert optaxclip.unitwise_norm(x).dtype == jnp.float32


def test_fp16_norm_above_fp16_max_is_finite():
    # 4 * 60000^2 overflows float16 (max 65504) many times over; the norm itself does too.
    x = jnp.full(4, 60000.0, jnp.float16)
    assert float(optaxclip.global_norm([x])) == 120000.0
    assert float(optaxclip.global_norm([x], ord=1)) == 240000.0


def test_many_bf16_leaves_do_not_stall():
    # A bf16 running sum has 8 significant bits: 256 + 1 rounds back to 256. Summed across
    # leaves in bf16, every leaf after the first would be lost.
    leaves = [jnp.array([256.0], jnp.bfloat16)] + [jnp.ones([1], jnp.bfloat16)] * 20
    assert float(optaxclip.global_norm(leaves, ord=1)) == 276.0
    squares = [jnp.array([16.0], jnp.bfloat16)] + [jnp.ones([1], jnp.bfloat16)] * 20
    assert_norm(optaxclip.global_norm(squares), math.sqrt(276.0))
    assert_norm(optaxclip.global_norm(squares, ord=3), (4096.0 + 20.0) ** (1 / 3))


def test_many_bf16_leaves_in_one_leaf_do_not_stall():
    # The same within a leaf: 2000 ones.
    x = jnp.ones([2000], jnp.bfloat16)
    assert float(optaxclip.global_norm([x], ord=1)) == 2000.0
    assert_norm(optaxclip.global_norm([x]), math.sqrt(2000.0))
    assert_norm(optaxclip.leaf_norms([x])[0], math.sqrt(2000.0))


def test_many_bf16_leaves_of_mixed_size():
    leaves = [jnp.full([k % 7 + 1], 0.125 * (k % 5 + 1), jnp.bfloat16) for k in range(20)]
    for ord in [None, 1, 3]:
        assert_norm(optaxclip.global_norm(leaves, ord=ord), reference_norm(leaves, ord))


# --- extremes: huge, tiny, subnormal -------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e30, 1e37, 1e38])
@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_huge_float32_values_give_finite_correct_norms(scale, ord):
    # The norm itself (at most ~2.1e38 here) fits in float32, so it must come out finite.
    x = jnp.asarray(np.array([1.0, -1.0, 1.0]) * scale, jnp.float32)
    expected = reference_norm([x], ord)
    assert_norm(optaxclip.global_norm({"x": x}, ord=ord), expected)
    assert_norm(optaxclip.leaf_norms({"x": x}, ord=ord)["x"], expected)


@pytest.mark.parametrize("scale", [1e30, 1e37, 1e38])
def test_huge_values_unitwise(scale):
    x = jnp.asarray(np.array([[1.0, 2.0], [-1.0, 0.5], [1.0, 0.0]]) * scale, jnp.float32)
    got = optaxclip.unitwise_norm(x)
    assert np.isfinite(np.asarray(got)).all(), got
    np.testing.assert_allclose(np.asarray(got), reference_unitwise(x, (0,)), rtol=RTOL)


@pytest.mark.parametrize("scale", [1e-19, 1e-25, 1e-30, 1e-37])
@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_tiny_float32_values_give_correct_norms(scale, ord):
    # Squares (and cubes) of these underflow in float32; the norm itself is a normal float32.
    x = jnp.asarray(np.array([1.0, -2.0, 3.0, 0.0]) * scale, jnp.float32)
    expected = reference_norm([x], ord)
    assert expected > 0
    assert_norm(optaxclip.global_norm([x], ord=ord), expected)
    assert_norm(optaxclip.leaf_norms([x], ord=ord)[0], expected)


@pytest.mark.parametrize("scale", [1e-19, 1e-25, 1e-30])
def test_tiny_values_unitwise(scale):
    x = jnp.asarray(np.array([[3.0, 1.0], [4.0, 0.0]]) * scale, jnp.float32)
    np.testing.assert_allclose(
        np.asarray(optaxclip.unitwise_norm(x)), reference_unitwise(x, (0,)), rtol=RTOL
    )


@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_subnormals_next_to_normal_values_do_not_disturb(ord):
    tree = {"a": jnp.array([1e-40, -1e-41], jnp.float32), "b": jnp.array([3e-20, 4e-20])}
    assert_norm(optaxclip.global_norm(tree, ord=ord), reference_norm([tree["b"]], ord))
    assert_norm(optaxclip.global_norm([jnp.array([1e-40, 2.0, 1e-39])], ord=ord), 2.0)


@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_all_subnormal_input_never_gives_nan_inf_or_too_much(ord):
    # XLA on CPU treats subnormal inputs as zero, so 0 is acceptable; NaN, inf or more is not.
    x = jnp.array([1e-40, -2e-40, 5e-41], jnp.float32)
    got = float(optaxclip.global_norm([x], ord=ord))
    assert math.isfinite(got)
    assert 0.0 <= got <= reference_norm([x], ord) * (1 + RTOL)


@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_huge_and_tiny_leaves_together(ord):
    tree = {
        "huge": jnp.array([1e30, -3e29], jnp.float32),
        "tiny": jnp.full([8], 1e-30, jnp.float32),
        "mid": jnp.array([1e10], jnp.float32),
    }
    expected = reference_norm(jax.tree_util.tree_leaves(tree), ord)
    assert_norm(optaxclip.global_norm(tree, ord=ord), expected)
    leaves = optaxclip.leaf_norms(tree, ord=ord)
    for key in tree:
        assert_norm(leaves[key], reference_norm([tree[key]], ord))


def test_tiny_values_whose_squares_underflow_still_count():
    # 1e-20 squared is below the smallest float32 subnormal: 100 of them add up to 1e-19 squared.
    tree = {"a": jnp.full([100], 1e-20, jnp.float32), "b": jnp.array([1e-19], jnp.float32)}
    assert_norm(optaxclip.global_norm(tree), math.sqrt(2.0) * 1e-19)


# --- NaN, inf, empty -----------------------------------------------------------------------------


NAN, INF = math.nan, math.inf
NONFINITE_CASES = [
    ("nan", _pair([1.0, NAN, 0.0], [0.0, 2.0]), NAN),
    ("inf", _pair([1.0, INF, 0.0], [0.0, 2.0]), INF),
    ("-inf", _pair([1.0, 0.0, 0.0], [-INF, 2.0]), INF),
    ("nan-and-inf", _pair([INF, NAN, 0.0], [0.0, 2.0]), NAN),
    ("inf-leaf-nan-leaf", _pair([INF, 0.0, 0.0], [0.0, NAN]), NAN),
    ("nan-leaf-inf-leaf", _pair([NAN, 0.0, 0.0], [-INF, 1.0]), NAN),
    ("inf-and-huge", _pair([INF, 0.0, 0.0], [1e30, 1e30]), INF),
    ("nan-and-tiny", _pair([NAN, 0.0, 0.0], [1e-30, 1e-30]), NAN),
    ("inf-fp16", [jnp.array([INF, 1.0], jnp.float16)], INF),
    ("nan-bf16", [jnp.array([NAN, 1.0], jnp.bfloat16)], NAN),
    ("inf-complex", [jnp.array([complex(INF, 0.0), 1j], jnp.complex64)], INF),
]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
@pytest.mark.parametrize(
    ("name", "tree", "expected"), NONFINITE_CASES, ids=[c[0] for c in NONFINITE_CASES]
)
def test_nonfinite_global_norm(name, tree, expected, ord, mode):
    del name
    assert_norm(_call(optaxclip.global_norm, mode, tree, ord), expected)


@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_nonfinite_leaf_norms_stay_per_leaf(ord):
    tree = [
        jnp.array([jnp.nan, 1.0]),
        jnp.array([3.0, -4.0]),
        jnp.array([jnp.inf, jnp.nan]),
        jnp.array([-jnp.inf, 1e30]),
        jnp.array([1e-30, 2e-30]),
    ]
    got = optaxclip.leaf_norms(tree, ord=ord)
    for leaf, norm in zip(tree, got, strict=True):
        assert_norm(norm, reference_norm([leaf], ord))


# XLA:CPU reduces a large max with an instruction that drops NaN; small arrays do not show it.
LARGE = 1 << 20


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("position", [0, 5, LARGE // 2, LARGE - 17, LARGE - 1])
def test_nan_in_a_large_leaf_is_never_lost_by_the_max_norm(position, mode):
    x = jnp.arange(LARGE, dtype=jnp.float32).at[position].set(jnp.nan)
    tree = {"a": x, "b": jnp.ones([3])}
    assert_norm(_call(optaxclip.global_norm, mode, tree, "inf"), NAN)
    norms = optaxclip.leaf_norms(tree, ord="inf")
    assert_norm(norms["a"], NAN)
    assert_norm(norms["b"], 1.0)
    both = x.at[position ^ 1].set(-jnp.inf)
    assert_norm(_call(optaxclip.global_norm, mode, [both], "inf"), NAN)
    only_inf = jnp.arange(LARGE, dtype=jnp.float32).at[position].set(-jnp.inf)
    assert_norm(_call(optaxclip.global_norm, mode, [only_inf], "inf"), INF)


def test_nan_in_a_large_leaf_reaches_the_max_norm_clip():
    x = jnp.arange(LARGE, dtype=jnp.float32).at[LARGE - 1].set(jnp.nan)
    tx = optaxclip.clip_by_global_norm(1.0, ord="inf", nonfinite="skip")
    updates, state = jax.jit(tx.update)({"a": x}, tx.init({"a": x}))
    assert np.isnan(state.grad_norm)
    assert int(state.nonfinite) == 1
    assert not np.asarray(updates["a"]).any()
    group = optaxclip.clip_by_group_norm(1.0, {"a": "x", "b": "y"}, ord="inf")
    tree = {"a": x, "b": jnp.full([4], 2.0)}
    _, state = jax.jit(group.update)(tree, group.init(tree))
    assert np.isnan(state.grad_norm)
    assert np.isnan(state.group_norm["x"])
    assert float(state.group_norm["y"]) == 2.0


def test_nonfinite_unitwise_norm_stays_per_unit():
    x = jnp.array([[jnp.nan, 3.0, jnp.inf, 1e30], [1.0, 4.0, 1.0, 1e30]])
    got = np.asarray(optaxclip.unitwise_norm(x))
    assert np.isnan(got[:, 0]).all()
    np.testing.assert_allclose(got[:, 1], 5.0, rtol=RTOL)
    assert np.isposinf(got[:, 2]).all()
    np.testing.assert_allclose(got[:, 3], math.sqrt(2.0) * 1e30, rtol=RTOL)


EMPTY_TREES = [
    ("dict", {}),
    ("list", []),
    ("none", None),
    ("none-leaf", {"a": None}),
    ("masked", {"a": optax.MaskedNode(), "b": [None, optax.MaskedNode()]}),
]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
@pytest.mark.parametrize(("name", "tree"), EMPTY_TREES, ids=[n for n, _ in EMPTY_TREES])
def test_empty_tree_has_norm_zero(name, tree, ord, mode):
    del name
    got = _call(optaxclip.global_norm, mode, tree, ord)
    assert got.dtype == jnp.float32
    assert got.shape == ()
    assert float(got) == 0.0
    leaves = optaxclip.leaf_norms(tree, ord=ord)
    assert jax.tree_util.tree_structure(leaves) == jax.tree_util.tree_structure(tree)


def test_zero_tree_has_norm_zero():
    tree = {"a": jnp.zeros([3, 2]), "b": jnp.zeros([], jnp.bfloat16)}
    for ord in ORDS:
        assert float(optaxclip.global_norm(tree, ord=ord)) == 0.0
    np.testing.assert_array_equal(optaxclip.unitwise_norm(jnp.zeros([3, 2])), np.zeros([3, 2]))


# --- skipped and refused leaves ------------------------------------------------------------------


def _float0_tree():
    """A gradient tree with a float0 leaf, as `jax.grad(allow_int=True)` makes it."""

    def loss(params):
        return jnp.sum(params["w"] ** 2) * params["step"].astype(jnp.float32)

    params = {"w": jnp.array([1.5, -2.0]), "step": jnp.array(2, jnp.int32)}
    grads = jax.grad(loss, allow_int=True)(params)
    assert grads["step"].dtype == jax.dtypes.float0
    return grads


@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_none_masked_and_float0_leaves_are_skipped(ord):
    grads = _float0_tree()
    tree = {
        "g": grads,
        "none": None,
        "masked": optax.MaskedNode(),
        "f0": np.zeros([3], jax.dtypes.float0),
        "x": jnp.array([1.0, -0.5], jnp.bfloat16),
    }
    expected = reference_norm([grads["w"], tree["x"]], ord)
    assert_norm(optaxclip.global_norm(tree, ord=ord), expected)
    assert_norm(jax.jit(lambda t: optaxclip.global_norm(t, ord=ord))(tree), expected)
    leaves = optaxclip.leaf_norms(tree, ord=ord)
    assert jax.tree_util.tree_structure(leaves) == jax.tree_util.tree_structure(tree)
    assert leaves["none"] is None
    assert isinstance(leaves["masked"], optax.MaskedNode)
    assert_norm(leaves["g"]["w"], reference_norm([grads["w"]], ord))
    assert_norm(leaves["x"], reference_norm([tree["x"]], ord))


INT_LEAVES = [
    ("int32", jnp.array([1, 2], jnp.int32), "int32"),
    ("uint8", jnp.array([1], jnp.uint8), "uint8"),
    ("int8-scalar", jnp.array(3, jnp.int8), "int8"),
    ("bool", jnp.array([True, False]), "bool"),
    ("numpy-int", np.array([1, 2], np.int16), "int16"),
]


@pytest.mark.parametrize(
    "fn", [optaxclip.global_norm, optaxclip.leaf_norms], ids=lambda f: f.__name__
)
@pytest.mark.parametrize(("name", "leaf", "dtype"), INT_LEAVES, ids=[c[0] for c in INT_LEAVES])
def test_integer_and_bool_leaves_raise_naming_the_path(fn, name, leaf, dtype):
    del name
    tree = {"ok": jnp.ones(2), "layer": {"kernel": [jnp.ones(3), leaf]}}
    path = re.escape("['layer']['kernel'][1]")
    pattern = rf"{fn.__name__}: leaf {path} has dtype {dtype}\b"
    with pytest.raises(TypeError, match=pattern):
        fn(tree)
    with pytest.raises(TypeError, match=pattern):
        jax.jit(fn)(tree)


def test_integer_root_leaf_raises_naming_the_root():
    with pytest.raises(TypeError, match=r"global_norm: leaf <root> has dtype int32"):
        optaxclip.global_norm(jnp.arange(3, dtype=jnp.int32))


@pytest.mark.parametrize("leaf", [jnp.arange(3, dtype=jnp.int32), jnp.array([True])])
def test_unitwise_norm_refuses_integers(leaf):
    with pytest.raises(
        TypeError, match=rf"unitwise_norm: expected a float or complex array, got {leaf.dtype}"
    ):
        optaxclip.unitwise_norm(leaf)


# --- complex leaves ------------------------------------------------------------------------------


@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_complex_leaves_by_modulus(ord):
    z = jnp.array([3 + 4j, -1j, 0.5 - 0.5j, 0], jnp.complex64)
    tree = {"z": z, "r": jnp.array([-2.0, 1.0])}
    assert_norm(optaxclip.global_norm(tree, ord=ord), reference_norm([z, tree["r"]], ord))
    got = optaxclip.leaf_norms(tree, ord=ord)
    assert got["z"].dtype == jnp.float32
    assert_norm(got["z"], reference_norm([z], ord))


def test_complex_modulus_is_not_real_part():
    # |3+4j| = 5; the real part alone would give 3, real and imaginary as two elements 7 for ord=1.
    z = jnp.array([3 + 4j], jnp.complex64)
    assert float(optaxclip.global_norm([z], ord=1)) == 5.0
    assert float(optaxclip.global_norm([z])) == 5.0


@pytest.mark.parametrize("scale", [1e30, 1e-25])
def test_complex_extremes(scale):
    z = jnp.asarray(np.array([3 + 4j, 1j]) * scale, jnp.complex64)
    assert_norm(optaxclip.global_norm([z]), reference_norm([z]))
    np.testing.assert_allclose(
        np.asarray(optaxclip.unitwise_norm(z)), reference_unitwise(z, (0,)), rtol=RTOL
    )


def test_complex_unitwise_norm():
    z = jnp.array([[3 + 4j, 1.0], [0.0, 1j]], jnp.complex64)
    got = optaxclip.unitwise_norm(z)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), reference_unitwise(z, (0,)), rtol=RTOL)


# --- float64 under x64 ---------------------------------------------------------------------------


@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_float64_under_x64(ord):
    with jax.enable_x64(True):
        x = jnp.array([1.0 + 1e-12, -2.0, 1e-200], jnp.float64)
        y = jnp.array([1e200, 3e199], jnp.float64)
        small = reference_norm([x], ord)
        got = optaxclip.global_norm({"x": x}, ord=ord)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), small, rtol=1e-14)
        big = optaxclip.global_norm({"y": y}, ord=ord)
        assert big.dtype == jnp.float64
        np.testing.assert_allclose(float(big), reference_norm([y], ord), rtol=1e-12)
        leaves = optaxclip.leaf_norms({"x": x, "f": jnp.ones(4, jnp.float32)}, ord=ord)
        assert leaves["x"].dtype == jnp.float64
        assert leaves["f"].dtype == jnp.float32
        np.testing.assert_allclose(float(leaves["x"]), small, rtol=1e-14)
    assert not jax.config.jax_enable_x64


def test_float32_tree_under_x64_stays_float32():
    with jax.enable_x64(True):
        tree = {"a": jnp.array([3.0, 4.0], jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}
        got = optaxclip.global_norm(tree)
        assert got.dtype == jnp.float32
        assert_norm(got, reference_norm(jax.tree_util.tree_leaves(tree)))


def test_float64_unitwise_norm_under_x64():
    with jax.enable_x64(True):
        x = jnp.array([[3e200, 1e-200], [4e200, 0.0]], jnp.float64)
        got = optaxclip.unitwise_norm(x)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), reference_unitwise(x, (0,)), rtol=1e-14)


def test_complex128_under_x64_is_float64():
    with jax.enable_x64(True):
        z = jnp.array([3e200 + 4e200j, 0.0], jnp.complex128)
        got = optaxclip.global_norm([z])
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), 5e200, rtol=1e-14)


# --- invalid ord ---------------------------------------------------------------------------------

BAD_ORDS = [0, 0.5, -1, -2.0, math.nan, -math.inf, "-inf", "fro", "nuc", "2", True, False, 1j]
BAD_ORD_MESSAGE = "`ord` must be None, a real p >= 1 or 'inf', got "


@pytest.mark.parametrize(
    "fn", [optaxclip.global_norm, optaxclip.leaf_norms], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("ord", BAD_ORDS, ids=repr)
def test_invalid_ord_raises_value_error(fn, ord):
    with pytest.raises(ValueError, match=re.escape(f"{fn.__name__}: {BAD_ORD_MESSAGE}{ord!r}")):
        fn({"a": jnp.ones(3)}, ord=ord)


@pytest.mark.parametrize("ord", [[1, 2], (2,), np.array([2.0, 3.0]), object()], ids=repr)
def test_non_scalar_ord_raises_value_error(ord):
    with pytest.raises(ValueError, match=re.escape(f"global_norm: {BAD_ORD_MESSAGE}")):
        optaxclip.global_norm({"a": jnp.ones(3)}, ord=ord)


def test_orders_below_one_say_why():
    with pytest.raises(ValueError, match="Orders below 1 are not norms"):
        optaxclip.global_norm([jnp.ones(3)], ord=0.5)


def test_traced_ord_is_refused_naming_static_args():
    with pytest.raises(TypeError, match=r"`ord`.*static_args=\('ord',\)"):
        jax.jit(lambda o: optaxclip.global_norm([jnp.ones(3)], ord=o))(2.0)


# --- unitwise_norm -------------------------------------------------------------------------------

UNIT_SHAPES = [
    (),
    (5,),
    (1, 5),
    (5, 1),
    (1, 1, 4),
    (3, 4),
    (2, 3, 4),
    (2, 2, 3, 4),
    (2, 1, 2, 3, 2),
]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("shape", UNIT_SHAPES, ids=str)
def test_unitwise_norm_default_axes(shape, mode):
    x = jnp.asarray(RNG.standard_normal(shape), jnp.float32)
    got = _call(optaxclip.unitwise_norm, mode, x)
    assert got.shape == x.shape
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(got), reference_unitwise(x, default_unit_axes(shape)), rtol=RTOL
    )
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(optax.transforms.unitwise_norm(x)), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("shape", "axis", "axes"),
    [
        ((3, 4), 1, (1,)),
        ((3, 4), -1, (1,)),
        ((3, 4), (0, 1), (0, 1)),
        ((2, 3, 4), (1, 2), (1, 2)),
        ((2, 3, 4), (-1, 0), (0, 2)),
        ((2, 2, 2, 2, 2, 2), (0, 1), (0, 1)),
    ],
)
def test_unitwise_norm_explicit_axis(shape, axis, axes):
    x = jnp.asarray(RNG.standard_normal(shape), jnp.float32)
    got = optaxclip.unitwise_norm(x, axis=axis)
    assert got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), reference_unitwise(x, axes), rtol=RTOL)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(optax.transforms.unitwise_norm(x, axis=axis)), rtol=1e-6
    )


@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_unitwise_norm_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=r"unitwise_norm: axis -?\d+ is out of range for rank 2"):
        optaxclip.unitwise_norm(jnp.ones((2, 3)), axis=axis)


def test_unitwise_norm_rank_six_needs_axis():
    with pytest.raises(ValueError, match=r"unitwise_norm: no default unit axes.*pass `axis`"):
        optaxclip.unitwise_norm(jnp.ones((2,) * 6))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_unitwise_norm_half_precision_does_not_overflow(dtype):
    x = jnp.full((3, 2), 300.0, dtype)
    got = optaxclip.unitwise_norm(x)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.full((3, 2), math.sqrt(3) * 300.0), rtol=RTOL)


# --- gradients -----------------------------------------------------------------------------------


def reference_grad(x, ord):
    """d ||x||_p / dx, in float64, for x != 0 with a unique largest |x| when p is inf."""
    x = np.asarray(x, np.float64)
    p = _p(ord)
    top = np.abs(x).max()
    u = x / top
    if math.isinf(p):
        return np.where(np.abs(u) == 1, np.sign(u), 0.0)
    if p == 1:
        return np.sign(u)
    norm = np.sum(np.abs(u) ** p) ** (1 / p)
    return np.sign(u) * np.abs(u) ** (p - 1) / norm ** (p - 1)


GRAD_ORDS = [None, 1, 3, 1.5, 7, "inf"]
GRAD_ORD_IDS = ["None", "1", "3", "1.5", "7", "inf"]


@functools.cache
def _grad(ord, mode):
    grad = jax.grad(lambda t: optaxclip.global_norm(t, ord=ord))
    return jax.jit(grad) if mode == "jit" else grad


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("ord", GRAD_ORDS, ids=GRAD_ORD_IDS)
def test_grad_is_finite_at_zero(ord, mode):
    g = _grad(ord, mode)({"a": jnp.zeros([2]), "b": jnp.zeros([3])})
    for key, shape in [("a", (2,)), ("b", (3,))]:
        assert g[key].dtype == jnp.float32
        assert g[key].shape == shape
        assert np.isfinite(np.asarray(g[key])).all(), (key, g[key])


def test_grad_is_finite_at_zero_for_half_precision_and_scalars():
    tree = {"a": jnp.zeros([3]), "b": jnp.zeros([2, 2], jnp.bfloat16), "c": jnp.zeros([])}
    g = jax.grad(optaxclip.global_norm)(tree)
    for key in tree:
        assert g[key].dtype == tree[key].dtype
        assert np.isfinite(np.asarray(g[key], np.float32)).all(), (key, g[key])


def test_grad_is_finite_at_zero_for_leaf_and_unitwise_norms():
    g = jax.grad(lambda x: sum(jax.tree_util.tree_leaves(optaxclip.leaf_norms(x))))(
        [jnp.zeros(3), jnp.zeros([2, 2])]
    )
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in g)
    g = jax.grad(lambda x: jnp.sum(optaxclip.unitwise_norm(x)))(jnp.zeros([3, 2]))
    assert np.isfinite(np.asarray(g)).all()


def test_grad_at_zero_in_one_leaf_only():
    tree = {"a": jnp.array([3.0, 4.0]), "b": jnp.zeros(3)}
    g = jax.grad(optaxclip.global_norm)(tree)
    np.testing.assert_allclose(np.asarray(g["a"]), [0.6, 0.8], rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(g["b"]), np.zeros(3))


GRAD_POINT = np.array([0.3, -1.7, 2.9, -0.05, 1.1])


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("scale", [1.0, 1e-25, 1e10, 1e30], ids=["unit", "tiny", "large", "huge"])
@pytest.mark.parametrize("ord", GRAD_ORDS, ids=GRAD_ORD_IDS)
def test_grad_matches_reference(ord, scale, mode):
    # The norm is 1-homogeneous, so its gradient does not depend on the scale of x.
    x = jnp.asarray(GRAD_POINT * scale, jnp.float32)
    tree = {"a": x[:2], "b": x[2:]}
    g = _grad(ord, mode)(tree)
    got = np.concatenate([np.asarray(g["a"]), np.asarray(g["b"])])
    np.testing.assert_allclose(got, reference_grad(x, ord), rtol=1e-5, atol=1e-6)


def test_l2_grad_is_x_over_norm():
    x = jnp.asarray(RNG.standard_normal((4, 3)), jnp.float32)
    g = jax.grad(optaxclip.global_norm)(x)
    np.testing.assert_allclose(
        np.asarray(g),
        np.asarray(x, np.float64) / np.linalg.norm(np.asarray(x, np.float64)),
        rtol=1e-5,
    )


def test_grad_under_vmap():
    rows = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [3e-25, 4e-25, 0.0], [3e30, 4e30, 0.0]])
    g = jax.vmap(jax.grad(optaxclip.global_norm))(jnp.asarray(rows, jnp.float32))
    expected = np.array([[0.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.6, 0.8, 0.0], [0.6, 0.8, 0.0]])
    assert np.isfinite(np.asarray(g)).all(), g
    np.testing.assert_allclose(np.asarray(g)[1:], expected[1:], rtol=1e-5, atol=1e-6)


# --- jit and vmap --------------------------------------------------------------------------------


@pytest.mark.parametrize("ord", ORDS, ids=ORD_IDS)
def test_global_norm_under_vmap(ord):
    # One batch mixes every path: plain, zero, tiny (rescued), huge (rescued), NaN, inf.
    rows = np.array(
        [
            [3.0, -4.0, 0.0],
            [0.0, 0.0, 0.0],
            [1e-25, 3e-25, -2e-25],
            [1e30, -3e30, 2e30],
            [jnp.nan, 1.0, jnp.inf],
            [jnp.inf, 1.0, 2.0],
        ],
        np.float32,
    )
    tree = {"a": jnp.asarray(rows[:, :1]), "b": jnp.asarray(rows[:, 1:])}
    batched = jax.vmap(lambda t: optaxclip.global_norm(t, ord=ord))
    for fn in (batched, jax.jit(batched)):
        got = np.asarray(fn(tree))
        assert got.shape == (len(rows),)
        for row, value in zip(rows, got, strict=True):
            assert_norm(value, reference_norm([row], ord))


def test_leaf_norms_under_vmap():
    batch = {"a": jnp.array([[3.0, 4.0], [1e30, 1e30]]), "b": jnp.array([[1e-30], [0.0]])}
    got = jax.vmap(optaxclip.leaf_norms)(batch)
    for key in batch:
        assert got[key].shape == (2,)
        for i in range(2):
            assert_norm(got[key][i], reference_norm([batch[key][i]]))


def test_unitwise_norm_under_vmap_and_jit():
    x = (
        jnp.asarray(RNG.standard_normal((3, 4, 2)), jnp.float32)
        * jnp.array([1.0, 1e-25, 1e30])[:, None, None]
    )
    got = jax.jit(jax.vmap(optaxclip.unitwise_norm))(x)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(got[i]), reference_unitwise(x[i], (0,)), rtol=RTOL)
