"""Catalog tests on a real DuckDB file (no mocks)."""
from __future__ import annotations

import multiprocessing as mp
import time

import duckdb
import pyarrow as pa
import pytest

from catalogs import Catalog, format_build, format_builds


@pytest.fixture
def cat(tmp_path):
    return Catalog(tmp_path / "sub" / "catalog.duckdb")


def _start(cat, build_id, dataset="ds", spec_hash="h1", parent=None):
    cat.start_build(build_id, dataset, "src", spec_hash, "v0.1", "name: ds\n", f"/out/{build_id}",
                    parent_build_id=parent)


def test_schema_and_parent_dir(tmp_path):
    path = tmp_path / "a" / "b" / "cat.duckdb"
    cat = Catalog(path)
    assert path.exists()
    assert cat.schema_version() == 1
    Catalog(path)  # reopening an existing catalog is fine
    with duckdb.connect(str(path), read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"meta", "sources", "builds", "shards", "stage_stats", "lineage", "seen", "evals"} <= tables


def test_round_trip_all_tables(cat):
    cat.record_source("src", "s3://b/src.parquet", "fp1", 100)
    first = cat.get_source("src")
    cat.record_source("src", "s3://b/src.parquet", "fp2", 120)
    s = cat.get_source("src")
    assert (s["fingerprint"], s["rows"], s["first_seen"]) == ("fp2", 120, first["first_seen"])
    assert s["last_seen"] >= first["last_seen"]
    assert [x["name"] for x in cat.list_sources()] == ["src"]

    _start(cat, "b1")
    cat.record_shards("b1", "shard", [
        {"path": "/out/b1/shard-00000.parquet", "rows": 60, "bytes": 2048, "sha256": "aa" * 32},
        {"path": "/out/b1/shard-00001.parquet", "rows": 30, "bytes": 1024, "sha256": "bb" * 32},
    ])
    cat.record_shards("b1", "rejects", [
        {"path": "/out/b1/rejects-00000.parquet", "rows": 10, "bytes": 512, "sha256": "cc" * 32},
    ])
    cat.record_stage_stats("b1", [
        {"stage": "dedup", "rows_in": 100, "rows_out": 95, "rejected": {"duplicate": 5}, "seconds": 0.5},
        {"stage": "clip_filter", "rows_in": 95, "rows_out": 90,
         "rejected": {"low_score": 4, "nsfw": 1}, "seconds": 2.25},
    ])
    cat.finish_build("b1", "complete", rows_in=100, rows_kept=90, rows_rejected=10)
    _start(cat, "b2", parent="b1")
    cat.add_lineage("b2", "b1", "incremental_of")
    cat.add_lineage("b2", "b1", "incremental_of")  # idempotent
    cat.record_eval("b1", "zero_shot_top1", 0.42, {"classes": 10, "n": 500})
    cat.record_eval("b1", "rows_per_s", 1234.5)

    d = cat.get_build("b1")
    assert d["status"] == "complete" and d["finished"] is not None
    assert (d["rows_in"], d["rows_kept"], d["rows_rejected"]) == (100, 90, 10)
    assert (d["dataset"], d["source"], d["spec_hash"], d["code_version"]) == ("ds", "src", "h1", "v0.1")
    assert d["spec_yaml"] == "name: ds\n" and d["out_dir"] == "/out/b1"
    assert d["parent_build_id"] is None
    assert [(s["kind"], s["rows"]) for s in d["shards"]] == [("rejects", 10), ("shard", 60), ("shard", 30)]
    assert d["shards"][1] == {"kind": "shard", "path": "/out/b1/shard-00000.parquet", "rows": 60,
                              "bytes": 2048, "sha256": "aa" * 32}
    assert d["stage_stats"] == [
        {"stage": "dedup", "rows_in": 100, "rows_out": 95, "rejected": {"duplicate": 5}, "seconds": 0.5},
        {"stage": "clip_filter", "rows_in": 95, "rows_out": 90,
         "rejected": {"low_score": 4, "nsfw": 1}, "seconds": 2.25},
    ]
    assert d["lineage"] == [{"child_build_id": "b2", "parent_build_id": "b1", "relation": "incremental_of"}]
    assert [(e["metric"], e["value"], e["detail"]) for e in d["evals"]] == [
        ("zero_shot_top1", 0.42, {"classes": 10, "n": 500}), ("rows_per_s", 1234.5, None)]

    d2 = cat.get_build("b2")
    assert d2["parent_build_id"] == "b1" and d2["status"] == "running"
    assert d2["lineage"] == d["lineage"] and d2["shards"] == [] and d2["evals"] == []

    builds = cat.list_builds()
    assert [b["build_id"] for b in builds] == ["b2", "b1"]
    assert "spec_yaml" not in builds[0]
    assert cat.list_builds("other") == []
    assert cat.latest_build("ds")["build_id"] == "b1"
    assert cat.latest_build("ds", status=None)["build_id"] == "b2"
    assert cat.latest_build("nope") is None

    # seen round trip
    cat.add_seen("src", pa.table({"uid": ["u1", "u2", "u3"], "sha256": ["h1", None, "h3"],
                                  "build_id": ["b1"] * 3}))
    assert cat.seen_uids("src") == {"u1", "u2", "u3"}
    assert cat.seen_uids("other") == set()
    h = cat.seen_hashes("src")
    assert h.column_names == ["uid", "sha256"]
    assert sorted(zip(*h.to_pydict().values())) == [("u1", "h1"), ("u3", "h3")]

    text = format_builds(builds)
    assert "b1" in text and "b2" in text and "complete" in text and "running" in text
    text = format_build(d)
    for needle in ("b1", "shard-00001.parquet", "clip_filter", "low_score=4", "incremental_of",
                   "zero_shot_top1"):
        assert needle in text
    assert format_builds([]) == "no builds\n"


