"""Counterfactual (hard-negative) images: editors make them, a CLIP-like scorer validates them.

For each positive pair (uid, image, caption) the candidates are
- every negative caption of the row's `neg_captions` (the negatives_text stage's; made on the fly from the caption
  by negatives.text when the table has no such column) times every caption-taking editor (recolor, render,
  diffusion), and
- every negative caption an own-caption editor proposes (flip: the left/right swap, only for captions with
  left/right content).
Each candidate becomes one row of NEGATIVES_IMAGE_SCHEMA, whether or not an image was made: an editor that cannot
make it gives the row its reason (not_applicable, no_region), so candidates = kept + dropped always.

Validation (TripletCLIP, Img-Diff), `decide`, pure over the score columns like a stage's decide:
    no image                                   -> the editor's reason (not_applicable / no_region)
    score_neg <= score_pos                     -> not_preferred  (the scorer does not prefer the negative caption
                                                                  for the counterfactual image)
    image_sim > max_image_sim                  -> too_similar    (nothing visible changed)
    image_sim < min_image_sim                  -> too_different  (not the same scene any more)
where score_* are the scorer's cosines of the counterfactual image with the negative / positive caption and image_sim
the cosine of the original and counterfactual image embeddings. One forward per batch embeds 2n images (the
counterfactuals and their originals) and 2n texts (negative and positive captions).

This is not a build stage (it makes many rows per input row, a build stage never changes the row count): the
negatives flow (flows/negatives.py) runs it over a finished build.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from schemas.columns import NEGATIVES_IMAGE_SCHEMA
from schemas.spec import StrictModel
from negatives.editors import EDITORS, Editor, make_editor
from stages.models import decode_rgb
from negatives.text import NEGATIVE_KINDS, NegativeTextOptions, batch_negatives

REASONS = ("not_preferred", "too_similar", "too_different", "no_region", "not_applicable")


class DiffusionEditorSpec(StrictModel):
    model: str = Field(min_length=1, description="diffusers pipeline folder or hub id in the local cache")
    pipeline: Literal["instruct_pix2pix", "img2img", "inpaint"] = "instruct_pix2pix"
    steps: int = Field(20, ge=1)
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    strength: float = Field(0.6, gt=0.0, le=1.0)
    seed: int = 0
    resolution: int | None = Field(None, ge=8, description="square side the pipeline runs at; default: the image's")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    gpus: float = Field(0, ge=0)


class NegativesImageSpec(StrictModel):
    """What `pairforge negatives BUILD` does (flows/negatives.py)."""

    editors: list[str] = Field(default_factory=lambda: ["flip", "recolor", "render"])
    kinds: list[str] | None = Field(None, description="negatives_text kinds to edit for; None: all")
    scorer: str = Field("demo-clip", min_length=1, description="CLIP-like scorer (stages.models names)")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    threads: int | None = Field(None, gt=0)
    batch_size: int = Field(64, gt=0, description="candidates per scorer forward")
    # demo-clip's image space is dominated by colour: recolouring the only object can move the image embedding to
    # cosine < 0 with the original, so the lower bound is loose; a re-render that changed nothing visible is ~1.
    min_image_sim: float = Field(0.0, ge=-1.0, le=1.0, description="below: too_different (not the same scene)")
    max_image_sim: float = Field(0.998, ge=-1.0, le=1.0, description="above: too_similar (nothing changed)")
    max_rows: int | None = Field(None, gt=0, description="positives to use (the first by uid); None: all")
    negatives_text: NegativeTextOptions = Field(
        default_factory=lambda: NegativeTextOptions(select_plausible=False, max_blind_bias=None),
        description="how negative captions are made when the build has no neg_captions column")
    scenes: Path | None = Field(None, description="parquet with uid, scene (JSON), render_seed for the render "
                                                  "editor; default: labels.parquet beside the build's source")
    diffusion: DiffusionEditorSpec | None = None
    encode_format: Literal["jpg", "png"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    rows_per_shard: int = Field(1000, gt=0)
    catalog: Path | None = Field(None, description="default: the build's catalog")

    @field_validator("editors")
    @classmethod
    def _known_editors(cls, v: list[str]) -> list[str]:
        unknown = [e for e in v if e not in EDITORS]
        if unknown or not v:
            raise ValueError(f"unknown editors {unknown}; known: {sorted(EDITORS)}")
        return v

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v):
        if v is not None and [k for k in v if k not in NEGATIVE_KINDS]:
            raise ValueError(f"unknown kinds {[k for k in v if k not in NEGATIVE_KINDS]}; known: {NEGATIVE_KINDS}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "NegativesImageSpec":
        if self.min_image_sim > self.max_image_sim:
            raise ValueError(f"min_image_sim {self.min_image_sim} > max_image_sim {self.max_image_sim}")
        if "diffusion" in self.editors and self.diffusion is None:
            raise ValueError("editor diffusion needs a `diffusion:` section (model, pipeline ...)")
        return self


def build_editors(spec: NegativesImageSpec) -> list[Editor]:
    out = []
    for name in spec.editors:
        if name == "diffusion":
            out.append(make_editor("diffusion", **spec.diffusion.model_dump()))
        else:
            out.append(make_editor(name))
    return out


def encode(img, fmt: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def negative_captions(table: pa.Table, spec: NegativesImageSpec) -> list[list[dict]]:
    """Per row, the negative captions (dicts of negatives_text's struct) of the kinds asked for."""
    if "neg_captions" in table.column_names:
        negs = table.column("neg_captions").to_pylist()
    else:
        made = batch_negatives(table.column("text").to_pylist(), spec.negatives_text, load_lm=_load_lm)
        negs = [[n.as_dict() for n in ns] for ns in made]
    kinds = set(spec.kinds) if spec.kinds is not None else None
    return [[n for n in (row or []) if kinds is None or n["kind"] in kinds] for row in negs]


def _load_lm(name: str):
    """The causal LM of method or plausibility "lm" (one CPU thread, no GPU, as the stage with default resources)."""
    from stages.models.lm import shared_lm

    return shared_lm(name, "auto", threads=1, gpus=0.0, stage="negatives")


def generate(table: pa.Table, editors: list[Editor], spec: NegativesImageSpec,
             contexts: list[dict] | None = None) -> list[dict]:
    """Every candidate of every row of `table` (uid, text, image[, neg_captions]) as a dict: the
    counterfactual (`_img`, a PIL image, and `neg_image` bytes) or its reason. Originals ride along as `_orig`."""
    negs = negative_captions(table, spec)
    uids = table.column("uid").to_pylist()
    texts = table.column("text").to_pylist()
    images = table.column("image").to_pylist()
    out: list[dict] = []
    for i, (uid, text, data) in enumerate(zip(uids, texts, images)):
        orig = decode_rgb(data)
        if orig is None or not text:
            continue
        ctx_row = contexts[i] if contexts else {}
        for ed in editors:
            if ed.own_captions:
                cands = [{"kind": p.kind, "text": p.text, "edit_before": p.edit_before, "edit_after": p.edit_after}
                         for p in ed.propose(text)]
            else:
                cands = negs[i]
            for n in cands:
                ctx = dict(ctx_row, edit_before=n.get("edit_before"), edit_after=n.get("edit_after"))
                t0 = time.perf_counter()
                img, reason, detail = ed.try_edit(orig, text, n["text"], n["kind"], ctx)
                ms = (time.perf_counter() - t0) * 1000
                out.append({"uid": uid, "caption": text, "image": data, "neg_caption": n["text"],
                            "kind": n["kind"], "editor": ed.name, "edit_before": n.get("edit_before"),
                            "edit_after": n.get("edit_after"), "reason": reason, "detail": detail,
                            "gen_ms": ms, "_img": img, "_orig": orig,
                            "neg_image": encode(img, spec.encode_format, spec.encode_quality) if img else None})
    return out


def score(cands: list[dict], clip, batch_size: int = 64) -> None:
    """Adds score_neg, score_pos, orig_score_pos, orig_score_neg, image_sim, preferred to candidates with an image
    (in place). The counterfactual is scored as stored (decoded from its encoded bytes). Candidates of one uid share
    its caption and original image."""
    todo = [c for c in cands if c.get("neg_image") is not None]
    for s in range(0, len(todo), batch_size):
        part = todo[s:s + batch_size]
        n = len(part)
        # each positive (image, caption) once per batch: the pairs are (counterfactual, negative caption) and
        # (original, caption), so one forward embeds n + u images and texts
        first: dict = {}
        for c in part:
            first.setdefault(c["uid"], c)
        origs = list(first.values())
        at = {u: n + k for k, u in enumerate(first)}
        imgs = [decode_rgb(c["neg_image"]) for c in part] + [c["_orig"] for c in origs]
        txts = [c["neg_caption"] for c in part] + [c["caption"] for c in origs]
        ie, te = clip.embed(imgs, txts)
        ie, te = ie.numpy(), te.numpy()
        idx = [at[c["uid"]] for c in part]
        neg_img, orig_img, neg_txt, pos_txt = ie[:n], ie[idx], te[:n], te[idx]
        sn = np.einsum("nd,nd->n", neg_img, neg_txt)
        sp = np.einsum("nd,nd->n", neg_img, pos_txt)
        op = np.einsum("nd,nd->n", orig_img, pos_txt)
        on = np.einsum("nd,nd->n", orig_img, neg_txt)
        sim = np.einsum("nd,nd->n", orig_img, neg_img)
        for j, c in enumerate(part):
            c.update(score_neg=float(sn[j]), score_pos=float(sp[j]), orig_score_pos=float(op[j]),
                     orig_score_neg=float(on[j]), image_sim=float(sim[j]), preferred=bool(sn[j] > sp[j]))


def decide(table: pa.Table, spec: NegativesImageSpec) -> tuple[list[str | None], list[str | None]]:
    """(reason, detail) per candidate row; reason None keeps it. Pure over the columns."""
    reasons, details = [], []
    cols = {k: table.column(k).to_pylist() for k in ("reason", "detail", "score_neg", "score_pos", "image_sim")}
    lo, hi = spec.min_image_sim, spec.max_image_sim
    for r, d, sn, sp, sim in zip(cols["reason"], cols["detail"], cols["score_neg"], cols["score_pos"],
                                 cols["image_sim"]):
        if r is not None:
            reasons.append(r), details.append(d)
        elif sn is None:
            reasons.append("not_applicable"), details.append("no counterfactual image")
        elif not sn > sp:
            reasons.append("not_preferred"), details.append(f"score_neg={sn:.3f} <= score_pos={sp:.3f}")
        elif sim > hi:
            reasons.append("too_similar"), details.append(f"image_sim={sim:.4f} > {hi:g}")
        elif sim < lo:
            reasons.append("too_different"), details.append(f"image_sim={sim:.4f} < {lo:g}")
        else:
            reasons.append(None), details.append(None)
    return reasons, details


def to_table(cands: list[dict], negatives_id: str | None = None, source_build_id: str | None = None) -> pa.Table:
    cols = {f.name: [c.get(f.name) for c in cands] for f in NEGATIVES_IMAGE_SCHEMA}
    cols["negatives_id"] = [negatives_id] * len(cands)
    cols["source_build_id"] = [source_build_id] * len(cands)
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in NEGATIVES_IMAGE_SCHEMA},
                    schema=NEGATIVES_IMAGE_SCHEMA)


