"""Benchmark of the near-duplicate search (stages.hashing.near) on one core, old search against new in one run.
Run on demand, not a test:

    .venv/bin/python benchmarks/dedup.py [--rows 1000000] [--k 6] [--queries 500] [--decide-rows 100000]

Hashes as benchmarks/scale.py makes them (near_table): random pHashes, 1 % of rows a copy of another row at 0..k
flipped bits, and 9 crop pHashes per row a few bits from the row's own pHash (the model measured on a build: median
10 bits from the full hash, 8 between two crops of one image). Two pools: the full hashes alone (near_crops off),
and full + crop hashes (10 entries a row). Per pool, CPU seconds of this process:
- distinct values: np.unique(return_inverse) (old) against distinct_values (new);
- the search over those values: the old one (benchmarks/near_baseline.py: every pair within k, crop-crop pairs
  included, one numpy sort of all values per mask, then the pairs without a full side dropped) against the new one
  (distinct_pairs with has_full: only pairs with a full side). Both must give the same pairs; the new ones are also
  checked against brute force for a sample of values (half of them planted copies, half random).
rows/s per core = rows / CPU seconds. Then dedup's near step in one process on --decide-rows rows, the cold
start of the kernels in a fresh process (numba's cache as it is, and an empty cache: a compile from scratch), and last
the ratios: new against old, and against the distributed goals of issue 22 (>= 200,000 rows/s per core with crops,
>= 800,000 without), which the search alone must clear with room to spare.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

GOAL_ROWS_PER_S = {True: 200_000, False: 800_000}  # issue 22, distributed near-dup per core: with crops, without


def pools(rows: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(full hashes, crop hashes (rows, 9), rows planted as near copies) as uint64, from scale.py's near_table."""
    import pyarrow.compute as pc
    from scale import near_table

    table, _ = near_table(rows, k)
    full = table.column("phash").to_numpy().view(np.uint64)
    crops = pc.list_flatten(table.column("phash_crops")).to_numpy().view(np.uint64).reshape(rows, 9)
    return full, crops


def cpu(fn, *args):
    """(fn(*args), CPU seconds of this process)."""
    c0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - c0


def brute_sample(uniq: np.ndarray, has_full: np.ndarray, queries: np.ndarray, k: int) -> set[tuple[int, int]]:
    """Every pair (i < j) within k with a full side that has a query value on one side, comparing each query with
    every value."""
    out = set()
    for a in range(0, queries.size, 16):
        q = queries[a:a + 16]
        qi, j = np.nonzero(np.bitwise_count(uniq[q][:, None] ^ uniq[None, :]) <= k)
        i = q[qi]
        keep = (i != j) & (has_full[i] | has_full[j])
        out.update(zip(np.minimum(i, j)[keep].tolist(), np.maximum(i, j)[keep].tolist()))
    return out


