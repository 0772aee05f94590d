"""Image editors for hard negatives: one interface, (image, caption, negative caption, kind) -> image | None.

An editor turns a positive pair (image, caption) and a negative caption (stages.negatives_text: kind, text, and the
edit as edit_before -> edit_after) into a counterfactual image that should match the negative caption. None means
this editor cannot make that negative; `try_edit` also says why (`not_applicable`: the edit is not one this editor
does; `no_region`: the edit is one it does, but the named region could not be found in this image).

    flip      mirror the image and swap left/right in the caption (CounterCurate's positional negatives). It makes
              its own negative caption (`propose`): only captions with left/right content get one.
    recolor   colour edits (replace_att, and swap_att between two colours): segment the named colour (HSV hue /
              saturation / value ranges of a named palette), drop specks, grow the mask by a pixel for anti-aliased
              edges, and repaint it in the target colour keeping the shading (value ratio). A colour named twice in
              the caption is ambiguous (which object?): no_region.
    render    the demo domain only, registered by the demo package (demo.render_editor).
    diffusion diffusers InstructPix2Pix ("change X to Y"), img2img (the negative caption as prompt) or inpainting
              (the colour region as mask) from a hub id or a local folder; device / dtype as the model stages
              resolve them (stages.models). With random tiny weights (tests) its output is noise of the right size.

`make_editor(name, **options)` builds one by name; `register_editor` adds one. Editors are cheap to build; diffusion loads its pipeline on the
first edit (or `setup()`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

NOT_APPLICABLE = "not_applicable"
NO_REGION = "no_region"


class Skip(Exception):
    """An editor cannot make this negative: `reason` is not_applicable or no_region, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Proposal:
    """A negative caption an editor makes itself (flip)."""

    kind: str
    text: str
    edit_before: str | None = None
    edit_after: str | None = None


class Editor:
    name: ClassVar[str]
    # True: the editor also writes the negative caption (propose); False: it edits for given negative captions.
    own_captions: ClassVar[bool] = False
    # kinds it can ever make (None: any)
    kinds: ClassVar[tuple[str, ...] | None] = None

    def setup(self) -> None:
        """Load what it needs (models) once."""

    def propose(self, caption: str) -> list[Proposal]:
        """Negative captions this editor makes itself for `caption` (own_captions editors only)."""
        return []

    def edit(self, image: Image.Image, caption: str, neg_caption: str, kind: str | None,
             context: dict | None = None) -> Image.Image | None:
        """The counterfactual image for `neg_caption`, or None when this editor can't make it."""
        img, _reason, _detail = self.try_edit(image, caption, neg_caption, kind, context)
        return img

    def try_edit(self, image: Image.Image, caption: str, neg_caption: str, kind: str | None,
                 context: dict | None = None) -> tuple[Image.Image | None, str | None, str | None]:
        """(image, None, None) or (None, reason, detail)."""
        if self.kinds is not None and kind not in self.kinds:
            return None, NOT_APPLICABLE, f"{self.name} does not make {kind} negatives"
        try:
            out = self._edit(image.convert("RGB"), caption, neg_caption, kind, context or {})
        except Skip as s:
            return None, s.reason, s.detail
        return out, None, None

    def _edit(self, image: Image.Image, caption: str, neg_caption: str, kind: str | None,
              context: dict) -> Image.Image:
        raise NotImplementedError

    def metadata(self) -> dict:
        return {"editor": self.name}


# --------------------------------------------------------------------------- flip

_LR = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def has_left_right(caption: str | None) -> bool:
    return bool(caption and _LR.search(caption))


def swap_left_right(caption: str) -> str:
    def sub(m: re.Match) -> str:
        w = m.group(0)
        new = "right" if w.lower() == "left" else "left"
        return new.capitalize() if w[0].isupper() else new

    return _LR.sub(sub, caption)


class FlipEditor(Editor):
    """Mirror left-right; the negative caption is the caption with left and right swapped."""

    name = "flip"
    own_captions = True
    KIND = "flip_lr"
    kinds = (KIND,)

    def propose(self, caption: str) -> list[Proposal]:
        if not has_left_right(caption):
            return []
        words = _LR.findall(caption)
        return [Proposal(self.KIND, swap_left_right(caption), " ".join(words),
                         " ".join("right" if w.lower() == "left" else "left" for w in words))]

    def _edit(self, image, caption, neg_caption, kind, context):
        if not has_left_right(caption):
            raise Skip(NOT_APPLICABLE, "caption has no left/right content")
        if _LR.sub("", neg_caption).lower() != _LR.sub("", caption).lower() or neg_caption == caption:
            raise Skip(NOT_APPLICABLE, "negative caption is not the left/right swap of the caption")
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


# --------------------------------------------------------------------------- recolor

