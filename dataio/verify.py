"""`pairforge verify BUILD`: is a finished build (local or in object storage) still what its manifest says?

Checks, each naming the file it fails on:
- every file the manifest lists exists, with the manifest's size and sha256 (streamed in 1 MiB reads);
- its Parquet footer reads, its row count is the manifest's, its schema is the build's (shards) or the rejects';
- no part file in shards/ or rejects/ that the manifest does not list;
- kept + rejected == listed (stats.json) and the manifest's totals;
- no uid twice across shards and rejects: the uid columns stream into DuckDB, whose aggregation spills to a
  temporary folder past a fixed memory limit, so memory stays flat in the build's size.
It reads footers, checksums and the uid column, never the images into memory, and starts no Prefect or Ray.
"""
from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs

from dataio.storage import Location, location
from schemas.columns import build_schema, rejects_schema
from schemas.errors import UserError

KINDS = ("shards", "rejects")
DUPLICATES_SHOWN = 20  # uids named when some appear twice
DUCKDB_MEMORY = "128MB"  # the uid check's memory cap; DuckDB spills past it


class VerifyError(UserError):
    """BUILD is not a build folder that can be verified (no readable manifest); the message says why."""


def _problem(file: str, what: str) -> dict:
    return {"file": file, "problem": what}


def check_file(root: Location, entry: dict, schema: pa.Schema) -> tuple[list[dict], int | None]:
    """Size, sha256, footer, row count and schema of one listed file: (problems, rows in its footer or None)."""
    rel = entry["path"]
    f = root / rel
    info = f.info()
    if info.type == pafs.FileType.NotFound:
        return [_problem(rel, "missing (listed in the manifest)")], None
    problems = []
    if info.size != entry.get("bytes"):
        problems.append(_problem(rel, f"size {info.size} bytes, the manifest says {entry.get('bytes')}"))
    digest = f.sha256()
    if entry.get("sha256") and digest != entry["sha256"]:
        problems.append(_problem(rel, f"sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}..."))
    try:
        meta = f.read_metadata()
        got = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        problems.append(_problem(rel, f"not a readable Parquet file: {e}"))
        return problems, None
    if meta.num_rows != entry.get("rows"):
        problems.append(_problem(rel, f"{meta.num_rows} rows, the manifest says {entry.get('rows')}"))
    if not got.equals(schema, check_metadata=False):
        want = {fl.name: str(fl.type) for fl in schema}
        have = {fl.name: str(fl.type) for fl in got}
        diff = sorted(set(want.items()) ^ set(have.items()))
        problems.append(_problem(rel, "schema differs from the build's: " + ", ".join(f"{n} {t}" for n, t in diff[:6])))
    return problems, meta.num_rows


def duplicate_uids(root: Location, files: list[str], batch_rows: int = 65536) -> list[dict]:
    """uids that appear more than once across `files` (paths relative to root), with the files holding them.
    The uid columns stream into DuckDB batch by batch; its aggregation spills to disk past DUCKDB_MEMORY."""
    import duckdb

    with tempfile.TemporaryDirectory(prefix="pairforge-verify-") as tmp, duckdb.connect() as con:
        con.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")
        con.execute("SET threads = 2")
        con.execute(f"SET temp_directory = '{tmp}'")
        con.execute("SET preserve_insertion_order = false")
        con.execute("CREATE TABLE uids (uid VARCHAR, file INTEGER)")
        out = []
        for i, rel in enumerate(files):
            con.execute("BEGIN")
            try:
                for batch in (root / rel).parquet_file().iter_batches(batch_size=batch_rows, columns=["uid"]):
                    con.register("chunk", pa.table({"uid": batch.column(0),
                                                    "file": pa.array([i] * batch.num_rows, pa.int32())}))
                    con.execute("INSERT INTO uids SELECT * FROM chunk")
                    con.unregister("chunk")
            except (OSError, pa.ArrowException) as e:  # a corrupted page: the file's uids are left out
                con.execute("ROLLBACK")
                out.append(_problem(rel, f"its uid column cannot be read: {e}"))
                continue
            con.execute("COMMIT")
        rows = con.execute("SELECT uid, count(*) AS n, list(DISTINCT file ORDER BY file) AS files FROM uids "
                           f"GROUP BY uid HAVING count(*) > 1 ORDER BY uid LIMIT {DUPLICATES_SHOWN + 1}").fetchall()
        total = con.execute("SELECT count(*) FROM (SELECT uid FROM uids GROUP BY uid HAVING count(*) > 1)").fetchone()[0]
    for uid, n, where in rows[:DUPLICATES_SHOWN]:
        names = [files[j] for j in where]
        for rel in names:
            out.append(_problem(rel, f"uid {uid} appears {n} times (in {', '.join(names)})"))
    if total > DUPLICATES_SHOWN:
        out.append(_problem("*", f"{total} uids appear more than once; the first {DUPLICATES_SHOWN} are named"))
    return out


