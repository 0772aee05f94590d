"""Exact near-duplicate search over 64-bit hashes: every pair of values within Hamming distance k.

The dedup stage pools each row's pHash (a "full" hash) and its crop pHashes. A pair of pool values within k is
evidence only when one side is some row's full hash (full-full or full-crop; crop-crop never counts), so the search
takes the pool's distinct values with a flag `has_full` and returns only such full-sided pairs, each once:

    distinct_pairs(u, k, has_full) == brute_pairs(u, k, has_full)     (i < j, with the distance d)

Method: multi-index hashing with a covering design (the pigeonhole principle generalised). The 64 bits are cut into
B contiguous blocks; two values within k differ in at most k blocks, so for a family of block subsets that misses
every set of k blocks (design_blocks, greedy and complete by construction) each close pair agrees on every bit of
at least one subset's mask. Per mask, only the full values go into a bucket table (a counting sort by a hash of
their masked bits): the full values are scanned against the rest of their bucket, every other value looks its
bucket up, and candidates are checked LANES at a time with one vector popcount (no branch per candidate). A pair
is kept only in the pass of the FIRST mask (in design order) it agrees on, so it comes out once.

The masks are split into groups that share a block (NearPlan: k + 1 groups for these designs, the fewest that
work: any k blocks miss some mask). All masks of a group hold its shared block, so a group's search can be cut by
the bits of that block into parts that never pair across: the distributed plan sends each value to one partition
per group (NearPlan.partition), each partition searches with its group's masks (NearPlan.pairs), and every pair
is found in exactly one partition, the one of its first agreeing mask's group. The one-process search
(distinct_pairs) runs the same group kernel over every group; inside, the kernel cuts a group further into parts
whose bucket tables stay in the CPU cache. Cost: per mask, one table probe per value that is not full and one
insert and scan per full value (16 to 50 masks for k = 6, by the sizes: search_cost), nothing per crop-crop pair.

Values that several entries share are searched once: distinct_values gives the distinct values of a pool of
entries, their has_full flags and each entry's value (hash tables, no sort). The kernels are numba functions
compiled once per machine into numba's cache (cache=True; benchmarks/dedup.py prints the cold-start cost).

API: distinct_values(values, is_full) -> (uniq, has_full, inverse); distinct_pairs(values, k, has_full=None,
masks=None) -> (i, j, d); NearPlan.make(k, entries, fulls, per_partition) with .masks, .mask_group, .anchors,
.groups, .partitions, .partition(values, g), .entries(values, refs), .group_of(part),
.pairs(values, has_full, g, crops=None) -> (i, j, d);
near_pairs(h, k) (entries with repeats, every pair); brute_pairs(h, k, has_full) (the tests' reference).
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: x -> x * _MULT is a bijection, its high bits a good bucket hash
_ZERO = np.uint64(0)
_MAX_DESIGN_WORK = 40_000_000  # C(B, s) * C(B, k) cells in the greedy's coverage matrix
PART_FULLS = 1 << 14  # full values per part of a group's search: its bucket table stays in the L2 cache
_TABLE_EXTRA_BITS = 0  # a bucket table has 2^this slots per full value, rounded up to a power of two
LANES = 8  # candidates checked at once (one 512-bit vector of uint64)
PROBE_WINDOWS = 3  # windows a crop probe always checks: a bucket holds about 1 to 2 windows of full values
_DISTINCT_PART, _DISTINCT_MAX_PART_BITS = 1 << 14, 10  # distinct_values: entries per hash table, at most 2^10 parts
# CPU seconds on one core (measured with benchmarks/dedup.py on a shared machine; the plan needs their ratios):
# a value that is not full looks up one mask's table (a window of LANES candidates), a full value goes into one
# mask's table and is scanned against its bucket, a value moves to its part (per group), a brute-force comparison.
_PROBE_S, _BUILD_S, _PART_S, _BRUTE_S = 7e-9, 12e-9, 15e-9, 1.7e-9
_BRUTE_ALWAYS_S = 1e-3  # brute force below this, without making a plan


def to_unsigned(a) -> np.ndarray:
    """int64 (or uint64) hashes -> uint64 with the same bits (no copy when they are contiguous already)."""
    a = np.asarray(a)
    if a.dtype != np.uint64:
        a = a.astype(np.int64, copy=False).view(np.uint64)
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------- the covering design


def _subsets(b: int, r: int) -> np.ndarray:
    return np.array([sum(1 << i for i in c) for c in itertools.combinations(range(b), r)], dtype=np.int64)


@functools.cache
def _greedy_cover(b: int, s: int, k: int) -> tuple[int, ...]:
    """Subsets of s of b blocks such that every set of k blocks misses one of them entirely (greedy set cover).

    Returned as bitmasks over blocks. Complete by construction: the loop ends only when every k-set is covered,
    and a set of fewer than k blocks is covered with any k-superset.
    """
    cand = _subsets(b, s)
    dirty = _subsets(b, k)
    small = np.uint16 if b <= 16 else np.int64
    hits = (cand.astype(small)[:, None] & dirty.astype(small)[None, :]) == 0  # subset c avoids the dirty blocks d
    packed = np.packbits(hits, axis=1)
    pad = (-packed.shape[1]) % 8
    packed = np.pad(packed, ((0, 0), (0, pad))).view(np.uint64)
    todo = np.pad(np.packbits(np.ones(dirty.size, bool)), (0, pad)).view(np.uint64)
    # lazy greedy: a subset's gain only falls as sets get covered, so a stale gain bounds the true one; the first
    # subset (lowest index) whose recomputed gain still tops every bound is the eager greedy's choice too
    gain = np.bitwise_count(packed).sum(axis=1, dtype=np.int64)
    chosen: list[int] = []
    while todo.any():
        while True:
            j = int(np.argmax(gain))
            exact = int(np.bitwise_count(packed[j] & todo).sum())
            if exact == gain[j]:
                break
            gain[j] = exact
        chosen.append(int(cand[j]))
        todo &= ~packed[j]
        gain[j] = 0
    return tuple(chosen)


_DESIGNS = Path(__file__).with_name("__pycache__") / "near-designs.json"  # kept like numba's cache: per machine


@functools.cache
def design_blocks(k: int, key_bits: int) -> tuple[int, tuple[int, ...]]:
    """(B, subsets): B contiguous blocks of the 64 bits and subsets of them (bitmasks over blocks) such that any set
    of k blocks misses one subset entirely.

    Among block counts B (k < B <= 16) it takes the subsets of about key_bits bits and keeps the smallest family;
    plain pigeonhole (k + 1 bands, one must match) when no B fits. The greedy takes up to a second, so a worker
    reads the designs made before from _DESIGNS (a cache: any error there just recomputes).
    """
    name = f"{k}/{key_bits}"
    try:
        b, fam = json.loads(_DESIGNS.read_text())[name]
        return b, tuple(fam)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    best = _design_blocks(k, key_bits)
    try:
        known = json.loads(_DESIGNS.read_text()) if _DESIGNS.exists() else {}
        known[name] = [best[0], list(best[1])]
        _DESIGNS.parent.mkdir(exist_ok=True)
        tmp = _DESIGNS.with_name(f"{_DESIGNS.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, _DESIGNS)
    except (OSError, ValueError):
        pass
    return best


def _design_blocks(k: int, key_bits: int) -> tuple[int, tuple[int, ...]]:
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


@functools.cache
def design(k: int, key_bits: int) -> tuple[int, ...]:
    """64-bit masks such that any two hashes within Hamming distance k agree on all bits of at least one mask:
    the subsets of design_blocks(k, key_bits), in its order, as bit masks."""
    b, fam = design_blocks(k, key_bits)
    blocks = block_masks(b)
    return tuple(sum(bm for i, bm in enumerate(blocks) if sub >> i & 1) for sub in fam)


def block_masks(b: int) -> list[int]:
    """The 64 bits cut into b contiguous blocks, as bit masks (lowest bits first)."""
    edges = [round(i * 64 / b) for i in range(b + 1)]
    return [((1 << (edges[i + 1] - edges[i])) - 1) << edges[i] for i in range(b)]


# ------------------------------------------------------------------------------------------------ the plan


def search_cost(masks, values: int, fulls: int | None = None, groups: int = 1) -> float:
    """Estimated CPU seconds of the search with these masks (in `groups` groups) over `values` distinct values of
    which `fulls` are full (default: all): per group the values cut into parts, per mask a table of the full
    values (each scanned against its bucket) and a lookup of each other value. A bucket holds about
    fulls / 2^bits values with the same masked bits, and as many again by table collisions."""
    fulls = values if fulls is None else fulls
    bits = sum(int(x).bit_count() for x in masks) / max(1, len(masks))
    per_bucket = fulls / 2 ** bits + 1
    per_mask = (values - fulls) * _PROBE_S * (1 + per_bucket / LANES) + fulls * _BUILD_S
    return len(masks) * per_mask + groups * values * _PART_S


def brute_cost(values: int, fulls: int | None = None) -> float:
    """Estimated CPU seconds of comparing every full value with every value."""
    fulls = values if fulls is None else fulls
    return fulls * (values - (fulls + 1) / 2) * _BRUTE_S


def plan_bits(k: int, values: int, fulls: int | None = None) -> int:
    """The key size of the cheapest design for this search (see search_cost), among sizes that put a few full
    values in a bucket (about 2^-6 to 2 per masked key)."""
    fulls = values if fulls is None else fulls
    lo = max(8, fulls.bit_length() - 6)
    return min(range(lo, max(lo + 1, min(40, fulls.bit_length() + 2))),
               key=lambda kb: search_cost(design(k, kb), values, fulls, k + 1))


@dataclass(frozen=True)
class NearPlan:
    """A covering design for radius k split into groups of masks that share a block, and the partitions of a
    distributed search (per group, a power of two of them, by the low bits of the group's shared block).

    Every pair within k agrees on some mask; it is found in the partition (of the group of the first mask it agrees
    on) that both its values go to, and nowhere else. make() sizes the partitions; pairs() searches one. A plan
    depends only on make()'s arguments, so every worker that makes one with the same arguments makes the same.
    """

    k: int
    masks: np.ndarray  # uint64, the whole design, in order
    mask_group: np.ndarray  # int64, the group of each mask
    anchors: tuple[int, ...]  # per group: the bit mask of its shared block (every mask of the group holds it)
    shifts: tuple[int, ...]  # per group: the lowest bit of its shared block
    subparts: tuple[int, ...]  # per group: partitions (a power of two within the block's values)
    offsets: tuple[int, ...]  # per group: its first partition id

    @classmethod
    @functools.lru_cache(maxsize=64)
    def make(cls, k: int, entries: int, fulls: int | None = None, per_partition: int = 2_000_000,
             key_bits: int | None = None) -> NearPlan:
        """The plan for `entries` values (or pool entries) of which `fulls` are full hashes (default: all), with
        about `per_partition` entries times masks per partition (a partition of a group with a larger share of
        the masks gets fewer entries). key_bits: the masks' size (default: the cheapest, plan_bits)."""
        if not 0 <= k <= 63:
            raise ValueError(f"Hamming radius must be within 0..63, got {k}")
        entries = max(entries, 2)
        fulls = entries if fulls is None else max(1, fulls)
        key_bits = key_bits or plan_bits(k, entries, fulls)
        b, fam = design_blocks(k, key_bits)
        masks = np.array(design(k, key_bits), np.uint64)
        blocks = block_masks(b)
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
            want = entries / per_partition * (group == g).sum() * len(shared) / len(fam)
            width = blocks[blk].bit_count()
            shifts.append((blocks[blk] & -blocks[blk]).bit_length() - 1)
            offsets.append(sum(subparts))
            subparts.append(min(1 << max(0, math.ceil(math.log2(max(1.0, want)))), 1 << width))
        return cls(k, masks, group, tuple(blocks[blk] for blk in shared), tuple(shifts), tuple(subparts),
                   tuple(offsets))

    @property
    def groups(self) -> int:
        return len(self.shifts)

    @property
    def partitions(self) -> int:
        return sum(self.subparts)

    def partition(self, values: np.ndarray, g: int) -> np.ndarray:
        """Partition id of each value (uint64) in group g: the group's offset plus low bits of its shared block."""
        sub = (to_unsigned(values) >> np.uint64(self.shifts[g])) & np.uint64(self.subparts[g] - 1)
        return sub.astype(np.int64) + self.offsets[g]

    def entries(self, values: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(part, value, ref): each value (with its ref) once per group, at its partition there, ordered by
        partition id and, within a partition, in the values' order (a counting sort: one pass to count, one to
        place)."""
        m = len(values) * self.groups
        out = (np.empty(m, np.uint16 if self.partitions <= 1 << 16 else np.uint32), np.empty(m, np.uint64),
               np.empty(m, np.int64))
        _scatter(to_unsigned(values), np.ascontiguousarray(refs, np.int64), np.array(self.shifts, np.uint64),
                 np.array(self.subparts, np.uint64), np.array(self.offsets, np.int64), *out)
        return out

    def group_of(self, part):
        """The group of a partition id (or of each of an array of them)."""
        return np.searchsorted(np.array(self.offsets), part, side="right") - 1

    def pairs(self, values: np.ndarray, has_full: np.ndarray | None, g: int, crops: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, d): the pairs i < j of distinct values (uint64 or int64 bits) within k, with a full side
        (has_full[i] or has_full[j]; None: every value is full), whose first agreeing mask is in group g.

        The values may be any subset (e.g. one partition of group g): a pair comes out when both its values are
        given and g is its group. Order: unspecified. crops: entries searched against the full values only, as
        indices len(values) + t; they may repeat and may equal a full value (then they pair with it, d = 0, in the
        group of the design's first mask).
        """
        members = np.flatnonzero(self.mask_group == g)
        return _search(to_unsigned(values), _flags(has_full, len(values)), self.k, self.masks, members,
                       self.anchors[g], None if crops is None else to_unsigned(crops))


def _flags(has_full, n: int) -> np.ndarray:
    if has_full is None:
        return np.ones(n, np.bool_)
    has_full = np.ascontiguousarray(has_full, np.bool_)
    if has_full.shape != (n,):
        raise ValueError(f"has_full must have one flag per value ({n}), got shape {has_full.shape}")
    return has_full


def _search(u: np.ndarray, full: np.ndarray, k: int, masks: np.ndarray, members: np.ndarray, anchor: int,
            crops: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The group kernel over masks[members] (their shared bits: anchor), or brute force when that is cheaper.
    crops: entries searched against the full values (indices after u's), one equal to a full value included."""
    zero = crops is not None
    crops = np.empty(0, np.uint64) if crops is None else crops
    n, f = u.size + crops.size, int(np.count_nonzero(full))
    if n < 2 or f == 0 or k <= 0 or not members.size:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    masks = np.ascontiguousarray(masks, np.uint64)
    if brute_cost(n, f) <= search_cost(masks[members], n, f):
        keep = np.zeros(masks.size, np.bool_)
        keep[members] = True
        return _brute_kernel(np.concatenate([u, crops]), np.concatenate([full, np.zeros(crops.size, np.bool_)]), k,
                             masks, keep, zero)
    part_bits = min((-(-f // PART_FULLS) - 1).bit_length(), int(anchor).bit_count())
    where = np.empty(n, np.int32 if n < 2**31 else np.int64)  # each value's position, by part (the kernel's)
    return _group_kernel(u, full, crops, k, masks, members.astype(np.int64), np.uint64(anchor), part_bits, zero,
                         where)


# ---------------------------------------------------------------------------------------------- the search


def distinct_pairs(values, k: int, has_full=None, masks=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, d): every pair i < j of distinct 64-bit values (uint64, or int64 bit patterns) with
    0 < d = popcount(values[i] ^ values[j]) <= k and a full side (has_full[i] or has_full[j]; None: all pairs),
    sorted by i then j; d as uint8. Values that repeat never pair with each other (d > 0).

    masks: a covering design to use (default: the cheapest for these sizes, NearPlan.make); given only a part of
    one, the pairs that agree on all bits of one of these masks, each once.
    """
    u = to_unsigned(values)
    full = _flags(has_full, u.size)
    if not 0 <= k <= 63:
        raise ValueError(f"Hamming radius must be within 0..63, got {k}")
    f = int(np.count_nonzero(full))
    found = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8))]
    if masks is not None:
        m = np.array([int(x) for x in masks], np.uint64)
        anchor = functools.reduce(lambda a, b: a & b, (int(x) for x in m), (1 << 64) - 1) if m.size else 0
        found.append(_search(u, full, k, m, np.arange(m.size), anchor))
    elif u.size > 1 and k > 0:
        plan = NearPlan.make(k, u.size, f) if brute_cost(u.size, f) > _BRUTE_ALWAYS_S else None
        if plan is None or brute_cost(u.size, f) < search_cost(plan.masks, u.size, f, plan.groups):
            found.append(_brute_kernel(u, full, k, np.empty(0, np.uint64), np.empty(0, np.bool_), False))
        else:
            found += [plan.pairs(u, full, g) for g in range(plan.groups)]
    i, j, d = (np.concatenate(x) for x in zip(*found))
    order = np.argsort(i * max(1, u.size) + j, kind="stable") if u.size < 2**31 else np.lexsort((j, i))
    return i[order], j[order], d[order]


def distinct_values(values, is_full=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uniq, has_full, inverse) of a pool of entries: the distinct values (uint64, in an order fixed by the
    values and the entries' order), whether some full entry (is_full; None: all) holds each, and each entry's
    index into uniq (int64). No sort: hash tables that fit the CPU cache."""
    u = to_unsigned(values)
    full = _flags(is_full, u.size)
    return _distinct_kernel(u, full)


def near_pairs(h, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j of hashes (uint64 or int64 bit patterns, repeats allowed) within Hamming distance k, with
    the distance. Equal to brute_pairs, order aside (sorted by i, then j)."""
    h = to_unsigned(h)
    if h.size < 2 or k < 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    uniq, _, inv = distinct_values(h)
    ui, uj, ud = distinct_pairs(uniq, k)
    # the entries of value v: order[starts[v]:starts[v] + counts[v]]
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv, minlength=uniq.size)
    starts = np.cumsum(counts) - counts
    # every entry of one value with every entry of the other
    cy = counts[uj]
    rep = counts[ui] * cy
    t = _within(rep)
    out_i = [order[np.repeat(starts[ui], rep) + t // np.repeat(cy, rep)]]
    out_j = [order[np.repeat(starts[uj], rep) + t % np.repeat(cy, rep)]]
    out_d = [np.repeat(ud, rep)]
    # the entries of one value among themselves: member r with members r + 1 .. c - 1
    c = counts[counts > 1]
    first = np.repeat(starts[counts > 1], c) + _within(c)
    later = np.repeat(np.cumsum(c) - 1, c) - (np.repeat(np.cumsum(c) - c, c) + _within(c))
    out_i.append(order[np.repeat(first, later)])
    out_j.append(order[np.repeat(first + 1, later) + _within(later)])
    out_d.append(np.zeros(int(later.sum()), np.uint8))
    i, j, d = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)
    i, j = np.minimum(i, j), np.maximum(i, j)
    o = np.lexsort((j, i))
    return i[o], j[o], d[o]


def brute_pairs(h, k: int, has_full=None, chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j with popcount(h[i] ^ h[j]) <= k and has_full[i] or has_full[j] (None: every pair), by
    comparing each full value with every value in numpy (the reference for tests), sorted by i then j."""
    h = to_unsigned(h)
    full = _flags(has_full, h.size)
    rows = np.flatnonzero(full)
    out_i, out_j, out_d = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.uint8)]
    for a in range(0, rows.size, chunk):
        d = np.bitwise_count(h[rows[a:a + chunk], None] ^ h[None, :])
        r, j = np.nonzero(d <= k)
        i = rows[a:a + chunk][r]
        keep = (j > i) | ((j < i) & ~full[j])  # a full-full pair once, from its first value
        out_i.append(np.minimum(i, j)[keep])
        out_j.append(np.maximum(i, j)[keep])
        out_d.append(d[r[keep], j[keep]])
    i, j, d = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d).astype(np.uint8)
    o = np.lexsort((j, i))
    return i[o], j[o], d[o]


def _within(counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(c) for each count c."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


# --------------------------------------------------------------------------------------------- the kernels


@intrinsic
def _popcount(typingctx, x):
    """The number of set bits of a uint64 (one instruction)."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@intrinsic
def _window(typingctx, table, start, v, mask, k, count):
    """Bit l (l < LANES) set when l < count and table[start + l] is within k of v and agrees with it on mask.

    One vector load and a few vector operations (AVX-512 where the CPU has it, what LLVM makes of it elsewhere):
    no branch per candidate, so bucket sizes that vary from probe to probe cost no mispredictions. The table
    must hold readable values past the last bucket (as many as the windows read).
    """
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vec = ir.VectorType(i64, LANES)
        ptr = builder.gep(data, [args[1]], inbounds=True)
        y = builder.load(builder.bitcast(ptr, vec.as_pointer()), align=8, typ=vec)

        def splat(x):
            undef = ir.Constant(vec, ir.Undefined)
            lane0 = builder.insert_element(undef, x, ir.Constant(i32, 0))
            return builder.shuffle_vector(lane0, undef, ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))

        x = builder.xor(y, splat(args[2]))
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec]), f"llvm.ctpop.v{LANES}i64")
        near = builder.icmp_unsigned("<=", builder.call(ctpop, [x]), splat(args[4]))
        agree = builder.icmp_unsigned("==", builder.and_(x, splat(args[3])), ir.Constant(vec, [0] * LANES))
        valid = builder.icmp_signed("<", ir.Constant(vec, list(range(LANES))), splat(args[5]))
        hits = builder.and_(builder.and_(near, agree), valid)
        return builder.zext(builder.bitcast(hits, ir.IntType(LANES)), i64)
    return types.uint64(table, types.int64, types.uint64, types.uint64, types.uint64, types.int64), codegen


@njit(cache=True, nogil=True)
def _grow(a, size):
    """A copy of a with room for twice its size (at least size + 1)."""
    out = np.empty(max(2 * a.size, size + 1), a.dtype)
    out[:a.size] = a
    return out


@njit(cache=True, nogil=True)
def _agrees_before(x, masks, stop):
    """Whether x (the xor of a pair) agrees on one of masks[:stop]."""
    for t in range(stop):
        if (x & masks[t]) == _ZERO:
            return True
    return False


@njit(cache=True, nogil=True)
def _emit(hits, w0, q, v, tv, tp, pg, masks, mi, zero, oi, oj, od, cnt):
    """The pairs of value v (at pv position q) with the candidates tv[w0 + l] for the set bits l of hits that
    agree on no mask before masks[mi], into (oi, oj, od) from cnt; equal values only when `zero`. Returns the new
    cnt, or -1 when out of room."""
    lane = 0
    while hits != _ZERO:
        if hits & np.uint64(1):
            w = w0 + lane
            x = v ^ tv[w]
            if (zero or x != _ZERO) and not _agrees_before(x, masks, mi):
                if cnt == oi.size:
                    return -1
                a = pg[q]
                g = pg[tp[w]]
                oi[cnt] = min(a, g)
                oj[cnt] = max(a, g)
                od[cnt] = np.uint8(_popcount(x))
                cnt += 1
        hits >>= np.uint64(1)
        lane += 1
    return cnt


@njit(cache=True, nogil=True)
def _scan_fulls(w, nf, tv, tp, heads, hs, mask, masks, mi, ku, pg, oi, oj, od, cnt):
    """Pairs among the full values of a bucket table: each value (from tv[w] on) against those after it in its
    bucket, in order (no random access). Returns (cnt, nf), or (cnt, where to resume) when the output is full."""
    while w < nf:
        v = tv[w]
        b = np.int64(((v & mask) * _MULT) >> hs)
        c = np.int64(heads[b + 1]) - (w + 1)
        mark = cnt
        off = 0
        while off < c:
            hits = _window(tv, w + 1 + off, v, mask, ku, c - off)
            if hits != _ZERO:
                cnt = _emit(hits, w + 1 + off, tp[w], v, tv, tp, pg, masks, mi, False, oi, oj, od, cnt)
                if cnt < 0:
                    return mark, w
            off += LANES
        w += 1
    return cnt, nf


@njit(cache=True, nogil=True)
def _probe_crops(q, e, pv, pg, tv, tp, heads, hs, mask, masks, mi, ku, zero, oi, oj, od, cnt):
    """Pairs of the crop values pv[q:e] with the full values of the bucket table (a crop value equal to a full
    one too when `zero`). Returns (cnt, e), or (cnt, the value to resume at) when the output is full.

    Every probe checks PROBE_WINDOWS windows whatever its bucket's size, so the loop has no branch that depends on
    it (the CPU overlaps probes); a hit or a larger bucket, both rare, takes the window-by-window path."""
    while q < e:
        v = pv[q]
        b = np.int64(((v & mask) * _MULT) >> hs)
        h0 = np.int64(heads[b])
        c = np.int64(heads[b + 1]) - h0
        hits = _window(tv, h0, v, mask, ku, c)
        for w in range(1, PROBE_WINDOWS):
            hits |= _window(tv, h0 + w * LANES, v, mask, ku, c - w * LANES)
        if hits != _ZERO or c > PROBE_WINDOWS * LANES:
            mark = cnt
            off = 0
            while off < c:
                hits = _window(tv, h0 + off, v, mask, ku, c - off)
                if hits != _ZERO:
                    cnt = _emit(hits, h0 + off, q, v, tv, tp, pg, masks, mi, zero, oi, oj, od, cnt)
                    if cnt < 0:
                        return mark, q
                off += LANES
        q += 1
    return cnt, e


@njit(cache=True, nogil=True)
def _group_kernel(u, full, crops, k, masks, members, anchor, part_bits, zero, pg):
    """Full-sided pairs within k whose first agreeing mask (in masks) is one of masks[members], all of which hold
    the bits of anchor. The values (u, then the crop entries `crops`: index u.size + t) are cut into 2^part_bits
    parts by a hash of their anchor bits (full values first in each part); per part and mask, a bucket table of
    the part's full values (a counting sort by a hash of their masked bits), scanned in order for the full-full
    pairs and probed by the part's other values. pg: room for every index (int32 where the count allows: less to
    move), the values' order by part."""
    nu = u.size
    n = nu + crops.size
    ku = np.uint64(k)
    nparts = 1 << part_bits
    pshift = np.uint64(64 - part_bits) if part_bits > 0 else np.uint64(63)
    nfull = np.zeros(nparts, np.int64)
    nall = np.zeros(nparts, np.int64)
    for i in range(n):
        x = u[i] if i < nu else crops[i - nu]
        p = np.int64(((x & anchor) * _MULT) >> pshift) if part_bits > 0 else 0
        nall[p] += 1
        if i < nu:
            nfull[p] += full[i]
    start = np.zeros(nparts + 1, np.int64)
    for p in range(nparts):
        start[p + 1] = start[p] + nall[p]
    fpos = start[:nparts].copy()  # full values first in each part, then the others
    cpos = start[:nparts] + nfull
    pv = np.empty(n, np.uint64)
    for i in range(n):
        x = u[i] if i < nu else crops[i - nu]
        p = np.int64(((x & anchor) * _MULT) >> pshift) if part_bits > 0 else 0
        if i < nu and full[i]:
            q = fpos[p]
            fpos[p] += 1
        else:
            q = cpos[p]
            cpos[p] += 1
        pv[q] = x
        pg[q] = i
    maxf = 0
    for p in range(nparts):
        maxf = max(maxf, nfull[p])
    tb_max = 1
    while (1 << tb_max) < maxf:
        tb_max += 1
    tb_max = max(1, tb_max + _TABLE_EXTRA_BITS)
    heads = np.empty((1 << tb_max) + 2, np.int32)
    tv = np.zeros(maxf + PROBE_WINDOWS * LANES, np.uint64)  # the part's full values by bucket, and readable values
    # past them for the windows of the last bucket
    tp = np.empty(maxf, pg.dtype)  # their positions in pv
    oi = np.empty(1024, np.int64)
    oj = np.empty(1024, np.int64)
    od = np.empty(1024, np.uint8)
    cnt = 0
    for p in range(nparts):
        s = start[p]
        e = start[p + 1]
        nf = nfull[p]
        if nf == 0 or e - s < 2:
            continue
        tb = 1
        while (1 << tb) < nf:
            tb += 1
        tb = max(1, tb + _TABLE_EXTRA_BITS)
        size = 1 << tb
        hs = np.uint64(64 - tb)
        for mi in members:
            mask = masks[mi]
            # counting sort of the part's full values by bucket: bucket b is tv[heads[b]:heads[b + 1]]
            heads[:size + 2] = 0
            for t in range(s, s + nf):
                heads[np.int64(((pv[t] & mask) * _MULT) >> hs) + 2] += 1
            for b in range(2, size + 2):
                heads[b] += heads[b - 1]
            for t in range(s, s + nf):
                b = np.int64(((pv[t] & mask) * _MULT) >> hs)
                w = heads[b + 1]
                heads[b + 1] = w + 1
                tv[w] = pv[t]
                tp[w] = t
            w = 0
            while w < nf:
                cnt, w = _scan_fulls(w, nf, tv, tp, heads, hs, mask, masks, mi, ku, pg, oi, oj, od, cnt)
                if w < nf:
                    oi, oj, od = _grow(oi, cnt), _grow(oj, cnt), _grow(od, cnt)
            q = s + nf
            while q < e:
                cnt, q = _probe_crops(q, e, pv, pg, tv, tp, heads, hs, mask, masks, mi, ku, zero, oi, oj, od, cnt)
                if q < e:
                    oi, oj, od = _grow(oi, cnt), _grow(oj, cnt), _grow(od, cnt)
    return oi[:cnt].copy(), oj[:cnt].copy(), od[:cnt].copy()


@njit(cache=True, nogil=True)
def _brute_rows(a, u, full, k, masks, keep, zero, oi, oj, od, cnt):
    """_brute_kernel's pairs of the full values u[a:] (with every value after them, or every crop value; a crop
    value equal to a full one too when `zero`), into (oi, oj, od) from cnt. Returns (cnt, n), or (cnt, the row to
    resume at) when the output is full."""
    n = u.size
    while a < n:
        if full[a]:
            mark = cnt
            for c in range(n):
                if c == a or (full[c] and c < a):
                    continue
                x = u[a] ^ u[c]
                d = _popcount(x)
                if d > np.uint64(k) or (x == _ZERO and (full[c] or not zero)):
                    continue
                ok = masks.size == 0
                for t in range(masks.size):
                    if (x & masks[t]) == _ZERO:
                        ok = keep[t]
                        break
                if ok:
                    if cnt == oi.size:
                        return mark, a
                    oi[cnt] = min(a, c)
                    oj[cnt] = max(a, c)
                    od[cnt] = np.uint8(d)
                    cnt += 1
        a += 1
    return cnt, n


@njit(cache=True, nogil=True)
def _brute_kernel(u, full, k, masks, keep, zero):
    """Full-sided pairs within k by comparing every full value with every value; a pair is kept when the first
    mask it agrees on is a kept one (keep: bool per mask; no masks: every pair). zero: see _brute_rows."""
    oi = np.empty(1024, np.int64)
    oj = np.empty(1024, np.int64)
    od = np.empty(1024, np.uint8)
    cnt, a = _brute_rows(0, u, full, k, masks, keep, zero, oi, oj, od, 0)
    while a < u.size:
        oi, oj, od = _grow(oi, cnt), _grow(oj, cnt), _grow(od, cnt)
        cnt, a = _brute_rows(a, u, full, k, masks, keep, zero, oi, oj, od, cnt)
    return oi[:cnt].copy(), oj[:cnt].copy(), od[:cnt].copy()


@njit(cache=True, nogil=True)
def _scatter(u, refs, shifts, subparts, offsets, part, value, ref):
    """NearPlan.entries: every value once per group, placed by its partition (a counting sort) into (part, value,
    ref)."""
    n, groups = u.size, shifts.size
    parts = offsets[-1] + np.int64(subparts[-1])
    count = np.zeros(parts + 1, np.int64)
    for g in range(groups):
        for i in range(n):
            count[np.int64((u[i] >> shifts[g]) & (subparts[g] - np.uint64(1))) + offsets[g] + 1] += 1
    for p in range(parts):
        count[p + 1] += count[p]
    for g in range(groups):
        for i in range(n):
            p = np.int64((u[i] >> shifts[g]) & (subparts[g] - np.uint64(1))) + offsets[g]
            at = count[p]
            count[p] = at + 1
            part[at] = p
            value[at] = u[i]
            ref[at] = refs[i]


@njit(cache=True, nogil=True)
def _distinct_kernel(u, full):
    """(uniq, has_full, inverse): the entries cut into parts by the top bits of a hash of their value (a counting
    sort), then per part a hash table (open addressing) small enough for the CPU cache."""
    n = u.size
    pb = 0
    while pb < _DISTINCT_MAX_PART_BITS and (n >> pb) > _DISTINCT_PART:
        pb += 1
    nparts = 1 << pb
    pshift = np.uint64(64 - pb) if pb > 0 else np.uint64(63)
    start = np.zeros(nparts + 1, np.int64)
    for i in range(n):
        start[(np.int64((u[i] * _MULT) >> pshift) if pb > 0 else 0) + 1] += 1
    largest = 0
    for p in range(nparts):
        largest = max(largest, start[p + 1])
        start[p + 1] += start[p]
    at = start[:nparts].copy()
    order = np.empty(n, np.int64)  # the entries by part: their index, value and flag
    sv = np.empty(n, np.uint64)
    sf = np.empty(n, np.bool_)
    for i in range(n):
        p = np.int64((u[i] * _MULT) >> pshift) if pb > 0 else 0
        order[at[p]] = i
        sv[at[p]] = u[i]
        sf[at[p]] = full[i]
        at[p] += 1
    tb = 1
    while (1 << tb) < 2 * largest:
        tb += 1
    size = 1 << tb
    hs = np.uint64(64 - tb)
    keys = np.empty(size, np.uint64)
    ids = np.empty(size, np.int64)
    uniq = np.empty(n, np.uint64)
    has_full = np.zeros(n, np.bool_)
    inv = np.empty(n, np.int64)
    m = 0
    for p in range(nparts):
        ids[:] = -1
        for t in range(start[p], start[p + 1]):
            v = sv[t]
            b = np.int64(((v * _MULT) << np.uint64(pb)) >> hs)
            while True:
                if ids[b] < 0:
                    keys[b] = v
                    ids[b] = m
                    uniq[m] = v
                    m += 1
                    break
                if keys[b] == v:
                    break
                b = (b + 1) & (size - 1)
            inv[order[t]] = ids[b]
            if sf[t]:
                has_full[ids[b]] = True
    return uniq[:m].copy(), has_full[:m].copy(), inv
