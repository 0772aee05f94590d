"""ModelStage: the base of the stages that load a model (safety, text, align, recaption).

What every model stage does the same way, written once:
- optional dependencies (`requires`): checked at preflight without importing them; a missing one is a
  StageConfigError naming the package and the command that installs it ("pip install nudenet");
- the model loads lazily, once per process, in setup() (the build calls it once per actor), through the stage's
  load_model(); teardown() releases it (and the CUDA cache when it was on a GPU);
- metadata() records the model's version: the installed version of each required package and the sha256 of the
  weight files the stage names (model_files), beside what model_metadata() adds (device, dtype, thresholds...);
- a torch model's device check (check_device: gpus asked for where torch sees no CUDA device) and thread count.
A subclass declares `requires` and `model_description`, and writes check_model() (cheap: files exist, a config
parses; no weights), load_model() and, where it has them, model_files() and model_metadata().
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.base import Stage, StageConfigError


@dataclass(frozen=True)
class Requirement:
    """An optional dependency: the module a stage imports and the distribution that provides it."""

    module: str
    distribution: str = ""  # default: the module's name

    @property
    def package(self) -> str:
        return self.distribution or self.module

    @property
    def install_hint(self) -> str:
        return f"pip install {self.package}"

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module.split(".")[0]) is not None

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def folder(self, stage: str) -> Path:
        """The installed package's folder (bundled model files live there), found without importing it."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise StageConfigError(f"{stage}: the {self.package} package is not installed ({self.install_hint})")
        return Path(list(spec.submodule_search_locations)[0])


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a (weights) file, cached per (path, size, mtime): actors of one build hash it once each."""
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def model_alias(doc: str) -> property:
    """A stage's own name for its loaded model (align's `clip`, recaption's `lm`): ModelStage.model, read or set."""
    return property(lambda self: self.model, lambda self, value: setattr(self, "model", value), doc=doc)


class ModelStage(Stage):
    uses_model = True
    requires: ClassVar[tuple[Requirement, ...]] = ()
    model_description: ClassVar[str] = ""  # what the metadata calls the model when the spec does not name one

    def __init__(self, params=None):
        super().__init__(params)
        self.model: Any = None
        self.load_seconds: float | None = None

    # what a subclass writes ----------------------------------------------------
    def check_model(self) -> None:
        """Cheap checks that the model can be loaded (files exist, the config parses); raise StageConfigError."""

    def load_model(self) -> Any:
        raise NotImplementedError

    def model_files(self) -> dict[str, Path]:
        """Weight files whose sha256 the metadata records, by role."""
        return {}

    def model_metadata(self) -> dict:
        """What else the build records about the model (device, dtype, thresholds...)."""
        return {}

    # the lifecycle ---------------------------------------------------------------
    def check_requirements(self) -> None:
        missing = [r for r in self.requires if not r.installed()]
        if missing:
            names = ", ".join(r.package for r in missing)
            raise StageConfigError(f"{self.name}: needs {names}, not installed here "
                                   f"({'; '.join(r.install_hint for r in missing)})")

    def preflight(self) -> None:
        self.check_requirements()
        self.check_model()

    def setup(self) -> None:
        if self.model is None:
            t0 = time.perf_counter()
            self.model = self.load_model()
            self.load_seconds = time.perf_counter() - t0

    def teardown(self) -> None:
        model, self.model = self.model, None
        device = getattr(model, "device", None)
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()

    def metadata(self) -> dict:
        meta: dict = {"version": self.version, "model": self.model_description,
                      "packages": {r.package: r.version() for r in self.requires}}
        files = self.model_files()
        if files:
            meta["model_files"] = {k: {"file": p.name, "sha256": file_sha256(p)} for k, p in files.items()}
        meta.update(self.model_metadata())
        return meta

    # torch models ------------------------------------------------------------------
    @property
    def threads(self) -> int:
        """CPU threads of the model: the params' `threads`, else the stage's cpus rounded down (at least 1)."""
        from stages.models import resolve_threads

        return resolve_threads(getattr(self.params, "threads", None), self.resources.cpus)

    def check_device(self, device: str):
        """The torch device `device` resolves to here; gpus asked for where torch sees no CUDA is an error."""
        from stages.models import resolve_device

        dev = resolve_device(device, self.resources.gpus, stage=self.name)
        if self.resources.gpus and dev.type != "cuda" and device == "auto":
            raise StageConfigError(f"{self.name}: gpus={self.resources.gpus:g} asked for, but torch sees no CUDA "
                                   "device here; set gpus: 0 (or run where there is a GPU)")
        return dev


__all__ = ["ModelStage", "Requirement", "file_sha256", "model_alias"]