# Named colours: RGB to paint with, and the HSV range that finds them (hue degrees centre +- width; s, v bounds 0..1).
# Chromatic colours are found by hue; white and black by value/saturation alone.
PALETTE: dict[str, dict[str, Any]] = {
    "red": {"rgb": (220, 30, 35), "hue": (0, 14)},
    "orange": {"rgb": (250, 135, 20), "hue": (30, 9)},
    "yellow": {"rgb": (245, 215, 25), "hue": (53, 10)},
    "green": {"rgb": (30, 165, 60), "hue": (128, 30)},
    "blue": {"rgb": (35, 75, 225), "hue": (225, 22)},
    "purple": {"rgb": (140, 45, 185), "hue": (282, 18)},
    "pink": {"rgb": (240, 110, 180), "hue": (328, 12)},
    "white": {"rgb": (250, 250, 250), "s_max": 0.10, "v_min": 0.93},
    "black": {"rgb": (15, 15, 15), "v_max": 0.13},
}
_COLOR_WORD = re.compile(r"\b(" + "|".join(PALETTE) + r")\b", re.IGNORECASE)


def _hsv(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 RGB [h, w, 3] -> hue degrees 0..360, saturation 0..1, value 0..1."""
    import cv2

    hsv = cv2.cvtColor(arr, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    return hsv[..., 0] * (360.0 / 256.0), hsv[..., 1] / 255.0, hsv[..., 2] / 255.0


def colour_mask(arr: np.ndarray, colour: str, min_area: float = 0.002) -> np.ndarray:
    """Boolean mask of `colour`'s regions in an RGB uint8 array: HSV range, opened 3x3, components under
    min_area (a fraction of the image) dropped, then grown by one pixel for anti-aliased edges and outlines."""
    import cv2

    spec = PALETTE[colour]
    h, s, v = _hsv(arr)
    if "hue" in spec:
        centre, width = spec["hue"]
        d = np.abs((h - centre + 180.0) % 360.0 - 180.0)
        m = (d <= width) & (s >= 0.45) & (v >= 0.30)
    elif "v_max" in spec:
        m = v <= spec["v_max"]
    else:
        m = (s <= spec["s_max"]) & (v >= spec["v_min"])
    m = m.astype(np.uint8)
    k = np.ones((3, 3), np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= max(4, min_area * m.size)
    m = keep[labels].astype(np.uint8)
    if m.any():
        m = cv2.dilate(m, k)
    return m.astype(bool)


def _repaint(arr: np.ndarray, mask: np.ndarray, source: str, target: str) -> np.ndarray:
    """Pixels under mask painted `target`, keeping their shading relative to `source` (value ratio)."""
    src = np.array(PALETTE[source]["rgb"], np.float32)
    tgt = np.array(PALETTE[target]["rgb"], np.float32)
    px = arr[mask].astype(np.float32)
    if source == "black":  # no shading to keep: paint flat, keep the edge blend by the pixel's distance
        out = np.repeat(tgt[None], len(px), 0)
    else:
        ratio = px.max(axis=1, keepdims=True) / max(float(src.max()), 1.0)
        out = tgt[None] * np.clip(ratio, 0.0, 1.2)
    res = arr.copy()
    res[mask] = np.clip(out, 0, 255).astype(np.uint8)
    return res


def colour_words(text: str | None) -> list[str]:
    return [m.lower() for m in _COLOR_WORD.findall(text or "")]


def colour_mapping(caption: str, edit_before: str | None, edit_after: str | None) -> dict[str, str] | None:
    """{source colour: target colour} of a colour edit (replace_att, or a swap of two colours), else None."""
    before, after = colour_words(edit_before), colour_words(edit_after)
    if not before or len(before) != len(after):
        return None
    # the edit must change colours only
    if _COLOR_WORD.sub("#", edit_before or "").lower() != _COLOR_WORD.sub("#", edit_after or "").lower():
        return None
    mapping: dict[str, str] = {}
    for b, a in zip(before, after):
        if b == a:
            continue
        if mapping.get(b, a) != a:
            return None
        mapping[b] = a
    return mapping or None


class RecolorEditor(Editor):
    name = "recolor"
    kinds = ("replace_att", "swap_att")

    def __init__(self, min_area: float = 0.002):
        self.min_area = min_area

    def region(self, image: Image.Image, caption: str, edit_before: str | None, edit_after: str | None):
        """(mapping, {source colour: mask}) or Skip."""
        mapping = colour_mapping(caption, edit_before, edit_after)
        if mapping is None:
            raise Skip(NOT_APPLICABLE, f"not a colour edit ({edit_before!r} -> {edit_after!r})")
        named = colour_words(caption)
        arr = np.asarray(image.convert("RGB"))
        masks = {}
        for src in mapping:
            if named.count(src) > 1:
                raise Skip(NO_REGION, f"{src!r} names {named.count(src)} objects in the caption")
            m = colour_mask(arr, src, self.min_area)
            if not m.any():
                raise Skip(NO_REGION, f"no {src} region found")
            masks[src] = m
        return mapping, masks

    def _edit(self, image, caption, neg_caption, kind, context):
        before, after = context.get("edit_before"), context.get("edit_after")
        mapping, masks = self.region(image, caption, before, after)
        arr = np.asarray(image)
        out = arr
        for src, tgt in mapping.items():  # masks from the original, so a swap does not repaint twice
            out = _repaint(out, masks[src], src, tgt)
        return Image.fromarray(out, "RGB")


# --------------------------------------------------------------------------- diffusion

PIPELINES = {
    "instruct_pix2pix": "StableDiffusionInstructPix2PixPipeline",
    "img2img": "StableDiffusionImg2ImgPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
}


class DiffusionEditor(Editor):
    """diffusers pipelines by hub id or local folder. instruct_pix2pix: "change <before> to <after>" (or "make it
    <negative caption>" for an edit without a before/after); img2img: the negative caption as prompt, `strength` of
    noise; inpaint: the negative caption inside the colour region of a colour edit (other edits: no_region)."""

    name = "diffusion"

    def __init__(self, model: str, pipeline: str = "instruct_pix2pix", device: str = "auto", dtype: str = "auto",
                 steps: int = 20, guidance_scale: float = 7.5, image_guidance_scale: float = 1.5,
                 strength: float = 0.6, seed: int = 0, resolution: int | None = None, gpus: float = 0):
        if pipeline not in PIPELINES:
            raise ValueError(f"unknown diffusion pipeline {pipeline!r}; known: {sorted(PIPELINES)}")
        self.model, self.pipeline_kind, self.device_name, self.dtype_name = model, pipeline, device, dtype
        self.steps, self.guidance_scale, self.image_guidance_scale = steps, guidance_scale, image_guidance_scale
        self.strength, self.seed, self.resolution, self.gpus = strength, seed, resolution, gpus
        self.pipe = None
        self.device = None
        self._recolor = RecolorEditor()

    def setup(self) -> None:
        if self.pipe is not None:
            return
        import diffusers

        from stages.models import locate_model, resolve_device, resolve_dtype

        self.device = resolve_device(self.device_name, self.gpus, stage="negatives_image")
        dtype = resolve_dtype(self.dtype_name, self.device)
        cls = getattr(diffusers, PIPELINES[self.pipeline_kind])
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        kw = {"safety_checker": None, "requires_safety_checker": False}
        self.pipe = cls.from_pretrained(locate_model(self.model), torch_dtype=dtype, **kw).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def _edit(self, image, caption, neg_caption, kind, context):
        import torch

        self.setup()
        w, h = image.size
        side = self.resolution or max(8, (max(w, h) // 8) * 8)
        src = image.resize((side, side), Image.BICUBIC)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        before, after = context.get("edit_before"), context.get("edit_after")
        common = dict(num_inference_steps=self.steps, guidance_scale=self.guidance_scale, generator=gen)
        if self.pipeline_kind == "instruct_pix2pix":
            b, a = (before or "").strip(), (after or "").strip()
            prompt = f"change {b} to {a}" if b and a else (f"add {a}" if a else f"make it {neg_caption}")
            out = self.pipe(prompt=prompt, image=src, image_guidance_scale=self.image_guidance_scale, **common)
        elif self.pipeline_kind == "img2img":
            out = self.pipe(prompt=neg_caption, image=src, strength=self.strength, **common)
        else:
            _, masks = self._recolor.region(image, caption, before, after)
            mask = np.zeros((h, w), bool)
            for m in masks.values():
                mask |= m
            mask_img = Image.fromarray((mask * 255).astype(np.uint8), "L").resize((side, side), Image.NEAREST)
            out = self.pipe(prompt=neg_caption, image=src, mask_image=mask_img, height=side, width=side,
                            strength=1.0, **common)
        res = out.images[0].convert("RGB")
        return res if res.size == (w, h) else res.resize((w, h), Image.BICUBIC)

    def metadata(self) -> dict:
        return {"editor": self.name, "model": self.model, "pipeline": self.pipeline_kind, "steps": self.steps,
                "device": str(self.device) if self.device else self.device_name, "seed": self.seed}


EDITORS: dict[str, type[Editor]] = {"flip": FlipEditor, "recolor": RecolorEditor, "diffusion": DiffusionEditor}


def register_editor(cls: type[Editor]) -> type[Editor]:
    """Add an editor under its name (domain packages register their own, e.g. the demo's `render`)."""
    EDITORS[cls.name] = cls
    return cls


def make_editor(name: str, **options) -> Editor:
    try:
        cls = EDITORS[name]
    except KeyError:
        raise ValueError(f"unknown editor {name!r}; known: {sorted(EDITORS)}") from None
    return cls(**options)
