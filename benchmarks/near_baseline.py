"""The near-duplicate search as it was before stages/hashing/near.py (stages/dedup.py at f7a3a3a), kept verbatim
as benchmarks/dedup.py's baseline: every pair of distinct values within k, crop-crop pairs included (the caller
dropped those afterwards), one numpy sort of all values per mask of the covering design. Not used by the build."""
from __future__ import annotations

import numpy as np

from stages.hashing.near import brute_pairs, design, to_unsigned

_MULT = np.uint64(0x9E3779B97F4A7C15)


def _search_cost(masks, m: int) -> float:
    """Estimated seconds of the masked search over m distinct hashes: per mask one sort (about 8 ns a row) plus the
    candidates that share a bucket by chance (about m^2 / 2^(bits + 1), some 15 ns each)."""
    bits = sum(bin(x).count("1") for x in masks) / len(masks)
    return len(masks) * (m * 8e-9 + m * m / 2 ** (bits + 1) * 15e-9)


def _plan_bits(k: int, m: int) -> int:
    """The key size of the cheapest design for m distinct hashes (see _search_cost)."""
    ib = max(1, (m - 1).bit_length())
    return min(range(max(8, ib - 4), min(40, ib + 5)), key=lambda kb: _search_cost(design(k, kb), m))


def _plan(k: int, m: int) -> tuple[tuple[int, ...], float]:
    """The design for m distinct hashes and its estimated seconds."""
    masks = design(k, _plan_bits(k, m))
    return masks, _search_cost(masks, m)


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
