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

decide(table, params, prior=None) runs over every row of the build, in this order, each step over the rows the
earlier steps kept (a rejected row's detail names the row it duplicates, which an earlier step kept):

1. exact      same sha256                                            -> duplicate_exact     "dup of <uid>"
2. url        same normalised URL (and a different image)            -> duplicate_url       "dup of <uid>"
3. near       pHash Hamming distance <= near_hamming between the two images' pHashes, or (near_crops) between
              the pHash of X and a crop pHash of Y where X is the smaller image (a crop has fewer pixels than what
              it was cut from; unknown sizes pass)                  -> duplicate_near
              "dup of <uid> (hamming=H)" or "dup of <uid> (hamming=H, crop hamming=C)" when only a crop matched.
              A crop copy that was scaled up past its original is not matched through the crops.
              Rows are grouped transitively (connected components), so in a chain a-b-c the survivor may be
              further than near_hamming from some members; H is the distance to the survivor.
4. semantic   (only when the table has an `image_emb` column, L2-normalised image embeddings, and params.semantic)
              SemDeDup: k-means over the embeddings (semantic_clusters, 0 = about sqrt(rows)), then within each
              cluster pairs with cosine > 1 - semantic_eps, grouped transitively -> duplicate_semantic
              "dup of <uid> (cosine=0.987)". Pairs split across two k-means clusters are not found (that is
              SemDeDup's approximation). Without the column the step is skipped silently.

Which copy survives, in every step: within a group of duplicates the row with the largest original image
(original_width * original_height) survives; ties go to the larger stored image (image_bytes: at equal size the
less compressed copy), then to the smallest uid. The rule reads only row contents, never row order, so a shuffled
table gives the same survivors (k-means also runs over rows sorted by uid).

Incremental builds: `prior` (columns uid, sha256, phash, url_norm and optionally phash_crops) holds the rows kept
by earlier builds of the source. Prior rows join steps 1-3 and always survive their group; a row of this build
that duplicates one is rejected with the same reason and "dup of <uid> in an earlier build". Prior rows are not
part of this build, so they never appear in the Decision. Prior rows take no part in the semantic step.

Near-duplicate search (near_pairs, distinct_pairs) is exact: it returns every pair within the radius, the same as
brute force. Multi-index hashing with a covering design (the pigeonhole principle generalised): the 64 bits are cut
into B contiguous blocks; a pair within distance k differs in at most k blocks, so for a family of block subsets
that misses every set of k blocks (built greedily and complete by construction, see _greedy_cover) each close pair
agrees exactly on all blocks of at least one subset. Per subset, the masked hashes are multiplicatively hashed,
packed with a window of the hash's own bits and the row index into one uint64 and sorted; rows in equal-key runs
are candidates, dropped on the window bits when those alone differ in more than k places, and the rest verified
with a popcount. Subsets of about log2(n) + 1 bits keep chance candidates near n/8 per subset, so the cost is
about one sort of n uint64 per subset: 62 subsets for k = 6 at n = 1M. Identical hashes are collapsed first.
Connected components (union-find) come from scipy.sparse.csgraph.

flows/engine/global_dedup.py makes the same decisions as a distributed operation over Ray Data, from the pieces
here: the design's blocks (_design_blocks), the search restricted to some masks (distinct_pairs(masks=...)), the
edges from a pool of hash entries (evidence_edges), the survivor rule (resolve_groups) and SemDeDup's k-means,
normalisation and per-cluster pairs.
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import Field

from schemas.records import normalize_url
from schemas.spec import StageParams
from stages.base import Column, DecideContext, Decision, Reason, Resources, Stage, as_text, concat, fixed
from stages.imaging.decode import decode_image, images


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


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label of each of n nodes given undirected edges (i, j) (union-find)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.empty(0, np.int64)
    g = coo_matrix((np.ones(len(i), np.int8), (np.asarray(i, np.int64), np.asarray(j, np.int64))), shape=(n, n))
    return connected_components(g.tocsr(), directed=False)[1].astype(np.int64)


# ------------------------------------------------------------------------------------------------ the stage

def _col(table: pa.Table | None, name: str, n: int, typ: pa.DataType) -> pa.Array:
    if table is None or name not in table.column_names:
        return pa.nulls(n, typ)
    return table.column(name).combine_chunks().cast(typ)


def _int_np(arr: pa.Array, fill: int = 0) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, fill).to_numpy(zero_copy_only=False), dtype=np.int64)


