"""The stages as one Ray Data pipeline: CPU stages as tasks, model stages as actor pools, with the spec's resources
fitted to the cluster (flows.engine.resources).

Images are decoded once per batch: a decode step (CPU tasks) runs before the first stage that reads pixels, at the
largest shorter side those stages need (Stage.pixel_side; in full if any needs the stored pixels), and the private
pixel columns are dropped after the last one. `image` is dropped after the last stage that `needs_image`: for a
model stage with a prepare step, after that step, so neither crosses into its actors. GPU actors run two batches
at once (a threaded actor, one CUDA stream per thread). A named timer actor sums each step's rows, seconds and
image decodes, which feed the live progress and the build's stats.
"""
from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pyarrow as pa
import pyarrow.compute as pc

from flows.engine.context import BuildContext
from flows.engine.decide import decide_rowwise
from flows.engine.global_decisions import SRC
from flows.engine.progress import phase
from flows.engine.resources import PREPARE_CPUS, fit_resources
from schemas.registry import MODULES_ENV
from schemas.spec import BuildSpec, SourceSpec
from stages import stage_class
from stages.base import Resources, drop_private
from stages.imaging.decode import add_pixels, decodes, drop_pixels
from dataio.build_folder import BuildFolder, atomic_write_table, atomic_write_text
from dataio.storage import location
from dataio.uids import pair_units, shard_pairs

DECODE = "decode"


class StageTimer:
    """A Ray actor summing, per pipeline step over all batches: rows, seconds, image decodes, CPU seconds of the
    worker process, and when the first batch started and the last ended (wall clock):
    [rows, seconds, decodes, cpu_seconds, first, last]. Prepare steps report as "<stage>.prepare"."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}

    def add(self, step: str, rows: int, seconds: float, decoded: int = 0, cpu_seconds: float = 0.0) -> None:
        now = time.time()
        t = self.totals.setdefault(step, [0, 0.0, 0, 0.0, now - seconds, now])
        t[0] += rows
        t[1] += seconds
        t[2] += decoded
        t[3] += cpu_seconds
        t[4] = min(t[4], now - seconds)
        t[5] = max(t[5], now)

    def get(self) -> dict:
        return self.totals


_TIMER: list = [None, None]  # (name, handle) of the timer actor this worker process reports to


def timer_handle(name: str):
    """The named timer actor's handle, looked up once per worker process (not per batch)."""
    if _TIMER[0] != name:
        import ray

        _TIMER[:] = [name, ray.get_actor(name)]
    return _TIMER[1]


def _timed(step: str, fn, batch: pa.Table, timer: str, drop_after: bool, drop_image: bool = False,
           cpu_clock=time.process_time) -> pa.Table:
    """Run one step on a batch; tell the named timer actor its rows, seconds, decodes and CPU seconds. drop_after:
    the shared decode's columns go after it; drop_image: `image` too (no later step reads either). cpu_clock:
    time.thread_time where other calls run in the same process at once (GPU actors)."""
    t0, c0, d0 = time.perf_counter(), cpu_clock(), decodes()
    out = fn(batch)
    if out.num_rows != batch.num_rows:
        raise RuntimeError(f"{step} changed the row count {batch.num_rows} -> {out.num_rows}")
    if drop_after:
        out = drop_pixels(out)
    if drop_image and "image" in out.column_names:
        out = out.drop_columns(["image"])
    timer_handle(timer).add.remote(step, batch.num_rows, time.perf_counter() - t0, decodes() - d0,
                                   cpu_clock() - c0)
    return out


def decode_step(batch: pa.Table, timer: str, side: int | None = None) -> pa.Table:
    return _timed(DECODE, lambda b: add_pixels(b, side), batch, timer, False)


_STAGES: dict = {}  # stages set up in this worker process (task mode), torn down when it exits


def _make_stage(name: str, params_json: str):
    cls = stage_class(name)
    stage = cls(cls.Params.model_validate_json(params_json))
    stage.setup()
    return stage


@atexit.register
def _teardown_task_stages() -> None:
    for stage in _STAGES.values():
        stage.teardown()
    _STAGES.clear()


_PREPARERS: dict = {}  # model stages without setup(): their prepare_batch runs in CPU tasks, no model loaded


