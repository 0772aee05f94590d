"""The build report (report.html) and the dataset card (README.md), from a finished build's files. No model runs.

    write_report(build_dir)        -> <build>/report.html: one self-contained page (plots and thumbnails are
                                      base64 data: URIs; a Content-Security-Policy blocks anything else)
    write_dataset_card(build_dir)  -> <build>/README.md: a Hugging Face dataset card (YAML header + body)

The report reads stats.json, manifest.json, spec.yaml, the metadata columns of shards/ and rejects/ (every column
but image bytes, embeddings and other numeric lists), and the image bytes of the sampled rows only (one Parquet
row group per sampled row), so its size and its cost do not grow with the build.

Sections (each one a <section id=...>):
    summary        counts, shards, spec hash, code version, stage metadata (models)
    funnel         rows into and out of each stage of stats.json
    rejects        rejects by reason: table and bar plot
    distributions  a histogram per stat column present (kept / rejected by the column's stage / rejected by
                   another stage), the spec's thresholds as vertical lines; bar charts for lang and junk_kind
    kept           a seeded sample of kept pairs
    rejected       a seeded sample per reject reason, with the stat and detail that decided it
    rewrites       rows with a `recaptions` column: original caption vs rewrites with their scores.
                   `recaptions` may be a string, a list of strings, a struct or a list of structs (text in a field
                   named text/caption/rewrite, numeric fields shown as scores); numeric columns named recaption*
                   are shown as scores too.
    negatives      a hard-negative set: <build>/negatives/*.parquet, or neg_* columns in the shards. Columns read
                   where present: uid (the positive pair), text, neg_text | negative_text | negative_caption,
                   neg_image | negative_image (bytes) or neg_uid (a row of the build), kind | neg_kind, and every
                   numeric or boolean column as a validation score. Sampled per kind.
    spec           the resolved spec
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from dataio.storage import Location, location

REPORT_NAME = "report.html"
CARD_NAME = "README.md"

N_KEPT = 24  # kept pairs shown
N_PER_REASON = 8  # rejected pairs shown per reason
N_REWRITES = 12
N_NEG_PER_KIND = 6
THUMB_PX = 112
THUMB_QUALITY = 70
CAPTION_CHARS = 160

# Core numeric columns plotted after the stages' stats; every stage-specific map below derives from the stages'
# declarations (stages.base: columns with their roles, reasons with their stats and thresholds).
CORE_STATS = ["width", "height", "original_width", "original_height"]
# Ingest reasons decided by a spec value (ingest.*): stages declare their own reasons.
INGEST_PARAMS = {"timeout": "timeout_s", "too_large": "max_bytes", "decompression_bomb": "max_pixels",
                 "too_many_redirects": "max_redirects"}
DECISION = ["stage", "reason", "detail"]
REPORT_MAX_ROWS = 200_000  # larger builds: distributions and samples over a uid-hash sample of about this many rows


class ReportError(RuntimeError):
    pass


# --------------------------------------------------------------------------- reading a build

def _part_files(build_dir: Location, sub: str) -> list[Location]:
    return (build_dir / sub).glob("part-*.parquet")


def is_heavy(f: pa.Field) -> bool:
    """Image bytes, embeddings and numeric lists: never read for metadata."""
    t = f.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        v = t.value_type
        return pa.types.is_floating(v) or pa.types.is_integer(v) or pa.types.is_binary(v)
    return False


def stage_params(spec: dict) -> dict[str, dict]:
    """{stage name: params} from a resolved spec dict (raw YAML, so stages this version doesn't know still read)."""
    out = {}
    for item in spec.get("stages") or []:
        if isinstance(item, dict) and len(item) == 1:
            (name, params), = item.items()
            out[name] = params or {}
        elif isinstance(item, str):
            out[item] = {}
    return out


@dataclass
class Build:
    dir: Location
    stats: dict
    manifest: dict
    spec: dict
    files: list[Location]  # shards then rejects; meta's _file indexes this list
    meta: pa.Table  # every row, light columns, plus stage/reason/detail (null for kept), _kept, _file, _row
    schema: pa.Schema | None  # the kept shards' schema
    total_rows: int = 0  # rows in the build's files; more than meta's when meta is a sample
    _pf: dict = field(default_factory=dict)

    @property
    def sampled(self) -> bool:
        return self.meta.num_rows < self.total_rows

    @property
    def params(self) -> dict[str, dict]:
        return stage_params(self.spec)

    def param(self, stage: str, name: str):
        return self.params.get(stage, {}).get(name)

    def parquet(self, i: int) -> pq.ParquetFile:
        if i not in self._pf:
            self._pf[i] = self.files[i].parquet_file()
        return self._pf[i]

    def take(self, rows: Iterable[int], column: str = "image") -> dict[int, Any]:
        """Values of `column` for meta rows, reading only the row groups that hold them."""
        return take_column(self, [(int(self.meta["_file"][r].as_py()), int(self.meta["_row"][r].as_py()), r)
                                  for r in rows], column)


def take_column(build: Build, where: list[tuple[int, int, Any]], column: str) -> dict[Any, Any]:
    """where: (file index, row in file, key) -> {key: value}; one read per (file, row group)."""
    out: dict[Any, Any] = {}
    by_file: dict[int, list[tuple[int, Any]]] = {}
    for f, r, key in where:
        by_file.setdefault(f, []).append((r, key))
    for f, wanted in by_file.items():
        pf = build.parquet(f)
        if column not in pf.schema_arrow.names:
            continue
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        by_group: dict[int, list[tuple[int, Any]]] = {}
        for r, key in wanted:
            g = int(np.searchsorted(starts, r, side="right") - 1)
            by_group.setdefault(g, []).append((r - int(starts[g]), key))
        for g, items in sorted(by_group.items()):
            col = pf.read_row_group(g, columns=[column]).column(0)
            for local, key in items:
                out[key] = col[local].as_py()
    return out


def _read_meta(files: list[Location], first_index: int, kept: bool, fraction: float = 1.0) -> list[pa.Table]:
    """Light columns of every row, or of a uid-hash sample of about `fraction` of them (one file at a time)."""
    tables = []
    for i, f in enumerate(files):
        schema = f.read_schema()
        cols = [fl.name for fl in schema if not is_heavy(fl)]
        t = f.read_table(columns=cols)
        n = t.num_rows
        t = t.append_column("_row", pa.array(np.arange(n, dtype=np.int64)))
        if fraction < 1.0:
            t = t.filter(pa.array(in_sample(t.column("uid"), fraction)))
            n = t.num_rows
        for c in DECISION:
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(n, pa.string()))
        t = t.append_column("_kept", pa.array(np.full(n, kept), pa.bool_()))
        t = t.append_column("_file", pa.array(np.full(n, first_index + i, np.int32)))
        # nullability differs between shards and rejects; drop it so tables concatenate
        t = t.cast(pa.schema([fl.with_nullable(True) for fl in t.schema]))
        tables.append(t)
    return tables


def in_sample(uid: pa.ChunkedArray | pa.Array, fraction: float) -> np.ndarray:
    """True for about `fraction` of uids, the same uids in every run (a hash of the uid, not of its position)."""
    import polars as pl

    h = pl.Series(uid.combine_chunks() if isinstance(uid, pa.ChunkedArray) else uid).hash(seed=7).to_numpy()
    return (h >> np.uint64(11)) < np.uint64(int(fraction * 2**53))


