"""The build flow: spec -> input shards -> ingest (Ray tasks) -> stages (Ray Data) -> decide -> write -> catalog.

Every phase leaves completion markers under <build>/_work, so a killed build re-run with the same spec resumes:
finished download shards are not fetched again, and later phases redo only what has no marker.
"""
from __future__ import annotations

import fcntl
import inspect
import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from flows import env  # noqa: F401
from flows.progress import phase
from schemas.columns import HEAVY_COLUMNS, INPUT_SCHEMA, REJECT_SCHEMA, build_schema, rejects_schema
from schemas.spec import BuildSpec, load_spec
from stages import stage_class
from stages.base import Decision
from stages.ingest import assign_uids, corpus_pairs, ingest_shard, iter_corpus, read_url_list, shard_paths
from stages.write import ShardWriter, atomic_write_text, file_sha256, write_manifest

ROOT = Path(__file__).resolve().parents[1]


class BuildError(RuntimeError):
    pass


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return "pairforge-0.1.0+" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "pairforge-0.1.0"


# --------------------------------------------------------------------------- the build folder

@dataclass
class BuildContext:
    spec: BuildSpec
    build_id: str
    build_dir: Path
    fingerprint: str
    resumed: bool = False
    stage_meta: dict = field(default_factory=dict)
    history_of: str | None = None  # refilter: "earlier builds" are those before the parent, not before the child

    @property
    def work(self) -> Path:
        return self.build_dir / "_work"

    @property
    def source_name(self) -> str:
        return self.spec.source.name or Path(self.spec.source.path).stem

    def state(self) -> dict:
        p = self.work / "state.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def set_state(self, **kw) -> None:
        st = self.state() | kw
        atomic_write_text(self.work / "state.json", json.dumps(st, indent=2))


