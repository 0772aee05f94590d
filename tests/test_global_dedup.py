"""dedup's global steps: in one process and as Ray tasks, the same decisions; near duplicates only as copies of kept
rows (no chains); the partitioned near search finds every pair once."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stages.dedup import DedupParams, _near_group, _near_keys
from stages.hashing.near import NearPlan, brute_pairs, to_unsigned
from stages.steps import KEY, PRIOR, ROW
from tests.test_dedup import run_dedup

K = 6


def _flip(rng: np.random.Generator, h: int, bits: int) -> int:
    out = (h & (2**64 - 1)) ^ sum(1 << int(b) for b in rng.choice(64, bits, replace=False))
    return out - (1 << 64) if out >= 1 << 63 else out


def metadata(n: int, seed: int, dim: int = 16) -> pa.Table:
    """Rows as dedup's decide sees them, with planted duplicates of every kind and the survivor rule's ties.

    Exact copies (same sha256), URL copies (same url_norm, another image), near copies (pHash 0..k bits away, and
    k + 1 bits away, which are not duplicates), crop copies (a crop pHash of a larger image within k of a smaller
    one's pHash, and the other way round, which must not match), chains, missing hashes and sizes, equal sizes and
    equal files (uid decides), and near-identical image embeddings.
    """
    rng = np.random.default_rng(seed)
    uid = [f"{rng.integers(0, 2**62):016x}{i:016x}" for i in range(n)]
    sha = [f"{v:064x}" for v in rng.integers(0, 2**62, size=n)]
    url = [f"http://site{i % 97}.example.com/img/{i}.jpg" for i in range(n)]
    phash = [int(v) for v in rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)]
    crops = [[int(v) for v in rng.integers(-2**63, 2**63 - 1, size=9, dtype=np.int64)] for _ in range(n)]
    w = rng.integers(50, 400, size=n)
    h = rng.integers(50, 400, size=n)
    ow: list[int | None] = [int(v) for v in w]
    oh: list[int | None] = [int(v) for v in h]
    nbytes: list[int | None] = [int(v) for v in rng.integers(1_000, 90_000, size=n)]
    emb = rng.normal(size=(n, dim))
    slots = iter(rng.permutation(n).tolist())

    def pair():
        return next(slots), next(slots)

    for _ in range(n // 20):  # exact copies, some byte-identical in size too
        a, b = pair()
        sha[b] = sha[a]
        if rng.random() < 0.5:
            ow[b], oh[b], nbytes[b] = ow[a], oh[a], nbytes[a]
    for _ in range(n // 20):  # URL copies
        a, b = pair()
        url[b] = url[a]
    for _ in range(n // 10):  # near copies at 0..k bits, and k + 1
        a, b = pair()
        phash[b] = _flip(rng, phash[a], int(rng.integers(0, K + 2)))
        if rng.random() < 0.3:
            ow[b], oh[b], nbytes[b] = ow[a], oh[a], nbytes[a]
    for _ in range(n // 15):  # crop copies: a crop hash of the larger image near the smaller one's hash
        a, b = pair()
        small, large = (a, b) if w[a] * h[a] < w[b] * h[b] else (b, a)
        if rng.random() < 0.8:
            crops[large][int(rng.integers(0, 9))] = _flip(rng, phash[small], int(rng.integers(0, K + 1)))
        else:  # the wrong way round: the crop belongs to the smaller image, no match through crops
            crops[small][int(rng.integers(0, 9))] = _flip(rng, phash[large], int(rng.integers(0, K + 1)))
    for _ in range(n // 40):  # chains a - b - c
        a, b = pair()
        c = next(slots)
        phash[b] = _flip(rng, phash[a], K)
        phash[c] = _flip(rng, phash[b], K)
    for _ in range(n // 15):  # semantic copies
        a, b = pair()
        emb[b] = emb[a] + rng.normal(size=dim) * 0.02
    for i in rng.choice(n, n // 30, replace=False).tolist():
        phash[i] = None
    for i in rng.choice(n, n // 30, replace=False).tolist():
        crops[i] = None
    for i in rng.choice(n, n // 30, replace=False).tolist():
        ow[i] = oh[i] = None  # falls back to width * height
    for i in rng.choice(n, n // 30, replace=False).tolist():
        nbytes[i] = None
    for i in rng.choice(n, n // 40, replace=False).tolist():
        sha[i] = None
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    flat = pa.array(emb.astype(np.float16).ravel(), pa.float16())
    image_emb = pa.ListArray.from_arrays(pa.array(np.arange(0, emb.size + 1, dim, dtype=np.int32)), flat)
    image_emb = pa.array([None if i % 50 == 7 else v for i, v in enumerate(image_emb.to_pylist())],
                         pa.list_(pa.float16()))
    return pa.table({
        "uid": uid, "url": url, "sha256": sha, "url_norm": url, "phash": pa.array(phash, pa.int64()),
        "phash_crops": pa.array(crops, pa.list_(pa.int64())), "image_bytes": pa.array(nbytes, pa.int64()),
        "original_width": pa.array(ow, pa.int32()), "original_height": pa.array(oh, pa.int32()),
        "width": pa.array(np.minimum(w, 256), pa.int32()), "height": pa.array(np.minimum(h, 256), pa.int32()),
        "image_emb": image_emb,
    })


def prior_rows(table: pa.Table, seed: int) -> pa.Table:
    """Pairs an earlier build kept: copies of some rows' sha256, URL or pHash, and unrelated ones."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(table.num_rows, 40, replace=False)
    t = table.take(pa.array(idx))
    m = t.num_rows
    sha = t.column("sha256").to_pylist()
    url = t.column("url_norm").to_pylist()
    ph = t.column("phash").to_pylist()
    for i in range(m):  # each prior row repeats one key of its source row, the others are its own
        kind = i % 4
        if kind != 0:
            sha[i] = f"{rng.integers(0, 2**62):064x}"
        if kind != 1:
            url[i] = f"http://old.example.org/{i}.jpg"
        if kind == 3 and ph[i] is not None:
            ph[i] = _flip(rng, ph[i], 3)
        elif kind != 2:
            ph[i] = int(rng.integers(-2**63, 2**63 - 1, dtype=np.int64))
    return pa.table({"uid": [f"prior-{i:03d}" for i in range(m)], "sha256": sha, "url_norm": url,
                     "phash": pa.array(ph, pa.int64()), "phash_crops": t.column("phash_crops")})


def _decided(d, table: pa.Table) -> dict:
    return {u: (r, t) for u, r, t in zip(table.column("uid").to_pylist(), d.reason, d.detail) if r is not None}


def test_in_process_and_as_ray_tasks_the_same_decisions(local_ray):
    table = metadata(3000, seed=3)
    prior = prior_rows(table, seed=4)
    ref = _decided(run_dedup(table, DedupParams(), prior), table)
    got = _decided(run_dedup(table, DedupParams(), prior, ray_tasks=True, parts=5), table)
    assert got == ref
    reasons = {r for r, _ in ref.values()}
    assert reasons == {"duplicate_exact", "duplicate_url", "duplicate_near", "duplicate_semantic"}
    assert any("in an earlier build" in t for _, t in ref.values())
    alone = table.slice(0, 1500)  # one source: the touched rows read by a single task
    assert _decided(run_dedup(alone, DedupParams(), ray_tasks=True, parts=3), alone) == \
        _decided(run_dedup(alone, DedupParams()), alone)


def _chains(n: int, k: int, seed: int) -> np.ndarray:
    """Random hashes where most rows sit in long chains, each link 1..k bits from the previous one."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    i = 0
    while i < n - 1:
        length = int(rng.integers(2, 60))
        for j in range(i + 1, min(n, i + length)):
            bits = rng.choice(64, int(rng.integers(1, k + 1)), replace=False)
            h[j] = h[j - 1] ^ np.uint64(sum(1 << int(b) for b in bits))
        i += length
    return h


@pytest.mark.parametrize("n", [500, 5000])
def test_near_duplicates_are_copies_of_kept_rows(n):
    """On long chains: every rejected row is within k of the kept row its detail names, no two kept rows are within k
    of each other, and a row is kept only if no better row within k is kept (the greedy rule)."""
    k = 6
    h = _chains(n, k, seed=n)
    uid = [f"{i:032x}" for i in range(n)]
    area = np.random.default_rng(1).integers(1, 1000, size=n)
    t = pa.table({"uid": uid, "phash": pa.array(h.view(np.int64)), "original_width": pa.array(area, pa.int32()),
                  "original_height": pa.array(np.ones(n), pa.int32())})
    d = run_dedup(t, DedupParams(exact=False, url=False, near_crops=False, semantic=False))
    at = {u: i for i, u in enumerate(uid)}
    kept = np.array([r is None for r in d.reason])
    assert (~kept).sum() > n // 4  # the chains give the rule work to do
    for i in np.flatnonzero(~kept):
        keeper = at[d.detail[i].split()[2]]
        dist = int(np.bitwise_count(h[i] ^ h[keeper]))
        assert kept[keeper] and dist <= k and f"hamming={dist})" in d.detail[i]
    ri, rj, _ = brute_pairs(h, k)
    assert not (kept[ri] & kept[rj]).any()  # the kept rows are independent
    # the greedy rule: best first (larger area, then smaller uid); a row is rejected iff a better kept row is within k
    better = lambda a, b: (area[a], -a) > (area[b], -b)  # noqa: E731
    for a, b in zip(ri.tolist(), rj.tolist()):
        win, lose = (a, b) if better(a, b) else (b, a)
        if kept[win]:
            assert not kept[lose]


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_partitioned_near_search_finds_every_pair_once(k):
    """Every pair within k found in exactly one partition, on distinct hashes with planted pairs."""
    rng = np.random.default_rng(k)
    h = rng.integers(0, 2**64, size=6000, dtype=np.uint64)
    slots = rng.permutation(h.size)
    for t in range(0, 2 * 30 * (k + 2), 2):
        h[slots[t + 1]] = h[slots[t]] ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, t // 60, replace=False)))
    h = np.unique(h)
    n = h.size
    assert NearPlan.make(k, n).groups == k + 1  # the keys: a partition of each mask group
    rows = pa.table({ROW: pa.array(np.arange(n, dtype=np.int64)), PRIOR: pa.array(np.zeros(n, bool)),
                     "uid": [f"{i:032x}" for i in range(n)], "phash": pa.array(h.view(np.int64))})
    params = DedupParams(near_hamming=k, near_crops=False)
    state = {"rows": n}
    entries = _near_keys(rows, params, state)
    keys = entries.column(KEY).to_numpy()
    edges = [_near_group(entries.filter(pa.array(keys == key)), params, state) for key in np.unique(keys)]
    a = np.concatenate([e.column("a").to_numpy() for e in edges])
    b = np.concatenate([e.column("b").to_numpy() for e in edges])
    got = list(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
    ri, rj, _ = brute_pairs(h, k)
    assert len(got) == len(set(got))  # each pair in one partition only
    assert set(got) == set(zip(ri.tolist(), rj.tolist()))
    assert len(got) >= 30 * k
    assert (np.bitwise_count(to_unsigned(h)[a] ^ to_unsigned(h)[b]) <= k).all()


def test_partitioned_near_search_with_crops_finds_every_full_sided_pair():
    """With crop hashes, entries from several map tasks: every pair of a row's pHash with another row's pHash or
    crop pHash within K comes out once (the reduce side tells full from crop entries by their order: full first
    within each partition of each map task), and repeated pHashes stand for their rows by one of them."""
    rng = np.random.default_rng(11)
    n, crops = 3000, 9
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    c = rng.integers(0, 2**64, size=(n, crops), dtype=np.uint64)
    x = rng.permutation(n)
    for t in range(0, 240, 2):  # near pHashes, crops near another row's pHash, crops equal to one
        a, b = x[t], x[t + 1]
        if t < 80:
            h[b] = h[a] ^ np.uint64(sum(1 << int(i) for i in rng.choice(64, t % (K + 1), replace=False)))
        elif t < 160:
            c[b, t % crops] = h[a] ^ np.uint64(1 << int(t % 64))
        else:
            c[b, t % crops] = h[a]
    h[x[300]] = h[x[301]]  # one pHash of two rows (and the pairs planted 0 bits apart)
    rows = pa.table({ROW: pa.array(np.arange(n, dtype=np.int64)), PRIOR: pa.array(np.zeros(n, bool)),
                     "phash": pa.array(h.view(np.int64)),
                     "phash_crops": pa.array([list(r) for r in c.view(np.int64)], pa.list_(pa.int64()))})
    params = DedupParams(near_hamming=K)
    state = {"rows": n}
    maps = [_near_keys(rows.slice(a, 1000), params, state) for a in range(0, n, 1000)]  # three map tasks
    for m in maps:
        key, ref = m.column(KEY).to_numpy(), m.column("ref").to_numpy()
        for k in np.unique(key):
            full = (ref[key == k] & 1).astype(bool)
            assert not (~full[:-1] & full[1:]).any()  # full entries first in every partition
    edges = pa.concat_tables([_near_group(pa.concat_tables([m.filter(pa.array(m.column(KEY).to_numpy() == k))
                                                           for m in maps]), params, state)
                              for k in range(NearPlan.make(K, n * (1 + crops), n).partitions)])
    first = {}
    for i in range(n):  # a repeated pHash stands for its rows by the smallest
        first.setdefault(int(h[i]), i)
    rep = {i: first[int(h[i])] for i in range(n)}
    d_full = np.bitwise_count(h[:, None] ^ h[None, :])
    want = {(rep[int(i)], rep[int(j)], 0) for i, j in zip(*np.nonzero(d_full <= K)) if rep[int(i)] < rep[int(j)]}
    d_crop = np.bitwise_count(h[:, None, None] ^ c[None, :, :]).min(axis=2)
    want |= {(rep[int(i)], int(j), 1) for i, j in zip(*np.nonzero(d_crop <= K)) if rep[int(i)] != j}
    got = [(int(a), int(b), int(k)) for a, b, k in zip(edges.column("a").to_numpy(), edges.column("b").to_numpy(),
                                                       edges.column("kind").to_numpy()) if k != 2]
    got = [(min(a, b), max(a, b), k) if k == 0 else (a, b, k) for a, b, k in got]
    assert len(got) == len(set(got))
    assert set(got) == want
    assert sum(k == 1 for _, _, k in got) >= 80
    alias = edges.filter(pa.array(edges.column("kind").to_numpy() == 2))
    assert sorted(zip(alias.column("a").to_pylist(), alias.column("b").to_pylist())) == sorted(
        (i, r) for i, r in rep.items() if i != r)  # x[300] and x[301] among them


def test_plan_entries_are_each_value_once_per_group_in_partition_order():
    rng = np.random.default_rng(5)
    values = rng.integers(0, 2**64, size=5000, dtype=np.uint64)
    refs = np.arange(values.size, dtype=np.int64) * 2 + 1
    plan = NearPlan.make(6, 400_000, 40_000, per_partition=20_000)
    assert plan.partitions > plan.groups  # some groups cut into several partitions
    part, value, ref = plan.entries(values, refs)
    assert (np.diff(part.astype(np.int64)) >= 0).all()
    expect = sorted((int(plan.partition(values[i:i + 1], g)[0]), int(values[i]), int(refs[i]))
                    for g in range(plan.groups) for i in range(values.size))
    assert sorted(zip(part.tolist(), value.tolist(), ref.tolist())) == expect


@pytest.mark.parametrize("n", [6, 3000])  # brute force inside the search, and the group kernel
def test_crop_entries_search_equals_brute_force(n):
    """Distinct full values against crop entries that repeat, equal a full value or sit near one: every full-sided
    pair within k once over the plan's groups, equal ones (d = 0) included."""
    rng = np.random.default_rng(n)
    fulls = np.unique(rng.integers(0, 2**64, size=n, dtype=np.uint64))
    crops = rng.integers(0, 2**64, size=3 * n, dtype=np.uint64)
    at = rng.choice(fulls.size, size=n // 3)
    crops[: at.size] = fulls[at]  # equal to a full value
    crops[at.size: 2 * at.size] = fulls[at] ^ np.uint64(0b1011)  # 3 bits away
    crops[2 * at.size: 3 * at.size] = crops[: at.size]  # repeats of the equal ones
    values = np.concatenate([fulls, crops])
    plan = NearPlan.make(K, values.size, fulls.size)
    got = [plan.pairs(fulls, None, g, crops=crops) for g in range(plan.groups)]
    i = np.concatenate([x[0] for x in got])
    j = np.concatenate([x[1] for x in got])
    pairs = list(zip(i.tolist(), j.tolist()))
    assert len(pairs) == len(set(pairs))
    d = np.bitwise_count(values[:fulls.size, None] ^ values[None, :])
    fi, vj = np.nonzero(d <= K)
    keep = (vj >= fulls.size) | ((vj > fi) & (d[fi, vj] > 0))  # full-crop (any d), full-full once (d > 0)
    assert set(pairs) == set(zip(fi[keep].tolist(), vj[keep].tolist()))
    assert (d[fi, vj][keep] == 0).sum() >= at.size  # the equal ones are there
