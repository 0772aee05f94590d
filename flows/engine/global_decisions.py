"""Global decisions: the steps global stages declare (stages.steps), run over the whole build.

After the stats pass, every stage with steps is decided in spec order, and its steps in their order, each over the
rows alive after every decision before it (row-wise rejections at earlier positions, the earlier global steps).
Rows come from _work/processed/input_shard=N/ (stats and decisions, no image bytes). A row's id is
N << 32 | its position among shard N's processed rows, read in file order: the writer of shard N reads the same files
in the same order, so it applies a decision by position, with no join and no uid strings.

One implementation, two ways to run it:
- in one process: builds of at most decide.driver_max_rows rows (prior rows included) run every step in ONE Ray task
  with one partition (no shuffle start-up; the driver holds nothing);
- distributed: per step, map tasks (one per run of input shards of about ROWS_PER_TASK rows, and per run of prior
  files) read their rows and run the step's map function; a Shuffle's keys are split into P hash partitions in the
  map task and each of P reduce tasks receives its partition from every map task (plain Ray tasks with P returns:
  one all-to-all exchange per Shuffle, nothing through the driver). Survivors run in one task over the edges,
  after tasks that read, where they live, the rows the edges touch (when the step's join needs them).
  TopFraction finds its exact cutoff from a sample that brackets it (only the rows inside the bracket travel), then
  map tasks decide; Counts sum per key in the reduce tasks and hand the counts (bounded by the keys, not the rows)
  to map tasks that decide; Fit gathers a uid-hash sample in one task.

Each task that decides writes its decisions itself: _work/global/<kk>-<stage>/<ss>-<step>/part-NNNNN.parquet,
(row, reason, detail) sorted by row in row groups, so a shard's writer reads only the row groups of its range.
A step that finished leaves _DONE.json (its counts and seconds): a resumed build skips it; a step killed midway is
run again (it writes the same files).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dataio.build_folder import BuildFolder, atomic_write_table, atomic_write_text
from dataio.storage import Location, location, parquet_dataset
from flows.engine.context import BuildContext
from flows.engine.decide import global_positions
from flows.engine.progress import phase
from schemas.spec import BuildSpec
from stages import stage_class
from stages.steps import (DECISION_SCHEMA, KEY, PRIOR, ROW, Counts, Fit, Shuffle, StepContext, TopFraction,
                          below_cutoff, distinct, key_runs, survivor_decisions, top_fraction_keep)

log = logging.getLogger("pairforge")
SRC = "input_shard"  # the input shard a processed row came from (processed rows are hive-partitioned by it)
ROWS_PER_TASK = 250_000  # rows a map task reads
ROW_GROUP = 65_536  # rows per row group of a decision file
SHIFT = 32  # row id = input shard << SHIFT | position
EMPTY_DECISIONS = pa.Table.from_batches([], schema=DECISION_SCHEMA)  # (Schema.empty_table() imports pandas)


# ------------------------------------------------------------------------------------------------ where rows live

def shard_files(folder: BuildFolder, src: int) -> list[Location]:
    """Processed files of input shard `src`, in the order that numbers its rows."""
    return (folder.processed_dir / f"{SRC}={src}").glob("*.parquet")


def read_shard(folder: BuildFolder, src: int, columns: list[str] | None = None) -> pa.Table | None:
    """Shard `src`'s processed rows in row-id order (the writer and the global steps read them the same way)."""
    files = shard_files(folder, src)
    if not files:
        return None
    ds = parquet_dataset(files)
    if columns is not None:
        columns = [c for c in columns if c in ds.schema.names]
    return ds.to_table(columns=columns)


def step_dirs(work: Location, spec: BuildSpec) -> list[tuple[int, str, Location]]:
    """(stage position, stage name, folder) of every global step of the spec, in decision order."""
    out = []
    for k in global_positions(spec):
        entry = spec.stages[k]
        for i, step in enumerate(stage_class(entry.name).global_steps(entry.params)):
            out.append((k, entry.name, work / "global" / f"{k:02d}-{entry.name}" / f"{i:02d}-{step.name}"))
    return out


def read_decisions(files: list[Location], lo: int, hi: int) -> pa.Table:
    """Decisions of rows lo <= row < hi from decision files (row groups outside the range are skipped)."""
    if not files:
        return EMPTY_DECISIONS
    return parquet_dataset(files, schema=DECISION_SCHEMA).to_table(
        filter=(pc.field(ROW) >= lo) & (pc.field(ROW) < hi))


