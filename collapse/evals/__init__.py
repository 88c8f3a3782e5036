"""The registry of per-generation evaluations, looked up by name from `eval.metrics`.

Adding an evaluation is adding one module: a module of this package (or of any installed
package, through the entry-point group `collapse.evaluations`) that defines
`EVALUATION = collapse.evals.base.Evaluation(...)`. The registry finds it; the config offers its
name in `eval.metrics` and its section as `eval.<name>`; the pipeline and flows run its stage;
the CLI, Prefect and report tables show its columns; the report draws its figures. See
`collapse/evals/base.py` for what an entry declares and `collapse/evals/entropy.py` for a small
example.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any

from collapse.evals.base import Column, Evaluation, Figure, column_value

__all__ = [
    "ENTRY_POINT_GROUP",
    "Column",
    "Evaluation",
    "Figure",
    "column_value",
    "evaluation",
    "registry",
    "split_stage",
]

ENTRY_POINT_GROUP = "collapse.evaluations"


def _entry(obj: Any, where: str) -> Evaluation:
    found = getattr(obj, "EVALUATION", obj)
    if not isinstance(found, Evaluation):
        raise TypeError(f"{where} does not define an Evaluation (EVALUATION = Evaluation(...))")
    return found


@functools.cache
def registry() -> dict[str, Evaluation]:
    """Every evaluation found, by name, in (`order`, name) order.

    Raises:
        ValueError: two evaluations share a name.
    """
    found: list[tuple[Evaluation, str]] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "EVALUATION"):
            found.append((_entry(module, module.__name__), module.__name__))
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.append((_entry(point.load(), f"entry point {point.value}"), point.value))
    by_name: dict[str, Evaluation] = {}
    origin: dict[str, str] = {}
    for entry, where in sorted(found, key=lambda item: (item[0].order, item[0].name)):
        if entry.name in by_name:
            raise ValueError(
                f"evaluation {entry.name!r} is defined twice: {origin[entry.name]} and {where}"
            )
        by_name[entry.name], origin[entry.name] = entry, where
    return by_name


def split_stage(stage: str) -> tuple[str, str | None]:
    """(evaluation name, part or None) of `<name>`, `eval.<name>` or `eval.<name>/<part>`."""
    name, _, part = stage.removeprefix("eval.").partition("/")
    return name, part or None


def evaluation(name: str) -> Evaluation:
    """The registry entry of evaluation `name` (or of its stage, `eval.<name>[/<part>]`)."""
    return registry()[split_stage(name)[0]]


def default_metrics() -> list[str]:
    """The evaluations a config runs when it does not list `eval.metrics`."""
    return [name for name, entry in registry().items() if entry.default]
