"""dedup: exact, URL, near (pHash) and semantic (SemDeDup) duplicates, decided over the whole build.

process_batch (per row, CPU) writes
    phash        imagehash.phash of the decoded image: 64 bits (first DCT bit most significant) stored as the
                 signed int64 with the same bit pattern; null when the image does not decode.
    phash_crops  the same hash of 9 fixed crops of the image (CROP_BOXES: 1-8 % cut from each side), so that a
                 slightly cropped copy of an image, whose own pHash is typically 8-26 bits away, matches one of
                 the original's crops within a few bits.
    url_norm     schemas.records.normalize_url(url).
    image_bytes  size of the stored image bytes (a survivor tie-break, see below).
and reads the `sha256` that ingest wrote (of the downloaded bytes).

The decision is global: DedupStage.global_steps declares it as steps (stages.steps) that the engine runs over
every row alive before the stage, in one process or distributed, in this order, each over the rows the earlier
steps kept:

1. exact      Shuffle by sha256: in each group of equal bytes the best row is kept -> duplicate_exact "dup of <uid>"
2. url        Shuffle by normalised URL (a different image)                          -> duplicate_url   "dup of <uid>"
3. near       Shuffle of hash entries (partition, value, row id: 18 bytes, in partition order and full hashes
              first within a partition, so the engine cuts them, and the reduce tells full from crop entries,
              without a sort or a pass) by the partitions of the near plan (NearPlan, below): every pair with a
              full-image side within near_hamming bits is found once, as a bare edge (two row ids); the rows
              the edges touch are then read (sizes, uid, pHash) to complete them. Evidence is the two images'
              pHashes within near_hamming, or (near_crops) the pHash of X and a crop pHash of Y where X is the
              smaller image (a crop has fewer pixels than what it was cut from; unknown sizes pass; crop-crop pairs
              are never evidence).
              Survivors: rows are taken best first, and a row is rejected only when it is within near_hamming of a
              row that is kept (never through a chain of rows it may not resemble)         -> duplicate_near
              "dup of <uid> (hamming=H)", or "dup of <uid> (hamming=H, crop hamming=C)" when only a crop matched;
              <uid> is that kept row and H, C the distances to it.
4. semantic   (rows with an `image_emb`, L2-normalised image embeddings, and params.semantic) SemDeDup: k-means
              fitted on a uid-hash sample of SEMANTIC_SAMPLE rows, or SEMANTIC_PER_CLUSTER a cluster if more
              (every row of smaller builds; semantic_clusters, 0 = about sqrt(rows): a row is compared with about
              sqrt(rows) centroids and sqrt(rows) cluster members), each row assigned its cluster; in each
              cluster rows are taken best first and a row is rejected when its cosine to a kept row exceeds
              1 - semantic_eps                                                            -> duplicate_semantic
              "dup of <uid> (cosine=0.987)". Pairs split across two clusters are not found (SemDeDup's
              approximation). Rows without an embedding take no part.

Which copy survives, in every step: the row of an earlier build, then the largest original image
(original_width * original_height), then the larger stored image (image_bytes: at equal size the less compressed
copy), then the smallest uid. The rule reads only row contents, never row order or partitioning, so every run and
every cluster size gives the same survivors.

Incremental builds: the rows earlier builds of the source kept join steps 1-3 as `prior` rows and always survive; a
row of this build that duplicates one is rejected with the same reason and "dup of <uid> in an earlier build".
Prior rows take no part in the semantic step.

The near-duplicate search (stages.hashing.near: the plan NearPlan and its kernels) is exact: every pair of a full
hash and another pool hash (full or crop) within the radius, the same as brute force, over each partition's
distinct values; crop-crop pairs, never evidence, are never searched.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field

from schemas.records import normalize_url
from schemas.spec import StageParams
from stages.base import Column, Reason, Resources, Stage, as_text, concat, fixed
from stages.imaging.decode import decode_image, images
from stages.steps import (DECISION_SCHEMA, EDGE_FIELDS, KEY, PRIOR, ROW, Fit, Shuffle, Survivors, decisions, distinct,
                          greedy_keep, key_runs, rank_order, uid_bytes, uid_text, uid_words)

if TYPE_CHECKING:
    from stages.hashing.near import NearPlan


class DedupParams(StageParams):
    exact: bool = Field(True, description="reject rows whose downloaded bytes (sha256) repeat a kept row")
    url: bool = Field(True, description="reject rows whose normalised URL repeats a kept row")
    near_hamming: int = Field(6, ge=0, le=32, description="pHash Hamming radius of near duplicates; 0 disables")
    near_crops: bool = Field(True, description="also match a pHash against the crop-variant pHashes of other rows")
    semantic: bool = Field(True, description="SemDeDup over image_emb when the table has that column")
    semantic_eps: float = Field(0.05, ge=0.0, lt=1.0, description="duplicates have cosine > 1 - semantic_eps")
    semantic_clusters: int = Field(0, ge=0, description="k-means clusters for SemDeDup; 0 = about sqrt(rows)")

# ----------------------------------------------------------------------------------------------------- hashing

# Per axis (cut at the start, cut at the end) as fractions of the side; the crops are all 9 combinations.
_AXIS_CUTS = ((0.04, 0.04), (0.01, 0.07), (0.07, 0.01))
CROP_BOXES: tuple[tuple[float, float, float, float], ...] = tuple(
    (left, top, right, bottom) for (left, right) in _AXIS_CUTS for (top, bottom) in _AXIS_CUTS)
_CROP_SIDE = 128  # crops are hashed from a copy reduced to about this short side (speed; the full hash is exact)
_SHIFTS = np.arange(63, -1, -1, dtype=np.uint64)
_SIGN = 1 << 63


def to_signed(v: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    return v - (1 << 64) if v >= _SIGN else v


def _hash_pixels(stack: np.ndarray) -> list[int]:
    """imagehash.phash on (m, 32, 32) grey pixel arrays: DCT, 8x8 low frequencies, > median."""
    import scipy.fftpack

    dct = scipy.fftpack.dct(scipy.fftpack.dct(stack, axis=1), axis=2)[:, :8, :8].reshape(len(stack), 64)
    bits = dct > np.median(dct, axis=1, keepdims=True)
    return [to_signed(int(v)) for v in (bits.astype(np.uint64) << _SHIFTS).sum(axis=1, dtype=np.uint64)]


def image_hashes(data: bytes | None) -> tuple[int | None, list[int] | None]:
    """(pHash, crop pHashes) of encoded image bytes as signed int64 values; (None, None) if it does not decode."""
    return pixel_hashes(decode_image(data)[0])


def pixel_hashes(rgb: np.ndarray | None) -> tuple[int | None, list[int] | None]:
    """(pHash, crop pHashes) of HxWx3 RGB pixels as signed int64 values; (None, None) for None.

    The pHash equals imagehash.phash(image) bit for bit.
    """
    if rgb is None:
        return None, None
    grey = Image.fromarray(rgb, "RGB").convert("L")
    w, h = grey.size
    if w < 1 or h < 1:
        return None, None
    full = np.asarray(grey.resize((32, 32), Image.LANCZOS), dtype=np.float64)
    factor = max(1, min(w, h) // _CROP_SIDE)
    small = grey.reduce(factor) if factor > 1 else grey
    sw, sh = small.size
    crops = [np.asarray(small.resize((32, 32), Image.LANCZOS,
                                     box=(l * sw, t * sh, (1 - r) * sw, (1 - b) * sh)), dtype=np.float64)
             for l, t, r, b in CROP_BOXES]
    hashes = _hash_pixels(np.stack([full] + crops))
    return hashes[0], hashes[1:]


def _nonzero_length(data) -> pa.Array:
    """Byte length of each value; null for missing or empty bytes."""
    n = pc.binary_length(data)
    return pc.if_else(pc.greater(n, 0), n, pa.scalar(None, n.type))


def safe_normalize_url(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        return normalize_url(url)
    except ValueError:  # e.g. a port out of range: keep the URL as written
        return url.strip()


# ------------------------------------------------------------------------------------------------ survivors
#
# Which copy survives, in every step: the row of an earlier build (incremental builds), then the largest original
# image, then the larger stored file, then the smallest uid. `size_rank` packs the sizes into one uint64 (larger is
# better); the steps' primitives break its ties by uid.

_SIZE_READS = ("uid", "original_width", "original_height", "width", "height", "image_bytes")


def _col(table: pa.Table | None, name: str, n: int, typ: pa.DataType) -> pa.Array:
    if table is None or name not in table.column_names:
        return pa.nulls(n, typ)
    return table.column(name).combine_chunks().cast(typ)


def _int_np(arr: pa.Array, fill: int = 0) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, fill).to_numpy(zero_copy_only=False), dtype=np.int64)


def row_sizes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(area, image_bytes) of each row: the original image's pixels (the stored image's when the original size is
    unknown, 0 when both are) and the stored file's bytes (0 when unknown)."""
    n = table.num_rows
    w = _int_np(_col(table, "original_width", n, pa.int64()), -1)
    h = _int_np(_col(table, "original_height", n, pa.int64()), -1)
    w2 = _int_np(_col(table, "width", n, pa.int64()), 0)
    h2 = _int_np(_col(table, "height", n, pa.int64()), 0)
    area = np.where((w >= 0) & (h >= 0), w * h, w2 * h2)
    return area, _int_np(_col(table, "image_bytes", n, pa.int64()), 0)


