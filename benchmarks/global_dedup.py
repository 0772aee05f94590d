"""Benchmark of the distributed global dedup (flows.engine.global_dedup). Run on demand, not a test:

    .venv/bin/python benchmarks/global_dedup.py [--rows 1000000] [--base 100000] [--cpus 2]

A synthetic build's metadata (uid, sha256, url_norm, pHash, 9 crop pHashes, sizes, a 32-value image embedding) with
planted exact, URL, near, crop and semantic copies across the whole table, written as Parquet by Ray tasks. Each
measurement runs in a fresh driver process on a local Ray with --cpus CPUs:

1. near-dup throughput at --rows rows (k = 6): the near step alone (after the rows are numbered), with and without
   crop hashes, as rows / (wall seconds * CPUs); beside it the same decisions made in one process by
   DedupStage.decide (one thread), the goal of >= 1M rows/s per core, and the ratios.
2. the driver's peak RSS over a whole dedup_decisions (exact, url, near with crops, semantic) at --base and --rows
   rows, and their ratio (resource.getrusage: the process's peak, Ray's own driver state included), with the
   peak's growth during the call.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_ROWS_PER_CORE = 1_000_000
DIM = 32
_C = [0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB]


def _mix(x):
    """splitmix64 of uint64 values (a counter-based generator: every row's values from its index alone)."""
    import numpy as np

    z = x + np.uint64(_C[0])
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_C[1])
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_C[2])
    return z ^ (z >> np.uint64(31))


def _stream(x, s: int):
    """Values of stream s (0..7) for keys x: disjoint inputs per stream, so streams never repeat each other."""
    import numpy as np

    return _mix(x * np.uint64(8) + np.uint64(s))