def shard_decisions(work: Location, spec: BuildSpec, src: int) -> list[tuple[int, pa.Table]]:
    """(stage position, decisions) of every global step for input shard `src` (what its writer applies)."""
    lo, hi = src << SHIFT, (src + 1) << SHIFT
    return [(k, read_decisions(d.glob("part-*.parquet"), lo, hi)) for k, _, d in step_dirs(work, spec)]


# ------------------------------------------------------------------------------------------------ a step's job

@dataclass(frozen=True)
class Source:
    """Rows a map task reads: a run of input shards, a run of prior files (rows of earlier builds), or a table."""

    shards: tuple[int, ...] = ()
    prior_files: tuple[str, ...] = ()
    prior_first: int = 0  # index of the first prior file (prior row ids: -1 - (file index << SHIFT | position))
    table: pa.Table | None = None  # in-memory rows (tests, refilter of tables): `row` and `prior` set

    def span(self) -> tuple[int, int]:
        """The row ids lo <= row < hi the source's rows have (the spans of a phase's sources never overlap)."""
        if self.table is not None:
            rows = self.table.column(ROW)
            return (int(pc.min(rows).as_py()), int(pc.max(rows).as_py()) + 1) if len(rows) else (0, 0)
        if self.shards:
            return min(self.shards) << SHIFT, (max(self.shards) + 1) << SHIFT
        return -((self.prior_first + len(self.prior_files)) << SHIFT), -(self.prior_first << SHIFT)


@dataclass(frozen=True)
class Job:
    """One step of one stage, as the tasks see it (sent by value; the stage's functions are looked up by name)."""

    folder: str | None  # the build folder; None when the rows are in-memory tables
    stage: str
    position: int
    params_json: str
    index: int  # the step's index among the stage's steps
    earlier: tuple[str, ...] = ()  # decision files of every earlier step (earlier stages and this one)
    rows_hint: int = 0  # rows the stage sees, at most (steps size their plans with it)
    state: dict = field(default_factory=dict)  # Fit results of the stage's earlier steps

    @property
    def params(self):
        cls = stage_class(self.stage)
        return cls.Params.model_validate_json(self.params_json)

    @property
    def step(self):
        return stage_class(self.stage).global_steps(self.params)[self.index]

    def context(self) -> StepContext:
        return StepContext(self.params, dict(self.state) | {"rows": self.rows_hint})


def read_rows(job: Job, source: Source, *, rowwise: bool = False, columns: tuple[str, ...] | None = None,
              alive: bool = True) -> pa.Table:
    """The rows of `source` a step sees: its declared columns (or `columns`) plus `row` and `prior`, alive before
    the step (alive=False: every row, unfiltered). rowwise: also the rows the stage itself rejected row by row
    (TopFraction ranks them), flagged `_own`."""
    reads = list(dict.fromkeys(("uid",) + tuple(job.step.reads if columns is None else columns)))
    if source.table is not None:
        t = source.table
        t = t.select([c for c in t.column_names if c in reads or c in (ROW, PRIOR, "reject_pos")])
        return _conform(_alive(job, t, rowwise) if alive else t.drop_columns(
            [c for c in ("reject_pos",) if c in t.column_names]), reads)
    parts = []
    if source.shards:
        folder = BuildFolder(job.folder)
        for s in source.shards:
            t = read_shard(folder, s, reads + ["reject_pos"] if alive else reads)
            if t is None or not t.num_rows:
                continue
            ids = (np.int64(s) << SHIFT) + np.arange(t.num_rows, dtype=np.int64)
            t = t.append_column(ROW, pa.array(ids)).append_column(PRIOR, pa.array(np.zeros(t.num_rows, bool)))
            parts.append(_alive(job, t, rowwise) if alive else t)
    for i, f in enumerate(source.prior_files):
        loc = location(f)
        names = loc.read_schema().names
        t = loc.read_table(columns=[c for c in reads if c in names])
        ids = -1 - ((np.int64(source.prior_first + i) << SHIFT) + np.arange(t.num_rows, dtype=np.int64))
        parts.append(t.append_column(ROW, pa.array(ids)).append_column(PRIOR, pa.array(np.ones(t.num_rows, bool))))
    parts = [_conform(p, reads) for p in parts]
    return pa.concat_tables(parts, promote_options="default") if parts else _conform(pa.table({
        ROW: pa.array([], pa.int64()), PRIOR: pa.array([], pa.bool_())}), reads)


def _conform(t: pa.Table, reads: list[str]) -> pa.Table:
    """Absent declared columns as nulls (the stage's step reads them as missing values)."""
    for c in reads:
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows))
    return t