def load_build(build_dir: str | Path | Location, rows: bool = True, max_rows: int = REPORT_MAX_ROWS) -> Build:
    """The build's json/yaml files and, with rows, the metadata of its kept and rejected rows: every row, or a
    uid-hash sample of about max_rows of them when the build is larger (counts then come from stats.json)."""
    build_dir = location(build_dir)
    if not (build_dir / "shards").is_dir() and not (build_dir / "rejects").is_dir():
        raise ReportError(f"{build_dir}: not a build folder (no shards/ or rejects/)")

    def read_json(name):
        p = build_dir / name
        return json.loads(p.read_text()) if p.exists() else {}

    spec = yaml.safe_load((build_dir / "spec.yaml").read_text()) if (build_dir / "spec.yaml").exists() else {}
    shards, rejects = _part_files(build_dir, "shards"), _part_files(build_dir, "rejects")
    total = sum(f.read_metadata().num_rows for f in shards + rejects) if rows else 0
    fraction = min(1.0, max_rows / total) if total else 1.0
    tables = (_read_meta(shards, 0, True, fraction) + _read_meta(rejects, len(shards), False, fraction)) if rows else []
    meta = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table(
        {"uid": pa.array([], pa.string()), **{c: pa.array([], pa.string()) for c in DECISION},
         "_kept": pa.array([], pa.bool_()), "_file": pa.array([], pa.int32()), "_row": pa.array([], pa.int64())})
    meta = meta.combine_chunks()
    return Build(build_dir, read_json("stats.json"), read_json("manifest.json"), spec or {}, shards + rejects, meta,
                 shards[0].read_schema() if shards else None, total_rows=total)


# --------------------------------------------------------------------------- small helpers

def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", s).strip("-") or "x"


def fmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v}"
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def fmt_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def seeded_sample(meta: pa.Table, mask: np.ndarray, n: int, key: str) -> list[int]:
    """Up to n row indices where mask is true, the same for the same rows whatever their file order."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return []
    uids = np.asarray(meta["uid"].take(pa.array(idx)).to_pylist(), dtype=object)
    order = np.argsort(uids.astype(str), kind="stable")
    idx = idx[order]
    if idx.size > n:
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        idx = idx[np.sort(rng.choice(idx.size, n, replace=False))]
    return idx.tolist()


def thumbnail_uri(data: bytes | None, px: int = THUMB_PX) -> str | None:
    """A small JPEG data: URI of image bytes; None when they don't decode."""
    if not data:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px, px))
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    except Exception:  # undecodable, truncated, a bomb: the card says so instead
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _stages() -> dict:
    from stages import registry

    return registry()


def column_owner() -> dict[str, str]:
    """Stat column -> the stage that declares it."""
    return {c.name: name for name, cls in _stages().items() for c in cls.columns}


def column_role(column: str) -> str | None:
    for cls in _stages().values():
        for c in cls.columns:
            if c.name == column:
                return c.role
    return None


def thresholds_map() -> dict[str, list[tuple[str, str, str]]]:
    """Stat column -> the spec parameters drawn on its histogram: (stage, param, "min" | "max")."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for name, cls in _stages().items():
        for r in cls.reasons:
            for t in r.thresholds:
                entry = (name, t.param, t.bound)
                if entry not in out.setdefault(t.column, []):
                    out[t.column].append(entry)
    return out


def reason_declaration(reason: str | None, stage: str | None = None):
    """(stage, Reason) that declares a reject reason; None for input and ingest reasons or unknown stages."""
    stages = _stages()
    owners = [stage] if stage in stages else list(stages)
    for name in owners:
        for r in stages[name].reasons:
            if r.name == reason:
                return name, r
    return None


def thresholds_for(build: Build, column: str) -> list[tuple[str, float]]:
    """(label, value) of the spec parameters compared with column, for stages in this build's spec."""
    out = []
    params = build.params
    for stage, name, kind in thresholds_map().get(column, []):
        if stage not in params:
            continue
        v = params[stage].get(name)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if kind == "min" and v <= 0:
            continue  # a minimum of 0 rejects nothing
        out.append((f"{stage}.{name}={v:g}", float(v)))
    if column == "clip_score" and params.get("align", {}).get("top_fraction") is not None:
        cut = _top_fraction_cutoff(build)
        if cut is not None:
            out.append((f"align.top_fraction={params['align']['top_fraction']:g} (cutoff {cut:.3f})", cut))
    return out


def _top_fraction_cutoff(build: Build) -> float | None:
    """The cutoff score the build's top fraction found (stats.json: the step's summary)."""
    for row in build.stats.get("stages", []):
        if row.get("stage") == "align":
            cut = row.get("global_steps", {}).get("top_fraction", {}).get("cutoff")
            return float(cut) if cut is not None else None
    return None


def deciding_stats(row: dict, reason: str | None, stage: str | None) -> list[tuple[str, Any]]:
    """The stat columns that decided a rejection, with their values, as present in row."""
    if not reason:
        return []
    found = reason_declaration(reason, stage)
    if found is not None:
        cols = list(found[1].stats)
    elif stage in _stages():
        cols = [c.name for c in _stages()[stage].columns if c.role != "data"][:2]
    else:
        cols = []
    return [(c, row.get(c)) for c in cols if c in row]


def deciding_param(spec_params: dict, reason: str | None, stage: str | None = None,
                   ingest: dict | None = None) -> tuple[str, Any] | None:
    """(spec.param, value) a rejection was decided by: a stage's declared parameter, or for ingest reasons the
    spec's ingest value (`ingest`: the spec's ingest section)."""
    if stage == "ingest" or (stage is None and reason in INGEST_PARAMS):
        name = INGEST_PARAMS.get(reason)
        return (f"ingest.{name}", (ingest or {})[name]) if name and (ingest or {}).get(name) is not None else None
    found = reason_declaration(reason, stage)
    if found is None or found[1].deciding_param is None:
        return None
    stage, name = found[0], found[1].deciding_param
    if stage not in spec_params or spec_params[stage].get(name) is None:
        return None
    return f"{stage}.{name}", spec_params[stage][name]


def reason_meaning(reason: str | None, stage: str | None = None) -> str | None:
    """What a reject reason means: a stage's declared doc (stages.base.Reason), or for input and ingest reasons
    dataio.reasons.REASONS (http_NNN by its status)."""
    from dataio.reasons import reason_text

    if stage in ("input", "ingest"):
        return reason_text(reason)
    found = reason_declaration(reason, stage)
    return found[1].doc if found is not None else None


# --------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7, "figure.dpi": 90,
                         "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "pairforge"})
    return plt


def _png(fig, tight: bool = False) -> str:
    """PNG data: URI. Without tight, fixed margins: one draw instead of two."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight" if tight else None, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


COLORS = {"kept": "#2b7bba", "here": "#d6452f", "other": "#b8b8b8"}


def histogram_png(column: str, values: np.ndarray, groups: np.ndarray, owner: str | None,
                  lines: list[tuple[str, float]]) -> str:
    """Stacked histogram of values by group (0 kept, 1 rejected by owner, 2 rejected elsewhere), threshold lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 2.4))
    finite = np.isfinite(values)
    v, g = values[finite], groups[finite]
    lo, hi = float(v.min()), float(v.max())
    span = (hi - lo) or 1.0
    shown = []
    for label, x in lines:  # a threshold far outside the data would squash it: name it instead of drawing it
        if lo - 0.5 * span <= x <= hi + 0.5 * span:
            lo, hi = min(lo, x), max(hi, x)
            shown.append((label, x))
        else:
            shown.append((label + (" (off the axis, right)" if x > hi else " (off the axis, left)"), None))
    integer = np.all(np.mod(v, 1) == 0) and hi - lo <= 60
    if integer:
        bins = np.arange(math.floor(lo), math.floor(hi) + 2) - 0.5
    else:
        pad = (hi - lo) * 0.02 or 0.5
        bins = np.linspace(lo - pad, hi + pad, 41)
    labels = ["kept", f"rejected by {owner}" if owner else "rejected", "rejected by another stage"]
    base = np.zeros(len(bins) - 1)
    for k in range(3):  # stacked, one filled step polygon per group (cheap to draw, unlike a bar per bin)
        sel = v[g == k]
        if not sel.size:
            continue
        counts, _ = np.histogram(sel, bins=bins)
        ax.stairs(base + counts, bins, baseline=base.copy(), fill=True, color=COLORS[("kept", "here", "other")[k]],
                  label=labels[k])
        base = base + counts
    ax.set_ylim(0, max(1.0, base.max()) * 1.05)
    for i, (label, x) in enumerate(shown):
        if x is None:
            ax.plot([], [], " ", label=label)
        else:
            ax.axvline(x, color="black", linestyle=("--", ":", "-.")[i % 3], linewidth=1.1, label=label)
    ax.set_title(column)
    ax.set_ylabel("rows")
    ax.legend(loc="best", frameon=False)
    fig.subplots_adjust(left=0.13, right=0.98, bottom=0.11, top=0.9)
    return _png(fig)


