"""The hard-negative image set of a finished build: `pairforge negatives BUILD [--editors flip,recolor,render]`.

    negatives_flow(build_dir, spec)  spec: a NegativesImageSpec, a dict of its fields, a YAML path, or None

Reads the build's kept shards (uid, text, image, and neg_captions when the build ran negatives_text; otherwise
negative captions are made on the fly with negatives.text), makes counterfactual images with the editors
(negatives.editors), validates them with the scorer (negatives.images: the scorer must prefer the negative caption
for the counterfactual, and its similarity to the original must lie in [min_image_sim, max_image_sim]) and writes

    <build>/negatives/part-NNNNN.parquet          kept candidates, NEGATIVES_IMAGE_SCHEMA, sorted by (uid, editor,
                                                  kind); a shard never splits a uid, so a loader reading a shard gets
                                                  each positive with all its negatives in one batch
    <build>/negatives/rejects/part-NNNNN.parquet  every dropped candidate with its reason (positive image null)
    <build>/negatives/stats.json                  per editor: candidates, made, kept, preference before/after
                                                  validation, drops by reason; timings

Candidates = kept + dropped, always. The set is recorded in the build's catalog as a build row
`<build_id>-negatives` (dataset `<dataset>-negatives`) with shards of kind "negatives" / "negatives_rejects" and
lineage `negatives_of` to the build.

The render editor needs each row's demo scene: `scenes:` names a parquet with uid, scene (JSON), render_seed; by
default the demo corpus's labels.parquet beside the build's source URL list is used when it exists (the demo
build's source is <corpus>/urls.parquet, labels at <corpus>/labels.parquet). Rows without a scene get
not_applicable from render.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

import demo as _demo  # noqa: F401  (registers the demo's render editor)
from flows import env  # noqa: F401
from schemas.columns import NEGATIVES_IMAGE_SCHEMA
from negatives.images import NegativesImageSpec, build_editors, make_negatives, summarize
from dataio.build_folder import atomic_write_text
from dataio.shards import file_sha256

CHUNK_ROWS = 256  # positives per generate/score round (bounds memory: decoded images live for one chunk)


def load_negatives_spec(spec) -> NegativesImageSpec:
    if spec is None:
        return NegativesImageSpec()
    if isinstance(spec, NegativesImageSpec):
        return spec
    if isinstance(spec, (str, Path)):
        spec = yaml.safe_load(Path(spec).read_text()) or {}
    return NegativesImageSpec.model_validate(spec)


def _build_info(build_dir: Path) -> dict:
    manifest = json.loads((build_dir / "manifest.json").read_text())
    bspec = yaml.safe_load((build_dir / "spec.yaml").read_text()) if (build_dir / "spec.yaml").exists() else {}
    catalog = bspec.get("catalog") or str(Path(bspec.get("out") or build_dir.parent.parent) / "catalog.duckdb")
    source = (bspec.get("source") or {}).get("urls")
    return {"build_id": manifest["build_id"], "dataset": manifest.get("dataset", "dataset"), "catalog": catalog,
            "source": source}


def read_positives(build_dir: Path, max_rows: int | None = None) -> pa.Table:
    files = sorted((build_dir / "shards").glob("part-*.parquet"))
    ds = pads.dataset([str(f) for f in files], format="parquet")
    cols = [c for c in ("uid", "text", "image", "neg_captions") if c in ds.schema.names]
    t = ds.to_table(columns=cols)
    t = t.take(pc.sort_indices(t, sort_keys=[("uid", "ascending")]))
    return t.slice(0, max_rows) if max_rows else t


def scene_contexts(table: pa.Table, spec: NegativesImageSpec, info: dict) -> list[dict] | None:
    path = spec.scenes
    if path is None and info.get("source"):
        cand = Path(info["source"]).parent / "labels.parquet"
        path = cand if cand.is_file() else None
    if path is None or not Path(path).is_file():
        return None
    labels = pq.read_table(path, columns=["uid", "scene", "render_seed"])
    by_uid = {u: (s, r) for u, s, r in zip(*(labels.column(c).to_pylist() for c in ("uid", "scene", "render_seed")))
              if s is not None}
    return [{"scene": by_uid[u][0], "render_seed": by_uid[u][1]} if u in by_uid else {}
            for u in table.column("uid").to_pylist()]


def write_grouped(table: pa.Table, folder: Path, rows_per_shard: int) -> list[dict]:
    """part-NNNNN.parquet of about rows_per_shard rows, cut only between uids (table sorted by uid)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    uids = table.column("uid").to_pylist()
    cuts, start = [], 0
    for i in range(1, len(uids) + 1):
        if i == len(uids) or (i - start >= rows_per_shard and uids[i] != uids[i - 1]):
            cuts.append((start, i))
            start = i
    if not cuts:
        cuts = [(0, 0)]
    files = []
    for k, (s, e) in enumerate(cuts):
        path = folder / f"part-{k:05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table.slice(s, e - s), tmp, compression="zstd")
        os.replace(tmp, path)
        files.append({"path": str(path), "rows": e - s, "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return files


def run_negatives(build_dir, spec=None, quiet: bool = True) -> dict:
    """The flow's body (callable without Prefect)."""
    from stages.models import load_clip

    build_dir = Path(build_dir).resolve()
    spec = load_negatives_spec(spec)
    info = _build_info(build_dir)
    negatives_id = f"{info['build_id']}-negatives"
    t_start = time.perf_counter()
    positives = read_positives(build_dir, spec.max_rows)
    contexts = scene_contexts(positives, spec, info) if "render" in spec.editors else None
    editors = build_editors(spec)
    t0 = time.perf_counter()
    clip = load_clip(spec.scorer, spec.device, spec.dtype, threads=spec.threads, stage="negatives_image")
    load_s = time.perf_counter() - t0
    parts, gen_s, val_s = [], 0.0, 0.0
    for s in range(0, positives.num_rows, CHUNK_ROWS):
        chunk = positives.slice(s, CHUNK_ROWS)
        ctx = contexts[s:s + CHUNK_ROWS] if contexts else None
        out, tm = make_negatives(chunk, spec, clip, editors, ctx, negatives_id, info["build_id"])
        parts.append(out)
        gen_s += tm["generate_s"]
        val_s += tm["validate_s"]
    allc = pa.concat_tables(parts) if parts else NEGATIVES_IMAGE_SCHEMA.empty_table()
    allc = allc.take(pc.sort_indices(allc, sort_keys=[("uid", "ascending"), ("editor", "ascending"),
                                                      ("kind", "ascending"), ("neg_caption", "ascending")]))
    kept = allc.filter(allc.column("kept"))
    dropped = allc.filter(pc.invert(allc.column("kept")))
    dropped = dropped.set_column(dropped.schema.get_field_index("image"), NEGATIVES_IMAGE_SCHEMA.field("image"),
                                 pa.nulls(dropped.num_rows, pa.binary()))
    out_dir = build_dir / "negatives"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    files = write_grouped(kept, out_dir, spec.rows_per_shard)
    rejects = write_grouped(dropped, out_dir / "rejects", spec.rows_per_shard)
    stats = {
        "negatives_id": negatives_id, "source_build_id": info["build_id"], "positives": positives.num_rows,
        "candidates": allc.num_rows, "kept": kept.num_rows, "dropped": dropped.num_rows,
        "by_editor": summarize(allc),
        "seconds": {"scorer_load": round(load_s, 3), "generate": round(gen_s, 3), "validate": round(val_s, 3),
                    "total": round(time.perf_counter() - t_start, 3)},
        "spec": spec.model_dump(mode="json"),
        "editors": [e.metadata() for e in editors],
    }
    assert stats["candidates"] == stats["kept"] + stats["dropped"]
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2, default=str))
    _record(info, spec, negatives_id, build_dir, files, rejects, stats)
    return {"negatives_id": negatives_id, "dir": str(out_dir), "stats": stats, "files": files, "rejects": rejects}


