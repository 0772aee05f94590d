"""Every column pairforge writes, defined once. Stages, flows and loaders import these."""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

# The input side: one row per URL in the source list, after uid assignment.
INPUT_FIELDS = [
    pa.field("uid", pa.string(), nullable=False),  # 128-bit hex, see schemas.records.make_uid
    pa.field("url", pa.string()),
    pa.field("text", pa.string()),
    pa.field("source", pa.string()),
]
INPUT_SCHEMA = pa.schema(INPUT_FIELDS)

# What ingest adds for a downloaded row.
INGEST_FIELDS = [
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),  # of the downloaded bytes, before any resize (DataComp)
]

PAIR_FIELDS = INPUT_FIELDS + INGEST_FIELDS + [pa.field("build_id", pa.string())]
PAIR_SCHEMA = pa.schema(PAIR_FIELDS)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("text", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("build_id", pa.string()),
    ]
)

# Per-stage output columns: a stage may only add the columns listed under its name.
STAGE_FIELDS: dict[str, list[pa.Field]] = {
    # clean also rewrites `text` (the one input column a stage may change: stages.base.Stage.rewrites)
    "clean": [
        pa.field("text_raw", pa.string()),  # the caption as listed, before stages.clean normalised `text`
        pa.field("clean_edits", pa.string()),  # comma-separated steps that changed it (stages.clean.EDITS); null: none
    ],
    "dedup": [
        pa.field("phash", pa.int64()),  # imagehash.phash of the image, 64 bits as a signed int64; null if undecodable
        pa.field("phash_crops", pa.list_(pa.int64())),  # pHashes of 9 fixed crops (stages.dedup.CROP_BOXES)
        pa.field("url_norm", pa.string()),  # schemas.records.normalize_url(url)
        pa.field("image_bytes", pa.int64()),  # size of the stored image; a survivor tie-break
    ],
    "basic": [
        pa.field("decode_ok", pa.bool_()),
        pa.field("decode_error", pa.string()),
        pa.field("min_side", pa.int32()),
        pa.field("aspect_ratio", pa.float32()),
        pa.field("caption_words", pa.int32()),
        pa.field("caption_chars", pa.int32()),
    ],
    "language": [
        pa.field("lang", pa.string()),  # ISO 639-1 where the language has one; "und" for captions with no letters
        pa.field("lang_score", pa.float32()),  # ensemble probability of `lang`, 0..1 (stages.language)
        pa.field("lang_words", pa.int32()),  # words that may carry a language: no codes, acronyms, initials
    ],
    "junk": [
        pa.field("junk_kind", pa.string()),  # first junk kind found (see stages.junk.KINDS), null when none
        pa.field("junk_detail", pa.string()),
    ],
    "align": [
        pa.field("clip_score", pa.float32()),  # cosine of the L2-normalised projected embeddings; null if undecodable
        pa.field("image_emb", pa.list_(pa.float16())),  # L2-normalised image embedding (null: undecodable / not stored)
        pa.field("text_emb", pa.list_(pa.float16())),  # L2-normalised caption embedding
    ],
    "safety": [
        pa.field("nsfw_score", pa.float32()),  # best nudenet score of an exposed class; null: undecodable
        pa.field("nsfw_labels", pa.string()),  # "CLASS:0.83,..." every detection >= stages.safety.LABEL_FLOOR
    ],
    "text": [
        pa.field("text_frac", pa.float32()),  # image area under the union of read text boxes, 0..1; null: undecodable
        pa.field("ocr_text", pa.string()),  # recognised text of those boxes joined by spaces, at most 500 chars
        pa.field("ocr_words", pa.int32()),  # OCR words of >= 3 letters (stages.text.ocr_words)
        pa.field("ocr_caption_overlap", pa.float32()),  # fraction of those OCR words found in the caption; null if none
    ],
    "negatives_text": [
        # hard negative captions (stages.negatives_text): caption[:span_start] + edit_after + caption[span_end:] == text
        pa.field("neg_captions", pa.list_(pa.struct([
            pa.field("kind", pa.string()),  # replace_obj replace_att replace_rel swap_obj swap_att add_obj add_att
            pa.field("text", pa.string()),
            pa.field("edit_before", pa.string()),
            pa.field("edit_after", pa.string()),
            pa.field("span_start", pa.int32()),  # character offsets in the caption
            pa.field("span_end", pa.int32()),
            pa.field("method", pa.string()),  # "rule" or "lm"
        ]))),
        pa.field("negatives_count", pa.int32()),
    ],
    "recaption": [
        # kept rewrites (stages.recaption; LaCLIP rewrite / VeCap fuse / clean); `text` itself is never changed
        pa.field("recaptions", pa.list_(pa.struct([
            pa.field("text", pa.string()),
            pa.field("model", pa.string()),
            pa.field("mode", pa.string()),  # rewrite | fuse | clean
            pa.field("prompt_id", pa.string()),  # "<mode>/<k>/<digest of instruction + examples>"
            pa.field("similarity", pa.float32()),  # cosine(original, rewrite), MiniLM sentence embeddings
            pa.field("score", pa.float32()),  # image-text score of the rewrite; null: no image or no scorer
            pa.field("score_original", pa.float32()),  # the same for the original caption
        ]))),
        # rejected candidates, reason "code" or "code:detail" (stages.faithfulness)
        pa.field("recaption_rejects", pa.list_(pa.struct([
            pa.field("text", pa.string()),
            pa.field("reason", pa.string()),
        ]))),
    ],
}

