"""Global decisions over the whole build, in spec order, each over the rows alive before its stage, distributed.

Rows are read from _work/processed (metadata and stats, no image bytes), hive-partitioned by `input_shard`, the input
shard a row came from. A global stage's rejections go to _work/global/<pos>-<stage>/input_shard=N/ (uid, reason, detail),
so the write task of shard N reads only its own. Implementations:
- dedup: flows.engine.global_dedup (hash partitioning, multi-index near-dup partitions, SemDeDup per cluster);
- align with a top fraction: its threshold batch by batch, and an exact distributed cutoff of the top fraction
  (a sample brackets the cutoff; only the rows in that bracket reach the driver).
A global stage without a distributed implementation is decided in the driver over the alive rows' metadata (it
says so in the log): correct, but its memory grows with the rows.
"""
from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flows.engine.context import BuildContext
from flows.engine.decide import global_positions
from flows.engine.progress import phase
from schemas.spec import BuildSpec
from stages import stage_class
from stages.base import DecideContext, concat, fixed
from dataio.build_folder import atomic_write_table, atomic_write_text
from dataio.storage import Location, location, parquet_dataset

log = logging.getLogger("pairforge")
SRC = "input_shard"  # the input shard a row came from (processed rows are hive-partitioned by it)
DECISION_SCHEMA = pa.schema([("uid", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                             (SRC, pa.int64())])


def global_dir(work: Location, k: int, name: str) -> Location:
    return work / "global" / f"{k:02d}-{name}"


def shard_decisions(work: Location, spec: BuildSpec, src: int, upto: int | None = None) -> list[tuple[int, pa.Table]]:
    """(position, decisions) of the global stages before position `upto` (all if None) for input shard `src`."""
    out = []
    for k in global_positions(spec):
        if upto is not None and k >= upto:
            break
        d = global_dir(work, k, spec.stages[k].name) / f"{SRC}={src}"
        files = d.glob("*.parquet")  # an absent folder lists nothing
        t = parquet_dataset(files).to_table(columns=["uid", "reason", "detail"]) \
            if files else DECISION_SCHEMA.empty_table().drop_columns([SRC])
        out.append((k, t))
    return out


def _alive_rows(batch: pa.Table, k: int, work: str, spec: BuildSpec) -> pa.Table:
    """The rows of a batch alive before position k: no row-wise rejection earlier, no earlier global one."""
    src = pc.cast(batch.column(SRC), pa.int64())
    batch = batch.set_column(batch.column_names.index(SRC), SRC, src)
    keep = pc.fill_null(pc.greater_equal(batch.column("reject_pos"), k), True)
    for s in pc.unique(src).to_pylist():
        for _, dec in shard_decisions(location(work), spec, s, upto=k):
            if dec.num_rows:
                hit = pc.and_(pc.equal(src, s), pc.is_in(batch.column("uid"), value_set=dec.column("uid")))
                keep = pc.and_(keep, pc.invert(hit))
    return batch.filter(keep)


def read_alive(ctx: BuildContext, k: int, columns: list[str] | None = None):
    """A Ray Dataset of the processed rows alive before spec position k."""
    import ray

    processed = ctx.folder.processed_dir
    ds = ray.data.read_parquet(processed.path, filesystem=processed.fs, columns=columns)
    return ds.map_batches(_alive_rows, fn_args=(k, str(ctx.folder.work), ctx.spec),
                          batch_format="pyarrow", batch_size=4096)


def run_global_stages(ctx: BuildContext, rows: int, prior=None) -> dict:
    """Decide every global stage in spec order; resumes past stages that finished. Builds of at most
    decide.driver_max_rows rows decide in the driver (the same decide(), bounded memory, no shuffle start-up)."""
    done: dict = {}
    small = rows + (prior.count() if prior is not None else 0) <= ctx.spec.decide.driver_max_rows
    for k in global_positions(ctx.spec):
        entry = ctx.spec.stages[k]
        out = global_dir(ctx.folder.work, k, entry.name)
        marker = out / "_DONE.json"
        if marker.exists():
            done[entry.name] = json.loads(marker.read_text())
            continue
        out.rmtree()
        t0 = time.perf_counter()
        with phase(f"{entry.name} (global)") as adv:
            impl = decide_in_driver if small else IMPLEMENTATIONS.get(entry.name, decide_in_driver)
            decisions = impl(ctx, k, entry.params, prior)
            counts = write_decisions(decisions, out)
            adv(sum(counts.values()), f"{sum(counts.values())} rejected")
        summary = {"rejected": counts, "seconds": time.perf_counter() - t0}
        atomic_write_text(marker, json.dumps(summary))
        done[entry.name] = summary
    return done


def write_decisions(decisions, out: Location) -> dict[str, int]:
    """Write (uid, reason, detail, input_shard) partitioned by input_shard: an Arrow table (decided in the driver)
    or a Ray Dataset (distributed, written by the workers). Returns counts by reason."""
    out.mkdir()
    if isinstance(decisions, pa.Table):
        src = decisions.column(SRC)
        for s in pc.unique(src).to_pylist():
            part = decisions.filter(pc.equal(src, s)).drop_columns([SRC])
            atomic_write_table(part, out / f"{SRC}={s}" / "part-0.parquet")
        return {c["values"]: c["counts"] for c in pc.value_counts(decisions.column("reason")).to_pylist()}
    decisions = decisions.materialize()
    if not decisions.count():
        return {}
    decisions.write_parquet(out.path, filesystem=out.fs, partition_cols=[SRC])
    return {r["reason"]: int(r["count()"]) for r in decisions.groupby("reason").count().take_all()}


def to_table(ds) -> pa.Table:
    """A (small) Ray Dataset as one Arrow table in the driver."""
    import ray

    refs = ds.to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows] if refs else []
    return pa.concat_tables(tables) if tables else ds.schema().base_schema.empty_table()


