"""Benchmark of the balance stage (MetaCLIP's curation). Run on demand, not a test:

    .venv/bin/python benchmarks/balance.py [--entries 500000] [--captions 50000] [--rows 1000000] [--base 100000]

1. Matching: a concept list of --entries entries (the most frequent words of wordfreq's lists of 12 languages, one
   block, as one automaton) and --captions real LAION alt texts (tests/data, repeated), run through the stage's
   process_batch in batches of 4,096: captions per second of CPU time (one core; goal >= 50,000), the automaton's
   build time, matches per caption.
2. Counts at scale: a build folder whose processed rows are --base and then --rows synthetic rows (uid, 1-6 concept
   ids each, Zipf over the list), decided by the engine's global phase (flows/engine/global_decisions.py) with
   `decide.driver_max_rows: 0` (map, reduce and deciding Ray tasks, as at scale) in a fresh driver process each on
   a local Ray with --cpus CPUs: seconds, rows rejected, driver peak RSS, and the ratio of the peaks (goal: flat).
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

LANGS = ("en", "de", "fr", "es", "it", "nl", "pt", "pl", "sv", "cs", "fi", "ru")
SHARD_ROWS = 50_000
GOAL_CAPTIONS_PER_S = 50_000


def concept_file(entries: int, folder: Path) -> Path:
    """--entries distinct entries: the most frequent words of LANGS' wordfreq lists, interleaved by rank."""
    import wordfreq

    path = folder / f"concepts-{entries}.txt"
    if path.exists():
        return path
    lists = [wordfreq.top_n_list(lang, entries, wordlist="best") for lang in LANGS]
    out = dict.fromkeys(w for rank in zip(*lists) for w in rank)
    if len(out) < entries:
        raise SystemExit(f"only {len(out)} distinct words in {LANGS}")
    path.write_text("\n".join(list(out)[:entries]))
    return path


