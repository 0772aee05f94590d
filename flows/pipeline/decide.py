"""Decisions: thresholds from the spec turn each stage's stats into (reject_stage, reject_reason, reject_detail).

Stages decide in spec order and the first that rejects a row owns it. Every stage's decide() has one signature,
(table, params, ctx): a DecideContext carries what some need beyond the rows (the pairs earlier builds kept).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from flows.pipeline.context import BuildContext
from schemas.columns import HEAVY_COLUMNS, build_schema
from schemas.spec import BuildSpec
from stages import stage_class
from stages.base import DecideContext


def read_metadata(ctx: BuildContext) -> pa.Table:
    """Every processed row without its image bytes: what global decisions read."""
    files = [f for f in ctx.folder.processed_files() if pq.read_metadata(f).num_rows]  # empty ones lack columns
    if not files:
        return build_schema(ctx.spec.stage_names()).empty_table()
    ds = pads.dataset([str(f) for f in files], format="parquet")
    cols = [c for c in ds.schema.names if c not in HEAVY_COLUMNS]
    return ds.to_table(columns=cols)


def decide(spec: BuildSpec, meta: pa.Table, dctx: DecideContext | None = None) -> tuple[pa.Table, list[dict]]:
    """The decisions of rejected rows (uid, reject_stage, reject_reason, reject_detail) and per-stage counts
    (rows in, out, rejected by reason)."""
    dctx = dctx or DecideContext()
    n = meta.num_rows
    owner = np.full(n, -1, np.int32)
    reason = pa.nulls(n, pa.string())
    detail = pa.nulls(n, pa.string())
    stats = []
    alive = n
    for k, entry in enumerate(spec.stages):
        d = stage_class(entry.name).decide(meta, entry.params, dctx)
        r, dt = d.arrays()
        new = d.rejected & (owner < 0)
        owner[new] = k
        mask = pa.array(new)
        reason, detail = pc.if_else(mask, r, reason), pc.if_else(mask, dt, detail)
        counts = pc.value_counts(r.filter(mask)).to_pylist() if new.any() else []
        by_reason = {c["values"]: c["counts"] for c in counts}
        rejected = int(new.sum())
        stats.append({"stage": entry.name, "rows_in": alive, "rows_out": alive - rejected, "rejected": by_reason})
        alive -= rejected
    names = pa.array(spec.stage_names() or [""], pa.string())
    stage = pc.take(names, pa.array(owner, pa.int32(), mask=owner < 0))
    rejected = pa.array(owner >= 0)
    decisions = pa.table({
        "uid": meta.column("uid") if n else pa.array([], pa.string()),
        "reject_stage": stage, "reject_reason": reason, "reject_detail": detail,
    }).filter(rejected)
    return decisions, stats
