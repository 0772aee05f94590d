"""The shared decode at a reduced size (stages.imaging.decode): JPEG DCT scaling down to the largest need of a
spec's image stages, the stored size kept for size statistics, and which stages read reduced pixels."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from schemas.spec import parse_spec
from stages.basic import BasicParams, BasicStage
from stages.imaging.decode import add_pixels, decode_at, decoded, resize, stored_sizes
from tests.realdata import web_jpegs


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return web_jpegs(6, seed=1)


def _png(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def test_a_jpeg_decodes_at_the_smallest_scale_that_keeps_the_side(photos):
    for data in photos:
        full, stored, err = decode_at(data)
        assert err is None and full.shape[:2] == stored
        for side in (224, 320, 0):
            small, same, err = decode_at(data, side)
            assert err is None and same == stored  # the stored size, from the header
            k = round(stored[0] / small.shape[0])
            fits = min(stored[0] // max(side, 1), stored[1] // max(side, 1))  # how many times the side fits
            assert k in (1, 2, 4, 8) and k <= max(fits, 1) and (k == 8 or fits < 2 * k)  # the largest that fits
            assert small.shape[:2] == (-(-stored[0] // k), -(-stored[1] // k)) and min(small.shape[:2]) >= side
        assert min(decode_at(data, 224)[0].shape[:2]) < min(stored)  # every one of these is at least 480 px
    arr = np.asarray(Image.open(io.BytesIO(photos[0])).convert("RGB"))
    png, stored, _ = decode_at(_png(arr), 224)
    assert png.shape == arr.shape and stored == arr.shape[:2]  # other formats: in full


def test_truncated_and_broken_files_fail_alike_at_any_scale(photos):
    cut = photos[0][: len(photos[0]) * 9 // 10]
    errors = {side: decode_at(cut, side)[2] for side in (None, 224, 0)}
    assert errors[None] and set(errors.values()) == {errors[None]}
    assert decode_at(b"not an image", 224)[2] == decode_at(b"not an image")[2] is not None
    assert decode_at(None, 0)[:2] == (None, None)


def test_a_resize_from_reduced_pixels_keeps_the_stored_geometry(photos):
    """resize() maps a DCT-scaled image onto the stored image's extent: the result is a resize of the stored
    pixels up to resampling noise (about a level in 255; without the box, the partial last block shifts it)."""
    for data in photos:
        full, stored, _ = decode_at(data)
        small, _, _ = decode_at(data, 224)
        w, h = 298, 224
        want = np.asarray(resize(full, stored, (w, h)), np.float64)
        got = np.asarray(resize(small, stored, (w, h)), np.float64)
        assert np.abs(got - want).mean() < 1.5
        assert np.abs(np.asarray(resize(full, stored, (w, h), reducing_gap=None), np.float64) - want).mean() < 0.5


def test_basic_reads_the_stored_size(photos):
    """basic's stats are the same from a full decode, a decode at 1/8 (its pixel_side 0) and no shared decode."""
    cut = photos[1][: len(photos[1]) // 2]
    batch = pa.table({"text": ["a photo of a thing"] * 5,
                      "image": pa.array(photos[:2] + [cut, None, _png(np.zeros((30, 90, 3), np.uint8))])})
    stage = BasicStage(BasicParams())
    plain = stage(batch)
    for side in (None, BasicStage.pixel_side(BasicParams())):
        out = stage(add_pixels(batch, side))
        for c in ("decode_ok", "decode_error", "min_side", "aspect_ratio"):
            assert out[c].to_pylist() == plain[c].to_pylist(), c
    sizes, errors = stored_sizes(add_pixels(batch, 0))
    assert sizes[4].tolist() == [30, 90] and plain["min_side"].to_pylist()[4] == 30
    assert errors.is_null().to_pylist() == [True, True, False, False, True]
    assert [a is None for a in decoded(add_pixels(batch, 0))[0]] == [False, False, True, True, False]


def _spec(tmp_path, stages):
    return parse_spec({"dataset": "t", "source": {"urls": "u.csv"}, "stages": stages}, tmp_path)


def test_the_shared_decode_runs_at_the_largest_need(tmp_path, monkeypatch):
    """Stages that need the stored pixels (dedup's pHash, blur, OCR, recaption) keep the decode in full; basic needs
    only the size, safety 320 px, align its model's input side; pixels and `image` stop after the last reader."""
    from flows.engine.runner import decode_side, image_span, last_image_reader
    from tests.test_align import build_tiny_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "u.csv").write_text("url,caption\nhttp://example.com/a.jpg,a red circle\n")
    clip = str(build_tiny_clip(tmp_path / "clip"))  # a 32 px input

    def spec(*stages):
        return _spec(tmp_path, list(stages))

    assert decode_side(spec({"basic": {}})) == 0
    assert decode_side(spec({"basic": {}}, {"safety": {}})) == 320
    assert decode_side(spec({"basic": {}}, {"align": {"model": clip}})) == 32
    for full in ({"dedup": {}}, {"blur": {}}, {"text": {}}):
        assert decode_side(spec({"basic": {}}, full, {"align": {"model": clip}})) is None
    assert decode_side(spec({"junk": {}})) is None and image_span(spec({"junk": {}})) is None

    on_gpu = spec({"basic": {}}, {"align": {"model": clip, "decode": "gpu"}}, {"junk": {}})
    assert image_span(on_gpu) == (0, 0) and last_image_reader(on_gpu) == 1  # align takes the bytes, not pixels
    assert decode_side(on_gpu) == 0
