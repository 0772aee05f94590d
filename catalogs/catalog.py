"""DuckDB catalog of sources, builds, shards, stage stats, lineage (parent builds, stage versions), seen uids
and evals.

One file, one writer at a time. Every operation opens its own short-lived connection
(``with duckdb.connect(path) as con``, memory and threads bounded by DUCKDB_CONFIG) and closes it at once, so a
long-running build never holds the file lock; if another process holds the lock the connect is retried with a short,
growing sleep until ``lock_timeout`` seconds have passed.

duckdb 2.0: results go through ``con.sql(...).to_arrow_table()`` / ``.fetchall()`` (``.arrow()`` returns a
RecordBatchReader that keeps the connection busy; there is no ``fetch_arrow_table``).
"""
from __future__ import annotations

import io
import json
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import duckdb
import pyarrow as pa

from schemas.errors import UserError, did_you_mean

SCHEMA_VERSION = 1
# Every connection: a bounded share of the driver's memory and CPUs (DuckDB spills past the limit; by default it
# would take 80% of RAM and every core). PAIRFORGE_CATALOG_MEMORY overrides the limit.
DUCKDB_CONFIG = {"memory_limit": os.environ.get("PAIRFORGE_CATALOG_MEMORY", "512MB"), "threads": 2}
# Appending a build's seen uids: a small buffer pool and no ordering to keep, so the driver's memory stays flat
# however many rows the build has (a commit every SEEN_COMMIT_ROWS: DuckDB holds a transaction's appends in memory).
APPEND_CONFIG = {**DUCKDB_CONFIG, "memory_limit": "32MB", "preserve_insertion_order": False}
SEEN_COMMIT_ROWS = 100_000
# The seen rows that count: those of complete builds (a build publishes them when it finishes) and of add_seen.
_SEEN = """(SELECT * FROM seen WHERE build_id IS NULL
           OR build_id NOT IN (SELECT build_id FROM builds WHERE status <> 'complete'))"""
BUILD_STATUSES = ("running", "complete", "failed")

