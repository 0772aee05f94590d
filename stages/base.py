"""The stage contract. A stage is plain Python over a pyarrow.Table batch; it knows nothing of Prefect or Ray.

- `process_batch(batch)` returns the batch with the stage's stat columns (declared in schemas.columns) added.
  It never drops rows, and leaves the columns it was given as they were, except those it names in `rewrites`
  (the clean stage rewrites `text`, keeping the original in its own `text_raw`); `__call__` checks both.
- `decide(table, params)` is pure over those columns: it returns, per row, a reject reason (None keeps the row)
  and a detail string. Builds and `refilter` share it, so re-thresholding needs no model.
- Resources (cpus, gpus, batch size, pool size) have defaults here and are overridden by the spec.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from schemas.columns import stage_fields
from schemas.spec import StageParams


class StageConfigError(ValueError):
    """A stage that cannot run with its spec (a model that cannot be loaded, say): raised before any work."""


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 256
    pool_size: int = 1  # actors, for stages that load a model

    def override(self, params: StageParams) -> "Resources":
        changes = {k: getattr(params, k) for k in ("cpus", "gpus", "batch_size", "pool_size")}
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class Decision:
    """Per-row outcome of a stage's decide(): reason None keeps the row."""

    reason: list[str | None]
    detail: list[str | None]

    @classmethod
    def keep_all(cls, n: int) -> "Decision":
        return cls([None] * n, [None] * n)

    @classmethod
    def from_mask(cls, mask, reason, detail=None) -> "Decision":
        """Vectorised: rows where the boolean numpy/Arrow `mask` holds get `reason` (a string, or an Arrow array of
        one per row) and `detail` (an Arrow array or None); the others are kept."""
        mask = pa.array(mask, pa.bool_()) if not isinstance(mask, (pa.Array, pa.ChunkedArray)) else mask
        null = pa.scalar(None, pa.string())
        reasons = pc.if_else(mask, reason if not isinstance(reason, str) else pa.scalar(reason, pa.string()), null)
        details = pc.if_else(mask, detail, null) if detail is not None else pa.nulls(len(mask), pa.string())
        return cls(reasons.to_pylist(), details.to_pylist())

    def reject(self, mask, reason: str, detail=None) -> None:
        """Mark rows where mask is true (and not already rejected) with reason; detail is a list or None."""
        for i, m in enumerate(mask):
            if m and self.reason[i] is None:
                self.reason[i] = reason
                self.detail[i] = None if detail is None else detail[i]


def _same_column(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Cheap when the stage passed the column through (the same buffers); a full comparison otherwise."""
    if a.type == b.type and a.num_chunks == b.num_chunks and all(
            [x.address if x is not None else None for x in ca.buffers()] ==
            [y.address if y is not None else None for y in cb.buffers()] and ca.offset == cb.offset
            for ca, cb in zip(a.chunks, b.chunks)):
        return True
    return a.equals(b)


class Stage:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    uses_model: ClassVar[bool] = False  # model stages run as actor pools, others as tasks
    default_resources: ClassVar[Resources] = Resources()
    # True when decide() needs the whole build at once (dedup, top-k) rather than row by row.
    global_decision: ClassVar[bool] = False
    # Input columns this stage may change (with rewrite_column); every other column it is given must come back as is.
    rewrites: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: StageParams):
        self.params = params
        self.resources = self.default_resources.override(params)

    @classmethod
    def runs_as_actor(cls, params: StageParams) -> bool:
        """Whether this configuration loads a model, and so runs on an actor pool (setup once per actor) rather
        than as tasks. Stages whose model depends on their params override this."""
        return cls.uses_model

    # lifecycle -----------------------------------------------------------
    def preflight(self) -> None:
        """Cheap checks run by the flow before any data is read (e.g. that the model can be found).

        Raise StageConfigError naming the model and the reason."""

    def setup(self) -> None:
        """Load models once per actor/process."""

    def teardown(self) -> None:
        """Release what setup() took."""

    def process_batch(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.process_batch(batch)
        if out.num_rows != batch.num_rows:
            raise RuntimeError(f"stage {self.name} changed the row count {batch.num_rows} -> {out.num_rows}")
        for name in batch.column_names:
            if name in self.rewrites:
                continue
            if name not in out.column_names or not _same_column(batch.column(name), out.column(name)):
                raise RuntimeError(f"stage {self.name} changed or dropped its input column {name!r}; a stage may only "
                                   f"change the columns it declares in `rewrites` ({list(self.rewrites)})")
        return out

    # decision --------------------------------------------------------------
    @classmethod
    def decide(cls, table: pa.Table, params: StageParams) -> Decision:
        return Decision.keep_all(table.num_rows)

    def metadata(self) -> dict:
        """What the build records about this stage's run (model name, revision, dtype...)."""
        return {"version": self.version}

    @classmethod
    def output_fields(cls) -> list[pa.Field]:
        return stage_fields(cls.name)

    @classmethod
    def stats_columns(cls) -> list[str]:
        return [f.name for f in cls.output_fields()]

    # helpers for subclasses --------------------------------------------------
    @classmethod
    def rewrite_column(cls, batch: pa.Table, name: str, values) -> pa.Table:
        """Replace input column `name` (one the stage declares in `rewrites`), keeping its field and type."""
        if name not in cls.rewrites:
            raise KeyError(f"stage {cls.name} rewrites column {name!r} without declaring it in `rewrites`")
        i = batch.column_names.index(name)
        field = batch.schema.field(i)
        return batch.set_column(i, field, pa.array(values, type=field.type))

    @classmethod
    def add_columns(cls, batch: pa.Table, values: dict[str, list]) -> pa.Table:
        """Append this stage's declared columns, typed by schemas.columns; unknown names are an error."""
        declared = {f.name: f for f in cls.output_fields()}
        unknown = set(values) - set(declared)
        if unknown:
            raise KeyError(f"stage {cls.name} writes undeclared columns {sorted(unknown)}; declare them in schemas")
        for name, field in declared.items():
            if name not in values:
                raise KeyError(f"stage {cls.name} did not write its column {name}")
            v = values[name]
            arr = v.cast(field.type) if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v, type=field.type)
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), field, arr)
            else:
                batch = batch.append_column(field, arr)
        return batch