def category_png(column: str, values: list, groups: np.ndarray, top: int = 12) -> str:
    plt = _plt()
    counts: dict[str, list[int]] = {}
    for v, g in zip(values, groups.tolist()):
        k = "null" if v is None else str(v)
        counts.setdefault(k, [0, 0, 0])[g] += 1
    items = sorted(counts.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    if len(items) > top:
        rest = [sum(c[i] for _, c in items[top - 1:]) for i in range(3)]
        items = items[:top - 1] + [(f"other ({len(items) - top + 1})", rest)]
    names = [k for k, _ in items][::-1]
    fig, ax = plt.subplots(figsize=(4.4, 0.35 + 0.2 * len(names)))
    left = np.zeros(len(names))
    for k, (key, label) in enumerate((("kept", "kept"), ("here", "rejected by its stage"),
                                      ("other", "rejected by another stage"))):
        w = np.array([c[k] for _, c in items][::-1], float)
        if w.sum():
            ax.barh(names, w, left=left, color=COLORS[key], label=label)
        left += w
    ax.set_title(column)
    ax.set_xlabel("rows")
    ax.legend(loc="lower right", frameon=False)
    return _png(fig, tight=True)


def reasons_png(rows: list[tuple[str, str, int]]) -> str:
    """Horizontal bars: rejects by reason, coloured by stage."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 0.5 + 0.22 * len(rows)))
    cmap = plt.get_cmap("tab10")
    stages = list(dict.fromkeys(s for s, _, _ in rows))
    names = [f"{r}" for _, r, _ in rows][::-1]
    counts = [c for _, _, c in rows][::-1]
    colors = [cmap(stages.index(s) % 10) for s, _, _ in rows][::-1]
    ax.barh(range(len(rows)), counts, color=colors)
    ax.set_yticks(range(len(rows)), names)
    for i, c in enumerate(counts):
        ax.text(c, i, f" {c}", va="center", fontsize=7)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=cmap(i % 10), label=s) for i, s in enumerate(stages)], loc="upper left",
              bbox_to_anchor=(1.02, 1.0), frameon=False, title="stage")
    ax.set_xlabel("rows rejected")
    ax.margins(x=0.12)
    return _png(fig, tight=True)


# --------------------------------------------------------------------------- sections

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f3b57;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .sub{opacity:.8;font-size:12px}nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;
padding:6px 24px;z-index:2}nav a{margin-right:14px;color:#1f3b57;text-decoration:none;font-size:13px}
main{padding:0 24px 40px}section{margin-top:22px}h2{font-size:17px;border-bottom:2px solid #1f3b57;
padding-bottom:3px}h3{font-size:14px;margin:16px 0 6px}
table{border-collapse:collapse;background:#fff;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#eef2f6}td.l,th.l{text-align:left}
.bar{background:#2b7bba;height:10px;display:inline-block}.barbox{width:220px;text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plots figure{margin:0;background:#fff;border:1px solid #ddd;
padding:4px}.plots img{display:block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px}
.card{margin:0;background:#fff;border:1px solid #ddd;padding:6px;font-size:11px;overflow:hidden}
.card img,.card .noimg{width:112px;height:112px;object-fit:contain;display:block;margin:0 auto 4px;
background:#f0f0f0}.card .noimg{display:flex;align-items:center;justify-content:center;color:#888;
text-align:center;font-size:10px}.cap{font-size:12px;word-break:break-word}.stat{color:#a12;
word-break:break-word}.uid{color:#888;font-family:monospace;word-break:break-all}.pair{display:flex;gap:4px}
.pair img,.pair .noimg{width:80px;height:80px}mark{background:#ffe08a}.neg{color:#a12}.pos{color:#175}
.rw{display:grid;grid-template-columns:120px 1fr;gap:8px;background:#fff;border:1px solid #ddd;padding:6px;
margin-bottom:6px;font-size:12px}.empty{color:#666;font-style:italic}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;font-size:12px}
.kv td{text-align:left}
"""


def _img_tag(uri: str | None, alt: str, missing: str = "no image") -> str:
    if uri:
        return f'<img src="{uri}" alt="{esc(alt)}" loading="eager">'
    return f'<div class="noimg">{esc(missing)}</div>'


def _summary(build: Build) -> str:
    st, mf = build.stats, build.manifest
    listed = st.get("rows_listed", build.meta.num_rows)
    kept = st.get("rows_kept", int(pc.sum(build.meta["_kept"]).as_py() or 0))
    rejected = st.get("rows_rejected", build.meta.num_rows - kept)
    rows = [
        ("dataset", st.get("dataset") or mf.get("dataset") or build.spec.get("dataset")),
        ("build", st.get("build_id") or mf.get("build_id") or build.dir.name),
        ("source", mf.get("source") or (build.spec.get("source") or {}).get("name")),
        ("rows listed", f"{listed:,}"),
        ("rows kept", f"{kept:,} ({kept / listed:.1%})" if listed else f"{kept:,}"),
        ("rows rejected", f"{rejected:,}"),
        ("shards", f"{len(mf.get('shards', []))} file{'' if len(mf.get('shards', [])) == 1 else 's'}, "
                   f"{fmt_bytes(mf.get('bytes', 0))}"),
        ("spec hash", (mf.get("spec_hash") or "")[:16]),
        ("code version", mf.get("code_version")),
    ]
    body = "".join(f'<tr><th class="l">{esc(k)}</th><td class="l" data-key="{esc(k)}">{esc(v)}</td></tr>'
                   for k, v in rows)
    out = [f'<section id="summary" data-section="summary"><h2>Summary</h2><table class="kv">{body}</table>']
    smeta = mf.get("stage_metadata") or {}
    if smeta:
        out.append('<h3>Stages</h3><table><tr><th class="l">stage</th><th class="l">parameters</th>'
                   '<th class="l">metadata</th></tr>')
        params = build.params
        for name in params:
            p = {k: v for k, v in params[name].items() if k not in ("cpus", "gpus", "batch_size", "pool_size")}
            out.append(f'<tr><td class="l">{esc(name)}</td><td class="l">{esc(_kv(p))}</td>'
                       f'<td class="l">{esc(_kv(smeta.get(name, {})))}</td></tr>')
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def _kv(d: dict) -> str:
    """k=v for scalar values (and short lists), skipping nulls."""
    def shown(v):
        return v is not None and (not isinstance(v, (dict, list)) or isinstance(v, list) and len(v) <= 8)
    return ", ".join(f"{k}={v}" for k, v in d.items() if shown(v))


def _funnel(build: Build) -> str:
    stages = build.stats.get("stages", [])
    if not stages:
        return ('<section id="funnel" data-section="funnel"><h2>Funnel</h2>'
                '<p class="empty">No stats.json in this build: the funnel is unknown.</p></section>')
    listed = stages[0]["rows_in"] or 1
    out = ['<section id="funnel" data-section="funnel"><h2>Funnel</h2><table><tr><th class="l">stage</th>'
           '<th>rows in</th><th>rows out</th><th>rejected</th><th>% of listed left</th><th class="l">'
           '</th><th>seconds</th></tr>']
    for s in stages:
        rej = sum(s.get("rejected", {}).values())
        frac = s["rows_out"] / listed
        out.append(f'<tr data-stage="{esc(s["stage"])}" data-rows-in="{s["rows_in"]}" '
                   f'data-rows-out="{s["rows_out"]}" data-rejected="{rej}"><td class="l">{esc(s["stage"])}</td>'
                   f'<td>{s["rows_in"]:,}</td><td>{s["rows_out"]:,}</td><td>{rej:,}</td><td>{frac:.1%}</td>'
                   f'<td class="barbox"><span class="bar" style="width:{200 * frac:.0f}px"></span></td>'
                   f'<td>{s.get("seconds", 0):.2f}</td></tr>')
    out.append("</table></section>")
    return "".join(out)


def _reason_rows(build: Build) -> list[tuple[str, str, int]]:
    rows = []
    for s in build.stats.get("stages", []):
        for r, c in sorted(s.get("rejected", {}).items(), key=lambda kv: (-kv[1], kv[0])):
            if c:
                rows.append((s["stage"], r, c))
    if not rows and build.meta.num_rows:  # no stats.json: count the rejects themselves
        rej = build.meta.filter(pc.invert(build.meta["_kept"]))
        if rej.num_rows:
            g = rej.group_by(["stage", "reason"]).aggregate([("uid", "count")])
            rows = sorted(((a, b, c) for a, b, c in zip(g["stage"].to_pylist(), g["reason"].to_pylist(),
                                                          g["uid_count"].to_pylist())), key=lambda x: -x[2])
    return rows


def _rejects(build: Build, rows: list[tuple[str, str, int]]) -> str:
    out = ['<section id="rejects" data-section="rejects"><h2>Rejects by reason</h2>']
    if not rows:
        out.append('<p class="empty">No row was rejected.</p></section>')
        return "".join(out)
    listed = build.stats.get("rows_listed") or build.meta.num_rows or 1
    out.append('<table><tr><th class="l">stage</th><th class="l">reason</th><th>rows</th><th>% of listed</th>'
               '<th class="l">meaning</th></tr>')
    for stage, reason, c in rows:
        meaning = reason_meaning(reason, stage)
        out.append(f'<tr data-stage="{esc(stage)}" data-reason="{esc(reason)}" data-count="{c}">'
                   f'<td class="l">{esc(stage)}</td><td class="l"><a href="#rej-{slug(stage)}-{slug(reason)}">'
                   f'{esc(reason)}</a></td><td>{c:,}</td><td>{c / listed:.2%}</td>'
                   f'<td class="l" data-role="meaning">{esc(meaning or "")}</td></tr>')
    out.append('</table><div class="plots"><figure><img alt="rejects by reason" src="'
               f'{reasons_png(rows)}"></figure></div></section>')
    return "".join(out)


def _groups(build: Build, owner: str | None) -> np.ndarray:
    """0 kept, 1 rejected by owner, 2 rejected by another stage."""
    kept = build.meta["_kept"].to_numpy(zero_copy_only=False)
    stage = np.asarray(build.meta["stage"].to_pylist(), dtype=object)
    g = np.where(kept, 0, 2)
    if owner:
        g[(~kept) & (stage == owner)] = 1
    return g


def _stat_order(build: Build) -> list[str]:
    """Stage stats in the build's stage order, then the core ones."""
    stages = _stages()
    cols = [c.name for s in build.params if s in stages for c in stages[s].columns if c.role == "stat"]
    return cols + CORE_STATS


def _numeric_columns(build: Build) -> list[str]:
    meta = build.meta
    names = [n for n in meta.column_names
             if not n.startswith("_") and column_role(n) in (None, "stat") and n not in DECISION]
    numeric = [n for n in names if pa.types.is_integer(meta.schema.field(n).type)
               or pa.types.is_floating(meta.schema.field(n).type)]
    order = _stat_order(build)
    return [c for c in order if c in numeric] + [c for c in numeric if c not in order]


def _distributions(build: Build) -> str:
    meta = build.meta
    out = ['<section id="distributions" data-section="distributions"><h2>Distributions</h2>'
           '<p>Every row with the stat (kept and rejected), stacked: kept, rejected by the stage that computes the '
           'stat, rejected by another stage. Dashed lines: the spec\'s thresholds.'
           + (f' Over a sample of {meta.num_rows:,} of the build\'s {build.total_rows:,} rows (a hash of the uid '
              'picks them).' if build.sampled else '') + '</p><div class="plots">']
    owners = column_owner()
    cols = _numeric_columns(build)
    order = _stat_order(build)
    derived = {}
    if meta.num_rows and "text" in meta.column_names:
        text = pc.fill_null(meta["text"], "")
        if "caption_chars" not in cols:
            derived["caption_chars"] = pc.utf8_length(text)
        if "caption_words" not in cols:
            derived["caption_words"] = pc.list_value_length(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(text)))
    plotted = 0
    for c in list(dict.fromkeys([k for k in order if k in derived] + cols)):
        arr = derived.get(c, meta[c] if c in meta.column_names else None)
        if arr is None:
            continue
        values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        values = np.where(np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), bool), values, np.nan)
        if not np.isfinite(values).any():
            continue
        owner = owners.get(c)
        title = c + (" (from text)" if c in derived else "")
        lines = thresholds_for(build, c)
        uri = histogram_png(title, values, _groups(build, owner), owner, lines)
        out.append(f'<figure data-column="{esc(c)}" data-thresholds="{esc(json.dumps([x for _, x in lines]))}">'
                   f'<img alt="{esc(title)}" src="{uri}"></figure>')
        plotted += 1
    stages = _stages()
    categorical = [c.name for s in build.params if s in stages for c in stages[s].columns if c.role == "category"]
    for c in categorical:
        if c in meta.column_names and meta[c].null_count < meta.num_rows:
            uri = category_png(c, meta[c].to_pylist(), _groups(build, owners.get(c)))
            out.append(f'<figure data-column="{esc(c)}"><img alt="{esc(c)}" src="{uri}"></figure>')
            plotted += 1
    if not plotted:
        out.append('<p class="empty">No stat columns with values in this build.</p>')
    out.append("</div></section>")
    return "".join(out)


