"""The text stage: rapidocr's bundled PP-OCRv4 models, offline, on packaged real images and the demo corpus."""
from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from stages import stage_class
from stages.text import (
    MIN_LONG_SIDE,
    OcrEngine,
    TextParams,
    TextStage,
    caption_overlap,
    is_read_text,
    model_paths,
    ocr_size,
    ocr_words,
    union_fraction,
)

SITE = Path(np.__file__).resolve().parents[1]
SKIMAGE = SITE / "skimage" / "data"
SKLEARN = SITE / "sklearn" / "datasets" / "images"
PHOTOS = [SKIMAGE / n for n in (
    "chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png", "coins.png",
    "horse.png", "retina.jpg",
)] + [SKLEARN / "china.jpg", SKLEARN / "flower.jpg"]


@pytest.fixture(scope="module")
def stage():
    s = TextStage(TextParams())
    s.setup()
    return s


def _batch(images: list[bytes | None], texts=None) -> pa.Table:
    return pa.table({"image": pa.array(images, pa.binary()),
                     "text": pa.array(texts or ["a caption"] * len(images), pa.string())})


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_registered_and_models_bundled():
    assert stage_class("text") is TextStage
    assert stage_class("text").Params is TextParams
    paths = model_paths()
    assert all(p.is_file() and p.stat().st_size > 1_000_000 for p in paths.values())
    s = TextStage(TextParams())
    s.preflight()
    meta = s.metadata()
    assert set(meta["model_files"]) == {"det", "rec"}
    assert all(len(v["sha256"]) == 64 for v in meta["model_files"].values())


def test_loads_and_runs_without_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    engine = OcrEngine(threads=1)
    rgb = np.asarray(Image.open(SKIMAGE / "page.png").convert("RGB"))
    frac, read = engine.read(rgb)
    assert frac > 0 and read


def test_packaged_images(stage):
    """page.png (printed text) is text-heavy, the photos are not. Measured: page 0.49, every photo 0.00."""
    files = [SKIMAGE / "page.png", SKIMAGE / "text.png", *PHOTOS]
    out = stage(_batch([f.read_bytes() for f in files]))
    frac = dict(zip([f.name for f in files], out.column("text_frac").to_pylist()))
    text = dict(zip([f.name for f in files], out.column("ocr_text").to_pylist()))
    assert frac["page.png"] > 0.3
    assert "segmentation" in text["page.png"].lower()
    assert frac["chelsea.png"] < 0.05
    assert max(frac[p.name] for p in PHOTOS) < 0.05, frac
    reasons = dict(zip([f.name for f in files], TextStage.decide(out, TextParams()).reason))
    assert reasons["page.png"] == "text_heavy"
    assert all(reasons[p.name] is None for p in PHOTOS)


@pytest.mark.xfail(strict=False, reason="skimage's text.png is handwritten maths photographed at an angle: PP-OCRv4 "
                                         "detects boxes only at 4x and cannot read them (measured text_frac 0)")
def test_handwritten_text_png(stage):
    out = stage(_batch([(SKIMAGE / "text.png").read_bytes()]))
    assert out.column("text_frac").to_pylist()[0] > 0.15


def test_rendered_words(stage):
    im = Image.new("RGB", (420, 200), (250, 250, 245))
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=44)
    d.text((20, 30), "HELLO WORLD", font=font, fill=(20, 20, 20))
    d.text((20, 110), "BIG SALE", font=font, fill=(200, 30, 30))
    out = stage(_batch([_encode(im)], ["hello world big sale"]))
    row = out.to_pylist()[0]
    assert 0.1 < row["text_frac"] < 0.6
    squashed = row["ocr_text"].lower().replace(" ", "")
    assert all(w in squashed for w in ("hello", "world", "big", "sale")), row["ocr_text"]
    assert row["ocr_words"] >= 2  # OCR merges words on a line: "HELLOWORLD BIGSALE"
    assert row["ocr_caption_overlap"] == pytest.approx(1.0)
    blank = stage(_batch([_encode(Image.new("RGB", (200, 200), (90, 140, 200)))])).to_pylist()[0]
    assert blank["text_frac"] == 0.0 and blank["ocr_text"] == "" and blank["ocr_words"] == 0
    assert blank["ocr_caption_overlap"] is None


