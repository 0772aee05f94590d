"""dedup: pHash of real photos and their copies, the exact neighbour search, survivors, prior builds, SemDeDup."""
from __future__ import annotations

import collections
import hashlib
import io
import random
import re
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.engine.global_decisions import decide_table
from stages import stage_class
from stages.dedup import DedupParams, DedupStage, image_hashes, to_signed
from stages.hashing.near import brute_pairs, distinct_pairs, near_pairs

ROOT = Path(__file__).resolve().parents[1]
SITE = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
SKIMAGE = SITE / "skimage" / "data"
SKLEARN = SITE / "sklearn" / "datasets" / "images"

# Packaged photos that are distinct from each other. Left out: chessboard_GRAY/RGB (one picture twice) and
# motorcycle_right (the other half of a stereo pair with motorcycle_left, 4 bits apart: a near duplicate).
_NOT_DISTINCT = ("chessboard_GRAY", "chessboard_RGB", "motorcycle_right")
PHOTOS = sorted(p for p in SKIMAGE.glob("*.png") if p.stem not in _NOT_DISTINCT)
PHOTOS += [SKLEARN / "china.jpg", SKLEARN / "flower.jpg"]


def _jpeg(im: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _crop(im: Image.Image, rng: random.Random) -> Image.Image:
    """Cut 5-10 % of the width and of the height, split at random between the two sides."""
    cw, ch = round(im.width * rng.uniform(0.05, 0.10)), round(im.height * rng.uniform(0.05, 0.10))
    left, top = rng.randint(0, cw), rng.randint(0, ch)
    return im.crop((left, top, im.width - (cw - left), im.height - (ch - top)))


def _row(uid: str, data: bytes, size: tuple[int, int] | None = None, url: str | None = None, text: str = "a caption"):
    if size is None:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    return {"uid": uid, "url": url or f"http://example.com/{uid}.jpg", "text": text, "image": data,
            "width": size[0], "height": size[1], "original_width": size[0], "original_height": size[1],
            "sha256": hashlib.sha256(data).hexdigest()}


def _processed(rows: list[dict]) -> pa.Table:
    """Rows through process_batch, image bytes dropped (what decide sees)."""
    out = DedupStage(DedupParams())(pa.Table.from_pylist(rows))
    return out.drop_columns(["image"])


HEX_UID = re.compile(r"[0-9a-f]{32}")


class Outcome:
    """dedup's decisions over a table, in its row order: reason and detail per row (None: kept)."""

    def __init__(self, reason: list, detail: list):
        self.reason, self.detail = reason, detail


def run_dedup(table: pa.Table, params: DedupParams | None = None, prior: pa.Table | None = None, **kw) -> Outcome:
    """dedup's global steps (flows.engine.global_decisions.decide_table; kw: ray_tasks, parts) over a table whose
    uids are names for the test: uids are 128-bit hex in builds, so names are hex-encoded (order kept) and mapped
    back in the output and its details."""
    names: dict[str, str] = {}

    def hexed(t: pa.Table | None) -> pa.Table | None:
        if t is None:
            return None
        uids = []
        for u in t.column("uid").to_pylist():
            h = u if HEX_UID.fullmatch(u) else u.encode().ljust(16, b"\0").hex()
            names[h] = u
            uids.append(h)
        return t.set_column(t.column_names.index("uid"), "uid", pa.array(uids, pa.string()))

    out = decide_table("dedup", params or DedupParams(), hexed(table), hexed(prior), **kw)
    back = lambda text: HEX_UID.sub(lambda m: names.get(m.group(), m.group()), text)  # noqa: E731
    got = {names[u]: (r, back(d)) for u, r, d in zip(*(out.column(c).to_pylist() for c in ("uid", "reason", "detail")))}
    uids = table.column("uid").to_pylist()
    return Outcome([got.get(u, (None, None))[0] for u in uids], [got.get(u, (None, None))[1] for u in uids])


def _outcome(table: pa.Table, params: DedupParams | None = None, prior: pa.Table | None = None, **kw
             ) -> dict[str, tuple[str | None, str | None]]:
    d = run_dedup(table, params, prior, **kw)
    return dict(zip(table.column("uid").to_pylist(), zip(d.reason, d.detail)))


# ------------------------------------------------------------------------------------------- hashes, columns


def test_registered_and_declared():
    assert stage_class("dedup") is DedupStage
    assert stage_class("dedup").Params is DedupParams
    assert DedupStage.decides_globally(DedupParams())
    assert [s.name for s in DedupStage.global_steps(DedupParams())] == ["exact", "url", "near", "semantic_clusters",
                                                                        "semantic"]
    assert DedupStage.stats_columns() == ["phash", "phash_crops", "url_norm", "image_bytes"]
    p = DedupParams()
    assert (p.exact, p.url, p.near_hamming, p.semantic, p.semantic_eps, p.semantic_clusters) == (
        True, True, 6, True, 0.05, 0)
    assert (DedupStage.default_resources.cpus, DedupStage.default_resources.batch_size) == (1.0, 256)


def test_phash_is_imagehash_bit_for_bit():
    for path in PHOTOS[:6]:
        data = _jpeg(_load(path))
        full, crops = image_hashes(data)
        ref = int(str(imagehash.phash(Image.open(io.BytesIO(data)))), 16)
        assert full == to_signed(ref)
        assert len(crops) == 9 and len(set(crops)) > 1


def test_process_batch_columns_and_undecodable_rows():
    good = _jpeg(_load(PHOTOS[0]))
    rows = [_row("a", good, url="HTTP://Example.COM:80/x.jpg#frag"), _row("b", b"not an image", size=(0, 0)),
            _row("c", good[: len(good) // 3], size=(0, 0))]
    rows[2]["image"] = None
    out = DedupStage(DedupParams())(pa.Table.from_pylist(rows))
    assert out.schema.field("phash").type == pa.int64()
    assert out.column("phash").to_pylist()[1:] == [None, None]
    assert out.column("phash_crops").to_pylist()[1:] == [None, None]
    assert out.column("phash").to_pylist()[0] is not None
    assert out.column("url_norm").to_pylist()[0] == "http://example.com/x.jpg"
    assert out.column("image_bytes").to_pylist() == [len(good), len(b"not an image"), None]


# ------------------------------------------------------------------------------------------- real photos


@pytest.fixture(scope="module")
def photo_copies():
    """Each packaged photo, a JPEG q=60 re-encode, a half-size copy and three 5-10 % crops of it."""
    rng = random.Random(11)
    rows, kinds = [], {}
    for i, path in enumerate(PHOTOS):
        im = _load(path)
        copies = {"orig": _jpeg(im), "q60": _jpeg(im, 60),
                  "half": _jpeg(im.resize((im.width // 2, im.height // 2), Image.LANCZOS))}
        for c in range(3):
            copies[f"crop{c}"] = _jpeg(_crop(im, rng))
        for kind, data in copies.items():
            uid = f"{i:02d}-{kind}"
            rows.append(_row(uid, data))
            kinds[uid] = (path.stem, kind, f"{i:02d}-orig")
    return _processed(rows), kinds


def _crop_catches(table: pa.Table, kinds: dict, params: DedupParams) -> tuple[int, int]:
    """Crop copies caught, and crop copies, deciding each crop round alone with the originals (no chaining)."""
    caught = total = 0
    for c in range(3):
        keep = pa.array([kinds[u][1] in ("orig", f"crop{c}") for u in table.column("uid").to_pylist()])
        for uid, (reason, detail) in _outcome(table.filter(keep), params).items():
            name, kind, orig = kinds[uid]
            if kind == "orig":
                assert reason is None, (name, reason, detail)
                continue
            total += 1
            if reason is not None:
                assert reason == "duplicate_near", (name, kind, reason)
                assert detail.startswith(f"dup of {orig} ("), (name, kind, detail)  # the original survives
                caught += 1
    return caught, total


def test_near_duplicates_of_real_photos(photo_copies):
    table, kinds = photo_copies
    out = _outcome(table)
    for uid, (reason, detail) in out.items():
        name, kind, orig = kinds[uid]
        if kind == "orig":
            assert reason is None, (name, reason, detail)  # distinct photos are never duplicates of each other
        elif kind in ("q60", "half"):
            assert reason == "duplicate_near", (name, kind)
            assert detail.startswith(f"dup of {orig} (hamming=")
        else:
            assert reason == "duplicate_near" or reason is None
    # 5-10 % crops move a plain pHash 4-26 bits; the crop hashes bring most within the default radius.
    # Misses are mostly texture images (brick), whose crops hash like new textures.
    caught, total = _crop_catches(table, kinds, DedupParams())
    assert caught / total >= 0.9, (caught, total)


def test_without_crop_hashes_crops_are_mostly_missed(photo_copies):
    table, kinds = photo_copies
    caught, total = _crop_catches(table, kinds, DedupParams(near_crops=False))
    assert caught / total < 0.5, (caught, total)


def test_near_hamming_zero_disables_near(photo_copies):
    table, _ = photo_copies
    assert all(r is None for r, _ in _outcome(table, DedupParams(near_hamming=0)).values())


def test_shuffled_input_gives_the_same_survivors(photo_copies):
    table, _ = photo_copies
    extra = pa.Table.from_pylist([  # an exact duplicate and a URL duplicate of rows in the table
        {**table.slice(0, 1).to_pylist()[0], "uid": "ffff-exact", "url": "http://other.org/copy.jpg"},
        {**table.slice(7, 1).to_pylist()[0], "uid": "zzzz-url", "text": "another caption",
         "sha256": "0" * 64, "phash": None, "phash_crops": None},
    ], schema=table.schema)
    table = pa.concat_tables([table, extra])
    ref = _outcome(table)
    assert ref["ffff-exact"][0] == "duplicate_exact"
    assert ref["zzzz-url"][0] == "duplicate_url"
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(table.num_rows)
        assert _outcome(table.take(perm)) == ref


# ------------------------------------------------------------------------------------------- the demo corpus


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    corpus = pytest.importorskip("demo.corpus")
    root = tmp_path_factory.mktemp("dedup_demo")
    corpus.generate_corpus(root, n=600, seed=7)
    labels = pq.read_table(root / "labels.parquet").to_pylist()
    rows, meta = [], []
    for r in labels:
        # only rows that reach the stages with an image (ingest and input drop the others)
        if r["expected_stage"] in ("ingest", "input"):
            continue
        if not r["file"] or not r["file"].endswith((".jpg", ".png")):
            continue
        rows.append(_row(r["uid"], (root / r["file"]).read_bytes(), url=r["url"], text=r["caption"]))
        meta.append(r)
    return _processed(rows), meta


def test_demo_corpus_duplicates(demo_rows):
    table, meta = demo_rows
    d = run_dedup(table, DedupParams())
    groups = collections.defaultdict(list)
    for i, r in enumerate(meta):
        groups[r["group"]].append(i)
    dup = {i: d.reason[i] is not None and d.reason[i].startswith("duplicate") for i in range(len(meta))}
    copies = [i for i, r in enumerate(meta) if r["fault"].startswith("near_dup") or r["fault"] == "exact_dup"]
    assert len(copies) >= 25
    # A copy is caught when exactly one of it and its original is kept. Which one is kept follows the survivor
    # rule (larger image, then larger file, then smaller uid); byte-identical copies tie on both.
    caught = 0
    for i in copies:
        orig = next(j for j in groups[meta[i]["group"]] if meta[j]["is_original"])
        caught += dup[i] != dup[orig]
    assert caught / len(copies) >= 0.9, caught / len(copies)
    flagged = [i for i in dup if dup[i]]
    true_flags = [i for i in flagged if len(groups[meta[i]["group"]]) > 1]
    assert len(true_flags) / len(flagged) >= 0.9  # precision of the duplicate rejects
    distinct = [i for i, r in enumerate(meta) if r["fault"] == "clean" and len(groups[r["group"]]) == 1]
    assert sum(dup[i] for i in distinct) / len(distinct) <= 0.05  # distinct clean scenes are kept
    reasons = {meta[i]["fault"]: d.reason[i] for i in copies if dup[i]}
    assert reasons.get("exact_dup", "duplicate_exact") == "duplicate_exact"


# ------------------------------------------------------------------------------------------- neighbour search


def _planted(n: int, k: int, seed: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """n random hashes; 40 rows per distance 0..k+1 overwritten with a copy of another row at that distance."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    slots = rng.permutation(n)
    planted, t = [], 0
    for dist in range(k + 2):
        for _ in range(40):
            src, dst = int(slots[t]), int(slots[t + 1])
            t += 2
            flip = np.uint64(sum(1 << int(b) for b in rng.choice(64, dist, replace=False)))
            h[dst] = h[src] ^ flip
            planted.append((min(src, dst), max(src, dst), dist))
    return h, planted


@pytest.mark.parametrize("k", [6, 3, 9])
def test_neighbour_search_equals_brute_force(k):
    n = 20_000 if k == 6 else 8_000
    h, planted = _planted(n, k, seed=k)
    got = near_pairs(h, k)
    ref = brute_pairs(h, k)
    o = np.lexsort((ref[1], ref[0]))
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b[o])
    found = set(zip(got[0].tolist(), got[1].tolist()))
    assert all((a, b) in found for a, b, dist in planted if dist <= k)
    assert not any((a, b) in found for a, b, dist in planted if dist == k + 1)
    # the same as signed int64 (how the column stores them)
    got_signed = near_pairs(h.view(np.int64), k)
    np.testing.assert_array_equal(got_signed[0], got[0])


def test_distinct_pairs_on_clustered_hashes():
    """Hashes that share most bits (long buckets) are still all found."""
    rng = np.random.default_rng(5)
    base = np.uint64(0xF0F0F0F0F0F0F0F0)
    flips = rng.integers(0, 2**12, size=6000, dtype=np.uint64) << np.uint64(20)
    h = np.unique(base ^ flips ^ rng.integers(0, 4, size=6000, dtype=np.uint64))
    got = distinct_pairs(h, 4)
    ref = brute_pairs(h, 4)
    assert set(zip(got[0].tolist(), got[1].tolist())) == set(zip(ref[0].tolist(), ref[1].tolist()))
    # each pair comes out once (in the pass of its first agreeing mask), sorted by i then j
    key = got[0] * h.size + got[1]
    assert key.size == np.unique(key).size == (ref[2] > 0).sum()
    assert (np.diff(key) > 0).all()


# ------------------------------------------------------------------------------------------- prior builds


def test_rows_duplicating_an_earlier_build_are_rejected(photo_copies):
    table, kinds = photo_copies
    originals = table.filter(pa.array([kinds[u][1] == "orig" for u in table.column("uid").to_pylist()]))
    prior_rows = originals.slice(0, 5)
    prior = pa.table({
        "uid": pa.array([f"prior-{u}" for u in prior_rows.column("uid").to_pylist()]),
        "sha256": prior_rows.column("sha256"),
        "phash": prior_rows.column("phash"),
        "url_norm": pa.array([f"http://old.example.com/{i}.jpg" for i in range(5)]),
    })
    cur = originals.slice(5, 3)
    url_dup = {**cur.slice(0, 1).to_pylist()[0], "uid": "url-dup", "sha256": "1" * 64, "phash": None,
               "phash_crops": None, "url_norm": "http://old.example.com/3.jpg"}
    exact_dup = {**prior_rows.slice(1, 1).to_pylist()[0], "uid": "exact-dup"}
    q60 = [u for u, v in kinds.items() if v[1] == "q60" and v[2] == prior_rows.column("uid")[2].as_py()][0]
    near = table.filter(pa.array([u == q60 for u in table.column("uid").to_pylist()]))
    t = pa.concat_tables([cur, pa.Table.from_pylist([url_dup, exact_dup], schema=table.schema), near])
    out = _outcome(t, prior=prior)
    assert set(out) == set(t.column("uid").to_pylist())  # prior rows never appear
    p = prior.column("uid").to_pylist()
    assert out["url-dup"] == ("duplicate_url", f"dup of {p[3]} in an earlier build")
    assert out["exact-dup"] == ("duplicate_exact", f"dup of {p[1]} in an earlier build")
    assert out[q60][0] == "duplicate_near"
    assert out[q60][1].startswith(f"dup of {p[2]} in an earlier build (hamming=")
    assert all(out[u] == (None, None) for u in cur.column("uid").to_pylist())
    # a prior row wins even against a larger copy of itself in this build
    big = {**prior_rows.slice(0, 1).to_pylist()[0], "uid": "00-bigger", "original_width": 10_000,
           "original_height": 10_000, "sha256": "2" * 64}
    out = _outcome(pa.Table.from_pylist([big], schema=table.schema), prior=prior)
    assert out["00-bigger"] == ("duplicate_near", f"dup of {p[0]} in an earlier build (hamming=0)")
    # without prior the same rows are all kept
    assert all(r is None for r, _ in _outcome(cur).values())


# ------------------------------------------------------------------------------------------- semantic


def _emb_table(x: np.ndarray, uids: list[str]) -> pa.Table:
    flat = pa.array(x.astype(np.float16).ravel(), pa.float16())
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    n = len(uids)
    return pa.table({
        "uid": uids, "url": [f"http://e.com/{u}" for u in uids], "sha256": [f"{i:064x}" for i in range(n)],
        "original_width": pa.array([100] * n, pa.int32()), "original_height": pa.array([100] * n, pa.int32()),
        "image_emb": pa.ListArray.from_arrays(offsets, flat),
    })


def test_semantic_duplicates():
    rng = np.random.default_rng(0)
    n, dim = 3000, 64
    x = rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, 60, replace=False)
    dst = src[30:]
    src = src[:30]
    noise = rng.normal(size=(30, dim)) * 0.01
    x[dst] = x[src] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    uids = [f"{i:05d}" for i in range(n)]
    t = _emb_table(x, uids)
    d = run_dedup(t, DedupParams())
    rejected = {i for i, r in enumerate(d.reason) if r is not None}
    assert all(d.reason[i] == "duplicate_semantic" for i in rejected)
    planted = {frozenset((int(a), int(b))) for a, b in zip(src, dst)}
    # each planted pair lost exactly one member (the larger uid: equal sizes), nothing else was rejected
    assert rejected == {max(p) for p in planted}
    i = max(next(iter(planted)))
    assert d.detail[i].startswith("dup of ") and "cosine=" in d.detail[i]
    # deterministic under shuffling
    perm = rng.permutation(n)
    d2 = run_dedup(t.take(perm), DedupParams())
    assert {uids[perm[j]] for j, r in enumerate(d2.reason) if r} == {uids[j] for j in rejected}
    # semantic off, or no embeddings: no semantic rejects and no error
    assert all(r is None for r in run_dedup(t, DedupParams(semantic=False)).reason)
    assert all(r is None for r in run_dedup(t.drop_columns(["image_emb"]), DedupParams()).reason)


def test_semantic_clusters_follow_the_build_not_the_sample():
    """About sqrt(rows) clusters, rows estimated from a sample and its share, and a sample that keeps 32 rows a
    cluster: a row meets about sqrt(rows) members at any size (a fixed count is quadratic in the build)."""
    from stages.dedup import SEMANTIC_SAMPLE, _fit_clusters, semantic_sample
    from stages.steps import PRIOR

    rng = np.random.default_rng(1)
    x = rng.normal(size=(900, 8))
    sample = _emb_table(x, [f"{i:05d}" for i in range(900)])
    sample = sample.append_column(PRIOR, pa.array(np.zeros(900, bool)))
    assert _fit_clusters(sample, DedupParams(), 1.0)["kmeans"].n_clusters == 30  # every row: sqrt(900)
    assert _fit_clusters(sample, DedupParams(), 0.25)["kmeans"].n_clusters == 60  # a quarter of 3,600 rows
    assert _fit_clusters(sample, DedupParams(semantic_clusters=7), 0.25)["kmeans"].n_clusters == 7
    assert semantic_sample(DedupParams(), 10**6) == SEMANTIC_SAMPLE
    assert semantic_sample(DedupParams(), 10**8) == 32 * 10**4
    step = DedupStage.global_steps(DedupParams())[3]
    assert step.fraction(DedupParams(), 10**9) == pytest.approx(32 * 31_623 / 10**9)
    assert step.fraction(DedupParams(), 5_000) == 1.0


def test_decide_on_a_table_without_stage_columns():
    t = pa.table({"uid": ["a", "b", "c"], "url": ["http://x.org/1", "HTTP://X.org/1", "http://x.org/2"],
                  "sha256": ["s1", "s2", "s1"]})
    out = _outcome(t)
    assert out == {"a": (None, None), "c": ("duplicate_exact", "dup of a"), "b": ("duplicate_url", "dup of a")}
    assert run_dedup(t.slice(0, 0), DedupParams()).reason == []
