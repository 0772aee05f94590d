"""Input preparation: a URL list becomes uids and input shards (one per download task), malformed and repeated
rows go to the input rejects; an existing corpus (curate) becomes finished ingest shards directly.

Both stream: the driver reads the source a batch at a time and holds a few batches and one shard at most. uids
and repeated rows are worked out by Ray tasks over scratch files in _work/input_prep (dataio.uids):
  1. per batch: keys (a row's first-listing uid) and never-fetch reasons; keys hash-partitioned into buckets;
  2. per bucket: the rows whose key a row earlier in the list has (repeats: rejected, the first listing kept);
  3. per batch: final uids, inputs and rejects.
The driver then cuts the inputs, in list order, into shards of ingest.shard_rows (an incremental build first drops,
a batch at a time, uids the catalog has seen). A prepare killed before its marker starts again from scratch and
makes the same shards: nothing in them depends on batch sizes or task timing."""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flows.engine.context import BuildContext, earlier_builds
from flows.progress import phase
from schemas.columns import REJECT_SCHEMA
from dataio.build_folder import atomic_write_table
from dataio.sources import URL_BATCH_ROWS, corpus_kind, corpus_pieces, iter_corpus, iter_url_list
from dataio.uids import bucket_repeats, key_corpus_batch, key_corpus_piece, key_url_batch, settle_corpus_batch, settle_url_batch
from dataio.storage import Location, location

BUCKET_ROWS = 4_000_000  # keys per repeat-detection bucket, about (what one step-2 task sorts)


def prepare_inputs(ctx: BuildContext, batch_rows: int = URL_BATCH_ROWS, buckets: int | None = None) -> dict:
    """URL list -> uids -> input shards of ingest.shard_rows rows; malformed and repeated rows -> input rejects.
    `batch_rows`: rows read (and keyed by one task) at a time; `buckets`: partitions of the repeat detection
    (default: from the list's size, about BUCKET_ROWS keys each)."""
    folder = ctx.folder
    done = folder.done("input")
    if done is not None:
        return done
    if ctx.spec.source.pairs is not None:
        return prepare_corpus(ctx, buckets=buckets)
    with phase("input") as adv:
        t0 = time.perf_counter()
        work = folder.fresh_dir(folder.work / "input_prep")
        folder.fresh_dir(folder.input_dir)
        buckets = buckets or repeat_buckets(_estimated_rows(location(ctx.spec.source.urls), bytes_per_row=40))
        batches = run_batches(key_url_batch, work, iter_url_list(ctx.spec.source, batch_rows), buckets, adv)
        find_all_repeats(work, buckets)
        for _ in run_tasks(settle_url_batch, ((work, i, ctx.source_name) for i in range(batches))):
            pass
        summary = write_input_shards(ctx, work, batches)
        work.rmtree()
        summary["seconds"] = time.perf_counter() - t0
        folder.mark_done("input", summary)
        adv(0, f"{summary['rows']} to fetch, {summary['rejected']} rejected, {summary['shards']} shards")
    return summary


def prepare_corpus(ctx: BuildContext, buckets: int | None = None) -> dict:
    """An existing corpus (curate): its pairs become finished ingest shards directly (one per batch of
    ingest.shard_rows corpus rows), nothing is downloaded."""
    folder = ctx.folder
    t0 = time.perf_counter()
    with phase("input") as adv:
        work = folder.fresh_dir(folder.work / "input_prep")
        folder.fresh_dir(folder.input_dir)
        folder.fresh_dir(folder.ingest_dir)
        buckets = buckets or repeat_buckets(_estimated_rows(location(ctx.spec.source.pairs), bytes_per_row=2000))
        src, rows = ctx.spec.source, ctx.spec.ingest.shard_rows
        if corpus_kind(src) == "parquet":  # the workers read the pieces; the driver reads footers
            batches = run_batches(key_corpus_piece, work, corpus_pieces(src, rows), buckets, adv,
                                  lead=(folder, ctx.source_name, src))
        else:  # WebDataset tars stream through the driver
            batches = run_batches(key_corpus_batch, work, iter_corpus(src, rows), buckets, adv,
                                  lead=(folder, ctx.source_name))
        find_all_repeats(work, buckets)
        listed = kept = 0
        for settled in run_tasks(settle_corpus_batch, ((folder, work, i, ctx.source_name) for i in range(batches))):
            listed, kept = listed + settled["rows"], kept + settled["kept"]
        with RejectsWriter(folder.input_rejects) as rejects:
            for i in range(batches):
                rejects.write((work / "settled" / f"{i:06d}.rejects.parquet").read_table())
        work.rmtree()
        summary = {"rows_listed": listed, "rows": kept, "rejected": listed - kept, "shards": batches,
                   "seconds": time.perf_counter() - t0}
        folder.mark_done("input", summary)
        adv(0, f"{kept} pairs from the corpus, {listed - kept} rejected, {batches} shards")
    return summary


# --------------------------------------------------------------------------- the distributed steps

