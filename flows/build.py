"""The build flow: spec -> input shards -> ingest (Ray tasks) -> stages (Ray Data) -> decide -> write -> catalog.

Each phase is a plain function in flows/engine/ over the build's folder (dataio.build_folder), which leaves
completion markers, so a killed build re-run with the same spec resumes: finished download shards are not fetched
again, and later phases redo only what has no marker. This module holds the Prefect tasks and flow around them.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import env  # noqa: F401  (offline, quiet defaults before Prefect and Ray load)
from flows.engine.context import BuildContext, BuildError, code_version, dataset_lock, earlier_builds, open_build
from flows.engine.global_decisions import run_global_stages
from flows.engine.ingest import ingest_all
from flows.engine.inputs import prepare_inputs, prior_files
from flows.engine.outputs import check_accounting, collect_stats, manifest, seen_readers, write_outputs
from flows.engine.resources import check_fit
from flows.engine.runner import process_stages, ray_session
from flows.engine.progress import phase
from flows.preflight import preflight
from schemas.spec import BuildSpec, load_spec
from dataio.build_folder import atomic_write_text
from dataio.storage import Location, location

__all__ = ["BuildContext", "BuildError", "build_flow", "preflight", "run_build"]


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


@task(name="stages", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,  # redoes only unfinished shards
      retry_condition_fn=_transient)
def stages_task(ctx: BuildContext) -> dict:
    return process_stages(ctx)


@task(name="decide-and-write", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,  # finished global
      retry_condition_fn=_transient)  # decisions and written shards are skipped: a lost node costs one retry
def write_task(ctx: BuildContext, prepared: dict, ingest: dict, processed: dict) -> dict:
    """Global decisions (distributed), then workers write the shards; the driver checks and records."""
    t0 = time.perf_counter()
    global_ = run_global_stages(ctx, processed["rows"], prior_files(ctx))
    written = write_outputs(ctx, prepared["shards"])
    counts = check_accounting(ctx, written)
    stats = collect_stats(ctx, prepared, ingest, processed, global_, written, time.perf_counter() - t0, counts)
    atomic_write_text(ctx.folder.stats, json.dumps(stats, indent=2))
    man = manifest(ctx, written)
    with phase("report"):
        write_build_docs(ctx.build_dir)
    return {"stats": stats, "manifest": man, "files": {k: written.sorted_files(k) for k in ("shards", "rejects")}}


def write_build_docs(build_dir: Location) -> None:
    """report.html and the dataset card (README.md), made by a Ray worker from the build's files (the driver's
    memory stays flat whatever the build's size). A failure is logged, never allowed to lose a finished build
    (`pairforge report BUILD` regenerates them)."""
    import ray

    failed = ray.get(ray.remote(make_build_docs).options(num_cpus=1, max_retries=1).remote(str(build_dir)))
    for name, error in failed:
        get_run_logger().error("%s failed: %s (rerun `pairforge report %s`)", name, error, build_dir)


def make_build_docs(build_dir: str) -> list[tuple[str, str]]:
    """Write the report and the dataset card; returns (what, error) for each that failed."""
    from reporting.report import write_dataset_card, write_report

    failed = []
    for fn in (write_report, write_dataset_card):
        try:
            fn(location(build_dir))
        except Exception as e:  # the data is written and checked; the documents can be made again
            failed.append((fn.__name__, f"{type(e).__name__}: {e}"))
    return failed


def record_in_catalog(ctx: BuildContext, status: str, result: dict | None = None) -> None:
    from catalogs import Catalog

    cat = Catalog(ctx.spec.catalog_path)
    if result is None:
        cat.record_source(ctx.source_name, str(ctx.spec.source.path), ctx.fingerprint, None)
        cat.start_build(ctx.build_id, ctx.spec.dataset, ctx.source_name, ctx.spec.spec_hash(), code_version(),
                        ctx.spec.to_yaml(), str(ctx.build_dir))
        cat.record_stage_versions(ctx.build_id, ctx.spec.stage_versions())
        return
    if status == "complete":
        stats, files = result["stats"], result["files"]
        cat.record_source(ctx.source_name, str(ctx.spec.source.path), ctx.fingerprint, stats["rows_listed"])
        cat.record_shards(ctx.build_id, "shard", files["shards"])
        cat.record_shards(ctx.build_id, "rejects", files["rejects"])
        cat.record_stage_stats(ctx.build_id, stats["stages"])
        with phase("catalog"):  # the seen uids: the output files streamed into the catalog, nothing per row held
            cat.record_seen(ctx.source_name, ctx.build_id, seen_readers(ctx))
        if ctx.spec.incremental:
            earlier = earlier_builds(ctx)
            if earlier:
                cat.add_lineage(ctx.build_id, earlier[0]["build_id"], "incremental_of")
        cat.finish_build(ctx.build_id, status, stats["rows_listed"], stats["rows_kept"], stats["rows_rejected"])
    else:
        cat.finish_build(ctx.build_id, status)


@flow(name="pairforge-build", validate_parameters=False, log_prints=True)
def build_flow(spec_path: str, new: bool = False, quiet: bool = False, wait_lock: bool = False,
               fail_if_empty: bool = False) -> dict:
    """Build a dataset from a spec file. Resumes an unfinished build of the same spec and input."""
    spec = load_spec(spec_path)
    return run_build(spec, new=new, quiet=quiet, wait_lock=wait_lock, fail_if_empty=fail_if_empty)


def check_fit_in_session(spec: BuildSpec) -> None:
    """check_fit against the cluster Ray is connected to (a remote one is known only now), before any download."""
    import ray

    cluster = ray.cluster_resources()
    check_fit(spec, (cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)))


def run_build(spec: BuildSpec, *, new: bool = False, quiet: bool = False, wait_lock: bool = False,
              fail_if_empty: bool = False) -> dict:
    logger = get_run_logger()
    stage_meta = preflight(spec, fail_if_empty=fail_if_empty, wait_lock=wait_lock)  # done already by the CLI
    with dataset_lock(spec, wait=wait_lock):
        ctx = open_build(spec, new=new)
        ctx.stage_meta = stage_meta
        logger.info("build %s (%s) in %s", ctx.build_id, "resumed" if ctx.resumed else "new", ctx.build_dir)
        record_in_catalog(ctx, "running")
        try:
            with ray_session(spec):
                check_fit_in_session(spec)
                prepared = prepare_task(ctx)
                ingest = ingest_task(ctx, prepared)
                processed = stages_task(ctx)
                result = write_task(ctx, prepared, ingest, processed)
        except BaseException:
            try:
                ctx.set_state(status="failed")
            except OSError as e:  # the store that failed the build may refuse this too: keep the first error
                logger.warning("could not mark build %s failed (%s); a rerun resumes it all the same", ctx.build_id, e)
            record_in_catalog(ctx, "failed", {})
            raise
        ctx.set_state(status="complete", finished=datetime.now(timezone.utc).isoformat())
        record_in_catalog(ctx, "complete", result)
        ctx.folder.drop_work_copies()
        stats = result["stats"]
        logger.info("build %s: %d listed, %d kept, %d rejected", ctx.build_id, stats["rows_listed"],
                    stats["rows_kept"], stats["rows_rejected"])
        return {"build_id": ctx.build_id, "build_dir": str(ctx.build_dir), "catalog": str(spec.catalog_path),
                "resumed": ctx.resumed, "stats": stats, "manifest_rows": result["manifest"]["rows"]}