def run_prepare_task(batch: pa.Table, name: str, params_json: str, timer: str, drop_after: bool = False,
                     drop_image: bool = False) -> pa.Table:
    """A model stage's prepare_batch (decode, resize into model-ready pixels) in a CPU task ahead of its actors."""
    key = (name, params_json)
    if key not in _PREPARERS:
        cls = stage_class(name)
        _PREPARERS[key] = cls(cls.Params.model_validate_json(params_json))
    return _timed(f"{name}.prepare", _PREPARERS[key].prepare_batch, batch, timer, drop_after, drop_image)


def run_stage_task(batch: pa.Table, name: str, params_json: str, timer: str, drop_after: bool = False,
                   drop_image: bool = False) -> pa.Table:
    key = (name, params_json)
    if key not in _STAGES:
        _STAGES[key] = _make_stage(name, params_json)
    return _timed(name, _STAGES[key], batch, timer, drop_after, drop_image)


class StageActor:
    """A model stage in an actor pool: set up once per actor, torn down when Ray Data retires the actor. A GPU
    pool's actors take two batches at once (actor_strategy), each on its own thread and CUDA stream."""

    def __init__(self, name: str, params_json: str, timer: str, drop_after: bool = False, drop_image: bool = False):
        self.stage = _make_stage(name, params_json)
        self.timer = timer
        self.drop_after = drop_after
        self.drop_image = drop_image
        self.cpu_clock = time.thread_time if self.stage.resources.gpus else time.process_time

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _timed(self.stage.name, self.stage, batch, self.timer, self.drop_after, self.drop_image, self.cpu_clock)

    def __del__(self):
        stage = getattr(self, "stage", None)
        if stage is not None:
            stage.teardown()


def image_span(spec: BuildSpec) -> tuple[int, int] | None:
    """(first, last) positions of the stages that read decoded pixels, or None."""
    pos = [i for i, e in enumerate(spec.stages) if stage_class(e.name).reads_pixels(e.params)]
    return (pos[0], pos[-1]) if pos else None


def last_image_reader(spec: BuildSpec) -> int | None:
    """Position of the last stage that reads images (pixels or `image` bytes): no step after it gets `image`."""
    pos = [i for i, e in enumerate(spec.stages) if stage_class(e.name).needs_image]
    return pos[-1] if pos else None


def decode_side(spec: BuildSpec) -> int | None:
    """The shared decode's shorter side: the largest that the pixel-reading stages need (Stage.pixel_side); None
    (the stored size) when any needs the stored pixels or none reads pixels."""
    sides = [stage_class(e.name).pixel_side(e.params) for e in spec.stages
             if stage_class(e.name).reads_pixels(e.params)]
    return None if not sides or any(s is None for s in sides) else max(sides)


GPU_BATCHES_IN_FLIGHT = 2  # a GPU actor runs this many batches at once: one's copies and Ray's hand-over overlap
#                            the other's forwards
GPU_BACKPRESSURE_RATIO = 10.0  # Ray Data's downstream_capacity_backpressure_ratio with GPU pools (2.0 by default
#                                since Ray 2.57, which starved GPU actor pools of blocks in NeMo Curator's pipelines)


def actor_strategy(size: int, gpus: float):
    """The pool of one model stage: `size` actors; on GPUs each runs GPU_BATCHES_IN_FLIGHT batches concurrently
    (threads), with as many more queued so the next batch is already in the actor when one finishes."""
    import ray

    if not gpus:
        return ray.data.ActorPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=GPU_BATCHES_IN_FLIGHT,
                                      enable_true_multi_threading=True,
                                      max_tasks_in_flight_per_actor=2 * GPU_BATCHES_IN_FLIGHT)


def step_names(spec: BuildSpec) -> list[str]:
    names = spec.stage_names()
    span = image_span(spec)
    return names if span is None else names[:span[0]] + [DECODE] + names[span[0]:]