def run_pool(full: np.ndarray, crops: np.ndarray | None, k: int, queries: int, rng) -> dict:
    """Old and new search over one pool; returns the figures and whether every check passed."""
    import near_baseline

    from stages.hashing.near import NearPlan, distinct_pairs, distinct_values

    rows = full.size
    values = full if crops is None else np.r_[full, crops.ravel()]
    is_full = np.r_[np.ones(rows, bool), np.zeros(values.size - rows, bool)]
    label = "full + crop hashes" if crops is not None else "full hashes only"
    print(f"\n{label}: {rows:,} rows, {values.size:,} entries")

    (sorted_uniq, sorted_inv), t_unique_old = cpu(lambda: np.unique(values, return_inverse=True))
    (uniq, has_full, inv), t_unique_new = cpu(distinct_values, values, is_full)
    ok = uniq.size == sorted_uniq.size and bool(np.array_equal(uniq[inv], values))
    print(f"  distinct values: {uniq.size:,} ({int(has_full.sum()):,} full); np.unique {t_unique_old:.2f} s, "
          f"distinct_values {t_unique_new:.2f} s")

    # plans first (designs are made once per process and cached, the new plan's first: the old one reuses them)
    plan, t_plan_new = cpu(NearPlan.make, k, uniq.size, int(has_full.sum()))
    _, t_plan_old = cpu(near_baseline._plan, k, sorted_uniq.size)
    print(f"  plans: old {len(near_baseline._plan(k, sorted_uniq.size)[0])} masks ({t_plan_old:.2f} s), new "
          f"{plan.masks.size} masks in {plan.groups} groups, {np.mean([int(m).bit_count() for m in plan.masks]):.1f}"
          f" bits ({t_plan_new:.2f} s)")

    sorted_full = np.zeros(sorted_uniq.size, bool)
    sorted_full[sorted_inv[is_full]] = True

    def old_search():
        i, j, d = near_baseline.distinct_pairs(sorted_uniq, k)
        keep = sorted_full[i] | sorted_full[j]  # what evidence_edges kept: pairs with a full side
        return i[keep], j[keep], d[keep], i.size

    (oi, oj, od, o_all), t_old = cpu(old_search)
    (ni, nj, nd), t_new = cpu(distinct_pairs, uniq, k, has_full)
    print(f"  old search: {o_all:,} pairs within {k}, {oi.size:,} with a full side; {t_old:.2f} s "
          f"({rows / t_old:,.0f} rows/s per core)")
    print(f"  new search: {ni.size:,} pairs with a full side; {t_new:.2f} s ({rows / t_new:,.0f} rows/s per core)")

    # the same pairs: the new ones in np.unique's (sorted) numbering
    pos = np.searchsorted(sorted_uniq, uniq)
    a, b = pos[ni], pos[nj]
    new_keys = np.sort(np.minimum(a, b) * sorted_uniq.size + np.maximum(a, b))
    same = bool(np.array_equal(new_keys, oi * sorted_uniq.size + oj))
    dist_ok = bool(np.array_equal(nd, np.bitwise_count(uniq[ni] ^ uniq[nj]).astype(np.uint8)))
    # brute force for a sample: values the new search paired (is any pair of theirs missing?) and random values
    qn = min(queries, uniq.size)
    q = np.unique(np.r_[rng.choice(np.r_[ni, nj], qn // 2), rng.choice(uniq.size, qn - qn // 2)])
    ref, t_brute = cpu(brute_sample, uniq, has_full, q, k)
    qs = set(q.tolist())
    found = {(x, y) for x, y in zip(ni.tolist(), nj.tolist()) if x in qs or y in qs}
    brute_ok = found == ref
    print(f"  new pairs = old pairs with a full side: {same}; distances right: {dist_ok}; brute force over "
          f"{q.size:,} values x {uniq.size:,} ({t_brute:.1f} s): {len(ref):,} pairs, the new search found "
          f"{len(found & ref):,} of them and {len(found - ref)} others")
    t_old_all, t_new_all = t_unique_old + t_old, t_unique_new + t_new
    print(f"  with the distinct values: old {t_old_all:.2f} s ({rows / t_old_all:,.0f} rows/s per core), new "
          f"{t_new_all:.2f} s ({rows / t_new_all:,.0f} rows/s per core)")
    return {"crops": crops is not None, "rows": rows, "old": t_old, "new": t_new, "old_all": t_old_all,
            "new_all": t_new_all, "ok": ok and same and dist_ok and brute_ok}


def decide_timing(n: int, k: int) -> None:
    """dedup's near step (its global steps in this process: flows.engine.global_decisions.decide_table) on n rows of
    near_table (each row a pHash and 9 crop pHashes), crops off and on."""
    from scale import near_table

    from flows.engine.global_decisions import decide_table
    from stages.dedup import DedupParams

    table, _ = near_table(n, k, seed=3)
    for crops_on in (False, True):
        params = DedupParams(exact=False, url=False, near_hamming=k, near_crops=crops_on, semantic=False)
        rejected, t = cpu(decide_table, "dedup", params, table)
        print(f"dedup's near step in one process on {n:,} rows, crop hashes {'on ' if crops_on else 'off'}: "
              f"{rejected.num_rows:,} rejected; {t:.2f} s CPU ({n / t:,.0f} rows/s per core)")


COLD = """
import time
c0, w0 = time.process_time(), time.perf_counter()
import numpy as np
from stages.hashing import near
c1 = time.process_time()
rng = np.random.default_rng(0)
u = rng.integers(0, 2**64, 200_000, dtype=np.uint64)
is_full = rng.random(u.size) < 0.1
plan = near.NearPlan.make(6, u.size, int(is_full.sum()))
c2 = time.process_time()
uniq, has_full, _ = near.distinct_values(u, is_full)
for g in range(plan.groups):
    plan.pairs(uniq, has_full, g)
near.distinct_pairs(uniq[:300], 6, has_full[:300])
c3 = time.process_time()
print(f"{c1 - c0:.2f} {c2 - c1:.2f} {c3 - c2:.2f} {time.perf_counter() - w0:.2f}")
"""


def cold_start() -> None:
    """A fresh interpreter importing the module, making a plan and calling each kernel once (200,000 values, 10 %
    full: a little work), with numba's cache as it is and with an empty one (a compile from scratch)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for label, cache in (("numba cache as it is", None), ("empty numba cache (compile)", tempfile.mkdtemp())):
        if cache:
            env["NUMBA_CACHE_DIR"] = cache
        out = subprocess.run([sys.executable, "-c", COLD], env=env, capture_output=True, text=True, check=True)
        imp, plan, first, wall = (float(x) for x in out.stdout.split())
        print(f"cold start, {label}: import {imp:.2f} s CPU, plan for 200,000 values {plan:.2f} s, first calls of "
              f"the kernels (and their work) {first:.2f} s CPU; {wall:.2f} s wall")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--queries", type=int, default=500, help="brute-force sample size per pool")
    ap.add_argument("--decide-rows", type=int, default=100_000, help="rows for the near-step timing (0: skip)")
    a = ap.parse_args(argv)

    import numba

    print(f"numpy {np.__version__}, numba {numba.__version__}, 1 thread, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    full, crops = pools(a.rows, a.k)
    rng = np.random.default_rng(1)
    # warm the kernels (numba's cache loads on first call) so that they do not count in the first pool's time
    from stages.hashing.near import distinct_pairs, distinct_values

    warm, warm_full, _ = distinct_values(full[:50_000])
    distinct_pairs(warm, a.k, warm_full)
    results = [run_pool(full, None, a.k, a.queries, rng), run_pool(full, crops, a.k, a.queries, rng)]
    print()
    if a.decide_rows:
        decide_timing(a.decide_rows, a.k)
    cold_start()
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine inflates "
          f"both searches' CPU time)")
    for r in results:
        kind = "with crops" if r["crops"] else "without crops"
        new, new_all = r["rows"] / r["new"], r["rows"] / r["new_all"]
        goal = GOAL_ROWS_PER_S[r["crops"]]
        print(f"{kind}: search new/old = {r['old'] / r['new']:.1f}x ({new:,.0f} vs {r['rows'] / r['old']:,.0f} "
              f"rows/s per core); with distinct values {r['old_all'] / r['new_all']:.1f}x ({new_all:,.0f} rows/s); "
              f"new search vs the distributed goal {goal:,}: {new / goal:.2f}x (with distinct values "
              f"{new_all / goal:.2f}x); checks {'passed' if r['ok'] else 'FAILED'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
