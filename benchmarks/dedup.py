"""Benchmark of the near-duplicate search (stages.dedup.near_pairs) on one core. Run on demand, not a test:

    .venv/bin/python benchmarks/dedup.py [--rows 1000000] [--k 6] [--queries 5000]

1M random 64-bit hashes, ~1 % of them overwritten with copies of other rows at Hamming distance 0..k (and as many
at k+1, which must not be found). Reports rows/s (wall and CPU), checks the found pairs against brute force for a
sample of queries (recall and precision must both be 1.0), times decide()'s near step with crop hashes, and prints
the ratio against the goal of >= 1M rows/s/core last.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_ROWS_PER_S = 1_000_000


def planted_hashes(n: int, k: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n random hashes; frac*n rows overwritten by a copy of another row at distance 0..k, and as many at k+1.

    Returns (hashes, source rows, copy rows, distances) of the planted pairs.
    """
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    m = int(n * frac)
    rows = rng.permutation(n)[: 4 * m]
    src, dst = rows[: 2 * m], rows[2 * m:]
    dist = np.r_[rng.integers(0, k + 1, size=m), np.full(m, k + 1)]
    flips = np.zeros(2 * m, np.uint64)
    for i in range(2 * m):
        for b in rng.choice(64, int(dist[i]), replace=False):
            flips[i] |= np.uint64(1) << np.uint64(b)
    h[dst] = h[src] ^ flips
    return h, src, dst, dist


def brute_neighbours(h: np.ndarray, queries: np.ndarray, k: int, chunk: int = 16) -> set[tuple[int, int]]:
    """Every pair (query, row) within distance k, comparing each query with every row."""
    out = set()
    x = np.empty((chunk, h.size), np.uint64)
    c = np.empty((chunk, h.size), np.uint8)
    for a in range(0, queries.size, chunk):
        q = queries[a:a + chunk]
        np.bitwise_xor(h[q][:, None], h[None, :], out=x[: q.size])
        np.bitwise_count(x[: q.size], out=c[: q.size])
        qi, j = np.nonzero(c[: q.size] <= k)
        for s, t in zip(q[qi].tolist(), j.tolist()):
            if s != t:
                out.add((min(s, t), max(s, t)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--frac", type=float, default=0.01, help="share of rows planted as near duplicates")
    ap.add_argument("--queries", type=int, default=5000, help="brute-force sample size")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decide-rows", type=int, default=100_000, help="rows for the decide() near-step timing")
    a = ap.parse_args(argv)

    from stages.dedup import _plan, near_pairs

    print(f"numpy {np.__version__}, 1 thread, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    h, src, dst, dist = planted_hashes(a.rows, a.k, a.frac, seed=0)
    print(f"{a.rows:,} hashes, {int((dist <= a.k).sum()):,} planted at distance 0..{a.k}, "
          f"{int((dist > a.k).sum()):,} at {a.k + 1}")

    t0 = time.perf_counter()
    masks, est = _plan(a.k, a.rows)
    print(f"covering design: {len(masks)} masks of ~{np.mean([bin(x).count('1') for x in masks]):.1f} bits "
          f"({time.perf_counter() - t0:.2f} s to build, once per process)")

    walls, cpus = [], []
    for _ in range(a.repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        i, j, d = near_pairs(h, a.k)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    wall, cpu = min(walls), min(cpus)
    print(f"near_pairs: {i.size:,} pairs; best of {a.repeat}: {wall:.3f} s wall ({a.rows / wall:,.0f} rows/s), "
          f"{cpu:.3f} s CPU ({a.rows / cpu:,.0f} rows/s)")

    # brute force on a sample: half planted rows (near and k+1), half random rows
    rng = np.random.default_rng(1)
    qn = min(a.queries, a.rows)
    queries = np.unique(np.r_[rng.choice(dst, qn // 2, replace=False), rng.choice(a.rows, qn - qn // 2)])
    t0 = time.perf_counter()
    ref = brute_neighbours(h, queries, a.k)
    t_brute = time.perf_counter() - t0
    qset = set(queries.tolist())
    found = {(x, y) for x, y in zip(i.tolist(), j.tolist()) if x in qset or y in qset}
    recall = len(found & ref) / max(1, len(ref))
    precision = len(found & ref) / max(1, len(found))
    print(f"brute force, {queries.size:,} queries x {a.rows:,}: {len(ref):,} pairs ({t_brute:.1f} s); "
          f"near_pairs found {len(found):,} of them: recall {recall:.4f}, precision {precision:.4f}")
    pairs = set(zip(i.tolist(), j.tolist()))
    lo, hi = np.minimum(src, dst).tolist(), np.maximum(src, dst).tolist()
    near_hit = sum((x, y) in pairs for x, y, dd in zip(lo, hi, dist.tolist()) if dd <= a.k)
    far_hit = sum((x, y) in pairs for x, y, dd in zip(lo, hi, dist.tolist()) if dd > a.k)
    print(f"planted pairs found: {near_hit:,} of {int((dist <= a.k).sum()):,} at distance <= {a.k}, "
          f"{far_hit} of {int((dist > a.k).sum()):,} at {a.k + 1}")
    recall = min(recall, near_hit / max(1, int((dist <= a.k).sum())))
    precision = precision if far_hit == 0 else 0.0

    if a.decide_rows:
        decide_timing(a.decide_rows, a.k)

    ratio = (a.rows / cpu) / GOAL_ROWS_PER_S
    print(f"near_pairs vs goal {GOAL_ROWS_PER_S:,} rows/s/core: {a.rows / cpu:,.0f} rows/s CPU = {ratio:.2f}x "
          f"(wall {a.rows / wall:,.0f} rows/s = {(a.rows / wall) / GOAL_ROWS_PER_S:.2f}x)")
    return 0 if recall == 1.0 and precision == 1.0 else 1


def decide_timing(n: int, k: int) -> None:
    """decide()'s near step on n rows, each with a pHash and 9 crop hashes (a pool of 10n hashes)."""
    import pyarrow as pa

    from stages.dedup import DedupParams
    from stages.dedup import DedupStage

    rng = np.random.default_rng(2)
    full, _, _, _ = planted_hashes(n, k, 0.01, seed=3)
    crops = rng.integers(0, 2**64, size=(n, 9), dtype=np.uint64)
    table = pa.table({
        "uid": [f"{i:032x}" for i in range(n)],
        "url": [f"http://example.com/{i}.jpg" for i in range(n)],
        "sha256": [f"{i:064x}" for i in range(n)],
        "original_width": pa.array(rng.integers(100, 1000, n), pa.int32()),
        "original_height": pa.array(rng.integers(100, 1000, n), pa.int32()),
        "phash": full.view(np.int64),
        "phash_crops": pa.ListArray.from_arrays(np.arange(0, 9 * n + 1, 9, dtype=np.int32),
                                               pa.array(crops.view(np.int64).ravel())),
    })
    for crops_on in (False, True):
        w0, c0 = time.perf_counter(), time.process_time()
        d = DedupStage.decide(table, DedupParams(url=False, near_crops=crops_on))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rejected = sum(r is not None for r in d.reason)
        print(f"decide() on {n:,} rows, crop hashes {'on ' if crops_on else 'off'}: {rejected:,} rejected; "
              f"{wall:.2f} s wall, {cpu:.2f} s CPU ({n / cpu:,.0f} rows/s)")


if __name__ == "__main__":
    raise SystemExit(main())
