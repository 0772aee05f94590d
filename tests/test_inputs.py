"""Input preparation streams: a URL list read in small batches, keyed and checked for repeats by Ray tasks, gives
the same uids, shards and rejects as the whole list in one table; the reader never holds more than a batch."""
from __future__ import annotations

import csv
import inspect
import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from schemas.records import make_uid
from schemas.spec import SourceSpec, parse_spec
from dataio.sources import iter_corpus, iter_url_list, read_url_list
from dataio.uids import assign_uids, corpus_pairs, shard_pairs

ROWS = [  # (url, caption): repeats far apart (across batches and buckets), refused URLs, blanks
    (f"http://img{i % 23}.example/{i % 17}.jpg", f"caption {i % 5}") for i in range(120)
] + [("http://IMG1.example/1.jpg#frag", "caption 1"), ("ftp://img.example/x.jpg", "ftp"),
     ("ftp://img.example/x.jpg", "ftp"), ("", "no url"), ("  ", "no url"), ("http://[::1", "bad"),
     ("http://late.example/a.jpg", "late"), ("http://late.example/a.jpg", "late")]


def write_csv(path, rows, extra_lines=()):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows(rows)
        for line in extra_lines:
            f.write(line + "\n")
    return path


def build_ctx(root, name, urls=None, pairs=None, shard_rows=10, **extra):
    from flows.engine.context import open_build

    source = {"urls": str(urls)} if urls else {"pairs": str(pairs)}
    spec = parse_spec({"dataset": name, "source": source, "out": "builds", "stages": [],
                       "ingest": {"shard_rows": shard_rows}, **extra}, root)
    return open_build(spec)


def prepared(ctx, **kw) -> tuple[list[pa.Table], pa.Table, dict]:
    from flows.engine.inputs import prepare_inputs

    summary = prepare_inputs(ctx, **kw)
    shards = [pq.read_table(ctx.folder.input_shard(i)) for i in range(summary["shards"])]
    return shards, pq.read_table(ctx.folder.input_rejects), summary


def by_uid(t: pa.Table) -> list[dict]:
    return sorted(t.to_pylist(), key=lambda r: r["uid"])


def test_reader_is_a_generator_of_bounded_batches(tmp_path):
    bad = ["a,b,c", "only-one-field"]
    p = write_csv(tmp_path / "l.csv", ROWS, bad)
    jl = tmp_path / "l.jsonl"
    jl.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in ROWS) + "not json\n[1]\n")
    pq.write_table(pa.table({"url": [u for u, _ in ROWS], "caption": [c for _, c in ROWS]}), tmp_path / "l.parquet")
    for path, malformed in ((p, 2), (jl, 2), (tmp_path / "l.parquet", 0)):
        src = SourceSpec(urls=path)
        batches = iter_url_list(src, batch_rows=7)
        assert inspect.isgenerator(batches)  # rows come a batch at a time, never the whole list
        sizes = [t.num_rows for t in batches]
        assert max(sizes) <= 7 and sum(sizes) == len(ROWS) + malformed, (path, sizes)
        assert pa.Table.from_batches([b for t in iter_url_list(src, batch_rows=7) for b in t.to_batches()]).equals(
            read_url_list(src))  # batching changes nothing: malformed rows last, in the same order


