"""Outputs, written by workers: one Ray task per input shard joins its image bytes (downloaded, or read from the
corpus pieces a curate shard names) with its processed rows, applies the decisions (row-wise from the pipeline,
global from _work/global) and writes its kept rows to shards/part-SSSSS-NNN.parquet and every other row (ingest
rejects included) to rejects/part-SSSSS-NNN.parquet. Names are deterministic, each file is written atomically, and
a task that finished leaves _work/written/SSSSS.json, so a resumed build rewrites nothing. The driver submits the
writers in a window and folds their results (files, counts) as they come: the manifest, stats.json, and an exact
accounting check.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from flows.engine.context import BuildContext, BuildError, code_version
from flows.engine.decide import DECISION_COLUMNS
from flows.engine.global_decisions import SHIFT, read_shard, shard_decisions
from flows.engine.inputs import run_tasks
from flows.engine.progress import phase
from schemas.columns import build_schema, rejects_schema
from schemas.spec import BuildSpec
from stages.steps import ROW
from dataio.build_folder import BuildFolder, atomic_write_table, atomic_write_text
from dataio.shards import conform, image_formats, write_manifest
from dataio.uids import shard_pairs
from dataio.storage import Location, parquet_dataset


def with_build_id(t: pa.Table, build_id: str) -> pa.Table:
    if "build_id" in t.column_names:
        t = t.drop_columns(["build_id"])
    return t.append_column("build_id", pa.array(np.full(t.num_rows, build_id, dtype=object), pa.string()))


def final_decisions(rows: pa.Table, globals_: list[tuple[int, pa.Table]], names: list[str]) -> pa.Table:
    """Set (stage, reason, detail) on each of one shard's processed rows (in row-id order): a global rejection (it
    saw only rows alive before it) by the row's position, else the row-wise one from the pipeline."""
    stage, reason, detail = (rows.column(c).combine_chunks() for c in ("reject_stage", "reject_reason",
                                                                       "reject_detail"))
    for k, dec in globals_:
        if not dec.num_rows:
            continue
        pos = dec.column(ROW).to_numpy() & ((1 << SHIFT) - 1)
        idx = np.full(rows.num_rows, -1, np.int64)
        idx[pos] = np.arange(dec.num_rows)
        hit, at = pa.array(idx >= 0), pa.array(idx, mask=idx < 0)
        stage = pc.if_else(hit, names[k], stage)
        reason = pc.if_else(hit, pc.take(dec.column("reason"), at), reason)
        detail = pc.if_else(hit, pc.take(dec.column("detail"), at), detail)
    rows = rows.drop_columns([c for c in DECISION_COLUMNS if c in rows.column_names])
    return rows.append_column("stage", stage).append_column("reason", reason).append_column("detail", detail)


def _write_parts(table: pa.Table, folder: Location, src: int, rows_per_shard: int, compression: str) -> list[dict]:
    files = []
    starts = range(0, table.num_rows, rows_per_shard) if table.num_rows else []
    for j, start in enumerate(starts):
        part = table.slice(start, rows_per_shard)
        files.append(atomic_write_table(part, folder / f"part-{src:05d}-{j:03d}.parquet", compression,
                                        checksum=True, row_group_size=max(1, min(part.num_rows, 1024))))
    return files


