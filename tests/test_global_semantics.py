"""Sequential semantics of global decisions: dedup sees only the rows alive after the stages before it, so a
duplicate group whose other copies carry junk or foreign captions keeps its clean copy (real photos, a curate build
through the real flow)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tests.builds import read_parts

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SKIMAGE = Path(np.__file__).resolve().parents[1] / "skimage" / "data"
PHOTOS = {
    "astronaut.png": ("an astronaut in a white space suit standing in front of an American flag",
                      "Ein Astronaut im weißen Raumanzug steht vor einer amerikanischen Flagge und lächelt"),
    "chelsea.png": ("a ginger tabby cat lying down and looking to the side",
                    "Un gato atigrado de color naranja está acostado y mira hacia un lado"),
    "coffee.png": ("a cup of coffee with latte art on a saucer with a spoon",
                   "Une tasse de café avec un joli dessin de lait sur une soucoupe et une cuillère"),
    "rocket.jpg": ("a rocket on the launch pad under a clear blue sky",
                   "Eine Rakete steht auf der Startrampe unter einem klaren blauen Himmel bereit"),
    "motorcycle_left.png": ("a red sport motorcycle parked in a studio, seen from the left",
                            "Una motocicleta deportiva roja aparcada en un estudio, vista desde la izquierda"),
}
JUNK = ["IMG_2231.JPG", "DSC00042", "untitled-3", "click here", "9f86d081884c7d65"]


def jpeg(im: Image.Image, side: int) -> bytes:
    im = im.convert("RGB").copy()
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("driver_max_rows", [100_000, 0], ids=["one-task", "distributed"])
def test_dedup_keeps_the_clean_copy_when_other_copies_are_junk_or_foreign(tmp_path, driver_max_rows):
    from flows.curate import curate_flow

    rows, clean_urls = [], []
    for i, (name, (english, foreign)) in enumerate(PHOTOS.items()):
        im = Image.open(SKIMAGE / name)
        clean = jpeg(im, 320)
        url = f"http://photos.test/{i}/clean.jpg"
        clean_urls.append(url)
        rows += [
            {"url": url, "text": english, "image": clean},
            # byte-identical, a junk caption: an exact duplicate whose uid may sort first
            {"url": f"http://photos.test/{i}/a.jpg", "text": JUNK[i], "image": clean},
            # larger (the old survivor rule's pick), a foreign caption: a near duplicate
            {"url": f"http://photos.test/{i}/large.jpg", "text": foreign, "image": jpeg(im, 480)},
            # resized smaller, junk again
            {"url": f"http://photos.test/{i}/small.jpg", "text": JUNK[(i + 1) % len(JUNK)], "image": jpeg(im, 200)},
        ]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), corpus / "part-0.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "dataset": "semantics", "source": {"pairs": str(corpus), "caption_col": "text"},
        "stages": [{"clean": {}}, {"junk": {}}, {"language": {"keep": ["en"]}}, {"basic": {"min_side": 64}},
                   {"dedup": {"near_hamming": 8}}],
        "decide": {"driver_max_rows": driver_max_rows},  # 0: the distributed dedup, as on a big build
        "out": str(tmp_path / "b"), "ray": {"num_cpus": 2, "object_store_gb": 0.5}}))
    r = curate_flow(str(spec), quiet=True)
    kept = set(read_parts(r["build_dir"], "shards", ["url"])["url"].to_pylist())
    rej = read_parts(r["build_dir"], "rejects", ["url", "stage", "reason"]).to_pylist()
    by_url = {x["url"]: (x["stage"], x["reason"]) for x in rej}
    assert kept == set(clean_urls), by_url  # every photo keeps its clean copy, and only that
    for x in rej:  # the other copies are owned by the stage meant for them, never by dedup
        assert x["stage"] in ("junk", "language"), x
    assert r["stats"]["rows_listed"] == len(rows) == len(kept) + len(rej)


def _photo_corpus(root: Path) -> list[dict]:
    """Real photos, each with exact, resized and recompressed copies under other URLs."""
    rows = []
    for i, name in enumerate(PHOTOS):
        im = Image.open(SKIMAGE / name)
        clean = jpeg(im, 320)
        rows += [{"url": f"http://photos.test/{i}/{kind}.jpg", "text": f"{PHOTOS[name][0]} ({kind})", "image": data}
                 for kind, data in (("clean", clean), ("copy", clean), ("large", jpeg(im, 480)),
                                    ("small", jpeg(im, 200)))]
    root.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "part-0.parquet")
    return rows


def test_a_global_decision_killed_midway_resumes_to_the_same_output(tmp_path):
    """SIGKILL right after the first step of dedup's global decision finished: the rerun resumes that build, keeps
    the finished step's decisions, redoes the rest, and decides every row as an undisturbed build does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from flows.curate import curate_flow

    rows = _photo_corpus(tmp_path / "corpus")

    def spec(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "dataset": "killed", "source": {"pairs": str(tmp_path / "corpus"), "caption_col": "text"},
            "stages": [{"basic": {"min_side": 64}}, {"dedup": {"near_hamming": 8}}],
            "decide": {"driver_max_rows": 0}, "out": str(tmp_path / name), "ray": {"num_cpus": 2, "object_store_gb": 0.5}}))
        return path

    undisturbed = curate_flow(str(spec("whole")), quiet=True)
    killed = spec("killed")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "curate", str(killed), "--quiet"], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    deadline = time.time() + 600
    while first is None and proc.poll() is None and time.time() < deadline:
        first = next(iter((tmp_path / "killed").glob("killed/*/_work/global/*/00-exact/_DONE.json")), None)
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first is not None, "the build ended before its first global step finished"
    steps = first.parents[1]
    assert not (steps / "02-near" / "_DONE.json").exists(), "killed too late: the near step had finished"
    exact_files = {f: f.stat().st_mtime_ns for f in (steps / "00-exact").glob("*")}
    resumed = curate_flow(str(killed), quiet=True)
    assert resumed["resumed"] and resumed["build_id"] == first.parents[4].name
    assert {f: f.stat().st_mtime_ns for f in exact_files} == exact_files  # the finished step was not redone

    def outcome(build_dir) -> dict:
        kept = read_parts(build_dir, "shards", ["uid", "image"])
        rej = read_parts(build_dir, "rejects", ["uid", "stage", "reason", "detail"])
        return {u: ("kept", len(b)) for u, b in zip(kept["uid"].to_pylist(), kept["image"].to_pylist())} | {
            u: (s, r, d) for u, s, r, d in zip(*(rej[c].to_pylist() for c in ("uid", "stage", "reason", "detail")))}

    a, b = outcome(undisturbed["build_dir"]), outcome(resumed["build_dir"])
    assert a == b and len(a) == len(rows)
    assert sum(v[0] == "dedup" for v in a.values()) >= len(PHOTOS) * 2  # the copies went to dedup
