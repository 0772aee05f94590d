"""text: text rendered in the image (T-MARS's signal), with rapidocr-onnxruntime's bundled PP-OCRv4 models.

Pipeline per image (models load from the wheel's own folder; this package has no download code):
1. decode, convert to BGR, resize so the longest side is max(MIN_LONG_SIDE, min(long side, max_side)) - tiny images
   are upscaled to 320 (at their native 128 px the detector missed 28% of the demo's text images), large ones
   downscaled to `max_side` (640) - then to multiples of 32 as the detector needs;
2. PP-OCRv4 detection (DB): text polygons with a box score; boxes under `min_box_score` (0.5) are dropped;
3. PP-OCRv4 recognition of each polygon's crop (the angle classifier is not used);
4. a box is *read text* when its recognition is at least REC_MIN_SCORE (0.5) sure and holds at least MIN_BOX_ALNUM
   (2) letters or digits. This gate matters: the detector alone calls coloured shapes text - circles read as "O",
   stars as "★", a cat's eyes as "D"/"O" - and on the demo's clean scenes detection-only area has median 0.10 and
   reaches 0.94 at 640 px.

Stats:
- `text_frac`  fraction of the image covered by the union of the read-text polygons (rasterised onto a mask at the
               OCR resolution, so overlapping boxes count once); null when the image does not decode.
- `ocr_text`   the read text, in reading order, joined by spaces, at most 500 characters.
- `ocr_words`  words of >= 3 letters in ocr_text (lowercased; see `ocr_words`).
- `ocr_caption_overlap`  fraction of those words that the caption also contains (a word matches a caption word,
               or, from 5 letters up, a run of the caption with spaces removed: OCR often merges words, "TODAYDEAL");
               null when there are no OCR words.

Decide, in this order (a row gets the first):
- text_frac > max_text_frac (0.15)               -> text_heavy     "text_frac=0.45 ocr='SALE 50% OFF'"
- ocr_words > max_ocr_words (None: off)           -> text_words     "ocr_words=12 ocr='...'"
- ocr_caption_overlap >= reject_caption_overlap (None: off)
                                                  -> text_spotting  "overlap=0.80 ocr='...'" (the caption mostly
                                                     spells out the image's text: T-MARS's text-spotting pairs)

Measured on the demo corpus (n=600, seed 0; 535 decodable images that should pass, 32 that should be text_heavy:
18 text_overlay, 12 watermark, skimage's text.png and page.png), with the settings above:
    negatives: text_frac 0 for all 535 (the gate removes every shape false positive), ocr_words 0;
    text_overlay: min 0.22, 10th percentile 0.33; watermark: min 0.20, 10th percentile 0.28; page.png 0.49;
    text.png (handwritten maths photographed at an angle) 0: the detector finds boxes only when the image is
    upscaled 4x and the recogniser cannot read them (best 'S=' 0.59), so it is a miss we accept.
  max_text_frac 0.15 sits between the clean scenes (0) and the lowest watermark (0.20), with a margin each way;
  0.3 would miss about a quarter of the watermarks and some overlays (recall 0.84). text_heavy precision 1.00,
  recall 0.97 (31/32, text.png the miss) for any threshold in 0.05..0.15. Held out (seed 1, same n): identical
  precision and recall; overlay min 0.29, watermark min 0.24. Watermarks here (3-11 OCR words) are large enough
  for the area rule, so the word-count rule is off by default; it is there for small or faint watermarks
  (`max_ocr_words`, reason text_words): every negative had 0 OCR words.
  On real photos: chelsea, astronaut, coffee, rocket, motorcycle, china, flower ... all text_frac 0.
  Not measured: real web images with some text in them (product labels, shop signs, slides); the demo has none
  between 0 and 0.2, so where such images should be kept, raise max_text_frac (0.3 cost recall 0.84 here).
Cost: about 30-60 ms an image on one core, most of it the detector; see benchmarks/filters.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from schemas.spec import StageParams
from stages.base import (
    Column,
    DecideContext,
    Decision,
    Reason,
    Resources,
    StageConfigError,
    Threshold,
    as_text,
    concat,
    fixed,
)
from stages.imaging.decode import images
from stages.models.stage import ModelStage, Requirement


class TextParams(StageParams):
    max_text_frac: float = Field(0.15, ge=0.0, le=1.0,
                                 description="reject rows whose text boxes cover more than this fraction (text_heavy)")
    max_ocr_words: int | None = Field(None, ge=0, description="reject rows with more OCR words than this (text_words)")
    reject_caption_overlap: float | None = Field(
        None, ge=0.0, le=1.0, description="reject rows whose caption holds at least this fraction of the OCR words "
                                         "(text_spotting); None disables")
    min_box_score: float = Field(0.5, ge=0.0, le=1.0, description="detector box score a text box needs")
    max_side: int = Field(640, ge=32, description="images are downscaled to this longest side before OCR")
    threads: int = Field(1, gt=0, description="onnxruntime intra-op threads per actor")

MIN_LONG_SIDE = 320  # smaller images are upscaled to this longest side before detection
REC_MIN_SCORE = 0.5  # recognition confidence a box needs to count as read text (rapidocr's own text_score)
MIN_BOX_ALNUM = 2  # letters or digits a box's text needs to count
MAX_OCR_CHARS = 500
DETAIL_OCR_CHARS = 60

MODEL_FILES = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx"}

_WORD = re.compile(r"[^\W\d_]{3,}")
_LETTERS = re.compile(r"[^\W\d_]+")


def ocr_words(text: str | None) -> list[str]:
    """Lowercased words of >= 3 letters (any script): the words overlap and the word-count rule count."""
    return _WORD.findall((text or "").lower())


def caption_overlap(ocr_text: str | None, caption: str | None) -> float | None:
    words = ocr_words(ocr_text)
    if not words:
        return None
    cap_words = _LETTERS.findall((caption or "").lower())
    vocab, squashed = set(cap_words), "".join(cap_words)
    hit = sum(1 for w in words if w in vocab or (len(w) >= 5 and w in squashed))
    return hit / len(words)


RAPIDOCR = Requirement("rapidocr_onnxruntime", "rapidocr-onnxruntime")


def model_paths() -> dict[str, Path]:
    base = RAPIDOCR.folder("text") / "models"
    paths = {k: base / f for k, f in MODEL_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise StageConfigError(f"text: rapidocr-onnxruntime's bundled models are missing: {missing}")
    return paths


def ocr_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    """(width, height) the detector sees: longest side clamped to [MIN_LONG_SIDE, max_side], multiples of 32."""
    long = max(w, h)
    target = max(min(long, max_side), min(MIN_LONG_SIDE, max_side))
    s = target / long
    return max(32, int(round(w * s / 32)) * 32), max(32, int(round(h * s / 32)) * 32)


def is_read_text(text: str, rec_score: float) -> bool:
    """The gate of step 4: a sure recognition with at least MIN_BOX_ALNUM letters or digits."""
    return rec_score >= REC_MIN_SCORE and sum(ch.isalnum() for ch in text) >= MIN_BOX_ALNUM


def union_fraction(polygons: list[np.ndarray], width: int, height: int) -> float:
    """Fraction of a width x height image covered by the union of the polygons (rasterised, overlaps count once)."""
    import cv2

    if not len(polygons):
        return 0.0
    mask = np.zeros((height, width), np.uint8)
    for p in polygons:  # one call each: fillPoly given several polygons fills their overlaps as holes (even-odd)
        cv2.fillPoly(mask, [np.round(np.asarray(p, np.float32)).astype(np.int32)], 1)
    return float(mask.mean())


def reading_order(corners: list[np.ndarray]) -> list[int]:
    """Indices of boxes by their top-left corner, top-down then left-right; corners less than 10 px apart in y
    count as one line (rapidocr's sorted_boxes)."""
    idx = sorted(range(len(corners)), key=lambda i: (corners[i][1], corners[i][0]))
    for i in range(len(idx) - 1):
        for j in range(i, -1, -1):
            a, b = corners[idx[j]], corners[idx[j + 1]]
            if abs(b[1] - a[1]) < 10 and b[0] < a[0]:
                idx[j], idx[j + 1] = idx[j + 1], idx[j]
            else:
                break
    return idx


class OcrEngine:
    """PP-OCRv4 detection + recognition from rapidocr-onnxruntime, with a fixed thread count.

    `read(rgb)` -> (text_frac, [(text, rec_score, det_score)] of the read boxes in reading order)."""

    def __init__(self, threads: int = 1, min_box_score: float = 0.5, max_side: int = 640):
        model_paths()  # a clear error before rapidocr's own
        from rapidocr_onnxruntime import RapidOCR

        self._ocr = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1, det_box_thresh=min_box_score,
                             print_verbose=False)
        self._det = self._ocr.text_det
        self._rec = self._ocr.text_rec
        self.max_side = max_side

    def read(self, rgb: np.ndarray) -> tuple[float, list[tuple[str, float, float]]]:
        import cv2

        h, w = rgb.shape[:2]
        rw, rh = ocr_size(w, h, self.max_side)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        img = cv2.resize(bgr, (rw, rh), interpolation=cv2.INTER_AREA if rw < w else cv2.INTER_LINEAR)
        x = (img.astype(np.float32) * (2 / 255.0) - 1.0).transpose(2, 0, 1)[None]  # (x/255 - 0.5) / 0.5
        pred = self._det.infer(np.ascontiguousarray(x))[0]
        boxes, det_scores = self._det.postprocess_op(pred, (rh, rw))
        kept, scores = [], []
        for box, sc in zip(boxes, det_scores):
            box = self._det.clip_det_res(self._det.order_points_clockwise(np.asarray(box, np.float32)), rh, rw)
            if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
                continue  # rapidocr's own filter_tag_det_res
            kept.append(box)
            scores.append(float(sc))
        if not kept:
            return 0.0, []
        order = reading_order([b[0] for b in kept])
        kept = [kept[i] for i in order]
        scores = [scores[i] for i in order]
        crops = self._ocr.get_crop_img_list(img, kept)
        rec, _ = self._rec(crops)
        read, polys = [], []
        for box, det_score, (text, rec_score) in zip(kept, scores, rec):
            if is_read_text(text, rec_score):
                polys.append(box)
                read.append((text, float(rec_score), det_score))
        return union_fraction(polys, rw, rh), read


