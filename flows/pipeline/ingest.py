"""Downloads: one Ray task per input shard (img2dataset's downloader behind our address guard); shards with a done
marker are skipped, so a killed build fetches nothing twice."""
from __future__ import annotations

import time

import pyarrow.parquet as pq

from flows.pipeline.context import BuildContext
from flows.progress import phase
from stages.io.ingest import ingest_shard


def ingest_all(ctx: BuildContext, prepared: dict) -> dict:
    import ray

    folder, params = ctx.folder, ctx.spec.ingest
    todo = [i for i in range(prepared["shards"]) if not folder.ingest_shard(i).done.exists()]
    done_rows = prepared["rows"] - sum(pq.read_metadata(folder.input_shard(i)).num_rows for i in todo)
    t0 = time.perf_counter()
    remote = ray.remote(ingest_shard).options(
        num_cpus=params.cpus, max_retries=params.max_task_retries, retry_exceptions=True, name="ingest_shard")
    with phase("ingest", total=prepared["rows"]) as adv:
        adv(done_rows)
        pending = {remote.remote(folder, i, params): i for i in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                adv(ray.get(ref)["rows_in"])
        adv(0, f"{len(todo)} shards fetched, {prepared['shards'] - len(todo)} already done")
    seconds = ctx.state().get("ingest_seconds", 0.0) + time.perf_counter() - t0
    ctx.set_state(ingest_seconds=seconds)
    return {"seconds": seconds, "shards_fetched": len(todo)}