def source_fingerprint(path: Path) -> str:
    """sha256 of a URL list file; for a corpus folder, of its files' names, sizes and mtimes."""
    if path.is_file():
        return file_sha256(path)
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def open_build(spec: BuildSpec, new: bool = False) -> BuildContext:
    """Resume the newest unfinished build of this spec and input, or start a new one."""
    fingerprint = source_fingerprint(Path(spec.source.path))
    spec_hash = spec.spec_hash()
    root = spec.out / spec.dataset
    root.mkdir(parents=True, exist_ok=True)
    if not new:
        for cand in sorted(root.iterdir(), reverse=True):
            st_path = cand / "_work" / "state.json"
            if not st_path.exists():
                continue
            st = json.loads(st_path.read_text())
            if st.get("spec_hash") == spec_hash and st.get("fingerprint") == fingerprint and st.get("status") != "complete":
                return BuildContext(spec, cand.name, cand, fingerprint, resumed=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    build_id = f"{stamp}-{spec_hash[:8]}"
    n = 1
    while (root / build_id).exists():
        n += 1
        build_id = f"{stamp}-{spec_hash[:8]}-{n}"
    build_dir = root / build_id
    (build_dir / "_work").mkdir(parents=True)
    ctx = BuildContext(spec, build_id, build_dir, fingerprint)
    atomic_write_text(build_dir / "spec.yaml", spec.to_yaml())
    ctx.set_state(spec_hash=spec_hash, fingerprint=fingerprint, status="running", build_id=build_id,
                  started=datetime.now(timezone.utc).isoformat())
    return ctx


@contextmanager
def dataset_lock(spec: BuildSpec, wait: bool = False):
    """One build of a dataset at a time: a second run waits (wait=True) or fails naming the holder."""
    root = spec.out / spec.dataset
    root.mkdir(parents=True, exist_ok=True)
    fh = open(root / ".lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            raise BuildError(f"another build of dataset {spec.dataset!r} is running ({fh.read().strip() or 'pid ?'}); "
                             "wait for it or pass --wait") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


# --------------------------------------------------------------------------- phases

def prepare_inputs(ctx: BuildContext) -> dict:
    """URL list -> uids -> input shards of ingest.shard_rows rows; malformed rows -> input rejects."""
    done = ctx.work / "input" / "_DONE.json"
    if done.exists():
        return json.loads(done.read_text())
    if ctx.spec.source.pairs is not None:
        return prepare_corpus(ctx, done)
    with phase("input") as adv:
        t0 = time.perf_counter()
        table = read_url_list(ctx.spec.source)
        inputs, rejects = assign_uids(table, ctx.source_name)
        if ctx.spec.incremental:
            inputs, rejects = skip_seen(ctx, inputs, rejects)
        folder = ctx.work / "input"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        n = ctx.spec.ingest.shard_rows
        shards = 0
        for shards, start in enumerate(range(0, inputs.num_rows, n), start=1):
            pq.write_table(inputs.slice(start, n), folder / f"{shards - 1:05d}.parquet")
        pq.write_table(rejects, ctx.work / "input_rejects.parquet")
        summary = {"rows_listed": table.num_rows, "rows": inputs.num_rows, "rejected": rejects.num_rows,
                   "shards": shards, "seconds": time.perf_counter() - t0}
        atomic_write_text(done, json.dumps(summary))
        adv(table.num_rows, f"{inputs.num_rows} to fetch, {rejects.num_rows} rejected, {shards} shards")
    return summary


def earlier_builds(ctx: BuildContext) -> list[dict]:
    """Complete builds of this build's source, newest first (what an incremental build continues)."""
    if not ctx.spec.catalog_path.exists():
        return []
    from catalogs import Catalog

    cat = Catalog(ctx.spec.catalog_path, read_only=True)
    try:
        cutoff = cat.get_build(ctx.history_of or ctx.build_id)["started"]
    except KeyError:
        return []
    return [b for b in cat.list_builds(ctx.spec.dataset)
            if b["status"] == "complete" and b["source"] == ctx.source_name and b["finished"] is not None
            and b["finished"] <= cutoff]


def skip_seen(ctx: BuildContext, inputs: pa.Table, rejects: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Incremental: uids that earlier builds of the source processed are rejected here, never fetched."""
    if not ctx.spec.catalog_path.exists():
        return inputs, rejects
    from catalogs import Catalog

    seen = Catalog(ctx.spec.catalog_path, read_only=True).seen_uids(ctx.source_name)
    if not seen:
        return inputs, rejects
    mask = pc.is_in(inputs.column("uid"), value_set=pa.array(sorted(seen), pa.string()))
    old = inputs.filter(mask)
    earlier = earlier_builds(ctx)
    detail = f"seen by {earlier[0]['build_id']}" if earlier else "seen by an earlier build"
    skipped = pa.table({"uid": old["uid"], "url": old["url"], "text": old["text"],
                        "stage": pa.array(["input"] * old.num_rows, pa.string()),
                        "reason": pa.array(["seen_in_earlier_build"] * old.num_rows, pa.string()),
                        "detail": pa.array([detail] * old.num_rows, pa.string()),
                        "build_id": pa.nulls(old.num_rows, pa.string())}, schema=REJECT_SCHEMA)
    return inputs.filter(pc.invert(mask)), pa.concat_tables([rejects, skipped])


def prior_pairs(ctx: BuildContext) -> pa.Table | None:
    """Incremental: the pairs earlier builds of the source kept (metadata only), for cross-build dedup."""
    if not ctx.spec.incremental:
        return None
    files = []
    for b in earlier_builds(ctx):
        files += sorted((Path(b["out_dir"]) / "shards").glob("part-*.parquet"))
    if not files:
        return None
    ds = pads.dataset([str(f) for f in files], format="parquet")
    cols = [c for c in ("uid", "sha256", "phash", "phash_crops", "url_norm", "original_width", "original_height",
                        "image_bytes") if c in ds.schema.names]
    return ds.to_table(columns=cols)


def prepare_corpus(ctx: BuildContext, done: Path) -> dict:
    """An existing corpus (curate): its pairs become finished ingest shards directly, nothing is downloaded."""
    t0 = time.perf_counter()
    folder = ctx.work / "input"
    for sub in (folder, ctx.work / "ingest"):
        if sub.exists():
            shutil.rmtree(sub)
        sub.mkdir(parents=True)
    seen: dict[str, int] = {}
    listed = kept = 0
    rejects = []
    with phase("input") as adv:
        for shard, batch in enumerate(iter_corpus(ctx.spec.source, ctx.spec.ingest.shard_rows)):
            inputs, pairs, rej = corpus_pairs(batch, ctx.source_name, seen)
            pq.write_table(inputs, folder / f"{shard:05d}.parquet")
            paths = shard_paths(ctx.work, shard)
            pq.write_table(pairs, paths["pairs"])
            pq.write_table(REJECT_SCHEMA.empty_table(), paths["rejects"])
            atomic_write_text(paths["done"], json.dumps({"shard": shard, "rows_in": inputs.num_rows,
                                                         "pairs": pairs.num_rows, "rejects": 0}))
            rejects.append(rej)
            listed += batch.num_rows
            kept += inputs.num_rows
            adv(batch.num_rows)
        shards = len(list(folder.glob("*.parquet")))
        pq.write_table(pa.concat_tables(rejects) if rejects else REJECT_SCHEMA.empty_table(),
                       ctx.work / "input_rejects.parquet")
        summary = {"rows_listed": listed, "rows": kept, "rejected": listed - kept, "shards": shards,
                   "seconds": time.perf_counter() - t0}
        atomic_write_text(done, json.dumps(summary))
        adv(0, f"{kept} pairs from the corpus, {listed - kept} rejected, {shards} shards")
    return summary


def ingest_all(ctx: BuildContext, prepared: dict) -> dict:
    """One Ray task per input shard; shards with a done marker are skipped."""
    import ray

    params = ctx.spec.ingest
    todo = [i for i in range(prepared["shards"]) if not shard_paths(ctx.work, i)["done"].exists()]
    done_rows = prepared["rows"] - sum(
        pq.read_metadata(ctx.work / "input" / f"{i:05d}.parquet").num_rows for i in todo)
    t0 = time.perf_counter()
    remote = ray.remote(ingest_shard).options(
        num_cpus=params.cpus, max_retries=params.max_task_retries, retry_exceptions=True, name="ingest_shard")
    with phase("ingest", total=prepared["rows"]) as adv:
        adv(done_rows)
        pending = {remote.remote(ctx.work / "input" / f"{i:05d}.parquet", ctx.work, i, params): i for i in todo}
        fetch_ms: list[int] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                s = ray.get(ref)
                fetch_ms += s.get("fetch_ms", [])
                adv(s["rows_in"])
        times = ""
        if fetch_ms:
            p50, p99 = np.percentile(fetch_ms, [50, 99]) / 1000
            times = f"; per URL p50 {p50:.2f}s, p99 {p99:.2f}s, max {max(fetch_ms) / 1000:.2f}s"
        adv(0, f"{len(todo)} shards fetched, {prepared['shards'] - len(todo)} already done{times}")
    seconds = ctx.state().get("ingest_seconds", 0.0) + time.perf_counter() - t0
    ctx.set_state(ingest_seconds=seconds)
    return {"seconds": seconds, "shards_fetched": len(todo)}


class _StageTimer:
    """A Ray actor summing rows and seconds per stage over all batches."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}

    def add(self, stage: str, rows: int, seconds: float) -> None:
        t = self.totals.setdefault(stage, [0, 0.0])
        t[0] += rows
        t[1] += seconds

    def get(self) -> dict:
        return self.totals


_STAGE_CACHE: dict = {}


def _make_stage(name: str, params_json: str):
    cls = stage_class(name)
    from schemas.spec import STAGE_PARAMS

    stage = cls(STAGE_PARAMS[name].model_validate_json(params_json))
    stage.setup()
    return stage


def _timed(stage, batch: pa.Table, timer: str) -> pa.Table:
    """Run a stage on a batch and tell the named timer actor its rows and seconds."""
    import ray

    t0 = time.perf_counter()
    out = stage(batch)
    ray.get_actor(timer).add.remote(stage.name, batch.num_rows, time.perf_counter() - t0)
    return out


def _run_stage_task(batch: pa.Table, name: str, params_json: str, timer: str) -> pa.Table:
    key = (name, params_json)
    if key not in _STAGE_CACHE:
        _STAGE_CACHE[key] = _make_stage(name, params_json)
    return _timed(_STAGE_CACHE[key], batch, timer)


class _StageActor:
    def __init__(self, name: str, params_json: str, timer: str):
        self.stage = _make_stage(name, params_json)
        self.timer = timer

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _timed(self.stage, batch, self.timer)


def process_stages(ctx: BuildContext, quiet: bool = False) -> dict:
    """Run the spec's stages over the downloaded pairs as one Ray Data pipeline, into _work/processed/."""
    import ray

    out = ctx.work / "processed"
    done = out / "_DONE.json"
    if done.exists():
        return json.loads(done.read_text())
    pair_files = sorted(str(p) for p in (ctx.work / "ingest").glob("[0-9]*[0-9].parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in pair_files)
    tmp = ctx.work / "processed.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    names = ctx.spec.stage_names()
    if rows and names:
        dctx = ray.data.DataContext.get_current()
        dctx.execution_options.preserve_order = True
        dctx.enable_progress_bars = False  # our reporter shows progress; Ray Data's would log lines off a TTY
        quiet_ray_data()
        check_pool_budget(ctx.spec, ray.cluster_resources().get("CPU", 0.0))
        timer = f"pairforge-timer-{ctx.build_id}"
        timer_actor = ray.remote(num_cpus=0)(_StageTimer).options(name=timer).remote()
        ds = ray.data.read_parquet([f for f in pair_files if pq.read_metadata(f).num_rows])
        for entry in ctx.spec.stages:
            cls = stage_class(entry.name)
            res = cls.default_resources.override(entry.params)
            params_json = entry.params.model_dump_json()
            common = dict(batch_format="pyarrow", batch_size=res.batch_size, num_cpus=res.cpus,
                          num_gpus=res.gpus or None)
            if cls.runs_as_actor(entry.params):
                ds = ds.map_batches(_StageActor, fn_constructor_args=(entry.name, params_json, timer),
                                    compute=ray.data.ActorPoolStrategy(size=res.pool_size), **common)
            else:
                ds = ds.map_batches(_run_stage_task, fn_args=(entry.name, params_json, timer), **common)
        stage_seconds = _run_with_progress(lambda: ds.write_parquet(str(tmp)), timer_actor, names, rows)
        ray.kill(timer_actor)
    else:
        tmp.mkdir(parents=True)
        for i, f in enumerate(pair_files):
            shutil.copyfile(f, tmp / f"{i:05d}.parquet")
        stage_seconds = {}
    tmp.rename(out)
    summary = {"rows": rows, "seconds": time.perf_counter() - t0, "stage_seconds": stage_seconds}
    atomic_write_text(done, json.dumps(summary))
    return summary


def check_pool_budget(spec: BuildSpec, cluster_cpus: float) -> None:
    """Actor pools hold their CPUs for the whole pipeline; if what is left can't run one read or task, Ray Data
    waits forever. Refuse such a spec up front, naming the numbers."""
    pools, tasks = 0.0, [1.0]  # a read task takes one CPU
    for entry in spec.stages:
        cls = stage_class(entry.name)
        res = cls.default_resources.override(entry.params)
        if cls.runs_as_actor(entry.params):
            pools += res.cpus * res.pool_size
        else:
            tasks.append(res.cpus)
    if cluster_cpus - pools < max(tasks):
        raise BuildError(
            f"the model stages' actor pools hold {pools:g} of the cluster's {cluster_cpus:g} CPUs, leaving less than "
            f"the {max(tasks):g} a read or CPU stage needs: the pipeline would stall. Lower those stages' `cpus` or "
            f"`pool_size`, or add CPUs")


def _run_with_progress(run, timer, names: list[str], rows: int) -> dict:
    """Run the pipeline in a thread; report each stage's rows from the timer actor. Returns seconds per stage."""
    import threading
    from contextlib import ExitStack

    import ray

    errors: list[BaseException] = []

    def target():
        try:
            run()
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    th = threading.Thread(target=target, name="ray-data-pipeline", daemon=True)
    with ExitStack() as stack:
        advance = {n: stack.enter_context(phase(f"{n}", total=rows)) for n in names}
        seen = dict.fromkeys(names, 0)
        th.start()
        while True:
            th.join(0.5)
            totals = ray.get(timer.get.remote())
            for n in names:
                done_rows = int(totals.get(n, [0])[0])
                advance[n](done_rows - seen[n])
                seen[n] = done_rows
            if not th.is_alive():
                break
    if errors:
        raise errors[0]
    return {k: v[1] for k, v in ray.get(timer.get.remote()).items()}


def quiet_ray_data() -> None:
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # after import: Ray Data configures its loggers then


def processed_files(ctx: BuildContext) -> list[Path]:
    return sorted((ctx.work / "processed").glob("*.parquet"))


def read_metadata(ctx: BuildContext) -> pa.Table:
    """Every processed row without its image bytes: what global decisions read."""
    files = [f for f in processed_files(ctx) if pq.read_metadata(f).num_rows]  # empty ones lack stage columns
    if not files:
        return build_schema(ctx.spec.stage_names()).empty_table()
    ds = pads.dataset([str(f) for f in files], format="parquet")
    cols = [c for c in ds.schema.names if c not in HEAVY_COLUMNS]
    return ds.to_table(columns=cols)


def decide(spec: BuildSpec, meta: pa.Table, prior: pa.Table | None = None) -> tuple[pa.Table, list[dict]]:
    """Thresholds from the spec turn stats into (reject_stage, reject_reason, reject_detail) per row.

    The first stage in spec order that rejects a row owns it. Returns the decisions of rejected rows and
    per-stage counts (rows in, out, rejected by reason).
    """
    n = meta.num_rows
    owner: list[str | None] = [None] * n
    reason: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    stats = []
    alive = n
    for entry in spec.stages:
        cls = stage_class(entry.name)
        takes_prior = "prior" in inspect.signature(cls.decide).parameters
        d: Decision = cls.decide(meta, entry.params, prior=prior) if takes_prior else cls.decide(meta, entry.params)
        by_reason: dict[str, int] = {}
        for i in range(n):
            if owner[i] is None and d.reason[i] is not None:
                owner[i], reason[i], detail[i] = entry.name, d.reason[i], d.detail[i]
                by_reason[d.reason[i]] = by_reason.get(d.reason[i], 0) + 1
        rejected = sum(by_reason.values())
        stats.append({"stage": entry.name, "rows_in": alive, "rows_out": alive - rejected, "rejected": by_reason})
        alive -= rejected
    mask = pa.array([o is not None for o in owner], type=pa.bool_())
    decisions = pa.table({
        "uid": meta.column("uid") if n else pa.array([], pa.string()),
        "reject_stage": pa.array(owner, pa.string()),
        "reject_reason": pa.array(reason, pa.string()),
        "reject_detail": pa.array(detail, pa.string()),
    }).filter(mask)
    return decisions, stats


def with_build_id(t: pa.Table, build_id: str) -> pa.Table:
    if "build_id" in t.column_names:
        t = t.drop_columns(["build_id"])
    return t.append_column("build_id", pa.array([build_id] * t.num_rows, pa.string()))


def write_outputs(ctx: BuildContext, decisions: pa.Table) -> dict:
    """Kept rows -> shards/, every rejected row (input, ingest, stages) -> rejects/."""
    for sub in ("shards", "rejects"):
        if (ctx.build_dir / sub).exists():
            shutil.rmtree(ctx.build_dir / sub)
    spec = ctx.spec
    schema = build_schema(spec.stage_names())
    shards = ShardWriter(ctx.build_dir / "shards", schema, spec.write.rows_per_shard, spec.write.compression)
    rejects = ShardWriter(ctx.build_dir / "rejects", rejects_schema(spec.stage_names()), spec.write.rows_per_shard,
                          spec.write.compression)
    rejected_uids = decisions.column("uid")
    with phase("write") as adv:
        for f in processed_files(ctx):
            for rb in pq.ParquetFile(f).iter_batches(batch_size=1024):
                batch = pa.Table.from_batches([rb])
                batch = with_build_id(batch, ctx.build_id)
                is_rej = pc.is_in(batch.column("uid"), value_set=rejected_uids)
                shards.write(batch.filter(pc.invert(is_rej)))
                gone = batch.filter(is_rej)
                if gone.num_rows:
                    at = pc.index_in(gone.column("uid"), value_set=rejected_uids)
                    for col, src in (("stage", "reject_stage"), ("reason", "reject_reason"), ("detail", "reject_detail")):
                        gone = gone.append_column(col, decisions.column(src).take(at))
                    rejects.write(gone)
                adv(batch.num_rows)
        early = [ctx.work / "input_rejects.parquet"] + sorted((ctx.work / "ingest").glob("*.rejects.parquet"))
        for f in early:
            rejects.write(with_build_id(pq.read_table(f).drop_columns(["build_id"]), ctx.build_id))
        return {"shards": shards.close(), "rejects": rejects.close()}


def check_accounting(ctx: BuildContext) -> dict:
    """kept uids + rejected uids == listed uids, with no uid twice."""
    listed = pads.dataset(str(ctx.work / "input"), format="parquet", schema=INPUT_SCHEMA).to_table(columns=["uid"])
    listed = pa.concat_arrays([listed.column("uid").combine_chunks(),
                               pq.read_table(ctx.work / "input_rejects.parquet", columns=["uid"])["uid"].combine_chunks()])
    def uids(sub):
        files = sorted((ctx.build_dir / sub).glob("part-*.parquet"))
        if not files:
            return pa.array([], pa.string())
        return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=["uid"])["uid"].combine_chunks()
    kept, rej = uids("shards"), uids("rejects")
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


def collect_stats(ctx: BuildContext, prepared: dict, ingest: dict, processed: dict, stage_stats: list[dict],
                  write_seconds: float, counts: dict) -> dict:
    def reasons(files):
        by: dict[str, int] = {}
        for f in files:
            for r in pq.read_table(f, columns=["reason"])["reason"].to_pylist():
                by[r] = by.get(r, 0) + 1
        return by

    input_rej = reasons([ctx.work / "input_rejects.parquet"])
    ingest_rej = reasons(sorted((ctx.work / "ingest").glob("*.rejects.parquet")))
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
            "rows_kept": counts["kept"], "rows_rejected": counts["rejected"], "stages": rows}


# --------------------------------------------------------------------------- Ray

@contextmanager
def ray_session(spec: BuildSpec):
    import ray

    if ray.is_initialized():
        yield
        return
    env_vars = {k: os.environ[k] for k in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                                           "PAIRFORGE_CACHE", "HF_HOME",
                                           "TOKENIZERS_PARALLELISM", "WANDB_MODE") if k in os.environ}
    kw = dict(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env_vars},
              configure_logging=True, logging_level="WARNING")
    if spec.ray.address:
        ray.init(address=spec.ray.address, **kw)
    else:
        ray.init(num_cpus=spec.ray.num_cpus, object_store_memory=int(spec.ray.object_store_gb * 2**30), **kw)
    try:
        yield
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- the flow

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(ctx: BuildContext) -> dict:
    return prepare_inputs(ctx)


