"""The stage registry: every stage a spec may name, by its spec name.

A stage registers itself when its module is imported (stages.base.Stage.__init_subclass__ calls register). Which
modules are imported:
- every entry point of the group `pairforge.stages`: its value names a module, or a package whose modules are each
  imported (subpackages are helpers and are not). pairforge's own stages are the entry point
  `pairforge = "stages"` of its pyproject.toml, so adding a stage file to stages/ needs no other edit; a third-party
  package declares its own (`[project.entry-points."pairforge.stages"] my_stages = "my_pkg.stages"`);
- the modules a spec names in `stage_modules` (module paths importable where the build runs), which the build
  forwards to its Ray workers in PAIRFORGE_STAGE_MODULES.
schemas imports no stage package by name: it learns the stages through this group, as every other package does.
Where pairforge itself is not installed (a checkout on PYTHONPATH), its own entry point is taken as declared.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
from typing import Any, Iterable

GROUP = "pairforge.stages"
OWN_ENTRY_POINT = importlib.metadata.EntryPoint(name="pairforge", value="stages", group=GROUP)
MODULES_ENV = "PAIRFORGE_STAGE_MODULES"  # comma-separated: a spec's stage_modules, for the build's workers

STAGES: dict[str, Any] = {}  # spec name -> stage class
_imported: set[str] = set()
_entry_points_read = False


class StageModuleError(ImportError):
    """A stage module (an entry point's or a spec's stage_modules) that cannot be imported."""


def register(cls: Any) -> None:
    """Called by Stage.__init_subclass__ for every class that declares a `name`."""
    other = STAGES.get(cls.name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"two stages are named {cls.name!r}: {other.__module__} and {cls.__module__}")
    STAGES[cls.name] = cls


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """The group's entry points, pairforge's own first (declared here too, for a checkout that is not installed)."""
    found = list(importlib.metadata.entry_points(group=GROUP))
    return [OWN_ENTRY_POINT] + [ep for ep in found if ep.value != OWN_ENTRY_POINT.value]


def import_stage_module(name: str, origin: str) -> None:
    """Import a module of stages, or every module of a package of stages (its subpackages are helpers)."""
    if name in _imported:
        return
    try:
        module = importlib.import_module(name)
        if hasattr(module, "__path__"):
            for info in pkgutil.iter_modules(module.__path__):
                if not info.ispkg:
                    importlib.import_module(f"{name}.{info.name}")
    except Exception as e:  # noqa: BLE001 - a plugin's missing dependency, syntax or declaration error: say where
        raise StageModuleError(f"{origin}: cannot import stage module {name!r}: {type(e).__name__}: {e}") from e
    _imported.add(name)


def env_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(MODULES_ENV, "").split(",") if m.strip()]


def load_stages(modules: Iterable[str] = ()) -> dict[str, Any]:
    """Every registered stage, after importing the entry points' modules (read once per process), `modules` and
    PAIRFORGE_STAGE_MODULES."""
    global _entry_points_read
    if not _entry_points_read:
        for ep in entry_points():
            import_stage_module(ep.value.split(":")[0], f"entry point {ep.name} = {ep.value} ({GROUP})")
        _entry_points_read = True
    for name in env_modules():
        import_stage_module(name, MODULES_ENV)
    for name in modules:
        import_stage_module(name, "stage_modules")
    return STAGES


def stage_class(name: str, modules: Iterable[str] = ()) -> Any:
    stages = load_stages(modules)
    try:
        return stages[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {sorted(stages)}") from None


__all__ = ["GROUP", "MODULES_ENV", "STAGES", "StageModuleError", "entry_points", "import_stage_module",
           "load_stages", "register", "stage_class"]
