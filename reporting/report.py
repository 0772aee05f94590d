"""The build report (report.html) and the dataset card (README.md), from a finished build's files. No model runs.

    write_report(build_dir)        -> <build>/report.html: one self-contained page (plots and thumbnails are
                                      base64 data: URIs; a Content-Security-Policy blocks anything else)
    write_dataset_card(build_dir)  -> <build>/README.md: a Hugging Face dataset card (YAML header + body)

The report reads stats.json, manifest.json, spec.yaml, the metadata columns of shards/ and rejects/ (every column
but image bytes, embeddings and other numeric lists) a file and a batch at a time, and the image bytes of the
sampled rows only (one Parquet row group per sampled row). What it keeps of the rows is bounded whatever the build's
size (Aggregates): counts, a histogram per stat column over fixed bins (from the footers' min/max, or a first pass
where they have none), counts per category value, and seeded samples: per grid, the rows of smallest hash of the
uid, merged file by file. So its size and its memory do not grow with the build; its time grows with the rows read.

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
from schemas.errors import UserError

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


class ReportError(UserError):
    pass


# --------------------------------------------------------------------------- reading a build

def part_files(build_dir: Location, sub: str) -> list[Location]:
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
    files: list[Location]  # shards then rejects: a sampled row's _file indexes this list
    schema: pa.Schema | None  # the kept shards' schema
    total_rows: int = 0  # rows in the build's files (from their footers)
    kept_files: int = 0  # files[:kept_files] are the shards
    _pf: dict = field(default_factory=dict)
    _aggregates: dict = field(default_factory=dict)  # seed -> Aggregates

    @property
    def params(self) -> dict[str, dict]:
        return stage_params(self.spec)

    def param(self, stage: str, name: str):
        return self.params.get(stage, {}).get(name)

    def parquet(self, i: int) -> pq.ParquetFile:
        if i not in self._pf:
            self._pf[i] = self.files[i].parquet_file()
        return self._pf[i]

    def aggregates(self, seed: int = 0) -> "Aggregates":
        """The report's view of every row (counts, histograms, seeded samples), computed once per seed."""
        if seed not in self._aggregates:
            self._aggregates[seed] = aggregate(self, seed)
        return self._aggregates[seed]

    def computed(self) -> "Aggregates | None":
        """Aggregates computed already (any seed), else None: what the dataset card may use without a pass."""
        return next(iter(self._aggregates.values()), None)


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


def images_of(build: Build, rows: Iterable[dict | None]) -> dict[tuple[int, int], Any]:
    """Image bytes of sampled rows ({_file, _row}), keyed by (file, row)."""
    where = {(r["_file"], r["_row"]) for r in rows if r is not None}
    return take_column(build, [(f, r, (f, r)) for f, r in sorted(where)], "image")


BUILD_HINT = "give a build folder, <out>/<dataset>/<build id>: the one that holds manifest.json, shards/ and rejects/"


def require_build(build_dir: str | Path | Location) -> Location:
    """The build folder's location; ReportError when there is none there."""
    build_dir = location(build_dir)
    if not build_dir.exists():
        raise ReportError("no build folder there: it does not exist", str(build_dir), BUILD_HINT)
    if not (build_dir / "shards").is_dir() and not (build_dir / "rejects").is_dir():
        raise ReportError("not a build folder: no shards/ or rejects/ in it", str(build_dir), BUILD_HINT)
    return build_dir


def load_build(build_dir: str | Path | Location, rows: bool = True) -> Build:
    """The build's json/yaml files and its part files; with rows, their row count (from the footers). What the
    report shows of the rows is computed from them on demand (Build.aggregates): a few passes a file at a time,
    holding counts, fixed-bin histograms and seeded samples, never a table of the build's rows."""
    build_dir = require_build(build_dir)

    def read_json(name):
        p = build_dir / name
        return json.loads(p.read_text()) if p.exists() else {}

    spec = yaml.safe_load((build_dir / "spec.yaml").read_text()) if (build_dir / "spec.yaml").exists() else {}
    register_build_stages(spec or {})
    shards, rejects = part_files(build_dir, "shards"), part_files(build_dir, "rejects")
    total = sum(f.read_metadata().num_rows for f in shards + rejects) if rows else 0
    return Build(build_dir, read_json("stats.json"), read_json("manifest.json"), spec or {}, shards + rejects,
                 shards[0].read_schema() if shards else None, total_rows=total, kept_files=len(shards))


# --------------------------------------------------------------------------- the aggregates (bounded)

BATCH_ROWS = 65_536  # rows of a file read at a time by the report's passes


def uid_hash(keys: pa.Array | pa.ChunkedArray, key: str) -> np.ndarray:
    """A 64-bit hash of each string seeded by `key`: the same for the same string and key in every run."""
    import polars as pl

    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    return pl.Series(arr).cast(pl.String).hash(seed=zlib.crc32(key.encode())).to_numpy()