def stage_pipeline(ds, spec: BuildSpec, timer: str, fitted: dict[int, Resources]):
    """The spec's stages over a Ray Dataset of pairs, each batch decoded once for the image stages; a model stage
    that prepares its batches gets CPU tasks streaming ahead of its actor pool (`fitted`: each stage's resources on
    this cluster, flows.engine.resources.fit_resources)."""
    import ray

    span = image_span(spec)
    last_reader = last_image_reader(spec)
    side = decode_side(spec)
    gpu_pools = False
    for i, entry in enumerate(spec.stages):
        cls = stage_class(entry.name)
        res = fitted[i]
        if span is not None and i == span[0]:
            ds = ds.map_batches(decode_step, fn_args=(timer, side), batch_format="pyarrow", batch_size=res.batch_size,
                                num_cpus=min(1.0, res.cpus))
        drop_after = span is not None and i == span[1]
        drop_image = i == last_reader
        params_json = entry.params.model_dump_json()
        common = dict(batch_format="pyarrow", batch_size=res.batch_size, num_cpus=res.cpus, num_gpus=res.gpus or None)
        if cls.runs_as_actor(entry.params):
            if cls.prepares_batches():  # the last reader of pixels and image: they stop here, before the actors
                ds = ds.map_batches(run_prepare_task, fn_args=(entry.name, params_json, timer, drop_after, drop_image),
                                    batch_format="pyarrow", batch_size=res.batch_size, num_cpus=PREPARE_CPUS)
                drop_after = drop_image = False
            gpu_pools = gpu_pools or bool(res.gpus)
            ds = ds.map_batches(StageActor, fn_constructor_args=(entry.name, params_json, timer, drop_after, drop_image),
                                compute=actor_strategy(res.pool_size, res.gpus), **common)
        else:
            ds = ds.map_batches(run_stage_task, fn_args=(entry.name, params_json, timer, drop_after, drop_image),
                                **common)
    if gpu_pools:
        ray.data.DataContext.get_current().downstream_capacity_backpressure_ratio = GPU_BACKPRESSURE_RATIO
    return ds


def read_shard_unit(folder: BuildFolder, source: SourceSpec, shard: int, unit: int) -> Iterator[pa.Table]:
    """One unit of an ingest shard's pairs (a row group of its download, or a corpus piece), with their image bytes,
    each row tagged with its input shard."""
    for t in shard_pairs(source, folder.ingest_shard(shard).pairs, units=[unit]):
        yield t.append_column(SRC, pa.repeat(pa.scalar(shard, pa.int64()), t.num_rows))


def pairs_datasource(folder: BuildFolder, source: SourceSpec, units: list[tuple[int, int]]):
    """The ingest shards' pairs as a Ray Data source with one read task per (shard, unit): the stages run fused
    into each (as over read_parquet's files), a few thousand rows a task."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ShardUnits(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(lambda s=s, u=u: read_shard_unit(folder, source, s, u),
                             BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None))
                    for s, u in units]

    return ShardUnits()


def finish_batch(batch: pa.Table, spec: BuildSpec) -> pa.Table:
    """The row-wise decisions, then the batch as _work/processed keeps it: no image bytes, no private columns."""
    batch = decide_rowwise(drop_private(batch), spec)
    return batch.drop_columns([c for c in ("image",) if c in batch.column_names])


def write_processed(batch: pa.Table, out: str) -> pa.Table:
    """Write a finished batch into processed/input_shard=N/, one file per input shard it holds, named by the
    group's first uid, so a retried task writes the same names again. Returns (input_shard, rows) per file."""
    out_dir = location(out)
    src = batch.column(SRC)
    shards, rows = [], []
    for s in pc.unique(src).to_pylist():
        part = batch.filter(pc.equal(src, s)).drop_columns([SRC])
        atomic_write_table(part, out_dir / f"{SRC}={s}" / f"part-{part.column('uid')[0].as_py()}.parquet")
        shards.append(s)
        rows.append(part.num_rows)
    return pa.table({SRC: pa.array(shards, pa.int64()), "rows": pa.array(rows, pa.int64())})


def _mark_finished_shards(ds, folder: BuildFolder, sizes: dict[int, int]) -> None:
    """Consume the pipeline's (input_shard, rows) results; once every row of a shard is written, write its stats
    marker. The driver holds one count per shard."""
    written = dict.fromkeys(sizes, 0)
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for s, n in zip(b.column(SRC).to_pylist(), b.column("rows").to_pylist()):
            written[s] += n
            if written[s] == sizes[s]:
                atomic_write_text(folder.stats_marker(s), json.dumps({"rows": sizes[s]}))


