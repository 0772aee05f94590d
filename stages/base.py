"""The stage contract. A stage is plain Python over a pyarrow.Table batch; it knows nothing of Prefect or Ray.

A stage declares, in its own file:
- `name` (as written in the spec) and `version` (bumped when its output changes);
- `Params`, the pydantic model of its spec entry (resources come from StageParams);
- `columns`: every column it adds, with its Arrow type, a one-line meaning and its role in reports;
- `reasons`: every reject reason its decide() may emit, with the stat columns that decide it and the spec
  parameters it compares them with;
- `default_resources`, and whether it loads a model (`uses_model`) or reads images (`needs_image`: decoded pixels,
  or the `image` bytes themselves, which no later step gets; a stage that decodes without declaring it fails in
  Stage.__call__), and at what size (`pixel_side`);
- `reads`: the columns of its batch it reads (the core record's, and other stages' when they are there).

Defining the class registers it (Stage.__init_subclass__): the spec's stage params, the build schema, the report's
distributions and threshold lines, `pairforge show`, refilter's `--set` and the README stage table all derive from
these declarations. Lifecycle: preflight() (before any data), setup() once per worker, process_batch() per batch,
teardown() when the worker ends. decide(table, params, ctx) is pure over columns, so builds and refilter share it.
A decision over the whole build is declared as steps (`global_steps`, stages.steps) that the engine runs.

A model stage may also define `prepare_batch(batch)`: its CPU work (decode, resize, normalise into model-ready
arrays), written to private columns (names start with "_"). The build runs it as Ray Data CPU tasks directly before
the stage's actor pool, so the model's process only runs the model; process_batch uses those columns when present,
prepares the batch itself when called on a plain table, and drops them. Private columns never reach the shards.
When the stage is the last that reads images, the build drops `image` and the shared decode's pixels after its
prepare step, so only what the prepare step made for the model (and the row's small columns) reach its actors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import registry as stage_registry
from schemas.errors import UserError
from schemas.spec import StageParams
from stages.imaging.decode import decodes


class StageConfigError(UserError):
    """A stage that cannot run with its spec (a model that cannot be loaded, say): raised before any work."""


class StageDeclarationError(TypeError):
    """A stage class whose declarations do not hold together (raised when its module is imported)."""


PRIVATE_PREFIX = "_"


def drop_private(table: pa.Table) -> pa.Table:
    """The table without private columns (names starting with "_": prepare steps' and the shared decode's)."""
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


ColumnRole = Literal["stat", "category", "detail", "data"]


@dataclass(frozen=True)
class Column:
    """A column a stage adds. role: stat (a number worth a histogram), category (a label worth counts), detail
    (text shown beside a decision), data (hashes, embeddings, lists: carried, never plotted)."""

    name: str
    type: pa.DataType
    doc: str
    role: ColumnRole = "stat"

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.type)


@dataclass(frozen=True)
class Threshold:
    """A spec parameter compared with a stat column: bound "min" rejects rows below it, "max" rows above it."""

    column: str
    param: str
    bound: Literal["min", "max"]


@dataclass(frozen=True)
class Reason:
    """A reject reason: what it means, the stat columns shown with it, the parameter that decides it (param, or the
    first threshold's) and the thresholds drawn on those columns' histograms."""

    name: str
    doc: str
    stats: tuple[str, ...] = ()
    thresholds: tuple[Threshold, ...] = ()
    param: str | None = None

    @property
    def deciding_param(self) -> str | None:
        return self.param or (self.thresholds[0].param if self.thresholds else None)


@dataclass
class DecideContext:
    """What some decisions need beyond the rows: the pairs earlier builds of the source kept (incremental dedup)."""

    prior: pa.Table | None = None


def _bool_mask(mask, n: int) -> np.ndarray:
    if isinstance(mask, (pa.Array, pa.ChunkedArray)):
        mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
    out = np.asarray(mask, dtype=bool)
    if out.shape != (n,):
        raise ValueError(f"a decision mask must have one entry per row ({n}), got shape {out.shape}")
    return out


def _string_array(detail, n: int) -> pa.Array:
    if detail is None:
        return pa.nulls(n, pa.string())
    if isinstance(detail, str):
        return pa.array(np.full(n, detail, dtype=object), pa.string())
    if isinstance(detail, pa.ChunkedArray):
        detail = detail.combine_chunks()
    arr = detail if isinstance(detail, pa.Array) else pa.array(detail, pa.string())
    if len(arr) != n:
        raise ValueError(f"a decision detail must have one entry per row ({n}), got {len(arr)}")
    return arr.cast(pa.string())


class Decision:
    """Per-row outcome of a stage's decide(): the first reject() that marks a row owns it; reason null keeps it.

    Masks and details are whole columns (numpy or Arrow), never loops over rows."""

    def __init__(self, n: int, allowed: frozenset[str] | None = None, stage: str = "?"):
        self.n = n
        self._code = np.full(n, -1, np.int32)
        self._reasons: list[str] = []
        self._details: list[pa.Array] = []
        self._allowed = allowed
        self._stage = stage

    @classmethod
    def keep_all(cls, n: int) -> "Decision":
        return cls(n)

    def reject(self, mask, reason: str, detail=None) -> None:
        """Mark rows where mask is true (and not already rejected) with reason; detail: a column, a string or None."""
        if self._allowed is not None and reason not in self._allowed:
            raise StageDeclarationError(f"stage {self._stage} emits reason {reason!r}, which it does not declare "
                                        f"(declared: {sorted(self._allowed)})")
        m = _bool_mask(mask, self.n) & (self._code < 0)
        if not m.any():
            return
        self._code[m] = len(self._reasons)
        self._reasons.append(reason)
        self._details.append(_string_array(detail, self.n))

    def reject_rows(self, rows: np.ndarray, reason: str, detail=None) -> None:
        """reject() for the rows at positions `rows`, with detail a column aligned with `rows`."""
        pos = np.full(self.n, -1, np.int64)
        pos[rows] = np.arange(len(rows))
        full = None
        if detail is not None:
            full = pc.take(_string_array(detail, len(rows)), pa.array(pos, pa.int64(), mask=pos < 0))
        self.reject(pos >= 0, reason, full)

    @property
    def rejected(self) -> np.ndarray:
        return self._code >= 0

    def arrays(self) -> tuple[pa.Array, pa.Array]:
        """(reason, detail) as string columns; null where the row is kept."""
        codes = pa.array(self._code, pa.int32(), mask=self._code < 0)
        reason = pc.take(pa.array(self._reasons, pa.string()), codes) if self._reasons else pa.nulls(self.n, pa.string())
        detail = pa.nulls(self.n, pa.string())
        for k, d in enumerate(self._details):
            detail = pc.if_else(pa.array(self._code == k), d, detail)
        return reason, detail

    @property
    def reason(self) -> list[str | None]:
        return self.arrays()[0].to_pylist()

    @property
    def detail(self) -> list[str | None]:
        return self.arrays()[1].to_pylist()


# --------------------------------------------------------------------------- vectorised detail text

def fixed(values, decimals: int) -> pa.Array:
    """Numbers as fixed-point text, like f"{v:.{decimals}f}" (round half to even); nulls stay null."""
    x = pc.cast(values, pa.float64())
    scale = 10 ** decimals
    scaled = pc.cast(pc.round(pc.multiply(pc.abs(x), scale)), pa.int64())
    whole = pc.cast(pc.divide(scaled, scale), pa.string())
    sign = pc.if_else(pc.and_(pc.less(x, 0), pc.greater(scaled, 0)), "-", "")
    if decimals == 0:
        return pc.binary_join_element_wise(sign, whole, "")
    frac = pc.utf8_lpad(pc.cast(pc.subtract(scaled, pc.multiply(pc.divide(scaled, scale), scale)), pa.string()),
                        width=decimals, padding="0")
    return pc.binary_join_element_wise(sign, whole, ".", frac, "")


def as_text(values) -> pa.Array:
    """Any column as text (ints, strings); nulls stay null."""
    return pc.cast(values, pa.string())


def concat(*parts) -> pa.Array:
    """Element-wise concatenation of columns and literal strings; a null part makes the row null."""
    return pc.binary_join_element_wise(*parts, "")


# --------------------------------------------------------------------------- the stage

class Stage:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    Params: ClassVar[type[StageParams]] = StageParams
    columns: ClassVar[tuple[Column, ...]] = ()
    reasons: ClassVar[tuple[Reason, ...]] = ()
    default_resources: ClassVar[Resources] = Resources()
    uses_model: ClassVar[bool] = False  # model stages run as actor pools, others as tasks
    needs_image: ClassVar[bool] = False  # reads images: decoded pixels (stages.imaging.decode) or `image` bytes
    summary: ClassVar[str] = ""  # one line for the README stage table
    # Input columns this stage may change (rewrite_column); every other column it is given must come back as is.
    rewrites: ClassVar[tuple[str, ...]] = ()
    # Columns of its batch the stage reads: the core record's and other stages' (those an earlier stage may not have
    # written, such as clean's text_raw, are read when present). Declared for the contract test and for readers.
    reads: ClassVar[tuple[str, ...]] = ()

    registry: ClassVar[dict[str, type["Stage"]]] = stage_registry.STAGES  # filled as stage modules are imported

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "name" not in cls.__dict__:
            return
        _check_declarations(cls)
        try:
            stage_registry.register(cls)
        except ValueError as e:
            raise StageDeclarationError(str(e)) from None

    def __init__(self, params: StageParams | None = None):
        self.params = params if params is not None else self.Params()
        self.resources = self.default_resources.override(self.params)

    @classmethod
    def runs_as_actor(cls, params: StageParams) -> bool:
        """Whether this configuration loads a model, and so runs on an actor pool (setup once per actor) rather
        than as tasks. Stages whose model depends on their params override this."""
        return cls.uses_model

    @classmethod
    def global_steps(cls, params: StageParams) -> tuple:
        """The steps of a decision over the whole build (dedup, a top fraction, concept balancing), which the engine
        runs after every row-wise decision of the stages before this one (stages.steps); () for a stage whose
        decide() needs one batch only. A stage may have both: decide() row by row, then its steps."""
        return ()

    @classmethod
    def decides_globally(cls, params: StageParams) -> bool:
        return bool(cls.global_steps(params))

    @classmethod
    def reads_pixels(cls, params: StageParams) -> bool:
        """Whether this configuration reads the shared decode's pixels (stages.imaging.decode). A stage that
        needs_image but decodes elsewhere (align decoding JPEGs on the GPU) answers False; it still gets `image`."""
        return cls.needs_image

    @classmethod
    def pixel_side(cls, params: StageParams) -> int | None:
        """The shorter side, in pixels, this stage needs of an image it reads: the shared decode may decode a JPEG
        at a reduced scale down to the largest need of a spec's image stages (stages.imaging.decode), never below.
        None (the default): the image as stored. 0: only whether it decodes and its stored size."""
        return None

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
        before = decodes()
        out = self.process_batch(batch)
        if not self.needs_image and decodes() != before:  # the build decodes only for stages that declare it
            raise StageDeclarationError(f"stage {self.name} decoded images but does not declare `needs_image`; the "
                                        f"build decodes each batch once, for the stages that do")
        if out.num_rows != batch.num_rows:
            raise RuntimeError(f"stage {self.name} changed the row count {batch.num_rows} -> {out.num_rows}")
        for name in batch.column_names:
            if name in self.rewrites or name.startswith(PRIVATE_PREFIX):  # private hand-overs may be consumed
                continue
            if name not in out.column_names or not _same_column(batch.column(name), out.column(name)):
                raise RuntimeError(f"stage {self.name} changed or dropped its input column {name!r}; a stage may only "
                                   f"change the columns it declares in `rewrites` ({list(self.rewrites)})")
        return out

    # decision --------------------------------------------------------------
    @classmethod
    def decision(cls, n: int) -> Decision:
        """An all-kept Decision that accepts only this stage's declared reasons."""
        return Decision(n, frozenset(r.name for r in cls.reasons), cls.name)

    @classmethod
    def decide(cls, table: pa.Table, params: StageParams, ctx: DecideContext | None = None) -> Decision:
        return cls.decision(table.num_rows)

    def metadata(self) -> dict:
        """What the build records about this stage's run (model name, revision, dtype...)."""
        return {"version": self.version}

    # declarations ------------------------------------------------------------
    @classmethod
    def output_fields(cls) -> list[pa.Field]:
        return [c.field for c in cls.columns]

    @classmethod
    def stats_columns(cls) -> list[str]:
        return [c.name for c in cls.columns]

    @classmethod
    def reason(cls, name: str) -> Reason:
        for r in cls.reasons:
            if r.name == name:
                return r
        raise KeyError(f"stage {cls.name} declares no reason {name!r}")

    # helpers for subclasses --------------------------------------------------
    @classmethod
    def rewrite_column(cls, batch: pa.Table, name: str, values) -> pa.Table:
        """Replace input column `name` (one the stage declares in `rewrites`), keeping its field and type."""
        if name not in cls.rewrites:
            raise StageDeclarationError(f"stage {cls.name} rewrites column {name!r} without declaring it in `rewrites`")
        i = batch.column_names.index(name)
        fld = batch.schema.field(i)
        arr = values.cast(fld.type) if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, fld.type)
        return batch.set_column(i, fld, arr)

    @classmethod
    def add_private(cls, batch: pa.Table, name: str, array) -> pa.Table:
        """Set a private column (its name starts with "_"), replacing one of that name."""
        if not name.startswith(PRIVATE_PREFIX):
            raise KeyError(f"stage {cls.name}: private column {name!r} must start with {PRIVATE_PREFIX!r}")
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        return batch.append_column(name, array)


    @classmethod
    def add_columns(cls, batch: pa.Table, values: dict[str, Any]) -> pa.Table:
        """Append this stage's declared columns, typed as declared; unknown or missing names are an error."""
        declared = {c.name: c.field for c in cls.columns}
        unknown = set(values) - set(declared)
        if unknown:
            raise StageDeclarationError(f"stage {cls.name} writes undeclared columns {sorted(unknown)}; declare them "
                                        f"in its `columns`")
        for name, fld in declared.items():
            if name not in values:
                raise StageDeclarationError(f"stage {cls.name} did not write its column {name}")
            arr = as_declared(values[name], fld, cls.name)
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), fld, arr)
            else:
                batch = batch.append_column(fld, arr)
        return batch