class Sample:
    """The k items of smallest hash(key, item name) among all offered: a seeded sample that is the same whatever
    order the items come in (a file at a time), holding k items."""

    def __init__(self, key: str, k: int):
        self.key, self.k = key, k
        self.items: list[tuple[int, str, Any]] = []  # (hash, name, payload), smallest first

    def offer(self, names: pa.Array, payload) -> None:
        """names: the candidates' names; payload(positions) -> one object per chosen position."""
        if not len(names):
            return
        h = uid_hash(names, self.key)
        cand = np.flatnonzero(h <= self.items[-1][0]) if len(self.items) >= self.k else np.arange(len(h))
        if cand.size > self.k:
            cand = cand[np.argpartition(h[cand], self.k - 1)[:self.k]]
        if not cand.size:
            return
        chosen = zip(h[cand].tolist(), names.take(pa.array(cand)).to_pylist(), payload(cand))
        self.items = sorted([*self.items, *chosen], key=lambda x: x[:2])[:self.k]

    def picked(self) -> list:
        """The payloads, in name order."""
        return [p for _, _, p in sorted(self.items, key=lambda x: x[1])]


@dataclass
class Histogram:
    column: str
    derived: bool  # computed from `text` (no stage wrote the column)
    owner: str | None
    lo: float  # the data's range
    hi: float
    edges: np.ndarray
    counts: np.ndarray  # (3, bins): kept, rejected by owner, rejected by another stage

    @property
    def title(self) -> str:
        return self.column + (" (from text)" if self.derived else "")


@dataclass
class Aggregates:
    """What the report shows of a build's rows, each part bounded: counts, a histogram per plotted column over fixed
    bins, counts per category, seeded samples (row dicts with their _file and _row)."""

    seed: int
    rows: int = 0
    kept: int = 0
    reasons: dict = field(default_factory=dict)  # (stage, reason) -> rows
    hists: list = field(default_factory=list)  # Histogram, in plot order
    categories: dict = field(default_factory=dict)  # column -> {value: [kept, by its stage, by another]}
    samples: dict = field(default_factory=dict)  # "kept" | (stage, reason) | "rewrites" -> row dicts
    survivors: dict = field(default_factory=dict)  # uid of a sampled duplicate -> {_file, _row} it duplicates
    rewrites: int = 0  # rows with a recaptions value
    rewrite_scores: list = field(default_factory=list)
    negatives: "NegativeSet | None" = None


def _union_schema(build: Build) -> pa.Schema:
    """Light fields of the shards' schema, then the rejects' fields the shards lack."""
    fields: dict[str, pa.Field] = {}
    for f in ([build.files[0]] if build.kept_files else []) + build.files[build.kept_files:][:1]:
        for fl in f.read_schema():
            if not is_heavy(fl):
                fields.setdefault(fl.name, fl)
    return pa.schema(list(fields.values()))


def _batches(f: Location, columns: list[str] | None = None):
    """(first row, batch) of a Parquet file, BATCH_ROWS rows at a time."""
    pf = f.parquet_file()
    names = pf.schema_arrow.names
    cols = [c for c in columns if c in names] if columns is not None else \
        [fl.name for fl in pf.schema_arrow if not is_heavy(fl)]
    start = 0
    for rb in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
        yield start, pa.Table.from_batches([rb])
        start += rb.num_rows


DERIVED = ("caption_chars", "caption_words")  # from `text` when no stage wrote them


def _values(batch: pa.Table, column: str, derived: bool) -> np.ndarray:
    """A numeric column (or one derived from text) as float64, NaN where null."""
    if derived:
        text = pc.fill_null(batch["text"], "")
        arr = pc.utf8_length(text) if column == "caption_chars" else \
            pc.list_value_length(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(text)))
    elif column in batch.column_names:
        arr = batch[column]
    else:
        return np.full(batch.num_rows, np.nan)
    values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.where(np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), bool), values, np.nan)


def _footer_range(files: list[Location], column: str) -> tuple[float, float] | None | bool:
    """(lo, hi) of a column from the files' Parquet statistics; None when it holds no value; False when some row
    group has values but no usable (finite) statistics."""
    lo, hi = math.inf, -math.inf
    for f in files:
        md = f.read_metadata()
        if column not in md.schema.to_arrow_schema().names:
            continue
        j = next(i for i in range(md.num_columns) if md.schema.column(i).path == column)
        for g in range(md.num_row_groups):
            cm = md.row_group(g).column(j)
            st = cm.statistics
            if st is not None and st.has_null_count and st.null_count == cm.num_values:
                continue  # every value null
            if st is None or not st.has_min_max:
                return False
            a, b = float(st.min), float(st.max)
            if not (math.isfinite(a) and math.isfinite(b)):
                return False
            lo, hi = min(lo, a), max(hi, b)
    return (lo, hi) if lo <= hi else None


def _axis(lo: float, hi: float, lines: list[tuple[str, float]]) -> tuple[float, float, list]:
    """The plotted range: the data's, widened to the threshold lines near it; lines far outside are named, not
    drawn (x None)."""
    span = (hi - lo) or 1.0
    shown = []
    for label, x in lines:  # a threshold far outside the data would squash it: name it instead of drawing it
        if lo - 0.5 * span <= x <= hi + 0.5 * span:
            lo, hi = min(lo, x), max(hi, x)
            shown.append((label, x))
        else:
            shown.append((label + (" (off the axis, right)" if x > hi else " (off the axis, left)"), None))
    return lo, hi, shown


