"""Validation of the options every factory takes, done once at construction."""

import math
from typing import Any, Literal

import jax
import numpy as np

NonFinite = Literal["propagate", "zero", "skip"]
NONFINITE_MODES: tuple[str, ...] = ("propagate", "zero", "skip")


def is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_threshold(value: Any, arg: str, where: str) -> Any:
    """Checks a threshold: a scalar, and when concrete, finite-or-inf and non-negative.

    Traced values pass through untouched, so the threshold can come from
    `optax.inject_hyperparams` or a schedule.
    """
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{where}: `{arg}` must be a number, got {value!r}.")
    if is_traced(value):
        if np.ndim(value) != 0:
            raise ValueError(f"{where}: `{arg}` must be a scalar, got shape {np.shape(value)}.")
        return value
    try:
        array = np.asarray(value)
    except TypeError as err:
        raise TypeError(f"{where}: `{arg}` must be a number, got {value!r}.") from err
    if array.ndim != 0:
        raise ValueError(f"{where}: `{arg}` must be a scalar, got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"{where}: `{arg}` must be a real number, got {value!r}.")
    number = float(array)
    if math.isnan(number) or number < 0:
        raise ValueError(f"{where}: `{arg}` must be non-negative, got {number}.")
    return value


def parse_ord(ord: Any, where: str) -> float:
    """Returns the norm order as a Python float (`math.inf` for the max-norm)."""
    if ord is None:
        return 2.0
    if is_traced(ord):
        raise TypeError(
            f"{where}: `ord` fixes the algorithm and cannot be traced. Under "
            "`optax.inject_hyperparams`, pass `static_args=('ord',)`."
        )
    if isinstance(ord, str):
        if ord.lower() == "inf":
            return math.inf
        raise ValueError(f"{where}: `ord` must be None, a real p >= 1 or 'inf', got {ord!r}.")
    if isinstance(ord, bool):
        raise ValueError(f"{where}: `ord` must be None, a real p >= 1 or 'inf', got {ord!r}.")
    try:
        p = float(np.asarray(ord))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: `ord` must be None, a real p >= 1 or 'inf', got {ord!r}."
        ) from err
    if math.isnan(p) or p < 1:
        raise ValueError(
            f"{where}: `ord` must be None, a real p >= 1 or 'inf', got {ord!r}. "
            "Orders below 1 are not norms."
        )
    return p


def check_nonfinite(mode: Any, where: str) -> NonFinite:
    if mode not in NONFINITE_MODES:
        raise ValueError(f"{where}: `nonfinite` must be one of {NONFINITE_MODES}, got {mode!r}.")
    return mode


def check_static(value: Any, arg: str, where: str) -> None:
    """Refuses a traced value for an option that fixes shapes or the algorithm."""
    if is_traced(value) or isinstance(value, jax.Array):
        raise TypeError(
            f"{where}: `{arg}` fixes a shape or the algorithm and cannot be a JAX array. "
            f"Under `optax.inject_hyperparams`, pass `static_args=('{arg}',)`."
        )


def check_name(name: Any, where: str) -> str | None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{where}: `name` must be a string or None, got {name!r}.")
    return name
