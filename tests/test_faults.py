"""Resume at input-shard granularity (issue 25): each input shard's stats leave their own marker, and a resumed
build redoes only the shards without one.

The state a kill leaves is made here on purpose (the stats pass of a small corpus finishes its shards all at once,
so a SIGKILL cannot be timed into the middle of it): the pass runs, then two shards lose their marker as if the
kill came before they finished, one of them with a stray file of a batch that was written. The resumed build must
recompute exactly those two, leave the others' files alone and end with the same rows. benchmarks/faults.py kills
a real build (SIGKILL) at 70% of a larger stats pass.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow
ROWS, SHARD_ROWS = 600, 100
STAGES = [{"junk": {}}, {"basic": {"min_side": 32, "max_aspect": 3.0, "min_words": 3}},
          {"dedup": {"near_hamming": 6, "near_crops": False, "semantic": False}}]


def curate_spec(root: Path, rows: int = ROWS, shard_rows: int = SHARD_ROWS, stages=STAGES) -> Path:
    """A synthetic corpus (benchmarks/scale.py's: small JPEGs with planted copies and junk) and a curate spec."""
    from benchmarks.scale import Corpus

    (root / "corpus").mkdir(parents=True)
    pq.write_table(Corpus(0).table(0, rows), root / "corpus" / "part-0.parquet")
    spec = {"dataset": "faults", "source": {"pairs": str(root / "corpus"), "caption_col": "caption"},
            "ingest": {"shard_rows": shard_rows}, "stages": stages, "out": str(root / "builds"),
            "ray": {"num_cpus": 2, "object_store_gb": 0.5}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


def processed(folder, src: int):
    t = pq.ParquetDataset(str(folder.processed_dir / f"input_shard={src}")).read()
    return t.take(pc.sort_indices(t, [("uid", "ascending")]))


def test_a_resumed_stats_pass_redoes_only_the_unfinished_shards(tmp_path, monkeypatch):
    from dataio.verify import verify_build
    from flows.curate import curate_flow
    from flows.engine.context import open_build
    from flows.engine.ingest import ingest_all
    from flows.engine.inputs import prepare_inputs
    from flows.engine.runner import process_stages, ray_session
    from schemas.spec import load_spec

    spec_path = curate_spec(tmp_path)
    spec = load_spec(spec_path)
    ctx = open_build(spec)
    with ray_session(spec):
        ingest_all(ctx, prepare_inputs(ctx))
        first = process_stages(ctx)
    folder = ctx.folder
    shards = sorted(folder.stats_done())
    assert first["rows_resumed"] == 0 and len(shards) == ROWS // SHARD_ROWS

    lost = [1, 4]  # as if killed before these finished; 4 had one batch written
    before = {s: processed(folder, s) for s in lost}
    kept_files = {f.path: f.info().mtime_ns for s in shards if s not in lost
                  for f in (folder.processed_dir / f"input_shard={s}").glob("*.parquet")}
    (folder.processed_dir / "_DONE.json").unlink()
    for s in lost:
        folder.stats_marker(s).unlink()
    for f in (folder.processed_dir / "input_shard=1").glob("*.parquet"):
        f.unlink()
    stray = folder.processed_dir / "input_shard=4" / "part-stray.parquet"
    pq.write_table(before[4].slice(0, 10), stray.path)

    import flows.build

    seen: dict = {}
    real = flows.build.process_stages

    def watched(ctx, compute=True):  # what the resumed stats pass did, seen before the build drops _work/processed
        seen["summary"] = real(ctx, compute)
        seen["redone"] = {s: processed(ctx.folder, s) for s in lost}
        seen["untouched"] = {f.path: f.info().mtime_ns for s in shards if s not in lost
                             for f in (ctx.folder.processed_dir / f"input_shard={s}").glob("*.parquet")}
        return seen["summary"]

    monkeypatch.setattr(flows.build, "process_stages", watched)
    result = curate_flow(str(spec_path), quiet=True)
    assert result["resumed"] and result["build_dir"] == str(folder.root)
    summary = seen["summary"]
    assert summary["rows"] == first["rows"]
    assert summary["rows_resumed"] == first["rows"] - sum(before[s].num_rows for s in lost)
    assert seen["untouched"] == kept_files, "a finished shard's stats were written again"
    for s in lost:
        assert seen["redone"][s].equals(before[s]), f"input shard {s}: other stats after the resume"
    st = result["stats"]
    assert st["rows_listed"] == ROWS == st["rows_kept"] + st["rows_rejected"]
    assert verify_build(result["build_dir"])["ok"]