def process_stages(ctx: BuildContext, compute: bool = True) -> dict:
    """Run the spec's stages over the downloaded pairs (compute=False: only their row-wise decisions, over stats
    the rows already hold, as refilter does), into _work/processed/input_shard=N/: stats and decisions, no image
    bytes. Each input shard's stats leave their own marker; a resumed pass redoes only the shards without one."""
    import ray

    folder = ctx.folder
    done = folder.done("processed")
    if done is not None:
        return done
    metas = {int(f.stem): f.read_metadata() for f in folder.ingest_pair_files()}
    sizes = {s: m.num_rows for s, m in metas.items()}
    finished = folder.stats_done()
    todo = {s: n for s, n in sizes.items() if n and s not in finished}
    units = [(s, u) for s in sorted(todo) for u in range(pair_units(metas[s]))]
    folder.processed_dir.mkdir()
    for s in todo:  # what a killed pass left of an unfinished shard
        (folder.processed_dir / f"{SRC}={s}").rmtree()
    rows = sum(todo.values())
    t0 = time.perf_counter()
    steps: dict = {}
    if rows:
        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = False  # our reporter shows progress; Ray Data's would log lines off a TTY
        quiet_ray_data()
        cluster = ray.cluster_resources()
        fitted = fit_resources(ctx.spec, cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)) if compute else {}
        # Ray Data reserves each operator a share of the CPUs: with tasks only, the light read tasks would hold half
        # of them while the stages queue (measured: 200k rows on 2 CPUs, one stage task at a time until the reads
        # end). Actor pools keep the reservation (their CPUs and GPUs are held anyway).
        dctx.op_resource_reservation_enabled = compute and any(
            stage_class(e.name).runs_as_actor(e.params) for e in ctx.spec.stages)
        timer = f"pairforge-timer-{ctx.build_id}"
        try:  # a failed attempt's (the stages task is retried)
            ray.kill(ray.get_actor(timer))
        except ValueError:
            pass
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: a lost worker node must not take the timer (and the pass) with it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        timer_actor = ray.remote(num_cpus=0)(StageTimer).options(name=timer, scheduling_strategy=here).remote()
        ds = ray.data.read_datasource(pairs_datasource(folder, ctx.spec.source, units),
                                      override_num_blocks=len(units))
        if compute:
            ds = stage_pipeline(ds, ctx.spec, timer, fitted)
        ds = ds.map_batches(finish_batch, fn_args=(ctx.spec,), batch_format="pyarrow")
        ds = ds.map_batches(write_processed, fn_args=(str(folder.processed_dir),), batch_format="pyarrow",
                            batch_size=None)  # one file per block and input shard
        names = step_names(ctx.spec) if compute else []
        try:
            steps = _run_with_progress(lambda: _mark_finished_shards(ds, folder, todo), timer_actor, names, rows)
        finally:
            ray.kill(timer_actor)
    decoded = sum(v[2] for v in steps.values())
    summary = {"rows": sum(sizes.values()), "rows_resumed": sum(sizes.values()) - rows,
               "seconds": time.perf_counter() - t0,
               "stage_seconds": {k: v[1] for k, v in steps.items()},
               "stage_spans": {k: {"rows": int(v[0]), "cpu_seconds": v[3], "first": v[4], "last": v[5]}
                               for k, v in steps.items()},
               "decodes_per_row": round(decoded / rows, 3) if rows else 0.0}
    folder.mark_done("processed", summary)
    return summary


def _run_with_progress(run, timer, names: list[str], rows: int) -> dict:
    """Run the pipeline in a thread; report each step's rows from the timer actor. Returns the timer's totals."""
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
                # the steps run fused in one pipeline: each ends with its own summed batch seconds (StageTimer),
                # the build's stats and closing table count the same
                advance[n](done_rows - seen[n], seconds=totals.get(n, [0, 0.0])[1])
                seen[n] = done_rows
            if not th.is_alive():
                break
    if errors:
        raise errors[0]
    return ray.get(timer.get.remote())


def quiet_ray_data() -> None:
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # after import: Ray Data configures its loggers then


@contextmanager
def ray_session(spec: BuildSpec):
    import ray

    if ray.is_initialized():
        yield
        return
    env_vars = {k: os.environ[k] for k in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                                           "PAIRFORGE_CACHE", "HF_HOME",
                                           "TOKENIZERS_PARALLELISM", "WANDB_MODE") if k in os.environ}
    env_vars |= {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PAIRFORGE_S3_"))}  # object storage
    if spec.stage_modules:  # the workers import them as the driver did (schemas.registry)
        env_vars[MODULES_ENV] = ",".join(spec.stage_modules)
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
