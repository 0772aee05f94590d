"""align: image-text agreement with a CLIP-like dual encoder (CLIP score, DataComp's CLIP filtering).

Per row (process_batch), with the model from stages.models.load_clip:
    clip_score  float32  cosine between the L2-normalised projected image and caption embeddings, in [-1, 1]
    image_emb   list<float16>  the L2-normalised image embedding (dedup's semantic pass reads it)
    text_emb    list<float16>  the L2-normalised caption embedding
Rows whose image does not decode get nulls (the basic stage owns undecodable rows); a null caption is scored as "".
With store_embeddings: false the two embedding columns are written as nulls. A batch goes through the image
processor, the tokenizer and the model once; nothing runs per row.

CPU work and the model are split (stages.base: prepare_batch). prepare_batch decodes the images (decode_images)
and resizes and crops them as the model's processor does (stages.models.PixelPrep) into the private column
`_align_pixels` (uint8 [3, H, W] per row, null where the image does not decode); the build runs it as Ray Data
CPU tasks ahead of the actor pool, so decoding never holds the model's process. process_batch tokenises the
captions, rescales and normalises the pixels where the model is (pinned memory and asynchronous copies on CUDA),
runs the forwards in chunks of batch_size, and drops the private column. Called on a plain table it prepares
the batch itself first: the same pixels, the same scores.

Rules (both may be set; the threshold is decided row by row, then the top fraction over the whole build):
- threshold t:      clip_score < t                                 -> low_alignment ("clip_score=0.121 < 0.28")
- top_fraction f:   keep the k = floor(f * n + 1/2) highest scores among the n rows with a score, over the whole
                    build, not per batch (a TopFraction step, stages.steps); rank by (score desc, uid asc), so ties
                    are cut deterministically and exactly k rows survive this rule
                                                                   -> below_top_fraction
                    ("clip_score=0.201 below the top 0.3 cutoff 0.243")
  n counts the scored rows alive before this stage (the build decides global stages over those rows only); rows
  rejected by the threshold still count in n and can hold top-k places.
Rows without a score are kept here.

Scores are model-specific: CLIP ViT-B/32 is usually thresholded near 0.28 (DataComp). A model folder trained by
flows/train.py carries training.json with a `recommended_threshold`; metadata() reports it, but the threshold that
applies is always the spec's (decide stays pure over the columns, so `refilter` needs no model folder).
"""
from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pydantic import Field

from schemas.spec import StageParams
from stages.base import (Column, DecideContext, Decision, Reason, Resources, Stage, StageConfigError, Threshold,
                         concat, fixed)
from stages.imaging.decode import images, pil
from stages.steps import TopFraction
from stages.models import (check_loadable, config_summary, is_local, load_clip, load_pixel_prep, locate_model,
                           pixel_column, pixel_rows, resolve_device, resolve_dtype, resolve_threads, training_card,
                           weights_sha256)

def _score(rows: pa.Table, params) -> pa.Array:
    return rows.column("clip_score").combine_chunks().cast(pa.float64())


def _below_detail(rows: pa.Table, params, cutoff: float) -> pa.Array:
    return concat("clip_score=", fixed(rows.column("clip_score"), 3),
                  f" below the top {params.top_fraction:g} cutoff {cutoff:.3f}")


class AlignParams(StageParams):
    model: str = Field("openai/clip-vit-base-patch32", min_length=1,
                       description="model folder (absolute, relative to the repo root, or a name under stages/models/shipped/) "
                                   "or a Hugging Face hub id in the local cache (the default: OpenAI's CLIP ViT-B/32)")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
                        description="auto: the GPU Ray assigned (gpus > 0) or CUDA outside Ray, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="reject pairs with clip_score below this")
    top_fraction: float | None = Field(None, gt=0.0, le=1.0,
                                       description="keep only this fraction of scored rows, the highest clip_score "
                                                   "over the whole build (DataComp: 0.3)")
    store_embeddings: bool = Field(True, description="write image_emb and text_emb (float16) beside clip_score")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per actor; default: cpus, at least 1")


PIXELS = "_align_pixels"  # private: prepare_batch -> process_batch


def decode_images(batch: pa.Table) -> list:
    """The batch's images as RGB PIL images (None where they do not decode), from the shared decode
    (stages.imaging.decode) when the batch carries it."""
    return [None if a is None else pil(a) for a in images(batch)]