def histogram_bins(lo: float, hi: float, integer: bool, lines: list[tuple[str, float]]) -> np.ndarray:
    """Fixed bin edges for a column whose values span lo..hi: one bin per integer when integral over at most 60
    values, else 40 over the range (widened to the thresholds near it)."""
    lo, hi, _ = _axis(lo, hi, lines)
    if integer and hi - lo <= 60:
        return np.arange(math.floor(lo), math.floor(hi) + 2) - 0.5
    pad = (hi - lo) * 0.02 or 0.5
    return np.linspace(lo - pad, hi + pad, 41)


def _plan_histograms(build: Build, schema: pa.Schema) -> list[tuple[str, bool]]:
    """(column, derived from text) of every numeric column to plot, in plot order."""
    names = schema.names
    numeric = [n for n in names if not n.startswith("_") and column_role(n) in (None, "stat") and n not in DECISION
               and (pa.types.is_integer(schema.field(n).type) or pa.types.is_floating(schema.field(n).type))]
    order = _stat_order(build)
    cols = [c for c in order if c in numeric] + [c for c in numeric if c not in order]
    derived = [c for c in DERIVED if c not in cols] if "text" in names else []
    return [(c, c in derived) for c in dict.fromkeys([k for k in order if k in derived] + cols)]


def _histograms(build: Build, schema: pa.Schema) -> list[Histogram]:
    """Empty histograms with their bins fixed: ranges from the footers' statistics, or a pass over the columns
    that have none (and those derived from text)."""
    owners = column_owner()
    plan = _plan_histograms(build, schema)
    ranges: dict[str, tuple[float, float] | None] = {}
    integral: dict[str, bool] = {}
    scan: list[tuple[str, bool]] = []
    for c, derived in plan:
        got = False if derived else _footer_range(build.files, c)
        if got is False:
            scan.append((c, derived))
            integral[c] = True
        else:
            ranges[c] = got
            integral[c] = pa.types.is_integer(schema.field(c).type)
    if scan:  # the first pass: min and max (and whether every value is whole) of those columns
        lo, hi = {c: math.inf for c, _ in scan}, {c: -math.inf for c, _ in scan}
        cols = list({"text" if d else c for c, d in scan})
        for f in build.files:
            for _, batch in _batches(f, cols):
                for c, derived in scan:
                    v = _values(batch, c, derived)
                    v = v[np.isfinite(v)]
                    if v.size:
                        lo[c], hi[c] = min(lo[c], float(v.min())), max(hi[c], float(v.max()))
                        integral[c] = integral[c] and bool(np.all(np.mod(v, 1) == 0))
        ranges |= {c: (lo[c], hi[c]) if lo[c] <= hi[c] else None for c, _ in scan}
    out = []
    for c, derived in plan:
        if ranges[c] is None:
            continue
        edges = histogram_bins(*ranges[c], integral[c], thresholds_for(build, c))
        out.append(Histogram(c, derived, owners.get(c), *ranges[c], edges, np.zeros((3, len(edges) - 1), np.int64)))
    return out


def _groups(kept: bool, stage: pa.ChunkedArray | None, owner: str | None, n: int) -> np.ndarray:
    """0 kept, 1 rejected by owner, 2 rejected by another stage."""
    if kept:
        return np.zeros(n, np.int8)
    g = np.full(n, 2, np.int8)
    if owner:
        g[np.asarray(pc.fill_null(pc.equal(stage, owner), False).to_numpy(zero_copy_only=False), bool)] = 1
    return g


def _payload(batch: pa.Table, start: int, file: int, kept: bool):
    """Row dicts of chosen positions of a batch, with _file, _row, _kept and the decision columns."""
    def rows(positions: np.ndarray) -> list[dict]:
        out = batch.take(pa.array(positions)).to_pylist()
        for r, p in zip(out, positions.tolist()):
            r.update(_file=file, _row=start + p, _kept=kept)
            for c in DECISION:
                r.setdefault(c, None)
        return out
    return rows