def size_rank(table: pa.Table) -> np.ndarray:
    """area (31 bits) above image_bytes (32 bits) as one uint64: larger is better. Prior rows (earlier builds) rank
    above every row of this build (the engine puts them first)."""
    area, nbytes = row_sizes(table)
    return (np.minimum(area, (1 << 31) - 1).astype(np.uint64) << np.uint64(32)) | \
        np.minimum(nbytes, (1 << 32) - 1).astype(np.uint64)


def rank_area(rank: np.ndarray) -> np.ndarray:
    return (rank >> np.uint64(32)).astype(np.int64)


def _survivor_columns(rows: pa.Table) -> dict:
    """The columns every keyed table carries: row, prior, rank, uid (16 bytes)."""
    return {ROW: rows.column(ROW), PRIOR: rows.column(PRIOR), "rank": pa.array(size_rank(rows)),
            "uid": uid_bytes(_col(rows, "uid", rows.num_rows, pa.string()))}


def _dup_detail(keeper_uid: pa.Array, keeper_prior, extra: pa.Array | None = None) -> pa.Array:
    """"dup of <uid>" [+ " in an earlier build"] [+ " (<extra>)"]."""
    where = pc.if_else(pa.array(np.asarray(keeper_prior, bool)), " in an earlier build", "")
    text = concat("dup of ", keeper_uid, where)
    return concat(text, " (", extra, ")") if extra is not None else text