def _emb_column(emb: np.ndarray | None, rows: np.ndarray, n: int) -> pa.Array:
    """float32 [m, d] embeddings of `rows` -> list<float16> of length n, null elsewhere."""
    valid = np.zeros(n, bool)
    if emb is None or rows.size == 0:
        return pa.nulls(n, pa.list_(pa.float16()))
    valid[rows] = True
    d = emb.shape[1]
    counts = np.where(valid, d, 0)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    values = pa.array(emb.astype(np.float16).reshape(-1))
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~valid))


class AlignStage(Stage):
    name = "align"
    version = 1
    summary = "image-caption alignment by a transformers CLIP or SigLIP (hub id or folder)"
    Params = AlignParams
    uses_model = True
    needs_image = True
    columns = (
        Column("clip_score", pa.float32(), "cosine of the L2-normalised projected embeddings; null if undecodable"),
        Column("image_emb", pa.list_(pa.float16()), "L2-normalised image embedding (null: undecodable / not stored)",
               "data"),
        Column("text_emb", pa.list_(pa.float16()), "L2-normalised caption embedding", "data"),
    )
    reasons = (
        Reason("low_alignment", "clip_score below threshold", ("clip_score",),
               (Threshold("clip_score", "threshold", "min"),)),
        Reason("below_top_fraction", "not in the top_fraction of clip_score over the whole build", ("clip_score",),
               param="top_fraction"),
    )
    default_resources = Resources(cpus=1.0, gpus=0.0, batch_size=64, pool_size=1)

    params: AlignParams

    def __init__(self, params: AlignParams | None = None):
        super().__init__(params)
        self.clip = None
        self.load_seconds: float | None = None
        self._prep = None  # PixelPrep without the model, for prepare_batch in CPU workers

    # lifecycle -----------------------------------------------------------
    def preflight(self) -> None:
        """The model can be found and parsed, and the device exists; no weights are loaded."""
        check_loadable(self.params.model, stage=self.name)
        device = resolve_device(self.params.device, self.resources.gpus, stage=self.name)
        if self.resources.gpus and device.type != "cuda" and self.params.device == "auto":
            raise StageConfigError(f"{self.name}: gpus={self.resources.gpus:g} asked for, but torch sees no CUDA "
                                   "device here; set gpus: 0 (or run where there is a GPU)")

    def setup(self) -> None:
        if self.clip is None:
            t0 = time.perf_counter()
            self.clip = load_clip(self.params.model, self.params.device, self.params.dtype,
                                  threads=self.threads, gpus=self.resources.gpus, stage=self.name)
            self.load_seconds = time.perf_counter() - t0

    def teardown(self) -> None:
        if self.clip is not None:
            cuda = self.clip.device.type == "cuda"
            self.clip = None
            if cuda:
                import torch

                torch.cuda.empty_cache()

    @property
    def threads(self) -> int:
        return resolve_threads(self.params.threads, self.resources.cpus)

    @classmethod
    def global_steps(cls, params: AlignParams) -> tuple:
        if params.top_fraction is None:
            return ()
        return (TopFraction("top_fraction", ("clip_score",), _score, params.top_fraction, "below_top_fraction",
                            _below_detail),)

    # per batch -------------------------------------------------------------
    def pixel_prep(self):
        if self.clip is not None:
            return self.clip.pixel_prep
        if self._prep is None:
            self._prep = load_pixel_prep(self.params.model, stage=self.name)
        return self._prep

    def prepare_batch(self, batch: pa.Table) -> pa.Table:
        """CPU only: decode, resize and crop into `_align_pixels`, batch_size rows at a time. A processor that
        cannot be split (PixelPrep.mode None) leaves the batch as it is, and process_batch runs it whole."""
        prep = self.pixel_prep()
        if prep.mode is None:
            return batch
        step = self.resources.batch_size
        rows: list[int] = []
        parts = []
        for s in range(0, batch.num_rows, step):
            images = decode_images(batch.slice(s, step))
            ok = [j for j, im in enumerate(images) if im is not None]
            if ok:
                parts.append(prep.pixels([images[j] for j in ok]))
                rows.extend(s + j for j in ok)
        pixels = np.concatenate(parts) if parts else prep.pixels([])
        return self.add_private(batch, PIXELS, pixel_column(pixels, np.array(rows, np.int64), batch.num_rows))

    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.setup()  # no-op once loaded; lets the stage be called directly
        n = batch.num_rows
        texts = batch.column("text").to_pylist()
        if PIXELS in batch.column_names:  # prepared upstream (the build's CPU tasks)
            pieces = [(0, batch)]
        else:  # a plain table: prepared here, batch_size rows at a time (bounded memory)
            step = self.resources.batch_size
            pieces = ((s, self.prepare_batch(batch.slice(s, step))) for s in range(0, n, step))
        row_parts, img_parts, txt_parts = [], [], []
        for start, piece in pieces:
            piece_texts = texts[start:start + piece.num_rows]
            if PIXELS in piece.column_names:
                pixels, rows = pixel_rows(piece.column(PIXELS))
                img = txt = None
                if rows.size:
                    img, txt = self.clip.embed_pixels(pixels, [piece_texts[i] for i in rows],
                                                      self.resources.batch_size)
            else:
                rows, img, txt = self._embed_whole(piece, piece_texts)
            if rows.size:
                row_parts.append(rows + start)
                img_parts.append(img)
                txt_parts.append(txt)
        batch = batch.drop_columns([PIXELS]) if PIXELS in batch.column_names else batch
        rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int64)
        img_all = np.concatenate(img_parts) if img_parts else None
        txt_all = np.concatenate(txt_parts) if txt_parts else None
        scores = np.full(n, np.nan, np.float32)
        if rows.size:
            scores[rows] = np.einsum("nd,nd->n", img_all, txt_all).clip(-1.0, 1.0)
        valid = np.zeros(n, bool)
        valid[rows] = True
        score_col = pa.array(scores, pa.float32(), mask=~valid)
        store = self.params.store_embeddings
        return self.add_columns(batch, {
            "clip_score": score_col,
            "image_emb": _emb_column(img_all if store else None, rows, n),
            "text_emb": _emb_column(txt_all if store else None, rows, n),
        })

    def _embed_whole(self, batch: pa.Table, texts: list):
        """Processors that cannot be split: decode and the whole processor here, batch_size rows at a time."""
        kept_rows, img_parts, txt_parts = [], [], []
        step = self.resources.batch_size
        for s in range(0, batch.num_rows, step):
            decoded = decode_images(batch.slice(s, step))
            part = [s + j for j, im in enumerate(decoded) if im is not None]
            if not part:
                continue
            img, txt = self.clip.forward(self.clip.preprocess([decoded[i - s] for i in part], [texts[i] for i in part]))
            kept_rows.extend(part)
            img_parts.append(img.numpy())
            txt_parts.append(txt.numpy())
        rows = np.array(kept_rows, dtype=np.int64)
        if not rows.size:
            return rows, None, None
        return rows, np.concatenate(img_parts), np.concatenate(txt_parts)

    # decision --------------------------------------------------------------
    @classmethod
    def decide(cls, table: pa.Table, params: AlignParams, ctx: DecideContext | None = None) -> Decision:
        n = table.num_rows
        d = cls.decision(n)
        if n == 0 or "clip_score" not in table.column_names:
            return d
        col = table.column("clip_score").combine_chunks()
        if params.threshold is not None:
            d.reject(pc.less(col, params.threshold), "low_alignment",
                     concat("clip_score=", fixed(col, 3), f" < {params.threshold:g}"))
        return d

    # metadata --------------------------------------------------------------
    def metadata(self) -> dict:
        """Model name, where it was found, weights digest (local folders) or hub revision, device, dtype, dim."""
        p = self.params
        location = self.clip.location if self.clip else locate_model(p.model)
        meta = {"version": self.version, "model": p.model, "location": location, "local": is_local(location)}
        meta.update(config_summary(location))
        if is_local(location):
            meta["weights_sha256"] = weights_sha256(location)
            card = training_card(location)
            if card.get("recommended_threshold") is not None:
                meta["recommended_threshold"] = card["recommended_threshold"]
        if self.clip is not None:
            meta.update(device=str(self.clip.device), dtype=str(self.clip.dtype).removeprefix("torch."),
                        embedding_dim=self.clip.embedding_dim, model_type=self.clip.model_type,
                        threads=self.clip.threads, load_seconds=round(self.load_seconds or 0.0, 3))
        else:
            try:
                # as the build's actors will see it (model stages run in a Ray actor pool)
                dev = resolve_device(p.device, self.resources.gpus, stage=self.name, in_ray=True)
                meta.update(device=str(dev), dtype=str(resolve_dtype(p.dtype, dev)).removeprefix("torch."))
            except StageConfigError as e:
                meta.update(device=f"unavailable: {e}", dtype=p.dtype)
            meta["threads"] = self.threads
        meta.update(threshold=p.threshold, top_fraction=p.top_fraction, store_embeddings=p.store_embeddings,
                    batch_size=self.resources.batch_size, gpus=self.resources.gpus)
        return meta
