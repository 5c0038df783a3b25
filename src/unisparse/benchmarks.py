"""Which benchmark scores each task: the shapes world's miniatures (the embedded default) or the real
ones the paper reports (GenEval for generation, MME for understanding). Defined once here; the
config schema and the evaluation and calibration settings take their values from this table."""

from __future__ import annotations

from .choices import BENCHMARKS

#: per task, the default benchmark (the first ``choices.BENCHMARKS`` names)
DEFAULT_BENCHMARKS = {task: names[0] for task, names in BENCHMARKS.items()}
#: benchmarks with a runner in this version (any other would be accepted by the schema, so that a DAG
#: can be planned, and refused by the job that would run it)
IMPLEMENTED = {"shapes_geneval", "shapesqa", "geneval", "mme"}


def check_benchmarks(value: dict | None, implemented_only: bool = True) -> dict:
    """``{task: benchmark}`` over the defaults; an unknown task or benchmark is a ValueError naming it."""
    chosen = {**DEFAULT_BENCHMARKS, **(value or {})}
    for task, name in chosen.items():
        if task not in BENCHMARKS:
            raise ValueError(f"benchmarks: unknown task {task!r}; tasks are {sorted(BENCHMARKS)}")
        if name not in BENCHMARKS[task]:
            raise ValueError(f"benchmarks.{task}: unknown benchmark {name!r}; expected one of {list(BENCHMARKS[task])}")
        if implemented_only and name not in IMPLEMENTED:
            raise NotImplementedError(f"benchmarks.{task}: {name!r} has no runner in this version of unisparse")
    return chosen