def _codes(values: pa.Array, take: np.ndarray) -> np.ndarray:
    """Dictionary code of each value; -1 for nulls and for nodes where take is false."""
    codes = pc.dictionary_encode(values).indices
    out = _int_np(codes, -1)
    out[~take] = -1
    return out


def row_sizes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(area, image_bytes) of each row, the survivor rule's sizes: the original image's pixels (the stored image's
    when the original size is unknown, 0 when both are) and the stored file's bytes (0 when unknown)."""
    n = table.num_rows
    w = _int_np(_col(table, "original_width", n, pa.int64()), -1)
    h = _int_np(_col(table, "original_height", n, pa.int64()), -1)
    w2 = _int_np(_col(table, "width", n, pa.int64()), 0)
    h2 = _int_np(_col(table, "height", n, pa.int64()), 0)
    area = np.where((w >= 0) & (h >= 0), w * h, w2 * h2)
    return area, _int_np(_col(table, "image_bytes", n, pa.int64()), 0)


def uid_ranks(uid: pa.Array) -> np.ndarray:
    """Rank of each uid in sorted order (the last tie-break of the survivor rule)."""
    ranks = np.empty(len(uid), np.int64)
    ranks[np.asarray(pc.sort_indices(uid))] = np.arange(len(uid))
    return ranks


