"""The near-duplicate search (stages.hashing.near): pairs with a full-hash side equal brute force, in one process
and across the distributed plan's partitions."""
from __future__ import annotations

import numpy as np
import pytest

import stages.hashing.near as near
from stages.hashing.near import NearPlan, brute_pairs, distinct_pairs, distinct_values, near_pairs


def _flips(rng, count: int, bits: int) -> np.ndarray:
    """`count` masks of up to `bits` set bits."""
    out = np.zeros(count, np.uint64)
    for _ in range(bits):
        out |= np.uint64(1) << rng.integers(0, 64, count).astype(np.uint64)
    return out


def _pool(rows: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A dedup pool: each row's full pHash, then 9 crop pHashes for 2 rows in 3 (a few bits from the row's own, as
    real ones are: benchmarks/scale.py). Planted: copies of a row's full hash at 0..k+1 flipped bits, repeated
    values, and crops within 0..k+1 bits of another row's full hash."""
    rng = np.random.default_rng(seed)
    full = rng.integers(0, 2**64, rows, dtype=np.uint64)
    m = max(2, rows // 20)
    src, dst = rng.integers(0, rows, m), rng.integers(0, rows, m)
    full[dst] = full[src] ^ _flips(rng, m, k)
    full[dst[: m // 3]] ^= np.uint64(1) << rng.integers(0, 64, m // 3).astype(np.uint64)  # some at k + 1
    full[rng.integers(0, rows, m)] = full[rng.integers(0, rows, m)]  # repeats
    with_crops = np.flatnonzero(rng.random(rows) < 2 / 3)
    crops = (full[with_crops] ^ _flips(rng, with_crops.size, 6))[:, None] ^ _flips(rng, 9 * with_crops.size, 4
                                                                                   ).reshape(-1, 9)
    other = rng.integers(0, rows, with_crops.size // 5)  # a crop near another row's full hash: within k, or k + 1
    crops[: other.size, 0] = full[other] ^ _flips(rng, other.size, k)
    crops[: other.size // 2, 0] ^= np.uint64(1) << rng.integers(0, 64, other.size // 2).astype(np.uint64)
    values = np.r_[full, crops.ravel()]
    return values, np.r_[np.ones(rows, bool), np.zeros(crops.size, bool)]


@pytest.fixture
def kernel_only(monkeypatch):
    """Brute force priced out, and parts of at most 64 full values: the kernels, with many parts, at any size."""
    monkeypatch.setattr(near, "_BRUTE_S", 1.0)
    monkeypatch.setattr(near, "_BRUTE_ALWAYS_S", 0.0)
    monkeypatch.setattr(near, "PART_FULLS", 64)


def _same(got, ref) -> None:
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("rows", "k"), [(300, 0), (300, 1), (2000, 1), (2000, 6), (4000, 6), (2000, 12)])
def test_pairs_with_a_full_side_equal_brute_force(kernel_only, rows, k):
    values, is_full = _pool(rows, k, seed=rows + k)
    uniq, has_full, inv = distinct_values(values, is_full)
    np.testing.assert_array_equal(uniq[inv], values)
    assert uniq.size == np.unique(values).size
    assert has_full.sum() == np.unique(values[is_full]).size and has_full[inv[is_full]].all()
    got = distinct_pairs(uniq, k, has_full)
    ref = brute_pairs(uniq, k, has_full)
    _same(got, ref)
    if k:  # the planted pairs are there: full-full and full-crop
        both = has_full[got[0]] & has_full[got[1]]
        assert both.any() and not both.all()


def test_clustered_hashes(kernel_only):
    """Values that share most bits: buckets far longer than one window of candidates, and more pairs than the
    output buffers first hold (they grow, and the search resumes where it stopped)."""
    rng = np.random.default_rng(5)
    base = np.uint64(0xF0F0F0F0F0F0F0F0)
    uniq, _, _ = distinct_values(base ^ (rng.integers(0, 2**12, 3000, dtype=np.uint64) << np.uint64(20)))
    has_full = rng.random(uniq.size) < 0.5
    got = distinct_pairs(uniq, 4, has_full)
    assert got[0].size > 100_000
    _same(got, brute_pairs(uniq, 4, has_full))


def test_brute_force_path_and_edge_cases():
    values, is_full = _pool(200, 6, seed=1)
    uniq, has_full, _ = distinct_values(values, is_full)
    _same(distinct_pairs(uniq, 6, has_full), brute_pairs(uniq, 6, has_full))  # small: brute force in numba
    assert distinct_pairs(uniq, 6, np.zeros(uniq.size, bool))[0].size == 0  # no full value, no pair
    assert distinct_pairs(uniq[:1], 6)[0].size == 0 and distinct_pairs(uniq[:0], 6)[0].size == 0
    _same(distinct_pairs(uniq.view(np.int64), 6, has_full), distinct_pairs(uniq, 6, has_full))  # int64 bit patterns
    with pytest.raises(ValueError, match="radius"):
        distinct_pairs(uniq, 64)
    with pytest.raises(ValueError, match="one flag per value"):
        distinct_pairs(uniq, 6, has_full[:-1])


@pytest.mark.parametrize("k", [1, 6, 12])
def test_each_pair_found_once_across_the_partitions(kernel_only, k):
    values, is_full = _pool(2000, k, seed=k)
    uniq, has_full, _ = distinct_values(values, is_full)
    plan = NearPlan.make(k, values.size, int(is_full.sum()), per_partition=1000)
    assert plan.groups == k + 1 and plan.partitions > plan.groups
    # every mask holds its group's shared block, so a pair's values meet in one partition of each of its groups
    for g in range(plan.groups):
        assert ((plan.masks[plan.mask_group == g] & np.uint64(plan.anchors[g])) == plan.anchors[g]).all()
    found = []
    for g in range(plan.groups):
        part = plan.partition(uniq, g)
        assert (plan.group_of(part) == g).all()
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            i, j, d = plan.pairs(uniq[sel], has_full[sel], g)
            found.append(np.c_[np.minimum(sel[i], sel[j]), np.maximum(sel[i], sel[j]), d])
    got = np.concatenate(found)
    got = got[np.lexsort((got[:, 1], got[:, 0]))]
    ri, rj, rd = brute_pairs(uniq, k, has_full)
    _same((got[:, 0], got[:, 1], got[:, 2]), (ri, rj, rd))  # the same pairs, none twice
    # a search with some of the masks only: the pairs that agree on one of them, once
    some = plan.masks[plan.mask_group == 0]
    agree = ((uniq[ri] ^ uniq[rj])[:, None] & some[None, :] == 0).any(axis=1)
    _same(distinct_pairs(uniq, k, has_full, masks=some), (ri[agree], rj[agree], rd[agree]))


def test_pairs_among_entries_with_repeats():
    rng = np.random.default_rng(3)
    h = rng.integers(0, 2**64, 2000, dtype=np.uint64)
    h[rng.integers(0, h.size, 300)] = h[rng.integers(0, h.size, 300)]
    h[rng.integers(0, h.size, 40)] = h[7]  # one value held by many entries
    h[rng.integers(0, h.size, 300)] = h[rng.integers(0, h.size, 300)] ^ _flips(rng, 300, 4)
    _same(near_pairs(h, 4), brute_pairs(h, 4))
