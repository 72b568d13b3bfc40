"""`python benchmarks/run.py [--quick] [--only NAME ...]`: the entry point `make bench` uses.

The benchmarks are the package `benchmarks` (see `benchmarks/README.md`); this script
only makes the package importable when run by path, then runs `benchmarks.cli.main`.
"""

import sys
from pathlib import Path


def _main() -> int:
    # Run by path, Python puts benchmarks/ first on sys.path, where the package's
    # modules would shadow top-level names; import the package from the root instead.
    root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [root, *(p for p in sys.path[1:] if p != root)]
    from benchmarks import simulate_host_devices

    simulate_host_devices()  # before JAX starts: `collectives` and `lowering` need 8 devices
    from benchmarks.cli import main

    return main(prog="benchmarks/run.py")


if __name__ == "__main__":
    sys.exit(_main())
