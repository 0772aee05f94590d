"""The core columns pairforge writes (input, ingest, rejects, decisions, negatives), defined once. Each stage
declares the columns it adds in its own file; build_schema composes them."""
from __future__ import annotations

import pyarrow as pa

from schemas.registry import stage_class

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

DOWNLOADED_SCHEMA = pa.schema(INPUT_FIELDS + INGEST_FIELDS)  # an ingest shard's pairs
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

# Decision columns, written by the global decide pass.
DECISION_FIELDS = [
    pa.field("reject_stage", pa.string()),
    pa.field("reject_reason", pa.string()),
    pa.field("reject_detail", pa.string()),
]


def stage_fields(stage: str) -> list[pa.Field]:
    """The columns a stage adds, as it declares them in its own file (stages/<name>.py, or a plugin's)."""
    return stage_class(stage).output_fields()


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

# The hard-negative image set (flows.negatives, negatives.images): one row per (positive, negative), rows sorted
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