def aggregate(build: Build, seed: int = 0) -> Aggregates:
    """One pass over the build's files, a batch at a time: counts, histograms, category counts and seeded samples;
    then, where they are shown, the rows that sampled duplicates name and the hard negatives."""
    agg = Aggregates(seed)
    if not build.files:
        return agg
    schema = _union_schema(build)
    agg.hists = _histograms(build, schema)
    stages = _stages()
    owners = column_owner()
    categorical = [c.name for s in build.params if s in stages for c in stages[s].columns
                   if c.role == "category" and c.name in schema.names]
    cats: dict[str, dict[str, list[int]]] = {c: {} for c in categorical}
    samples: dict[Any, Sample] = {"kept": Sample(f"{seed}/kept", N_KEPT)}
    has_rewrites = "recaptions" in schema.names
    rewrites = {k: Sample(f"{seed}/rewrites", N_REWRITES) for k in ("kept", "any")}
    agg.rewrite_scores = [c for c in schema.names if c.startswith("recaption") and c != "recaptions"
                          and (pa.types.is_floating(schema.field(c).type) or pa.types.is_integer(schema.field(c).type))]
    negs = NegativeScan(build, schema, seed)
    for i, f in enumerate(build.files):
        kept = i < build.kept_files
        for start, batch in _batches(f):
            n = batch.num_rows
            agg.rows += n
            uid = batch["uid"]
            rows = _payload(batch, start, i, kept)
            stage = batch["stage"] if "stage" in batch.column_names else None
            if kept:
                agg.kept += n
                samples["kept"].offer(uid, rows)
            else:
                for c in pc.value_counts(pc.binary_join_element_wise(stage, batch["reason"], "\t")).to_pylist():
                    if c["values"] is None:
                        continue
                    key = tuple(c["values"].split("\t", 1))
                    agg.reasons[key] = agg.reasons.get(key, 0) + c["counts"]
                    mask = pc.and_(pc.equal(stage, key[0]), pc.equal(batch["reason"], key[1]))
                    at = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), bool))
                    sample = samples.setdefault(key, Sample(f"{seed}/{key[0]}/{key[1]}", N_PER_REASON))
                    sample.offer(uid.take(pa.array(at)), lambda p, at=at: rows(at[p]))
            groups = {}
            for h in agg.hists:
                g = groups.setdefault(h.owner, _groups(kept, stage, h.owner, n))
                v = _values(batch, h.column, h.derived)
                ok = np.isfinite(v)
                for k in range(3):
                    h.counts[k] += np.histogram(v[ok & (g == k)], bins=h.edges)[0]
            for c in categorical:
                g = groups.setdefault(owners.get(c), _groups(kept, stage, owners.get(c), n))
                for k in range(3):
                    for vc in pc.value_counts(batch[c].filter(pa.array(g == k))).to_pylist():
                        name = "null" if vc["values"] is None else str(vc["values"])
                        cats[c].setdefault(name, [0, 0, 0])[k] += vc["counts"]
            if has_rewrites and "recaptions" in batch.column_names:
                has = np.asarray(pc.is_valid(batch["recaptions"]).to_numpy(zero_copy_only=False), bool)
                at = np.flatnonzero(has)
                agg.rewrites += int(at.size)
                for k in (("kept", "any") if kept else ("any",)):
                    rewrites[k].offer(uid.take(pa.array(at)), lambda p, at=at: rows(at[p]))
            if kept:
                negs.scan_kept(batch, rows)
    agg.categories = {c: v for c, v in cats.items() if any(k != "null" for k in v)}
    agg.samples = {k: s.picked() for k, s in samples.items()}
    if has_rewrites:
        agg.samples["rewrites"] = rewrites["kept"].picked() or rewrites["any"].picked()
    duplicates = {}
    for key, picked in agg.samples.items():
        if isinstance(key, tuple) and key[1].startswith("duplicate"):
            for r in picked:
                hit = re.match(r"dup of ([0-9a-f]+)", str(r.get("detail") or ""))
                if hit:
                    duplicates[r["uid"]] = hit.group(1)
    agg.negatives = negs.finish()
    found = locate(build, set(duplicates.values()) | agg.negatives.wanted())
    agg.survivors = {u: found[s] for u, s in duplicates.items() if s in found}
    agg.negatives.resolve(build, found)
    return agg


def locate(build: Build, uids: set[str]) -> dict[str, dict]:
    """{uid: {_file, _row}} of the given uids in the build's files: a pass over the uid column only."""
    if not uids:
        return {}
    wanted = pa.array(sorted(uids), pa.string())
    out = {}
    for i, f in enumerate(build.files):
        for start, batch in _batches(f, ["uid"]):
            at = np.flatnonzero(np.asarray(pc.is_in(batch["uid"], value_set=wanted).to_numpy(zero_copy_only=False),
                                           bool))
            for p, u in zip(at.tolist(), batch["uid"].take(pa.array(at)).to_pylist()):
                out.setdefault(u, {"_file": i, "_row": start + p})
    return out


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
    """Up to n row indices where mask is true: those of smallest hash(key, uid), in uid order; the same for the same
    rows whatever their order (what the report's per-file samples pick)."""
    idx = np.flatnonzero(mask)
    sample = Sample(key, n)
    sample.offer(meta["uid"].combine_chunks().take(pa.array(idx)), lambda p: idx[p].tolist())
    return sample.picked()


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


def register_build_stages(spec: dict) -> None:
    """A build's stages from outside pairforge (its spec's stage_modules) join the registry where this process can
    import them; where it cannot, their columns are shown without their declarations."""
    from schemas.registry import StageModuleError, load_stages

    try:
        load_stages(spec.get("stage_modules") or ())
    except StageModuleError as e:
        import logging

        logging.getLogger("pairforge.report").warning("%s", e)


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


