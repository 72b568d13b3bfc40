"""Test set-up: 8 simulated CPU devices and strict NumPy-style rank promotion, before JAX starts."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