def _transient(task, task_run, state) -> bool:
    """Retry failures that may pass (a lost worker, a network error), not a bad spec or input."""
    try:
        state.result()
    except (ValueError, BuildError):  # SpecError, IngestError, StageConfigError are ValueErrors
        return False
    except Exception:
        return True
    return False


@task(name="ingest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,  # resumes: done shards are skipped
      retry_condition_fn=_transient)
def ingest_task(ctx: BuildContext, prepared: dict) -> dict:
    return ingest_all(ctx, prepared)


@task(name="stages", cache_policy=NO_CACHE)
def stages_task(ctx: BuildContext, quiet: bool) -> dict:
    return process_stages(ctx, quiet=quiet)


@task(name="decide-and-write", cache_policy=NO_CACHE)
def write_task(ctx: BuildContext, prepared: dict, ingest: dict, processed: dict) -> dict:
    t0 = time.perf_counter()
    decisions, stage_stats = decide(ctx.spec, read_metadata(ctx), prior=prior_pairs(ctx))
    pq.write_table(decisions, ctx.work / "decisions.parquet")
    files = write_outputs(ctx, decisions)
    counts = check_accounting(ctx)
    stats = collect_stats(ctx, prepared, ingest, processed, stage_stats, time.perf_counter() - t0, counts)
    atomic_write_text(ctx.build_dir / "stats.json", json.dumps(stats, indent=2))
    manifest = write_manifest(
        ctx.build_dir, build_id=ctx.build_id, dataset=ctx.spec.dataset, spec_hash=ctx.spec.spec_hash(),
        code_version=code_version(), shards=files["shards"], rejects=files["rejects"],
        extra={"source": ctx.source_name, "source_fingerprint": ctx.fingerprint,
               "stages": ctx.spec.stage_names(), "stage_metadata": ctx.stage_meta,
               "columns": build_schema(ctx.spec.stage_names()).names})
    write_build_docs(ctx.build_dir)
    return {"stats": stats, "manifest": manifest, "files": files}