def test_many_batches_give_the_same_uids_shards_and_rejects_as_one(tmp_path, local_ray):
    p = write_csv(tmp_path / "l.csv", ROWS, ["a,b,c"])
    small_shards, small_rej, small = prepared(build_ctx(tmp_path, "small", p), batch_rows=7, buckets=3)
    one_shards, one_rej, one = prepared(build_ctx(tmp_path, "one", p), batch_rows=10**6, buckets=1)
    assert [s.to_pylist() for s in small_shards] == [s.to_pylist() for s in one_shards]
    assert by_uid(small_rej) == by_uid(one_rej)
    assert {k: v for k, v in small.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}

    # the same as the whole list in one table
    inputs, rejects = assign_uids(read_url_list(SourceSpec(urls=p)), "l")
    assert pa.concat_tables(small_shards).to_pylist() == inputs.to_pylist()
    assert by_uid(small_rej) == by_uid(rejects)
    assert [s.num_rows for s in small_shards[:-1]] == [10] * (len(small_shards) - 1)
    assert small["rows_listed"] == len(ROWS) + 1 == small["rows"] + small["rejected"]

    # repeats across batch boundaries: the first listing is kept, every later one rejected with its occurrence
    kept = {(r["url"], r["text"]): r["uid"] for r in inputs.to_pylist()}
    assert kept[("http://img1.example/1.jpg", "caption 1")] == make_uid("http://img1.example/1.jpg", "caption 1")
    dups = [r for r in small_rej.to_pylist() if r["reason"] == "duplicate_input_row"]
    frag = next(r for r in dups if r["url"] == "http://IMG1.example/1.jpg#frag")  # row 120, repeats row 70
    key = make_uid("http://img1.example/1.jpg", "caption 1")
    earlier = sum(1 for u, c in ROWS[:120] if (u, c) == ("http://img1.example/1.jpg", "caption 1"))
    assert frag["uid"] == make_uid("http://IMG1.example/1.jpg#frag", "caption 1", earlier)
    assert frag["detail"] == f"repeat {earlier} of {key}"
    late = [r for r in small_rej.to_pylist() if r["url"] == "http://late.example/a.jpg"]
    assert [r["reason"] for r in late] == ["duplicate_input_row"] and kept[("http://late.example/a.jpg", "late")]
    ftp = [r for r in small_rej.to_pylist() if r["url"] == "ftp://img.example/x.jpg"]
    assert [r["reason"] for r in ftp] == ["bad_scheme", "bad_scheme"] and len({r["uid"] for r in ftp}) == 2
    uids = [u for s in small_shards for u in s["uid"].to_pylist()] + small_rej["uid"].to_pylist()
    assert len(uids) == len(set(uids)) == small["rows_listed"]


def test_a_killed_prepare_starts_again_and_makes_the_same_shards(tmp_path, local_ray):
    p = write_csv(tmp_path / "l.csv", ROWS)
    ctx = build_ctx(tmp_path, "again", p)
    first_shards, first_rej, _ = prepared(ctx, batch_rows=9, buckets=2)
    work = ctx.folder.work
    (work / "input" / "_DONE.json").unlink()  # as if killed before the marker, leftovers in place
    (work / "input_prep" / "keyed").mkdir(parents=True)
    pq.write_table(pa.table({"row": [0]}), work / "input_prep" / "keyed" / "000000.parquet")
    shards, rej, _ = prepared(ctx, batch_rows=5, buckets=4)
    assert [s.to_pylist() for s in shards] == [s.to_pylist() for s in first_shards]
    assert by_uid(rej) == by_uid(first_rej)
    assert not (work / "input_prep").exists()  # scratch removed once the shards are written


def test_incremental_drops_seen_uids_a_batch_at_a_time(tmp_path, local_ray):
    from catalogs import Catalog

    p = write_csv(tmp_path / "l.csv", ROWS)
    inputs, _ = assign_uids(read_url_list(SourceSpec(urls=p)), "l")
    seen = inputs.slice(3, 12).column("uid")
    (tmp_path / "builds").mkdir()
    Catalog(tmp_path / "builds" / "catalog.duckdb").add_seen("l", pa.table({"uid": seen}))
    shards, rej, summary = prepared(build_ctx(tmp_path, "incr", p, incremental=True), batch_rows=7, buckets=2)
    skipped = rej.filter(pa.compute.equal(rej["reason"], "seen_in_earlier_build"))
    assert sorted(skipped["uid"].to_pylist()) == sorted(seen.to_pylist())
    assert pa.concat_tables(shards)["uid"].to_pylist() == [u for u in inputs["uid"].to_pylist()
                                                            if u not in set(seen.to_pylist())]
    assert summary["rows"] + summary["rejected"] == summary["rows_listed"]