def histogram_png(h: "Histogram", lines: list[tuple[str, float]]) -> str:
    """Stacked histogram of a column's counts by group (kept, rejected by its owner, rejected elsewhere) over its
    fixed bins, with the threshold lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 2.4))
    _, _, shown = _axis(h.lo, h.hi, lines)
    bins = h.edges
    labels = ["kept", f"rejected by {h.owner}" if h.owner else "rejected", "rejected by another stage"]
    base = np.zeros(len(bins) - 1)
    for k in range(3):  # stacked, one filled step polygon per group (cheap to draw, unlike a bar per bin)
        counts = h.counts[k]
        if not counts.any():
            continue
        ax.stairs(base + counts, bins, baseline=base.copy(), fill=True, color=COLORS[("kept", "here", "other")[k]],
                  label=labels[k])
        base = base + counts
    ax.set_ylim(0, max(1.0, base.max()) * 1.05)
    for i, (label, x) in enumerate(shown):
        if x is None:
            ax.plot([], [], " ", label=label)
        else:
            ax.axvline(x, color="black", linestyle=("--", ":", "-.")[i % 3], linewidth=1.1, label=label)
    ax.set_title(h.title)
    ax.set_ylabel("rows")
    ax.legend(loc="best", frameon=False)
    fig.subplots_adjust(left=0.13, right=0.98, bottom=0.11, top=0.9)
    return _png(fig)


def category_png(column: str, counts: dict[str, list[int]], top: int = 12) -> str:
    """Horizontal stacked bars of a category column: {value: [kept, rejected by its stage, by another]}."""
    plt = _plt()
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
    agg = build.computed()
    listed = st.get("rows_listed", agg.rows if agg else build.total_rows)
    kept = st.get("rows_kept", agg.kept if agg else 0)
    rejected = st.get("rows_rejected", listed - kept)
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
    agg = build.computed()
    if not rows and agg is not None:  # no stats.json: the rejects' own counts
        rows = sorted(((s, r, c) for (s, r), c in agg.reasons.items()), key=lambda x: -x[2])
    return rows


def _rejects(build: Build, rows: list[tuple[str, str, int]]) -> str:
    out = ['<section id="rejects" data-section="rejects"><h2>Rejects by reason</h2>']
    if not rows:
        out.append('<p class="empty">No row was rejected.</p></section>')
        return "".join(out)
    listed = build.stats.get("rows_listed") or build.total_rows or 1
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


def _stat_order(build: Build) -> list[str]:
    """Stage stats in the build's stage order, then the core ones."""
    stages = _stages()
    cols = [c.name for s in build.params if s in stages for c in stages[s].columns if c.role == "stat"]
    return cols + CORE_STATS


def _distributions(build: Build, seed: int = 0) -> str:
    agg = build.aggregates(seed)
    out = ['<section id="distributions" data-section="distributions"><h2>Distributions</h2>'
           '<p>Every row with the stat (kept and rejected), stacked: kept, rejected by the stage that computes the '
           'stat, rejected by another stage. Dashed lines: the spec\'s thresholds.</p><div class="plots">']
    plotted = 0
    for h in agg.hists:
        lines = thresholds_for(build, h.column)
        uri = histogram_png(h, lines)
        out.append(f'<figure data-column="{esc(h.column)}" data-thresholds="{esc(json.dumps([x for _, x in lines]))}"'
                   f' data-rows="{int(h.counts.sum())}"><img alt="{esc(h.title)}" src="{uri}"></figure>')
        plotted += 1
    for c, counts in agg.categories.items():
        uri = category_png(c, counts)
        out.append(f'<figure data-column="{esc(c)}" data-rows="{sum(map(sum, counts.values()))}">'
                   f'<img alt="{esc(c)}" src="{uri}"></figure>')
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
        for f in part_files(build.dir, "shards"):
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
        for f in part_files(build.dir, "rejects"):
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


