"""A build's identity and folder: open (resume the unfinished build of the same spec and input, or start one),
the per-dataset lock, and the code version recorded with it."""
from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from schemas.spec import BuildSpec, is_uri
from dataio.build_folder import BuildFolder, atomic_write_text
from dataio.storage import Location, location

ROOT = Path(__file__).resolve().parents[2]


class BuildError(RuntimeError):
    pass


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return "pairforge-0.1.0+" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "pairforge-0.1.0"


@dataclass
class BuildContext:
    spec: BuildSpec
    folder: BuildFolder
    fingerprint: str
    resumed: bool = False
    stage_meta: dict = field(default_factory=dict)
    history_of: str | None = None  # refilter: "earlier builds" are those before the parent, not before the child

    @property
    def build_id(self) -> str:
        return self.folder.build_id

    @property
    def build_dir(self) -> Location:
        return self.folder.root

    @property
    def source_name(self) -> str:
        return self.spec.source.name or PurePosixPath(self.spec.source.path).stem

    def state(self) -> dict:
        return self.folder.state()

    def set_state(self, **kw) -> None:
        self.folder.set_state(**kw)


def source_fingerprint(path: str | Path | Location) -> str:
    """sha256 of a URL list file; for a corpus folder, of its files' names, sizes and mtimes (local or remote)."""
    import pyarrow.fs as pafs

    path = location(path)
    if path.is_file():
        return path.sha256()
    h = hashlib.sha256()
    files = path.fs.get_file_info(pafs.FileSelector(path.path, recursive=True))
    rel = {f: posixpath.relpath(f.path, path.path) for f in files if f.type == pafs.FileType.File}
    for f in sorted(rel, key=lambda f: PurePosixPath(rel[f]).parts):  # pathlib's order, as before
        mtime = f.mtime_ns if f.mtime_ns is not None else 0
        h.update(f"{rel[f]}\0{f.size}\0{mtime}\n".encode())
    return h.hexdigest()


def open_build(spec: BuildSpec, new: bool = False) -> BuildContext:
    """Resume the newest unfinished build of this spec and input, or start a new one."""
    fingerprint = source_fingerprint(spec.source.path)
    spec_hash = spec.spec_hash()
    root = location(spec.out) / spec.dataset
    root.mkdir()
    if not new:
        for cand in reversed(root.subdirs()):
            st = BuildFolder(cand).state()
            if st.get("spec_hash") == spec_hash and st.get("fingerprint") == fingerprint and st.get("status") != "complete":
                return BuildContext(spec, BuildFolder(cand), fingerprint, resumed=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    build_id = f"{stamp}-{spec_hash[:8]}"
    n = 1
    while (root / build_id).exists():
        n += 1
        build_id = f"{stamp}-{spec_hash[:8]}-{n}"
    folder = BuildFolder(root / build_id)
    folder.work.mkdir()
    ctx = BuildContext(spec, folder, fingerprint)
    atomic_write_text(folder.spec_file, spec.to_yaml())
    ctx.set_state(spec_hash=spec_hash, fingerprint=fingerprint, status="running", build_id=build_id,
                  started=datetime.now(timezone.utc).isoformat())
    return ctx


def lock_path(spec: BuildSpec) -> Path:
    """The dataset's lock file (see dataset_lock)."""
    if is_uri(spec.out):
        return spec.catalog_path.with_name(f"{spec.catalog_path.name}.{spec.dataset}.lock")
    return Path(spec.out) / spec.dataset / ".lock"


@contextmanager
def dataset_lock(spec: BuildSpec, wait: bool = False):
    """One build of a dataset at a time: a second run waits (wait=True) or fails naming the holder. The lock is a
    local file: <out>/<dataset>/.lock, or, when `out` is in object storage (which has no locks), beside the catalog:
    <catalog>.<dataset>.lock. Builds of one remote `out` must then share that catalog's machine."""
    lock = lock_path(spec)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            raise BuildError(f"another build of dataset {spec.dataset!r} is running ({fh.read().strip() or 'pid ?'}); "
                             "wait for it or pass --wait") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def earlier_builds(ctx: BuildContext) -> list[dict]:
    """Complete builds of this build's source, newest first (what an incremental build continues)."""
    if not ctx.spec.catalog_path.exists():
        return []
    from catalogs import Catalog

    cat = Catalog(ctx.spec.catalog_path, read_only=True)
    try:
        cutoff = cat.get_build(ctx.history_of or ctx.build_id)["started"]
    except KeyError:
        return []
    return [b for b in cat.list_builds(ctx.spec.dataset)
            if b["status"] == "complete" and b["source"] == ctx.source_name and b["finished"] is not None
            and b["finished"] <= cutoff]


__all__ = ["BuildContext", "BuildError", "code_version", "dataset_lock", "earlier_builds", "lock_path", "open_build",
           "source_fingerprint"]
