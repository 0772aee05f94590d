"""One file a stage. Every module directly in this folder (except the contract: base, steps) is a stage module: importing it registers
its stages (stages.base.Stage.__init_subclass__). Helpers live in subfolders named for their role."""
from __future__ import annotations

import importlib
import pkgutil

from stages.base import Stage

_loaded = False


def registry() -> dict[str, type[Stage]]:
    """Every stage, by spec name (imports the stage modules once; heavy libraries load in setup(), not here)."""
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if not info.ispkg and info.name not in ("base", "steps"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return Stage.registry


def stage_class(name: str) -> type[Stage]:
    stages = registry()
    try:
        return stages[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {sorted(stages)}") from None


def stage_table() -> str:
    """The README's stage table, made from the stages' declarations (`pairforge stages --markdown`)."""
    rows = ["| stage | what it does | stats it adds | reasons |", "|---|---|---|---|"]
    for name, cls in sorted(registry().items()):
        stats = ", ".join(c.name for c in cls.columns)
        reasons = ", ".join(r.name for r in cls.reasons) or "(keeps every pair)"
        rows.append(f"| `{name}` | {cls.summary} | {stats} | {reasons} |")
    return "\n".join(rows)
