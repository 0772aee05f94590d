"""Input preparation: a URL list becomes uids and input shards (one per download task), malformed and repeated
rows go to the input rejects; an existing corpus (curate) becomes finished ingest shards directly."""
from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.compute as pc

from flows.pipeline.context import BuildContext, earlier_builds
from flows.progress import phase
from schemas.columns import REJECT_SCHEMA
from stages.io.build_folder import atomic_write_table, atomic_write_text
from stages.io.ingest import assign_uids, corpus_pairs, iter_corpus, read_url_list
from stages.io.storage import location, parquet_dataset


def prepare_inputs(ctx: BuildContext) -> dict:
    """URL list -> uids -> input shards of ingest.shard_rows rows; malformed rows -> input rejects."""
    folder = ctx.folder
    done = folder.done("input")
    if done is not None:
        return done
    if ctx.spec.source.pairs is not None:
        return prepare_corpus(ctx)
    with phase("input") as adv:
        t0 = time.perf_counter()
        table = read_url_list(ctx.spec.source)
        inputs, rejects = assign_uids(table, ctx.source_name)
        if ctx.spec.incremental:
            inputs, rejects = skip_seen(ctx, inputs, rejects)
        folder.fresh_dir(folder.input_dir)
        n = ctx.spec.ingest.shard_rows
        shards = 0
        for shards, start in enumerate(range(0, inputs.num_rows, n), start=1):
            atomic_write_table(inputs.slice(start, n), folder.input_shard(shards - 1))
        atomic_write_table(rejects, folder.input_rejects)
        summary = {"rows_listed": table.num_rows, "rows": inputs.num_rows, "rejected": rejects.num_rows,
                   "shards": shards, "seconds": time.perf_counter() - t0}
        folder.mark_done("input", summary)
        adv(table.num_rows, f"{inputs.num_rows} to fetch, {rejects.num_rows} rejected, {shards} shards")
    return summary


def skip_seen(ctx: BuildContext, inputs: pa.Table, rejects: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Incremental: uids that earlier builds of the source processed are rejected here, never fetched."""
    if not ctx.spec.catalog_path.exists():
        return inputs, rejects
    from catalogs import Catalog

    seen = Catalog(ctx.spec.catalog_path, read_only=True).seen_among(ctx.source_name, inputs.column("uid"))
    if not len(seen):
        return inputs, rejects
    mask = pc.is_in(inputs.column("uid"), value_set=seen)
    old = inputs.filter(mask)
    earlier = earlier_builds(ctx)
    detail = f"seen by {earlier[0]['build_id']}" if earlier else "seen by an earlier build"
    skipped = pa.table({"uid": old["uid"], "url": old["url"], "text": old["text"],
                        "stage": pa.array(["input"] * old.num_rows, pa.string()),
                        "reason": pa.array(["seen_in_earlier_build"] * old.num_rows, pa.string()),
                        "detail": pa.array([detail] * old.num_rows, pa.string()),
                        "build_id": pa.nulls(old.num_rows, pa.string())}, schema=REJECT_SCHEMA)
    return inputs.filter(pc.invert(mask)), pa.concat_tables([rejects, skipped])


def prior_pairs(ctx: BuildContext):
    """Incremental: the pairs earlier builds of the source kept (metadata only), as a Ray Dataset for cross-build
    dedup; read by the workers, never whole in the driver."""
    if not ctx.spec.incremental:
        return None
    import ray

    files = []
    for b in earlier_builds(ctx):
        files += (location(b["out_dir"]) / "shards").glob("part-*.parquet")
    if not files:
        return None
    names = parquet_dataset(files).schema.names
    cols = [c for c in ("uid", "sha256", "phash", "phash_crops", "url_norm", "original_width", "original_height",
                        "image_bytes") if c in names]
    return ray.data.read_parquet([f.path for f in files], filesystem=files[0].fs, columns=cols)


def prepare_corpus(ctx: BuildContext) -> dict:
    """An existing corpus (curate): its pairs become finished ingest shards directly, nothing is downloaded."""
    folder = ctx.folder
    t0 = time.perf_counter()
    folder.fresh_dir(folder.input_dir)
    folder.fresh_dir(folder.ingest_dir)
    seen: dict[str, int] = {}
    listed = kept = 0
    rejects = []
    with phase("input") as adv:
        for shard, batch in enumerate(iter_corpus(ctx.spec.source, ctx.spec.ingest.shard_rows)):
            inputs, pairs, rej = corpus_pairs(batch, ctx.source_name, seen)
            atomic_write_table(inputs, folder.input_shard(shard))
            paths = folder.ingest_shard(shard)
            atomic_write_table(pairs, paths.pairs)
            atomic_write_table(REJECT_SCHEMA.empty_table(), paths.rejects)
            atomic_write_text(paths.done, json.dumps({"shard": shard, "rows_in": inputs.num_rows,
                                                      "pairs": pairs.num_rows, "rejects": 0}))
            rejects.append(rej)
            listed += batch.num_rows
            kept += inputs.num_rows
            adv(batch.num_rows)
        shards = len(list(folder.input_dir.glob("*.parquet")))
        atomic_write_table(pa.concat_tables(rejects) if rejects else REJECT_SCHEMA.empty_table(), folder.input_rejects)
        summary = {"rows_listed": listed, "rows": kept, "rejected": listed - kept, "shards": shards,
                   "seconds": time.perf_counter() - t0}
        folder.mark_done("input", summary)
        adv(0, f"{kept} pairs from the corpus, {listed - kept} rejected, {shards} shards")
    return summary