def make_negatives(table: pa.Table, spec: NegativesImageSpec, clip, editors: list[Editor] | None = None,
                   contexts: list[dict] | None = None, negatives_id: str | None = None,
                   source_build_id: str | None = None) -> tuple[pa.Table, dict]:
    """Generate, score and decide: -> (every candidate with kept/reason, timings)."""
    editors = editors if editors is not None else build_editors(spec)
    t0 = time.perf_counter()
    cands = generate(table, editors, spec, contexts)
    t1 = time.perf_counter()
    score(cands, clip, spec.batch_size)
    t2 = time.perf_counter()
    out = to_table(cands, negatives_id, source_build_id)
    reasons, details = decide(out, spec)
    out = out.set_column(out.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    out = out.set_column(out.schema.get_field_index("detail"), "detail", pa.array(details, pa.string()))
    out = out.set_column(out.schema.get_field_index("kept"), "kept", pa.array([r is None for r in reasons]))
    return out, {"generate_s": t1 - t0, "validate_s": t2 - t1}


def summarize(table: pa.Table) -> dict:
    """Per editor: candidates, images made, raw preference rate (before validation), kept, preference among kept,
    drops by reason."""
    out: dict = {}
    rows = table.select(["editor", "kind", "neg_image", "preferred", "kept", "reason", "gen_ms"]).to_pylist()
    for key in sorted({r["editor"] for r in rows}):
        rs = [r for r in rows if r["editor"] == key]
        made = [r for r in rs if r["neg_image"] is not None]
        kept = [r for r in rs if r["kept"]]
        drops: dict[str, int] = {}
        for r in rs:
            if not r["kept"]:
                drops[r["reason"]] = drops.get(r["reason"], 0) + 1
        out[key] = {
            "candidates": len(rs), "made": len(made), "kept": len(kept), "dropped": drops,
            "preferred_before": (sum(r["preferred"] for r in made) / len(made)) if made else None,
            "preferred_kept": (sum(bool(r["preferred"]) for r in kept) / len(kept)) if kept else None,
            "gen_ms_mean": (sum(r["gen_ms"] for r in rs) / len(rs)) if rs else None,
            "kinds": sorted({r["kind"] for r in made}),
        }
    return out