def _capped_distributions(build: Build, head_shown: int = 5, per_head: int = 3) -> str:
    """Global steps that cap keys (the balance stage's concepts), declared by their summary in stats.json (a dict
    with `key_column`, `rank_counts`, `head`, `t`, `reason`): the key distribution before the stage (the summary)
    and in the kept shards (their key column, counted one file at a time: bounded by the keys) by rank, log-log;
    the head keys capped; captions of rows dropped per head key (rejects of that reason holding the key)."""
    found = [(row["stage"], s) for row in build.stats.get("stages", []) for rec in (row.get("global_steps") or {}
             ).values() if {"key_column", "rank_counts", "head"} <= set(s := (rec or {}).get("summary") or {})]
    if not found:
        return ""
    out = ['<section id="balance" data-section="balance"><h2>Concept balance</h2>']
    for stage, s in found:
        col, reason = s["key_column"], s.get("reason")
        keys, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        for f in _part_files(build.dir, "shards"):
            if col in f.read_schema().names:
                vc = pc.value_counts(pc.list_flatten(f.read_table(columns=[col]).column(col)))
                keys = np.concatenate([keys, vc.field("values").to_numpy(zero_copy_only=False).astype(np.int64)])
                counts = np.concatenate([counts, vc.field("counts").to_numpy()])
                keys, inv = np.unique(keys, return_inverse=True)
                counts = np.bincount(inv, weights=counts).astype(np.int64)
        before = np.array(s["rank_counts"] or [[1, 0]], np.float64)
        after = np.sort(counts)[::-1]
        plt = _plt()
        fig, ax = plt.subplots(figsize=(4.8, 2.8))
        ax.loglog(before[:, 0], np.maximum(before[:, 1], 0.8), color=COLORS["other"], label="before (pool)")
        if after.size:
            ranks = np.unique(np.round(np.logspace(0, math.log10(after.size), 60)).astype(np.int64))
            ax.loglog(ranks, after[ranks - 1], color=COLORS["kept"], label="after (kept)")
        ax.axhline(s["t"], color="black", linestyle="--", linewidth=1, label=f"t = {s['t']:,.0f}")
        ax.set_xlabel("concept rank")
        ax.set_ylabel("rows matching")
        ax.legend(frameon=False)
        out.append(f'<h3>{esc(stage)}: {s.get("concepts_matched", 0):,} concepts matched by '
                   f'{s.get("pool", 0):,} rows; {s.get("capped_concepts", 0):,} capped at t</h3><div class="plots">'
                   f'<figure><img src="{_png(fig, tight=True)}" alt="concept counts by rank"></figure></div>')
        dropped: dict[int, list[str]] = {h["id"]: [] for h in s["head"][:head_shown]}
        for f in _part_files(build.dir, "rejects"):
            if not any(len(v) < per_head for v in dropped.values()) or col not in f.read_schema().names:
                continue
            t = f.read_table(columns=["stage", "reason", "text", col])
            t = t.filter(pc.and_(pc.equal(t["stage"], stage), pc.equal(t["reason"], reason)))
            flat = pc.list_flatten(t[col]).to_numpy(zero_copy_only=False)
            parent = pc.list_parent_indices(t[col]).to_numpy()
            order = np.array(list(dropped))  # head keys, largest count first: a row goes to its first one (the
            sorter = np.argsort(order)  # one its detail names) and is shown once
            at = sorter[np.minimum(np.searchsorted(order, flat, sorter=sorter), order.size - 1)]
            rank = np.where(order[at] == flat, at, order.size)
            first = np.full(t.num_rows, order.size)
            np.minimum.at(first, parent, rank)
            for k, (h, got) in enumerate(dropped.items()):
                for r in np.flatnonzero(first == k)[:per_head - len(got)]:
                    got.append(t["text"][int(r)].as_py() or "")
        rows = []
        for h in s["head"]:
            kept = int(counts[np.searchsorted(keys, h["id"])]) if h["id"] in keys else 0
            caps = "".join(f"<div>{esc(c[:CAPTION_CHARS])}</div>" for c in dropped.get(h["id"], []))
            rows.append(f'<tr data-concept="{esc(h["concept"])}"><td class="l">{esc(h["concept"])}</td>'
                        f'<td class="l">{esc(h.get("lang", ""))}</td><td>{h["count"]:,}</td><td>{h["p"]:.3f}</td>'
                        f'<td>{kept:,}</td><td class="l">{caps}</td></tr>')
        out.append('<table><tr><th class="l">head concept</th><th class="l">lang</th><th>rows before</th>'
                   '<th>keep p</th><th>rows kept</th><th class="l">dropped (sample)</th></tr>' + "".join(rows)
                   + "</table>")
    out.append("</section>")
    return "".join(out)


