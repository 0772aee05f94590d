"""The project's packages, as pyproject.toml lists them (one list for every test that walks the tree)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_packages() -> list[str]:
    """Top-level package names (pyproject's `packages.find.include`, without the trailing `*`)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in conf["tool"]["setuptools"]["packages"]["find"]["include"]]
