"""`pairforge verify` at two build sizes: wall seconds, MB/s checksummed, and the verifying process's peak RSS, whose
ratio between the sizes shows whether memory stays flat in the build's size (goal: <= 1.2).

    .venv/bin/python benchmarks/verify.py [--rows 1000000] [--times 5] [--work DIR]

The builds are synthetic but whole: shards and rejects of the build schema (a 64-byte image per row, so the
checksums read real bytes), a manifest written by dataio.shards.write_manifest, stats.json; made once under --work.
Each verify runs in a fresh process (`python -m flows.cli verify BUILD --json`); its peak RSS is its own VmHWM as
the kernel reports it on exit (resource.getrusage of the child).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL_RSS_RATIO = 1.2
FILE_ROWS = 250_000
REJECTED_SHARE = 0.2


def make_build(folder: Path, rows: int) -> Path:
    """A finished build of `rows` rows (unique uids; a fifth rejected), unless already made."""
    import pyarrow as pa

    from dataio.build_folder import atomic_write_table, atomic_write_text
    from dataio.shards import write_manifest
    from schemas.columns import build_schema, rejects_schema

    if (folder / "manifest.json").exists():
        return folder
    files = {"shards": [], "rejects": []}
    kept = rejected = 0
    for j, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        idx = np.arange(start, start + n, dtype=np.uint64)
        uids = pa.array([f"{i:032x}" for i in (idx * np.uint64(2654435761) + np.uint64(12345)).tolist()])
        noise = np.random.default_rng(j).integers(0, 256, (n, 64), dtype=np.uint8)
        image = pa.array([bytes(r) for r in noise], pa.binary())  # incompressible: checksums read real bytes
        cut = int(n * (1 - REJECTED_SHARE))
        cols = {"uid": uids, "url": pa.array([f"https://x.test/{i}.jpg" for i in idx.tolist()]),
                "text": pa.array(["a red circle"] * n), "image": image}
        t = pa.table(cols)
        for kind, part, schema in (("shards", t.slice(0, cut), build_schema([])),
                                   ("rejects", t.slice(cut), rejects_schema([]))):
            extra = {"stage": ["basic"] * part.num_rows, "reason": ["too_small"] * part.num_rows} \
                if kind == "rejects" else {}
            arrays = [part.column(f.name) if f.name in part.column_names else
                      pa.array(extra[f.name], f.type) if f.name in extra else pa.nulls(part.num_rows, f.type)
                      for f in schema]
            table = pa.Table.from_arrays(arrays, schema=schema)
            files[kind].append(atomic_write_table(table, folder / kind / f"part-{j:05d}-000.parquet", checksum=True,
                                                  row_group_size=8192))
        kept, rejected = kept + cut, rejected + n - cut
    write_manifest(folder, build_id=folder.name, dataset="verify-bench", spec_hash="-", code_version="-",
                   shards=files["shards"], rejects=files["rejects"], extra={"stages": []})
    atomic_write_text(folder / "stats.json", json.dumps({"rows_listed": kept + rejected}))
    return folder


def verify_in_child(build: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.cli", "verify", str(build), "--json"], cwd=ROOT,
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB; the largest child so far
    if r.returncode:
        raise RuntimeError(r.stdout[-3000:] + r.stderr[-3000:])
    out = json.loads(r.stdout)
    return {"seconds": seconds, "peak_mb": peak / 1024, "grew": peak > before, "bytes": out["bytes"],
            "rows": out["kept"] + out["rejected"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the smaller build")
    ap.add_argument("--times", type=int, default=5, help="the larger build is this many times the smaller")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pairforge-verify"))
    a = ap.parse_args(argv)
    results = []
    for rows in (a.rows, a.rows * a.times):  # smaller first: RUSAGE_CHILDREN keeps the largest peak so far
        build = make_build(a.work / f"build-{rows}", rows)
        r = verify_in_child(build)
        results.append(r)
        print(f"{r['rows']:,} rows, {r['bytes'] / 2**20:,.0f} MB: {r['seconds']:.1f} s "
              f"({r['bytes'] / 2**20 / r['seconds']:,.0f} MB/s, {r['rows'] / r['seconds']:,.0f} rows/s); "
              f"peak RSS {r['peak_mb']:,.0f} MB", flush=True)
    small, large = results
    ratio = large["peak_mb"] / small["peak_mb"] if large["grew"] else 1.0
    print(f"peak RSS at {a.times}x the rows / at 1x: {ratio:.2f} (goal <= {GOAL_RSS_RATIO}: "
          f"{'met' if ratio <= GOAL_RSS_RATIO else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