def _samples(build: Build, reasons: list[tuple[str, str, int]], seed: int) -> str:
    agg = build.aggregates(seed)
    kept_rows = agg.samples.get("kept", [])
    picks = {(stage, reason): agg.samples.get((stage, reason), []) for stage, reason, _ in reasons}
    # duplicates: also show the row each one duplicates, when it is in this build
    survivors = {r["uid"]: agg.survivors[r["uid"]] for rows in picks.values() for r in rows
                 if r["uid"] in agg.survivors}
    images = images_of(build, [*kept_rows, *(r for rows in picks.values() for r in rows), *survivors.values()])

    def thumb(row: dict) -> str | None:
        return thumbnail_uri(images.get((row["_file"], row["_row"])))

    out = ['<section id="kept" data-section="kept"><h2>Kept pairs</h2>']
    if kept_rows:
        out.append(f'<p>{len(kept_rows)} of {agg.kept:,} kept rows, sampled with seed {seed}.</p><div class="grid" '
                   'id="kept-grid">')
        out += [_card(build, i, thumb(row), row) for i, row in enumerate(kept_rows)]
        out.append("</div>")
    else:
        out.append('<p class="empty">No row was kept.</p>')
    out.append('</section><section id="rejected" data-section="rejected"><h2>Rejected pairs, per reason</h2>')
    if not reasons:
        out.append('<p class="empty">No row was rejected.</p>')
    for stage, reason, count in reasons:
        rows = picks[(stage, reason)]
        out.append(f'<h3 id="rej-{slug(stage)}-{slug(reason)}">{esc(stage)} / {esc(reason)} '
                   f'<small>({len(rows)} of {count:,})</small></h3>')
        if not rows:
            out.append(f'<p class="empty" data-reason="{esc(reason)}">The rejects hold no row with this reason.</p>')
            continue
        out.append(f'<div class="grid" data-stage="{esc(stage)}" data-reason="{esc(reason)}">')
        for i, row in enumerate(rows):
            extra = ""
            if row["uid"] in survivors:
                extra = (f'<div class="pair" data-role="survivor">duplicate of:'
                         f'{_img_tag(thumb(survivors[row["uid"]]), "survivor")}</div>')
            out.append(_card(build, i, thumb(row), row, extra))
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
    agg = build.aggregates(seed)
    out = ['<section id="rewrites" data-section="rewrites"><h2>Rewrites</h2>']
    if not agg.rewrites:
        out.append('<p class="empty">No rewrites in this build: its rows have no <code>recaptions</code> column '
                   '(the spec has no recaption stage, or it wrote nothing).</p></section>')
        return "".join(out)
    rows = agg.samples.get("rewrites", [])
    images = images_of(build, rows)
    out.append(f'<p>{len(rows)} of {agg.rewrites:,} rows with rewrites.</p>')
    for row in rows:
        items = _rewrite_items(row["recaptions"])
        lis = "".join(f'<li data-role="rewrite">{esc(t)} <span class="stat">'
                      f'{esc(_kv({k: fmt_value(v) for k, v in s.items()}))}</span></li>' for t, s in items)
        extra = _kv({c: fmt_value(row.get(c)) for c in agg.rewrite_scores})
        out.append(f'<div class="rw" data-uid="{esc(row["uid"])}">'
                   f'{_img_tag(thumbnail_uri(images.get((row["_file"], row["_row"]))), row.get("text") or "")}<div>'
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


def _neg_list_columns(schema: pa.Schema) -> list[str]:
    """Columns holding a list of negatives per row: list<struct> with a `text` field, named neg*/negative*."""
    out = []
    for f in schema:
        t = f.type
        if f.name.startswith(("neg", "hard_neg")) and (pa.types.is_list(t) or pa.types.is_large_list(t)) \
                and pa.types.is_struct(t.value_type) and t.value_type.get_field_index("text") >= 0:
            out.append(f.name)
    return out


def _score_columns(schema: pa.Schema, skip: set, booleans: bool = True) -> list[str]:
    return [f.name for f in schema if f.name not in skip and (
        pa.types.is_floating(f.type) or pa.types.is_integer(f.type) or (booleans and pa.types.is_boolean(f.type)))]


@dataclass
class _Neg:
    pos: dict | None  # the positive pair's row (uid, text, _file, _row); None while (or when) not found in the build
    kind: str
    text: str | None
    caption: str | None = None
    scores: dict = field(default_factory=dict)
    edit: tuple[str, str] | None = None  # (before, after)
    image_at: tuple[int, int] | None = None  # (negatives file, row) of a negative image
    image_ref: dict | None = None  # a build row (_file, _row) whose image is the negative image
    pos_uid: str | None = None  # a negatives set's uid of the positive, and of a negative image's row
    neg_uid: str | None = None


@dataclass
class NegativeSet:
    """The build's hard negatives as the report shows them: how many of each kind, a seeded sample of each."""

    counts: dict = field(default_factory=dict)  # kind -> negatives
    picked: dict = field(default_factory=dict)  # kind -> [_Neg]
    origin: str = ""
    image_col: str | None = None  # a negatives set's image column
    files: list = field(default_factory=list)  # the negatives set's files

    def wanted(self) -> set[str]:
        """The build uids the picked negatives name (a negatives set's positives and negative images)."""
        return {u for ns in self.picked.values() for n in ns for u in (n.pos_uid, n.neg_uid) if u}

    def resolve(self, build: Build, found: dict[str, dict]) -> None:
        """Point the picked negatives of a negatives set at the build rows their uids name."""
        for n in (n for ns in self.picked.values() for n in ns):
            if n.pos_uid in found:
                n.pos = {"uid": n.pos_uid, **found[n.pos_uid]}
            if n.neg_uid in found:
                n.image_ref = found[n.neg_uid]
        rows = [n.pos for ns in self.picked.values() for n in ns if n.pos is not None and "text" not in n.pos]
        texts = take_column(build, [(r["_file"], r["_row"], i) for i, r in enumerate(rows)], "text")
        for i, r in enumerate(rows):
            r["text"] = texts.get(i)


class NegativeScan:
    """Counts and seeded samples of the negatives, by kind, from the kept rows as the report's pass streams them
    (a list-of-negatives column such as neg_captions, or one flat neg_* column), else from a negatives/ set."""

    def __init__(self, build: Build, schema: pa.Schema, seed: int):
        self.build, self.seed = build, seed
        self.lists = {c: ({}, {}) for c in _neg_list_columns(schema)}  # column -> (counts, samples) by kind
        self.text_col = _first(schema.names, NEG_TEXT)
        self.kind_col = _first(schema.names, NEG_KIND[1:])
        self.flat = ({}, {})
        self.flat_scores = [c for c in _score_columns(schema, {self.text_col}, booleans=False)
                            if c.startswith(("neg", "negative"))]

    def _offer(self, counts: dict, samples: dict, kinds: pa.Array, names: pa.Array, payload) -> None:
        for c in pc.value_counts(kinds).to_pylist():
            kind = c["values"]
            counts[kind] = counts.get(kind, 0) + c["counts"]
            at = np.flatnonzero(np.asarray(pc.equal(kinds, kind).to_numpy(zero_copy_only=False), bool))
            sample = samples.setdefault(kind, Sample(f"{self.seed}/neg/{kind}", N_NEG_PER_KIND))
            sample.offer(names.take(pa.array(at)), lambda p, at=at: payload(at[p]))

    @staticmethod
    def _kinds(values: pa.Array | None, n: int) -> pa.Array:
        if values is None:
            return pa.array(["(none)"] * n, pa.string())
        k = pc.cast(values, pa.string())
        return pc.if_else(pc.fill_null(pc.equal(k, ""), True), "(none)", k)

    def scan_kept(self, batch: pa.Table, rows) -> None:
        uid = batch["uid"].combine_chunks()
        for c, (counts, samples) in self.lists.items():
            if c not in batch.column_names:
                continue
            col = batch[c].combine_chunks()
            flat = pc.list_flatten(col)
            parent = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
            keep = np.asarray(pc.is_valid(flat).to_numpy(zero_copy_only=False), bool)
            if not keep.any():
                continue
            at = np.flatnonzero(keep)
            item = np.arange(len(parent)) - np.searchsorted(parent, parent)  # its place in its row's list
            flat_t = flat.take(pa.array(at))
            names = pc.binary_join_element_wise(uid.take(pa.array(parent[at])), pa.array(item[at].astype(str)), "/")
            kinds = self._kinds(pc.struct_field(flat_t, "kind") if flat.type.get_field_index("kind") >= 0 else None,
                                len(at))

            def payload(p, flat_t=flat_t, parent_of=parent[at]):
                positives = rows(parent_of[p])
                return [self._from_item(item, pos) for item, pos in zip(flat_t.take(pa.array(p)).to_pylist(),
                                                                         positives)]
            self._offer(counts, samples, kinds, names, payload)
        if self.text_col and self.text_col in batch.column_names:
            at = np.flatnonzero(np.asarray(pc.is_valid(batch[self.text_col]).to_numpy(zero_copy_only=False), bool))
            if at.size:
                kinds = self._kinds(batch[self.kind_col].combine_chunks().take(pa.array(at))
                                    if self.kind_col else None, len(at))

                def payload(p, at=at):
                    return [_Neg({k: r[k] for k in ("uid", "text", "_file", "_row") if k in r},
                                 str(r.get(self.kind_col) or "(none)") if self.kind_col else "(none)",
                                 r[self.text_col], scores={c: r.get(c) for c in self.flat_scores})
                            for r in rows(at[p])]
                self._offer(*self.flat, kinds, pc.binary_join_element_wise(uid.take(pa.array(at)), "0", "/"), payload)

    @staticmethod
    def _from_item(item: dict, pos: dict) -> _Neg:
        scores = {k: v for k, v in item.items() if _is_number(v) and k not in ("span_start", "span_end")}
        if isinstance(item.get("method"), str):
            scores["method"] = item["method"]
        edit = (item.get("edit_before"), item.get("edit_after")) if "edit_after" in item else None
        return _Neg({k: pos.get(k) for k in ("uid", "text", "_file", "_row")}, str(item.get("kind") or "(none)"),
                    item.get("text"), scores=scores, edit=edit)

    def finish(self) -> NegativeSet:
        """The layout the build has: a list column with negatives, else a negatives/ set, else a flat column."""
        for c, (counts, samples) in self.lists.items():  # e.g. negatives_text's neg_captions, on kept rows
            if counts:
                return NegativeSet(counts, {k: s.picked() for k, s in samples.items()},
                                   f"the <code>{esc(c)}</code> column of the kept rows")
        d = self.build.dir
        files = part_files(d, "negatives") or sorted((d / "negatives").glob("*.parquet"))
        if files:
            return self._negatives_set(files)
        counts, samples = self.flat
        return NegativeSet(counts, {k: s.picked() for k, s in samples.items()},
                           f"the <code>{esc(self.text_col)}</code> column" if counts else "")

    def _negatives_set(self, files: list[Location]) -> NegativeSet:
        counts: dict[str, int] = {}
        samples: dict[str, Sample] = {}
        image_col = _first(files[0].read_schema().names, NEG_IMAGE)
        for k, f in enumerate(files):
            for start, t in _batches(f):
                names = t.column_names
                text_col, kind_col = _first(names, NEG_TEXT), _first(names, NEG_KIND)
                uid_col, nuid_col = _first(names, ("uid", "pos_uid", "source_uid")), _first(names, NEG_UID)
                cap_col = _first(names, ("text", "caption", "pos_text"))
                score_cols = _score_columns(t.schema, {text_col, kind_col, uid_col, nuid_col, cap_col})
                kinds = self._kinds(t[kind_col].combine_chunks() if kind_col else None, t.num_rows)
                where = pc.binary_join_element_wise(pa.scalar(f"/{k}/"),
                                                    pa.array(np.arange(start, start + t.num_rows).astype(str)), "")
                key = pc.binary_join_element_wise(pc.fill_null(t[uid_col].combine_chunks(), ""), where, "") \
                    if uid_col else where

                def payload(p, t=t, k=k, start=start, cols=(text_col, kind_col, uid_col, nuid_col, cap_col, score_cols),
                            image=bool(image_col)):
                    text_c, kind_c, uid_c, nuid_c, cap_c, scores_c = cols
                    return [_Neg(None, str(row.get(kind_c) or "(none)") if kind_c else "(none)",
                                 row.get(text_c) if text_c else None, caption=row.get(cap_c) if cap_c else None,
                                 scores={c: row[c] for c in scores_c},
                                 image_at=(k, start + r) if image else None,
                                 pos_uid=row.get(uid_c) if uid_c else None, neg_uid=row.get(nuid_c) if nuid_c else None)
                            for r, row in zip(p.tolist(), t.take(pa.array(p)).to_pylist())]
                self._offer(counts, samples, kinds, key, payload)
        return NegativeSet(counts, {k: s.picked() for k, s in samples.items()}, "the <code>negatives/</code> set",
                           image_col, files)


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
    negs = build.aggregates(seed).negatives
    if negs is None or not negs.counts:
        out.append('<p class="empty">No hard negatives in this build: no negative-caption column '
                   '(<code>neg_captions</code>) and no <code>negatives/</code> set (the spec has no negatives stage, '
                   'or it wrote nothing).</p></section>')
        return "".join(out)
    kinds = sorted(negs.counts)
    out.append(f'<p>{sum(negs.counts.values()):,} negatives of {len(kinds)} kinds from {negs.origin}; up to '
               f'{N_NEG_PER_KIND} per kind, seeded.</p><table><tr><th class="l">kind</th><th>negatives</th></tr>')
    for k in kinds:
        c = negs.counts[k]
        out.append(f'<tr data-neg-kind="{esc(k)}" data-count="{c}"><td class="l">{esc(k)}</td><td>{c:,}</td></tr>')
    out.append("</table>")
    chosen = [n for k in kinds for n in negs.picked.get(k, [])]
    images = images_of(build, [r for n in chosen for r in (n.pos, n.image_ref)])
    neg_images: dict[Any, Any] = {}
    if negs.image_col:
        holder = Build(build.dir, {}, {}, {}, negs.files, None)
        neg_images = take_column(holder, [(n.image_at[0], n.image_at[1], n.image_at) for n in chosen
                                          if n.image_at], negs.image_col)
    with_neg_image = bool(negs.image_col) or any(n.image_ref is not None for n in chosen)

    def image(ref: dict | None):
        return images.get((ref["_file"], ref["_row"])) if ref is not None else None

    for k in kinds:
        out.append(f'<h3>kind: {esc(k)}</h3><div class="grid" data-kind="{esc(k)}">')
        for n in negs.picked.get(k, []):
            cap = n.caption if n.caption is not None else ((n.pos or {}).get("text") or "")
            pair = _img_tag(thumbnail_uri(image(n.pos)) if n.pos is not None else None, "image",
                            "image not in build")
            if with_neg_image:
                data = neg_images.get(n.image_at) if n.image_at else image(n.image_ref)
                pair += _img_tag(thumbnail_uri(data), "negative image", "no negative image")
            scores = _kv({c: fmt_value(v) for c, v in n.scores.items()})
            uid = (n.pos or {}).get("uid") or ""
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
    build.aggregates(seed)  # the passes over the rows: every section below reads what they hold
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
        _summary(build), _funnel(build), _rejects(build, reasons), _distributions(build, seed),
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
    shards = part_files(build.dir, "shards")
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
              "ds = load_dataset(\"path/to/this/folder\", split=\"train\")  # image: encoded image bytes", "```", "",
              images_statement(build), "",
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


FORMAT_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WebP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF",
                "other": "another format", "none": "no image"}