def _rows(batch: dict, n: int) -> "pa.Table":
    """Rows batch["id"] of an n-row build. Of every 100 rows: 2 near copies (0..6 bits), 1 at 7 bits (distinct),
    2 exact copies, 1 URL copy, 1 crop copy (a crop hash of a larger image near a smaller one's pHash), 1 semantic
    copy; each of a row elsewhere in the table."""
    import numpy as np
    import pyarrow as pa

    i = batch["id"].astype(np.uint64)
    kind = (i % np.uint64(100)).astype(np.int64)
    src = (i * np.uint64(7919) + np.uint64(13)) % np.uint64(n)  # the row a copy copies

    def bits(x, d):
        out = np.zeros(x.size, np.uint64)
        for t in range(int(d.max(initial=0))):
            b = _stream(x * np.uint64(64) + np.uint64(t), 0) % np.uint64(64)
            out |= np.where(t < d, np.uint64(1) << b, np.uint64(0))
        return out

    near_d = np.where(kind < 2, (i % np.uint64(7)).astype(np.int64), np.where(kind == 2, 7, 0))
    phash = _stream(np.where(kind <= 2, src, i), 1) ^ bits(i, near_d)
    sha_key = np.where((kind == 3) | (kind == 4), src, i)
    url_key = np.where(kind == 5, src, i)
    crops = _stream(i[:, None] * np.uint64(16) + np.arange(9, dtype=np.uint64)[None, :], 2)
    crop_copy = kind == 6
    crops[crop_copy, 0] = _stream(src[crop_copy], 1) ^ bits(i[crop_copy], np.full(crop_copy.sum(), 3))
    side = (100 + _stream(i, 3) % np.uint64(400)).astype(np.int64)
    side = np.where(crop_copy, 600, side)  # larger than any source
    emb_key = np.where(kind == 7, src, i)
    emb = _stream(emb_key[:, None] * np.uint64(64) + np.arange(DIM, dtype=np.uint64)[None, :], 4) >> np.uint64(11)
    emb = emb.astype(np.float64) / 2.0**53 - 0.5
    emb[kind == 7] += (_stream(i[kind == 7, None] * np.uint64(64) + np.arange(DIM, dtype=np.uint64)[None, :], 5)
                       % np.uint64(1000)).astype(np.float64) * 1e-6
    m = i.size
    return pa.table({
        "uid": [f"{a:016x}{b:08x}" for a, b in zip(_stream(i, 6).tolist(), i.tolist())],
        "sha256": [f"{v:064x}" for v in _stream(sha_key, 7).tolist()],
        "url_norm": [f"http://h{v % 1000}.example.com/{v}.jpg" for v in url_key.tolist()],
        "phash": pa.array(phash.view(np.int64)),
        "phash_crops": pa.ListArray.from_arrays(pa.array(np.arange(0, 9 * m + 1, 9, dtype=np.int32)),
                                                pa.array(crops.ravel().view(np.int64))),
        "original_width": pa.array(side), "original_height": pa.array(side),
        "image_bytes": pa.array((side * side // 3).astype(np.int64)),
        "image_emb": pa.ListArray.from_arrays(pa.array(np.arange(0, DIM * m + 1, DIM, dtype=np.int32)),
                                              pa.array(emb.astype(np.float32).ravel())),
    })


def _ray(cpus: int):
    import flows.env  # noqa: F401
    import ray

    ray.init(num_cpus=cpus, object_store_memory=2 * 2**30, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", configure_logging=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def generate(rows: int, out: str, cpus: int) -> None:
    ray = _ray(cpus)
    blocks = max(2, rows // 50_000)
    ray.data.range(rows, override_num_blocks=blocks).map_batches(_rows, fn_args=(rows,), batch_size=None) \
        .write_parquet(out)
    ray.shutdown()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure_near(data: str, cpus: int) -> dict:
    import pyarrow.parquet as pq

    from flows.engine import global_dedup as gd
    from stages.dedup import DedupParams
    from stages.dedup import DedupStage

    ray = _ray(cpus)
    out = {}
    for crops in (False, True):
        params = DedupParams(exact=False, url=False, semantic=False, near_crops=crops)
        run = gd._Run(params, None, None, gd.SEMANTIC_SAMPLE)
        ds = ray.data.read_parquet(data, columns=["uid", "phash", "phash_crops", "original_width",
                                                  "original_height", "image_bytes"])
        t0 = time.perf_counter()
        nodes = run.checkpoint(ds.map_batches(gd._node_rows, fn_args=(False,), batch_format="pyarrow"), "n",
                               gd.NODE_SCHEMA)
        rows = nodes.count()
        run.partitions = max(4, 2 * cpus, -(-rows // gd.ROWS_PER_PARTITION))
        numbered = run.checkpoint(run.grouped(nodes.map_batches(gd._with_partition, fn_args=(None, run.partitions),
                                                                batch_format="pyarrow"),
                                              gd._keyed_partition, (None, "", True)), "s", gd.KEYED_SCHEMA)
        t1 = time.perf_counter()
        rejects = run.near(numbered, rows).count()
        t2 = time.perf_counter()
        out[f"crops={crops}"] = {"rows": rows, "prepare_s": t1 - t0, "near_s": t2 - t1, "rejects": rejects}
    ray.shutdown()
    # the same decisions in one process, one thread
    table = pq.read_table(data, columns=["uid", "phash", "phash_crops", "original_width", "original_height",
                                         "image_bytes"])
    for crops in (False, True):
        t0 = time.perf_counter()
        d = DedupStage.decide(table, DedupParams(exact=False, url=False, semantic=False, near_crops=crops))
        out[f"crops={crops}"]["in_process_s"] = time.perf_counter() - t0
        out[f"crops={crops}"]["in_process_rejects"] = sum(r is not None for r in d.reason)
    return out


def measure_rss(data: str, cpus: int) -> dict:
    from flows.engine.global_dedup import dedup_decisions
    from stages.dedup import DedupParams

    ray = _ray(cpus)
    before = peak_rss_mb()
    t0 = time.perf_counter()
    out = dedup_decisions(ray.data.read_parquet(data), DedupParams(semantic_eps=0.01))
    by_reason = {r["reason"]: r["count()"] for r in out.groupby("reason").count().take_all()}
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"peak_rss_mb": peak_rss_mb(), "peak_before_mb": before, "seconds": seconds, "rejects": by_reason}


def _child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--base", type=int, default=100_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--child", choices=["generate", "near", "rss"])
    ap.add_argument("--data")
    a = ap.parse_args()
    if a.child == "generate":
        generate(a.rows, a.data, a.cpus)
        print(json.dumps({}))
        return
    if a.child:
        print(json.dumps((measure_near if a.child == "near" else measure_rss)(a.data, a.cpus)))
        return
    with tempfile.TemporaryDirectory(prefix="pairforge-gdedup-") as tmp:
        big, small = f"{tmp}/big", f"{tmp}/small"
        for rows, path in ((a.rows, big), (a.base, small)):
            _child("--child", "generate", "--rows", str(rows), "--data", path, "--cpus", str(a.cpus))
        near = _child("--child", "near", "--data", big, "--cpus", str(a.cpus))
        rss_small = _child("--child", "rss", "--data", small, "--cpus", str(a.cpus))
        rss_big = _child("--child", "rss", "--data", big, "--cpus", str(a.cpus))
    print(f"distributed near-dup, k=6, {a.rows:,} rows, local Ray with {a.cpus} CPUs (machine: {os.cpu_count()} cores)")
    for name, r in near.items():
        per_core = r["rows"] / (r["near_s"] * a.cpus)
        single = r["rows"] / r["in_process_s"]
        same = r["rejects"] == r["in_process_rejects"]
        print(f"  {name}: near step {r['near_s']:.1f} s -> {per_core:,.0f} rows/s per core "
              f"(numbering the rows first: {r['prepare_s']:.1f} s); in one process (DedupStage.decide, one thread) "
              f"{r['in_process_s']:.1f} s -> {single:,.0f} rows/s; same number of rejects: {same} ({r['rejects']:,})")
        print(f"    ratio to the goal of {GOAL_ROWS_PER_CORE:,} rows/s per core: {per_core / GOAL_ROWS_PER_CORE:.2f}; "
              f"per core vs one process: {per_core / single:.2f}")
    print("driver peak RSS, whole dedup_decisions (exact, url, near with crops, semantic)")
    for rows, r in ((a.base, rss_small), (a.rows, rss_big)):
        print(f"  {rows:>10,} rows: peak {r['peak_rss_mb']:,.0f} MB (before the call {r['peak_before_mb']:,.0f} MB), "
              f"{r['seconds']:.1f} s, rejects {r['rejects']}")
    print(f"  ratio peak RSS {a.rows:,} / {a.base:,} rows: {rss_big['peak_rss_mb'] / rss_small['peak_rss_mb']:.2f}; "
          f"growth during the call: {rss_small['peak_rss_mb'] - rss_small['peak_before_mb']:,.0f} MB vs "
          f"{rss_big['peak_rss_mb'] - rss_big['peak_before_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
