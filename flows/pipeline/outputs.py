"""Outputs: kept rows -> shards/, every rejected row (input, ingest, stages) -> rejects/, the accounting check
(kept + rejected == listed, no uid twice), stats.json and the manifest."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from flows.pipeline.context import BuildContext, BuildError, code_version
from flows.progress import phase
from schemas.columns import INPUT_SCHEMA, build_schema, rejects_schema
from stages.io.shards import ShardWriter, write_manifest


def with_build_id(t: pa.Table, build_id: str) -> pa.Table:
    if "build_id" in t.column_names:
        t = t.drop_columns(["build_id"])
    return t.append_column("build_id", pa.array([build_id] * t.num_rows, pa.string()))


def write_outputs(ctx: BuildContext, decisions: pa.Table) -> dict:
    """Kept rows -> shards/, every rejected row (input, ingest, stages) -> rejects/."""
    folder, spec = ctx.folder, ctx.spec
    for sub in (folder.shards, folder.rejects):
        folder.fresh_dir(sub)
    schema = build_schema(spec.stage_names())
    shards = ShardWriter(folder.shards, schema, spec.write.rows_per_shard, spec.write.compression)
    rejects = ShardWriter(folder.rejects, rejects_schema(spec.stage_names()), spec.write.rows_per_shard,
                          spec.write.compression)
    rejected_uids = decisions.column("uid")
    with phase("write") as adv:
        for f in folder.processed_files():
            for rb in pq.ParquetFile(f).iter_batches(batch_size=1024):
                batch = with_build_id(pa.Table.from_batches([rb]), ctx.build_id)
                is_rej = pc.is_in(batch.column("uid"), value_set=rejected_uids)
                shards.write(batch.filter(pc.invert(is_rej)))
                gone = batch.filter(is_rej)
                if gone.num_rows:
                    at = pc.index_in(gone.column("uid"), value_set=rejected_uids)
                    for col, src in (("stage", "reject_stage"), ("reason", "reject_reason"), ("detail", "reject_detail")):
                        gone = gone.append_column(col, decisions.column(src).take(at))
                    rejects.write(gone)
                adv(batch.num_rows)
        for f in [folder.input_rejects] + folder.ingest_reject_files():
            rejects.write(with_build_id(pq.read_table(f).drop_columns(["build_id"]), ctx.build_id))
        return {"shards": shards.close(), "rejects": rejects.close()}


def _uids(files) -> pa.Array:
    if not files:
        return pa.array([], pa.string())
    return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=["uid"])["uid"].combine_chunks()


def check_accounting(ctx: BuildContext) -> dict:
    """kept uids + rejected uids == listed uids, with no uid twice."""
    folder = ctx.folder
    listed = pads.dataset(str(folder.input_dir), format="parquet", schema=INPUT_SCHEMA).to_table(columns=["uid"])
    listed = pa.concat_arrays([listed.column("uid").combine_chunks(),
                               pq.read_table(folder.input_rejects, columns=["uid"])["uid"].combine_chunks()])
    kept, rej = _uids(folder.parts("shards")), _uids(folder.parts("rejects"))
    out = pa.concat_arrays([kept, rej])
    problems = []
    if len(pc.unique(listed)) != len(listed):
        problems.append("the input has repeated uids")
    if len(pc.unique(out)) != len(out):
        problems.append(f"{len(out) - len(pc.unique(out))} uids appear twice in the output")
    missing = pc.sum(pc.invert(pc.is_in(listed, value_set=out))).as_py() or 0
    extra = pc.sum(pc.invert(pc.is_in(out, value_set=listed))).as_py() or 0
    if missing:
        problems.append(f"{missing} input uids are neither kept nor rejected")
    if extra:
        problems.append(f"{extra} output uids were never listed")
    if problems:
        raise BuildError(f"accounting check failed for build {ctx.build_id}: " + "; ".join(problems))
    return {"listed": len(listed), "kept": len(kept), "rejected": len(rej)}


def _reason_counts(files) -> dict[str, int]:
    if not files:
        return {}
    reasons = pads.dataset([str(f) for f in files], format="parquet").to_table(columns=["reason"])["reason"]
    return {c["values"]: c["counts"] for c in pc.value_counts(reasons).to_pylist()}


def collect_stats(ctx: BuildContext, prepared: dict, ingest: dict, processed: dict, stage_stats: list[dict],
                  write_seconds: float, counts: dict) -> dict:
    folder = ctx.folder
    input_rej = _reason_counts([folder.input_rejects])
    ingest_rej = _reason_counts(folder.ingest_reject_files())
    fetched = prepared["rows"] - sum(ingest_rej.values())
    rows = [
        {"stage": "input", "rows_in": prepared["rows_listed"], "rows_out": prepared["rows"], "rejected": input_rej,
         "seconds": round(prepared["seconds"], 3)},
        {"stage": "ingest", "rows_in": prepared["rows"], "rows_out": fetched, "rejected": ingest_rej,
         "seconds": round(ingest["seconds"], 3)},
    ]
    for s in stage_stats:
        rows.append(s | {"seconds": round(processed.get("stage_seconds", {}).get(s["stage"], 0.0), 3)})
    rows.append({"stage": "write", "rows_in": counts["kept"], "rows_out": counts["kept"], "rejected": {},
                 "seconds": round(write_seconds, 3)})
    return {"build_id": ctx.build_id, "dataset": ctx.spec.dataset, "rows_listed": counts["listed"],
            "rows_kept": counts["kept"], "rows_rejected": counts["rejected"],
            "decodes_per_row": processed.get("decodes_per_row"), "stages": rows}


def manifest(ctx: BuildContext, files: dict) -> dict:
    return write_manifest(
        ctx.build_dir, build_id=ctx.build_id, dataset=ctx.spec.dataset, spec_hash=ctx.spec.spec_hash(),
        code_version=code_version(), shards=files["shards"], rejects=files["rejects"],
        extra={"source": ctx.source_name, "source_fingerprint": ctx.fingerprint,
               "stages": ctx.spec.stage_names(), "stage_metadata": ctx.stage_meta,
               "columns": build_schema(ctx.spec.stage_names()).names})


def processed_uids(ctx: BuildContext) -> pa.Table:
    """uids this build fetched and decided (kept, or rejected by a stage): what later incremental builds skip.

    Rows that failed to download are not marked seen, so a later build tries them again."""
    parts = []
    for sub in ("shards", "rejects"):
        files = ctx.folder.parts(sub)
        if not files:
            continue
        t = pads.dataset([str(f) for f in files], format="parquet").to_table(
            columns=["uid", "sha256"] + (["stage"] if sub == "rejects" else []))
        if sub == "rejects":
            t = t.filter(pc.invert(pc.is_in(t["stage"], value_set=pa.array(["input", "ingest"])))).drop_columns(["stage"])
        parts.append(t)
    t = pa.concat_tables(parts) if parts else pa.table({"uid": pa.array([], pa.string()), "sha256": pa.array([], pa.string())})
    return t.append_column("build_id", pa.array([ctx.build_id] * t.num_rows, pa.string()))
