"""The safety stage: nudenet's bundled model, offline, on benign real photos and demo images; decide on hand-built
stats. No NSFW images ship with the project, so these tests cannot measure recall: they check that the model is the
one nudenet ships and gives nudenet's own detections, that benign images stay under the threshold, and the logic."""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages import stage_class
from stages.base import StageConfigError
from stages.models.stage import Requirement
from stages.safety import (
    LABEL_FLOOR,
    NSFW_CLASSES,
    NsfwDetector,
    SafetyParams,
    SafetyStage,
    decode_rgb,
    format_labels,
    model_path,
    nsfw_score,
)

SITE = Path(np.__file__).resolve().parents[1]
SKIMAGE = SITE / "skimage" / "data"
SKLEARN = SITE / "sklearn" / "datasets" / "images"
# Photographs (and scans) from the packaged sample data. Left out: color.png, a synthetic hue wheel that the 320n
# model calls BUTTOCKS_EXPOSED 0.83 (a known false positive, documented in stages/safety.py).
PHOTOS = [SKIMAGE / n for n in (
    "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "horse.png", "coins.png", "brick.png", "grass.png", "gravel.png", "moon.png",
    "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "page.png", "text.png", "cell.png", "clock_motion.png",
)] + [SKLEARN / "china.jpg", SKLEARN / "flower.jpg"]


@pytest.fixture(scope="module")
def stage():
    s = SafetyStage(SafetyParams())
    s.setup()
    return s


def _batch(images: list[bytes | None], texts=None) -> pa.Table:
    return pa.table({"image": pa.array(images, pa.binary()),
                     "text": pa.array(texts or ["a caption"] * len(images), pa.string())})


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_registered_and_model_is_bundled():
    assert stage_class("safety") is SafetyStage
    assert stage_class("safety").Params is SafetyParams
    assert model_path().name == "320n.onnx" and model_path().stat().st_size > 1_000_000
    s = SafetyStage(SafetyParams())
    s.preflight()
    meta = s.metadata()
    detector = meta["model_files"]["detector"]
    assert detector["file"] == "320n.onnx"
    assert detector["sha256"] == hashlib.sha256(model_path().read_bytes()).hexdigest()
    assert meta["packages"]["nudenet"] == importlib.metadata.version("nudenet") and meta["packages"]["onnxruntime"]
    assert meta["nsfw_classes"] == list(NSFW_CLASSES)
    assert [f.name for f in SafetyStage.output_fields()] == ["nsfw_score", "nsfw_labels"]


def test_model_stage_lifecycle():
    """stages.models.stage.ModelStage: the model loads in setup, once, and teardown releases it; a missing optional
    dependency fails preflight naming the command that installs it."""
    s = SafetyStage(SafetyParams())
    assert s.model is None
    s.setup()
    model = s.model
    assert isinstance(model, NsfwDetector) and s.load_seconds is not None
    s.setup()
    assert s.model is model  # loaded once
    s.teardown()
    assert s.model is None

    class Unavailable(SafetyStage):  # not registered: no `name` of its own
        requires = SafetyStage.requires + (Requirement("pairforge_no_such_module", "pairforge-no-such-package"),)

    with pytest.raises(StageConfigError, match=r"safety: needs pairforge-no-such-package, not installed here "
                                               r"\(pip install pairforge-no-such-package\)"):
        Unavailable(SafetyParams()).preflight()


def test_loads_and_runs_without_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    det = NsfwDetector(threads=1)
    out = det.detect_bytes([(SKIMAGE / "chelsea.png").read_bytes()])
    assert out[0] is not None


def test_matches_nudenet_detections():
    """Our batched, vectorised path gives nudenet's own detections (NudeDetector.detect on an RGB array: see the
    channel-order note in stages/safety.py)."""
    from nudenet import NudeDetector

    ref_det, ours = NudeDetector(), NsfwDetector(threads=1)
    names = ["astronaut.png", "camera.png", "coffee.png", "color.png", "moon.png", "phantom.png", "chelsea.png"]
    images = [decode_rgb((SKIMAGE / n).read_bytes()) for n in names]
    got = ours.detect_arrays(images)  # one batch of 7
    nonempty = 0
    for name, rgb, mine in zip(names, images, got):
        ref: dict[str, float] = {}
        for d in ref_det.detect(rgb.copy()):
            ref[d["class"]] = max(ref.get(d["class"], 0.0), d["score"])
        assert mine.keys() == ref.keys(), name
        for k in ref:
            assert mine[k] == pytest.approx(ref[k], abs=1e-3), (name, k)
        nonempty += bool(ref)
    assert nonempty >= 4  # the comparison covered real detections, not just empty lists