def _card(build: Build, r: int, thumb: str | None, row: dict, extra: str = "") -> str:
    cap = row.get("text") or ""
    cap = cap if len(cap) <= CAPTION_CHARS else cap[:CAPTION_CHARS - 1] + "…"
    stage, reason = row.get("stage"), row.get("reason")
    missing = "no image" if row.get("_kept") else f"no image ({stage})" if stage in ("input", "ingest") \
        else "undecodable"
    lines = []
    if reason:
        detail = str(row.get("detail") or "")
        stats = [(k, v) for k, v in deciding_stats(row, reason, stage)  # what the reason or detail says already
                 if v is not None and str(v) != reason and (not isinstance(v, str) or v not in detail)]
        par = deciding_param(build.params, reason, stage, build.spec.get("ingest"))
        s = ", ".join(f"{k}={fmt_value(v)}" for k, v in stats)
        if par:
            s += f"{'; ' if s else ''}{par[0]}={par[1]}"
        if s:
            lines.append(f'<div class="stat" data-role="stat">{esc(s)}</div>')
        if row.get("detail"):
            lines.append(f'<div class="stat" data-role="detail">{esc(row["detail"])}</div>')
        if stage in ("input", "ingest") and row.get("url"):
            lines.append(f'<div class="uid">{esc(fmt_value(row["url"]))}</div>')
    return (f'<figure class="card" data-uid="{esc(row.get("uid"))}">{_img_tag(thumb, cap, missing)}'
            f'<div class="cap">{esc(cap)}</div>{"".join(lines)}{extra}'
            f'<div class="uid">{esc((row.get("uid") or "")[:12])}</div></figure>')


def _rows(build: Build, idx: list[int]) -> list[dict]:
    if not idx:
        return []
    return build.meta.take(pa.array(idx)).to_pylist()


