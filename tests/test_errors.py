"""Errors that teach: what was wrong, where, and what to do instead."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest

import optaxclip

GRADS = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}


@pytest.mark.parametrize("bad", [0.5, 0, -2, "fro", "nuc", float("nan"), True])
def test_invalid_ord(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"`ord` must be None, a real p >= 1 or 'inf'"):
        optaxclip.global_norm(GRADS, ord=bad)
    with pytest.raises(ValueError, match=r"clip_by_global_norm: `ord` must be"):
        optaxclip.clip_by_global_norm(1.0, ord=bad)


def test_ord_spellings_of_infinity_agree() -> None:
    want = float(optaxclip.global_norm(GRADS, ord=float("inf")))
    for spelling in ("inf", "INF", jnp.inf):
        assert float(optaxclip.global_norm(GRADS, ord=spelling)) == want == 1.0


def test_traced_ord_names_static_args() -> None:
    factory = optax.inject_hyperparams(optaxclip.clip_by_global_norm)
    tx = factory(max_norm=1.0, ord=1)
    with pytest.raises(TypeError, match=r"`ord` .* `static_args=\('ord',\)`"):
        jax.jit(tx.update)(GRADS, tx.init(GRADS))
    tx = optax.inject_hyperparams(optaxclip.clip_by_global_norm, static_args=("ord",))(
        max_norm=1.0, ord=1
    )
    updates, _ = jax.jit(tx.update)(GRADS, tx.init(GRADS))
    assert float(optaxclip.global_norm(updates, ord=1)) == pytest.approx(1.0)


def test_traced_history_size_names_static_args() -> None:
    tx = optax.inject_hyperparams(optaxclip.autoclip)(percentile=50.0)
    with pytest.raises(TypeError, match=r"`history_size` .* `static_args=\('history_size',\)`"):
        tx.init(GRADS)


def test_traced_agc_axis_names_static_args() -> None:
    tx = optax.inject_hyperparams(optaxclip.adaptive_grad_clip)(clipping=0.1, axis=0)
    with pytest.raises(TypeError, match=r"`axis` .* `static_args=\('axis',\)`"):
        tx.init(GRADS)


@pytest.mark.parametrize(
    ("factory", "arg"),
    [
        (lambda v: optaxclip.clip_by_global_norm(v), "max_norm"),
        (lambda v: optaxclip.zclip(alpha=v), "alpha"),
        (lambda v: optaxclip.guard(optax.sgd(1.0), max_norm=v), "max_norm"),
        (lambda v: optaxclip.adaptive_grad_clip(1.0, eps=v), "eps"),
    ],
)
def test_invalid_numbers_name_the_argument(factory: Any, arg: str) -> None:
    with pytest.raises(ValueError, match=f"`{arg}` must be non-negative, got -1.0"):
        factory(-1.0)
    with pytest.raises(ValueError, match=f"`{arg}` must be a scalar"):
        factory(jnp.ones(2))
    with pytest.raises(TypeError, match=f"`{arg}` must be a real number"):
        factory("1.0")


def test_out_of_range_fractions() -> None:
    with pytest.raises(ValueError, match=r"`percentile` must be in \[0, 100\]"):
        optaxclip.autoclip(101.0)
    with pytest.raises(ValueError, match=r"`target_quantile` must be in \[0, 1\]"):
        optaxclip.quantile_clip(target_quantile=2.0)
    with pytest.raises(ValueError, match="`history_size` must be a positive int"):
        optaxclip.autoclip(history_size=0)


def test_unknown_nonfinite_mode() -> None:
    with pytest.raises(ValueError, match=r"`nonfinite` must be one of \('propagate', 'zero'"):
        optaxclip.clip_by_global_norm(1.0, nonfinite="ignore")  # type: ignore[arg-type]


def test_bad_name() -> None:
    with pytest.raises(TypeError, match="`name` must be a string"):
        optaxclip.clip_by_value(1.0, name=3)  # type: ignore[arg-type]


def test_axis_name_outside_a_mapped_context() -> None:
    tx = optaxclip.clip_by_global_norm(1.0, axis_name="batch")
    with pytest.raises(ValueError, match=r"axis name \('batch',\) is not bound.*leave it None"):
        tx.update(GRADS, tx.init(GRADS))


def test_replicated_without_axis_name() -> None:
    with pytest.raises(ValueError, match="`replicated` only has a meaning with `axis_name`"):
        optaxclip.global_norm(GRADS, replicated=True)


def test_bad_axis_name_type() -> None:
    with pytest.raises(TypeError, match="`axis_name` must be a string"):
        optaxclip.clip_by_global_norm(1.0, axis_name=3)


def test_agc_needs_params() -> None:
    tx = optaxclip.adaptive_grad_clip(0.1)
    with pytest.raises(ValueError, match=r"`update` needs `params`"):
        tx.update(GRADS, tx.init(GRADS))


def test_agc_rank_without_default_axes() -> None:
    tx = optaxclip.adaptive_grad_clip(0.1)
    grads = {"big": jnp.ones((1, 2, 2, 2, 2, 2))}
    with pytest.raises(ValueError, match=r"leaf \['big'\].*no default unit axes.*pass `axis`"):
        tx.update(grads, tx.init(grads), grads)


def test_agc_axis_out_of_range() -> None:
    tx = optaxclip.adaptive_grad_clip(0.1, axis=3)
    with pytest.raises(ValueError, match=r"leaf \['b'\].*axis 3 is out of range for rank 1"):
        tx.update(GRADS, tx.init(GRADS), GRADS)


def test_group_labels_must_cover_the_tree() -> None:
    tx = optaxclip.clip_by_group_norm(1.0, {"w": "a"})
    with pytest.raises(ValueError, match="`labels` must be a tree prefix of the updates"):
        tx.init(GRADS)


def test_group_labels_must_be_strings() -> None:
    tx = optaxclip.clip_by_group_norm(1.0, {"w": "a", "b": 3})
    with pytest.raises(TypeError, match=r"labels must be strings; leaf \['b'\] has label 3"):
        tx.init(GRADS)


def test_group_thresholds_must_cover_every_label() -> None:
    tx = optaxclip.clip_by_group_norm({"a": 1.0}, {"w": "a", "b": "b"})
    with pytest.raises(ValueError, match=r"no threshold for group\(s\) \['b'\]"):
        tx.init(GRADS)


def test_group_labels_must_not_change() -> None:
    labels = {"w": "a", "b": "b"}
    tx = optaxclip.clip_by_group_norm(1.0, lambda tree: labels)
    state = tx.init(GRADS)
    labels["b"] = "c"
    with pytest.raises(ValueError, match=r"leaf \['b'\] has label 'c', which was not among"):
        tx.update(GRADS, state, GRADS)


def test_block_rms_stacked_needs_a_leading_axis() -> None:
    tx = optaxclip.clip_by_block_rms(1.0, stacked=True)
    with pytest.raises(ValueError, match=r"leaf \['s'\] is a scalar"):
        tx.update({"s": jnp.ones(())}, tx.init(None))


def test_adagc_state_must_match_the_updates() -> None:
    tx = optaxclip.adagc()
    state = tx.init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="2 floating-point leaves but the state was initialised"):
        tx.update(GRADS, state)


def test_guard_nonfinite_is_a_bool() -> None:
    with pytest.raises(TypeError, match="`nonfinite` must be a bool"):
        optaxclip.guard(optax.sgd(1.0), nonfinite="skip")  # type: ignore[arg-type]