_DDL = [
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS sources (
        name VARCHAR PRIMARY KEY, uri VARCHAR, fingerprint VARCHAR, rows BIGINT,
        first_seen TIMESTAMP, last_seen TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS builds (
        build_id VARCHAR PRIMARY KEY, dataset VARCHAR, source VARCHAR, spec_hash VARCHAR,
        code_version VARCHAR, status VARCHAR, out_dir VARCHAR, spec_yaml VARCHAR,
        started TIMESTAMP, finished TIMESTAMP, rows_in BIGINT, rows_kept BIGINT,
        rows_rejected BIGINT, parent_build_id VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS shards (
        build_id VARCHAR, kind VARCHAR, path VARCHAR, rows BIGINT, bytes BIGINT, sha256 VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS stage_stats (
        build_id VARCHAR, stage VARCHAR, rows_in BIGINT, rows_out BIGINT, rejected VARCHAR,
        seconds DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS lineage (
        child_build_id VARCHAR, parent_build_id VARCHAR, relation VARCHAR)""",
    # which version of each stage made a build's stats (stages.base.Stage.version), in spec order
    """CREATE TABLE IF NOT EXISTS build_stages (
        build_id VARCHAR, position INTEGER, stage VARCHAR, version INTEGER)""",
    "CREATE TABLE IF NOT EXISTS seen (source VARCHAR, uid VARCHAR, sha256 VARCHAR, build_id VARCHAR)",
    """CREATE TABLE IF NOT EXISTS evals (
        build_id VARCHAR, metric VARCHAR, value DOUBLE, detail VARCHAR, recorded TIMESTAMP)""",
]

_BUILD_COLS = (
    "build_id", "dataset", "source", "spec_hash", "code_version", "status", "out_dir", "spec_yaml",
    "started", "finished", "rows_in", "rows_kept", "rows_rejected", "parent_build_id",
)


def _now() -> datetime:
    """Naive UTC timestamp (stored as TIMESTAMP, no time zone handling needed on read)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _is_lock_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "lock" in msg and ("could not set lock" in msg or "conflicting lock" in msg)


def _rows(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


class Catalog:
    """Catalog stored in one DuckDB file at ``path`` (parent dir is created).

    ``read_only=True`` opens every connection read-only (several readers, e.g. CLI calls, may
    then run at once); the file must exist already. ``lock_timeout`` is how long to keep
    retrying when another process holds the file lock.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False, lock_timeout: float = 30.0):
        self.path = Path(path)
        self.read_only = read_only
        self.lock_timeout = lock_timeout
        if read_only:
            if not self.path.exists():
                raise FileNotFoundError(f"catalog {self.path} does not exist")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._init_schema()

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    # ------------------------------------------------------------------ connection
    @contextmanager
    def _connect(self, write: bool = True, config: dict | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        if write and self.read_only:
            raise PermissionError(f"catalog {self.path} is opened read-only")
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=self.read_only, config=dict(config or DUCKDB_CONFIG))
                break
            except duckdb.IOException as exc:
                if not _is_lock_error(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
        with con:
            yield con

    @contextmanager
    def _txn(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Write connection with one transaction (rolled back on error)."""
        with self._connect(write=True) as con:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    def _init_schema(self) -> None:
        with self._txn() as con:
            for ddl in _DDL:
                con.execute(ddl)
            got = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if got is None:
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            elif int(got[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"catalog {self.path} has schema_version {got[0]}, this code expects {SCHEMA_VERSION}"
                )

    def schema_version(self) -> int:
        with self._connect(write=False) as con:
            return int(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    # ------------------------------------------------------------------ sources
    def record_source(self, name: str, uri: str, fingerprint: str, rows: int | None) -> None:
        now = _now()
        with self._txn() as con:
            con.execute(
                """INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET uri = excluded.uri,
                     fingerprint = excluded.fingerprint, rows = excluded.rows,
                     last_seen = excluded.last_seen""",
                [name, uri, fingerprint, rows, now, now],
            )

    def get_source(self, name: str) -> dict | None:
        with self._connect(write=False) as con:
            got = _rows(con.execute("SELECT * FROM sources WHERE name = ?", [name]))
        return got[0] if got else None

    def list_sources(self) -> list[dict]:
        with self._connect(write=False) as con:
            return _rows(con.execute("SELECT * FROM sources ORDER BY name"))

    # ------------------------------------------------------------------ builds
    def start_build(
        self,
        build_id: str,
        dataset: str,
        source: str | None,
        spec_hash: str,
        code_version: str,
        spec_yaml: str,
        out_dir: str | Path,
        parent_build_id: str | None = None,
    ) -> None:
        """Insert a build with status 'running'; an existing build_id (resume) goes back to running."""
        with self._txn() as con:
            exists = con.execute("SELECT 1 FROM builds WHERE build_id = ?", [build_id]).fetchone()
            if exists:
                con.execute(
                    "UPDATE builds SET status = 'running', finished = NULL WHERE build_id = ?",
                    [build_id],
                )
            else:
                con.execute(
                    f"INSERT INTO builds ({', '.join(_BUILD_COLS)}) VALUES ({', '.join('?' * len(_BUILD_COLS))})",
                    [build_id, dataset, source, spec_hash, code_version, "running", str(out_dir),
                     spec_yaml, _now(), None, None, None, None, parent_build_id],
                )

    def finish_build(
        self,
        build_id: str,
        status: str,
        rows_in: int | None = None,
        rows_kept: int | None = None,
        rows_rejected: int | None = None,
    ) -> None:
        """Set the final status and counts (a None count leaves the stored value alone)."""
        if status not in BUILD_STATUSES:
            raise ValueError(f"status must be one of {BUILD_STATUSES}, got {status!r}")
        with self._txn() as con:
            if not con.execute("SELECT 1 FROM builds WHERE build_id = ?", [build_id]).fetchone():
                raise KeyError(f"unknown build_id {build_id!r} in catalog {self.path}")
            con.execute(
                """UPDATE builds SET status = ?, finished = ?,
                     rows_in = coalesce(?, rows_in), rows_kept = coalesce(?, rows_kept),
                     rows_rejected = coalesce(?, rows_rejected)
                   WHERE build_id = ?""",
                [status, _now() if status != "running" else None, rows_in, rows_kept,
                 rows_rejected, build_id],
            )

    def list_builds(self, dataset: str | None = None) -> list[dict]:
        """Builds rows, newest first (spec_yaml left out to keep the listing small)."""
        cols = ", ".join(c for c in _BUILD_COLS if c != "spec_yaml")
        sql = f"SELECT {cols} FROM builds"
        params: list[Any] = []
        if dataset is not None:
            sql += " WHERE dataset = ?"
            params.append(dataset)
        sql += " ORDER BY started DESC, rowid DESC"
        with self._connect(write=False) as con:
            return _rows(con.execute(sql, params))

    def latest_build(self, dataset: str, status: str | None = "complete") -> dict | None:
        """Newest builds row of ``dataset`` with ``status`` (None: any status), or None."""
        sql = "SELECT * FROM builds WHERE dataset = ?"
        params: list[Any] = [dataset]
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        sql += " ORDER BY started DESC, rowid DESC LIMIT 1"
        with self._connect(write=False) as con:
            got = _rows(con.execute(sql, params))
        return got[0] if got else None

    def find_resumable(self, dataset: str, spec_hash: str) -> str | None:
        """build_id of the newest build of ``dataset`` with ``spec_hash`` that is not complete."""
        with self._connect(write=False) as con:
            got = con.execute(
                """SELECT build_id FROM builds
                   WHERE dataset = ? AND spec_hash = ? AND status <> 'complete'
                   ORDER BY started DESC, rowid DESC LIMIT 1""",
                [dataset, spec_hash],
            ).fetchone()
        return got[0] if got else None

    def get_build(self, build_id: str) -> dict:
        """The builds row plus 'shards', 'stage_stats', 'lineage' (both directions), 'stage_versions' and 'evals'."""
        with self._connect(write=False) as con:
            got = _rows(con.execute("SELECT * FROM builds WHERE build_id = ?", [build_id]))
            if not got:
                raise KeyError(f"unknown build_id {build_id!r} in catalog {self.path}")
            d = got[0]
            d["shards"] = _rows(con.execute(
                "SELECT kind, path, rows, bytes, sha256 FROM shards WHERE build_id = ? "
                "ORDER BY kind, path", [build_id]))
            stats = _rows(con.execute(
                "SELECT stage, rows_in, rows_out, rejected, seconds FROM stage_stats "
                "WHERE build_id = ? ORDER BY rowid", [build_id]))
            for s in stats:
                s["rejected"] = json.loads(s["rejected"]) if s["rejected"] else {}
            d["stage_stats"] = stats
            d["lineage"] = _rows(con.execute(
                "SELECT child_build_id, parent_build_id, relation FROM lineage "
                "WHERE child_build_id = ? OR parent_build_id = ? ORDER BY rowid",
                [build_id, build_id]))
            d["stage_versions"] = _rows(con.execute(
                "SELECT stage, version FROM build_stages WHERE build_id = ? ORDER BY position", [build_id]))
            evals = _rows(con.execute(
                "SELECT metric, value, detail, recorded FROM evals WHERE build_id = ? "
                "ORDER BY recorded, rowid", [build_id]))
            for e in evals:
                e["detail"] = json.loads(e["detail"]) if e["detail"] is not None else None
            d["evals"] = evals
        return d

    # ------------------------------------------------------------------ shards / stats
    def record_shards(self, build_id: str, kind: str, rows: list[dict]) -> None:
        """Replace all of ``build_id``'s shards of ``kind`` with ``rows`` (path, rows, bytes, sha256)."""
        values = [
            [build_id, kind, str(r["path"]), r.get("rows"), r.get("bytes"), r.get("sha256")]
            for r in rows
        ]
        with self._txn() as con:
            con.execute("DELETE FROM shards WHERE build_id = ? AND kind = ?", [build_id, kind])
            if values:
                con.executemany("INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?)", values)

    def record_stage_stats(self, build_id: str, stats: list[dict]) -> None:
        """Upsert per (build_id, stage): stage, rows_in, rows_out, rejected (dict), seconds."""
        values = [
            [build_id, s["stage"], s.get("rows_in"), s.get("rows_out"),
             json.dumps(dict(s.get("rejected") or {}), sort_keys=True), s.get("seconds")]
            for s in stats
        ]
        if not values:
            return
        with self._txn() as con:
            for v in values:
                con.execute("DELETE FROM stage_stats WHERE build_id = ? AND stage = ?", v[:2])
            con.executemany("INSERT INTO stage_stats VALUES (?, ?, ?, ?, ?, ?)", values)

    def record_stage_versions(self, build_id: str, versions: dict[str, int]) -> None:
        """Replace the build's stage versions ({stage: version}, in spec order)."""
        with self._txn() as con:
            con.execute("DELETE FROM build_stages WHERE build_id = ?", [build_id])
            if versions:
                con.executemany("INSERT INTO build_stages VALUES (?, ?, ?, ?)",
                                [[build_id, i, stage, int(v)] for i, (stage, v) in enumerate(versions.items())])

    def add_lineage(self, child: str, parent: str, relation: str) -> None:
        with self._txn() as con:
            con.execute(
                """INSERT INTO lineage SELECT ?, ?, ? WHERE NOT EXISTS (
                     SELECT 1 FROM lineage WHERE child_build_id = ? AND parent_build_id = ?
                     AND relation = ?)""",
                [child, parent, relation, child, parent, relation],
            )

    def record_eval(self, build_id: str, metric: str, value: float | None, detail: Any = None) -> None:
        with self._txn() as con:
            con.execute(
                "INSERT INTO evals VALUES (?, ?, ?, ?, ?)",
                [build_id, metric, None if value is None else float(value),
                 None if detail is None else json.dumps(detail, sort_keys=True, default=str), _now()],
            )

    # ------------------------------------------------------------------ seen uids / hashes
    def add_seen(self, source: str, table) -> int:
        """Add (uid, sha256, build_id) rows for ``source``; returns how many uids were new.

        ``table`` is a pyarrow Table, or a pyarrow Dataset / RecordBatchReader that DuckDB streams (a build's
        output files: nothing is held in Python). Idempotent: a uid already seen for the source is not added again
        (a missing sha256 of an existing row is filled in). Duplicate uids count once.
        """
        names = table.schema.names
        if "uid" not in names:
            raise ValueError("add_seen needs a 'uid' column")
        cols = ", ".join(f"CAST({c} AS VARCHAR) AS {c}" if c in names else f"CAST(NULL AS VARCHAR) AS {c}"
                         for c in ("uid", "sha256", "build_id"))
        with self._txn() as con:
            con.register("_incoming", table)
            try:
                con.execute(
                    f"""CREATE TEMP TABLE _new AS
                       SELECT uid, max(sha256) AS sha256, any_value(build_id) AS build_id
                       FROM (SELECT {cols} FROM _incoming) WHERE uid IS NOT NULL GROUP BY uid"""
                )
                con.execute(
                    """UPDATE seen SET sha256 = n.sha256 FROM _new n
                       WHERE seen.source = ? AND seen.uid = n.uid
                         AND seen.sha256 IS NULL AND n.sha256 IS NOT NULL""",
                    [source],
                )
                added = con.execute(
                    """INSERT INTO seen SELECT ?, n.uid, n.sha256, n.build_id FROM _new n
                       WHERE NOT EXISTS (SELECT 1 FROM seen s WHERE s.source = ? AND s.uid = n.uid)""",
                    [source, source],
                ).fetchone()
                con.execute("DROP TABLE _new")
            finally:
                con.unregister("_incoming")
        return int(added[0]) if added else 0

    def record_seen(self, source: str, build_id: str, readers: Iterable) -> int:
        """Record the rows a finished build processed: ``readers`` stream its output rows (Arrow
        RecordBatchReaders, Datasets or Tables with uid and, optionally, sha256; a reader per file), which DuckDB
        appends as they come, committing every SEEN_COMMIT_ROWS rows. A build's uids are unique by construction
        (its input preparation), so nothing is grouped and nothing per row is held; recording a build again
        replaces its rows. The rows count in lookups once the build is complete (or if it is not a catalogued
        build), so a recording cut short is never seen. A uid that several builds of the source processed (a full
        rebuild) has a row per build. Returns the rows recorded."""
        added = pending = 0
        with self._connect(write=True, config=APPEND_CONFIG) as con:
            con.execute("DELETE FROM seen WHERE source = ? AND build_id = ?", [source, build_id])
            con.begin()
            for reader in readers:
                sha = "CAST(sha256 AS VARCHAR)" if "sha256" in reader.schema.names else "CAST(NULL AS VARCHAR)"
                con.register("_incoming", reader)
                try:
                    got = con.execute(f"""INSERT INTO seen SELECT ?, CAST(uid AS VARCHAR), {sha}, ?
                                          FROM _incoming WHERE uid IS NOT NULL""", [source, build_id]).fetchone()
                finally:
                    con.unregister("_incoming")
                pending += int(got[0]) if got else 0
                if pending >= SEEN_COMMIT_ROWS:
                    con.commit()
                    added, pending = added + pending, 0
                    con.begin()
            con.commit()
        return added + pending

    def seen_among(self, source: str, uids: pa.Array) -> pa.Array:
        """The uids of ``uids`` that earlier builds of ``source`` processed (a join in DuckDB: a batch at a time,
        never the whole seen set in Python)."""
        with self._connect(write=False) as con:
            con.register("_batch", pa.table({"uid": uids.cast(pa.string())}))
            try:
                t = con.sql(f"SELECT DISTINCT b.uid FROM _batch b JOIN {_SEEN} s ON s.uid = b.uid "
                            "AND s.source = ?", params=[source]).to_arrow_table()
            finally:
                con.unregister("_batch")
        return t.column("uid").combine_chunks()

    def seen_uids(self, source: str) -> set[str]:
        with self._connect(write=False) as con:
            t = con.sql(f"SELECT uid FROM {_SEEN} WHERE source = ?", params=[source]).to_arrow_table()
        return set(t.column("uid").to_pylist())

    def seen_hashes(self, source: str) -> pa.Table:
        """pyarrow Table(uid, sha256) of the source's seen rows that have a sha256."""
        with self._connect(write=False) as con:
            return con.sql(  # a uid several builds recorded: one row
                f"SELECT uid, any_value(sha256) AS sha256 FROM {_SEEN} WHERE source = ? AND sha256 IS NOT NULL "
                "GROUP BY uid", params=[source]
            ).to_arrow_table()


# ---------------------------------------------------------------------- formatting (CLI)
# --------------------------------------------------------------------------- finding a catalog

CATALOG_NAME = "catalog.duckdb"
USUAL_PLACES = (CATALOG_NAME, f"builds/{CATALOG_NAME}", f"demo-out/builds/{CATALOG_NAME}")  # from the current folder
CATALOG_HINT = "pass --catalog FILE (a build's <out>/catalog.duckdb), or a build folder"


def catalog_beside(build_dir: Path) -> Path:
    """The catalog of a local build folder <out>/<dataset>/<build id>: <out>/catalog.duckdb."""
    return Path(build_dir).parent.parent / CATALOG_NAME


def find_catalog(target: str | None = None, explicit: str | Path | None = None,
                 cwd: Path | None = None) -> tuple[Path, str | None]:
    """(catalog file, build id or None) for `pairforge catalog [TARGET] [--catalog FILE]`. TARGET is a build id or
    a build folder (its catalog is the one beside it: <out>/catalog.duckdb). Without --catalog or a build folder,
    the usual places are tried from the current folder. UserError naming where it looked when there is none."""
    cwd = Path(cwd or Path.cwd())
    folder = Path(target) if target else None
    is_build = folder is not None and folder.is_dir() and any((folder / n).exists() for n in ("manifest.json",
                                                                                            "spec.yaml"))
    build_id = folder.resolve().name if is_build else target
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"no catalog at {path}", "--catalog", CATALOG_HINT, "catalog")
        return path, build_id
    tried = [catalog_beside(folder.resolve())] if is_build else []
    tried += [cwd / p for p in USUAL_PLACES]
    for path in tried:
        if path.is_file():
            return path, build_id
    raise UserError("no catalog found", "looked in " + ", ".join(str(p) for p in tried), CATALOG_HINT, "catalog")


def resolve_build_id(cat: Catalog, build_id: str) -> str:
    """The build id itself, or the one build id it is a unique prefix of; UserError listing the catalog's build
    ids (newest first, the closest suggested) otherwise."""
    ids = [b["build_id"] for b in cat.list_builds()]
    if build_id in ids:
        return build_id
    hits = [i for i in ids if i.startswith(build_id)]
    if len(hits) == 1:
        return hits[0]
    what = (f"build id prefix {build_id!r} matches {len(hits)} builds" if hits
            else f"unknown build id {build_id!r}")
    raise UserError(what, f"catalog {cat.path}", did_you_mean(build_id, hits or ids, "its builds", 10), "build_id")


def _render(*renderables: Any, width: int = 160) -> str:
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False,
                      highlight=False, emoji=False, markup=False)
    for i, r in enumerate(renderables):
        if i:
            console.print()
        console.print(r)
    lines = [line.rstrip() for line in buf.getvalue().splitlines()]
    return "\n".join(lines).strip("\n") + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(title: str | None, columns: list[str], rows: list[list[Any]]):
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def format_builds(rows: list[dict]) -> str:
    """Text table of list_builds() rows."""
    if not rows:
        return "no builds\n"
    cols = ["build_id", "dataset", "status", "started", "finished", "rows_in", "rows_kept",
            "rows_rejected", "parent_build_id"]
    return _render(_table(None, ["build", "dataset", "status", "started", "finished", "in", "kept",
                                 "rejected", "parent"],
                          [[r.get(c) for c in cols] for r in rows]))


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(n)


def format_build(d: dict) -> str:
    """Text view of get_build(): fields, shards (summary per kind + list), stage stats, stage versions, lineage,
    evals."""
    parts: list[Any] = []
    fields = [c for c in _BUILD_COLS if c != "spec_yaml"]
    parts.append(_table(f"build {d.get('build_id')}", ["field", "value"],
                        [[f, d.get(f)] for f in fields]))

    shards = d.get("shards") or []
    if shards:
        kinds: dict[str, list[int]] = {}
        for s in shards:
            k = kinds.setdefault(s["kind"], [0, 0, 0])
            k[0] += 1
            k[1] += s.get("rows") or 0
            k[2] += s.get("bytes") or 0
        parts.append(_table("shards by kind", ["kind", "files", "rows", "bytes"],
                            [[k, v[0], v[1], _human_bytes(v[2])] for k, v in sorted(kinds.items())]))
        parts.append(_table("shards", ["kind", "path", "rows", "bytes", "sha256"],
                            [[s["kind"], s["path"], s.get("rows"), _human_bytes(s.get("bytes")),
                              (s.get("sha256") or "-")[:12]] for s in shards]))
    stats = d.get("stage_stats") or []
    if stats:
        def rej(m: dict) -> str:
            items = sorted(m.items(), key=lambda kv: -kv[1])
            return ", ".join(f"{k}={v:,}" for k, v in items) or "-"

        parts.append(_table("stage stats", ["stage", "in", "out", "rejected", "seconds"],
                            [[s["stage"], s.get("rows_in"), s.get("rows_out"),
                              rej(s.get("rejected") or {}),
                              None if s.get("seconds") is None else round(float(s["seconds"]), 2)]
                             for s in stats]))
    versions = d.get("stage_versions") or []
    if versions:
        parts.append(_table("stage versions", ["stage", "version"], [[v["stage"], v["version"]] for v in versions]))
    lineage = d.get("lineage") or []
    if lineage:
        parts.append(_table("lineage", ["child", "relation", "parent"],
                            [[x["child_build_id"], x["relation"], x["parent_build_id"]] for x in lineage]))
    evals = d.get("evals") or []
    if evals:
        parts.append(_table("evals", ["metric", "value", "detail", "recorded"],
                            [[e["metric"], e.get("value"),
                              None if e.get("detail") is None else json.dumps(e["detail"], sort_keys=True)[:80],
                              e.get("recorded")] for e in evals]))
    return _render(*parts)
