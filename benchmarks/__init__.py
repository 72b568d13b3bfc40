"""optaxclip's benchmarks: optaxclip side by side with optax and with the memory-bandwidth floor.

Run from the repository root:

    python benchmarks/run.py [--quick]       # or: python -m benchmarks [--quick]

Modules: `harness` (timing, records, JSON, tables), `registry` (the benchmarks by name),
`cli` (the command line), one module per benchmark. See `benchmarks/README.md`.

Importing this package does not import JAX, so an entry point can set `XLA_FLAGS` first.
"""

import os


def simulate_host_devices(count: int = 8) -> None:
    """Lets XLA simulate `count` CPU devices, unless `XLA_FLAGS` already sets a device count.

    Must run before JAX starts; only the entry points call it, never the library.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
