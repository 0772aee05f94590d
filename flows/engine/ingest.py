"""Downloads: one Ray task per input shard (img2dataset's downloader behind our address guard); shards with a done
marker are skipped, so a killed build fetches nothing twice."""
from __future__ import annotations

import time

import numpy as np

from flows.engine.context import BuildContext
from flows.engine.inputs import run_tasks
from flows.engine.progress import phase
from dataio.download import ingest_shard


MS_BINS = np.unique(np.geomspace(1, 3_600_000, 200).astype(np.int64))  # upper edges of per-URL time buckets, ms


def ingest_all(ctx: BuildContext, prepared: dict) -> dict:
    folder, params = ctx.folder, ctx.spec.ingest
    finished = set(folder.ingest_dir.glob("*.done.json"))  # one listing, not a request per shard
    todo = [i for i in range(prepared["shards"]) if folder.ingest_shard(i).done not in finished]
    done_rows = prepared["rows"] - sum(folder.input_shard(i).read_metadata().num_rows for i in todo)
    t0 = time.perf_counter()
    with phase("ingest", total=prepared["rows"]) as adv:
        adv(done_rows)
        hist, longest = np.zeros(len(MS_BINS) + 1, np.int64), 0  # per-URL times, O(1) in the build's size
        for s in run_tasks(ingest_shard, ((folder, i, params) for i in todo), num_cpus=params.cpus,
                           max_retries=params.max_task_retries):  # a window of tasks in flight, not one ref per shard
            ms = np.asarray(s.get("fetch_ms", []), np.int64)
            hist += np.bincount(np.searchsorted(MS_BINS, ms), minlength=len(hist))
            longest = max(longest, int(ms.max(initial=0)))
            adv(s["rows_in"])
        times = ""
        if hist.sum():
            p50, p99 = (MS_BINS[min(np.searchsorted(np.cumsum(hist), q * hist.sum()), len(MS_BINS) - 1)] / 1000
                        for q in (0.5, 0.99))
            times = f"; per URL p50 <= {p50:.2f}s, p99 <= {p99:.2f}s, max {longest / 1000:.2f}s"
        adv(0, f"{len(todo)} shards fetched, {prepared['shards'] - len(todo)} already done{times}")
    seconds = ctx.state().get("ingest_seconds", 0.0) + time.perf_counter() - t0
    ctx.set_state(ingest_seconds=seconds)
    return {"seconds": seconds, "shards_fetched": len(todo)}
