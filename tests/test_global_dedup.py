"""Distributed global dedup (flows.engine.global_dedup): the same decisions as DedupStage.decide, row for row."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from flows.engine.global_dedup import NearPlan, _near_entries, _near_partition_edges, dedup_decisions
from stages.base import DecideContext
from stages.dedup import DedupParams, DedupStage, brute_pairs

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
    uid = [f"{rng.integers(0, 2**62):016x}{i:08x}" for i in range(n)]
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


def _reference(table: pa.Table, params: DedupParams, prior: pa.Table | None) -> dict:
    d = DedupStage.decide(table, params, DecideContext(prior=prior))
    return {u: (r, t) for u, r, t in zip(table.column("uid").to_pylist(), d.reason, d.detail) if r is not None}


def _distributed(table: pa.Table, params: DedupParams, prior: pa.Table | None, **kw) -> dict:
    import ray

    out = dedup_decisions(ray.data.from_arrow(table), params,
                          ray.data.from_arrow(prior) if prior is not None else None, **kw)
    got = pa.concat_tables(list(out.iter_batches(batch_format="pyarrow", batch_size=None)) or
                           [pa.table({"uid": [], "reason": [], "detail": []})]).to_pylist()
    result = {r["uid"]: (r["reason"], r["detail"]) for r in got}
    assert len(result) == len(got), "a uid was rejected twice"
    return result


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, object_store_memory=2**30, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", configure_logging=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _check(table: pa.Table, params: DedupParams, prior: pa.Table | None, **kw) -> dict:
    ref = _reference(table, params, prior)
    got = _distributed(table, params, prior, **kw)
    assert got == ref
    return ref


def test_same_decisions_as_decide(local_ray):
    table = metadata(900, seed=1)
    ref = _check(table, DedupParams(), None, partitions=5)
    reasons = {r for r, _ in ref.values()}
    assert reasons == {"duplicate_exact", "duplicate_url", "duplicate_near", "duplicate_semantic"}
    assert any("crop hamming=" in d for _, d in ref.values())  # a crop copy decided through its crop hashes


def test_same_decisions_with_prior_rows_and_files(local_ray, tmp_path):
    table = metadata(700, seed=2)
    prior = prior_rows(table, seed=3)
    ref = _check(table, DedupParams(semantic_clusters=3), prior, partitions=3)
    earlier = [r for r, d in ref.values() if "in an earlier build" in d]
    assert {"duplicate_exact", "duplicate_url", "duplicate_near"} <= set(earlier)
    # near alone (the rows are numbered by a pass of their own), without crop hashes, through Parquet files
    _check(table, DedupParams(exact=False, url=False, near_crops=False, semantic=False), prior,
           tmp_dir=str(tmp_path / "work"))
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # cleaned up
    _check(table.slice(0, 0), DedupParams(), None)


def test_semantic_clusters_from_a_sample(local_ray):
    """Above semantic_sample rows k-means is fitted on a sample (NeMo Curator's way): near-identical embeddings
    still fall in one cluster, so the planted copies are found as decide finds them."""
    table = metadata(900, seed=4)
    params = DedupParams(exact=False, url=False, near_hamming=0)
    ref = _reference(table, params, None)
    got = _distributed(table, params, None, semantic_sample=200)
    assert len(ref) >= 30 and {r for r, _ in got.values()} == {"duplicate_semantic"}
    same = sum(got.get(u) == v for u, v in ref.items())
    assert same >= 0.9 * max(len(ref), len(got)), (same, len(ref), len(got))


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_partitioned_near_search_equals_brute_force(k):
    """Every pair within k found exactly once across the partitions, on distinct hashes with planted pairs."""
    rng = np.random.default_rng(k)
    h = rng.integers(0, 2**64, size=6000, dtype=np.uint64)
    slots = rng.permutation(h.size)
    for t in range(0, 2 * 30 * (k + 2), 2):
        h[slots[t + 1]] = h[slots[t]] ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, t // 60, replace=False)))
    h = np.unique(h)
    plan = NearPlan.make(k, h.size, per_partition=500)
    assert plan.groups == k + 1 and plan.partitions > plan.groups
    batch = pa.table({"phash": pa.array(h.view(np.int64)), "node": pa.array(np.arange(h.size)),
                      "area": pa.array(np.ones(h.size, np.int64)),
                      "phash_crops": pa.nulls(h.size, pa.list_(pa.int64()))})
    entries = _near_entries(batch, plan, crops=False)
    edges = [_near_partition_edges(entries.slice(i, 1), plan) for i in range(entries.num_rows)]
    a = np.concatenate([e.column("a").to_numpy() for e in edges])
    b = np.concatenate([e.column("b").to_numpy() for e in edges])
    got = list(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
    ri, rj, _ = brute_pairs(h, k)
    assert len(got) == len(set(got))  # each pair in one partition only
    assert set(got) == set(zip(ri.tolist(), rj.tolist()))
    assert len(got) >= 30 * k