def _alive(job: Job, t: pa.Table, rowwise: bool) -> pa.Table:
    """Drop rows rejected before the step: row-wise at an earlier position (or at this one, unless `rowwise`:
    then flagged `_own`), or by an earlier global step."""
    if "reject_pos" in t.column_names:
        pos = t.column("reject_pos")
        keep = pc.fill_null(pc.greater_equal(pos, job.position), True)
        own = pc.fill_null(pc.equal(pos, job.position), False)
        t = t.filter(keep if rowwise else pc.and_(keep, pc.invert(own))).drop_columns(["reject_pos"])
        if rowwise:
            t = t.append_column("_own", pc.fill_null(pc.equal(pos.filter(keep), job.position), False))
    elif rowwise:
        t = t.append_column("_own", pa.array(np.zeros(t.num_rows, bool)))
    if job.earlier and t.num_rows and pc.max(t.column(ROW)).as_py() >= 0:  # prior rows (< 0) are never decided
        rows = t.column(ROW)
        gone = read_decisions([location(f) for f in job.earlier], pc.min(rows).as_py(), pc.max(rows).as_py() + 1)
        if gone.num_rows:
            t = t.filter(pc.invert(pc.is_in(rows, value_set=gone.column(ROW))))
    return t


# ------------------------------------------------------------------------------------------------ task bodies

def partition_of(key: pa.ChunkedArray, parts: int) -> np.ndarray:
    """The reduce partition of each key (hashes or ids): its value modulo `parts`, in the keys' own width."""
    k = key.combine_chunks().to_numpy()
    if k.dtype.kind != "u" or parts > np.iinfo(k.dtype).max:
        k = k.astype(np.uint64)
    return k % k.dtype.type(parts)


def split(t: pa.Table, part: np.ndarray, parts: int) -> list[pa.Table]:
    """t cut into `parts` tables by `part` (one sort, then slices)."""
    if parts == 1:
        return [t]
    narrow = np.uint8 if parts <= 1 << 8 else np.uint16 if parts <= 1 << 16 else np.int64
    o = np.argsort(part.astype(narrow, copy=False), kind="stable")  # 8 or 16 bits: a radix sort
    t = t.take(pa.array(o))
    bounds = np.r_[0, np.cumsum(np.bincount(part, minlength=parts))]
    return [t.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p])) for p in range(parts)]


def split_ordered(t: pa.Table, parts: int, key_space: int) -> list[pa.Table | None]:
    """t, whose keys are ids below key_space, cut into `parts` tables (key modulo parts): when t comes ordered by
    key (sorted here if not), each table is the slices of its keys, with no copy."""
    key = t.column(KEY).combine_chunks().to_numpy()
    if key.size > 1 and not (key[1:] >= key[:-1]).all():
        o = np.argsort(key, kind="stable")
        t, key = t.take(pa.array(o)), key[o]
    starts = key_runs(key, key_space)
    counts = np.diff(starts)
    out = []
    for p in range(parts):
        pieces = [t.slice(int(starts[x]), int(counts[x])) for x in range(p, counts.size, parts) if counts[x]]
        out.append(pa.concat_tables(pieces) if pieces else None)
    return out


def map_keys(job: Job, source: Source, parts: int) -> list[pa.Table]:
    """Shuffle, map side: the keys of the source's rows, in `parts` partitions."""
    step = job.step
    ctx = job.context()
    rows = read_rows(job, source)
    keys = step.keys(rows, ctx.params, ctx.state) if rows.num_rows else None
    if keys is None or not keys.num_rows:
        return [None] * parts
    if parts == 1:
        return [keys]
    if step.key_space is not None:
        return split_ordered(keys, parts, step.key_space(ctx.params, ctx.state))
    return split(keys, partition_of(keys.column(KEY), parts), parts)


def reduce_group(job: Job, part: int, *tables: pa.Table | None) -> pa.Table | dict:
    """Shuffle, reduce side: the step's group() over one partition. Decisions are written here (returns counts);
    edges (a step with survivors) are returned for the survivors task."""
    step = job.step
    ctx = job.context()
    tables = [t for t in tables if t is not None and t.num_rows]
    out = step.group(pa.concat_tables(tables), ctx.params, ctx.state) if tables else None
    if step.survivors is not None:
        return out
    return write_decisions(job, part, out)


def gather_edges(*edges: pa.Table | None) -> pa.Table | None:
    """Every partition's edges in one table (None: no edge)."""
    edges = [e for e in edges if e is not None and e.num_rows]
    return pa.concat_tables(edges) if edges else None


def touched_ids(spans: list[tuple[int, int]], edges: pa.Table | None) -> list[np.ndarray]:
    """The distinct row ids the edges name, cut by the sources' spans (one sorted array per source)."""
    if edges is None:
        return [np.empty(0, np.int64) for _ in spans]
    ids = distinct(np.concatenate([edges.column("a").to_numpy(), edges.column("b").to_numpy()]))
    return [ids[np.searchsorted(ids, lo):np.searchsorted(ids, hi)] for lo, hi in spans]


