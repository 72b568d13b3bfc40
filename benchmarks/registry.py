"""The benchmarks, by name, in the order a run runs them: adding one is one line here.

Each value is a module of this package that defines

    def configure(run: harness.RunConfig) -> Sizes    # its sizes, full or quick, per platform
    def run(session: harness.Session, sizes: Sizes) -> None

`Sizes` is any frozen dataclass (it is written to the JSON under `config.benchmarks`).
Modules are imported when their benchmark runs, so one that fails to import is
reported like one that fails to run, and the others still run.
"""

import importlib
from types import ModuleType

BENCHMARKS: dict[str, str] = {
    "norm": "benchmarks.norm",
    "step": "benchmarks.step",
    "train": "benchmarks.train",
    "compile": "benchmarks.compile_time",
    "collectives": "benchmarks.collectives",
    "adaptive": "benchmarks.adaptive",
    "lowering": "benchmarks.lowering",
    "per_example": "benchmarks.per_example",
    "monitor": "benchmarks.monitor",
}


def load(name: str) -> ModuleType:
    """The module of benchmark `name`, checked to have `configure` and `run`."""
    module = importlib.import_module(BENCHMARKS[name])
    for attribute in ("configure", "run"):
        if not callable(getattr(module, attribute, None)):
            raise TypeError(
                f"benchmark {name!r} ({module.__name__}) has no function `{attribute}`; "
                "a benchmark module defines configure(run) -> sizes and run(session, sizes)"
            )
    return module
