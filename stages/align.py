"""align: image-text agreement with a CLIP-like dual encoder (CLIP score, DataComp's CLIP filtering).

Per row (process_batch), with the model from stages.models.load_clip:
    clip_score  float32  cosine between the L2-normalised projected image and caption embeddings, in [-1, 1]
    image_emb   list<float16>  the L2-normalised image embedding (dedup's semantic pass reads it)
    text_emb    list<float16>  the L2-normalised caption embedding
Rows whose image does not decode get nulls (the basic stage owns undecodable rows); a null caption is scored as "".
With store_embeddings: false the two embedding columns are written as nulls. A batch goes through the image
processor, the tokenizer and the model once; nothing runs per row.

CPU work and the model are split (stages.base: prepare_batch); the build runs prepare_batch as Ray Data CPU tasks
ahead of the actor pool, so decoding never holds the model's process, and hands the actors only what they need:
- `_align_tokens`: the captions' token ids (list<int32>, truncated, unpadded; stages.models.TextPrep), padded per
  forward in the actor;
- `_align_pixels`: uint8 [3, H, W] per row at the model's input size, flattened (null where the image does not
  decode, or goes to the GPU as bytes: null rows take no space; stages.models.pixel_column):
  the image decoded at the smallest JPEG scale that keeps the model's input side (pixel_side: the shared decode
  runs at that scale when no other image stage of the spec needs more), resized and cropped as the processor
  does, from the stored image's geometry (stages.models.PixelPrep.pixels_from);
- with `decode: gpu` (or auto on a GPU actor with a GPU JPEG decoder, stages.imaging.gpu_decode): `_align_jpeg`,
  the bytes of each JPEG row, decoded, resized and cropped on the actor's device; other formats (and JPEGs the
  device decoder refuses) take the CPU path.
When align is the last image stage, the build drops `image` and the shared decode's pixels after this step, so
neither crosses into the actors. process_batch rescales and normalises the pixels where the model is (pinned
memory and asynchronous copies on CUDA, on the calling thread's stream: GPU actors run two batches at once), runs
the forwards in chunks of batch_size, and drops the private columns. Called on a plain table it prepares the batch
itself first: the same pixels, the same scores.

Scores from reduced decoding differ from a decode in full by resampling noise: on real photos at 640-1,300 px,
mean absolute pixel difference at 224 px about 1 level in 255, CLIP B/32 (random weights) scores within 5e-4
(benchmarks/align_ray.py prints it; tests/test_align.py checks 1e-2). The 64 px demo scorer is far more sensitive
(up to 0.014 on its own scenes when they are decoded at 1/4), which is why any spec with an image stage that needs
the stored pixels (dedup, blur, text: the demo's) decodes in full, and align then resizes from those, as before.

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

import functools
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pydantic import Field

from schemas.spec import StageParams
from stages.base import Column, DecideContext, Decision, Reason, Resources, StageConfigError, Threshold, concat, fixed
from stages.imaging import gpu_decode
from stages.imaging.decode import decode_at, decoded_sized, images, pil
from stages.steps import TopFraction
from stages.models import (as_tensor, check_loadable, config_summary, is_local, load_clip, load_preps, locate_model,
                           pixel_column, pixel_rows, resolve_device, resolve_dtype, training_card, weights_sha256)
from stages.models.stage import ModelStage, Requirement, model_alias

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
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where JPEGs are decoded: gpu: on the model's CUDA device (nvImageCodec, or torchvision's "
                            "CUDA decode), the CPU workers hand the bytes over; cpu: in the CPU prepare step; auto: "
                            "gpu when the stage runs on GPUs and such a decoder is installed, else cpu")


PIXELS = "_align_pixels"  # private, prepare_batch -> process_batch: uint8 [3, H, W] (flattened) at the model's size
TOKENS = "_align_tokens"  # list<int32>: the caption's token ids
JPEG = "_align_jpeg"  # binary: the JPEG's bytes, for rows decoded on the model's device (their pixels null)
PRIVATE = (PIXELS, TOKENS, JPEG)


def decodes_on_gpu(params: AlignParams) -> bool:
    """Whether JPEG rows go to the model's device as bytes (params.decode, see AlignParams)."""
    if params.decode != "auto":
        return params.decode == "gpu"
    on_cuda = params.device.startswith("cuda") or (params.device == "auto" and bool(params.gpus))
    return on_cuda and gpu_decode.backend() is not None


@functools.lru_cache(maxsize=16)
def model_side(model: str) -> int | None:
    """The shorter side the model's resize needs (PixelPrep.side: 224 for CLIP B/32; None where its resize is not
    done in Pillow directly, so images are decoded in full): the shared decode may stop there."""
    return load_preps(model).pixel.side


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