def test_rerecord_is_idempotent(cat):
    _start(cat, "b1")
    shards = [{"path": f"/o/s{i}.parquet", "rows": i, "bytes": 10 * i, "sha256": str(i)} for i in range(3)]
    cat.record_shards("b1", "shard", shards)
    cat.record_shards("b1", "negatives", shards[:1])
    cat.record_shards("b1", "shard", shards)
    assert len(cat.get_build("b1")["shards"]) == 4
    cat.record_shards("b1", "shard", shards[:2])  # replaces the kind's rows, leaves other kinds alone
    got = cat.get_build("b1")["shards"]
    assert sorted((s["kind"], s["path"]) for s in got) == [
        ("negatives", "/o/s0.parquet"), ("shard", "/o/s0.parquet"), ("shard", "/o/s1.parquet")]

    st = [{"stage": "a", "rows_in": 10, "rows_out": 8, "rejected": {"x": 2}, "seconds": 1.0},
          {"stage": "b", "rows_in": 8, "rows_out": 8, "rejected": {}, "seconds": 0.1}]
    cat.record_stage_stats("b1", st)
    cat.record_stage_stats("b1", st)
    cat.record_stage_stats("b1", [{"stage": "a", "rows_in": 10, "rows_out": 7, "rejected": {"x": 3},
                                   "seconds": 1.5}])
    stats = {s["stage"]: s for s in cat.get_build("b1")["stage_stats"]}
    assert len(stats) == 2
    assert stats["a"]["rows_out"] == 7 and stats["a"]["rejected"] == {"x": 3}
    assert stats["b"]["rejected"] == {}


def test_add_seen_idempotent_and_fast(cat):
    n = 200_000
    uids = [f"uid-{i:08d}" for i in range(n)]
    t = pa.table({"uid": uids, "sha256": [f"{i:064x}" if i % 2 else None for i in range(n)],
                  "build_id": ["b1"] * n})
    t0 = time.perf_counter()
    assert cat.add_seen("src", t) == n
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert cat.add_seen("src", t) == 0
    second = time.perf_counter() - t0
    assert first < 5 and second < 5, (first, second)

    t0 = time.perf_counter()
    got = cat.seen_uids("src")
    assert time.perf_counter() - t0 < 5
    assert len(got) == n and "uid-00000007" in got
    assert cat.seen_hashes("src").num_rows == n // 2

    # overlap: half old, half new; duplicates inside the batch count once; null sha256 gets filled in
    more = pa.table({"uid": ["uid-00000000", "uid-00000001", "new-1", "new-1"],
                     "sha256": ["f" * 64, "e" * 64, None, "d" * 64], "build_id": ["b2"] * 4})
    assert cat.add_seen("src", more) == 1
    hashes = dict(zip(*cat.seen_hashes("src").to_pydict().values()))
    assert hashes["uid-00000000"] == "f" * 64  # was null, filled
    assert hashes["uid-00000001"] == f"{1:064x}"  # existing hash kept
    assert hashes["new-1"] == "d" * 64
    # another source is separate; sha256 and build_id columns are optional
    assert cat.add_seen("other", pa.table({"uid": ["uid-00000000"]})) == 1
    assert cat.seen_uids("other") == {"uid-00000000"}
    assert cat.add_seen("other", pa.table({"uid": pa.array([], pa.string())})) == 0