def verify_build(build: str | Location, threads: int = 8) -> dict:
    """Check a finished build against its manifest; returns {ok, problems: [{file, problem}], counts}.
    Raises VerifyError when there is no readable manifest to check against."""
    t0 = time.perf_counter()
    root = location(build)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except FileNotFoundError:
        raise VerifyError(f"{root}: no manifest.json (not a finished build folder)") from None
    except (OSError, ValueError) as e:
        raise VerifyError(f"{root}/manifest.json: cannot be read: {e}") from None
    stages = manifest.get("stages") or []
    schemas = {"shards": build_schema(stages), "rejects": rejects_schema(stages)}
    listed = [(kind, e) for kind in KINDS for e in manifest.get(kind, [])]
    problems: list[dict] = []

    with ThreadPoolExecutor(max(1, threads)) as pool:  # I/O bound (object storage); hashlib releases the GIL
        checked = list(pool.map(lambda ke: check_file(root, ke[1], schemas[ke[0]]), listed))
    rows = {kind: 0 for kind in KINDS}
    readable = []
    for (kind, entry), (found, n) in zip(listed, checked):
        problems += found
        if n is not None:  # the footer read
            rows[kind] += n
            readable.append(entry["path"])
    known = {e["path"] for _, e in listed}
    for kind in KINDS:
        for f in (root / kind).glob("*"):
            rel = f.relative_to(root)
            if rel not in known and not f.name.startswith("."):
                problems.append(_problem(rel, "not listed in the manifest"))

    for kind, key in (("shards", "rows"), ("rejects", "rejected_rows")):
        if key in manifest and rows[kind] != manifest[key]:
            problems.append(_problem(kind, f"{rows[kind]} rows in the files, the manifest says {manifest[key]}"))
    stats_file = root / "stats.json"
    rows_listed = json.loads(stats_file.read_text()).get("rows_listed") if stats_file.exists() else None
    if rows_listed is None:
        problems.append(_problem("stats.json", "missing: the listed row count cannot be checked"))
    elif rows["shards"] + rows["rejects"] != rows_listed:
        problems.append(_problem("stats.json", f"{rows['shards']} kept + {rows['rejects']} rejected != "
                                               f"{rows_listed} listed"))
    problems += duplicate_uids(root, readable)
    return {"build": str(root), "ok": not problems, "problems": problems, "files": len(listed),
            "bytes": sum(e.get("bytes") or 0 for _, e in listed), "kept": rows["shards"],
            "rejected": rows["rejects"], "listed": rows_listed, "seconds": round(time.perf_counter() - t0, 3)}


def format_result(result: dict) -> str:
    """Plain lines: one per problem, then a summary line."""
    lines = [f"BAD {p['file']}: {p['problem']}" for p in result["problems"]]
    head = (f"{result['files']} files, {result['bytes']:,} bytes; {result['kept']} kept + {result['rejected']} "
            f"rejected, {result['listed']} listed; {result['seconds']:.1f} s")
    if result["ok"]:
        lines.append(f"ok: {result['build']}: {head}")
    else:
        bad = len({p["file"] for p in result["problems"]})
        lines.append(f"FAILED: {result['build']}: {len(result['problems'])} problems in {bad} files; {head}")
    return "\n".join(lines)


__all__ = ["VerifyError", "format_result", "verify_build"]