def test_benign_photos_score_below_threshold(stage):
    out = stage(_batch([p.read_bytes() for p in PHOTOS]))
    scores = out.column("nsfw_score").to_pylist()
    assert all(s is not None for s in scores)
    worst = max(zip(scores, PHOTOS))
    # measured: all 0 except coffee.png 0.30 (BUTTOCKS_EXPOSED on the saucer)
    assert worst[0] < 0.4, worst
    labels = dict(zip([p.name for p in PHOTOS], out.column("nsfw_labels").to_pylist()))
    assert "FACE_FEMALE" in labels["astronaut.png"]  # the model does see what is there
    assert SafetyStage.decide(out, SafetyParams()).reason == [None] * len(PHOTOS)


def test_demo_images_score_below_threshold(stage, tmp_path):
    from demo.corpus import generate_corpus

    generate_corpus(tmp_path, n=200, seed=3, base_url="http://127.0.0.1:9")
    labels = pq.read_table(tmp_path / "labels.parquet").to_pylist()
    files = sorted({r["file"] for r in labels if r["file"] and r["file"].endswith((".jpg", ".png"))
                    and r["expected_stage"] not in ("ingest", "input")})
    out = stage(_batch([(tmp_path / f).read_bytes() for f in files]))
    scores = np.array(out.column("nsfw_score").to_pylist(), dtype=float)
    assert len(scores) > 150 and not np.isnan(scores).any()
    # measured on 567 images (seed 0): 565 score 0, the highest 0.36; plain shapes reach ~0.26-0.36
    assert scores.max() < 0.45
    assert np.mean(scores == 0) > 0.9


def test_undecodable_and_odd_modes(stage):
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 128))
    grey = Image.new("L", (40, 90), 128)
    pal = Image.new("P", (50, 50))
    out = stage(_batch([b"not an image", None, b"", _png(rgba), _png(grey), _png(pal)]))
    scores = out.column("nsfw_score").to_pylist()
    labels = out.column("nsfw_labels").to_pylist()
    assert scores[:3] == [None, None, None] and labels[:3] == [None, None, None]
    assert all(s is not None for s in scores[3:]) and all(lab is not None for lab in labels[3:])
    d = SafetyStage.decide(out, SafetyParams())
    assert d.reason == [None] * 6  # undecodable rows belong to the basic stage


def test_deterministic_and_batch_independent(stage):
    datas = [p.read_bytes() for p in PHOTOS[:6]]
    a = stage(_batch(datas)).column("nsfw_labels").to_pylist()
    b = SafetyStage(SafetyParams()).__call__(_batch(datas)).column("nsfw_labels").to_pylist()  # fresh actor
    alone = [stage(_batch([d])).column("nsfw_labels").to_pylist()[0] for d in datas]
    assert a == b == alone
    sa = stage(_batch(datas)).column("nsfw_score").to_pylist()
    assert sa == stage(_batch(datas)).column("nsfw_score").to_pylist()


def test_decide_on_hand_built_stats():
    t = pa.table({
        "nsfw_score": pa.array([0.83, 0.5, 0.4999, None, 0.0, 0.97], pa.float32()),
        "nsfw_labels": pa.array(["BUTTOCKS_EXPOSED:0.83,FACE_FEMALE:0.61", "FEMALE_BREAST_EXPOSED:0.50",
                                 "BUTTOCKS_EXPOSED:0.50", None, "", "MALE_GENITALIA_EXPOSED:0.97"]),
    })
    d = SafetyStage.decide(t, SafetyParams())
    assert d.reason == ["nsfw", "nsfw", None, None, None, "nsfw"]
    assert d.detail[0] == "score=0.83 labels=BUTTOCKS_EXPOSED:0.83,FACE_FEMALE:0.61"
    assert SafetyStage.decide(t, SafetyParams(threshold=0.9)).reason == [None] * 5 + ["nsfw"]
    assert SafetyStage.decide(t, SafetyParams(threshold=1.0)).reason == [None] * 6


def test_score_and_labels_helpers():
    found = {"FACE_FEMALE": 0.91, "BELLY_EXPOSED": 0.62, "FEMALE_BREAST_EXPOSED": 0.41, "FEET_COVERED": 0.22}
    assert nsfw_score(found) == pytest.approx(0.41)  # faces and bellies do not count
    assert nsfw_score({}) == 0.0
    assert format_labels(found) == "FACE_FEMALE:0.91,BELLY_EXPOSED:0.62,FEMALE_BREAST_EXPOSED:0.41"
    assert LABEL_FLOOR > 0.22


def test_params_validate():
    with pytest.raises(ValueError):
        SafetyParams(threshold=1.5)
    with pytest.raises(ValueError):
        SafetyParams(threads=0)
    assert SafetyParams().threshold == 0.5
