"""One file a stage. Every module directly in this folder is a stage module, except the contract (base, steps): the
package is pairforge's own entry point of the `pairforge.stages` group, so importing it through the registry
registers its stages (stages.base.Stage.__init_subclass__). Helpers live in subfolders named for their role."""
from __future__ import annotations

from schemas.registry import load_stages, stage_class
from stages.base import Stage


def registry(modules=()) -> dict[str, type[Stage]]:
    """Every stage, by spec name: pairforge's own, those of the `pairforge.stages` entry points, and `modules`
    (heavy libraries load in setup(), not at import)."""
    return load_stages(modules)


def stage_table() -> str:
    """The README's stage table, made from the stages' declarations (`pairforge stages --markdown`)."""
    rows = ["| stage | what it does | stats it adds | reasons |", "|---|---|---|---|"]
    for name, cls in sorted(registry().items()):
        stats = ", ".join(c.name for c in cls.columns)
        reasons = ", ".join(r.name for r in cls.reasons) or "(keeps every pair)"
        rows.append(f"| `{name}` | {cls.summary} | {stats} | {reasons} |")
    return "\n".join(rows)


__all__ = ["registry", "stage_class", "stage_table"]