def resolve_groups(labels: np.ndarray, uid_rank: np.ndarray, is_prior: np.ndarray, area: np.ndarray,
                   nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(losers, their survivors) for groups given by labels (-1: not grouped). In each group the survivor is a prior
    row if there is one, then the largest area, the larger file, the smallest uid; prior rows never lose."""
    idx = np.flatnonzero(labels >= 0)
    if not idx.size:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    o = np.lexsort((uid_rank[idx], -nbytes[idx], -area[idx], ~is_prior[idx], labels[idx]))
    s = idx[o]
    lab = labels[s]
    first = np.r_[True, lab[1:] != lab[:-1]]
    surv = s[first][np.cumsum(first) - 1]
    lose = ~first & ~is_prior[s]
    return s[lose], surv[lose]


class _Nodes:
    """The rows of this build (0..n-1) followed by the prior rows (n..n+m-1), with the survivor ranking."""

    def __init__(self, table: pa.Table, prior: pa.Table | None):
        self.n = n = table.num_rows
        self.m = m = prior.num_rows if prior is not None else 0
        uid = pa.concat_arrays([_col(table, "uid", n, pa.string()), _col(prior, "uid", m, pa.string())])
        self.uid = uid
        self.uid_rank = uid_ranks(uid)
        self.is_prior = np.r_[np.zeros(n, bool), np.ones(m, bool)]
        area, nbytes = row_sizes(table)
        self.area = np.r_[area, np.zeros(m, np.int64)]
        self.nbytes = np.r_[nbytes, np.zeros(m, np.int64)]
        self.alive = np.r_[np.ones(n, bool), np.ones(m, bool)]  # prior rows stay alive

    def both(self, table: pa.Table, prior: pa.Table | None, name: str, typ: pa.DataType) -> pa.Array:
        return pa.concat_arrays([_col(table, name, self.n, typ), _col(prior, name, self.m, typ)])

    def resolve(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(losers, their survivors) for groups given by labels (-1: not grouped); losers are rows of this build."""
        return resolve_groups(labels, self.uid_rank, self.is_prior, self.area, self.nbytes)


def evidence_edges(values: np.ndarray, owner: np.ndarray, is_full: np.ndarray, small: np.ndarray,
                   large: np.ndarray, value_pairs, same_value: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate edges (owner pairs, self-loops dropped) from a pool of hash entries.

    Entry e is a full pHash (is_full) or a crop pHash of row owner[e]; small[e] / large[e] are its row's size as
    the smaller / larger image of a pair (unknown: 0 / the largest int). Two entries within k are evidence when
    both are full hashes, or when one is the full hash of X, the other a crop hash of Y, and X is the smaller
    image. value_pairs(uniq) gives the pairs (i, j) of distinct sorted values within k that this pool decides;
    same_value adds the edges between entries of equal values. Per value, the edges go through one full entry (its
    representative: the smallest image), which gives the same connected components as every pair of entries.
    """
    uniq, inv = np.unique(values, return_inverse=True)
    ui, uj = value_pairs(uniq)
    # only entries of values in a pair, or (same_value) of values held by several entries, can make an edge
    relevant = np.zeros(uniq.size, bool)
    relevant[ui] = True
    relevant[uj] = True
    if same_value:
        relevant |= np.bincount(inv, minlength=uniq.size) > 1
    sel = np.flatnonzero(relevant[inv])
    inv, owner, is_full, small, large = inv[sel], owner[sel], is_full[sel], small[sel], large[sel]
    # rep[u]: the owner of the full entry of value u with the smallest image, -1 when u has no full entry
    rep = np.full(uniq.size, -1, np.int64)
    rep_small = np.zeros(uniq.size, np.int64)
    fe = np.flatnonzero(is_full)
    fe = fe[np.lexsort((owner[fe], -small[fe], inv[fe]))]  # per value, the smallest image last
    rep[inv[fe]] = owner[fe]  # the last write per value wins
    rep_small[inv[fe]] = small[fe]
    ce = np.flatnonzero(~is_full)
    edges_i, edges_j, valid = [rep[ui]], [rep[uj]], [(rep[ui] >= 0) & (rep[uj] >= 0)]
    if same_value:
        edges_i += [owner[fe], rep[inv[ce]]]
        edges_j += [rep[inv[fe]], owner[ce]]
        valid += [np.ones(fe.size, bool), (rep[inv[ce]] >= 0) & (rep_small[inv[ce]] < large[ce])]
    # every crop entry of one value against the smallest full image of a value within k
    cu = inv[ce]
    c_order = np.argsort(cu, kind="stable")
    c_start = np.searchsorted(cu[c_order], np.arange(uniq.size + 1))
    for x, y in ((ui, uj), (uj, ui)):
        sel = rep[x] >= 0
        x, y = x[sel], y[sel]
        cnt = c_start[y + 1] - c_start[y]
        members = ce[c_order[_ranges(c_start[y], cnt)]]
        edges_i.append(np.repeat(rep[x], cnt))
        edges_j.append(owner[members])
        valid.append(np.repeat(rep_small[x], cnt) < large[members])
    ok = np.concatenate(valid)
    ei, ej = np.concatenate(edges_i)[ok], np.concatenate(edges_j)[ok]
    keep = ei != ej
    return ei[keep], ej[keep]


def near_distances(full: np.ndarray, crops: np.ndarray, crop_ok: np.ndarray, losers: np.ndarray,
                   survivors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pHash distance, closest crop distance in either direction; 64 when no crops) of each loser to its survivor."""
    dist = np.bitwise_count(full[losers] ^ full[survivors]).astype(np.int64)
    xa = np.where(crop_ok[survivors], np.bitwise_count(crops[survivors] ^ full[losers][:, None]), 64).min(1, initial=64)
    xb = np.where(crop_ok[losers], np.bitwise_count(crops[losers] ^ full[survivors][:, None]), 64).min(1, initial=64)
    return dist, np.minimum(xa, xb).astype(np.int64)


def semantic_kmeans(clusters: int):
    """The k-means SemDeDup fits (deterministic: seeded)."""
    from sklearn.cluster import MiniBatchKMeans

    return MiniBatchKMeans(n_clusters=clusters, random_state=0, n_init=3, batch_size=max(1024, 4 * clusters))


def semantic_cluster_count(params: DedupParams, rows: int) -> int:
    return min(params.semantic_clusters or max(1, round(math.sqrt(rows))), rows)


def normalized_embeddings(emb: pa.Array, dim: int) -> np.ndarray:
    """(rows, dim) float32 L2-normalised, from a list array whose entries all have dim values."""
    x = np.array(emb.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(emb), dim)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def cluster_pairs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs i < j of the rows of one cluster (canonical order) with cosine above threshold."""
    out_i, out_j = [], []
    for a in range(0, len(x), 2048):
        sim = x[a:a + 2048] @ x.T
        i, j = np.nonzero(sim > threshold)
        i = i + a
        keep = j > i
        out_i.append(i[keep])
        out_j.append(j[keep])
    return _cat(out_i, np.int64), _cat(out_j, np.int64)


class DedupStage(Stage):
    name = "dedup"
    version = 1
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
        Reason("duplicate_semantic", "image embeddings closer than semantic_eps (SemDeDup)", (), param="semantic_eps"),
    )

    @classmethod
    def decides_globally(cls, params: DedupParams) -> bool:
        return True

    def process_batch(self, batch: pa.Table) -> pa.Table:
        hashes = [pixel_hashes(rgb) for rgb in images(batch)]
        urls = batch.column("url").to_pylist()
        return self.add_columns(batch, {
            "phash": [h[0] for h in hashes],
            "phash_crops": [h[1] for h in hashes],
            "url_norm": [safe_normalize_url(u) for u in urls],
            "image_bytes": _nonzero_length(batch.column("image")),
        })

    @classmethod
    def decide(cls, table: pa.Table, params: DedupParams, ctx: DecideContext | None = None) -> Decision:
        n = table.num_rows
        d = cls.decision(n)
        if n == 0:
            return d
        prior = ctx.prior if ctx is not None else None
        if prior is not None and prior.num_rows == 0:
            prior = None
        nodes = _Nodes(table, prior)

        def reject(losers: np.ndarray, survivors: np.ndarray, reason: str, extra=None) -> None:
            earlier = pa.array(np.where(survivors >= n, " in an earlier build", ""), pa.string())
            parts = ["dup of ", nodes.uid.take(pa.array(survivors, pa.int64())), earlier]
            if extra is not None:
                parts += [" (", extra, ")"]
            d.reject_rows(losers, reason, concat(*parts))
            nodes.alive[losers] = False

        if params.exact:
            sha = nodes.both(table, prior, "sha256", pa.string())
            reject(*nodes.resolve(_codes(sha, nodes.alive.copy())), "duplicate_exact")
        if params.url:
            if "url_norm" in table.column_names:
                url = _col(table, "url_norm", n, pa.string())
            else:
                url = pa.array([safe_normalize_url(u) for u in _col(table, "url", n, pa.string()).to_pylist()],
                               pa.string())
            url = pa.concat_arrays([url, _col(prior, "url_norm", nodes.m, pa.string())])
            reject(*nodes.resolve(_codes(url, nodes.alive.copy())), "duplicate_url")
        if params.near_hamming > 0 and "phash" in table.column_names:
            cls._near(table, prior, params, nodes, reject)
        if params.semantic and "image_emb" in table.column_names:
            cls._semantic(table, params, nodes, reject)
        return d

    # ------------------------------------------------------------------------------------------------ near
    @staticmethod
    def _near(table, prior, params: DedupParams, nodes: _Nodes, reject) -> None:
        k = params.near_hamming
        full_a = nodes.both(table, prior, "phash", pa.int64())
        has = np.asarray(full_a.is_valid()) & nodes.alive
        full = to_unsigned(_int_np(full_a, 0))
        nv = len(CROP_BOXES)
        crops = np.zeros((nodes.n + nodes.m, nv), np.uint64)
        crop_ok = np.zeros((nodes.n + nodes.m, nv), bool)
        if params.near_crops:
            ca = nodes.both(table, prior, "phash_crops", pa.list_(pa.int64()))
            lens = _int_np(pc.list_value_length(ca), 0)
            rows = np.flatnonzero((lens == nv) & has)
            if rows.size:
                vals = ca.take(pa.array(rows)).flatten()
                crops[rows] = to_unsigned(_int_np(vals, 0)).reshape(rows.size, nv)
                crop_ok[rows] = True
        # The pool: every full hash, then every crop hash, each with its owner row. A pair of pool hashes within
        # k is evidence when both are full hashes, or when one is a full hash of X, the other a crop hash of Y
        # and X is the smaller image (a crop is smaller than what it was cut from; unknown sizes pass).
        fr = np.flatnonzero(has)
        if fr.size < 2:
            return
        cr, cv = np.nonzero(crop_ok)
        owner = np.r_[fr, cr]
        small = np.where(nodes.area > 0, nodes.area, 0)  # X's size (unknown: smallest)
        large = np.where(nodes.area > 0, nodes.area, np.iinfo(np.int64).max)  # Y's size (unknown: largest)
        ei, ej = evidence_edges(np.r_[full[fr], crops[cr, cv]], owner,
                                np.r_[np.ones(fr.size, bool), np.zeros(cr.size, bool)], small[owner], large[owner],
                                lambda uniq: distinct_pairs(uniq, k)[:2])
        labels = components(nodes.n + nodes.m, ei, ej)
        grouped = np.zeros(nodes.n + nodes.m, bool)
        grouped[ei] = True
        grouped[ej] = True
        labels[~grouped] = -1
        losers, survivors = nodes.resolve(labels)
        dist, crop = near_distances(full, crops, crop_ok, losers, survivors)
        hamming = concat("hamming=", as_text(pa.array(dist)))
        via_crop = (dist > k) & (crop <= dist)
        extra = pc.if_else(pa.array(via_crop), concat(hamming, ", crop hamming=", as_text(pa.array(crop))), hamming)
        reject(losers, survivors, "duplicate_near", extra)

    # -------------------------------------------------------------------------------------------- semantic
    @staticmethod
    def _semantic(table, params: DedupParams, nodes: _Nodes, reject) -> None:
        n = nodes.n
        emb = table.column("image_emb").combine_chunks()
        valid = np.asarray(emb.is_valid()) & nodes.alive[:n]
        lens = _int_np(pc.list_value_length(emb), 0)
        rows = np.flatnonzero(valid & (lens > 0))
        if rows.size < 2:
            return
        dim = int(np.bincount(lens[rows]).argmax())
        rows = rows[lens[rows] == dim]
        rows = rows[np.argsort(nodes.uid_rank[rows])]  # canonical order: k-means does not see row order
        x = normalized_embeddings(emb.take(pa.array(rows)), dim)
        c = semantic_cluster_count(params, rows.size)
        lab = semantic_kmeans(c).fit_predict(x) if c > 1 else np.zeros(rows.size, np.int64)
        thr = 1.0 - params.semantic_eps
        ei, ej = [], []
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], np.arange(c + 1))
        for g in range(c):
            mem = order[bounds[g]:bounds[g + 1]]
            i, j = cluster_pairs(x[mem], thr)
            ei.append(mem[i])
            ej.append(mem[j])
        ei, ej = np.concatenate(ei), np.concatenate(ej)
        if not ei.size:
            return
        lab_local = components(rows.size, ei, ej)
        grouped = np.zeros(rows.size, bool)
        grouped[ei] = True
        grouped[ej] = True
        labels = np.full(nodes.n + nodes.m, -1, np.int64)
        labels[rows[grouped]] = lab_local[grouped]
        losers, survivors = nodes.resolve(labels)
        pos = np.empty(n, np.int64)
        pos[rows] = np.arange(rows.size)
        cos = np.einsum("ij,ij->i", x[pos[losers]], x[pos[survivors]])
        reject(losers, survivors, "duplicate_semantic", concat("cosine=", fixed(pa.array(cos), 3)))


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c)."""
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64)
    offs = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + (np.arange(total) - offs)


# The distributed dedup (flows/engine/global_dedup.py) runs these helpers too: their public names.
covering_blocks, covering_design, block_masks, plan_bits = _design_blocks, _design, _block_masks, _plan_bits
column_or_nulls, int_array, dictionary_codes = _col, _int_np, _codes