def touched_rows(job: Job, source: Source, ids: np.ndarray) -> pa.Table | None:
    """The source's rows with these ids: the Survivors' reads (what its join needs)."""
    if not ids.size:
        return None
    rows = read_rows(job, source, columns=job.step.survivors.reads, alive=False)  # rows an edge names are alive
    return rows.filter(pc.is_in(rows.column(ROW), value_set=pa.array(ids)))


def resolve_survivors(job: Job, edges: pa.Table | None, *rows: pa.Table | None) -> dict:
    """Survivors over every partition's edges, completed from the rows they touch (one task: the edges touch
    duplicated rows only)."""
    rows = [r for r in rows if r is not None and r.num_rows]
    touched = pa.concat_tables(rows, promote_options="default") if rows else None
    out = survivor_decisions(edges, job.step.survivors, job.context(), touched) if edges is not None else None
    return write_decisions(job, 0, out)


def write_decisions(job: Job, part: int, decided: pa.Table | None) -> dict:
    """Decisions of one task, sorted by row, to the step's folder (or returned, for in-memory runs).
    Returns counts by reason (and, in memory, the table)."""
    decided = decided.cast(DECISION_SCHEMA) if decided is not None else EMPTY_DECISIONS
    decided = decided.sort_by(ROW)
    counts = {c["values"]: c["counts"] for c in pc.value_counts(decided.column("reason")).to_pylist()}
    if job.folder is None:
        return {"counts": counts, "table": decided}
    if decided.num_rows:
        atomic_write_table(decided, step_dir(job) / f"part-{part:05d}.parquet", row_group_size=ROW_GROUP)
    return {"counts": counts}


def step_dir(job: Job) -> Location:
    step = job.step
    return BuildFolder(job.folder).work / "global" / f"{job.position:02d}-{job.stage}" / f"{job.index:02d}-{step.name}"


def scored(job: Job, source: Source) -> pa.Table:
    """TopFraction, map side: (score, uid) of the scored rows alive before the stage."""
    rows = read_rows(job, source, rowwise=True)
    score = job.step.score(rows, job.params) if rows.num_rows else pa.array([], pa.float64())
    t = pa.table({"score": pa.array(score, pa.float64()), "uid": rows.column("uid").cast(pa.string())})
    return t.filter(pc.is_valid(t.column("score")))


def decide_below(job: Job, source: Source, cutoff, part: int) -> dict:
    """TopFraction, deciding side: the rows ranked below the cutoff (not those the stage rejected row by row)."""
    step = job.step
    rows = read_rows(job, source, rowwise=True)
    if not rows.num_rows:
        return write_decisions(job, part, None)
    score = pa.array(step.score(rows, job.params), pa.float64())
    below = pc.and_(below_cutoff(score, rows.column("uid").cast(pa.string()), cutoff), pc.invert(rows.column("_own")))
    rows = rows.filter(below)
    cut = cutoff[0] if cutoff is not None else float("nan")
    detail = step.detail(rows, job.params, cut)
    return write_decisions(job, part, pa.table([rows.column(ROW), pa.array([step.reason] * rows.num_rows, pa.string()),
                                                pa.array(detail, pa.string())], schema=DECISION_SCHEMA))


POOL = np.uint64(np.iinfo(np.uint64).max)  # the key under which a Counts map task counts its rows (the pool)


def key_counts(job: Job, source: Source, parts: int) -> list[pa.Table]:
    """Counts, map side: rows per key among the source's rows, in `parts` partitions (the source's row count goes
    with partition 0 under the key POOL)."""
    ctx = job.context()
    rows = read_rows(job, source)
    keys = job.step.keys(rows, ctx.params, ctx.state) if rows.num_rows else None
    pool = pa.table({KEY: pa.array([POOL], pa.uint64()), "count": pa.array([rows.num_rows], pa.int64())})
    if keys is None or not keys.num_rows:
        return [pool] + [None] * (parts - 1)
    vc = pc.value_counts(keys.column(KEY))
    t = pa.table({KEY: vc.field("values").cast(pa.uint64()), "count": vc.field("counts").cast(pa.int64())})
    out = split(t, partition_of(t.column(KEY), parts), parts)
    out[0] = pa.concat_tables([out[0], pool])
    return out


def sum_counts(*tables: pa.Table | None) -> pa.Table:
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return pa.table({KEY: pa.array([], pa.uint64()), "count": pa.array([], pa.int64())})
    return pa.concat_tables(tables).group_by(KEY).aggregate([("count", "sum")]).rename_columns([KEY, "count"])