def test_record_seen_streams_a_builds_files_and_replaces_on_rerecord(cat, tmp_path):
    """A finished build's seen rows are appended as its files stream by (no grouping: uids are unique within a
    build); recording the build again (a resumed build) replaces its rows; a rebuild's uids count once in lookups."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    n = 50_000
    for part in range(2):
        uids = [f"uid-{i:08d}" for i in range(part * n, (part + 1) * n)]
        pq.write_table(pa.table({"uid": uids, "sha256": [f"{i:064x}" for i in range(n)], "other": list(range(n))}),
                       tmp_path / f"part-{part}.parquet", row_group_size=4096)
    files = sorted(str(p) for p in tmp_path.glob("part-*.parquet"))

    def readers():
        return [pads.dataset(f).scanner(columns=["uid", "sha256"]).to_reader() for f in files]

    assert cat.record_seen("src", "b1", readers()) == 2 * n
    assert cat.record_seen("src", "b1", readers()) == 2 * n  # replaced, not added twice
    assert len(cat.seen_uids("src")) == 2 * n and cat.seen_hashes("src").num_rows == 2 * n
    assert cat.record_seen("src", "b2", [pa.table({"uid": ["uid-00000001", "new"]})]) == 2  # no sha256 column
    probe = pa.array(["uid-00000001", "uid-00000002", "new", "never"])
    assert sorted(cat.seen_among("src", probe).to_pylist()) == ["new", "uid-00000001", "uid-00000002"]
    assert cat.seen_among("other", probe).to_pylist() == []
    with duckdb.connect(str(cat.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM seen WHERE build_id = 'b1'").fetchone()[0] == 2 * n


def test_seen_rows_count_once_their_build_completes(cat, monkeypatch):
    """record_seen commits as it goes; until the build is complete its rows are not seen, so a recording
    that a crash cut short never hides rows from a later incremental build, and the resumed build replaces it."""
    monkeypatch.setattr("catalogs.catalog.SEEN_COMMIT_ROWS", 2)
    cat.start_build("b1", "ds", "src", "h", "v", "", "/o")

    def killed_after_one_file():
        yield pa.table({"uid": ["a", "b"]})
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        cat.record_seen("src", "b1", killed_after_one_file())
    with duckdb.connect(str(cat.path), read_only=True) as con:  # the first file was committed
        assert con.execute("SELECT count(*) FROM seen WHERE build_id = 'b1'").fetchone()[0] == 2
    probe = pa.array(["a", "b", "c"])
    assert cat.seen_among("src", probe).to_pylist() == [] and cat.seen_uids("src") == set()
    assert cat.record_seen("src", "b1", [pa.table({"uid": ["a", "b"]}), pa.table({"uid": ["c"]})]) == 3
    assert cat.seen_uids("src") == set()  # still running
    cat.finish_build("b1", "complete")
    assert sorted(cat.seen_among("src", probe).to_pylist()) == ["a", "b", "c"]
    with duckdb.connect(str(cat.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM seen WHERE build_id = 'b1'").fetchone()[0] == 3
    cat.start_build("b1", "ds", "src", "h", "v", "", "/o")  # resumed: running again, its rows hidden until done
    assert cat.seen_uids("src") == set()


def test_connections_bound_duckdbs_memory_and_threads(cat):
    from catalogs.catalog import DUCKDB_CONFIG

    with cat._connect(write=False) as con:
        limit, threads = con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchone()
    assert int(threads) == DUCKDB_CONFIG["threads"]
    assert limit.replace(" ", "").upper().startswith(("488.2MIB", "512.0MB", "512MB", "488MIB")), limit


def test_find_resumable(cat):
    assert cat.find_resumable("ds", "h1") is None
    _start(cat, "done", spec_hash="h1")
    cat.finish_build("done", "complete", rows_in=1, rows_kept=1, rows_rejected=0)
    assert cat.find_resumable("ds", "h1") is None
    _start(cat, "run", spec_hash="h1")
    _start(cat, "otherspec", spec_hash="h2")
    assert cat.find_resumable("ds", "h1") == "run"
    assert cat.find_resumable("other_ds", "h1") is None
    cat.finish_build("run", "failed")
    assert cat.find_resumable("ds", "h1") == "run"
    # resume: start_build on an existing id sets it back to running
    _start(cat, "run", spec_hash="h1")
    b = cat.get_build("run")
    assert b["status"] == "running" and b["finished"] is None
    assert len(cat.list_builds("ds")) == 3
    cat.finish_build("run", "complete")
    assert cat.find_resumable("ds", "h1") is None
    assert cat.latest_build("ds")["build_id"] == "run"


def test_unknown_build_and_bad_status(cat):
    with pytest.raises(KeyError, match="no-such-build"):
        cat.get_build("no-such-build")
    with pytest.raises(KeyError, match="ghost"):
        cat.finish_build("ghost", "complete")
    _start(cat, "b1")
    with pytest.raises(ValueError, match="status"):
        cat.finish_build("b1", "done")


def test_read_only_catalog(tmp_path):
    path = tmp_path / "cat.duckdb"
    with pytest.raises(FileNotFoundError):
        Catalog(path, read_only=True)
    w = Catalog(path)
    _start(w, "b1")
    r = Catalog(path, read_only=True)
    assert [b["build_id"] for b in r.list_builds()] == ["b1"]
    with pytest.raises(PermissionError):
        r.finish_build("b1", "complete")


def _writer(path: str, name: str, n: int) -> None:
    cat = Catalog(path)
    for i in range(n):
        bid = f"{name}-{i}"
        cat.start_build(bid, name, "src", "h", "v", "", "/o")
        cat.record_shards(bid, "shard", [{"path": f"/o/{bid}", "rows": i, "bytes": 1, "sha256": "x"}])
        cat.add_seen("src", pa.table({"uid": [f"{name}-{i}-{j}" for j in range(50)]}))
        cat.finish_build(bid, "complete", rows_in=i, rows_kept=i, rows_rejected=0)


def test_two_processes_write_one_after_another(tmp_path):
    path = str(tmp_path / "cat.duckdb")
    Catalog(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, name, 15)) for name in ("p1", "p2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    cat = Catalog(path)
    for name in ("p1", "p2"):
        builds = cat.list_builds(name)
        assert len(builds) == 15 and all(b["status"] == "complete" for b in builds)
    assert len(cat.seen_uids("src")) == 2 * 15 * 50
    # neither process left the file locked: a fresh connection from here opens it read-write
    with duckdb.connect(path) as con:
        assert con.execute("SELECT count(*) FROM shards").fetchone()[0] == 30


def test_lock_retry_waits_for_other_process(tmp_path):
    """A process holding the file briefly makes our operation wait, not fail."""
    path = str(tmp_path / "cat.duckdb")
    cat = Catalog(path)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(path, 1.0, ready))
    p.start()
    try:
        assert ready.wait(60)
        t0 = time.perf_counter()
        _start(cat, "b1")
        assert time.perf_counter() - t0 > 0.3
    finally:
        p.join(60)
    assert p.exitcode == 0
    assert cat.get_build("b1")["status"] == "running"

    short = Catalog(path, lock_timeout=0.2)
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(path, 2.0, ready))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(duckdb.IOException, match="lock"):
            short.list_builds()
    finally:
        p.join(60)


def _hold_lock(path: str, seconds: float, ready) -> None:
    with duckdb.connect(path):
        ready.set()
        time.sleep(seconds)