def as_declared(values, fld: pa.Field, stage: str) -> pa.Array | pa.ChunkedArray:
    """values as the declared column type by a safe cast: a lossy one (1.5 or 3e9 into an int32 column, a struct
    member likewise) raises StageDeclarationError naming the stage and the column. Python lists are read with
    their own types first, because pyarrow truncates floats read straight into an integer type."""
    try:
        if isinstance(values, (pa.Array, pa.ChunkedArray, np.ndarray)):
            arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
        else:
            try:
                arr = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed Python types: read as the declared type
                return pa.array(values, type=fld.type)
        return arr if arr.type == fld.type else arr.cast(fld.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as e:
        raise StageDeclarationError(f"stage {stage} writes column {fld.name!r} declared {fld.type}, and its values "
                                    f"do not fit that type without loss: {e}") from None


def _same_column(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Cheap when the stage passed the column through (the same buffers); a full comparison otherwise."""
    if a.type == b.type and a.num_chunks == b.num_chunks and all(
            [x.address if x is not None else None for x in ca.buffers()] ==
            [y.address if y is not None else None for y in cb.buffers()] and ca.offset == cb.offset
            for ca, cb in zip(a.chunks, b.chunks)):
        return True
    return a.equals(b)


def _check_declarations(cls: type[Stage]) -> None:
    """Declarations must hold together: fail when the stage's module is imported, not inside a worker."""
    where = f"stage {cls.__dict__.get('name')!r} ({cls.__module__}.{cls.__qualname__})"
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, StageParams)):
        raise StageDeclarationError(f"{where}: Params must be a StageParams subclass")
    names = [c.name for c in cls.columns]
    if len(set(names)) != len(names):
        raise StageDeclarationError(f"{where}: a column is declared twice: {names}")
    params = set(cls.Params.model_fields)
    seen = set()
    for r in cls.reasons:
        if r.name in seen:
            raise StageDeclarationError(f"{where}: reason {r.name!r} is declared twice")
        seen.add(r.name)
        for p in [r.param] + [t.param for t in r.thresholds]:
            if p is not None and p not in params:
                raise StageDeclarationError(f"{where}: reason {r.name!r} names parameter {p!r}, which {cls.Params.__name__} "
                                            f"does not have")


__all__ = ["Column", "DecideContext", "Decision", "Reason", "Resources", "Stage", "StageConfigError",
           "StageDeclarationError", "Threshold", "as_text", "concat", "fixed"]