def pool_and_counts(counts: pa.Table) -> tuple[int, pa.Table]:
    is_pool = pc.equal(counts.column(KEY), pa.scalar(POOL, pa.uint64()))
    pool = int(pc.sum(counts.column("count").filter(is_pool)).as_py() or 0)
    return pool, counts.filter(pc.invert(is_pool))


def decide_counted(job: Job, source: Source, counts: pa.Table, part: int) -> dict:
    """Counts, deciding side: the step's decide() over the source's rows with the global counts."""
    pool, counts = pool_and_counts(counts)
    ctx = job.context()
    ctx.state["pool"] = pool
    rows = read_rows(job, source)
    out = job.step.decide(rows, counts, ctx.params, ctx.state) if rows.num_rows else None
    return write_decisions(job, part, out)


def summarize_counts(job: Job, counts: pa.Table) -> dict:
    """What a Counts step records about its counts (its summarize(), bounded by the stage), and the pool."""
    pool, counts = pool_and_counts(counts)
    summary = job.step.summarize(counts, job.params) if job.step.summarize is not None else {}
    return {"pool": pool, "summary": summary}


def sample_rows(job: Job, source: Source, fraction: float) -> pa.Table:
    """Fit, map side: the rows whose uid hash falls in the sample (deterministic)."""
    rows = read_rows(job, source)
    if fraction >= 1.0 or not rows.num_rows:
        return rows
    h = pl.Series(rows.column("uid").combine_chunks().cast(pa.string())).hash(seed=1).to_numpy() >> np.uint64(11)
    return rows.filter(pa.array(h < np.uint64(int(fraction * 2**53))))


def fit_state(job: Job, fraction: float, *samples: pa.Table) -> object:
    samples = [s for s in samples if s is not None and s.num_rows]
    sample = pa.concat_tables(samples, promote_options="default") if samples else read_rows(job, Source(table=pa.table(
        {ROW: pa.array([], pa.int64()), PRIOR: pa.array([], pa.bool_())})))
    return job.step.fit(sample, job.params, fraction)


def exact_cutoff(values: pa.Table, k: int) -> tuple[float, str]:
    """(score, uid) of the k-th row ranked by score desc, uid asc, among `values` (all rows ranked from k on)."""
    order = pc.sort_indices(values, sort_keys=[("score", "descending"), ("uid", "ascending")])
    row = values.take(order).slice(k - 1, 1).to_pylist()[0]
    return float(row["score"]), row["uid"]


# ------------------------------------------------------------------------------------------------ runners

class InProcess:
    """Every task body called here, one partition: the in-process way, in one Ray task or in tests."""

    parts = 1

    def __init__(self, sources: list[Source]):
        self.sources = sources

    def shuffle(self, job: Job) -> dict:
        keyed = [map_keys(job, s, 1)[0] for s in self.sources]
        out = reduce_group(job, 0, *keyed)
        if job.step.survivors is None:
            return out
        edges = gather_edges(out)
        rows = []
        if job.step.survivors.join is not None:
            ids = touched_ids([s.span() for s in self.sources], edges)
            rows = [touched_rows(job, s, i) for s, i in zip(self.sources, ids)]
        return resolve_survivors(job, edges, *rows)

    def top_fraction(self, job: Job) -> dict:
        values = pa.concat_tables([scored(job, s) for s in self.sources])
        cutoff = cutoff_of(values, job.step.fraction)
        return merge_counts([decide_below(job, s, cutoff, i) for i, s in enumerate(self.sources)]) | cutoff_summary(cutoff)

    def counts(self, job: Job) -> dict:
        counts = sum_counts(*[key_counts(job, s, 1)[0] for s in self.sources])
        return merge_counts([decide_counted(job, s, counts, i) for i, s in enumerate(self.sources)]) | \
            summarize_counts(job, counts)

    def fit(self, job: Job, fraction: float):
        return fit_state(job, fraction, *[sample_rows(job, s, fraction) for s in self.sources])


def cutoff_of(values: pa.Table, fraction: float):
    n = values.num_rows
    k = top_fraction_keep(n, fraction)
    if k >= n:
        return None
    if k == 0:
        return float("nan"), ""
    return exact_cutoff(values, k)


def cutoff_summary(cutoff) -> dict:
    """What a top fraction records: the score of the last row it kept (None: it kept every scored row)."""
    if cutoff is None or math.isnan(cutoff[0]):
        return {"cutoff": None}
    return {"cutoff": cutoff[0]}


