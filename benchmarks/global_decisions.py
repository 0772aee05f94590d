"""Benchmark of the global decisions (flows/engine/global_decisions.py running dedup's declared steps) over a
synthetic build's processed rows: metadata only, no images. Run on demand, not a test:

    .venv/bin/python benchmarks/global_decisions.py [--rows 1000000] [--base 100000] [--cpus 2] [--big 10000000]

Each build folder holds _work/processed/input_shard=N/ files as the stats pass writes them (uid, sha256, url_norm,
pHash, 9 crop pHashes, sizes, a 32-value image embedding), with planted exact, URL, near (0..6 bits, and 7: not
duplicates), crop and semantic copies of rows elsewhere in the table, and chains. Each measurement runs in a fresh
driver process on a local Ray with --cpus CPUs and `decide.driver_max_rows: 0` (partitioned, as at scale); Ray's
worker processes are started before the clock does (a build's global phase follows its stats pass), pairforge's
modules are not yet imported in them:

1. near step alone (k = 6) at --rows rows, with and without crop hashes: rows / (seconds * CPUs) of the step, the
   goals (>= 200,000 rows/s per core with crops, >= 800,000 without), and the same decisions in one process
   (decide_table), for the ratio. The step runs twice on the same workers: the first run pays each worker's
   one-time start (imports, numba's kernels loaded from its cache: about a second per process, whatever the rows),
   the second does not; both are printed, with a ratio each;
2. the whole dedup (exact, url, near with crops, semantic) at --base and --rows rows: seconds per step, driver peak
   RSS and their ratio (goal <= 1.1), the share of distinct images rejected as near duplicates, and a check that
   every near-duplicate reject is within k of the kept row its detail names;
3. with --big N: the whole dedup without crops over N rows (default 10M if given without a value): time and driver
   peak RSS (goal < 1 GB).
Ratios are printed last.
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

GOALS = {"near_crops": 200_000, "near_plain": 800_000, "rss_ratio": 1.1, "big_rss_mb": 1024}
K = 6
DIM = 32
SHARD_ROWS = 50_000
_C = [0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB]


def _mix(x):
    """splitmix64 of uint64 values (a counter-based generator: every row's values from its index alone)."""
    import numpy as np

    z = x + np.uint64(_C[0])
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_C[1])
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_C[2])
    return z ^ (z >> np.uint64(31))


def _stream(x, s: int):
    """Values of stream s (0..15) for keys x: disjoint inputs per stream, so streams never repeat each other."""
    import numpy as np

    return _mix(x * np.uint64(16) + np.uint64(s))


def kinds(i, n: int):
    """Each row's kind (0..99) and the row a copy copies. Of every 100 rows: 2 near copies (0..6 bits), 1 at 7 bits
    (distinct), 2 exact copies, 1 URL copy, 1 crop copy, 1 semantic copy, 3 links of chains (each 4 bits from the
    previous row); the rest are distinct images."""
    import numpy as np

    kind = (i % np.uint64(100)).astype(np.int64)
    src = (i * np.uint64(7919) + np.uint64(13)) % np.uint64(n)
    src = np.where((kind >= 8) & (kind <= 10), i - np.uint64(1), src)  # chains: rows 7, 8, 9, 10 of each 100
    return kind, src


COPY_KINDS = (0, 1, 3, 4, 5, 6, 8, 9, 10, 11)  # rows that copy their `src` (2: 7 bits away, not a copy)


def lone_rows(n: int):
    """Rows that copy no row and that no row copies: a rejection of one of these is a false duplicate."""
    import numpy as np

    i = np.arange(n, dtype=np.uint64)
    kind, src = kinds(i, n)
    copy = np.isin(kind, COPY_KINDS)
    lone = ~copy
    lone[src[copy].astype(np.int64)] = False
    lone[kind == 7] = False  # a chain's first row: the next link copies it
    return lone


def _bits(x, d):
    import numpy as np

    out = np.zeros(x.size, np.uint64)
    for t in range(int(d.max(initial=0))):
        b = _stream(x * np.uint64(64) + np.uint64(t), 0) % np.uint64(64)
        out |= np.where(t < d, np.uint64(1) << b, np.uint64(0))
    return out


def phashes(i, n: int):
    """The pHash of rows i (chains follow their previous row, computed back to the chain's start)."""
    import numpy as np

    kind, src = kinds(i, n)
    base = np.where(kind <= 2, src, np.where((kind >= 8) & (kind <= 10), i - (kind - 7).astype(np.uint64), i))
    h = _stream(base, 1)
    near_d = np.where(kind < 2, (i % np.uint64(7)).astype(np.int64), np.where(kind == 2, 7, 0))
    h ^= _bits(i, near_d)
    for step in range(1, 4):  # chain links: 4 bits from the previous link each
        link = (kind >= 7 + step) & (kind <= 10)
        h ^= np.where(link, _bits(base + np.uint64(step), np.full(i.size, 4)), np.uint64(0))
    return h