# Decision columns, written by the global decide pass.
DECISION_FIELDS = [
    pa.field("reject_stage", pa.string()),
    pa.field("reject_reason", pa.string()),
    pa.field("reject_detail", pa.string()),
]


def stage_fields(stage: str) -> list[pa.Field]:
    return STAGE_FIELDS.get(stage, [])


def build_schema(stages: list[str]) -> pa.Schema:
    """The schema of a kept shard of a build that ran `stages`."""
    fields = list(PAIR_FIELDS)
    for s in stages:
        fields.extend(stage_fields(s))
    return pa.schema(fields)


def rejects_schema(stages: list[str]) -> pa.Schema:
    """Rejects keep the whole record where there is one (image and stats), so refilter can revive them."""
    core = list(REJECT_SCHEMA)
    names = set(REJECT_SCHEMA.names)
    return pa.schema(core + [f.with_nullable(True) for f in build_schema(stages) if f.name not in names])


# Column groups that are heavy and never needed by metadata passes.
HEAVY_COLUMNS = {"image"}

# The hard-negative image set (flows.negatives, stages.negatives_image): one row per (positive, negative), rows sorted
# by uid so a positive and all its negatives sit together (a shard never splits a uid). Same schema in
# negatives/ (kept) and negatives/rejects/ (dropped, with `reason`; `image` null there, neg_image null when the
# editor made none).
NEGATIVES_IMAGE_FIELDS = [
    pa.field("uid", pa.string(), nullable=False),  # the positive pair's uid in the source build
    pa.field("caption", pa.string()),
    pa.field("image", pa.binary()),  # the positive image
    pa.field("neg_caption", pa.string()),
    pa.field("neg_image", pa.binary()),
    pa.field("kind", pa.string()),  # negatives_text kind (replace_att ...) or the editor's own (flip_lr)
    pa.field("editor", pa.string()),  # flip | recolor | render | diffusion
    pa.field("edit_before", pa.string()),
    pa.field("edit_after", pa.string()),
    pa.field("score_neg", pa.float32()),  # scorer cosine(neg_image, neg_caption)
    pa.field("score_pos", pa.float32()),  # scorer cosine(neg_image, caption)
    pa.field("orig_score_pos", pa.float32()),  # cosine(image, caption)
    pa.field("orig_score_neg", pa.float32()),  # cosine(image, neg_caption)
    pa.field("image_sim", pa.float32()),  # cosine(image, neg_image) of the scorer's image embeddings
    pa.field("preferred", pa.bool_()),  # score_neg > score_pos
    pa.field("kept", pa.bool_()),
    pa.field("reason", pa.string()),  # null when kept; not_preferred too_similar too_different no_region not_applicable
    pa.field("detail", pa.string()),
    pa.field("gen_ms", pa.float32()),  # time the editor took for this candidate
    pa.field("negatives_id", pa.string()),
    pa.field("source_build_id", pa.string()),
]
NEGATIVES_IMAGE_SCHEMA = pa.schema(NEGATIVES_IMAGE_FIELDS)
