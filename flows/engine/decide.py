"""Decisions: thresholds from the spec turn each stage's stats into (reject_stage, reject_reason, reject_detail).

Stages decide in spec order; the first that rejects a row owns it, and a stage only ever sees the rows still alive
after the stages before it:
- every stage's decide() runs inside the Ray Data pipeline, batch by batch (`decide_rowwise`, vectorised). A row
  keeps the first row-wise rejection in spec order: its position (`reject_pos`), stage, reason and detail.
- stages with global steps (dedup; align with a top fraction; see stages.steps) decide afterwards, in spec order,
  over the rows alive before them (row-wise rejections at earlier positions and earlier global rejections
  excluded; flows.engine.global_decisions). Their decisions are written under _work/global/, by row id.
The write pass (flows.engine.outputs) combines both per shard: a global rejection owns a row, since it only saw
rows no earlier stage had rejected; otherwise the row-wise rejection, if any.

Every stage's decide() has one signature (table, params, ctx); a DecideContext carries what some need beyond the
rows (the pairs earlier builds kept).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.spec import BuildSpec
from stages import stage_class

DECISION_COLUMNS = ("reject_pos", "reject_stage", "reject_reason", "reject_detail")
DECISION_FIELDS = [pa.field("reject_pos", pa.int32()), pa.field("reject_stage", pa.string()),
                   pa.field("reject_reason", pa.string()), pa.field("reject_detail", pa.string())]


def global_positions(spec: BuildSpec) -> list[int]:
    """Spec positions of the stages with global steps (read from their declarations)."""
    return [k for k, e in enumerate(spec.stages) if stage_class(e.name).decides_globally(e.params)]


def decide_rowwise(batch: pa.Table, spec: BuildSpec) -> pa.Table:
    """Each row-wise stage's decision on a batch, in spec order; a row keeps the first rejection."""
    n = batch.num_rows
    pos = np.full(n, -1, np.int32)
    reason, detail = pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
    for k, entry in enumerate(spec.stages):
        d = stage_class(entry.name).decide(batch, entry.params)
        new = d.rejected & (pos < 0)
        if not new.any():
            continue
        pos[new] = k
        r, dt = d.arrays()
        mask = pa.array(new)
        reason, detail = pc.if_else(mask, r, reason), pc.if_else(mask, dt, detail)
    names = pa.array(spec.stage_names() or [""], pa.string())
    pos_arr = pa.array(pos, pa.int32(), mask=pos < 0)
    for f, col in zip(DECISION_FIELDS, (pos_arr, pc.take(names, pos_arr), reason, detail)):
        batch = batch.append_column(f, col)
    return batch


def alive_before(table: pa.Table, k: int) -> pa.Array:
    """Rows no row-wise stage before position k rejected (global rejections are filtered by the caller)."""
    pos = table.column("reject_pos")
    return pc.fill_null(pc.greater_equal(pos, k), True)
