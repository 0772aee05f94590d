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
3. near       Shuffle of hash entries by the partitions of the near plan (NearPlan, below): every pair with a
              full-image side within near_hamming bits is found once; evidence is the two images' pHashes within
              near_hamming, or (near_crops) the pHash of X and a crop pHash of Y where X is the smaller image (a crop
              has fewer pixels than what it was cut from; unknown sizes pass; crop-crop pairs are never evidence).
              Survivors: rows are taken best first, and a row is rejected only when it is within near_hamming of a
              row that is kept (never through a chain of rows it may not resemble)         -> duplicate_near
              "dup of <uid> (hamming=H)", or "dup of <uid> (hamming=H, crop hamming=C)" when only a crop matched;
              <uid> is that kept row and H, C the distances to it.
4. semantic   (rows with an `image_emb`, L2-normalised image embeddings, and params.semantic) SemDeDup: k-means
              fitted on a uid-hash sample of SEMANTIC_SAMPLE rows (every row of smaller builds; semantic_clusters,
              0 = about sqrt(rows)), each row assigned its cluster; in each cluster rows are taken best first and a
              row is rejected when its cosine to a kept row exceeds 1 - semantic_eps      -> duplicate_semantic
              "dup of <uid> (cosine=0.987)". Pairs split across two clusters are not found (SemDeDup's
              approximation). Rows without an embedding take no part.

Which copy survives, in every step: the row of an earlier build, then the largest original image
(original_width * original_height), then the larger stored image (image_bytes: at equal size the less compressed
copy), then the smallest uid. The rule reads only row contents, never row order or partitioning, so every run and
every cluster size gives the same survivors.

Incremental builds: the rows earlier builds of the source kept join steps 1-3 as `prior` rows and always survive; a
row of this build that duplicates one is rejected with the same reason and "dup of <uid> in an earlier build".
Prior rows take no part in the semantic step.

Near-duplicate search (near_pairs, distinct_pairs) is exact: it returns every pair within the radius, the same as
brute force. Multi-index hashing with a covering design (the pigeonhole principle generalised): the 64 bits are cut
into B contiguous blocks; a pair within distance k differs in at most k blocks, so for a family of block subsets
that misses every set of k blocks (built greedily and complete by construction, see _greedy_cover) each close pair
agrees exactly on all blocks of at least one subset. Per subset, the masked hashes are multiplicatively hashed,
packed with a window of the hash's own bits and the row index into one uint64 and sorted; rows in equal-key runs
are candidates, dropped on the window bits when those alone differ in more than k places, and the rest verified
with a popcount. Subsets of about log2(n) + 1 bits keep chance candidates near n/8 per subset, so the cost is
about one sort of n uint64 per subset: 62 subsets for k = 6 at n = 1M. Identical hashes are collapsed first.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

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
from stages.steps import (DECISION_SCHEMA, EDGE_FIELDS, KEY, PRIOR, ROW, Fit, Shuffle, Survivors, decisions, greedy_keep,
                          rank_order, uid_bytes, uid_text, uid_words)


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


def to_unsigned(a) -> np.ndarray:
    """int64 (or uint64) hashes -> uint64 with the same bits."""
    return np.ascontiguousarray(np.asarray(a).astype(np.int64, copy=False).view(np.uint64))


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


# ------------------------------------------------------------------------------------- near-duplicate search

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: x -> x * _MULT is a bijection, its high bits a good bucket hash
_MAX_DESIGN_WORK = 40_000_000  # C(B, s) * C(B, k) cells in the greedy's coverage matrix


def _subsets(b: int, r: int) -> np.ndarray:
    return np.array([sum(1 << i for i in c) for c in itertools.combinations(range(b), r)], dtype=np.int64)


@functools.lru_cache(maxsize=None)
def _greedy_cover(b: int, s: int, k: int) -> tuple[int, ...]:
    """Subsets of s of b blocks such that every set of k blocks misses one of them entirely (greedy set cover).

    Returned as bitmasks over blocks. Complete by construction: the loop ends only when every k-set is covered,
    and a set of fewer than k blocks is covered with any k-superset.
    """
    cand = _subsets(b, s)
    dirty = _subsets(b, k)
    hits = (cand[:, None] & dirty[None, :]) == 0  # hits[c, d]: subset c avoids the dirty blocks d
    packed = np.packbits(hits, axis=1)
    pad = (-packed.shape[1]) % 8
    packed = np.pad(packed, ((0, 0), (0, pad))).view(np.uint64)
    todo = np.pad(np.packbits(np.ones(dirty.size, bool)), (0, pad)).view(np.uint64)
    chosen: list[int] = []
    while todo.any():
        gain = np.bitwise_count(packed & todo).sum(axis=1, dtype=np.int64)
        j = int(np.argmax(gain))
        chosen.append(int(cand[j]))
        todo &= ~packed[j]
    return tuple(chosen)