# --------------------------------------------------------------------------- implementations

def decide_in_driver(ctx: BuildContext, k: int, params, prior) -> pa.Table:
    """A global stage's own decide() over the alive rows, in the driver: small builds, and stages with no
    distributed implementation."""
    name = ctx.spec.stages[k].name
    if name in IMPLEMENTATIONS and ctx.spec.decide.driver_max_rows:
        log.info("%s: a small build, deciding in the driver", name)
    else:
        log.warning("%s: no distributed decision; deciding in the driver over the alive rows", name)
    parts = parquet_dataset(ctx.folder.processed_dir, partitioning="hive")
    table = _alive_rows(parts.to_table(), k, str(ctx.folder.work), ctx.spec)
    prior_t = to_table(prior) if prior is not None else None
    d = stage_class(name).decide(table, params, DecideContext(prior=prior_t))
    r, dt = d.arrays()
    mask = pa.array(d.rejected)
    return pa.table({"uid": table.column("uid"), "reason": r, "detail": dt, SRC: table.column(SRC)}).filter(
        mask).cast(DECISION_SCHEMA)


def dedup_global(ctx: BuildContext, k: int, params, prior):
    try:
        from flows.engine.global_dedup import dedup_decisions
    except ImportError:
        return decide_in_driver(ctx, k, params, prior)

    cols = ["uid", "url", "sha256", "url_norm", "phash", "phash_crops", "image_bytes", "original_width",
            "original_height", "width", "height", "reject_pos", SRC]
    names = set(parquet_dataset(ctx.folder.processed_dir, partitioning="hive").schema.names)
    if params.semantic and "image_emb" in names:
        cols.append("image_emb")
    alive = read_alive(ctx, k, [c for c in cols if c in names]).materialize()
    decisions = dedup_decisions(alive.drop_columns(["reject_pos"]), params, prior,
                                tmp_dir=str(ctx.folder.work / "global" / "tmp"))
    where = alive.select_columns(["uid", SRC])
    return decisions.join(where, join_type="inner", num_partitions=max(1, min(64, alive.num_blocks())),
                          on=("uid",)).select_columns(["uid", "reason", "detail", SRC])