def _jpeg(color: str) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(b, "JPEG")
    return b.getvalue()


def test_corpus_repeats_across_batches_keep_the_first(tmp_path, local_ray):
    red, blue = _jpeg("red"), _jpeg("blue")
    rows = [(f"http://c.example/{i % 6}.jpg", "same", red) for i in range(14)] + [
        (None, "no url", blue), (None, "no url", blue), ("http://c.example/x.jpg", "no image", None)]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows],
                             "image": pa.array([r[2] for r in rows], pa.binary())}), corpus)
    ctx = build_ctx(tmp_path, "curate", pairs=corpus, shard_rows=4)
    shards, rej, summary = prepared(ctx, buckets=3)
    assert summary["shards"] == 5 and summary["rows_listed"] == len(rows)
    whole = pa.concat_tables(list(iter_corpus(SourceSpec(pairs=corpus), batch_rows=1000)))
    inputs, pairs, rejects = corpus_pairs(whole, "corpus")
    assert pa.concat_tables(shards).to_pylist() == inputs.to_pylist()
    assert by_uid(rej) == by_uid(rejects)
    assert sorted(r["reason"] for r in rej.to_pylist()) == ["duplicate_input_row"] * 9 + ["missing_image"]
    # the ingest shards hold no image bytes: they name the corpus pieces that do, and each pair's row among them
    assert all("image" not in pq.read_schema(ctx.folder.ingest_shard(i).pairs).names for i in range(5))
    ingest = [t for i in range(5) for t in shard_pairs(ctx.spec.source, ctx.folder.ingest_shard(i).pairs)]
    assert pa.concat_tables(ingest).select(pairs.column_names).equals(pairs)
    assert all(ctx.folder.ingest_shard(i).done.exists() for i in range(5))
    shutil.rmtree(ctx.folder.root)


def test_jsonl_blocks_of_different_value_types_read_as_one_list(tmp_path, monkeypatch):
    import dataio.sources as sources

    monkeypatch.setattr(sources, "JSONL_BLOCK_BYTES", 40)  # a block or two of lines each
    p = tmp_path / "l.jsonl"
    lines = [{"url": None, "caption": None}, {"url": "http://a.example/1.jpg", "caption": 7},
             {"url": "http://a.example/2.jpg", "caption": {"k": [1]}}, "not json", {"url": "http://b.example/x"}]
    p.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    got = pa.Table.from_batches([b for t in iter_url_list(SourceSpec(urls=p), batch_rows=2) for b in t.to_batches()])
    assert got.column("url").to_pylist() == [None, "http://a.example/1.jpg", "http://a.example/2.jpg",
                                             "http://b.example/x", None]
    assert got.column("text").to_pylist() == [None, "7", '{"k": [1]}', None, "not json"]
    assert got.column("malformed").to_pylist()[-1].startswith("line 4: not JSON")


def test_empty_and_all_malformed_lists(tmp_path, local_ray):
    empty = write_csv(tmp_path / "empty.csv", [])
    shards, rej, summary = prepared(build_ctx(tmp_path, "empty", empty), batch_rows=4, buckets=2)
    assert (shards, rej.num_rows, summary["rows_listed"]) == ([], 0, 0)
    bad = write_csv(tmp_path / "bad.csv", [], [f"a,b,{i}" for i in range(9)])
    shards, rej, summary = prepared(build_ctx(tmp_path, "bad", bad), batch_rows=4, buckets=2)
    assert shards == [] and summary["rejected"] == rej.num_rows == 9
    assert set(rej["reason"].to_pylist()) == {"malformed_row"}
    assert rej["uid"].to_pylist() == [make_uid("", f"a,b,{i}", i + 1) for i in range(9)]  # numbered by position
