"""Benchmark of input preparation (flows.engine.inputs.prepare_inputs). Run on demand, not a test:

    .venv/bin/python benchmarks/inputs.py [--rows 10000000] [--base 1000000] [--cpus 2]

A synthetic CSV URL list (one row in 100 repeats a row listed earlier, across batches) at --base and --rows rows,
each prepared in a fresh driver process on a local Ray with --cpus CPUs; prints the driver's peak RSS (the
process's peak, resource.getrusage, Ray's own driver state included), its growth during prepare_inputs, the
seconds taken and the repeats found. The growth should not depend on the number of rows.
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(rows: int, path: str, chunk: int = 1_000_000) -> None:
    """rows lines: url http://hostH.example/img/N.jpg, caption "a picture N"; every 100th row repeats row N - 5001 (itself no repeat)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pacsv.CSVWriter(path, schema) as w:
        for start in range(0, rows, chunk):
            i = np.arange(start, min(rows, start + chunk), dtype=np.int64)
            n = np.where((i % 100 == 99) & (i >= 5001), i - 5001, i)
            num, host = pa.array(n).cast(pa.string()), pa.array(n % 1000).cast(pa.string())
            url = pc.binary_join_element_wise("http://host", host, ".example/img/", num, ".jpg", "")
            w.write_table(pa.table({"url": url, "caption": pc.binary_join_element_wise("a picture ", num, "")},
                                   schema=schema))


def measure(urls: str, cpus: int, batch_rows: int) -> dict:
    import ray

    from flows.engine.context import open_build
    from flows.engine.inputs import prepare_inputs
    from schemas.spec import parse_spec

    ray.init(num_cpus=cpus, object_store_memory=2**30, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    root = Path(urls).parent
    spec = parse_spec({"dataset": f"bench-{Path(urls).stem}", "source": {"urls": urls}, "out": "builds",
                       "stages": [], "ingest": {"shard_rows": 10_000}}, root)
    ctx = open_build(spec, new=True)
    before = peak_rss_mb()
    t0 = time.perf_counter()
    summary = prepare_inputs(ctx, batch_rows=batch_rows)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"peak_rss_mb": peak_rss_mb(), "peak_before_mb": before, "seconds": seconds, "summary": summary}


def _child(*args: str) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--base", type=int, default=1_000_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch-rows", type=int, default=200_000)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--urls")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.urls, a.cpus, a.batch_rows)))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="pairforge-inputs-") as tmp:
        for rows in (a.base, a.rows):
            urls = f"{tmp}/urls-{rows}.csv"
            generate(rows, urls)
            results[rows] = _child("--child", "--urls", urls, "--cpus", str(a.cpus), "--batch-rows", str(a.batch_rows))
    print(f"prepare_inputs, CSV URL list, batches of {a.batch_rows:,} rows, local Ray with {a.cpus} CPUs "
          f"(machine: {os.cpu_count()} cores)")
    for rows, r in results.items():
        s = r["summary"]
        print(f"  {rows:>12,} rows: driver peak {r['peak_rss_mb']:,.0f} MB (before the call {r['peak_before_mb']:,.0f} "
              f"MB, growth {r['peak_rss_mb'] - r['peak_before_mb']:,.0f} MB), {r['seconds']:.1f} s "
              f"({rows / r['seconds']:,.0f} rows/s); {s['rows']:,} to fetch, {s['rejected']:,} rejected, "
              f"{s['shards']:,} shards")
    small, big = results[a.base], results[a.rows]
    print(f"  ratio of driver peaks {a.rows:,} / {a.base:,} rows: {big['peak_rss_mb'] / small['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