def drop_work_copies(ctx: BuildContext) -> None:
    """A finished build's shards and rejects hold every row: drop _work's copies of the image bytes."""
    shutil.rmtree(ctx.work / "processed", ignore_errors=True)
    for f in (ctx.work / "ingest").glob("[0-9]*[0-9].parquet"):
        f.unlink()


def write_build_docs(build_dir: Path) -> None:
    """report.html and the dataset card (README.md). They read only the build's files; a failure is logged,
    never allowed to lose a finished build (`pairforge report BUILD` regenerates them)."""
    from flows.report import write_dataset_card, write_report

    for fn in (write_report, write_dataset_card):
        try:
            fn(build_dir)
        except Exception as e:  # the data is written and checked; the documents can be made again
            get_run_logger().error("%s failed: %s: %s (rerun `pairforge report %s`)", fn.__name__,
                                   type(e).__name__, e, build_dir)


def processed_uids(ctx: BuildContext) -> pa.Table:
    """uids this build fetched and decided (kept, or rejected by a stage): what later incremental builds skip.

    Rows that failed to download are not marked seen, so a later build tries them again."""
    parts = []
    for sub in ("shards", "rejects"):
        files = sorted((ctx.build_dir / sub).glob("part-*.parquet"))
        if not files:
            continue
        t = pads.dataset([str(f) for f in files], format="parquet").to_table(
            columns=["uid", "sha256"] + (["stage"] if sub == "rejects" else []))
        if sub == "rejects":
            t = t.filter(pc.invert(pc.is_in(t["stage"], value_set=pa.array(["input", "ingest"])))).drop_columns(["stage"])
        parts.append(t)
    t = pa.concat_tables(parts) if parts else pa.table({"uid": pa.array([], pa.string()), "sha256": pa.array([], pa.string())})
    return t.append_column("build_id", pa.array([ctx.build_id] * t.num_rows, pa.string()))


