"""`pairforge show BUILD UID`: one record of a finished build with its stats, and why it was rejected.

Image bytes are summarised (size, format, pixels), embeddings too (dimension, norm, first values). For a rejected
row the stage, the reason, the detail and the stat column(s) that decided it are named, with the spec parameter
they were compared with.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from reporting.report import (ReportError, deciding_param, deciding_stats, fmt_bytes, part_files, reason_meaning,
                              register_build_stages, require_build, stage_params)
from dataio.storage import Location
from schemas.errors import exception_text


def find_row(build_dir: Location, uid: str) -> tuple[str, Location, dict]:
    """(shards|rejects, file, row) of a uid or a unique uid prefix; ReportError when none or several match."""
    uid = uid.strip().lower()
    if not uid:
        raise ReportError("empty uid")
    hits: list[tuple[str, Location, int, str]] = []
    for sub in ("shards", "rejects"):
        for f in part_files(build_dir, sub):
            col = f.read_table(columns=["uid"]).column("uid")
            exact = pc.equal(col, uid)
            mask = exact if pc.any(exact).as_py() else pc.starts_with(col, uid)
            for i in np.flatnonzero(np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), bool)):
                hits.append((sub, f, int(i), col[int(i)].as_py()))
    exact_hits = [h for h in hits if h[3] == uid]
    if exact_hits:
        hits = exact_hits
    if not hits:
        raise ReportError(f"uid {uid!r} is in neither shards/ nor rejects/ of the build", str(build_dir),
                          "copy a uid from the shards, the rejects or report.html (a unique prefix is enough)")
    if len({h[3] for h in hits}) > 1:
        shown = ", ".join(sorted({h[3] for h in hits})[:5])
        raise ReportError(f"uid prefix {uid!r} matches {len({h[3] for h in hits})} rows ({shown}...): give more of it")
    sub, f, i, _ = hits[0]
    pf = f.parquet_file()
    start = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if i < start + n:
            row = pf.read_row_group(g).slice(i - start, 1).to_pylist()[0]
            return sub, f, row
        start += n
    raise ReportError(f"{f}: row {i} not found")  # unreachable: the uid column said it is there


def summarise_image(data: bytes | None) -> dict | None:
    if data is None:
        return None
    out: dict[str, Any] = {"bytes": len(data)}
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            out |= {"format": im.format, "width": im.width, "height": im.height, "mode": im.mode}
    except Exception as e:  # the stats say why; here just that it does not open
        out["error"] = exception_text(e)[:200]
    return out


def summarise_vector(v: list | None) -> dict | None:
    if v is None:
        return None
    a = np.asarray([np.nan if x is None else x for x in v], dtype=np.float64)
    return {"dim": int(a.size), "norm": round(float(np.sqrt(np.nansum(a * a))), 4),
            "head": [round(float(x), 4) for x in a[:4]]}


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def show_record(build_dir: str | Path | Location, uid: str) -> dict:
    """The record of uid in a build (local or in object storage), JSON-able: columns, image and embedding
    summaries, the rejection."""
    build_dir = require_build(build_dir)
    sub, f, row = find_row(build_dir, uid)
    spec_file = build_dir / "spec.yaml"
    spec = yaml.safe_load(spec_file.read_text()) if spec_file.exists() else {}
    register_build_stages(spec or {})
    params = stage_params(spec or {})
    schema = f.read_schema()
    columns, summaries = {}, {}
    for fl in schema:
        v = row.get(fl.name)
        t = fl.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            summaries[fl.name] = summarise_image(v) if fl.name.endswith("image") else (
                None if v is None else {"bytes": len(v)})
        elif (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and pa.types.is_floating(t.value_type):
            summaries[fl.name] = summarise_vector(v)
        elif fl.name not in ("stage", "reason", "detail"):
            columns[fl.name] = v
    rec: dict[str, Any] = {"uid": row["uid"], "status": "kept" if sub == "shards" else "rejected",
                           "file": str(f.relative_to(build_dir)), "columns": columns, "summaries": summaries}
    if sub == "rejects":
        reason, stage = row.get("reason"), row.get("stage")
        stats = deciding_stats(row, reason, stage)
        par = deciding_param(params, reason, stage, (spec or {}).get("ingest"))
        meaning = reason_meaning(reason, stage)
        rec["rejection"] = {"stage": stage, "reason": reason, "detail": row.get("detail"),
                            "stats": {k: v for k, v in stats},
                            "param": {"name": par[0], "value": par[1]} if par else None}
        if meaning:  # what the reason means: the stage's declaration, or dataio.reasons.REASONS
            rec["rejection"]["meaning"] = meaning
    return _jsonable(rec)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and len(v) > 200:
        return repr(v[:197] + "...")
    return repr(v) if isinstance(v, str) else str(v)


def format_record(rec: dict) -> str:
    lines = [f"uid {rec['uid']}: {rec['status'].upper()} ({rec['file']})"]
    rej = rec.get("rejection")
    if rej:
        lines.append(f"  rejected by stage {rej['stage']!r}, reason {rej['reason']!r}")
        if rej.get("meaning"):
            lines.append(f"  meaning: {rej['meaning']}")
        if rej.get("detail"):
            lines.append(f"  detail: {rej['detail']}")
        if rej.get("stats"):
            lines.append("  decided by: " + ", ".join(f"{k}={_fmt(v)}" for k, v in rej["stats"].items()))
        if rej.get("param"):
            lines.append(f"  spec: {rej['param']['name']}={rej['param']['value']}")
    lines.append("columns:")
    width = max((len(k) for k in list(rec["columns"]) + list(rec["summaries"])), default=8)
    for k, v in rec["columns"].items():
        lines.append(f"  {k:<{width}}  {_fmt(v)}")
    for k, s in rec["summaries"].items():
        if s is None:
            lines.append(f"  {k:<{width}}  null")
        elif "dim" in s:
            lines.append(f"  {k:<{width}}  [{s['dim']} floats, norm {s['norm']}, head {s['head']}]")
        else:
            desc = fmt_bytes(s["bytes"])
            if s.get("format"):
                desc += f" {s['format']} {s['width']}x{s['height']} {s['mode']}"
            if s.get("error"):
                desc += f" (does not open: {s['error']})"
            lines.append(f"  {k:<{width}}  <{desc}>")
    return "\n".join(lines)