# ------------------------------------------------------------------------------------------------ exact, url

def _hash64(values: pa.Array) -> np.ndarray:
    return pl.Series(values).hash(seed=0).to_numpy()


def _keyed_copies(rows: pa.Table, values: pa.Array) -> pa.Table:
    has = np.asarray(values.is_valid())
    cols = _survivor_columns(rows) | {"value": values}
    t = pa.table(cols).filter(pa.array(has))
    return t.append_column(KEY, pa.array(_hash64(t.column("value").combine_chunks())))


def _exact_keys(rows: pa.Table, params, state) -> pa.Table:
    return _keyed_copies(rows, _col(rows, "sha256", rows.num_rows, pa.string()))


def _url_keys(rows: pa.Table, params, state) -> pa.Table:
    n = rows.num_rows
    url = _col(rows, "url_norm", n, pa.string())
    missing = np.flatnonzero(~np.asarray(url.is_valid()))  # rows hashed without url_norm (prior rows of old builds)
    if missing.size:
        raw = _col(rows, "url", n, pa.string()).take(pa.array(missing)).to_pylist()
        url = pc.replace_with_mask(url, pa.array(~np.asarray(url.is_valid())),
                                   pa.array([safe_normalize_url(u) for u in raw], pa.string()))
    return _keyed_copies(rows, url)


