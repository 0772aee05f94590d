"""align: image-text agreement with a CLIP-like dual encoder (CLIP score, DataComp's CLIP filtering).

Per row (process_batch), with the model from stages.models.load_clip:
    clip_score  float32  cosine between the L2-normalised projected image and caption embeddings, in [-1, 1]
    image_emb   list<float16>  the L2-normalised image embedding (dedup's semantic pass reads it)
    text_emb    list<float16>  the L2-normalised caption embedding
Rows whose image does not decode get nulls (the basic stage owns undecodable rows); a null caption is scored as "".
With store_embeddings: false the two embedding columns are written as nulls. A batch goes through the image
processor, the tokenizer and the model once; nothing runs per row.

Rules (decide, pure over the columns; both may be set, the threshold is applied first):
- threshold t:      clip_score < t                                 -> low_alignment ("clip_score=0.121 < 0.28")
- top_fraction f:   keep the k = floor(f * n + 1/2) highest scores among the n rows with a score, over the whole
                    table (the build), not per batch; rank by (score desc, uid asc), so ties are cut
                    deterministically and exactly k rows survive this rule
                                                                   -> below_top_fraction
                    ("clip_score=0.201 below the top 0.3 cutoff 0.243")
  n counts every scored row of the build, including rows another stage rejects (as DataComp ranks its whole pool);
  rows rejected by the threshold still count in n and can hold top-k places.
Rows without a score are kept here.

Scores are model-specific: CLIP ViT-B/32 is usually thresholded near 0.28 (DataComp). A model folder trained by
flows/training/train.py carries training.json with a `recommended_threshold`; metadata() reports it, but the threshold that
applies is always the spec's (decide stays pure over the columns, so `refilter` needs no model folder).
"""
from __future__ import annotations

import math
import time
from typing import Literal

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
    Stage,
    StageConfigError,
    Threshold,
    concat,
    fixed,
)
from stages.imaging.decode import images, pil
from stages.models import (
    check_loadable,
    config_summary,
    is_local,
    load_clip,
    locate_model,
    resolve_device,
    resolve_dtype,
    resolve_threads,
    training_card,
    weights_sha256,
)


class AlignParams(StageParams):
    model: str = Field("demo-clip", min_length=1,
                       description="model folder (absolute, relative to the repo root, or a name under stages/models/shipped/) "
                                   "or a Hugging Face hub id in the local cache")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
                        description="auto: the GPU Ray assigned (gpus > 0) or CUDA outside Ray, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="reject pairs with clip_score below this")
    top_fraction: float | None = Field(None, gt=0.0, le=1.0,
                                       description="keep only this fraction of scored rows, the highest clip_score "
                                                   "over the whole build (DataComp: 0.3)")
    store_embeddings: bool = Field(True, description="write image_emb and text_emb (float16) beside clip_score")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per actor; default: cpus, at least 1")


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
    def decides_globally(cls, params: AlignParams) -> bool:
        return params.top_fraction is not None  # ranks the whole build

    # per batch -------------------------------------------------------------
    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.setup()  # no-op once loaded; lets the stage be called directly
        n = batch.num_rows
        texts = batch.column("text").to_pylist()
        pixels = images(batch)
        scores = np.full(n, np.nan, np.float32)
        kept_rows, img_parts, txt_parts = [], [], []
        step = self.resources.batch_size
        # decode a chunk of batch_size at a time (a batch larger than that is split, never run row by row)
        for s in range(0, n, step):
            decoded = [None if a is None else pil(a) for a in pixels[s:s + step]]
            part = [s + j for j, im in enumerate(decoded) if im is not None]
            if not part:
                continue
            img, txt = self.clip.embed([decoded[i - s] for i in part], [texts[i] for i in part])
            kept_rows.extend(part)
            img_parts.append(img.numpy())
            txt_parts.append(txt.numpy())
        rows = np.array(kept_rows, dtype=np.int64)
        img_all = txt_all = None
        if rows.size:
            img_all, txt_all = np.concatenate(img_parts), np.concatenate(txt_parts)
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
        if params.top_fraction is not None:
            valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)
            score = np.asarray(col.fill_null(0.0).to_numpy(zero_copy_only=False), np.float64)
            scored = np.flatnonzero(valid)
            k = math.floor(params.top_fraction * scored.size + 0.5)
            keys = {"score": pa.array(score[scored]), "row": pa.array(scored)}
            sort = [("score", "descending")]
            if "uid" in table.column_names:
                keys["uid"] = table.column("uid").take(pa.array(scored))
                sort.append(("uid", "ascending"))
            sort.append(("row", "ascending"))
            order = pc.sort_indices(pa.table(keys), sort_keys=sort).to_numpy()  # score desc, then uid asc
            below = scored[order[k:]]
            if below.size:
                cutoff = score[scored[order[k - 1]]] if k > 0 else float("nan")
                mask = np.zeros(n, bool)
                mask[below] = True
                d.reject(mask, "below_top_fraction", concat(
                    "clip_score=", fixed(pa.array(score), 3), f" below the top {params.top_fraction:g} cutoff {cutoff:.3f}"))
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