def write_shard(folder: BuildFolder, src: int, spec: BuildSpec, build_id: str) -> dict:
    """Kept and rejected rows of input shard `src`, written by a worker. Idempotent."""
    marker = folder.work / "written" / f"{src:05d}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    names = spec.stage_names()
    rows = read_shard(folder, src)
    parts = []
    if rows is not None and rows.num_rows:
        rows = final_decisions(rows, shard_decisions(folder.work, spec, src), names)  # by row id: row-id order
        images = pa.concat_tables(list(shard_pairs(spec.source, folder.ingest_shard(src).pairs, ["uid", "image"])))
        at = pc.index_in(rows.column("uid"), value_set=images.column("uid"))  # each row's place in its shard
        if at.null_count:
            raise BuildError(f"input shard {src}: {at.null_count} processed rows are not among its downloads")
        order = pc.sort_indices(at)  # rows in download order: the same files on every run
        parts.append(rows.take(order).append_column("image", images.column("image").take(at.take(order))))
    ingest_rej = folder.ingest_shard(src).rejects
    if ingest_rej.exists():
        parts.append(ingest_rej.read_table())
    rej_schema = rejects_schema(names)
    table = pa.concat_tables([conform(with_build_id(p, build_id), rej_schema) for p in parts]) if parts \
        else rej_schema.empty_table()
    check_shard(folder, src, table)
    is_rej = pc.is_valid(table.column("stage"))
    kept = conform(table.filter(pc.invert(is_rej)), build_schema(names))
    rejected = table.filter(is_rej)
    counts = pc.value_counts(pc.binary_join_element_wise(rejected.column("stage"), rejected.column("reason"), "\t"))
    result = {
        "src": src, "node": _node_id(),
        "shards": _write_parts(kept, folder.shards, src, spec.write.rows_per_shard, spec.write.compression),
        "rejects": _write_parts(rejected, folder.rejects, src, spec.write.rows_per_shard, spec.write.compression),
        "kept": kept.num_rows, "rejected": rejected.num_rows,
        "counts": {c["values"]: c["counts"] for c in counts.to_pylist()},
        "image_formats": image_formats(kept.column("image")),
    }
    atomic_write_text(marker, json.dumps(result))
    return result


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def write_input_rejects(folder: BuildFolder, build_id: str, names: list[str], compression: str,
                        rows_per_shard: int) -> dict:
    marker = folder.work / "written" / "input.json"
    if marker.exists():
        return json.loads(marker.read_text())
    files, n, by = [], 0, {}
    pf = folder.input_rejects.parquet_file()
    schema = rejects_schema(names)
    for j, rb in enumerate(pf.iter_batches(batch_size=rows_per_shard)):
        t = conform(with_build_id(pa.Table.from_batches([rb]), build_id), schema)
        files.append(atomic_write_table(t, folder.rejects / f"part-input-{j:05d}.parquet", compression,
                                        checksum=True))
        n += t.num_rows
        for c in pc.value_counts(t.column("reason")).to_pylist():
            by[f"input\t{c['values']}"] = by.get(f"input\t{c['values']}", 0) + c["counts"]
    result = {"src": "input", "shards": [], "rejects": files, "kept": 0, "rejected": n, "counts": by}
    atomic_write_text(marker, json.dumps(result))
    return result


class Written:
    """What the writers wrote, folded in as each result arrives: the files (manifest entries), kept and rejected
    rows, and rejected rows by stage and reason. O(files) and O(reasons), nothing per row or per task."""

    def __init__(self):
        self.files: dict[str, list[dict]] = {"shards": [], "rejects": []}
        self.kept = self.rejected = 0
        self.counts: dict[str, int] = {}  # "stage\treason" -> rows
        self.image_formats: dict[str, int] = {}  # of the kept images (a writer's marker from before this count has none)

    def add(self, result: dict) -> None:
        for key in self.files:
            self.files[key] += result[key]
        self.kept += result["kept"]
        self.rejected += result["rejected"]
        for key, c in result["counts"].items():
            self.counts[key] = self.counts.get(key, 0) + c
        for kind, n in result.get("image_formats", {}).items():
            self.image_formats[kind] = self.image_formats.get(kind, 0) + n

    def sorted_files(self, key: str) -> list[dict]:
        return sorted(self.files[key], key=lambda f: f["path"])


def write_outputs(ctx: BuildContext, shards: int) -> Written:
    """One writer task per input shard (and one for the input rejects), a window of them in flight; their results
    folded as they come."""
    folder, spec = ctx.folder, ctx.spec
    for sub in (folder.shards, folder.rejects):
        sub.mkdir()
    written = Written()
    written.add(write_input_rejects(folder, ctx.build_id, spec.stage_names(), spec.write.compression,
                                    spec.write.rows_per_shard))
    with phase("write", total=shards, unit="shards") as adv:
        for result in run_tasks(write_shard, ((folder, s, spec, ctx.build_id) for s in range(shards)),
                                num_cpus=0.5, scheduling_strategy="SPREAD"):  # every node writes its share
            written.add(result)
            adv(1)
    # readers find a schema even where no row went: one empty part with it
    for key, sub, schema in (("shards", folder.shards, build_schema(spec.stage_names())),
                             ("rejects", folder.rejects, rejects_schema(spec.stage_names()))):
        if not written.files[key]:
            written.files[key].append(atomic_write_table(schema.empty_table(), sub / "part-00000-000.parquet",
                                                         spec.write.compression, checksum=True))
    return written


# --------------------------------------------------------------------------- accounting, stats, manifest

def check_shard(folder: BuildFolder, src: int, written: pa.Table) -> None:
    """The uids a writer wrote are exactly its input shard's: each once, none missing, none from elsewhere."""
    listed = folder.input_shard(src).read_table(columns=["uid"]).column("uid")
    out = written.column("uid")
    problems = []
    if len(pc.unique(out)) != len(out):
        problems.append(f"{len(out) - len(pc.unique(out))} uids written twice")
    missing = pc.sum(pc.invert(pc.is_in(listed, value_set=out))).as_py() or 0
    strangers = pc.sum(pc.invert(pc.is_in(out, value_set=listed))).as_py() or 0
    if missing:
        problems.append(f"{missing} listed uids neither kept nor rejected")
    if strangers:
        problems.append(f"{strangers} uids written that the shard does not list")
    if problems:
        raise BuildError(f"accounting check failed for input shard {src}: " + "; ".join(problems))


