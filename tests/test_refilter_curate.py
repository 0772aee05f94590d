"""Re-thresholding a finished build equals a fresh build with that threshold; curate filters a corpus in place."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from demo.server import DemoServer
from tests.builds import read_parts

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
    from flows.curate import curate_flow

    kept = read_parts(demo["build_dir"], "shards", ["url", "text", "image"]).slice(0, 120)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    bad = pa.table({"url": [None, "http://x.test/a.jpg"], "text": ["a red circle on grass", "a blue star"],
                    "image": [b"not an image at all", None]})
    pq.write_table(pa.concat_tables([kept, bad.cast(kept.schema)]), corpus / "part-0.parquet")
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
            "ray": {"num_cpus": 2, "object_store_gb": 0.5}}
    for name, source, listed in (("pq", {"pairs": str(corpus), "caption_col": "text"}, 122),
                                 ("wds", {"pairs": str(wds)}, 30)):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(base | {"dataset": f"curated-{name}", "source": source}))
        r = curate_flow(str(spec), quiet=True)
        st = r["stats"]
        assert st["rows_listed"] == listed == st["rows_kept"] + st["rows_rejected"]
        out = outcome(r["build_dir"])
        assert len(out) == listed
        if name == "pq":
            assert st["rows_kept"] == 120  # these rows were kept by the build they came from
            assert sorted(v for v in out.values() if v) == [("basic", "undecodable"), ("input", "missing_image")]
            img = read_parts(r["build_dir"], "shards", ["image"])["image"].to_pylist()
            assert set(img) <= set(kept["image"].to_pylist())  # bytes kept as they were, not re-encoded
        else:
            assert st["rows_kept"] == 30
            urls = set(read_parts(r["build_dir"], "shards", ["url"])["url"].to_pylist())
            assert urls == set(kept.slice(0, 30)["url"].to_pylist())
