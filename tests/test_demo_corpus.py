"""The demo corpus and its HTTP server: determinism, labelled faults, a real server on 127.0.0.1, pHash spread."""
from __future__ import annotations

import hashlib
import io
import json
import random
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import imagehash
import pyarrow.parquet as pq
import pytest
from PIL import Image

from demo.corpus import FAULTS, FRACTIONS, JUNK_KINDS, NEAR_DUP_MAX_HAMMING, generate_corpus
from demo.scenes import (
    COLORS,
    NUMBER_WORDS,
    Group,
    Scene,
    caption,
    caption_foreign,
    layout_scene,
    render,
    render_scene,
    sample_scene,
)
from demo.server import DemoServer
from schemas.records import make_uid

N = 600


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_corpus")
    summary = generate_corpus(root, n=N, seed=7)
    return root, summary


@pytest.fixture(scope="module")
def labels(corpus):
    return pq.read_table(corpus[0] / "labels.parquet").to_pylist()


@pytest.fixture(scope="module")
def server(corpus):
    with DemoServer(corpus[0]) as srv:
        yield srv


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "files").rglob("*"))
        if p.is_file()
    }


def _get(url: str, timeout: float = 5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ---------------------------------------------------------------- generation


def test_generation_is_deterministic(corpus, tmp_path):
    root, _ = corpus
    again = tmp_path / "again"
    generate_corpus(again, n=N, seed=7)
    for name in ("urls.parquet", "labels.parquet"):
        assert pq.read_table(root / name).equals(pq.read_table(again / name)), name
    assert json.loads((root / "routes.json").read_text()) == json.loads((again / "routes.json").read_text())
    assert _tree_digest(root) == _tree_digest(again)

    other = tmp_path / "other"
    generate_corpus(other, n=N, seed=8)
    assert pq.read_table(other / "urls.parquet").column("url").to_pylist() != pq.read_table(
        root / "urls.parquet"
    ).column("url").to_pylist()


def test_layout_of_files(corpus, labels):
    root, summary = corpus
    urls = pq.read_table(root / "urls.parquet")
    assert urls.column_names == ["url", "caption"]
    assert urls.num_rows == N == len(labels)
    assert [r["url"] for r in labels] == urls.column("url").to_pylist()
    assert [r["caption"] for r in labels] == urls.column("caption").to_pylist()
    routes = json.loads((root / "routes.json").read_text())
    for r in labels:
        assert r["url"].startswith(summary["base_url"] + "/")
        path = r["url"][len(summary["base_url"]) :]
        assert path in routes
        route = routes[path]
        assert set(route) == {"file", "status", "headers", "delay_s", "content_type"}
        if route["file"]:
            assert (root / route["file"]).is_file()
    assert json.loads((root / "corpus.json").read_text())["counts"] == summary["counts"]


def test_fault_kinds_and_fractions(labels):
    counts: dict[str, int] = {}
    for r in labels:
        counts[r["fault"]] = counts.get(r["fault"], 0) + 1
    assert set(counts) == set(FAULTS)
    for fault, frac in FRACTIONS.items():
        assert counts[fault] == max(1, round(frac * N)), fault
    assert counts["real_photo"] == 17 and counts["text_image"] == 2
    assert 0.60 <= counts["clean"] / N <= 0.75
    for r in labels:
        stage, reason = FAULTS[r["fault"]]
        assert r["expected_stage"] == stage
        if r["fault"] == "junk_caption":
            assert r["expected_reason"] in JUNK_KINDS
        else:
            assert r["expected_reason"] == reason
    junk = {r["expected_reason"] for r in labels if r["fault"] == "junk_caption"}
    assert junk == set(JUNK_KINDS)
    assert all(len(r["caption"].split()) <= 2 for r in labels if r["fault"] == "short_caption")


def test_uids_and_groups(labels):
    seen: dict[tuple[str, str], int] = {}
    for r in labels:
        key = (r["url"], r["caption"])
        occ = seen.get(key, 0)
        seen[key] = occ + 1
        assert r["uid"] == make_uid(r["url"], r["caption"], occ)
        assert (occ == 1) == (r["fault"] == "duplicate_input")
    assert len({r["uid"] for r in labels}) == len(labels)

    first_in_group: dict[int, dict] = {}
    members: dict[int, list[dict]] = {}
    for r in labels:
        first_in_group.setdefault(r["group"], r)
        members.setdefault(r["group"], []).append(r)
    for g, rows in members.items():
        assert sum(r["is_original"] for r in rows) == 1
        assert first_in_group[g]["is_original"], "the original comes first in its group"
        for r in rows[1:]:
            assert r["fault"] in ("exact_dup", "near_dup_reencode", "near_dup_resize", "near_dup_crop",
                                  "duplicate_input")
            assert rows[0]["fault"] == "clean" and r["scene"] == rows[0]["scene"]


# ---------------------------------------------------------------- server


def _path(r: dict, base: str) -> str:
    return r["url"][len(base) :]


def test_server_serves_routes(corpus, labels, server):
    root, summary = corpus
    base = summary["base_url"]
    by_fault: dict[str, list[dict]] = {}
    for r in labels:
        by_fault.setdefault(r["fault"], []).append(r)

    clean = by_fault["clean"][0]
    status, headers, body = _get(server.url + _path(clean, base))
    assert status == 200 and headers["Content-Type"] in ("image/jpeg", "image/png")
    im = Image.open(io.BytesIO(body))
    im.load()
    assert im.size == (128, 128)
    assert _path(clean, base) in server.requests

    assert _get(server.url + _path(by_fault["http_404"][0], base))[0] == 404
    assert _get(server.url + _path(by_fault["http_500"][0], base))[0] == 500
    assert _get(server.url + "/no/such/path.jpg")[0] == 404

    status, headers, body = _get(server.url + _path(by_fault["optout"][0], base))
    assert status == 200 and headers.get("X-Robots-Tag") == "noai"
    Image.open(io.BytesIO(body)).load()

    status, headers, body = _get(server.url + _path(by_fault["html_as_image"][0], base))
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body.lstrip().startswith(b"<!doctype html")

    t = by_fault["truncated"][0]
    status, _, body = _get(server.url + _path(t, base))
    full = io.BytesIO()
    render_scene(Scene.from_json(t["scene"]), 128, t["render_seed"]).save(full, format="JPEG", quality=90)
    full = full.getvalue()
    assert status == 200 and 0.35 * len(full) <= len(body) < 0.65 * len(full) and full.startswith(body)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()

    # exact duplicates are byte-identical to their original at another URL
    d = by_fault["exact_dup"][0]
    orig = next(r for r in labels if r["group"] == d["group"] and r["is_original"])
    assert d["url"] != orig["url"]
    assert _get(server.url + _path(d, base))[2] == _get(server.url + _path(orig, base))[2]

    never = by_fault["timeout"][-1]
    assert _path(never, base) not in server.requests


def test_timeout_route_and_prompt_stop(corpus, labels):
    root, summary = corpus
    t = next(r for r in labels if r["fault"] == "timeout")
    srv = DemoServer(root).start()
    try:
        start = time.monotonic()
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            urllib.request.urlopen(srv.url + _path(t, summary["base_url"]), timeout=1).read()
        assert time.monotonic() - start < 3
        assert srv.requests == [_path(t, summary["base_url"])]
    finally:
        start = time.monotonic()
        srv.stop()
        assert time.monotonic() - start < 2


# ---------------------------------------------------------------- perceptual hashes


def _phash(root: Path, rel: str) -> imagehash.ImageHash:
    return imagehash.phash(Image.open(root / rel).convert("RGB"))


def test_near_dups_close_and_distinct_scenes_far(corpus, labels):
    root, _ = corpus
    originals = {r["group"]: r for r in labels if r["is_original"]}
    near = [r for r in labels if r["fault"].startswith("near_dup") or r["fault"] == "exact_dup"]
    assert len(near) >= 20
    for r in near:
        d = _phash(root, r["file"]) - _phash(root, originals[r["group"]]["file"])
        assert d <= min(8, NEAR_DUP_MAX_HAMMING), (r["fault"], d)

    clean = [r for r in labels if r["fault"] == "clean"]
    hashes = {r["file"]: _phash(root, r["file"]) for r in clean}
    rng = random.Random(0)
    far = 0
    for _ in range(200):
        a, b = rng.sample(clean, 2)
        far += (hashes[a["file"]] - hashes[b["file"]]) > 10
    assert far >= 198


def test_same_scene_redrawn_is_not_a_near_duplicate():
    rng = random.Random(3)
    far = 0
    for i in range(40):
        s = sample_scene(rng)
        d = imagehash.phash(render_scene(s, 128, 2 * i)) - imagehash.phash(render_scene(s, 128, 2 * i + 1))
        far += d > 10
    assert far >= 39


# ---------------------------------------------------------------- scenes and captions


def test_captions_say_what_is_drawn():
    rng = random.Random(11)
    for _ in range(50):
        s = sample_scene(rng)
        text = caption(s)
        words = text.replace(",", "").split()
        for g in s.groups:
            assert g.color in words
            noun = g.shape if g.count == 1 else g.shape + "s"
            assert noun in words
            if g.count > 1:
                assert NUMBER_WORDS[g.count] in words
            if g.size != "medium":
                assert g.size in words
        n_articles = sum(1 for w in words if w in ("a", "an"))
        assert n_articles == sum(1 for g in s.groups if g.count == 1)
        for i, w in enumerate(words[:-1]):
            if w in ("a", "an"):
                assert (w == "an") == (words[i + 1][0] in "aeiou"), text
        variant = caption(s, random.Random(1))
        for c in COLORS:
            assert (c in text.split()) == (c in variant.replace(",", "").split())
    assert caption(Scene((Group("circle", "orange", "medium", 1),))) == "an orange circle"
    assert caption(Scene((Group("triangle", "green", "medium", 3),))) == "three green triangles"
    s = Scene((Group("circle", "red", "large", 1), Group("square", "blue", "small", 2)), "left of")
    assert caption(s) == "a large red circle to the left of two small blue squares"
    assert caption_foreign(s, "de") == "ein großer roter Kreis links von zwei kleinen blauen Quadraten"
    assert caption_foreign(s, "fr") == "un grand cercle rouge à gauche de deux petits carrés bleus"
    assert caption_foreign(s, "es") == "un gran círculo rojo a la izquierda de dos pequeños cuadrados azules"


def test_layout_satisfies_relation_and_ignores_colours():
    rng = random.Random(5)
    checked = 0
    while checked < 60:
        s = sample_scene(rng)
        if s.relation is None:
            continue
        checked += 1
        seed = rng.getrandbits(32)
        placed = layout_scene(s, seed)
        assert [p.group for p in placed].count(0) == s.groups[0].count
        a = [p for p in placed if p.group == 0]
        b = [p for p in placed if p.group == 1]
        for p in a:
            for q in b:
                if s.relation == "left of":
                    assert p.x + p.r < q.x - q.r
                elif s.relation == "right of":
                    assert p.x - p.r > q.x + q.r
                elif s.relation == "above":
                    assert p.y + p.r < q.y - q.r
                else:
                    assert p.y - p.r > q.y + q.r
        swapped = s.with_groups(replace(s.groups[0], color=s.groups[1].color),
                                replace(s.groups[1], color=s.groups[0].color))
        assert layout_scene(swapped, seed) == placed


def test_scene_roundtrip_and_deterministic_render():
    rng = random.Random(9)
    for _ in range(20):
        s = sample_scene(rng)
        assert Scene.from_dict(s.to_dict()) == s
        assert Scene.from_json(s.to_json()) == s
    a = render_scene(s, 96, 123)
    assert a.mode == "RGB" and a.size == (96, 96)
    assert a.tobytes() == render_scene(s, 96, 123).tobytes()
    assert a.tobytes() != render_scene(s, 96, 124).tobytes()
    assert render(s, 64, random.Random(1)).tobytes() == render(s, 64, random.Random(1)).tobytes()
    with pytest.raises(ValueError):
        Scene((Group("circle", "red"), Group("star", "blue")))  # two groups need a relation