def _copies(part: pa.Table, reason: str) -> pa.Table:
    """In each group of equal values the best row survives; the others are rejected as its copies."""
    if not part.num_rows:
        return DECISION_SCHEMA.empty_table()
    value = pc.dictionary_encode(part.column("value").combine_chunks()).indices.to_numpy()
    prior = np.asarray(part.column(PRIOR).to_numpy(zero_copy_only=False), bool)
    rank = np.where(prior, np.uint64(np.iinfo(np.uint64).max), part.column("rank").to_numpy())
    hi, lo = uid_words(part.column("uid"))
    o = np.lexsort((lo, hi, ~rank, value))
    first = np.r_[True, value[o][1:] != value[o][:-1]]
    keeper = o[first][np.cumsum(first) - 1]
    lose = ~first & ~prior[o]
    losers, keepers = o[lose], keeper[lose]
    detail = _dup_detail(uid_text(part.column("uid").take(pa.array(keepers))), prior[keepers])
    return decisions(part.column(ROW).take(pa.array(losers)), reason, detail)


def _exact_group(part: pa.Table, params, state) -> pa.Table:
    return _copies(part, "duplicate_exact")


def _url_group(part: pa.Table, params, state) -> pa.Table:
    return _copies(part, "duplicate_url")


# ------------------------------------------------------------------------------------------------ near

_CROPS = len(CROP_BOXES)
_INT_MAX = np.iinfo(np.int64).max


def _near_plan(params: DedupParams, state: dict) -> NearPlan:
    from stages.hashing.near import NearPlan  # numba loads on first use: a process that never searches pays nothing

    rows = max(2, state.get("rows", 2))
    return NearPlan.make(params.near_hamming, rows * (1 + _CROPS * params.near_crops), rows)


def _near_space(params: DedupParams, state) -> int:
    return _near_plan(params, state).partitions


def _near_keys(rows: pa.Table, params: DedupParams, state) -> pa.Table:
    """Every pHash (and crop pHash) of the rows, once per mask group of the plan, keyed by its partition there and
    ordered by it, the full hashes first within a partition: only the key, the value and `ref` (row id * 2 + 1 for
    a full hash, * 2 for a crop); the rows' other columns are read for the rows the edges touch only (_near_join)."""
    plan = _near_plan(params, state)
    ph = _col(rows, "phash", rows.num_rows, pa.int64())
    row = rows.column(ROW).to_numpy()
    has = pa.array(np.flatnonzero(np.asarray(ph.is_valid()))) if ph.null_count else None
    if has is not None:
        ph, row = ph.take(has), row[has.to_numpy()]
    values, refs = [_int_np(ph, 0).view(np.uint64)], [row * 2 + 1]
    if params.near_crops:
        ca = _col(rows, "phash_crops", rows.num_rows, pa.list_(pa.int64()))
        if has is not None:
            ca = ca.take(has)
        whole = _int_np(pc.list_value_length(ca), 0) == _CROPS
        if not whole.all():
            ca, row = ca.filter(pa.array(whole)), row[whole]
        values.append(_int_np(pc.list_flatten(ca), 0).view(np.uint64))
        refs.append(np.repeat(row * 2, _CROPS))
    key, value, ref = plan.entries(np.concatenate(values), np.concatenate(refs))
    return pa.table({KEY: key, "value": value.view(np.int64), "ref": ref})