def merge_counts(results: list[dict]) -> dict:
    counts: dict[str, int] = {}
    tables = []
    for r in results:
        for reason, c in r["counts"].items():
            counts[reason] = counts.get(reason, 0) + c
        if "table" in r:
            tables.append(r["table"])
    out = {"counts": counts}
    if tables:
        out["table"] = pa.concat_tables(tables).sort_by(ROW)
    return out


class OnRay:
    """The same task bodies as Ray tasks: map tasks with P returns, P reduce tasks, nothing through the driver."""

    def __init__(self, sources: list[Source], parts: int):
        import ray

        self.ray = ray
        self.sources = sources
        self.parts = max(2, parts)  # a task with one return hands back its list whole

    def _task(self, fn, **options):
        return self.ray.remote(fn).options(max_retries=3, retry_exceptions=True, **options)

    def shuffle(self, job: Job) -> dict:
        ray, p = self.ray, self.parts
        mapper = self._task(map_keys, num_returns=p, num_cpus=1)
        keyed = [mapper.remote(job, s, p) for s in self.sources]
        keyed = [refs if p > 1 else [refs] for refs in keyed]
        reducer = self._task(reduce_group, num_cpus=1)
        outs = [reducer.remote(job, i, *[refs[i] for refs in keyed]) for i in range(p)]
        del keyed
        if job.step.survivors is None:
            return merge_counts(ray.get(outs))
        edges = self._task(gather_edges, num_cpus=1).remote(*outs)
        rows = []
        if job.step.survivors.join is not None:  # the rows the edges touch, read where they live
            spans = [s.span() for s in self.sources] + [(0, 0)]  # one empty span more: at least two returns
            ids = self._task(touched_ids, num_returns=len(spans), num_cpus=1).remote(spans, edges)
            rows = [self._task(touched_rows, num_cpus=1).remote(job, s, i) for s, i in zip(self.sources, ids)]
        return ray.get(self._task(resolve_survivors, num_cpus=1).remote(job, edges, *rows))

    def top_fraction(self, job: Job) -> dict:
        ray = self.ray
        values = [self._task(scored, num_cpus=1).remote(job, s) for s in self.sources]
        cutoff = distributed_cutoff(ray, values, job.step.fraction)
        decider = self._task(decide_below, num_cpus=1)
        return merge_counts(ray.get([decider.remote(job, s, cutoff, i) for i, s in enumerate(self.sources)])) | \
            cutoff_summary(cutoff)

    def counts(self, job: Job) -> dict:
        ray, p = self.ray, self.parts
        mapper = self._task(key_counts, num_returns=p, num_cpus=1)
        keyed = [mapper.remote(job, s, p) for s in self.sources]
        keyed = [refs if p > 1 else [refs] for refs in keyed]
        summed = [self._task(sum_counts, num_cpus=1).remote(*[refs[i] for refs in keyed]) for i in range(p)]
        counts = self._task(sum_counts, num_cpus=1).remote(*summed)  # one table, bounded by the keys
        decider = self._task(decide_counted, num_cpus=1)
        summary = self._task(summarize_counts, num_cpus=1).remote(job, counts)
        return merge_counts(ray.get([decider.remote(job, s, counts, i) for i, s in enumerate(self.sources)])) | \
            ray.get(summary)

    def fit(self, job: Job, fraction: float):
        samples = [self._task(sample_rows, num_cpus=1).remote(job, s, fraction) for s in self.sources]
        # the build waits on the fit: it takes a whole node (its CPUs are the model's threads)
        node = max([n["Resources"].get("CPU", 0.0) for n in self.ray.nodes() if n["Alive"]] + [1.0])
        return self.ray.get(self._task(fit_state, num_cpus=node).remote(job, fraction, *samples))


def _count_above(t: pa.Table, hi: float) -> int:
    return int(pc.sum(pc.greater(t.column("score"), hi)).as_py() or 0)


def _between(t: pa.Table, lo: float, hi: float) -> pa.Table:
    v = t.column("score")
    return t.filter(pc.and_(pc.greater_equal(v, lo), pc.less_equal(v, hi)))


def _sample_scores(t: pa.Table, fraction: float) -> np.ndarray:
    if fraction >= 1.0:
        return t.column("score").to_numpy()
    h = pl.Series(t.column("uid")).hash(seed=2).to_numpy() >> np.uint64(11)
    return t.column("score").to_numpy()[h < np.uint64(int(fraction * 2**53))]