def record_in_catalog(ctx: BuildContext, status: str, result: dict | None = None) -> None:
    from catalogs import Catalog

    cat = Catalog(ctx.spec.catalog_path)
    if result is None:
        cat.record_source(ctx.source_name, str(ctx.spec.source.path), ctx.fingerprint, None)
        cat.start_build(ctx.build_id, ctx.spec.dataset, ctx.source_name, ctx.spec.spec_hash(), code_version(),
                        ctx.spec.to_yaml(), str(ctx.build_dir))
        return
    if status == "complete":
        stats, files = result["stats"], result["files"]
        cat.record_source(ctx.source_name, str(ctx.spec.source.path), ctx.fingerprint, stats["rows_listed"])
        cat.record_shards(ctx.build_id, "shard", files["shards"])
        cat.record_shards(ctx.build_id, "rejects", files["rejects"])
        cat.record_stage_stats(ctx.build_id, stats["stages"])
        cat.add_seen(ctx.source_name, processed_uids(ctx))
        if ctx.spec.incremental:
            earlier = earlier_builds(ctx)
            if earlier:
                cat.add_lineage(ctx.build_id, earlier[0]["build_id"], "incremental_of")
        cat.finish_build(ctx.build_id, status, stats["rows_listed"], stats["rows_kept"], stats["rows_rejected"])
    else:
        cat.finish_build(ctx.build_id, status)