class AlignStage(ModelStage):
    name = "align"
    version = 2  # reduced decoding (JPEG DCT scale, Pillow resize) where no image stage needs the stored pixels
    summary = "image-caption alignment by a transformers CLIP or SigLIP (hub id or folder)"
    Params = AlignParams
    needs_image = True
    requires = (Requirement("transformers"), Requirement("torch"))
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
        self._prep = None  # (PixelPrep, TextPrep) without the model, for prepare_batch in CPU workers

    clip = model_alias("The loaded CLIP-like model (stages.models.ClipModel), None before setup().")

    # lifecycle -----------------------------------------------------------
    def check_model(self) -> None:
        """The model can be found and parsed, and the device exists; no weights are loaded."""
        check_loadable(self.params.model, stage=self.name)
        self.check_device(self.params.device)
        self.check_decode()

    def load_model(self):
        return load_clip(self.params.model, self.params.device, self.params.dtype, threads=self.threads,
                         gpus=self.resources.gpus, stage=self.name)

    @classmethod
    def global_steps(cls, params: AlignParams) -> tuple:
        if params.top_fraction is None:
            return ()
        return (TopFraction("top_fraction", ("clip_score",), _score, params.top_fraction, "below_top_fraction",
                            _below_detail),)

    # per batch -------------------------------------------------------------
    @classmethod
    def reads_pixels(cls, params: AlignParams) -> bool:
        return not decodes_on_gpu(params)  # JPEGs decoded on the GPU; other formats decoded in the prepare step

    @classmethod
    def pixel_side(cls, params: AlignParams) -> int | None:
        return model_side(params.model)

    def check_decode(self) -> None:
        """preflight: `decode: gpu` needs the model on a CUDA device and a GPU JPEG decoder; auto falls back."""
        if self.params.decode != "gpu":
            return
        device = resolve_device(self.params.device, self.resources.gpus, stage=self.name, in_ray=True)
        if device.type != "cuda":
            raise StageConfigError(f"{self.name}: decode: gpu needs the model on a CUDA device, but it would run on "
                                   f"{device.type} (device: {self.params.device}, gpus: {self.resources.gpus:g}); "
                                   "set gpus > 0 where torch sees CUDA, or decode: auto / cpu")
        if gpu_decode.backend() is None:
            raise StageConfigError(f"{self.name}: decode: gpu needs a GPU JPEG decoder, and none is installed here "
                                   "(nvidia-nvimgcodec-cu12 or -cu13, or torchvision built with CUDA); "
                                   "decode: auto decodes on the CPU where there is none")

    def preps(self):
        """(PixelPrep, TextPrep): the loaded model's, else the processor's alone (prepare steps load no weights)."""
        if self.clip is not None:
            return self.clip.pixel_prep, self.clip.text_prep
        if self._prep is None:
            p = load_preps(self.params.model, stage=self.name)
            self._prep = (p.pixel, p.text)
        return self._prep

    def pixel_prep(self):
        return self.preps()[0]

    def prepare_batch(self, batch: pa.Table) -> pa.Table:
        """CPU only: token ids into `_align_tokens`; decode, resize and crop into `_align_pixels`, batch_size rows
        at a time; with GPU decoding, JPEG rows' bytes into `_align_jpeg` instead. A processor that cannot be split
        (PixelPrep.mode None) leaves the batch as it is, and process_batch runs it whole."""
        pixel, text = self.preps()
        if pixel.mode is None:
            return batch
        n = batch.num_rows
        batch = self.add_private(batch, TOKENS, text.ids(batch.column("text").to_pylist()))
        on_gpu = np.zeros(n, bool)
        if decodes_on_gpu(self.params) and pixel.plan is not None:
            image = batch.column("image")
            on_gpu = np.asarray(pc.fill_null(pc.equal(pc.binary_slice(image, 0, 3), b"\xff\xd8\xff"), False)
                                .to_numpy(zero_copy_only=False), bool)
            batch = self.add_private(batch, JPEG, pc.if_else(pa.array(on_gpu), image, pa.scalar(None, image.type)))
        step = self.resources.batch_size
        here = np.flatnonzero(~on_gpu)
        rows, parts = [], []
        for s in range(0, here.size, step):
            idx = here[s:s + step]
            contiguous = idx[-1] - idx[0] + 1 == idx.size
            piece = batch.slice(int(idx[0]), idx.size) if contiguous else batch.take(pa.array(idx))
            arrays, stored, _ = decoded_sized(piece, pixel.side)
            ok = [j for j, a in enumerate(arrays) if a is not None]
            if ok:
                parts.append(pixel.pixels_from([arrays[j] for j in ok], stored[ok]))
                rows.extend(idx[ok].tolist())
        pixels = np.concatenate(parts) if parts else pixel.pixels_from([], np.zeros((0, 2), np.int64))
        return self.add_private(batch, PIXELS, pixel_column(pixels, np.array(rows, np.int64), n))

    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.setup()  # no-op once loaded; lets the stage be called directly
        n = batch.num_rows
        if PIXELS in batch.column_names:  # prepared upstream (the build's CPU tasks)
            pieces = [(0, batch)]
        else:  # a plain table: prepared here, batch_size rows at a time (bounded memory)
            step = self.resources.batch_size
            pieces = ((s, self.prepare_batch(batch.slice(s, step))) for s in range(0, n, step))
        row_parts, img_parts, txt_parts = [], [], []
        for start, piece in pieces:
            if PIXELS in piece.column_names:
                rows, img, txt = self._embed_prepared(piece)
            else:
                texts = piece.column("text").to_pylist()
                rows, img, txt = self._embed_whole(piece, texts)
            if rows.size:
                row_parts.append(rows + start)
                img_parts.append(img)
                txt_parts.append(txt)
        batch = batch.drop_columns([c for c in PRIVATE if c in batch.column_names])
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

    def _embed_prepared(self, piece: pa.Table):
        """The prepare step's hand-off -> (rows scored, image_emb, text_emb). JPEG rows handed over as bytes are
        decoded on the model's device; those it refuses, on the CPU here."""
        pixels, rows = pixel_rows(piece.column(PIXELS), self.pixel_prep().shape)
        if JPEG in piece.column_names:
            pixels, rows = self._with_device_jpegs(piece, pixels, rows)
        if not rows.size:
            return rows, None, None
        img, txt = self.clip.embed_ids(pixels, piece.column(TOKENS).take(pa.array(rows)), self.resources.batch_size)
        return rows, img, txt

    def _with_device_jpegs(self, piece: pa.Table, pixels: np.ndarray, rows: np.ndarray):
        """Add the `_align_jpeg` rows to the CPU-prepared ones: -> (uint8 [m, 3, H, W] on the device, or numpy when
        none decoded there, sorted rows)."""
        import torch

        col = piece.column(JPEG).combine_chunks()
        todo = np.flatnonzero(np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool))
        if not todo.size:
            return pixels, rows
        datas = col.take(pa.array(todo)).to_pylist()
        decoder = self._jpeg_decoder()
        with torch.inference_mode(), self.clip.on_stream():  # the stream this thread's forwards run on
            return self._merge_device_jpegs(datas, todo, decoder, pixels, rows)

    def _merge_device_jpegs(self, datas, todo, decoder, pixels, rows):
        import torch

        on_device = decoder.decode(datas) if decoder is not None else [None] * len(datas)
        pixel = self.pixel_prep()
        got = [i for i, t in enumerate(on_device) if t is not None]
        cpu = [decode_at(datas[i], pixel.side) for i, t in enumerate(on_device) if t is None]
        cpu_rows = [todo[i] for i, t in enumerate(on_device) if t is None]
        ok = [j for j, c in enumerate(cpu) if c[0] is not None]
        if ok:  # refused by the device decoder, or no device decoder here
            more = pixel.pixels_from([cpu[j][0] for j in ok], np.array([cpu[j][1] for j in ok], np.int64))
            pixels = np.concatenate([pixels, more])
            rows = np.concatenate([rows, np.array([cpu_rows[j] for j in ok], np.int64)])
        if not got:
            order = np.argsort(rows, kind="stable")
            return pixels[order], rows[order]
        device = self.clip.device
        parts = [pixel.from_device([on_device[i] for i in got])]
        if rows.size:
            parts.insert(0, as_tensor(np.ascontiguousarray(pixels)).to(device, non_blocking=True))
        all_rows = np.concatenate([rows, todo[got]])
        order = np.argsort(all_rows, kind="stable")
        return torch.cat(parts)[torch.from_numpy(order).to(device)], all_rows[order]

    def _jpeg_decoder(self):
        """The device's JPEG decoder (stages.imaging.gpu_decode), made once; None off CUDA or where none is here."""
        if getattr(self, "_jpeg", None) is None:
            ok = self.clip.device.type == "cuda" and gpu_decode.backend() is not None
            self._jpeg = gpu_decode.JpegDecoder(self.clip.device) if ok else False
        return self._jpeg or None

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
    def model_metadata(self) -> dict:
        """Model name, where it was found, weights digest (local folders) or hub revision, device, dtype, dim."""
        p = self.params
        location = self.clip.location if self.clip else locate_model(p.model)
        meta = {"model": p.model, "location": location, "local": is_local(location)}
        meta.update(config_summary(location))
        if is_local(location):
            meta["weights_sha256"] = weights_sha256(location)
            card = training_card(location)
            if card.get("recommended_threshold") is not None:
                meta["recommended_threshold"] = card["recommended_threshold"]
        if self.clip is not None:
            meta.update(device=str(self.clip.device), dtype=str(self.clip.dtype).removeprefix("torch."),
                        embedding_dim=self.clip.embedding_dim, model_type=self.clip.model_type,
                        threads=self.clip.threads, load_seconds=round(self.load_seconds or 0.0, 3),
                        attention=self.clip.attention)
        else:
            try:
                # as the build's actors will see it (model stages run in a Ray actor pool)
                dev = resolve_device(p.device, self.resources.gpus, stage=self.name, in_ray=True)
                meta.update(device=str(dev), dtype=str(resolve_dtype(p.dtype, dev)).removeprefix("torch."))
            except StageConfigError as e:
                meta.update(device=f"unavailable: {e}", dtype=p.dtype)
            meta["threads"] = self.threads
        meta.update(threshold=p.threshold, top_fraction=p.top_fraction, store_embeddings=p.store_embeddings,
                    batch_size=self.resources.batch_size, gpus=self.resources.gpus,
                    decode="gpu" if decodes_on_gpu(p) else "cpu")
        return meta