def check_accounting(ctx: BuildContext, written: Written) -> dict:
    """kept + rejected == listed, with no uid twice. Each writer checked its own input shard's uids (exactly
    once each, nothing else); uids are unique across shards by construction (flows.engine.inputs), so the
    driver only adds up counts."""
    folder = ctx.folder
    input_files = folder.input_dir.glob("[0-9]*.parquet") + [folder.input_rejects]
    listed = sum(f.read_metadata().num_rows for f in input_files)
    if written.kept + written.rejected != listed:
        raise BuildError(f"accounting check failed for build {ctx.build_id}: {listed} listed but {written.kept} "
                         f"kept + {written.rejected} rejected")
    return {"listed": listed, "kept": written.kept, "rejected": written.rejected}


def collect_stats(ctx: BuildContext, prepared: dict, ingest: dict, processed: dict, global_: dict,
                  written: Written, write_seconds: float, counts: dict) -> dict:
    by: dict[str, dict[str, int]] = {}
    for key, c in written.counts.items():
        stage, reason = key.split("\t", 1)
        by.setdefault(stage, {})
        by[stage][reason] = by[stage].get(reason, 0) + c
    fetched = prepared["rows"] - sum(by.get("ingest", {}).values())
    rows = [
        {"stage": "input", "rows_in": prepared["rows_listed"], "rows_out": prepared["rows"],
         "rejected": by.get("input", {}), "seconds": round(prepared["seconds"], 3)},
        {"stage": "ingest", "rows_in": prepared["rows"], "rows_out": fetched, "rejected": by.get("ingest", {}),
         "seconds": round(ingest["seconds"], 3)},
    ]
    alive = fetched
    seconds, spans = processed.get("stage_seconds", {}), processed.get("stage_spans", {})
    for name in ctx.spec.stage_names():
        rej = by.get(name, {})
        n = sum(rej.values())
        sec = seconds.get(name, 0.0) + global_.get(name, {}).get("seconds", 0.0)
        row = {"stage": name, "rows_in": alive, "rows_out": alive - n, "rejected": rej, "seconds": round(sec, 3)}
        if name in global_:  # its global steps: rejections, seconds, and what they found (a top fraction's cutoff)
            row["global_steps"] = global_[name]["steps"]
            row["global_mode"] = global_[name]["mode"]
        if name in spans:  # first batch in to last batch out, wall clock: rows_in / this is the stage's rate
            span = spans[name]
            row.update(span_seconds=round(span["last"] - span["first"], 3), span_start=round(span["first"], 3),
                       cpu_seconds=round(span["cpu_seconds"], 3))
            prep = spans.get(f"{name}.prepare")
            if prep:  # its prepare tasks (decode, resize), wherever Ray ran them: time inside them
                row.update(prepare_seconds=round(seconds.get(f"{name}.prepare", 0.0), 3),
                           prepare_cpu_seconds=round(prep["cpu_seconds"], 3))
        rows.append(row)
        alive -= n
    rows.append({"stage": "write", "rows_in": counts["kept"], "rows_out": counts["kept"], "rejected": {},
                 "seconds": round(write_seconds, 3)})
    return {"build_id": ctx.build_id, "dataset": ctx.spec.dataset, "rows_listed": counts["listed"],
            "rows_kept": counts["kept"], "rows_rejected": counts["rejected"],
            "decodes_per_row": processed.get("decodes_per_row"), "stages": rows}


def manifest(ctx: BuildContext, written: Written) -> dict:
    return write_manifest(
        ctx.build_dir, build_id=ctx.build_id, dataset=ctx.spec.dataset, spec_hash=ctx.spec.spec_hash(),
        code_version=code_version(), shards=written.sorted_files("shards"), rejects=written.sorted_files("rejects"),
        extra={"source": ctx.source_name, "source_fingerprint": ctx.fingerprint,
               "stages": ctx.spec.stage_names(), "stage_metadata": ctx.stage_meta,
               "columns": build_schema(ctx.spec.stage_names()).names, "image_formats": written.image_formats})


def seen_readers(ctx: BuildContext) -> Iterator:
    """(uid, sha256) of the rows this build fetched and decided, a reader per file, opened as the catalog streams
    them: kept rows and stage rejects. Rows that failed to download are not marked seen, so a later build tries
    them again."""
    for sub in ("shards", "rejects"):
        where = None if sub == "shards" else ~pads.field("stage").isin(["input", "ingest"])
        for f in ctx.folder.parts(sub):
            yield parquet_dataset([f]).scanner(columns=["uid", "sha256"], filter=where).to_reader()
