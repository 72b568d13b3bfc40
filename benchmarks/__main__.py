"""`python -m benchmarks [--quick] [--only NAME ...]`, from the repository root."""

import sys

from benchmarks import simulate_host_devices


def _main() -> int:
    simulate_host_devices()  # before JAX starts: `collectives` and `lowering` need 8 devices
    from benchmarks.cli import main

    return main(prog="python -m benchmarks")


if __name__ == "__main__":
    sys.exit(_main())