def _near_group(part: pa.Table, params: DedupParams, state) -> pa.Table:
    """Bare duplicate edges among the entries of one partition (any number of the plan's partitions), per mask
    group: pairs with a full-image side within k, in the group of their first agreeing mask (see _near_edges).
    Each map task's entries come ordered by key, full hashes first within a key, so a group's full and crop
    entries are slices of each (no pass over the entries to tell them apart)."""
    plan = _near_plan(params, state)
    group = plan.group_of(np.arange(plan.partitions))
    fulls: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(plan.groups)]
    crops: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(plan.groups)]
    for batch in part.to_batches():
        key = batch.column(KEY).to_numpy()
        value = batch.column("value").to_numpy().view(np.uint64)
        ref = batch.column("ref").to_numpy()
        if key.size > 1 and not (key[1:] >= key[:-1]).all():
            o = np.argsort(key, kind="stable")
            key, value, ref = key[o], value[o], ref[o]
        bounds = key_runs(key, plan.partitions)
        for p in np.flatnonzero(np.diff(bounds)):
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            mid = _fulls_end(ref, lo, hi)
            g = int(group[p])
            fulls[g].append((value[lo:mid], ref[lo:mid]))
            crops[g].append((value[mid:hi], ref[mid:hi]))
    out = [_near_edges(*_joined(fulls[g]), *_joined(crops[g]), plan, g) for g in range(plan.groups) if fulls[g]]
    return pa.concat_tables(out) if out else _BARE_EDGE_SCHEMA.empty_table()


def _fulls_end(ref: np.ndarray, lo: int, hi: int) -> int:
    """The end of the full entries (odd refs) that open ref[lo:hi] (bisection: they come first)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if ref[mid] & 1:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _joined(slices: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(values, row ids) of (value, ref) slices, in one array each."""
    return np.concatenate([v for v, _ in slices]), np.concatenate([r for _, r in slices]) >> 1


_FULL_FULL, _FULL_CROP, _ALIAS = 0, 1, 2  # the evidence of an edge


def _near_edges(full_value: np.ndarray, full_row: np.ndarray, crop_value: np.ndarray, crop_row: np.ndarray,
                plan: NearPlan, g: int) -> pa.Table:
    """The edges of group g's entries. The full values are searched distinct: each stands for its rows by one of
    them (the smallest row id; the join names the best), the other rows of that value are its aliases (hamming 0,
    found in the first group only). Crop entries are searched as they come (no distinct pass: 90% of the entries),
    each against the full values, one equal to a full value included. full-full: representative to
    representative; full-crop: the representative of the full value to the crop entry's row."""
    from stages.hashing.near import distinct_values

    uniq, _, inv = distinct_values(full_value)
    nu = uniq.size
    i, j, d = plan.pairs(uniq, None, g, crops=crop_value)
    # the representative of each distinct full value: its smallest row
    repeats = np.bincount(inv, minlength=nu) > 1
    rep = np.empty(nu, np.int64)
    rep[inv] = full_row
    many = np.flatnonzero(repeats[inv])  # full entries whose value repeats
    many = many[np.lexsort((full_row[many], inv[many]))]
    head = np.r_[True, inv[many][1:] != inv[many][:-1]] if many.size else np.empty(0, bool)
    rep[inv[many[head]]] = full_row[many[head]]
    ff = j < nu  # i < j: j full means both are
    a = [rep[i[ff]], rep[i[~ff]]]
    b = [rep[j[ff]], crop_row[j[~ff] - nu]]
    kind = [np.full(int(ff.sum()), _FULL_FULL, np.int8), np.full(int((~ff).sum()), _FULL_CROP, np.int8)]
    crop_d = [d[ff], d[~ff]]
    if g == 0:
        alias = many[~head]
        a.append(full_row[alias])
        b.append(rep[inv[alias]])
        kind.append(np.full(alias.size, _ALIAS, np.int8))
        crop_d.append(np.zeros(alias.size, np.uint8))
    a, b = np.concatenate(a), np.concatenate(b)
    ok = a != b
    return pa.table({"a": a[ok], "b": b[ok], "kind": np.concatenate(kind)[ok],
                     "crop_hamming": np.concatenate(crop_d)[ok].astype(np.int8)}, schema=_BARE_EDGE_SCHEMA)


_BARE_EDGE_SCHEMA = pa.schema([pa.field("a", pa.int64()), pa.field("b", pa.int64()), pa.field("kind", pa.int8()),
                               pa.field("crop_hamming", pa.int8())])
_NEAR_EDGE_SCHEMA = pa.schema(EDGE_FIELDS + [pa.field("weight", pa.int64()), pa.field("alias", pa.bool_()),
                                             pa.field("hamming", pa.int64()), pa.field("crop_hamming", pa.int64())])