def _samples(build: Build, reasons: list[tuple[str, str, int]], seed: int) -> str:
    meta = build.meta
    kept = meta["_kept"].to_numpy(zero_copy_only=False)
    picks = {"kept": seeded_sample(meta, kept, N_KEPT, f"{seed}/kept")}
    stage_arr = np.asarray(meta["stage"].to_pylist(), dtype=object)
    reason_arr = np.asarray(meta["reason"].to_pylist(), dtype=object)
    for stage, reason, _ in reasons:
        picks[(stage, reason)] = seeded_sample(meta, (stage_arr == stage) & (reason_arr == reason), N_PER_REASON,
                                               f"{seed}/{stage}/{reason}")
    # duplicates: also show the row each one duplicates, when it is in this build
    uid_index = None
    survivors: dict[int, int] = {}
    for key, idx in picks.items():
        if key != "kept" and key[1].startswith("duplicate"):
            if uid_index is None:
                uid_index = {u: i for i, u in enumerate(meta["uid"].to_pylist())}
            for i in idx:
                hit = re.match(r"dup of ([0-9a-f]+)", str(meta["detail"][i].as_py() or ""))
                if hit and hit.group(1) in uid_index:
                    survivors[i] = uid_index[hit.group(1)]
    wanted = sorted({i for idx in picks.values() for i in idx} | set(survivors.values()))
    images = build.take(wanted)
    thumbs = {i: thumbnail_uri(images.get(i)) for i in wanted}

    out = ['<section id="kept" data-section="kept"><h2>Kept pairs</h2>']
    rows = _rows(build, picks["kept"])
    if rows:
        out.append(f'<p>{len(rows)} of {int(kept.sum()):,} kept rows, sampled with seed {seed}.</p><div class="grid" '
                   'id="kept-grid">')
        out += [_card(build, i, thumbs.get(i), row) for i, row in zip(picks["kept"], rows)]
        out.append("</div>")
    else:
        out.append('<p class="empty">No row was kept.</p>')
    out.append('</section><section id="rejected" data-section="rejected"><h2>Rejected pairs, per reason</h2>')
    if not reasons:
        out.append('<p class="empty">No row was rejected.</p>')
    for stage, reason, count in reasons:
        idx = picks[(stage, reason)]
        out.append(f'<h3 id="rej-{slug(stage)}-{slug(reason)}">{esc(stage)} / {esc(reason)} '
                   f'<small>({len(idx)} of {count:,})</small></h3>')
        if not idx:
            out.append(f'<p class="empty" data-reason="{esc(reason)}">The rejects hold no row with this reason.</p>')
            continue
        out.append(f'<div class="grid" data-stage="{esc(stage)}" data-reason="{esc(reason)}">')
        for i, row in zip(idx, _rows(build, idx)):
            extra = ""
            if i in survivors:
                extra = (f'<div class="pair" data-role="survivor">duplicate of:'
                         f'{_img_tag(thumbs.get(survivors[i]), "survivor")}</div>')
            out.append(_card(build, i, thumbs.get(i), row, extra))
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _rewrite_items(value: Any) -> list[tuple[str, dict]]:
    """(text, scores) of each rewrite in a recaptions value."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for it in items:
        if isinstance(it, dict):
            text = next((it[k] for k in ("text", "caption", "rewrite", "recaption") if isinstance(it.get(k), str)),
                        None)
            if text is None:
                text = next((v for v in it.values() if isinstance(v, str)), "")
            scores = {k: v for k, v in it.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            scores |= {k: v for k, v in it.items() if isinstance(v, str) and v != text and k in ("model", "mode")}
            out.append((text, scores))
        elif it is not None:
            out.append((str(it), {}))
    return out


def _rewrites(build: Build, seed: int) -> str:
    meta = build.meta
    out = ['<section id="rewrites" data-section="rewrites"><h2>Rewrites</h2>']
    if "recaptions" not in meta.column_names or meta["recaptions"].null_count == meta.num_rows:
        out.append('<p class="empty">No rewrites in this build: its rows have no <code>recaptions</code> column '
                   '(the spec has no recaption stage, or it wrote nothing).</p></section>')
        return "".join(out)
    score_cols = [c for c in meta.column_names if c.startswith("recaption") and c != "recaptions"
                  and (pa.types.is_floating(meta.schema.field(c).type)
                       or pa.types.is_integer(meta.schema.field(c).type))]
    has = np.asarray(pc.is_valid(meta["recaptions"]).to_numpy(zero_copy_only=False), bool)
    kept = meta["_kept"].to_numpy(zero_copy_only=False)
    idx = seeded_sample(meta, has & kept, N_REWRITES, f"{seed}/rewrites") or \
        seeded_sample(meta, has, N_REWRITES, f"{seed}/rewrites")
    images = build.take(idx)
    out.append(f'<p>{len(idx)} of {int(has.sum()):,} rows with rewrites.</p>')
    for i, row in zip(idx, _rows(build, idx)):
        items = _rewrite_items(row["recaptions"])
        lis = "".join(f'<li data-role="rewrite">{esc(t)} <span class="stat">'
                      f'{esc(_kv({k: fmt_value(v) for k, v in s.items()}))}</span></li>' for t, s in items)
        extra = _kv({c: fmt_value(row.get(c)) for c in score_cols})
        out.append(f'<div class="rw" data-uid="{esc(row["uid"])}">'
                   f'{_img_tag(thumbnail_uri(images.get(i)), row.get("text") or "")}<div>'
                   f'<div data-role="original"><b>original:</b> {esc(row.get("text"))}</div>'
                   f'<ul>{lis}</ul>{f"<div class=stat>{esc(extra)}</div>" if extra else ""}'
                   f'<div class="uid">{esc(row["uid"][:12])} {"kept" if row["_kept"] else esc(row.get("reason"))}'
                   f'</div></div></div>')
    out.append("</section>")
    return "".join(out)


NEG_TEXT = ("neg_text", "negative_text", "negative_caption", "neg_caption", "hard_negative")
NEG_IMAGE = ("neg_image", "negative_image")
NEG_UID = ("neg_uid", "negative_uid")
NEG_KIND = ("kind", "neg_kind", "negative_kind")


def _first(names: Iterable[str], options: Iterable[str]) -> str | None:
    names = list(names)
    return next((o for o in options if o in names), None)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _neg_list_columns(meta: pa.Table) -> list[str]:
    """Columns holding a list of negatives per row: list<struct> with a `text` field, named neg*/negative*."""
    out = []
    for f in meta.schema:
        t = f.type
        if f.name.startswith(("neg", "hard_neg")) and (pa.types.is_list(t) or pa.types.is_large_list(t)) \
                and pa.types.is_struct(t.value_type) and t.value_type.get_field_index("text") >= 0:
            out.append(f.name)
    return out


@dataclass
class _Neg:
    row: int | None  # the positive pair's row in build.meta
    kind: str
    text: str | None
    caption: str | None = None
    scores: dict = field(default_factory=dict)
    edit: tuple[str, str] | None = None  # (before, after)
    image_at: tuple[int, int] | None = None  # (negatives file, row) of a negative image
    image_row: int | None = None  # a build row whose image is the negative image


def _collect_negatives(build: Build) -> tuple[list[_Neg], str, str | None]:
    """Every negative of the build, from whichever layout it has; (negatives, where from, negative image column)."""
    meta = build.meta
    negs: list[_Neg] = []
    kept = meta["_kept"].to_numpy(zero_copy_only=False)
    for c in _neg_list_columns(meta):  # e.g. negatives_text's neg_captions, on kept rows
        col = meta[c].filter(pa.array(kept)) if meta.num_rows else meta[c]
        rows = np.flatnonzero(kept)
        if len(col) == 0 or col.null_count == len(col):
            continue
        flat = pc.list_flatten(col).to_pylist()
        parent = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
        for item, p in zip(flat, parent.tolist()):
            if not item:
                continue
            scores = {k: v for k, v in item.items() if _is_number(v) and k not in ("span_start", "span_end")}
            if isinstance(item.get("method"), str):
                scores["method"] = item["method"]
            edit = (item.get("edit_before"), item.get("edit_after")) if "edit_after" in item else None
            negs.append(_Neg(int(rows[p]), str(item.get("kind") or "(none)"), item.get("text"), scores=scores,
                             edit=edit))
        if negs:
            return negs, f"the <code>{esc(c)}</code> column of the kept rows", None
    files = _part_files(build.dir, "negatives") or sorted((build.dir / "negatives").glob("*.parquet"))
    if files:
        uid_index = {u: i for i, u in enumerate(meta["uid"].to_pylist())}
        schema = files[0].read_schema()
        image_col = _first(schema.names, NEG_IMAGE)
        for k, f in enumerate(files):
            t = f.read_table(columns=[fl.name for fl in f.read_schema() if not is_heavy(fl)])
            names = t.column_names
            text_col, kind_col = _first(names, NEG_TEXT), _first(names, NEG_KIND)
            uid_col, nuid_col = _first(names, ("uid", "pos_uid", "source_uid")), _first(names, NEG_UID)
            cap_col = _first(names, ("text", "caption", "pos_text"))
            skip = {text_col, kind_col, uid_col, nuid_col, cap_col}
            score_cols = [c for c in names if c not in skip and (pa.types.is_floating(t.schema.field(c).type) or
                          pa.types.is_integer(t.schema.field(c).type) or pa.types.is_boolean(t.schema.field(c).type))]
            for r, row in enumerate(t.to_pylist()):
                negs.append(_Neg(uid_index.get(row.get(uid_col)) if uid_col else None,
                                 str(row.get(kind_col) or "(none)") if kind_col else "(none)",
                                 row.get(text_col) if text_col else None,
                                 caption=row.get(cap_col) if cap_col else None,
                                 scores={c: row[c] for c in score_cols},
                                 image_at=(k, r) if image_col else None,
                                 image_row=uid_index.get(row.get(nuid_col)) if nuid_col else None))
        return negs, "the <code>negatives/</code> set", image_col
    text_col = _first(meta.column_names, NEG_TEXT)  # flat neg_* columns, one negative per row
    if text_col:
        kind_col = _first(meta.column_names, NEG_KIND[1:])
        score_cols = [c for c in _numeric_columns(meta) if c.startswith(("neg", "negative"))]
        valid = np.asarray(pc.is_valid(meta[text_col]).to_numpy(zero_copy_only=False), bool) & kept
        for r in np.flatnonzero(valid).tolist():
            row = {c: meta[c][r].as_py() for c in [text_col, kind_col, *score_cols] if c}
            negs.append(_Neg(r, str(row.get(kind_col) or "(none)"), row[text_col],
                             scores={c: row[c] for c in score_cols}))
        return negs, f"the <code>{esc(text_col)}</code> column", None
    return [], "", None


def _highlight(text: str | None, edit: tuple[str, str] | None) -> str:
    """The negative with its edited span marked, when the stage recorded it."""
    if not text:
        return ""
    if edit and edit[1] and edit[1] in text:
        a = text.index(edit[1])
        return f"{esc(text[:a])}<mark>{esc(edit[1])}</mark>{esc(text[a + len(edit[1]):])}"
    return esc(text)


def _negatives(build: Build, seed: int) -> str:
    out = ['<section id="negatives" data-section="negatives"><h2>Hard negatives</h2>']
    negs, origin, image_col = _collect_negatives(build)
    if not negs:
        out.append('<p class="empty">No hard negatives in this build: no negative-caption column '
                   '(<code>neg_captions</code>) and no <code>negatives/</code> set (the spec has no negatives stage, '
                   'or it wrote nothing).</p></section>')
        return "".join(out)
    uids = build.meta["uid"].to_pylist()
    kinds = sorted({n.kind for n in negs})
    out.append(f'<p>{len(negs):,} negatives of {len(kinds)} kinds from {origin}; up to {N_NEG_PER_KIND} per kind, '
               f'seeded.</p><table><tr><th class="l">kind</th><th>negatives</th></tr>')
    for k in kinds:
        c = sum(n.kind == k for n in negs)
        out.append(f'<tr data-neg-kind="{esc(k)}" data-count="{c}"><td class="l">{esc(k)}</td><td>{c:,}</td></tr>')
    out.append("</table>")
    # a table of (uid, position) so seeded_sample orders each kind's negatives the same whatever the file order
    keys = pa.table({"uid": [f"{uids[n.row] if n.row is not None else ''}/{j}" for j, n in enumerate(negs)]})
    kind_arr = np.asarray([n.kind for n in negs], dtype=object)
    picks = {k: seeded_sample(keys, kind_arr == k, N_NEG_PER_KIND, f"{seed}/neg/{k}") for k in kinds}
    chosen = [negs[j] for idx in picks.values() for j in idx]
    images = build.take({r for n in chosen for r in (n.row, n.image_row) if r is not None})
    neg_images: dict[Any, Any] = {}
    if image_col:
        files = _part_files(build.dir, "negatives") or sorted((build.dir / "negatives").glob("*.parquet"))
        holder = Build(build.dir, {}, {}, {}, files, pa.table({}), None)
        neg_images = take_column(holder, [(n.image_at[0], n.image_at[1], n.image_at) for n in chosen
                                          if n.image_at], image_col)
    with_neg_image = bool(image_col) or any(n.image_row is not None for n in negs)
    for k in kinds:
        out.append(f'<h3>kind: {esc(k)}</h3><div class="grid" data-kind="{esc(k)}">')
        for j in picks[k]:
            n = negs[j]
            cap = n.caption if n.caption is not None else (
                build.meta["text"][n.row].as_py() if n.row is not None and "text" in build.meta.column_names else "")
            pair = _img_tag(thumbnail_uri(images.get(n.row)) if n.row is not None else None, "image",
                            "image not in build")
            if with_neg_image:
                data = neg_images.get(n.image_at) if n.image_at else images.get(n.image_row)
                pair += _img_tag(thumbnail_uri(data), "negative image", "no negative image")
            scores = _kv({c: fmt_value(v) for c, v in n.scores.items()})
            uid = uids[n.row] if n.row is not None else ""
            out.append(f'<figure class="card" data-uid="{esc(uid)}"><div class="pair">{pair}</div>'
                       f'<div class="cap pos" data-role="caption">+ {esc(cap)}</div>'
                       f'<div class="cap neg" data-role="negative">− {_highlight(n.text, n.edit)}</div>'
                       f'{f"<div class=stat>{esc(scores)}</div>" if scores else ""}'
                       f'<div class="uid">{esc(uid[:12])}</div></figure>')
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _spec(build: Build) -> str:
    text = yaml.safe_dump(build.spec, sort_keys=False) if build.spec else "(no spec.yaml)"
    return (f'<section id="spec" data-section="spec"><h2>Resolved spec</h2><details><summary>spec.yaml</summary>'
            f'<pre>{esc(text)}</pre></details></section>')


NAV = [("summary", "Summary"), ("funnel", "Funnel"), ("rejects", "Rejects"), ("distributions", "Distributions"),
       ("kept", "Kept"), ("rejected", "Rejected"), ("rewrites", "Rewrites"), ("negatives", "Negatives"),
       ("spec", "Spec")]


def render_report(build: Build, seed: int = 0) -> str:
    reasons = _reason_rows(build)
    title = f"{build.stats.get('dataset') or build.manifest.get('dataset') or ''} / " \
            f"{build.stats.get('build_id') or build.dir.name}"
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        # self-contained: nothing but inline styles and data: images may load
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>pairforge report: {esc(title)}</title><style>{CSS}</style></head><body>",
        f'<header><h1>pairforge build report</h1><div class="sub">{esc(title)}</div></header>',
        "<nav>" + "".join(f'<a href="#{a}">{esc(b)}</a>' for a, b in NAV) + "</nav><main>",
        _summary(build), _funnel(build), _rejects(build, reasons), _distributions(build),
        _capped_distributions(build),
        _samples(build, reasons, seed), _rewrites(build, seed), _negatives(build, seed), _spec(build),
        "</main></body></html>\n",
    ]
    return "".join(parts)


def write_report(build_dir: str | Path | Location, out: str | Path | Location | None = None, *,
                 seed: int = 0) -> Location:
    """Write <build_dir>/report.html (or `out`) from the build's files, local or in object storage; returns its
    location."""
    from dataio.build_folder import atomic_write_text

    build = load_build(build_dir)
    path = location(out) if out else build.dir / REPORT_NAME
    atomic_write_text(path, render_report(build, seed=seed))
    return path


# --------------------------------------------------------------------------- the dataset card

def size_category(n: int) -> str:
    if n < 1000:
        return "n<1K"
    bounds = [(10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"), (10**7, "1M<n<10M"),
              (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"), (10**11, "10B<n<100B"),
              (10**12, "100B<n<1T")]
    return next((label for bound, label in bounds if n < bound), "n>1T")


_ARROW_DTYPES = {"string": "string", "large_string": "large_string", "binary": "binary", "large_binary":
                 "large_binary", "bool": "bool", "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
                 "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "halffloat": "float16",
                 "float": "float32", "double": "float64", "float16": "float16", "float32": "float32",
                 "float64": "float64"}


def _feature(t: pa.DataType) -> dict:
    """Hugging Face YAML feature of an Arrow type, without `datasets` (the same layout it writes)."""
    if pa.types.is_struct(t):
        return {"struct": [{"name": t.field(i).name, **_feature(t.field(i).type)} for i in range(t.num_fields)]}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _feature(t.value_type)
        return {"list": inner.get("dtype", inner.get("struct", inner))}
    return {"dtype": _ARROW_DTYPES.get(str(t), str(t))}


def features_yaml(schema: pa.Schema) -> list[dict]:
    try:
        from datasets import Features

        return Features.from_arrow_schema(schema)._to_yaml_list()
    except ImportError:
        return [{"name": f.name, **_feature(f.type)} for f in schema]


def card_header(build: Build) -> dict:
    mf, st = build.manifest, build.stats
    dataset = st.get("dataset") or mf.get("dataset") or build.spec.get("dataset") or build.dir.name
    shards = _part_files(build.dir, "shards")
    metas = [f.read_metadata() for f in shards]
    n = sum(md.num_rows for md in metas)
    download = sum(f.size() for f in shards)
    in_memory = 0
    for md in metas:
        in_memory += sum(md.row_group(g).total_byte_size for g in range(md.num_row_groups))
    spec = build.spec
    license_ = spec.get("license") or (spec.get("card") or {}).get("license") or "unknown"
    return {
        "pretty_name": (spec.get("card") or {}).get("pretty_name")
        or f"{dataset} ({mf.get('build_id') or build.dir.name})",
        "license": license_,
        "task_categories": ["zero-shot-image-classification", "image-to-text"],
        "size_categories": [size_category(n)],
        "tags": ["pairforge", "image-text-pairs", "clip"],
        "dataset_info": {
            "features": features_yaml(build.schema) if build.schema is not None else [],
            "splits": [{"name": "train", "num_bytes": int(in_memory), "num_examples": int(n)}],
            "download_size": int(download),
            "dataset_size": int(in_memory),
        },
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.parquet"}]}],
    }


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>!&|~#])")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x85\u2028\u2029]+")


def _md_escape(s: Any) -> str:
    """Text from the build (names, reasons, spec values) as inline Markdown that renders as itself: one line, each
    character that could start markup, HTML, a link or an image backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", _LINE_BREAKS.sub(" ", str(s)))


