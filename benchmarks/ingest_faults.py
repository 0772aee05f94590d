"""Ingest under faults: N URLs on a loopback server that mixes fast, slow, stalling, trickling, failing, oversized
and redirecting paths (tests/fault_server.py), fetched the way a build fetches (input shards, `ingest_shard` as Ray
tasks, img2dataset's downloader over our fetch).

    .venv/bin/python benchmarks/ingest_faults.py [--n 20000] [--workers 2] [--threads 64] [--deadline 2]

Checks, and fails loudly if not: every URL ends kept or rejected exactly once, with the reason its path calls for;
no URL took longer than the deadline (+ slack); the wall time stays under the bound the deadline and the worker
count set (every URL at its deadline, side by side on workers x threads); no task and no connection is left once
ingest returns. Prints rows/s and the p50 / p99 / max per-URL time. tests/test_ingest_faults.py runs the same code
on fewer URLs.
"""
from __future__ import annotations

import argparse
import io
import math
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flows.env  # noqa: E402,F401
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

# share of each path; "refused" is a port nothing listens on
MIX = {"fast": 0.55, "slow": 0.08, "redirect": 0.06, "chain": 0.03, "stall": 0.03, "trickle": 0.03,
       "trickle_head": 0.01, "fail": 0.04, "missing": 0.03, "reset": 0.02, "short": 0.02, "big": 0.02,
       "bigstream": 0.02, "loop": 0.02, "to_file": 0.01, "html": 0.02, "refused": 0.01}
SLACK_S = 1.5  # per-URL time over the deadline still counted as within it (a loaded 2-core machine)


def expected_reason(fault: str) -> str | None:
    from tests.fault_server import FAULTS

    return "connection_refused" if fault == "refused" else FAULTS[fault][1]


def run(n: int = 20_000, workers: int = 2, threads: int = 64, deadline: float = 2.0, shard_rows: int = 1000,
        seed: int = 0, max_bytes: int = 200_000, log=print) -> dict:
    """Fetch n fault URLs; returns figures and per-URL outcomes; raises AssertionError if a check fails."""
    import ray
    from PIL import Image

    from schemas.spec import IngestSpec
    from dataio.build_folder import BuildFolder
    from dataio.download import ingest_shard
    from dataio.uids import assign_uids
    from tests.fault_server import FaultServer

    b = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(b, "JPEG")
    rng = np.random.default_rng(seed)
    faults = rng.choice(list(MIX), size=n, p=np.array(list(MIX.values())) / sum(MIX.values()))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    work = Path(tempfile.mkdtemp(prefix="pairforge-faults-"))
    server = FaultServer(b.getvalue(), slow_s=0.2, stall_s=4 * deadline + 10, trickle_s=2.0,
                         max_bytes=max_bytes).start()
    try:
        urls = [f"http://127.0.0.1:{closed.getsockname()[1]}/x/{i}.jpg" if f == "refused"
                else f"{server.url}/{f}/{i}.jpg" for i, f in enumerate(faults)]
        inputs, rejects = assign_uids(pa.table({"url": urls, "text": [f"a red box {i}" for i in range(n)]}), "faults")
        assert rejects.num_rows == 0
        folder = BuildFolder(work)
        folder.input_dir.mkdir(parents=True)
        shards = math.ceil(n / shard_rows)
        for s in range(shards):
            pq.write_table(inputs.slice(s * shard_rows, shard_rows), folder.input_shard(s))
        params = IngestSpec(allow_hosts=["127.0.0.1"], timeout_s=deadline, max_bytes=max_bytes, thread_count=threads,
                            image_size=64, shard_rows=shard_rows)
        ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=300 * 2**20,
                 log_to_driver=False, configure_logging=False)
        try:
            remote = ray.remote(ingest_shard).options(num_cpus=1, max_retries=0)
            t0 = time.perf_counter()
            refs = [remote.remote(folder, s, params) for s in range(shards)]
            summaries = ray.get(refs)
            wall = time.perf_counter() - t0
            ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=0)
            assert not not_ready, f"{len(not_ready)} ingest tasks still running"
        finally:
            ray.shutdown()
        t_close = time.perf_counter()
        while server.open_connections and time.perf_counter() - t_close < 5:
            time.sleep(0.05)
        left_open = server.open_connections
    finally:
        server.stop()
        closed.close()

    pairs = pa.concat_tables([pq.read_table(folder.ingest_shard(s).pairs, columns=["uid"]) for s in range(shards)])
    rej = pa.concat_tables([pq.read_table(folder.ingest_shard(s).rejects, columns=["uid", "reason"])
                            for s in range(shards)])
    uid_fault = dict(zip(inputs["uid"].to_pylist(), faults.tolist()))
    got = {u: None for u in pairs["uid"].to_pylist()}
    assert len(got) == pairs.num_rows
    for u, r in zip(rej["uid"].to_pylist(), rej["reason"].to_pylist()):
        assert u not in got, f"{u} both kept and rejected"
        got[u] = r
    assert len(got) == n == pairs.num_rows + rej.num_rows, (n, pairs.num_rows, rej.num_rows)
    wrong = {}
    for u, f in uid_fault.items():
        if got[u] != expected_reason(f):
            wrong.setdefault((f, got[u]), 0)
            wrong[(f, got[u])] += 1
    assert not wrong, f"rows with another outcome than their path calls for, (path, got): count: {wrong}"

    ms = np.array([m for s in summaries for m in s["fetch_ms"]], dtype=np.float64)
    p50, p99 = np.percentile(ms, [50, 99]) / 1000
    bound = 15 + math.ceil(shards / workers) * math.ceil(shard_rows / threads) * (deadline + SLACK_S)
    figures = {"urls": n, "workers": workers, "threads": threads, "deadline_s": deadline, "wall_s": round(wall, 2),
               "rows_per_s": round(n / wall, 1), "p50_s": round(float(p50), 3), "p99_s": round(float(p99), 3),
               "max_s": round(float(ms.max()) / 1000, 3), "wall_bound_s": round(bound, 1),
               "kept": pairs.num_rows, "rejected": rej.num_rows, "open_connections_after": left_open,
               "by_reason": dict(sorted((str(r), int(c)) for r, c in
                                        zip(*np.unique(np.array([got[u] or "kept" for u in got]),
                                                       return_counts=True))))}
    log(f"{n} URLs, {workers} workers x {threads} threads, deadline {deadline:g}s: {figures['rows_per_s']} rows/s "
        f"({wall:.1f}s wall, bound {bound:.0f}s); per URL p50 {p50:.3f}s, p99 {p99:.3f}s, max {ms.max() / 1000:.3f}s")
    assert ms.max() / 1000 <= deadline + SLACK_S, f"a URL took {ms.max() / 1000:.2f}s, deadline {deadline}s"
    assert wall <= bound, f"wall {wall:.1f}s over the bound {bound:.1f}s"
    assert left_open == 0, f"{left_open} connections still open after ingest returned"
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--deadline", type=float, default=2.0)
    ap.add_argument("--shard-rows", type=int, default=1000)
    a = ap.parse_args()
    figures = run(a.n, a.workers, a.threads, a.deadline, a.shard_rows)
    for k, v in figures.items():
        print(f"{k:24s} {v}")


if __name__ == "__main__":
    main()