def matching(concepts: Path, n: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.balance import BalanceParams, BalanceStage
    from stages.concepts import matcher_for

    params = BalanceParams(concepts=str(concepts), case_sensitive=False)
    c0 = time.process_time()
    matcher_for(*params.list_key())
    build_s = time.process_time() - c0
    text = pq.read_table(ROOT / "tests/data/laion-alt-text/laion_1000.parquet", columns=["TEXT"])["TEXT"]
    texts = pa.concat_arrays([text.combine_chunks()] * (n // len(text) + 1)).slice(0, n)
    stage = BalanceStage(params)
    matches = 0
    c0 = time.process_time()
    for s in range(0, n, 4096):
        batch = pa.table({"uid": pa.array(["0" * 32] * min(4096, n - s)), "text": texts.slice(s, 4096)})
        matches += int(np.asarray(stage(batch)["concept_count"]).sum())
    cpu = time.process_time() - c0
    return {"captions": n, "cpu_s": round(cpu, 3), "captions_per_cpu_s": round(n / cpu),
            "build_cpu_s": round(build_s, 2), "matches_per_caption": round(matches / n, 2)}


def rows_of(first: int, m: int, entries: int):
    """Rows first .. first + m - 1: hex uids and 1-6 concept ids, Zipf(1.1) over the list (counter-based)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(first)
    sizes = rng.integers(1, 7, size=m)
    ids = (rng.zipf(1.1, size=int(sizes.sum())) - 1) % entries
    offsets = np.zeros(m + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    words = rng.integers(0, 2**63, size=(m, 2), dtype=np.int64)
    uid = [f"{a:016x}{b:016x}" for a, b in words.tolist()]
    concept_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int32)))
    return pa.table({"uid": uid, "concept_ids": concept_ids, "concept_count": pa.array(sizes.astype(np.int32)),
                     "reject_pos": pa.nulls(m, pa.int32())})


def generate(rows: int, entries: int, root: Path) -> None:
    import pyarrow.parquet as pq

    for s, first in enumerate(range(0, rows, SHARD_ROWS)):
        d = root / "_work" / "processed" / f"input_shard={s}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_of(first, min(SHARD_ROWS, rows - first), entries), d / "part-0.parquet")


def decide(root: str, concepts: str, t: float, cpus: int) -> dict:
    """The engine's global phase over the folder, in this (fresh) process as the driver."""
    import ray

    import flows.env  # noqa: F401  (the project's environment for Ray and Prefect)
    from dataio.build_folder import BuildFolder
    from flows.engine.context import BuildContext
    from flows.engine.global_decisions import run_global_stages
    from schemas.spec import parse_spec

    (Path(root) / "urls.csv").write_text("url,caption\nhttp://example.com/a.jpg,a\n")
    spec = parse_spec({"dataset": "bench", "source": {"urls": "urls.csv"},
                       "stages": [{"balance": {"concepts": concepts, "t": t}}],
                       "decide": {"driver_max_rows": 0}, "out": root}, Path(root))
    for attempt in range(3):  # Ray gives a node 30 s to start: on a loaded machine that may not be enough
        try:
            ray.init(num_cpus=cpus, object_store_memory=2 * 2**30, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING", configure_logging=True)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out = run_global_stages(BuildContext(spec, BuildFolder(root), "bench"), 0)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    step = out["balance"]["steps"]["concepts"]
    return {"seconds": round(seconds, 1), "rejected": step["rejected"], "pool": step["pool"],
            "capped": step["summary"]["capped_concepts"], "mode": out["balance"]["mode"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "rss_before_mb":
                round(before)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=500_000)
    ap.add_argument("--captions", type=int, default=50_000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--base", type=int, default=100_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--t", type=float, default=0.0005, help="the cap (a fraction of the pool, as MetaCLIP's 20k/400M)")
    ap.add_argument("--decide", help=argparse.SUPPRESS)  # internal: one measurement in a fresh driver
    args = ap.parse_args()
    if args.decide:
        print(json.dumps(decide(args.decide, str(concept_file(args.entries, Path(args.decide).parent)), args.t,
                                args.cpus)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="pairforge-balance-"))
    concepts = concept_file(args.entries, tmp)
    m = matching(concepts, args.captions)
    print(f"matching, {args.entries:,} entries, {m['captions']:,} LAION captions: {m['captions_per_cpu_s']:,} "
          f"captions/s of CPU time ({m['matches_per_caption']} matches a caption; automaton built in "
          f"{m['build_cpu_s']} s of CPU)", flush=True)
    runs = {}
    for rows in (args.base, args.rows):
        root = tmp / f"build-{rows}"
        generate(rows, args.entries, root)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        res = subprocess.run([sys.executable, __file__, "--decide", str(root), "--entries", str(args.entries),
                              "--cpus", str(args.cpus), "--t", str(args.t)], env=env, capture_output=True, text=True,
                             check=False)
        if res.returncode:
            raise SystemExit(res.stderr[-3000:])
        runs[rows] = json.loads(res.stdout.strip().splitlines()[-1])
        r = runs[rows]
        print(f"counts at {rows:,} rows ({r['mode']}): {r['seconds']} s, pool {r['pool']:,}, rejected "
              f"{sum(r['rejected'].values()):,}, {r['capped']:,} concepts capped; driver peak RSS "
              f"{r['peak_rss_mb']:,} MB ({r['rss_before_mb']:,} MB before the phase)", flush=True)
    load = os.getloadavg()[0]
    print(f"\nratios (load average {load:.1f} on {os.cpu_count()} CPUs):")
    print(f"  matching captions/s per core / goal {GOAL_CAPTIONS_PER_S:,}: "
          f"{m['captions_per_cpu_s'] / GOAL_CAPTIONS_PER_S:.2f}")
    print(f"  driver peak RSS {args.rows:,} / {args.base:,} rows: "
          f"{runs[args.rows]['peak_rss_mb'] / runs[args.base]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