def _md_code(s: Any) -> str:
    """A code span that holds s whatever it holds: delimited by more backticks than any run in it."""
    text = _LINE_BREAKS.sub(" ", str(s))
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if not text.strip() or text[0] == "`" or text[-1] == "`" or (text[0] == " " and text[-1] == " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"  # CommonMark strips one space each side when both are there


def _md_fence(text: str, info: str = "") -> list[str]:
    """A fenced code block no line of text can close: its fence is longer than any backtick run in text."""
    fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    return [fence + info, text, fence]


def card_body(build: Build, header: dict) -> str:
    mf, st, spec = build.manifest, build.stats, build.spec
    src = spec.get("source") or {}
    params = build.params
    n = header["dataset_info"]["splits"][0]["num_examples"]
    lines = [f"# {_md_escape(header['pretty_name'])}", "",
             f"{n:,} image-text pairs built by pairforge from the source "
             f"{_md_code(mf.get('source') or src.get('name'))} "
             f"(build {_md_code(mf.get('build_id') or build.dir.name)}, "
             f"spec hash {_md_code((mf.get('spec_hash') or '')[:12])}, code {_md_code(mf.get('code_version', '?'))}). "
             "The build report is `report.html` beside this card.", "",
             "## Dataset structure", "",
             "One split, `train`: the kept pairs in `shards/*.parquet` "
             f"({_plural(len(mf.get('shards', [])), 'file')}). "
             f"Rejected rows ({st.get('rows_rejected', mf.get('rejected_rows', 0)):,}) are in `rejects/*.parquet` "
             "with their full record and `stage`, `reason`, `detail`; they are not part of the split.", "",
             "| column | type |", "|---|---|"]
    for f in build.schema or []:
        lines.append(f"| {_md_code(f.name)} | {_md_escape(f.type)} |")
    lines += ["", "```python", "from datasets import load_dataset",
              "ds = load_dataset(\"path/to/this/folder\", split=\"train\")  # image is JPEG/PNG/WebP bytes", "```", "",
              "## Source", "",
              f"- name: {_md_code(src.get('name') or mf.get('source'))}",
              f"- input: {_md_code(src.get('urls') or src.get('pairs'))}",
              f"- input fingerprint: {_md_code(mf.get('source_fingerprint', '?'))}",
              f"- rows listed: {st.get('rows_listed', '?'):,}" if isinstance(st.get("rows_listed"), int)
              else "- rows listed: ?", "",
              "## Curation", "", "| stage | rows in | rows out | rejected (by reason) | seconds |",
              "|---|---|---|---|---|"]
    for s in st.get("stages", []):
        rej = ", ".join(f"{k}: {v}" for k, v in sorted(s.get("rejected", {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"| {_md_escape(s['stage'])} | {s['rows_in']:,} | {s['rows_out']:,} | {_md_escape(rej) or '-'} | "
                     f"{s.get('seconds', 0):.1f} |")
    smeta = mf.get("stage_metadata") or {}
    models = {k: v for k, v in smeta.items() if isinstance(v, dict) and v.get("model")}
    if models:
        lines += ["", "Models: " + "; ".join(f"{_md_escape(k)}: {_md_code(v['model'])}" for k, v in models.items())
                  + "."]
    lines += ["", "## Resolved spec", "", *_md_fence(yaml.safe_dump(spec, sort_keys=False).rstrip(), "yaml"), "",
              "## Known limits", ""]
    lines += [f"- {_md_escape(x)}" for x in known_limits(build, header)]
    return "\n".join(lines) + "\n"


def known_limits(build: Build, header: dict) -> list[str]:
    spec, params = build.spec, build.params
    ing = spec.get("ingest") or {}
    out = ["Captions are web alt text (or the source's captions), not written descriptions: they can be short, "
           "generic or wrong about the image."]
    if ing.get("image_size"):
        out.append(f"Images were resized (image_size={ing['image_size']}, resize_mode={ing.get('resize_mode', '?')}"
                   f"{', only when bigger' if ing.get('resize_only_if_bigger') else ''}) and re-encoded as "
                   f"{ing.get('encode_format', '?')}; the originals' sizes are in original_width/original_height.")
    if "language" in params:
        out.append(f"Only captions detected as {', '.join(params['language'].get('keep') or [])} were kept; "
                   "language detection of short captions is unreliable.")
    if "dedup" not in params:
        out.append("No dedup stage ran: duplicate images and URLs may remain.")
    else:
        out.append("Duplicates were removed within this build (and against earlier builds where configured), "
                   "not against other datasets or evaluation sets.")
    if "safety" not in params:
        out.append("No safety stage ran: NSFW images were not filtered.")
    if "align" not in params:
        out.append("No align stage ran: image-caption agreement was not scored.")
    thr = []
    for col in thresholds_map():
        for label, _ in thresholds_for(build, col):
            thr.append(label)
    if thr:
        out.append("Thresholds are heuristics, not ground truth: " + ", ".join(sorted(set(thr))) + ".")
    if header["license"] == "unknown":
        out.append("License unknown: the images and captions keep their owners' rights; check the sources' terms "
                   "before use.")
    return out


def render_dataset_card(build: Build) -> str:
    header = card_header(build)
    body = card_body(build, header)
    try:
        from huggingface_hub import DatasetCard, DatasetCardData
    except ImportError:
        return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + body
    data = DatasetCardData(**header)
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")  # parses the header back: raises if it is not YAML
    return str(card)


def write_dataset_card(build_dir: str | Path | Location, out: str | Path | Location | None = None) -> Location:
    """Write <build_dir>/README.md (or `out`), a Hugging Face dataset card, local or in object storage; returns its
    location."""
    from dataio.build_folder import atomic_write_text

    build = load_build(build_dir, rows=False)
    path = location(out) if out else build.dir / CARD_NAME
    atomic_write_text(path, render_dataset_card(build))
    return path