def distributed_cutoff(ray, values: list, fraction: float, sample: int = 100_000):
    """The exact cutoff over (score, uid) tables held by the workers: a sample brackets it, the workers count the
    rows above the bracket, and only the rows inside it reach the driver."""
    task = lambda fn: ray.remote(fn).options(num_cpus=0.5)  # noqa: E731
    n = sum(ray.get([task(lambda t: t.num_rows).remote(v) for v in values]))
    k = top_fraction_keep(n, fraction)
    if k >= n:
        return None
    if k == 0:
        return float("nan"), ""
    got = np.sort(np.concatenate(ray.get([task(_sample_scores).remote(v, min(1.0, sample / n)) for v in values])))
    q = 1.0 - k / n
    delta = 4.0 / math.sqrt(max(got.size, 1))
    while True:
        lo = float(np.quantile(got, q - delta)) if got.size and q - delta > 0 else -math.inf
        hi = float(np.quantile(got, q + delta)) if got.size and q + delta < 1 else math.inf
        above = sum(ray.get([task(_count_above).remote(v, hi) for v in values])) if math.isfinite(hi) else 0
        band = pa.concat_tables(ray.get([task(_between).remote(v, lo, hi) for v in values]))
        if above < k <= above + band.num_rows:
            return exact_cutoff(band, k - above)
        delta *= 2


# ------------------------------------------------------------------------------------------------ the phase

def sources_of(folder: BuildFolder, prior_files: list[Location], rows_per_task: int = ROWS_PER_TASK
               ) -> tuple[list[Source], int]:
    """Map tasks' sources (runs of input shards, runs of prior files, about rows_per_task rows each) and the rows."""
    sizes = {}
    for d in folder.processed_dir.subdirs():
        if d.name.startswith(f"{SRC}="):
            sizes[int(d.name.split("=", 1)[1])] = sum(f.read_metadata().num_rows for f in d.glob("*.parquet"))
    sources, run, acc = [], [], 0
    for s in sorted(sizes):
        run.append(s)
        acc += sizes[s]
        if acc >= rows_per_task:
            sources.append(Source(shards=tuple(run)))
            run, acc = [], 0
    if run:
        sources.append(Source(shards=tuple(run)))
    prior_rows, first = 0, 0
    for chunk in _chunks([str(f) for f in prior_files], 64):
        sources.append(Source(prior_files=tuple(chunk), prior_first=first))
        first += len(chunk)
    for f in prior_files:
        prior_rows += f.read_metadata().num_rows
    return sources, sum(sizes.values()) + prior_rows


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def processed_columns(folder: BuildFolder) -> set[str]:
    """The columns the processed rows have (one footer)."""
    for d in folder.processed_dir.subdirs():
        files = d.glob("*.parquet")
        if files:
            return set(files[0].read_schema().names)
    return set()


def partitions_for(rows: int, cpus: float) -> int:
    return max(2, int(2 * cpus), math.ceil(rows / ROWS_PER_TASK))


def decide_stage_in_one_task(folder: str, spec: BuildSpec, k: int, sources: list[Source], rows: int,
                             earlier: tuple[str, ...]) -> dict:
    """The in-process way for one stage, inside one Ray task (or called directly)."""
    entry = spec.stages[k]
    job = Job(folder, entry.name, k, entry.params.model_dump_json(), 0, earlier, rows)
    return _finish_steps(job, InProcess(sources), rows, processed_columns(BuildFolder(folder)))


def has_columns(step, columns: set[str]) -> bool:
    """Whether the rows have what the step needs (a step whose `needs` no row has is skipped)."""
    return all(c in columns for c in getattr(step, "needs", ()))


def _finish_steps(job: Job, runner, rows: int, columns: set[str]) -> dict:
    """Run the stage's steps that have no marker yet, each leaving its marker."""
    done: dict = {}
    steps = stage_class(job.stage).global_steps(job.params)
    state: dict = {}
    earlier = list(job.earlier)
    for i, step in enumerate(steps):
        j = replace(job, index=i, state=state, earlier=tuple(earlier))
        if not has_columns(step, columns):
            continue
        if isinstance(step, Fit):
            later = [replace(job, index=x) for x in range(i + 1, len(steps)) if not isinstance(steps[x], Fit)]
            if not all((step_dir(x) / "_DONE.json").exists() for x in later):  # a resume past them needs no fit
                state[step.name] = runner.fit(j, step.fraction(j.params, rows))
            continue
        d = step_dir(j)
        marker = d / "_DONE.json"
        if marker.exists():
            done[step.name] = json.loads(marker.read_text())
        else:
            d.rmtree()
            t0 = time.perf_counter()
            out = {TopFraction: runner.top_fraction, Counts: runner.counts, Shuffle: runner.shuffle}[type(step)](j)
            done[step.name] = {"rejected": out["counts"], "seconds": round(time.perf_counter() - t0, 3)} | {
                k: out[k] for k in ("cutoff", "pool", "summary") if k in out}
            atomic_write_text(marker, json.dumps(done[step.name]))
        earlier += [str(f) for f in d.glob("part-*.parquet")]
    return done