def _record(info, spec, negatives_id, build_dir, files, rejects, stats) -> None:
    import hashlib

    from catalogs import Catalog
    from flows.engine.context import code_version

    cat = Catalog(spec.catalog or info["catalog"])
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    cat.start_build(negatives_id, f"{info['dataset']}-negatives", info["build_id"],
                    hashlib.sha256(spec_yaml.encode()).hexdigest(), code_version(), spec_yaml,
                    str(build_dir / "negatives"), parent_build_id=info["build_id"])
    cat.record_shards(negatives_id, "negatives", files)
    cat.record_shards(negatives_id, "negatives_rejects", rejects)
    cat.add_lineage(negatives_id, info["build_id"], "negatives_of")
    cat.finish_build(negatives_id, "complete", stats["candidates"], stats["kept"], stats["dropped"])


from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="make-negatives", cache_policy=NO_CACHE)
def negatives_task(build_dir: str, spec, quiet: bool) -> dict:
    return run_negatives(build_dir, spec, quiet)


@flow(name="pairforge-negatives", validate_parameters=False, log_prints=True)
def negatives_flow(build_dir: str, spec=None, quiet: bool = False) -> dict:
    """Hard-negative image set of a finished build (see the module docstring)."""
    return negatives_task(str(build_dir), spec, quiet)
