"""basic: decodability, image size and aspect, caption length (DataComp's basic filter as defaults)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from schemas.spec import StageParams
from stages.base import Column, DecideContext, Decision, Reason, Resources, Stage, Threshold, as_text, concat, fixed
from stages.imaging.decode import stored_sizes


class BasicParams(StageParams):
    min_side: int = Field(200, ge=0, description="keep images whose shorter side has at least this many pixels")
    max_aspect: float = Field(3.0, ge=1.0, description="keep images whose long side / short side is at most this")
    min_words: int = Field(3, ge=0, description="keep captions with at least this many words")
    min_chars: int = Field(6, ge=0, description="keep captions with at least this many characters")


def caption_counts(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(words, characters) of each caption after trimming whitespace, like len(t.split()) and len(t.strip())."""
    t = pc.utf8_trim_whitespace(pc.fill_null(text.cast(pa.string()), ""))
    chars = pc.utf8_length(t)
    words = pc.if_else(pc.equal(chars, 0), 0, pc.list_value_length(pc.utf8_split_whitespace(t)))
    return words, chars


class BasicStage(Stage):
    name = "basic"
    version = 1
    summary = "decodability, image size and aspect, caption length (DataComp's basic filter as defaults)"
    Params = BasicParams
    needs_image = True
    default_resources = Resources(cpus=1.0, batch_size=256)
    columns = (
        Column("decode_ok", pa.bool_(), "the image bytes decode in full", "category"),
        Column("decode_error", pa.string(), "why they do not", "detail"),
        Column("min_side", pa.int32(), "the shorter side of the stored image, pixels"),
        Column("aspect_ratio", pa.float32(), "longer side / shorter side"),
        Column("caption_words", pa.int32(), "whitespace-separated words of the caption"),
        Column("caption_chars", pa.int32(), "characters of the caption, trimmed"),
    )
    reasons = (
        Reason("undecodable", "the image does not decode (truncated, corrupt, not an image)", ("decode_error",)),
        Reason("too_small", "the shorter side is below min_side", ("min_side",),
               (Threshold("min_side", "min_side", "min"),)),
        Reason("bad_aspect", "the aspect ratio is above max_aspect", ("aspect_ratio",),
               (Threshold("aspect_ratio", "max_aspect", "max"),)),
        Reason("caption_too_few_words", "the caption has fewer than min_words words", ("caption_words",),
               (Threshold("caption_words", "min_words", "min"),)),
        Reason("caption_too_short", "the caption has fewer than min_chars characters", ("caption_chars",),
               (Threshold("caption_chars", "min_chars", "min"),)),
    )

    @classmethod
    def pixel_side(cls, params: BasicParams) -> int | None:
        return 0  # whether the image decodes and its stored size: any scale of decode tells both

    def process_batch(self, batch: pa.Table) -> pa.Table:
        hw, errors = stored_sizes(batch)
        ok = np.asarray(errors.is_null().to_numpy(zero_copy_only=False), bool)
        short, long = hw.min(axis=1), hw.max(axis=1)
        words, chars = caption_counts(batch.column("text"))
        return self.add_columns(batch, {
            "decode_ok": ok,
            "decode_error": errors,
            "min_side": pa.array(short, pa.int32(), mask=~ok),
            "aspect_ratio": pa.array(long / np.maximum(short, 1), pa.float32(), mask=~ok),
            "caption_words": words,
            "caption_chars": chars,
        })

    @classmethod
    def decide(cls, table: pa.Table, params: BasicParams, ctx: DecideContext | None = None) -> Decision:
        d = cls.decision(table.num_rows)
        side, aspect = table.column("min_side"), table.column("aspect_ratio")
        words, chars = table.column("caption_words"), table.column("caption_chars")
        d.reject(pc.invert(table.column("decode_ok")), "undecodable", table.column("decode_error"))
        d.reject(pc.less(side, params.min_side), "too_small", concat("min_side=", as_text(side)))
        d.reject(pc.greater(aspect, params.max_aspect), "bad_aspect", concat("aspect=", fixed(aspect, 2)))
        d.reject(pc.less(words, params.min_words), "caption_too_few_words", concat("words=", as_text(words)))
        d.reject(pc.less(chars, params.min_chars), "caption_too_short", concat("chars=", as_text(chars)))
        return d
