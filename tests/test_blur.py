"""The blur stage: real photos against blurred copies, and its declarations reaching the spec, the report, `show`,
and refilter without any other file naming it (the README table: tests/test_contract.py)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageFilter

from stages.blur import BlurParams, BlurStage, laplacian_variance
from tests.builds import read_parts

SKIMAGE = Path(np.__file__).resolve().parents[1] / "skimage" / "data"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg"]


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def photo_pairs() -> tuple[list[bytes], list[bytes]]:
    sharp, blurred = [], []
    for name in PHOTOS:
        im = Image.open(SKIMAGE / name).convert("RGB")
        im.thumbnail((384, 384))
        sharp.append(jpeg(im))
        blurred.append(jpeg(im.filter(ImageFilter.GaussianBlur(3))))
    return sharp, blurred


def test_sharp_photos_pass_blurred_copies_fail():
    sharp, blurred = photo_pairs()
    table = pa.table({"uid": [f"u{i}" for i in range(2 * len(sharp) + 1)],
                      "image": sharp + blurred + [b"not an image"]})
    out = BlurStage(BlurParams())(table)
    v = out.column("laplacian_var").to_pylist()
    n = len(sharp)
    assert all(v[i] > 2 * v[n + i] for i in range(n)), v  # blurring always lowers the variance, by far
    d = BlurStage.decide(out, BlurParams())
    assert d.reason[:n] == [None] * n, (v, d.reason)
    assert d.reason[n:2 * n] == ["blurry"] * n, (v, d.reason)
    assert v[-1] is None and d.reason[-1] is None  # undecodable: basic's to reject, not blur's
    assert d.detail[n].startswith("laplacian_var=")
    assert BlurStage.decide(out, BlurParams(min_variance=0)).reason == [None] * (2 * n + 1)


def test_laplacian_of_flat_and_edge_images():
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert laplacian_variance(flat) == 0.0
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[:, ::2] = 255  # a 1-pixel stripe pattern: the strongest response there is
    assert laplacian_variance(edges) > 10_000


@pytest.mark.slow
def test_blur_in_a_real_build_report_show_and_refilter(tmp_path, capsys):
    from flows.cli import main
    from flows.curate import curate_flow
    from flows.refilter import refilter_flow

    sharp, blurred = photo_pairs()
    rows = [{"url": f"http://photos.test/{i}.jpg", "text": f"a real photograph number {i} of the set",
             "image": b} for i, b in enumerate(sharp + blurred)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), corpus / "part-0.parquet")
    spec = tmp_path / "blur.yaml"
    spec.write_text(yaml.safe_dump({
        "dataset": "blur-check", "source": {"pairs": str(corpus), "caption_col": "text"},
        "stages": [{"basic": {"min_side": 32}}, {"blur": {"min_variance": 100}}], "out": str(tmp_path / "b"),
        "ray": {"num_cpus": 2, "object_store_gb": 0.5}}))
    r = curate_flow(str(spec), quiet=True)
    build = Path(r["build_dir"])
    rej = read_parts(build, "rejects", ["uid", "url", "stage", "reason"])
    n = len(sharp)
    assert sorted(rej["url"].to_pylist()) == sorted(f"http://photos.test/{i}.jpg" for i in range(n, 2 * n))
    assert set(rej["reason"].to_pylist()) == {"blurry"} and set(rej["stage"].to_pylist()) == {"blur"}
    stats = json.loads((build / "stats.json").read_text())
    assert next(s for s in stats["stages"] if s["stage"] == "blur")["rejected"] == {"blurry": n}

    html = (build / "report.html").read_text()
    assert 'data-column="laplacian_var" data-thresholds="[100.0]"' in html  # the threshold line, from the declaration

    assert main(["show", str(build), rej["uid"][0].as_py(), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rejection"]["reason"] == "blurry"
    assert "laplacian_var" in shown["rejection"]["stats"]
    assert shown["rejection"]["param"] == {"name": "blur.min_variance", "value": 100}

    child = refilter_flow(str(build), overrides=["blur.min_variance=0"], quiet=True)
    assert child["stats"]["rows_kept"] == 2 * n