def _near_join(edges: pa.Table, rows: pa.Table, params: DedupParams, state) -> pa.Table:
    """The bare edges completed from the rows they touch: each value's representative becomes its best row (rank,
    then uid; the rows of an earlier build first), the other rows of that value its aliases; a crop edge holds only
    when the full side is the smaller image (a crop has fewer pixels than what it was cut from; unknown sizes pass);
    the full hashes' distance and a weight (of two edges between the same rows, the lighter is named)."""
    rows = rows.take(pc.sort_indices(rows.column(ROW)))
    ids = rows.column(ROW).to_numpy()
    rank = size_rank(rows)
    uid = uid_bytes(rows.column("uid"))
    order = rank_order(np.where(rows.column(PRIOR).to_numpy(zero_copy_only=False).astype(bool),
                                np.uint64(np.iinfo(np.uint64).max), rank), uid)
    kind = edges.column("kind").to_numpy()
    a = np.searchsorted(ids, edges.column("a").to_numpy())
    b = np.searchsorted(ids, edges.column("b").to_numpy())
    # alias classes (rows of one full value, keyed by the representative the partition chose): their best row
    is_alias = kind == _ALIAS
    reps = distinct(b[is_alias])
    member, key = np.r_[a[is_alias], reps], np.r_[b[is_alias], reps]
    o = np.lexsort((order[member], key))
    member, key = member[o], key[o]
    head = np.r_[True, key[1:] != key[:-1]] if key.size else np.empty(0, bool)
    best = np.arange(ids.size)
    best[key[head]] = member[head]
    best_of = member[head][np.cumsum(head) - 1]
    plain = ~is_alias
    a = np.r_[best[a[plain]], member[~head]]
    b = np.r_[np.where(kind[plain] == _FULL_FULL, best[b[plain]], b[plain]), best_of[~head]]
    kind = np.r_[kind[plain], np.full(int((~head).sum()), _ALIAS, np.int8)]
    crop_d = np.r_[edges.column("crop_hamming").to_numpy()[plain], np.zeros(int((~head).sum()), np.int8)].astype(
        np.int64)
    area = rank_area(rank)
    crop = kind == _FULL_CROP
    ok = a != b
    ok[crop] &= np.where(area[a[crop]] > 0, area[a[crop]], 0) < np.where(area[b[crop]] > 0, area[b[crop]], _INT_MAX)
    a, b, kind, crop_d = a[ok], b[ok], kind[ok], crop_d[ok]
    own = _int_np(rows.column("phash"), 0).view(np.uint64)
    dist = np.bitwise_count(own[a] ^ own[b]).astype(np.int64)
    crop_d = np.where(kind == _FULL_CROP, crop_d, 64)
    return _edge_table({"a": ids[a], "b": ids[b], "a_rank": rank[a], "b_rank": rank[b], "a_uid": uid.take(pa.array(a)),
                        "b_uid": uid.take(pa.array(b)), "weight": np.where(kind == _FULL_CROP, 100 + crop_d, dist),
                        "alias": kind == _ALIAS, "hamming": dist, "crop_hamming": crop_d})


def _edge_table(cols: dict) -> pa.Table:
    return pa.table({f.name: pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], (pa.Array, pa.ChunkedArray))
                     else cols[f.name] for f in _NEAR_EDGE_SCHEMA}, schema=_NEAR_EDGE_SCHEMA)


def _near_detail(chosen: pa.Table, params: DedupParams, state) -> pa.Array:
    """"dup of <uid> (hamming=H)", or "(hamming=H, crop hamming=C)" when only a crop matched."""
    h = as_text(chosen.column("hamming"))
    via_crop = pc.greater(chosen.column("hamming"), params.near_hamming)
    extra = pc.if_else(via_crop, concat("hamming=", h, ", crop hamming=", as_text(chosen.column("crop_hamming"))),
                       concat("hamming=", h))
    return _dup_detail(chosen.column("keeper_uid"), chosen.column("keeper_prior").to_numpy(zero_copy_only=False),
                       extra)


# ------------------------------------------------------------------------------------------------ semantic