def test_demo_corpus_precision_recall(stage, tmp_path):
    """text_heavy against every other decodable image of a demo corpus the thresholds were not tuned on (seed 2).

    Tuned on seed 0 and checked on seed 1 (n=600 each): precision 1.00, recall 0.97 (text.png the only miss)."""
    from demo.corpus import generate_corpus

    generate_corpus(tmp_path, n=300, seed=2, base_url="http://127.0.0.1:9")
    labels = pq.read_table(tmp_path / "labels.parquet").to_pylist()
    rows = [r for r in labels if r["file"] and r["file"].endswith((".jpg", ".png"))
            and r["expected_stage"] not in ("ingest", "input")]
    out = stage(_batch([(tmp_path / r["file"]).read_bytes() for r in rows], [r["caption"] for r in rows]))
    pred = np.array([r == "text_heavy" for r in TextStage.decide(out, TextParams()).reason])
    truth = np.array([r["expected_reason"] == "text_heavy" for r in rows])
    assert truth.sum() >= 15 and (~truth).sum() >= 250
    tp = int((pred & truth).sum())
    precision, recall = tp / max(1, pred.sum()), tp / truth.sum()
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    frac = np.array(out.column("text_frac").to_pylist())
    clean = np.array([r["fault"] in ("clean", "real_photo") for r in rows])
    assert frac[clean].max() < 0.05  # measured: 0 on every clean scene and photo
    words = out.column("ocr_text").to_pylist()
    overlays = [w for w, r in zip(words, rows) if r["fault"] == "text_overlay"]
    assert sum(bool(w) for w in overlays) >= 0.9 * len(overlays)


def test_undecodable_rows_are_null_and_kept(stage):
    out = stage(_batch([b"junk", None, _encode(Image.new("L", (20, 600), 200))]))
    rows = out.to_pylist()
    for r in rows[:2]:
        assert r["text_frac"] is None and r["ocr_text"] is None and r["ocr_words"] is None
        assert r["ocr_caption_overlap"] is None
    assert rows[2]["text_frac"] == 0.0
    assert TextStage.decide(out, TextParams(reject_caption_overlap=0.0, max_ocr_words=0)).reason == [None] * 3


def test_deterministic(stage):
    datas = [(SKIMAGE / "page.png").read_bytes(), (SKIMAGE / "chelsea.png").read_bytes()]
    a = stage(_batch(datas)).to_pylist()
    b = TextStage(TextParams())(_batch(datas)).to_pylist()
    assert [{k: v for k, v in r.items() if k != "image"} for r in a] == \
           [{k: v for k, v in r.items() if k != "image"} for r in b]


def test_decide_on_hand_built_stats():
    t = pa.table({
        "text_frac": pa.array([0.45, 0.15, 0.151, 0.02, None, 0.01, 0.0], pa.float32()),
        "ocr_text": ["SALE 50% OFF TODAY", "a", "b", "PREVIEW PREVIEW PREVIEW", None, "Coca Cola", ""],
        "ocr_words": pa.array([3, 0, 0, 3, None, 2, 0], pa.int32()),
        "ocr_caption_overlap": pa.array([0.0, None, None, 0.0, None, 1.0, None], pa.float32()),
    })
    d = TextStage.decide(t, TextParams())
    assert d.reason == ["text_heavy", None, "text_heavy", None, None, None, None]
    assert d.detail[0] == "text_frac=0.45 ocr='SALE 50% OFF TODAY'"
    d = TextStage.decide(t, TextParams(max_ocr_words=2, reject_caption_overlap=0.8))
    assert d.reason == ["text_heavy", None, "text_heavy", "text_words", None, "text_spotting", None]
    assert d.detail[3] == "ocr_words=3 ocr='PREVIEW PREVIEW PREVIEW'"
    assert d.detail[5] == "overlap=1.00 ocr='Coca Cola'"
    d = TextStage.decide(t, TextParams(max_text_frac=0.5))
    assert d.reason == [None] * 7


def test_helpers():
    assert ocr_words("SALE 50% off! Ok TODAYDEAL é") == ["sale", "off", "todaydeal"]
    assert caption_overlap("TODAYDEAL shop", "Today deal at the shop") == pytest.approx(1.0)
    assert caption_overlap("SAMPLE SAMPLE photoland", "a red circle") == 0.0
    assert caption_overlap("12 ab", "anything") is None
    assert caption_overlap("the", "the other") == 1.0 and caption_overlap("her", "other") == 0.0  # short: whole words
    square = np.array([[0, 0], [50, 0], [50, 50], [0, 50]], np.float32)
    assert union_fraction([square, square], 100, 100) == pytest.approx(51 * 51 / 10000)  # counted once
    assert union_fraction([], 10, 10) == 0.0
    assert is_read_text("SALE", 0.9) and not is_read_text("O", 0.99) and not is_read_text("★★", 0.9)
    assert not is_read_text("SALE", 0.3)
    assert ocr_size(128, 128, 640) == (MIN_LONG_SIDE, MIN_LONG_SIDE)
    assert ocr_size(4000, 3000, 640) == (640, 480)
    assert ocr_size(400, 256, 640) == (384, 256)


def test_params_validate():
    assert TextParams().max_text_frac == 0.15 and TextParams().reject_caption_overlap is None
    with pytest.raises(ValueError):
        TextParams(max_text_frac=2)
    with pytest.raises(ValueError):
        TextParams(max_side=8)