def _f32(x: float) -> float:
    """A threshold rounded as the float32 stats it is compared with are."""
    return float(np.float32(x))


def _detail_text(ocr) -> pa.Array:
    """OCR text for a decision's detail: quotes made typographic, cut to DETAIL_OCR_CHARS."""
    t = pc.replace_substring(pc.fill_null(ocr, ""), "'", "’")
    cut = concat(pc.utf8_slice_codeunits(t, 0, DETAIL_OCR_CHARS - 3), "...")
    return pc.if_else(pc.greater(pc.utf8_length(t), DETAIL_OCR_CHARS), cut, t)


class TextStage(ModelStage):
    name = "text"
    version = 1
    summary = "text in images: RapidOCR's bundled PP-OCRv4 detector and recogniser"
    Params = TextParams
    needs_image = True
    requires = (RAPIDOCR, Requirement("onnxruntime"))
    model_description = "PP-OCRv4 det + rec (rapidocr-onnxruntime, bundled ONNX)"
    columns = (
        Column("text_frac", pa.float32(), "image area under the union of read text boxes, 0..1; null: undecodable"),
        Column("ocr_text", pa.string(), "recognised text of those boxes joined by spaces, at most 500 chars", "detail"),
        Column("ocr_words", pa.int32(), "OCR words of >= 3 letters (stages.text.ocr_words)"),
        Column("ocr_caption_overlap", pa.float32(), "fraction of those OCR words found in the caption; null if none"),
    )
    reasons = (
        Reason("text_heavy", "text boxes cover more than max_text_frac of the image", ("text_frac", "ocr_text"),
               (Threshold("text_frac", "max_text_frac", "max"),)),
        Reason("text_words", "more OCR words than max_ocr_words", ("ocr_words", "ocr_text"),
               (Threshold("ocr_words", "max_ocr_words", "max"),)),
        Reason("text_spotting", "the caption repeats the text in the image (reject_caption_overlap)",
               ("ocr_caption_overlap", "ocr_text"), (Threshold("ocr_caption_overlap", "reject_caption_overlap", "max"),)),
    )
    default_resources = Resources(cpus=1.0, batch_size=64)

    params: TextParams

    def check_model(self) -> None:
        model_paths()

    def load_model(self) -> OcrEngine:
        p = self.params
        return OcrEngine(threads=self.threads, min_box_score=p.min_box_score, max_side=p.max_side)

    def model_files(self) -> dict[str, Path]:
        return model_paths()

    def model_metadata(self) -> dict:
        return {"min_long_side": MIN_LONG_SIDE, "max_side": self.params.max_side,
                "min_box_score": self.params.min_box_score, "rec_min_score": REC_MIN_SCORE,
                "min_box_alnum": MIN_BOX_ALNUM, "threads": self.threads}

    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.setup()
        cols: dict[str, list] = {k: [] for k in self.stats_columns()}
        for rgb, caption in zip(images(batch), batch.column("text").to_pylist()):
            if rgb is None:
                for k in cols:
                    cols[k].append(None)
                continue
            frac, read = self.model.read(rgb)
            ocr = " ".join(t for t, _, _ in read)[:MAX_OCR_CHARS]
            cols["text_frac"].append(frac)
            cols["ocr_text"].append(ocr)
            cols["ocr_words"].append(len(ocr_words(ocr)))
            cols["ocr_caption_overlap"].append(caption_overlap(ocr, caption))
        return self.add_columns(batch, cols)

    @classmethod
    def decide(cls, table: pa.Table, params: TextParams, ctx: DecideContext | None = None) -> Decision:
        d = cls.decision(table.num_rows)
        frac, words = table.column("text_frac"), table.column("ocr_words")
        overlap = table.column("ocr_caption_overlap")
        ocr = concat(" ocr='", _detail_text(table.column("ocr_text")), "'")
        d.reject(pc.greater(frac, _f32(params.max_text_frac)), "text_heavy",  # float32 stats: 0.15 is 0.15000000596
                 concat("text_frac=", fixed(frac, 2), ocr))
        if params.max_ocr_words is not None:
            d.reject(pc.greater(words, params.max_ocr_words), "text_words", concat("ocr_words=", as_text(words), ocr))
        if params.reject_caption_overlap is not None:
            d.reject(pc.greater_equal(overlap, _f32(params.reject_caption_overlap)), "text_spotting",
                     concat("overlap=", fixed(overlap, 2), ocr))
        return d