def run_global_stages(ctx: BuildContext, rows: int, prior_files: list[Location] | None = None) -> dict:
    """Decide every global stage in spec order; resumes past the steps that finished. Returns, per stage, its
    steps' summaries and seconds."""
    import ray

    spec, folder = ctx.spec, ctx.folder
    positions = global_positions(spec)
    if not positions:
        return {}
    sources, total = sources_of(folder, prior_files or [])
    one_task = total <= spec.decide.driver_max_rows
    parts = partitions_for(total, ray.cluster_resources().get("CPU", 1.0))
    out: dict = {}
    earlier: list[str] = []
    for k in positions:
        entry = spec.stages[k]
        t0 = time.perf_counter()
        with phase(f"{entry.name} (global)") as adv:
            if one_task:
                steps = ray.get(ray.remote(decide_stage_in_one_task).options(num_cpus=1).remote(
                    str(folder.root), spec, k, sources, total, tuple(earlier)))
            else:
                job = Job(str(folder.root), entry.name, k, entry.params.model_dump_json(), 0, tuple(earlier), total)
                steps = _finish_steps(job, OnRay(sources, parts), total, processed_columns(folder))
            rejected = sum(sum(s["rejected"].values()) for s in steps.values())
            adv(rejected, f"{rejected} rejected")
        out[entry.name] = {"steps": steps, "seconds": time.perf_counter() - t0,
                           "mode": "one task" if one_task else f"distributed, {parts} partitions"}
        earlier = [str(f) for kk, _, d in step_dirs(folder.work, spec) if kk <= k for f in d.glob("part-*.parquet")]
    return out


# ------------------------------------------------------------------------------------------------ in memory

def decide_table(stage: str, params, table: pa.Table, prior: pa.Table | None = None, *, parts: int = 1,
                 ray_tasks: bool = False, summaries: dict | None = None) -> pa.Table:
    """A stage's global steps over an in-memory table (tests, benchmarks): (uid, reason, detail) of the rejected
    rows, in the table's order. `prior`: rows earlier builds kept. ray_tasks: run the steps as Ray tasks with
    `parts` partitions (the distributed way), else in this process. `summaries` (a dict) receives what each step
    records (a cutoff, a Counts step's pool and summary), by step name."""
    n = table.num_rows
    t = table.append_column(ROW, pa.array(np.arange(n, dtype=np.int64))).append_column(
        PRIOR, pa.array(np.zeros(n, bool)))
    chunk = ROWS_PER_TASK if ray_tasks else max(n, 1)  # as Ray tasks: one map task per ROWS_PER_TASK rows
    sources = [Source(table=t.slice(a, chunk)) for a in range(0, max(n, 1), chunk)]
    if prior is not None and prior.num_rows:
        m = prior.num_rows
        sources.append(Source(table=prior.append_column(ROW, pa.array(-1 - np.arange(m, dtype=np.int64)))
                              .append_column(PRIOR, pa.array(np.ones(m, bool)))))
    cls = stage_class(stage)
    job = Job(None, stage, 0, cls.Params.model_validate(params.model_dump() if hasattr(params, "model_dump")
                                                         else params).model_dump_json(), 0, (), n + (
        prior.num_rows if prior is not None else 0))
    runner = OnRay(sources, parts) if ray_tasks else InProcess(sources)
    decided, state = [], {}
    for i, step in enumerate(cls.global_steps(job.params)):
        j = replace(job, index=i, state=state)
        if not has_columns(step, set(table.column_names)):
            continue
        if isinstance(step, Fit):
            state[step.name] = runner.fit(j, step.fraction(j.params, job.rows_hint))
            continue
        res = {TopFraction: runner.top_fraction, Counts: runner.counts, Shuffle: runner.shuffle}[type(step)](j)
        if summaries is not None:
            summaries[step.name] = {k: v for k, v in res.items() if k != "table"}
        got = res.get("table", EMPTY_DECISIONS)
        decided.append(got)
        # later steps see the rows alive after this one
        gone = got.column(ROW)
        sources = [replace(s, table=s.table.filter(pc.invert(pc.is_in(s.table.column(ROW), value_set=gone))))
                   for s in sources]
        runner = OnRay(sources, parts) if ray_tasks else InProcess(sources)
    d = pa.concat_tables(decided).sort_by(ROW) if decided else EMPTY_DECISIONS
    uid = table.column("uid").take(d.column(ROW))
    return pa.table({"uid": uid, "reason": d.column("reason"), "detail": d.column("detail")})
