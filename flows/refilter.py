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
from pydantic import ValidationError

from flows import env  # noqa: F401
from flows.build import record_in_catalog, write_task
from flows.engine.context import BuildContext, dataset_lock, open_build
from flows.engine.runner import process_stages, ray_session
from schemas.columns import INPUT_SCHEMA, REJECT_SCHEMA
from flows.preflight import check_writable
from reporting.report import require_build
from schemas.errors import did_you_mean
from schemas.spec import BuildSpec, SpecError, read_yaml, spec_error
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
        where = f"--set {item}"
        if not sep or not dot:
            raise SpecError("expected stage.param=value", where, "e.g. --set basic.min_side=100")
        if stage not in stages:
            raise SpecError(f"the build has no stage {stage!r}", where,
                            did_you_mean(stage, list(stages), "its stages"), stage)
        params = stage_class(stage, spec_dict.get("stage_modules") or ()).Params.model_fields
        if param not in params:
            raise SpecError(f"stage {stage!r} has no parameter {param!r}", where,
                            did_you_mean(param, list(params), "its parameters"), f"{stage}.{param}")
        stages[stage][param] = yaml.safe_load(raw)
    return spec_dict


def child_location(parent_dir: Location, parent: dict, out: str | None = None,
                   catalog: str | None = None) -> tuple[str, str]:
    """(out, catalog) of a refilter's child: `out` if given, else beside the build it re-decides (the build's own
    <out>, when it sits in <out>/<dataset>/<build id>, else its folder); the catalog: `catalog` if given, else
    <out>/catalog.duckdb. Never the stored spec's paths, which still name wherever the build was made (a copied
    build would write into the original's folder). For a build in object storage the catalog stays local: the one
    its spec names, when that file is here, else --catalog is needed."""
    dataset = parent["dataset"]
    if out is not None:
        out_loc = location(out)
    elif parent_dir.parent.name == dataset:
        out_loc = parent_dir.parent.parent
    else:
        out_loc = parent_dir.parent
    if catalog is not None:
        return str(out_loc), str(Path(catalog).resolve())
    if out_loc.is_local:
        return str(out_loc), str(Path(str(out_loc)) / "catalog.duckdb")
    stored = parent.get("catalog")
    if stored and Path(stored).is_file():
        return str(out_loc), stored
    raise SpecError(f"the build is in object storage and its catalog ({stored}) is not on this machine",
                    str(parent_dir), "pass --catalog FILE (a local DuckDB file)", "catalog")


def child_spec(parent_dir: Location, overrides: list[str] = (), spec_path: Path | None = None,
               out: str | None = None, catalog: str | None = None) -> BuildSpec:
    """The child's spec: the parent's with --set overrides (or a whole spec with the same stages), written
    where child_location says."""
    parent_dir = require_build(parent_dir)
    if not (parent_dir / "manifest.json").exists():
        raise SpecError("not a finished build (no manifest.json)", str(parent_dir),
                        "refilter a build that completed (`pairforge catalog` lists them with their status)")
    parent = yaml.safe_load((parent_dir / "spec.yaml").read_text())
    data = read_yaml(spec_path) if spec_path else apply_overrides(parent, list(overrides))
    if not isinstance(data, dict):
        raise SpecError("the spec is not a mapping", str(spec_path), "give a whole build spec (YAML keys)")
    data["out"], data["catalog"] = child_location(parent_dir, parent, out, catalog)
    origin = str(spec_path or parent_dir / "spec.yaml")
    try:
        spec = BuildSpec.model_validate(data)
    except ValidationError as e:
        raise spec_error(e, origin, BuildSpec) from None
    spec._origin = origin
    parent_stages = [next(iter(s)) for s in parent["stages"]]
    if spec.stage_names() != parent_stages:
        raise SpecError(f"refilter re-decides the stages the build ran ({', '.join(parent_stages)}); this spec has "
                        f"{', '.join(spec.stage_names())}", origin, "build it instead (`pairforge build`)", "stages")
    check_writable(spec)
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
                  quiet: bool = False, out: str | None = None, catalog: str | None = None) -> dict:
    logger = get_run_logger()
    parent_dir = location(build_dir)
    spec = child_spec(parent_dir, overrides or [], Path(spec_path) if spec_path else None, out, catalog)
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
    return {"build_id": ctx.build_id, "build_dir": str(ctx.build_dir), "catalog": str(spec.catalog_path),
            "resumed": False, "parent": parent_dir.name, "stats": result["stats"],
            "manifest_rows": result["manifest"]["rows"]}
