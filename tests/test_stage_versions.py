"""A stage's `version` is part of a build's resume key (stats made by another version are never reused) and of the
catalog's record of the build (tests/test_build.py checks it on the real demo build)."""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from catalogs import Catalog, format_build
from flows.engine.context import open_build
from schemas.spec import parse_spec
from stages.blur import BlurStage


def _spec(tmp_path):
    pq.write_table(pa.table({"url": ["http://x.test/1.jpg"], "caption": ["a red circle"]}), tmp_path / "urls.parquet")
    return parse_spec({"dataset": "versions", "source": {"urls": "urls.parquet"}, "out": "builds",
                       "stages": [{"basic": {}}, {"blur": {}}]}, tmp_path)


def test_a_new_stage_version_starts_a_new_build(tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    assert spec.stage_versions() == {"basic": 1, "blur": BlurStage.version}
    first = open_build(spec)  # unfinished: the next run of the same spec resumes it
    assert first.state()["stage_versions"] == {"basic": 1, "blur": BlurStage.version}
    again = open_build(spec)
    assert again.resumed and again.build_id == first.build_id
    monkeypatch.setattr(BlurStage, "version", BlurStage.version + 1)  # blur's output changed
    bumped = open_build(spec)
    assert not bumped.resumed and bumped.build_id != first.build_id
    assert bumped.state()["stage_versions"]["blur"] == BlurStage.version
    assert spec.spec_hash() == bumped.state()["spec_hash"] == first.state()["spec_hash"]  # the spec is the same
    monkeypatch.undo()
    assert open_build(spec).build_id == first.build_id  # the old version's build is still there to resume


def test_catalog_records_stage_versions(tmp_path):
    path = tmp_path / "catalog.duckdb"
    with duckdb.connect(str(path)) as con:  # a catalog written before stage versions were recorded
        con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    cat = Catalog(path)
    cat.start_build("b1", "ds", "src", "h", "v", "spec: 1", tmp_path)
    assert cat.get_build("b1")["stage_versions"] == []
    cat.record_stage_versions("b1", {"clean": 1, "blur": 3, "basic": 2})
    cat.record_stage_versions("b1", {"clean": 1, "blur": 4, "basic": 2})  # replaced, not added
    got = cat.get_build("b1")["stage_versions"]
    assert got == [{"stage": "clean", "version": 1}, {"stage": "blur", "version": 4},
                   {"stage": "basic", "version": 2}]
    text = format_build(cat.get_build("b1"))
    assert "stage versions" in text and any(line.split() == ["blur", "4"] for line in text.splitlines())
