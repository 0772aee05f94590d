"""Re-thresholding a finished build equals a fresh build with that threshold; curate filters a corpus in place."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from demo.server import DemoServer
from tests.builds import image_digests, read_parts

pytestmark = pytest.mark.slow


def outcome(build_dir) -> dict:
    kept = {u: None for u in read_parts(build_dir, "shards", ["uid"])["uid"].to_pylist()}
    rej = read_parts(build_dir, "rejects", ["uid", "stage", "reason"])
    return kept | {u: (s, r) for u, s, r in zip(*(rej[c].to_pylist() for c in ("uid", "stage", "reason")))}


def test_refilter_equals_fresh_build(demo, tmp_path):
    import ray

    from catalogs import Catalog
    from flows.build import build_flow
    from flows.refilter import refilter_flow

    overrides = ["basic.min_side=100", "language.min_score=0.5"]
    child = refilter_flow(str(demo["build_dir"]), overrides=overrides, quiet=True)
    assert not ray.is_initialized()  # re-decided on a Ray session of its own, no stage set up, no model loaded
    child_dir = Path(child["build_dir"])
    spec = yaml.safe_load((child_dir / "spec.yaml").read_text())
    assert next(s for s in spec["stages"] if "basic" in s)["basic"]["min_side"] == 100

    fresh_spec = yaml.safe_load(Path(demo["spec"]).read_text())
    for s in fresh_spec["stages"]:
        if "basic" in s:
            s["basic"]["min_side"] = 100
        if "language" in s:
            s["language"]["min_score"] = 0.5
    fresh_spec["out"] = str(tmp_path / "fresh")
    (demo["root"] / "fresh.yaml").write_text(yaml.safe_dump(fresh_spec))
    with DemoServer(demo["corpus"], port=demo["port"]):
        fresh = build_flow(str(demo["root"] / "fresh.yaml"), quiet=True)

    a, b = outcome(child_dir), outcome(fresh["build_dir"])
    assert a == b
    assert sum(v == ("basic", "too_small") for v in a.values()) > sum(
        v == ("basic", "too_small") for v in outcome(demo["build_dir"]).values())  # the new threshold bit
    record = Catalog(Path(demo["build_dir"]).parents[1] / "catalog.duckdb").get_build(child["build_id"])
    lineage = record["lineage"]
    assert any(l["parent_build_id"] == demo["result"]["build_id"] and l["relation"] == "refilter_of" for l in lineage)
    assert [v["stage"] for v in record["stage_versions"]] == [next(iter(s)) for s in spec["stages"]]


def test_refilter_rejects_unknown_params(demo):
    from flows.refilter import child_spec
    from schemas.spec import SpecError

    with pytest.raises(SpecError, match="no parameter 'nope'"):
        child_spec(demo["build_dir"], ["basic.nope=1"])
    with pytest.raises(SpecError, match="no stage 'recaption'"):
        child_spec(demo["build_dir"], ["recaption.n=2"])


def test_curate_parquet_and_webdataset(demo, tmp_path):
    """A Parquet corpus (two files of 25-row row groups, coalesced into shards of up to 60 rows; a row repeated in
    another file) and a WebDataset: every row kept or rejected once, the bytes as they were. A curate killed after
    input preparation (its shards name the corpus pieces) resumes to the same output."""
    from flows.curate import curate_flow

    kept = read_parts(demo["build_dir"], "shards", ["url", "text", "image"]).slice(0, 120)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    bad = pa.table({"url": [None, "http://x.test/a.jpg"], "text": ["a red circle on grass", "a blue star"],
                    "image": [b"not an image at all", None]})
    pq.write_table(kept.slice(0, 70), corpus / "part-0.parquet", row_group_size=25)
    pq.write_table(pa.concat_tables([kept.slice(70), bad.cast(kept.schema), kept.slice(3, 1)]),
                   corpus / "part-1.parquet", row_group_size=25)
    wds = tmp_path / "wds"
    wds.mkdir()
    with tarfile.open(wds / "00000.tar", "w") as tf:
        for i, row in enumerate(kept.slice(0, 30).to_pylist()):
            for ext, data in (("jpg", row["image"]), ("txt", row["text"].encode()),
                              ("json", json.dumps({"url": row["url"]}).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    base = {"dataset": "curated", "stages": [{"junk": {}}, {"basic": {"min_side": 48}}], "out": str(tmp_path / "b"),
            "ray": {"num_cpus": 2, "object_store_gb": 0.5}, "ingest": {"shard_rows": 60}}
    results = {}
    for name, source, listed in (("pq", {"pairs": str(corpus), "caption_col": "text"}, 123),
                                 ("wds", {"pairs": str(wds)}, 30)):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(base | {"dataset": f"curated-{name}", "source": source}))
        r = results[name] = curate_flow(str(spec), quiet=True)
        st = r["stats"]
        assert st["rows_listed"] == listed == st["rows_kept"] + st["rows_rejected"]
        out = outcome(r["build_dir"])
        assert len(out) == listed
        if name == "pq":
            assert st["rows_kept"] == 120  # these rows were kept by the build they came from
            assert sorted(v for v in out.values() if v) == [("basic", "undecodable"), ("input", "duplicate_input_row"),
                                                             ("input", "missing_image")]
            img = read_parts(r["build_dir"], "shards", ["image"])["image"].to_pylist()
            assert set(img) <= set(kept["image"].to_pylist())  # bytes kept as they were, not re-encoded
        else:
            assert st["rows_kept"] == 30
            urls = set(read_parts(r["build_dir"], "shards", ["url"])["url"].to_pylist())
            assert urls == set(kept.slice(0, 30)["url"].to_pylist())

    spec = tmp_path / "killed.yaml"
    spec.write_text(yaml.safe_dump(base | {"dataset": "curated-pq", "out": str(tmp_path / "killed"),
                                           "source": {"pairs": str(corpus), "caption_col": "text"}}))
    cmd = [sys.executable, "-m", "flows.cli", "curate", str(spec), "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list(
            (tmp_path / "killed").glob("curated-pq/*/_work/input/_DONE.json")):
        time.sleep(0.1)
    assert proc.poll() is None, "the curate finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    build_dir = next(p for p in (tmp_path / "killed" / "curated-pq").iterdir() if p.is_dir())
    summary = json.loads((build_dir / "_work" / "input" / "_DONE.json").read_text())
    assert summary["shards"] == 3 and not (build_dir / "manifest.json").exists()  # row groups 25+25 | 20+25 | 25+3
    pairs = sorted((build_dir / "_work" / "ingest").glob("[0-9]*[0-9].parquet"))
    assert len(pairs) == 3 and not any("image" in pq.read_schema(f).names for f in pairs)  # no copy of the bytes
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (build_dir / "manifest.json").exists()  # the same build, resumed
    assert outcome(build_dir) == outcome(results["pq"]["build_dir"])
    assert image_digests(build_dir) == image_digests(results["pq"]["build_dir"])