@flow(name="pairforge-build", validate_parameters=False, log_prints=True)
def build_flow(spec_path: str, new: bool = False, quiet: bool = False, wait_lock: bool = False) -> dict:
    """Build a dataset from a spec file. Resumes an unfinished build of the same spec and input."""
    spec = load_spec(spec_path)
    return run_build(spec, new=new, quiet=quiet, wait_lock=wait_lock)


def preflight(spec: BuildSpec) -> dict:
    """Instantiate every stage and run its preflight: a model that can't be found fails before any data is read."""
    meta = {}
    for entry in spec.stages:
        stage = stage_class(entry.name)(entry.params)
        stage.preflight()
        meta[entry.name] = stage.metadata()
    return meta


def run_build(spec: BuildSpec, *, new: bool = False, quiet: bool = False, wait_lock: bool = False) -> dict:
    logger = get_run_logger()
    stage_meta = preflight(spec)
    with dataset_lock(spec, wait=wait_lock):
        ctx = open_build(spec, new=new)
        ctx.stage_meta = stage_meta
        logger.info("build %s (%s) in %s", ctx.build_id, "resumed" if ctx.resumed else "new", ctx.build_dir)
        record_in_catalog(ctx, "running")
        try:
            with ray_session(spec):
                prepared = prepare_task(ctx)
                ingest = ingest_task(ctx, prepared)
                processed = stages_task(ctx, quiet)
            result = write_task(ctx, prepared, ingest, processed)
        except BaseException:
            ctx.set_state(status="failed")
            record_in_catalog(ctx, "failed", {})
            raise
        ctx.set_state(status="complete", finished=datetime.now(timezone.utc).isoformat())
        record_in_catalog(ctx, "complete", result)
        drop_work_copies(ctx)
        stats = result["stats"]
        logger.info("build %s: %d listed, %d kept, %d rejected", ctx.build_id, stats["rows_listed"],
                    stats["rows_kept"], stats["rows_rejected"])
        return {"build_id": ctx.build_id, "build_dir": str(ctx.build_dir), "resumed": ctx.resumed,
                "stats": stats, "manifest_rows": result["manifest"]["rows"]}
