"""Benchmarks of probprune: masked-op micro-benchmarks and the end-to-end step benchmark.

``probprune-fast bench --out DIR [--quick]`` runs :func:`run_bench`; ``pytest bench/
--benchmark-json=FILE`` runs the same cases through pytest-benchmark. Shapes come from
:data:`registry.MODEL_REGISTRY`, case definitions from :mod:`.micro` and :mod:`.e2e`.
(Imports are lazy so that building the CLI parser stays cheap.)
"""


def __getattr__(name):
    if name in ("MODEL_REGISTRY", "Plan", "StepSetting", "make_plan"):
        from . import registry

        return getattr(registry, name)
    if name == "run_bench":
        from .run import run_bench

        return run_bench
    raise AttributeError(name)
