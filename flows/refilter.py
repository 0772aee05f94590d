"""refilter: re-decide a finished build with new thresholds, from its stored stats. No stage runs, no model loads.

The parent's kept shards and its full-record rejects hold every row's stats, so a child build is: the same rows,
the new spec's decide(), the same write. The child is recorded in the catalog with lineage `refilter_of`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from prefect import flow, get_run_logger

from flows import env  # noqa: F401
from flows.build import record_in_catalog, write_task
from flows.engine.context import BuildContext, dataset_lock, open_build
from flows.engine.runner import process_stages, ray_session
from schemas.columns import INPUT_SCHEMA, REJECT_SCHEMA
from schemas.spec import BuildSpec, SpecError, format_errors
from stages import stage_class
from dataio.build_folder import BuildFolder, atomic_write_table, atomic_write_text
from dataio.storage import Location, location

EARLY = ("input", "ingest")


def apply_overrides(spec_dict: dict, overrides: list[str]) -> dict:
    """`stage.param=value` (value parsed as YAML) on the resolved spec's stages."""
    stages = {next(iter(s)): next(iter(s.values())) for s in spec_dict["stages"]}
    for item in overrides:
        key, sep, raw = item.partition("=")
        stage, dot, param = key.strip().partition(".")
        if not sep or not dot:
            raise SpecError(f"--set {item!r}: expected stage.param=value")
        if stage not in stages:
            raise SpecError(f"--set {item!r}: the build has no stage {stage!r}; it has {sorted(stages)}")
        if param not in stage_class(stage, spec_dict.get("stage_modules") or ()).Params.model_fields:
            raise SpecError(f"--set {item!r}: stage {stage!r} has no parameter {param!r}")
        stages[stage][param] = yaml.safe_load(raw)
    return spec_dict


def child_spec(parent_dir: Location, overrides: list[str] = (), spec_path: Path | None = None) -> BuildSpec:
    parent = yaml.safe_load((parent_dir / "spec.yaml").read_text())
    data = yaml.safe_load(Path(spec_path).read_text()) if spec_path else apply_overrides(parent, list(overrides))
    try:
        spec = BuildSpec.model_validate(data)
    except Exception as e:  # pydantic ValidationError
        msg = format_errors(e) if hasattr(e, "errors") else str(e)
        raise SpecError(f"{spec_path or parent_dir / 'spec.yaml'}: {msg}") from None
    parent_stages = [next(iter(s)) for s in parent["stages"]]
    if spec.stage_names() != parent_stages:
        raise SpecError(f"refilter re-decides the stages the build ran ({parent_stages}); "
                        f"this spec has {spec.stage_names()}: build it instead")
    return spec


def stage_rows(parent_dir: Location, ctx: BuildContext) -> tuple[dict, dict]:
    """Lay the parent's rows out as the child's finished input and ingest work, one input shard per parent file:
    the rows a stage saw become that shard's downloaded pairs (their stats included), the rows that failed to
    download its ingest rejects."""
    t0 = time.perf_counter()
    folder = ctx.folder
    for sub in (folder.input_dir, folder.ingest_dir):
        folder.fresh_dir(sub)
    input_rej, listed, shards = [], 0, 0
    for kind in ("shards", "rejects"):
        for f in BuildFolder(parent_dir).parts(kind):
            t = f.read_table()
            ingest_rej = REJECT_SCHEMA.empty_table()
            if kind == "rejects":
                stage = t.column("stage")
                input_rej.append(t.filter(pc.equal(stage, "input")).select(REJECT_SCHEMA.names))
                ingest_rej = t.filter(pc.equal(stage, "ingest")).select(REJECT_SCHEMA.names)
                t = t.filter(pc.invert(pc.is_in(stage, value_set=pa.array(EARLY)))).drop_columns(
                    ["stage", "reason", "detail"])
            t = t.drop_columns(["build_id"])
            source = pa.array([ctx.source_name] * ingest_rej.num_rows, pa.string())
            inputs = pa.concat_tables([t.select(INPUT_SCHEMA.names).cast(INPUT_SCHEMA), ingest_rej.select(
                ["uid", "url", "text"]).append_column("source", source).cast(INPUT_SCHEMA)])
            if not inputs.num_rows:
                continue
            paths = folder.ingest_shard(shards)
            atomic_write_table(inputs, folder.input_shard(shards))
            atomic_write_table(t, paths.pairs)
            atomic_write_table(ingest_rej, paths.rejects)
            atomic_write_text(paths.done, json.dumps({"shard": shards, "rows_in": inputs.num_rows,
                                                      "pairs": t.num_rows, "rejects": ingest_rej.num_rows}))
            listed += inputs.num_rows
            shards += 1
    input_rej = pa.concat_tables(input_rej) if input_rej else REJECT_SCHEMA.empty_table()
    atomic_write_table(input_rej, folder.input_rejects)
    prepared = {"rows_listed": listed + input_rej.num_rows, "rows": listed, "rejected": input_rej.num_rows,
                "shards": shards, "seconds": time.perf_counter() - t0, "refilter_of": parent_dir.name}
    folder.mark_done("input", prepared)
    return prepared, {"seconds": 0.0, "shards_fetched": 0}


@flow(name="pairforge-refilter", validate_parameters=False, log_prints=True)
def refilter_flow(build_dir: str, overrides: list[str] | None = None, spec_path: str | None = None,
                  quiet: bool = False) -> dict:
    logger = get_run_logger()
    parent_dir = location(build_dir)
    if not (parent_dir / "manifest.json").exists():
        raise SpecError(f"{parent_dir}: not a finished build (no manifest.json)")
    spec = child_spec(parent_dir, overrides or [], Path(spec_path) if spec_path else None)
    with dataset_lock(spec):
        ctx = open_build(spec, new=True)
        ctx.set_state(refilter_of=parent_dir.name)
        ctx.history_of = parent_dir.name
        record_in_catalog(ctx, "running")
        prepared, ingest = stage_rows(parent_dir, ctx)
        with ray_session(spec):  # re-deciding is distributed too; no stage runs, no model loads
            processed = process_stages(ctx, compute=False)
            result = write_task(ctx, prepared, ingest, processed)
        ctx.set_state(status="complete")
        record_in_catalog(ctx, "complete", result)
        ctx.folder.drop_work_copies()  # as a build does: the shards hold every row now
        from catalogs import Catalog

        Catalog(spec.catalog_path).add_lineage(ctx.build_id, parent_dir.name, "refilter_of")
    logger.info("refilter %s -> %s: %d kept", parent_dir.name, ctx.build_id, result["stats"]["rows_kept"])
    return {"build_id": ctx.build_id, "build_dir": str(ctx.build_dir), "resumed": False,
            "parent": parent_dir.name, "stats": result["stats"], "manifest_rows": result["manifest"]["rows"]}