def repeat_buckets(rows: int) -> int:
    """Buckets for the repeat detection: about BUCKET_ROWS keys each."""
    return max(1, min(4096, -(-rows // BUCKET_ROWS)))


def _estimated_rows(source: Location, bytes_per_row: int) -> int:
    """Rows of a source, roughly: a Parquet file's own count, else its bytes over `bytes_per_row`."""
    if source.is_file() and source.suffix.lower() == ".parquet":
        return source.read_metadata().num_rows
    files = [source] if source.is_file() else source.rglob("*") if source.is_dir() else []
    return sum(f.size() for f in files) // bytes_per_row


def _task(fn):
    import ray

    return ray.remote(fn).options(num_cpus=1, max_retries=2, retry_exceptions=True, name=fn.__name__)


def _window() -> int:
    """Tasks in flight at once: one per CPU of the cluster, and one queued."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1)) + 1


def run_batches(fn, work: Location, batches, buckets: int, adv, lead: tuple = ()) -> int:
    """Step 1: fn(*lead, work, batch_no, batch, first_row, buckets) as a Ray task per batch (a table, or a piece of
    the source the task reads itself), a few in flight (the driver holds no more); returns how many there were."""
    count = 0

    def args():
        nonlocal count
        first_row = 0
        for count, batch in enumerate(batches, start=1):
            yield (*lead, work, count - 1, batch, first_row, buckets)
            first_row += batch.num_rows

    for rows in run_tasks(fn, args()):
        adv(rows)
    return count


def find_all_repeats(work: Location, buckets: int) -> int:
    """Step 2: one Ray task per bucket; returns how many rows repeat an earlier one."""
    return sum(run_tasks(bucket_repeats, ((work, b) for b in range(buckets))))


def run_tasks(fn, args: Iterable[tuple]) -> Iterator:
    """fn(*a) as a Ray task for each a, a few in flight; yields the results as they come."""
    import ray

    task, pending, window = _task(fn), [], _window()
    for a in args:
        pending.append(task.remote(*a))
        while len(pending) >= window:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    yield from ray.get(pending)


# --------------------------------------------------------------------------- shards and rejects (driver, streaming)

def write_input_shards(ctx: BuildContext, work: Location, batches: int) -> dict:
    """The settled batches, in list order, cut into input shards of ingest.shard_rows; their rejects (and, for an
    incremental build, the rows seen before) into the input rejects. Holds one batch and one shard at a time."""
    folder, n = ctx.folder, ctx.spec.ingest.shard_rows
    seen = SeenFilter(ctx) if ctx.spec.incremental and ctx.spec.catalog_path.exists() else None
    held, held_rows, shards, listed, kept = [], 0, 0, 0, 0
    with RejectsWriter(folder.input_rejects) as rejects:
        for i in range(batches):
            inputs = (work / "settled" / f"{i:06d}.parquet").read_table()
            rejected = (work / "settled" / f"{i:06d}.rejects.parquet").read_table()
            listed += inputs.num_rows + rejected.num_rows
            if seen is not None:
                inputs, skipped = seen(inputs)
                rejected = pa.concat_tables([rejected, skipped])
            rejects.write(rejected)
            held.append(inputs)
            held_rows += inputs.num_rows
            kept += inputs.num_rows
            last = i == batches - 1
            while held_rows >= n or (last and held_rows):
                whole = pa.concat_tables(held)
                atomic_write_table(whole.slice(0, n), folder.input_shard(shards))
                shards += 1
                held = [whole.slice(n)]
                held_rows = held[0].num_rows
    return {"rows_listed": listed, "rows": kept, "rejected": listed - kept, "shards": shards}


class SeenFilter:
    """Incremental: drops from a batch of inputs the uids earlier builds of the source processed (a catalog join a
    batch at a time, never the whole seen set here); returns (inputs, their rejects)."""

    def __init__(self, ctx: BuildContext):
        from catalogs import Catalog

        self.catalog, self.source = Catalog(ctx.spec.catalog_path, read_only=True), ctx.source_name
        earlier = earlier_builds(ctx)
        self.detail = f"seen by {earlier[0]['build_id']}" if earlier else "seen by an earlier build"

    def __call__(self, inputs: pa.Table) -> tuple[pa.Table, pa.Table]:
        uid = inputs.column("uid")
        seen = self.catalog.seen_among(self.source, uid.combine_chunks()) if len(uid) else pa.array([], pa.string())
        if not len(seen):
            return inputs, REJECT_SCHEMA.empty_table()
        mask = pc.is_in(uid, value_set=seen)
        old = inputs.filter(mask)
        k = old.num_rows

        def const(v):
            return pa.repeat(pa.scalar(v, pa.string()), k)

        skipped = pa.table({"uid": old["uid"], "url": old["url"], "text": old["text"], "stage": const("input"),
                            "reason": const("seen_in_earlier_build"), "detail": const(self.detail),
                            "build_id": const(None)}, schema=REJECT_SCHEMA)
        return inputs.filter(pc.invert(mask)), skipped


class RejectsWriter:
    """The input rejects as one Parquet file written a batch at a time, whole or absent: into a local temporary
    file, then moved (locally) or uploaded (object storage) into place."""

    def __init__(self, where: Location):
        self.where = location(where)
        self.rows = 0

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(prefix="pairforge-input-rejects-", suffix=".parquet")
        os.close(fd)
        self.writer = pq.ParquetWriter(self.tmp, REJECT_SCHEMA, compression="zstd")
        return self

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table.cast(REJECT_SCHEMA))
            self.rows += table.num_rows

    def __exit__(self, exc_type, *_):
        try:
            if not self.rows:
                self.writer.write_table(REJECT_SCHEMA.empty_table())
            self.writer.close()
            if exc_type is None:
                self.where.parent.mkdir()
                tmp = self.where.with_name(f".{self.where.name}.tmp")
                pafs.copy_files(self.tmp, tmp.path, destination_filesystem=self.where.fs)
                self.where.fs.move(tmp.path, self.where.path)
        finally:
            os.unlink(self.tmp)


def prior_files(ctx: BuildContext) -> list[Location]:
    """Incremental: the shard files of the earlier builds of the source (the pairs they kept), which the global
    steps read in their workers as `prior` rows (cross-build dedup); never read in the driver."""
    if not ctx.spec.incremental:
        return []
    files = []
    for b in earlier_builds(ctx):
        files += (location(b["out_dir"]) / "shards").glob("part-*.parquet")
    return [f for f in files if f.read_metadata().num_rows]