@functools.lru_cache(maxsize=None)
def _design_blocks(k: int, key_bits: int) -> tuple[int, tuple[int, ...]]:
    """(B, subsets): B contiguous blocks of the 64 bits and subsets of them (bitmasks over blocks) such that any set
    of k blocks misses one subset entirely.

    Among block counts B (k < B <= 16) it takes the subsets of about key_bits bits and keeps the smallest family;
    plain pigeonhole (k + 1 bands, one must match) when no B fits.
    """
    best: tuple[int, tuple[int, ...]] | None = None
    for b in range(k + 1, 17):
        s = max(1, math.ceil(key_bits * b / 64))
        if s > b - k or math.comb(b, s) * math.comb(b, k) > _MAX_DESIGN_WORK:
            continue
        fam = _greedy_cover(b, s, k)
        if best is None or len(fam) < len(best[1]):
            best = (b, fam)
    if best is None:
        best = (k + 1, tuple(1 << i for i in range(k + 1)))
    return best


@functools.lru_cache(maxsize=None)
def _design(k: int, key_bits: int) -> tuple[int, ...]:
    """64-bit masks such that any two hashes within Hamming distance k agree on all bits of at least one mask:
    the subsets of _design_blocks(k, key_bits), in its order, as bit masks."""
    b, fam = _design_blocks(k, key_bits)
    blocks = _block_masks(b)
    return tuple(sum(bm for i, bm in enumerate(blocks) if sub >> i & 1) for sub in fam)


def _block_masks(b: int) -> list[int]:
    edges = [round(i * 64 / b) for i in range(b + 1)]
    return [((1 << (edges[i + 1] - edges[i])) - 1) << edges[i] for i in range(b)]


def _search_cost(masks, m: int) -> float:
    """Estimated seconds of the masked search over m distinct hashes: per mask one sort (about 8 ns a row) plus the
    candidates that share a bucket by chance (about m^2 / 2^(bits + 1), some 15 ns each)."""
    bits = sum(bin(x).count("1") for x in masks) / len(masks)
    return len(masks) * (m * 8e-9 + m * m / 2 ** (bits + 1) * 15e-9)


def _plan_bits(k: int, m: int) -> int:
    """The key size of the cheapest design for m distinct hashes (see _search_cost)."""
    ib = max(1, (m - 1).bit_length())
    return min(range(max(8, ib - 4), min(40, ib + 5)), key=lambda kb: _search_cost(_design(k, kb), m))


def _plan(k: int, m: int) -> tuple[tuple[int, ...], float]:
    """The design for m distinct hashes and its estimated seconds."""
    masks = _design(k, _plan_bits(k, m))
    return masks, _search_cost(masks, m)


