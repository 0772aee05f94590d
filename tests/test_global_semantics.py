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


@pytest.mark.parametrize("driver_max_rows", [100_000, 0], ids=["in-driver", "distributed"])
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