def image_formats_text(build: Build) -> str | None:
    """"JPEG 7, PNG 3": the kept images' formats as the writers counted them (None for a build made before)."""
    formats = build.manifest.get("image_formats")
    if formats is None:
        return None
    return ", ".join(f"{FORMAT_NAMES.get(k, k)} {n:,}" for k, n in formats.items()) or "none kept"


def images_statement(build: Build) -> str:
    """What the shards' image bytes are: a corpus's own bytes as listed (curate), or downloads resized and
    re-encoded by ingest as the spec said; with the formats the shards hold."""
    src, ing = build.spec.get("source") or {}, build.spec.get("ingest") or {}
    formats = image_formats_text(build)
    held = f" Formats in the shards: {formats}." if formats else ""
    if src.get("pairs"):
        return ("Images are the corpus's own bytes, as listed: not resized and not re-encoded (width/height are "
                "the images' own)." + held)
    encode = ing.get("encode_format", "jpg")
    if ing.get("resize_mode", "keep_ratio") == "no":
        return f"Images were downloaded, not resized, and re-encoded as {encode}." + held
    return (f"Images were downloaded, resized (image_size={ing.get('image_size', '?')}, resize_mode="
            f"{ing.get('resize_mode', 'keep_ratio')}{', only when bigger' if ing.get('resize_only_if_bigger', True) else ''}"
            f") and re-encoded as {encode}; the originals' sizes are in original_width/original_height." + held)


def known_limits(build: Build, header: dict) -> list[str]:
    params = build.params
    out = ["Captions are web alt text (or the source's captions), not written descriptions: they can be short, "
           "generic or wrong about the image."]
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