def brute_pairs(h, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j with popcount(h[i] ^ h[j]) <= k, by comparing all pairs (a reference for tests)."""
    h = to_unsigned(h)
    out_i, out_j, out_d = [], [], []
    for a in range(0, h.size, chunk):
        d = np.bitwise_count(h[a:a + chunk, None] ^ h[None, :])
        i, j = np.nonzero(d <= k)
        i = i + a
        keep = j > i
        out_i.append(i[keep])
        out_j.append(j[keep])
        out_d.append(d[i[keep] - a, j[keep]])
    return _cat(out_i, np.int64), _cat(out_j, np.int64), _cat(out_d, np.uint8)


def _cat(parts, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)


def distinct_pairs(u: np.ndarray, k: int, masks: tuple[int, ...] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs i < j of distinct uint64 hashes `u` with 0 < popcount(u[i] ^ u[j]) <= k (u need not be sorted).

    Per mask of the covering design one sort of n packed words [hash of the masked bits | X | row], where X is a
    window of the hash's own bits: rows whose masked bits agree end up adjacent, and since two hashes within k
    differ in at most k bits of X too, most candidates are dropped on X without reading their hashes.
    With `masks` given (not a full design), the pairs within k that agree on all bits of one of them, and possibly
    other pairs within k (all of them when comparing all pairs is cheaper).
    """
    u = to_unsigned(u)
    m = u.size
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8))
    if m < 2 or k <= 0:
        return empty
    ib = max(1, (m - 1).bit_length())  # row index bits
    if masks is not None:
        sort_cost = _search_cost(masks, m) if m > 4096 else 0.0
    else:
        masks, sort_cost = _plan(k, m) if m > 4096 else ((), 0.0)
    if m <= 4096 or sort_cost > m * m / 2 * 2e-9:  # all pairs is cheaper
        i, j, d = brute_pairs(u, k)
        keep = d > 0
        return i[keep], j[keep], d[keep]
    mean_bits = sum(bin(x).count("1") for x in masks) / len(masks)
    hb = min(64 - ib - 8, max(24, int(mean_bits) + 4))  # bits of the bucket hash
    xb = 64 - ib - hb  # bits of X
    eq_below = np.uint64(1 << (xb + ib))  # adjacent words with a xor below this share the bucket
    hi = np.uint64(((1 << 64) - 1) ^ (int(eq_below) - 1))
    lo = np.uint64((1 << ib) - 1)
    xmask = np.uint64((1 << xb) - 1)
    ids = np.arange(m, dtype=np.uint64)
    bases: dict[int, np.ndarray] = {}
    out_i, out_j, out_d = [], [], []
    buf = np.empty(m, np.uint64)
    x = np.empty(m - 1, np.uint64)  # xor of sorted neighbours
    same = np.empty(m - 1, bool)
    design = np.array(masks, np.uint64)
    for pass_no, mask in enumerate(masks):
        # X: the window of xb bits overlapping the masked bits least (those agree within a bucket anyway)
        sh = min(range(0, 64 - xb + 1, 4), key=lambda t: (bin(mask & (((1 << xb) - 1) << t)).count("1"), t))
        if sh not in bases:
            bases[sh] = ((u >> np.uint64(sh)) & xmask) << np.uint64(ib) | ids
        np.bitwise_and(u, np.uint64(mask), out=buf)
        np.multiply(buf, _MULT, out=buf)
        np.bitwise_and(buf, hi, out=buf)
        np.bitwise_or(buf, bases[sh], out=buf)
        buf.sort()
        np.bitwise_xor(buf[1:], buf[:-1], out=x)
        np.less(x, eq_below, out=same)
        pos = np.flatnonzero(same)
        off = 1
        while pos.size:
            xo = x[pos] if off == 1 else buf[pos] ^ buf[pos + off]
            near = np.bitwise_count((xo >> np.uint64(ib)) & xmask) <= k
            if near.any():
                c = pos[near]
                a = (buf[c] & lo).astype(np.intp)
                b = (buf[c + off] & lo).astype(np.intp)
                xu = u[a] ^ u[b]
                d = np.bitwise_count(xu)
                # each pair once: in the pass of the first mask it agrees on (a pair sharing a bucket by a
                # collision of the bucket hash, without agreeing on this mask, is found in its own mask's pass)
                ok = (d <= k) & ((xu & design[pass_no]) == 0)
                for earlier in np.array_split(design[:pass_no], max(1, pass_no // 16)) if pass_no else ():
                    if ok.any():
                        ok &= ((xu[:, None] & earlier[None, :]) != 0).all(axis=1)
                if ok.any():
                    a, b = a[ok], b[ok]
                    out_i.append(np.minimum(a, b))
                    out_j.append(np.maximum(a, b))
                    out_d.append(d[ok])
            # the bucket goes on past pos + off when the next adjacent pair shares it too
            pos = pos[pos + off < x.size]
            pos = pos[same[pos + off]]
            off += 1
    if not out_i:
        return empty
    i, j, d = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64), d[order]


def near_pairs(h, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j of hashes (uint64 or int64 bit patterns) within Hamming distance k, with the distance.

    Equal to brute_pairs, order aside (sorted by i, then j).
    """
    h = to_unsigned(h)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8))
    if h.size < 2 or k < 0:
        return empty
    order = np.argsort(h, kind="stable")
    hs = h[order]
    starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
    counts = np.diff(np.r_[starts, h.size])
    ui, uj, ud = distinct_pairs(hs[starts], k)
    out_i, out_j, out_d = [], [], []
    # values held by one row each (nearly all): one pair per value pair
    single = (counts[ui] == 1) & (counts[uj] == 1)
    out_i.append(order[starts[ui[single]]])
    out_j.append(order[starts[uj[single]]])
    out_d.append(ud[single])
    # repeated values: every row of one value with every row of the other, and the rows of a value among themselves
    members = lambda v: order[starts[v]:starts[v] + counts[v]]  # noqa: E731
    for x, y, d in zip(ui[~single].tolist(), uj[~single].tolist(), ud[~single].tolist()):
        mx, my = members(x), members(y)
        out_i.append(np.repeat(mx, my.size))
        out_j.append(np.tile(my, mx.size))
        out_d.append(np.full(mx.size * my.size, d, np.uint8))
    for v in np.flatnonzero(counts > 1).tolist():
        mv = members(v)
        a, b = np.triu_indices(mv.size, 1)
        out_i.append(mv[a])
        out_j.append(mv[b])
        out_d.append(np.zeros(a.size, np.uint8))
    i, j, d = _cat(out_i, np.int64), _cat(out_j, np.int64), _cat(out_d, np.uint8)
    i, j = np.minimum(i, j), np.maximum(i, j)
    o = np.lexsort((j, i))
    return i[o], j[o], d[o]


@dataclass(frozen=True)
class NearPlan:
    """The covering design split into groups of masks that share a block, and the partitions of each group.

    Every hash (full or crop) goes once to each group, to the partition named by (group, some bits of the group's
    shared block): a pair within k agrees on all bits of some mask, so it meets in that mask's group's partition, and
    is kept there only when that mask is the first (in design order) it agrees on: each pair is found once. The plan
    depends only on (k, the number of hashes), so every worker makes the same one."""

    k: int
    masks: np.ndarray  # uint64, the whole design
    mask_group: np.ndarray  # group of each mask
    shifts: tuple[int, ...]  # per group: the lowest bit of its shared block
    subparts: tuple[int, ...]  # per group: partitions (a power of two within the block's values)
    offsets: tuple[int, ...]  # per group: its first partition id

    @classmethod
    @functools.lru_cache(maxsize=64)
    def make(cls, k: int, entries: int, per_partition: int = 2_000_000) -> "NearPlan":
        key_bits = _plan_bits(k, max(entries, 2))
        b, fam = _design_blocks(k, key_bits)
        masks = np.array(_design(k, key_bits), np.uint64)
        blocks = _block_masks(b)
        # a small hitting set of blocks (greedy; k + 1 blocks for these designs, the least possible): every mask
        # holds one of them, and its group is the first such block
        group = np.full(len(fam), -1, np.int64)
        shared: list[int] = []
        while (group < 0).any():
            todo = np.flatnonzero(group < 0)
            best = max(range(b), key=lambda i: (sum(fam[t] >> i & 1 for t in todo), -i))
            group[[t for t in todo if fam[t] >> best & 1]] = len(shared)
            shared.append(best)
        shifts, subparts, offsets = [], [], []
        for g, blk in enumerate(shared):
            # a partition's work is about its entries times its group's masks: split the busier groups finer
            want = entries / per_partition * (group == g).sum() * len(shared) / len(fam)
            width = bin(blocks[blk]).count("1")
            shifts.append((blocks[blk] & -blocks[blk]).bit_length() - 1)
            offsets.append(sum(subparts))
            subparts.append(min(1 << max(0, math.ceil(math.log2(max(1.0, want)))), 1 << width))
        return cls(k, masks, group, tuple(shifts), tuple(subparts), tuple(offsets))

    @property
    def groups(self) -> int:
        return len(self.shifts)

    @property
    def partitions(self) -> int:
        return sum(self.subparts)

    def partition(self, values: np.ndarray, g: int) -> np.ndarray:
        """Partition of each hash in group g: the low bits of the group's shared block."""
        sub = (values >> np.uint64(self.shifts[g])) & np.uint64(self.subparts[g] - 1)
        return sub.astype(np.int64) + self.offsets[g]

    def group_of(self, part: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.array(self.offsets), part, side="right") - 1

    def pairs(self, uniq: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pairs (i < j) of distinct sorted hashes within k whose first agreeing mask is in group g, with distances."""
        ui, uj, ud = distinct_pairs(uniq, self.k, masks=tuple(int(m) for m in self.masks[self.mask_group == g]))
        if not ui.size:
            return ui, uj, ud
        keep = np.empty(ui.size, bool)
        for a in range(0, ui.size, 1 << 16):
            x = uniq[ui[a:a + (1 << 16)]] ^ uniq[uj[a:a + (1 << 16)]]
            first = ((x[:, None] & self.masks[None, :]) == 0).argmax(axis=1)
            keep[a:a + x.size] = self.mask_group[first] == g
        return ui[keep], uj[keep], ud[keep]


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
    return NearPlan.make(params.near_hamming, max(2, state.get("rows", 2)) * (1 + _CROPS * params.near_crops))


def _near_keys(rows: pa.Table, params: DedupParams, state) -> pa.Table:
    """Every pHash (and crop pHash) of the rows, once per mask group of the plan, keyed by its partition."""
    plan = _near_plan(params, state)
    ph = _col(rows, "phash", rows.num_rows, pa.int64())
    has = np.flatnonzero(np.asarray(ph.is_valid()))
    base = pa.table(_survivor_columns(rows)).take(pa.array(has))
    full = to_unsigned(_int_np(ph.take(pa.array(has)), 0))
    owner = np.arange(has.size)
    values, is_full = [full], [np.ones(has.size, bool)]
    if params.near_crops:
        ca = _col(rows, "phash_crops", rows.num_rows, pa.list_(pa.int64())).take(pa.array(has))
        cr = np.flatnonzero(_int_np(pc.list_value_length(ca), 0) == _CROPS)
        values.append(to_unsigned(_int_np(ca.take(pa.array(cr)).flatten(), 0)))
        owner = np.r_[owner, np.repeat(cr, _CROPS)]
        is_full.append(np.zeros(cr.size * _CROPS, bool))
    values, is_full = np.concatenate(values), np.concatenate(is_full)
    entries = base.take(pa.array(owner)).append_column("value", pa.array(values.view(np.int64))).append_column(
        "full", pa.array(is_full)).append_column("own", pa.array(full[owner].view(np.int64)))
    parts = [entries.append_column(KEY, pa.array(plan.partition(values, g).astype(np.uint64)))
             for g in range(plan.groups)]
    return pa.concat_tables(parts)


def _near_group(part: pa.Table, params: DedupParams, state) -> pa.Table:
    """Duplicate edges among the entries of one partition (any number of the plan's partitions): pairs with a
    full-image side within k, in the group of their first agreeing mask. Evidence: both full hashes, or the full
    hash of X and a crop hash of Y where X is the smaller image (a crop has fewer pixels than what it was cut from;
    unknown sizes pass). Rows sharing their full hash are copies of the best of them (alias edges)."""
    plan = _near_plan(params, state)
    out = []
    keys = part.column(KEY).to_numpy()
    for key in np.unique(keys):
        g = int(plan.group_of(np.array([key], np.int64))[0])
        out.append(_near_edges(part.filter(pa.array(keys == key)), plan, g, first_group=g == 0))
    return pa.concat_tables(out) if out else _edge_table({})


def _near_edges(t: pa.Table, plan: NearPlan, g: int, first_group: bool) -> pa.Table:
    value = to_unsigned(t.column("value").to_numpy())
    full = t.column("full").to_numpy(zero_copy_only=False).astype(bool)
    row = t.column(ROW).to_numpy()
    prior = t.column(PRIOR).to_numpy(zero_copy_only=False).astype(bool)
    rank = np.where(prior, np.uint64(np.iinfo(np.uint64).max), t.column("rank").to_numpy())
    hi, lo = uid_words(t.column("uid"))
    area = rank_area(t.column("rank").to_numpy())
    small = np.where(area > 0, area, 0)  # X's size (unknown: smallest)
    large = np.where(area > 0, area, _INT_MAX)  # Y's size (unknown: largest)
    # the representative of each value among its full entries: the best row (rank, then uid); the other full rows
    # of that value are its aliases (hamming 0), found in the first group only
    uniq, inv = np.unique(value, return_inverse=True)
    fe = np.flatnonzero(full)
    fe = fe[np.lexsort((lo[fe], hi[fe], ~rank[fe], inv[fe]))]
    head = np.r_[True, inv[fe][1:] != inv[fe][:-1]] if fe.size else np.empty(0, bool)
    rep = np.full(uniq.size, -1, np.int64)
    rep[inv[fe[head]]] = fe[head]
    ea, eb, via = [], [], []  # entry pairs and whether the evidence is a crop
    if first_group and fe.size:
        alias = fe[~head]
        ea.append(alias)
        eb.append(rep[inv[alias]])
        via.append(np.full(alias.size, 2, np.int8))  # 2: alias
    has_full = rep >= 0
    ui, uj, _ = plan.pairs(uniq, g)
    sel = has_full[ui] | has_full[uj]
    ui, uj = ui[sel], uj[sel]
    # full-full: representative to representative
    ff = has_full[ui] & has_full[uj]
    ea.append(rep[ui[ff]])
    eb.append(rep[uj[ff]])
    via.append(np.zeros(int(ff.sum()), np.int8))
    # full-crop: the representative of one value to every crop entry of the other (and of its own value, once)
    ce = np.flatnonzero(~full)
    c_order = ce[np.argsort(inv[ce], kind="stable")]
    c_start = np.searchsorted(inv[c_order], np.arange(uniq.size + 1))
    pairs_x = [(ui, uj), (uj, ui)] + ([(np.flatnonzero(has_full), np.flatnonzero(has_full))] if first_group else [])
    for x, y in pairs_x:
        s = has_full[x]
        x, y = x[s], y[s]
        cnt = c_start[y + 1] - c_start[y]
        members = c_order[_ranges(c_start[y], cnt)]
        ea.append(np.repeat(rep[x], cnt))
        eb.append(members)
        via.append(np.ones(members.size, np.int8))
    ea, eb, via = np.concatenate(ea), np.concatenate(eb), np.concatenate(via)
    ok = row[ea] != row[eb]
    crop = via == 1
    ok[crop] &= small[ea[crop]] < large[eb[crop]]  # X (the full side) is the smaller image
    ea, eb, via = ea[ok], eb[ok], via[ok]
    own = to_unsigned(t.column("own").to_numpy())
    dist = np.bitwise_count(own[ea] ^ own[eb]).astype(np.int64)
    crop_dist = np.where(via == 1, np.bitwise_count(value[ea] ^ value[eb]), 64).astype(np.int64)
    weight = np.where(via == 1, 100 + crop_dist, dist)
    return _edge_table({"a": row[ea], "b": row[eb], "a_rank": t.column("rank").to_numpy()[ea],
                        "b_rank": t.column("rank").to_numpy()[eb], "a_uid": t.column("uid").take(pa.array(ea)),
                        "b_uid": t.column("uid").take(pa.array(eb)), "weight": weight, "alias": via == 2,
                        "hamming": dist, "crop_hamming": crop_dist})


_NEAR_EDGE_SCHEMA = pa.schema(EDGE_FIELDS + [pa.field("weight", pa.int64()), pa.field("alias", pa.bool_()),
                                             pa.field("hamming", pa.int64()), pa.field("crop_hamming", pa.int64())])


def _edge_table(cols: dict) -> pa.Table:
    if not cols:
        return _NEAR_EDGE_SCHEMA.empty_table()
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


def semantic_kmeans(clusters: int):
    """The k-means SemDeDup fits (deterministic: seeded)."""
    from sklearn.cluster import MiniBatchKMeans

    return MiniBatchKMeans(n_clusters=clusters, random_state=0, n_init=3, batch_size=max(1024, 4 * clusters))


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


def _fit_clusters(sample: pa.Table, params: DedupParams):
    """k-means over the sample's embeddings in uid order (semantic_clusters, 0: about sqrt(rows)); None: one cluster."""
    sample = sample.filter(pc.invert(sample.column(PRIOR)))
    sample = sample.take(pc.sort_indices(sample.column("uid")))
    pos, x = _embeddings(sample)
    clusters = min(params.semantic_clusters or max(1, round(math.sqrt(sample.num_rows))), pos.size)
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
            steps.append(Shuffle("near", ("phash", "phash_crops") + _SIZE_READS, _near_keys, _near_group,
                                 Survivors("duplicate_near", _near_detail)))
        if params.semantic:
            steps.append(Fit("semantic_clusters", ("uid", "image_emb"), SEMANTIC_SAMPLE, _fit_clusters,
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


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c)."""
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64)
    offs = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + (np.arange(total) - offs)