SEMANTIC_SAMPLE = 100_000  # k-means is fitted on a uid-hash sample of about this many rows (every row below it)
SEMANTIC_PER_CLUSTER = 32  # or of this many rows a cluster, when more


def semantic_cluster_count(params: DedupParams, rows: float) -> int:
    """k-means clusters for a stage that sees about `rows` rows (semantic_clusters, 0: about sqrt(rows))."""
    return params.semantic_clusters or max(1, round(math.sqrt(rows)))


def semantic_sample(params: DedupParams, rows: int) -> int:
    """Rows the k-means is fitted on, for a stage that sees `rows` rows."""
    return max(SEMANTIC_SAMPLE, SEMANTIC_PER_CLUSTER * semantic_cluster_count(params, rows))


def semantic_kmeans(clusters: int):
    """The k-means SemDeDup fits (deterministic: seeded)."""
    from sklearn.cluster import MiniBatchKMeans

    return MiniBatchKMeans(n_clusters=clusters, random_state=0, n_init=3 if clusters <= 512 else 1,  # init: O(k^2)
                           batch_size=max(1024, 4 * clusters))


def normalized_embeddings(emb: pa.Array, dim: int) -> np.ndarray:
    """(rows, dim) float32 L2-normalised, from a list array whose entries all have dim values."""
    x = np.array(emb.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(emb), dim)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _embeddings(rows: pa.Table, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the rows with an embedding of length dim (default: the most common), their embeddings)."""
    emb = _col(rows, "image_emb", rows.num_rows, pa.list_(pa.float32()))
    lens = _int_np(pc.list_value_length(emb), 0)
    ok = np.asarray(emb.is_valid()) & (lens > 0)
    if dim is None:
        dim = int(np.bincount(lens[ok]).argmax()) if ok.any() else 0
    pos = np.flatnonzero(ok & (lens == dim))
    return pos, normalized_embeddings(emb.take(pa.array(pos)), dim) if pos.size else np.empty((0, dim), np.float32)


def _fit_clusters(sample: pa.Table, params: DedupParams, fraction: float):
    """k-means over the sample's embeddings in uid order (semantic_clusters, 0: about sqrt(rows), the rows estimated
    from the sample and the share of them it holds); None: one cluster. The count follows the build, not the sample:
    at a fixed count each row would meet rows / clusters members, a cost quadratic in the build."""
    sample = sample.filter(pc.invert(sample.column(PRIOR)))
    sample = sample.take(pc.sort_indices(sample.column("uid")))
    pos, x = _embeddings(sample)
    clusters = min(semantic_cluster_count(params, sample.num_rows / fraction), pos.size)
    if clusters <= 1:
        return {"dim": x.shape[1], "kmeans": None}
    km = semantic_kmeans(clusters).fit(x)
    del km.labels_  # one per sample row: not needed to predict
    return {"dim": x.shape[1], "kmeans": km}


def _cluster_keys(rows: pa.Table, params: DedupParams, state) -> pa.Table:
    fit = state["semantic_clusters"]
    rows = rows.filter(pc.invert(rows.column(PRIOR)))  # prior rows take no part in the semantic step
    pos, x = _embeddings(rows, fit["dim"])
    cluster = fit["kmeans"].predict(x).astype(np.uint64) if fit["kmeans"] is not None and pos.size \
        else np.zeros(pos.size, np.uint64)
    t = pa.table(_survivor_columns(rows)).take(pa.array(pos))
    return t.append_column("emb", pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
                           if pos.size else pa.array([], pa.list_(pa.float32(), max(1, x.shape[1])))).append_column(
        KEY, pa.array(cluster))


def _cluster_group(part: pa.Table, params: DedupParams, state) -> pa.Table:
    """SemDeDup in each cluster: rows taken best first, a row kept unless within semantic_eps of a kept row."""
    if not part.num_rows:
        return DECISION_SCHEMA.empty_table()
    dim = state["semantic_clusters"]["dim"]
    x = part.column("emb").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    cluster = part.column(KEY).to_numpy()
    order = rank_order(part.column("rank").to_numpy(), part.column("uid"))
    o = np.lexsort((order, cluster))
    bounds = np.flatnonzero(np.r_[True, cluster[o][1:] != cluster[o][:-1], True])
    thr = 1.0 - params.semantic_eps
    ei, ej = [], []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        mem = o[a:b]
        for s in range(0, mem.size, 2048):
            sim = x[mem[s:s + 2048]] @ x[mem].T
            i, j = np.nonzero(sim > thr)
            i = i + s
            keep = j > i
            ei.append(mem[i[keep]])
            ej.append(mem[j[keep]])
    ei = np.concatenate(ei) if ei else np.empty(0, np.int64)
    ej = np.concatenate(ej) if ej else np.empty(0, np.int64)
    kept, by = greedy_keep(order, ei, ej)
    losers = np.flatnonzero(~kept)
    keepers = by[losers]
    cos = np.einsum("ij,ij->i", x[losers], x[keepers]) if losers.size else np.empty(0, np.float32)
    detail = _dup_detail(uid_text(part.column("uid").take(pa.array(keepers))), np.zeros(losers.size, bool),
                         concat("cosine=", fixed(pa.array(cos.astype(np.float64)), 3)))
    return decisions(part.column(ROW).take(pa.array(losers)), "duplicate_semantic", detail)


# ------------------------------------------------------------------------------------------------ the stage

class DedupStage(Stage):
    name = "dedup"
    version = 2  # greedy survivors: a duplicate is rejected only as a copy of a kept row
    summary = "exact, URL, near (pHash with crops) and semantic (SemDeDup) duplicates over the whole build"
    Params = DedupParams
    needs_image = True
    default_resources = Resources(cpus=1.0, batch_size=256)
    columns = (
        Column("phash", pa.int64(), "imagehash.phash of the image, 64 bits as a signed int64; null if undecodable",
               "data"),
        Column("phash_crops", pa.list_(pa.int64()), "pHashes of 9 fixed crops (stages.dedup.CROP_BOXES)", "data"),
        Column("url_norm", pa.string(), "schemas.records.normalize_url(url)", "data"),
        Column("image_bytes", pa.int64(), "size of the stored image; a survivor tie-break"),
    )
    reasons = (
        Reason("duplicate_exact", "the same downloaded bytes (sha256) as a kept row", ("sha256",)),
        Reason("duplicate_url", "the same normalised URL as a kept row", ("url_norm",)),
        Reason("duplicate_near", "a pHash (or a crop's) within near_hamming bits of a kept row's", ("phash",),
               param="near_hamming"),
        Reason("duplicate_semantic", "image embeddings closer than semantic_eps to a kept row's (SemDeDup)", (),
               param="semantic_eps"),
    )

    @classmethod
    def global_steps(cls, params: DedupParams) -> tuple:
        steps = []
        if params.exact:
            steps.append(Shuffle("exact", ("sha256",) + _SIZE_READS, _exact_keys, _exact_group))
        if params.url:
            steps.append(Shuffle("url", ("url_norm", "url") + _SIZE_READS, _url_keys, _url_group))
        if params.near_hamming > 0:
            near_reads = ("phash", "phash_crops") if params.near_crops else ("phash",)
            steps.append(Shuffle("near", near_reads, _near_keys, _near_group,
                                 Survivors("duplicate_near", _near_detail, ("phash",) + _SIZE_READS, _near_join),
                                 key_space=_near_space))
        if params.semantic:
            steps.append(Fit("semantic_clusters", ("uid", "image_emb"), semantic_sample, _fit_clusters,
                             needs=("image_emb",)))
            steps.append(Shuffle("semantic", ("image_emb",) + _SIZE_READS, _cluster_keys, _cluster_group,
                                 needs=("image_emb",)))
        return tuple(steps)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        hashes = [pixel_hashes(rgb) for rgb in images(batch)]
        urls = batch.column("url").to_pylist()
        return self.add_columns(batch, {
            "phash": [h[0] for h in hashes],
            "phash_crops": [h[1] for h in hashes],
            "url_norm": [safe_normalize_url(u) for u in urls],
            "image_bytes": _nonzero_length(batch.column("image")),
        })