def rows_of(first: int, m: int, n: int):
    """Rows first .. first + m - 1 of an n-row build, as the stats pass writes them (processed rows)."""
    import numpy as np
    import pyarrow as pa

    i = np.arange(first, first + m, dtype=np.uint64)
    kind, src = kinds(i, n)
    phash = phashes(i, n)
    sha_key = np.where((kind == 3) | (kind == 4), src, i)
    url_key = np.where(kind == 5, src, i)
    crops = _stream(i[:, None] * np.uint64(16) + np.arange(9, dtype=np.uint64)[None, :], 2)
    crop_copy = kind == 6
    crops[crop_copy, 0] = phashes(src[crop_copy], n) ^ _bits(i[crop_copy], np.full(crop_copy.sum(), 3))
    side = (100 + _stream(i, 3) % np.uint64(400)).astype(np.int64)
    side = np.where(crop_copy, 600, side)  # larger than any source: its crop is the smaller copy
    emb_key = np.where(kind == 11, src, i)
    emb = _stream(emb_key[:, None] * np.uint64(64) + np.arange(DIM, dtype=np.uint64)[None, :], 4) >> np.uint64(11)
    emb = emb.astype(np.float64) / 2.0**53 - 0.5
    emb[kind == 11] += (_stream(i[kind == 11, None] * np.uint64(64) + np.arange(DIM, dtype=np.uint64)[None, :], 5)
                        % np.uint64(1000)).astype(np.float64) * 1e-6
    uid_hi, uid_lo = _stream(i, 6), _stream(i, 7)
    return pa.table({
        "uid": [f"{a:016x}{b:016x}" for a, b in zip(uid_hi.tolist(), uid_lo.tolist())],
        "sha256": [f"{v:064x}" for v in _stream(sha_key, 8).tolist()],
        "url_norm": [f"http://h{v % 1000}.example.com/{v}.jpg" for v in url_key.tolist()],
        "phash": pa.array(phash.view(np.int64)),
        "phash_crops": pa.ListArray.from_arrays(pa.array(np.arange(0, 9 * m + 1, 9, dtype=np.int32)),
                                                pa.array(crops.ravel().view(np.int64))),
        "original_width": pa.array(side.astype(np.int32)), "original_height": pa.array(side.astype(np.int32)),
        "image_bytes": pa.array((side * side // 3).astype(np.int64)),
        "image_emb": pa.ListArray.from_arrays(pa.array(np.arange(0, DIM * m + 1, DIM, dtype=np.int32)),
                                              pa.array(emb.astype(np.float32).ravel())),
        "reject_pos": pa.nulls(m, pa.int32()),
    })


def generate(rows: int, root: str) -> None:
    """A build folder whose processed rows are `rows` synthetic rows, SHARD_ROWS per input shard."""
    import pyarrow.parquet as pq

    for s, first in enumerate(range(0, rows, SHARD_ROWS)):
        d = Path(root) / "_work" / "processed" / f"input_shard={s}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_of(first, min(SHARD_ROWS, rows - first), rows), d / "part-0.parquet")


def spec_for(root: str, params: dict):
    from schemas.spec import parse_spec

    (Path(root) / "urls.csv").write_text("url,caption\nhttp://example.com/a.jpg,a\n")
    return parse_spec({"dataset": "bench", "source": {"urls": "urls.csv"}, "stages": [{"dedup": params}],
                       "decide": {"driver_max_rows": 0}, "out": root}, Path(root))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _pid() -> int:
    return os.getpid()


def run(root: str, params: dict, cpus: int, runs: int = 1) -> dict:
    """The engine's global phase over the folder, in this (fresh) process as the driver, on a fresh local Ray whose
    worker processes are up (as after a build's stats pass) but have not imported pairforge. runs=2: the phase
    again on the same workers (modules imported, numba kernels loaded), reported as `warm`."""
    import flows.env  # noqa: F401
    import ray

    from dataio.build_folder import BuildFolder
    from flows.engine.context import BuildContext
    from flows.engine.global_decisions import run_global_stages

    ray.init(num_cpus=cpus, object_store_memory=2 * 2**30, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", configure_logging=True)
    ray.get([ray.remote(_pid).options(num_cpus=1).remote() for _ in range(2 * cpus)])
    folder = BuildFolder(root)
    ctx = BuildContext(spec_for(root, params), folder, "bench")
    before = peak_rss_mb()
    results = []
    for _ in range(runs):
        for d in (folder.work / "global").subdirs() if (folder.work / "global").exists() else []:
            d.rmtree()
        t0, c0 = time.perf_counter(), time.process_time()
        out = run_global_stages(ctx, 0)
        steps = out["dedup"]["steps"]
        results.append({"seconds": time.perf_counter() - t0, "driver_cpu_s": time.process_time() - c0,
                        "steps": {k: {"seconds": v["seconds"], "rejected": v["rejected"]} for k, v in steps.items()}})
    ray.shutdown()
    return results[0] | {"peak_rss_mb": peak_rss_mb(), "peak_before_mb": before, "mode": out["dedup"]["mode"],
                         "warm": results[1:]}


def check(root: str, rows: int) -> dict:
    """Near rejects are within K of the kept row they name; distinct images rejected as near duplicates."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    files = sorted(Path(root, "_work", "global").rglob("part-*.parquet"))
    near = [f for f in files if "-near" in str(f.parent)]
    dec = pads.dataset([str(f) for f in near]).to_table() if near else None
    uid_row = {}
    # rows are numbered shard << 32 | position, SHARD_ROWS per shard
    dec_rows = dec.column("row").to_numpy() if dec is not None else np.empty(0, np.int64)
    i = (dec_rows >> 32) * SHARD_ROWS + (dec_rows & 0xFFFFFFFF)
    lone = lone_rows(rows)  # images with no planted copy, and no copy of another
    distinct = lone[i]
    n_distinct = int(lone.sum())
    bad = 0
    if dec is not None and dec.num_rows:
        sample = np.random.default_rng(0).choice(dec.num_rows, min(2000, dec.num_rows), replace=False)
        all_i = np.arange(rows, dtype=np.uint64)
        ph = phashes(all_i, rows)
        uids = rows_of(0, rows, rows).column("uid").to_pylist() if rows <= 2_000_000 else None
        if uids is not None:
            uid_row = {u: k for k, u in enumerate(uids)}
            for j in sample.tolist():
                detail = dec.column("detail")[j].as_py()
                keeper = uid_row[detail.split()[2]]
                crop_hit = "crop hamming=" in detail
                if not crop_hit and int(np.bitwise_count(ph[int(i[j])] ^ ph[keeper])) > K:
                    bad += 1
        del ph
    return {"near_rejects": int(dec_rows.size), "distinct_rejected": int(distinct.sum()),
            "distinct_rows": n_distinct, "checked": int(min(2000, dec_rows.size)), "not_within_k": bad,
            "by_reason": {str(k): int(v) for k, v in zip(*np.unique(
                pc.fill_null(dec.column("reason"), "").to_numpy(zero_copy_only=False), return_counts=True))}
            if dec is not None else {}}


def in_process(root: str, crops: bool) -> dict:
    """The near step in one process over the same rows (decide_table): seconds and rejects."""
    import pyarrow.dataset as pads

    from flows.engine.global_decisions import decide_table
    from stages.dedup import DedupParams

    t = pads.dataset(str(Path(root, "_work", "processed")), format="parquet").to_table(
        columns=["uid", "phash", "phash_crops", "original_width", "original_height", "image_bytes"])
    t0 = time.process_time()
    out = decide_table("dedup", DedupParams(exact=False, url=False, semantic=False, near_crops=crops), t)
    return {"cpu_s": time.process_time() - t0, "rejects": out.num_rows}


def _child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


NEAR_ONLY = {"exact": False, "url": False, "semantic": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--base", type=int, default=100_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--big", type=int, nargs="?", const=10_000_000, default=0)
    ap.add_argument("--child", choices=["generate", "run", "check", "in_process"])
    ap.add_argument("--root")
    ap.add_argument("--params", default="{}")
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    if a.child:
        if a.child == "generate":
            generate(a.rows, a.root)
            out = {}
        elif a.child == "run":
            out = run(a.root, json.loads(a.params), a.cpus, a.runs)
        elif a.child == "check":
            out = check(a.root, a.rows)
        else:
            out = in_process(a.root, json.loads(a.params)["near_crops"])
        print(json.dumps(out))
        return
    print(f"global decisions (dedup's steps), local Ray with {a.cpus} CPUs (machine: {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f})", flush=True)
    ratios = []
    with tempfile.TemporaryDirectory(prefix="pairforge-global-") as tmp:
        roots = {}
        for rows in sorted({a.base, a.rows}):
            roots[rows] = f"{tmp}/b{rows}"
            t0 = time.perf_counter()
            _child("--child", "generate", "--rows", str(rows), "--root", roots[rows])
            print(f"  generated {rows:,} rows in {time.perf_counter() - t0:.0f} s", flush=True)
        big = roots[a.rows]
        print(f"\n1. near step alone, k={K}, {a.rows:,} rows", flush=True)
        for crops, goal in ((False, GOALS["near_plain"]), (True, GOALS["near_crops"])):
            params = NEAR_ONLY | {"near_crops": crops}
            r = _child("--child", "run", "--root", big, "--cpus", str(a.cpus), "--params", json.dumps(params),
                       "--runs", "2")
            cold, warm = r["steps"]["near"], r["warm"][0]["steps"]["near"]
            per_core = {w: a.rows / (s["seconds"] * a.cpus) for w, s in (("cold", cold), ("warm", warm))}
            ref = _child("--child", "in_process", "--root", big, "--params", json.dumps(params))
            same = sum(cold["rejected"].values()) == ref["rejects"] and cold["rejected"] == warm["rejected"]
            print(f"  crops={crops} ({r['mode']}): first run {cold['seconds']:.2f} s -> {per_core['cold']:,.0f} "
                  f"rows/s per core; again on the same workers {warm['seconds']:.2f} s -> {per_core['warm']:,.0f}; "
                  f"in one process {ref['cpu_s']:.1f} s CPU -> {a.rows / ref['cpu_s']:,.0f} rows/s; same rejects "
                  f"as in one process: {same} ({ref['rejects']:,}); driver peak {r['peak_rss_mb']:,.0f} MB",
                  flush=True)
            for w in ("cold", "warm"):
                ratios.append((f"near step per core, crops={crops}, {w} workers, vs goal {goal:,}", per_core[w] / goal))
        print("\n2. whole dedup (exact, url, near with crops, semantic)", flush=True)
        whole = {}
        for rows in sorted(roots):
            r = _child("--child", "run", "--root", roots[rows], "--cpus", str(a.cpus), "--params",
                       json.dumps({"semantic_eps": 0.01}))
            c = _child("--child", "check", "--root", roots[rows], "--rows", str(rows))
            whole[rows] = r
            steps = ", ".join(f"{k} {v['seconds']:.1f} s ({sum(v['rejected'].values()):,})"
                              for k, v in r["steps"].items())
            print(f"  {rows:>10,} rows: {r['seconds']:.1f} s ({r['mode']}): {steps}; driver peak "
                  f"{r['peak_rss_mb']:,.0f} MB; distinct images rejected as near duplicates: "
                  f"{c['distinct_rejected']:,} of {c['distinct_rows']:,} "
                  f"({c['distinct_rejected'] / max(c['distinct_rows'], 1):.3%}); near rejects checked "
                  f"{c['checked']:,}, not within {K} of the kept row named: {c['not_within_k']}", flush=True)
        if len(whole) == 2:
            lo, hi = whole[min(whole)], whole[max(whole)]
            ratios.append((f"driver peak RSS {max(whole):,} / {min(whole):,} rows (goal <= {GOALS['rss_ratio']})",
                           hi["peak_rss_mb"] / lo["peak_rss_mb"]))
    if a.big:
        with tempfile.TemporaryDirectory(prefix="pairforge-global-big-") as tmp:
            t0 = time.perf_counter()
            _child("--child", "generate", "--rows", str(a.big), "--root", tmp)
            print(f"\n3. {a.big:,} rows of metadata (generated in {time.perf_counter() - t0:.0f} s): whole dedup "
                  f"without crop hashes", flush=True)
            r = _child("--child", "run", "--root", tmp, "--cpus", str(a.cpus), "--params",
                       json.dumps({"near_crops": False, "semantic": False}))
            steps = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in r["steps"].items())
            print(f"  {r['seconds']:.1f} s ({r['mode']}): {steps}; driver peak {r['peak_rss_mb']:,.0f} MB", flush=True)
            ratios.append((f"driver peak at {a.big:,} rows / {GOALS['big_rss_mb']} MB (goal < 1)",
                           r["peak_rss_mb"] / GOALS["big_rss_mb"]))
            r = _child("--child", "run", "--root", tmp, "--cpus", str(a.cpus), "--params", json.dumps(
                {"exact": False, "url": False, "near_hamming": 0, "semantic_eps": 0.01}))
            steps = ", ".join(f"{k} {v['seconds']:.1f} s ({sum(v.get('rejected', {}).values()):,})"
                              for k, v in r["steps"].items())
            print(f"  SemDeDup alone (about sqrt(rows) k-means clusters): {r['seconds']:.1f} s: {steps}; driver peak "
                  f"{r['peak_rss_mb']:,.0f} MB", flush=True)
    print("\nratios")
    for name, v in ratios:
        print(f"  {name}: {v:.2f}")


if __name__ == "__main__":
    main()
