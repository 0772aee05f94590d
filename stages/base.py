"""The stage contract. A stage is plain Python over a pyarrow.Table batch; it knows nothing of Prefect or Ray.

- `process_batch(batch)` returns the batch with the stage's stat columns (declared in schemas.columns) added.
  It never drops rows.
- `decide(table, params)` is pure over those columns: it returns, per row, a reject reason (None keeps the row)
  and a detail string. Builds and `refilter` share it, so re-thresholding needs no model.
- Resources (cpus, gpus, batch size, pool size) have defaults here and are overridden by the spec.
- A model stage may also define `prepare_batch(batch)`: its CPU work (decode, resize, normalise into model-ready
  arrays), stateless apart from processor settings, written to private columns whose names start with "_". The
  build runs it as Ray Data CPU tasks directly before the stage's actor pool, so the model's process only runs
  the model; process_batch uses those columns when present, prepares the batch itself when called on a plain
  table, and drops them. Private columns never reach the written shards (the build drops any left).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import pyarrow as pa

from schemas.columns import stage_fields
from schemas.spec import StageParams


class StageConfigError(ValueError):
    """A stage that cannot run with its spec (a model that cannot be loaded, say): raised before any work."""


PRIVATE_PREFIX = "_"


def drop_private(table: pa.Table) -> pa.Table:
    """The table without private columns (names starting with "_": a prepare step's hand-over)."""
    private = [c for c in table.column_names if c.startswith(PRIVATE_PREFIX)]
    return table.drop_columns(private) if private else table


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

    def reject(self, mask, reason: str, detail=None) -> None:
        """Mark rows where mask is true (and not already rejected) with reason; detail is a list or None."""
        for i, m in enumerate(mask):
            if m and self.reason[i] is None:
                self.reason[i] = reason
                self.detail[i] = None if detail is None else detail[i]


class Stage:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    uses_model: ClassVar[bool] = False  # model stages run as actor pools, others as tasks
    default_resources: ClassVar[Resources] = Resources()
    # True when decide() needs the whole build at once (dedup, top-k) rather than row by row.
    global_decision: ClassVar[bool] = False

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

    def prepare_batch(self, batch: pa.Table) -> pa.Table:
        """CPU work split off process_batch (see the module docstring); the default prepares nothing."""
        return batch

    @classmethod
    def prepares_batches(cls) -> bool:
        return cls.prepare_batch is not Stage.prepare_batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.process_batch(batch)
        if out.num_rows != batch.num_rows:
            raise RuntimeError(f"stage {self.name} changed the row count {batch.num_rows} -> {out.num_rows}")
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
    def add_private(cls, batch: pa.Table, name: str, array) -> pa.Table:
        """Set a private column (its name starts with "_"), replacing one of that name."""
        if not name.startswith(PRIVATE_PREFIX):
            raise KeyError(f"stage {cls.name}: private column {name!r} must start with {PRIVATE_PREFIX!r}")
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        return batch.append_column(name, array)

    @staticmethod
    def drop_private(batch: pa.Table) -> pa.Table:
        return drop_private(batch)

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
            arr = pa.array(values[name], type=field.type)
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), field, arr)
            else:
                batch = batch.append_column(field, arr)
        return batch