def _align_batch(batch: pa.Table, params_json: str, cutoff: tuple[float, str] | None, fraction: float) -> pa.Table:
    """align's threshold, then the top-fraction cutoff (score desc, uid asc) on one batch of alive rows."""
    cls = stage_class("align")
    params = cls.Params.model_validate_json(params_json)
    d = cls.decide(batch, params.model_copy(update={"top_fraction": None}))
    if cutoff is not None:
        cs, cu = cutoff
        score, uid = batch.column("clip_score"), batch.column("uid")
        below = pc.or_(pc.less(score, cs), pc.and_(pc.equal(score, cs), pc.greater(uid, cu))) \
            if not math.isnan(cs) else pc.is_valid(score)
        d.reject(below, "below_top_fraction",
                 concat("clip_score=", fixed(score, 3), f" below the top {fraction:g} cutoff {cs:.3f}"))
    r, dt = d.arrays()
    return pa.table({"uid": batch.column("uid"), "reason": r, "detail": dt, SRC: batch.column(SRC)}).filter(
        pa.array(d.rejected)).cast(DECISION_SCHEMA)


def align_global(ctx: BuildContext, k: int, params, prior):
    alive = read_alive(ctx, k, ["uid", "clip_score", "reject_pos", SRC]).materialize()
    cutoff = None
    if params.top_fraction is not None:
        cutoff = top_fraction_cutoff(alive, "clip_score", params.top_fraction)
    return alive.map_batches(_align_batch, fn_args=(params.model_dump_json(), cutoff, params.top_fraction or 0.0),
                             batch_format="pyarrow", batch_size=4096)


def _scored(batch: pa.Table, column: str) -> pa.Table:
    return batch.select(["uid", column]).filter(pc.is_valid(batch.column(column)))


def _between(batch: pa.Table, column: str, lo: float, hi: float) -> pa.Table:
    v = batch.column(column)
    return batch.filter(pc.and_(pc.greater_equal(v, lo), pc.less_equal(v, hi)))


def _count_above(batch: pa.Table, column: str, hi: float) -> pa.Table:
    return pa.table({"n": [pc.sum(pc.greater(batch.column(column), hi)).as_py() or 0]})


def top_fraction_cutoff(ds, column: str, fraction: float, sample: int = 100_000) -> tuple[float, str] | None:
    """The (score, uid) of the last row kept when keeping round(fraction * scored rows) rows ranked by score
    descending, uid ascending; None keeps every scored row; (nan, "") keeps none. Exact: a sample brackets the
    cutoff; the workers count the rows above the bracket and only the rows inside it reach the driver."""
    scored = ds.map_batches(_scored, fn_args=(column,), batch_format="pyarrow").materialize()
    n = scored.count()
    k = math.floor(fraction * n + 0.5)
    if k >= n:
        return None
    if k == 0:
        return float("nan"), ""
    values = np.sort(to_table(scored.random_sample(min(1.0, sample / n), seed=0)).column(column).to_numpy())
    q = 1.0 - k / n
    delta = 4.0 / math.sqrt(max(len(values), 1))
    while True:
        lo = float(np.quantile(values, q - delta)) if len(values) and q - delta > 0 else -math.inf
        hi = float(np.quantile(values, q + delta)) if len(values) and q + delta < 1 else math.inf
        above = int(to_table(scored.map_batches(_count_above, fn_args=(column, hi), batch_format="pyarrow"))
                    .column("n").to_numpy().sum()) if math.isfinite(hi) else 0
        band = to_table(scored.map_batches(_between, fn_args=(column, lo, hi), batch_format="pyarrow"))
        if above < k <= above + band.num_rows:
            order = pc.sort_indices(band, sort_keys=[(column, "descending"), ("uid", "ascending")])
            row = band.take(order).slice(k - above - 1, 1).to_pylist()[0]
            return float(row[column]), row["uid"]
        delta *= 2


IMPLEMENTATIONS = {"dedup": dedup_global, "align": align_global}
