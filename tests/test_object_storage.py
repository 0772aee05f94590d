"""Builds, refilter, export, loaders and show with `out:` and the source in object storage: a real S3 API (moto in
server mode on 127.0.0.1), real Ray, real DuckDB. The catalog stays a local file beside the spec."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from demo.server import DemoServer
from tests.builds import make_demo
from tests.object_storage import object_keys, s3_fault_proxy

N = 40
STAGES = [{"clean": {}}, {"junk": {}}, {"basic": {"min_side": 48, "max_aspect": 3.0, "min_words": 3,
                                                  "min_chars": 6}}, {"dedup": {"near_hamming": 6, "semantic": False}}]


def outcome(table) -> dict:
    """uid -> None (kept) or (stage, reason)."""
    return {u: (s, r) if s is not None else None
            for u, s, r in zip(*(table[c].to_pylist() for c in ("uid", "stage", "reason")))}


def read_build(build_dir: str, sub: str, columns: list[str]):
    from dataio.storage import location, parquet_dataset

    return parquet_dataset((location(build_dir) / sub).glob("part-*.parquet")).to_table(columns=columns)


def build_outcome(build_dir: str) -> dict:
    kept = read_build(build_dir, "shards", ["uid"])
    rejected = read_build(build_dir, "rejects", ["uid", "stage", "reason"])
    return {u: None for u in kept["uid"].to_pylist()} | outcome(rejected)


@pytest.fixture(scope="module")
def s3_build(s3_bucket, tmp_path_factory):
    """A URL-list build whose list is read from S3 and whose outputs go to s3://<bucket>/builds."""
    import boto3

    from flows.build import build_flow

    root = tmp_path_factory.mktemp("s3build")
    d = make_demo(root, 200, ingest={"shard_rows": 10}, stages=STAGES, out=f"s3://{s3_bucket}/builds",
                  decide={"driver_max_rows": 0})  # global decisions as Ray tasks with shuffles, as at scale
    urls = pq.read_table(d["corpus"] / "urls.parquet")
    pq.write_table(urls.take(list(range(0, urls.num_rows, urls.num_rows // N))[:N]), root / "urls.parquet")
    urls_key = "sources/urls.parquet"  # every 5th row of the demo list (the smallest demo corpus is 200 rows)
    boto3.client("s3").upload_file(str(root / "urls.parquet"), s3_bucket, urls_key)
    spec = yaml.safe_load(d["spec"].read_text())
    spec["source"]["urls"] = f"s3://{s3_bucket}/{urls_key}"
    d["spec"].write_text(yaml.safe_dump(spec, sort_keys=False))
    with DemoServer(d["corpus"], port=d["port"]):
        result = build_flow(str(d["spec"]), quiet=True)
    return d | {"result": result, "build_dir": result["build_dir"], "bucket": s3_bucket}


@pytest.mark.slow
def test_build_writes_its_outputs_to_object_storage(s3_build):
    from catalogs import Catalog
    from dataio.storage import location

    bucket, build_dir = s3_build["bucket"], s3_build["build_dir"]
    build_id = s3_build["result"]["build_id"]
    assert build_dir == f"s3://{bucket}/builds/demo-scenes/{build_id}"
    keys = object_keys(bucket, f"builds/demo-scenes/{build_id}/")
    names = {k.split(f"{build_id}/", 1)[1] for k in keys}
    for name in ("manifest.json", "stats.json", "spec.yaml", "report.html", "README.md", "_work/state.json"):
        assert name in names, sorted(names)
    shard_keys = [n for n in names if n.startswith("shards/part-")]
    reject_keys = [n for n in names if n.startswith("rejects/part-")]
    assert shard_keys and reject_keys
    assert not any(n.startswith("_work/processed/") for n in names)  # dropped once the build finished

    manifest = json.loads((location(build_dir) / "manifest.json").read_text())
    stats = json.loads((location(build_dir) / "stats.json").read_text())
    kept = read_build(build_dir, "shards", ["uid"]).num_rows
    rejected = read_build(build_dir, "rejects", ["uid"]).num_rows
    assert stats["rows_listed"] == N and kept + rejected == N
    assert manifest["rows"] == kept > 0 and manifest["rejected_rows"] == rejected
    assert {f["path"] for f in manifest["shards"]} == set(shard_keys)  # relative to the build

    assert not (Path(s3_build["root"]) / "builds").exists()  # nothing of the build landed on local disk
    catalog = Path(s3_build["root"]) / "catalog.duckdb"  # the default for a remote `out`: beside the spec
    row = Catalog(catalog, read_only=True).get_build(build_id)
    assert row["status"] == "complete" and row["out_dir"] == build_dir
    shard_paths = [s["path"] for s in row["shards"] if s["kind"] == "shard"]
    assert sorted(shard_paths) == sorted(f"{build_dir}/{k}" for k in shard_keys)
    assert sum(s["rows"] for s in row["shards"] if s["kind"] == "shard") == kept
    assert (Path(s3_build["root"]) / "catalog.duckdb.demo-scenes.lock").exists()  # the dataset lock, local too


@pytest.mark.slow
def test_refilter_in_object_storage_equals_a_fresh_local_build(s3_build, tmp_path):
    from flows.build import build_flow
    from flows.refilter import refilter_flow

    child = refilter_flow(s3_build["build_dir"], overrides=["basic.min_side=100"], quiet=True)
    assert child["build_dir"].startswith(f"s3://{s3_build['bucket']}/builds/demo-scenes/")

    spec = yaml.safe_load(Path(s3_build["spec"]).read_text())
    next(s for s in spec["stages"] if "basic" in s)["basic"]["min_side"] = 100
    spec.pop("decide")  # decided in the driver here: the distributed decisions must agree
    spec["out"] = str(tmp_path / "fresh")
    spec["catalog"] = str(tmp_path / "fresh" / "catalog.duckdb")
    fresh_spec = Path(s3_build["root"]) / "fresh.yaml"
    fresh_spec.write_text(yaml.safe_dump(spec))
    with DemoServer(s3_build["corpus"], port=s3_build["port"]):
        fresh = build_flow(str(fresh_spec), quiet=True)

    a, b = build_outcome(child["build_dir"]), build_outcome(fresh["build_dir"])
    assert len(a) == N and a == b
    assert sum(v == ("basic", "too_small") for v in a.values()) > sum(
        v == ("basic", "too_small") for v in build_outcome(s3_build["build_dir"]).values())


@pytest.mark.slow
def test_export_loader_and_show_read_shards_from_object_storage(s3_build, tmp_path):
    from loaders.export import export_uids, export_webdataset, uids_from_array
    from loaders.pairs import ShardPairs, resolve_shards
    from reporting.show import show_record
    from dataio.storage import location

    build_dir = s3_build["build_dir"]
    kept = set(read_build(build_dir, "shards", ["uid"])["uid"].to_pylist())

    summary = export_webdataset(build_dir, tmp_path / "wds", samples_per_tar=16)
    assert summary["samples"] == len(kept) and all(s.startswith("s3://") for s in summary["source_shards"])
    assert (tmp_path / "wds" / "00000.tar").is_file()
    remote = export_webdataset(build_dir, f"s3://{s3_build['bucket']}/exports/wds", samples_per_tar=16)
    keys = [k for k in object_keys(s3_build["bucket"], "exports/wds/") if not k.endswith("/")]  # no folder markers
    assert keys == sorted([f"exports/wds/{t}" for t in remote["tars"]] + ["exports/wds/_export.json"]
                          + [f"exports/wds/{i:05d}_stats.json" for i in range(len(remote["tars"]))])
    first = location(f"s3://{s3_build['bucket']}/exports/wds/00000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(first)) as tf:
        assert len([m for m in tf.getmembers() if m.name.endswith(".txt")]) == min(16, len(kept))

    npy = f"s3://{s3_build['bucket']}/exports/kept.npy"
    assert export_uids(build_dir, npy)["uids"] == len(kept)
    assert set(uids_from_array(np.load(io.BytesIO(location(npy).read_bytes())))) == kept

    files = resolve_shards([f"{build_dir}/shards/part-*.parquet"])
    assert files == resolve_shards([f"{build_dir}/shards"]) and all(str(f).startswith("s3://") for f in files)
    rows = list(ShardPairs(files, epochs=1, shuffle=False, decode=False, rank=0, world_size=1))
    assert {r["uid"] for r in rows} == kept and all(isinstance(r["image"], bytes) for r in rows)

    rejected = read_build(build_dir, "rejects", ["uid", "stage", "reason"]).to_pylist()[0]
    rec = show_record(build_dir, rejected["uid"])
    assert rec["status"] == "rejected" and rec["file"].startswith("rejects/part-")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_curate_a_corpus_in_object_storage(s3_build, tmp_path, kind):
    import boto3

    from flows.curate import curate_flow

    bucket = s3_build["bucket"]
    corpus = read_build(s3_build["build_dir"], "shards", ["url", "text", "image"])
    if kind == "parquet":
        local = tmp_path / "part-0.parquet"
        pq.write_table(corpus, local)
    else:  # img2dataset's layout: KEY.jpg, KEY.txt, KEY.json
        local = tmp_path / "00000.tar"
        with tarfile.open(local, "w") as tf:
            for i, row in enumerate(corpus.to_pylist()):
                for ext, data in (("jpg", row["image"]), ("txt", row["text"].encode()),
                                  ("json", json.dumps({"url": row["url"]}).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    boto3.client("s3").upload_file(str(local), bucket, f"corpus-{kind}/{local.name}")
    spec = {"dataset": f"curated-{kind}", "out": f"s3://{bucket}/curated", "stages": STAGES[2:],
            "source": {"pairs": f"s3://{bucket}/corpus-{kind}", "caption_col": "text"},
            "ray": {"num_cpus": 2, "object_store_gb": 1}}
    spec_path = tmp_path / "curate.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = curate_flow(str(spec_path), quiet=True)
    assert result["build_dir"].startswith(f"s3://{bucket}/curated/curated-{kind}/")
    out = build_outcome(result["build_dir"])
    assert len(out) == corpus.num_rows and sum(v is None for v in out.values()) == result["stats"]["rows_kept"] > 0


def test_bad_storage_locations_get_clear_errors(s3_bucket, tmp_path):
    from schemas.spec import SpecError, parse_spec

    (tmp_path / "u.csv").write_text("url,caption\nhttp://x.test/a.jpg,a cat\n")
    base = {"dataset": "d", "source": {"urls": "u.csv"}}
    with pytest.raises(SpecError, match="must be a local DuckDB file.* catalog"):
        parse_spec(base | {"out": f"s3://{s3_bucket}/b", "catalog": f"s3://{s3_bucket}/c.duckdb"}, tmp_path)
    with pytest.raises(SpecError, match="query options .* AWS_"):
        parse_spec(base | {"out": f"s3://{s3_bucket}/b?endpoint_override=127.0.0.1:1"}, tmp_path)
    with pytest.raises(SpecError, match="source file not found: s3://.*source.urls"):
        parse_spec(base | {"source": {"urls": f"s3://{s3_bucket}/missing.csv"}}, tmp_path)
    spec = parse_spec(base | {"out": f"s3://{s3_bucket}/b"}, tmp_path)
    assert spec.out == f"s3://{s3_bucket}/b" and spec.catalog == (tmp_path / "catalog.duckdb").resolve()


def test_locations_write_whole_list_and_pickle_the_same_locally_and_in_s3(s3_bucket, tmp_path):
    import pickle

    import pyarrow as pa

    from dataio.storage import StorageError, location, write_table_whole

    for root in (location(tmp_path / "store"), location(f"s3://{s3_bucket}/store")):
        table = pa.table({"uid": ["a", "b", "c"]})
        info = write_table_whole(table, root / "t" / "part-1.parquet", checksum=True)
        assert info["rows"] == 3 and info["bytes"] == (root / "t" / "part-1.parquet").size()
        assert len(info["sha256"]) == 64 and info["path"] == str(root / "t" / "part-1.parquet")
        (root / "t" / "_DONE.json").write_text('{"ok": 1}')
        assert [f.name for f in (root / "t").glob("part-*.parquet")] == ["part-1.parquet"]
        assert [d.name for d in root.subdirs()] == ["t"]
        assert (root / "t" / "part-1.parquet").read_table().equals(table)
        assert not [f for f in (root / "t").rglob("*") if f.name.endswith(".tmp")]  # no temporary left behind
        again = pickle.loads(pickle.dumps(root / "t"))
        assert again == root / "t" and again.glob("_DONE.json")
        (root / "t").rmtree()
        assert not (root / "t").exists() and (root / "t").glob("*") == []
    assert str(location(f"s3://{s3_bucket}/store/x")) == f"s3://{s3_bucket}/store/x"
    with pytest.raises(StorageError, match="AWS_"):
        location(f"s3://{s3_bucket}/x?endpoint_override=127.0.0.1:1")


# ----------------------------------------------------------------------------- a flaky object store (issue 25)

def test_retries_are_pairforges_and_travel_with_the_filesystem(s3_bucket, monkeypatch):
    import pickle

    import pyarrow.fs as pafs

    from dataio.storage import S3_MAX_ATTEMPTS, RetryingS3FileSystem, StorageError, location

    fs = location(f"s3://{s3_bucket}/x").fs
    assert isinstance(fs, RetryingS3FileSystem) and S3_MAX_ATTEMPTS >= 5
    again = pickle.loads(pickle.dumps(fs))  # as Ray Data ships filesystem= to its workers
    assert isinstance(again, RetryingS3FileSystem) and again.options == fs.options
    assert isinstance(location("/tmp").fs, pafs.LocalFileSystem)
    monkeypatch.setenv("PAIRFORGE_S3_MAX_ATTEMPTS", "many")
    with pytest.raises(StorageError, match="PAIRFORGE_S3_MAX_ATTEMPTS='many'"):
        location(f"s3://{s3_bucket}/x")


def test_a_flaky_store_is_retried_and_an_upload_cut_off_leaves_no_object(s3_bucket, monkeypatch):
    """Reads, listings and uploads finish through 503 SlowDown, resets, cut bodies and delays; an upload whose part
    keeps failing raises and publishes nothing, small (one PUT) or large (multipart)."""
    import os

    import boto3
    import pyarrow as pa

    from dataio.storage import location, write_table_whole
    from tests.object_storage import s3_fault_proxy

    direct = boto3.client("s3")  # to moto, past the proxy
    rates = {"slowdown": 0.1, "reset": 0.1, "cut": 0.1, "delay": 0.05}
    with s3_fault_proxy(rates, delay_s=0.2, seed=3) as proxy:
        root = location(f"s3://{s3_bucket}/flaky")
        blobs = {f"b{i}": os.urandom(2000 + i) for i in range(20)}
        for name, data in blobs.items():
            (root / name).write_bytes(data)
        assert {f.name for f in root.glob("b*")} == set(blobs)
        assert all((root / name).read_bytes() == data for name, data in blobs.items())
        t = pa.table({"uid": [f"{i:032x}" for i in range(5000)]})
        info = write_table_whole(t, root / "t.parquet", checksum=True)
        assert (root / "t.parquet").read_table().equals(t) and (root / "t.parquet").sha256() == info["sha256"]
        assert all(proxy.faults[k] for k in proxy.KINDS), proxy.faults

        monkeypatch.setenv("PAIRFORGE_S3_MAX_ATTEMPTS", "3")
        proxy.rates = {}
        big = os.urandom(12 << 20)  # past pyarrow's multipart part size
        proxy.fail_when = lambda method, path: method == "PUT" and "partNumber=2" in path
        with pytest.raises(OSError, match="big.bin"):
            location(f"s3://{s3_bucket}/flaky/big.bin").write_bytes(big)
        proxy.fail_when = lambda method, path: method == "PUT"
        with pytest.raises(OSError, match="small.bin"):
            location(f"s3://{s3_bucket}/flaky/small.bin").write_bytes(b"x" * 1000)
    keys = set(object_keys(s3_bucket, "flaky/"))
    assert "flaky/big.bin" not in keys and "flaky/small.bin" not in keys, keys
    # a small object is one PUT: nothing is left; a multipart upload that failed stays open (never an object: a
    # bucket lifecycle rule aborts it; pyarrow offers no abort)
    open_uploads = {u["Key"] for u in direct.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])}
    assert open_uploads <= {"flaky/big.bin"}, open_uploads


FLAKY = {"slowdown": 0.03, "reset": 0.02, "cut": 0.02, "delay": 0.02}  # of every request to the store


@pytest.mark.slow
def test_build_refilter_export_and_verify_through_a_flaky_store(s3_build):
    """Through 503 SlowDown, resets, cut bodies and delays on a fraction of all requests (the driver's and the Ray
    workers'), a build, a refilter, an export and verify finish; the build's outcome is the fault-free build's."""
    from dataio.verify import verify_build
    from flows.build import build_flow
    from flows.refilter import refilter_flow
    from loaders.export import export_webdataset

    bucket = s3_build["bucket"]
    with s3_fault_proxy(FLAKY, delay_s=0.3, seed=7) as proxy:
        with DemoServer(s3_build["corpus"], port=s3_build["port"]):
            built = build_flow(str(s3_build["spec"]), new=True, quiet=True)
        child = refilter_flow(built["build_dir"], overrides=["basic.min_side=100"], quiet=True)
        exported = export_webdataset(built["build_dir"], f"s3://{bucket}/exports/flaky", samples_per_tar=16)
        checks = [verify_build(b) for b in (built["build_dir"], child["build_dir"])]
        faults = dict(proxy.faults)
    assert all(faults.values()), f"every kind of fault was injected: {faults}"
    assert all(c["ok"] for c in checks), [c["problems"] for c in checks]
    assert built["build_dir"] != s3_build["build_dir"]
    parent = build_outcome(built["build_dir"])
    assert parent == build_outcome(s3_build["build_dir"]) and len(parent) == N
    kept = {u for u, v in parent.items() if v is None}
    assert exported["samples"] == len(kept) > 0
    refiltered = build_outcome(child["build_dir"])
    assert refiltered.keys() == parent.keys()
    changed = [u for u in parent if refiltered[u] != parent[u]]  # newly too small, or another copy survives dedup
    assert changed and all(refiltered[u] == ("basic", "too_small") or (parent[u] or ("",))[0] == "dedup"
                           for u in changed), [(parent[u], refiltered[u]) for u in changed]


@pytest.mark.slow
def test_an_outage_fails_the_build_clearly_and_it_resumes(s3_build, monkeypatch):
    """The store answers only 503 SlowDown from the moment the stats pass is done: the build fails once its
    retries are spent, naming the object storage error; run again after the outage, it resumes past the finished
    phases and ends with the fault-free outcome."""
    import threading

    import boto3

    from dataio.verify import verify_build
    from flows.build import build_flow

    monkeypatch.setenv("PAIRFORGE_S3_MAX_ATTEMPTS", "3")  # fail fast once the outage starts (forwarded to workers)
    direct = boto3.client("s3")  # to the store, past the proxy: what the watcher sees
    bucket = s3_build["bucket"]
    def builds() -> dict[str, list[str]]:
        keys = [o["Key"] for page in direct.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="builds/demo-scenes/") for o in page.get("Contents", [])]
        out: dict[str, list[str]] = {}
        for k in keys:
            out.setdefault("/".join(k.split("/")[:3]), []).append(k)
        return out

    known = set(builds())  # earlier tests' builds (a refilter child keeps its _work)
    with s3_fault_proxy({}) as proxy, DemoServer(s3_build["corpus"], port=s3_build["port"]):
        stop = threading.Event()

        def outage_after_stats():
            while not stop.wait(0.2):
                if any(k.endswith("_work/processed/_DONE.json") for b, ks in builds().items() if b not in known
                       for k in ks):
                    proxy.fail_all = True
                    return

        watcher = threading.Thread(target=outage_after_stats, daemon=True)
        watcher.start()
        try:
            with pytest.raises(Exception) as failed:
                build_flow(str(s3_build["spec"]), new=True, quiet=True)
        finally:
            stop.set()
            watcher.join(5)
        assert proxy.fail_all, "the outage never started"
        message = str(failed.value)  # the store's answer (a HEAD's 503 has no body to name SlowDown)
        assert any(m in message for m in ("SlowDown", "SLOW_DOWN", "HTTP status 503")), message[-2000:]
        proxy.fail_all = False
        resumed = build_flow(str(s3_build["spec"]), quiet=True)
    assert resumed["resumed"]
    assert build_outcome(resumed["build_dir"]) == build_outcome(s3_build["build_dir"])
    assert verify_build(resumed["build_dir"])["ok"]
