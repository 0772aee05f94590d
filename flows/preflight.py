"""Everything a build can check before work starts, checked before any Prefect server, Ray or build folder starts
and before anything is recorded in the catalog: the spec (already parsed), its source (readable, the columns it
names, rows), `out` and the catalog (writable), the dataset's lock, the stages (models in the local cache, devices)
and the resources (the stages' pools fit the machine). Each failure is a UserError that says what, where and how
to fix it. Nothing here imports Prefect or Ray, and nothing is written.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dataio import sources
from dataio.reasons import IngestError
from schemas.errors import UserError
from schemas.spec import BuildSpec, SpecError, is_uri, load_spec
from stages import stage_class
from stages.base import StageConfigError

_STAGES_CHECKED: dict[str, dict] = {}  # spec hash -> stage metadata: the flow's preflight does not load again the
                                      # model configs the CLI's just checked (the cheap checks run again)


class EmptySourceError(UserError):
    """The source has no rows and the command was asked to fail on that (--fail-if-empty)."""


def load_corpus_spec(spec_path: str | Path) -> BuildSpec:
    """A spec whose source is a corpus (source.pairs): what curate reads."""
    spec = load_spec(spec_path)
    if spec.source.pairs is None:
        raise SpecError("curate reads a corpus with images (source.pairs), not a URL list", f"{spec_path}, source",
                        "use `pairforge build` for a URL list, or set source.pairs", "source.pairs")
    return spec


def preflight(spec: BuildSpec, *, fail_if_empty: bool = False, wait_lock: bool = True) -> dict:
    """Check `spec` before any work; returns the stages' metadata (recorded in the manifest)."""
    check_source(spec, fail_if_empty)
    check_writable(spec)
    if not wait_lock:
        check_not_locked(spec)
    key = spec.spec_hash()
    if key not in _STAGES_CHECKED:
        _STAGES_CHECKED[key] = check_stages(spec)
    check_resources_fit(spec)
    return _STAGES_CHECKED[key]


def _at(spec: BuildSpec, field: str | None) -> str:
    return f"{spec.origin}, {field}" if field else spec.origin


def check_source(spec: BuildSpec, fail_if_empty: bool = False) -> dict:
    """The source reads in its format, has the columns the spec names and (with fail_if_empty) rows."""
    src_field = "source.urls" if spec.source.urls is not None else "source.pairs"
    try:
        found = sources.check_source(spec.source)
    except IngestError as e:
        field = e.field or src_field
        raise IngestError(e.what, _at(spec, field), e.hint, field) from None
    if not found["rows"] and fail_if_empty:
        raise EmptySourceError(f"the source has no rows: {spec.source.path}", _at(spec, src_field),
                               "give a source with rows, or leave out --fail-if-empty to record an empty build",
                               src_field)
    return found


def _unwritable(path: Path, want_dir: bool) -> str | None:
    """Why a folder (want_dir) or file cannot be made or written at `path`; None when it can."""
    p = path
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    if p == path:
        if want_dir and not p.is_dir():
            return f"{p} is a file, not a folder"
        if not want_dir and p.is_dir():
            return f"{p} is a folder, not a file"
        if not os.access(p, os.W_OK | (os.X_OK if want_dir else 0)):
            return f"{p} is not writable"
        return None
    if not p.is_dir():
        return f"{p} is a file, so no folder can be made under it"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def check_writable(spec: BuildSpec) -> None:
    """`out` (a local folder) and the catalog file can be made or written; nothing is created here."""
    if not is_uri(spec.out):
        why = _unwritable(Path(spec.out), want_dir=True)
        if why:
            raise SpecError(f"out is not a folder that can be written: {why}", _at(spec, "out"),
                            "set `out:` to a folder you can write (default: builds/ beside the spec)", "out")
    catalog = spec.catalog_path
    why = _unwritable(catalog, want_dir=False)
    if why is None and catalog.is_file() and catalog.stat().st_size and not _is_duckdb(catalog):
        why = f"{catalog} is not a DuckDB file"
    if why:
        field = "catalog" if spec.catalog is not None else "out"
        raise SpecError(f"the catalog cannot be written: {why}", _at(spec, field),
                        "set `catalog:` to a DuckDB file you can write (default: <out>/catalog.duckdb)", field)


def _is_duckdb(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(12)[8:12] == b"DUCK"


def check_not_locked(spec: BuildSpec) -> None:
    """No other build of the dataset holds its locks (the build would stop at once, after starting its servers)."""
    from flows.engine.context import lock_files

    for lock in lock_files(spec):
        if not lock.is_file():
            continue
        with open(lock) as fh:
            try:  # a shared lock for a moment: it fails only while a build holds the exclusive one
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = fh.read().strip() or "pid ?"
                raise UserError(f"another build of dataset {spec.dataset!r} is running ({holder})", str(lock),
                                "wait for it, or pass --wait to queue behind it") from None
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_stages(spec: BuildSpec) -> dict:
    """Every stage instantiated and its own preflight run (a model not in the local cache, a device that is not
    here); returns their metadata."""
    meta = {}
    for i, entry in enumerate(spec.stages):
        field = f"stages[{i}].{entry.name}"
        try:
            stage = stage_class(entry.name, spec.stage_modules)(entry.params)
            stage.preflight()
        except StageConfigError as e:
            hint = e.hint or f"fix {field} in the spec (`pairforge stages` lists each stage's parameters)"
            raise StageConfigError(e.what, _at(spec, e.field or field), hint, e.field or field) from None
        meta[entry.name] = stage.metadata()
    return meta


def check_resources_fit(spec: BuildSpec) -> None:
    """Resources fit: the stages' tasks and actor pools fit the local cluster this spec starts
    (flows.engine.resources.check_fit, issue 21); a cluster it joins (`ray.address`) is known only once joined, and
    the build checks it then, before any download."""
    from flows.engine.context import BuildError
    from flows.engine.resources import check_fit

    try:
        check_fit(spec)
    except BuildError as e:  # "<what is wrong>. <how to fix it>"
        what, _, fix = str(e).rpartition(". ")
        raise SpecError(what or fix, _at(spec, "stages"), fix if what else None, "stages") from None


