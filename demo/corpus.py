"""The demo web-crawl corpus: a URL list with captions, served by demo.server, with labelled faults.

`generate_corpus(out_dir, n, seed, base_url)` writes, deterministically for (n, seed, base_url, image_size):

    out_dir/files/...        the served bodies (images, truncated images, HTML)
    out_dir/routes.json      {url_path: {file, status, headers, delay_s, content_type}}
    out_dir/urls.parquet     url, caption (the build's input, rows shuffled)
    out_dir/labels.parquet   uid, url, caption, fault, expected_stage, expected_reason, group, is_original, scene,
                             render_seed, file
    out_dir/corpus.json      the summary returned

Every row is labelled with the fault planted in it and the (stage, reason) a correct build rejects it with (both
null for rows a build should keep). Rows that show the same picture share `group`; the original is the earliest of
its group in urls.parquet order, so a dedup that keeps the first occurrence keeps the original.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from demo.scenes import Scene, caption, caption_foreign, render_scene, sample_scene
from schemas.records import make_uid, normalize_url

DEFAULT_BASE_URL = "http://127.0.0.1:8619"

# fault -> (expected_stage, expected_reason); None, None for rows a build should keep.
FAULTS: dict[str, tuple[str | None, str | None]] = {
    "clean": (None, None),
    "real_photo": (None, None),
    "text_image": ("text", "text_heavy"),
    "wrong_caption": ("align", "low_alignment"),
    "exact_dup": ("dedup", "duplicate_exact"),
    "near_dup_reencode": ("dedup", "duplicate_near"),
    "near_dup_resize": ("dedup", "duplicate_near"),
    "near_dup_crop": ("dedup", "duplicate_near"),
    "text_overlay": ("text", "text_heavy"),
    "watermark": ("text", "text_heavy"),
    "junk_caption": ("junk", None),  # reason depends on the kind, see JUNK_KINDS
    "foreign_language": ("language", "language_not_kept"),
    "short_caption": ("basic", "caption_too_few_words"),
    "http_404": ("ingest", "http_404"),
    "http_500": ("ingest", "http_500"),
    "timeout": ("ingest", "timeout"),
    "truncated": ("ingest", "truncated"),
    "html_as_image": ("ingest", "not_an_image"),
    "optout": ("ingest", "opt_out"),
    "duplicate_input": ("input", "duplicate_input_row"),
}

# Fractions of n; "clean" takes what is left; real_photo and text_image are a fixed set of packaged images.
FRACTIONS: dict[str, float] = {
    "wrong_caption": 0.05,
    "exact_dup": 0.03,
    "near_dup_reencode": 0.05 / 3,
    "near_dup_resize": 0.05 / 3,
    "near_dup_crop": 0.05 / 3,
    "text_overlay": 0.03,
    "watermark": 0.02,
    "junk_caption": 0.03,
    "foreign_language": 0.03,
    "short_caption": 0.01,
    "http_404": 0.008,
    "http_500": 0.008,
    "timeout": 0.008,
    "truncated": 0.008,
    "html_as_image": 0.008,
    "optout": 0.008,
    "duplicate_input": 0.005,
}

TIMEOUT_DELAY_S = 30.0
# Near-duplicate variants are kept within this pHash (imagehash.phash, 64 bits) distance of their original.
NEAR_DUP_MAX_HAMMING = 6
# Distinct pictures (different groups) are at least this many pHash bits apart.
DISTINCT_MIN_HAMMING = 13

JUNK_KINDS = ("junk_filename", "junk_url", "junk_boilerplate", "junk_repeated", "junk_emoji", "junk_html")

# Packaged real images (skimage/data, sklearn/datasets/images) with true handwritten captions.
REAL_PHOTOS: list[tuple[str, str, str]] = [
    ("skimage", "astronaut.png", "a smiling astronaut in an orange suit in front of an american flag"),
    ("skimage", "chelsea.png", "a close-up of a tabby cat with green eyes"),
    ("skimage", "coffee.png", "a cup of coffee on a red saucer on a wooden table"),
    ("skimage", "rocket.jpg", "a rocket standing on a launch pad at night"),
    ("skimage", "motorcycle_left.png", "a red motorcycle parked in a garage"),
    ("skimage", "horse.png", "a black silhouette of a horse on a white background"),
    ("skimage", "coins.png", "rows of old silver coins on a dark background"),
    ("skimage", "camera.png", "a black and white photo of a man looking through a camera on a tripod"),
    ("skimage", "brick.png", "a close-up of a grey brick wall"),
    ("skimage", "grass.png", "a black and white close-up of grass"),
    ("skimage", "gravel.png", "a black and white close-up of gravel"),
    ("skimage", "moon.png", "a grey photo of the surface of the moon with craters"),
    ("skimage", "hubble_deep_field.jpg", "many small distant galaxies in a dark sky"),
    ("skimage", "retina.jpg", "a photograph of the back of a human eye with blood vessels"),
    ("skimage", "ihc.png", "a microscope image of stained tissue"),
    ("sklearn", "china.jpg", "a chinese pagoda on a hill beside a lake with trees"),
    ("sklearn", "flower.jpg", "an orange dahlia flower in front of green leaves"),
]
TEXT_IMAGES: list[tuple[str, str, str]] = [
    ("skimage", "text.png", "handwritten numbers and symbols on a sheet of paper"),
    ("skimage", "page.png", "a page of printed text about image segmentation"),
]

_OVERLAY_WORDS = (
    "SALE", "FREE", "NEW", "BEST", "PRICE", "OFFER", "LIMITED", "WIN", "CLICK", "SHOP", "DEAL", "NOW", "50% OFF",
    "BUY", "HOT", "TODAY", "ONLY", "SAVE", "GIFT", "VIP", "TOP 10", "LIVE", "MEGA", "CASH",
)
_WATERMARKS = ("© stockpix", "SAMPLE", "PREVIEW", "© imagebank", "shutterfoto", "DEMO COPY", "© photoland")
_URL_PREFIXES = ("/img/", "/images/", "/media/", "/photos/", "/static/uploads/", "/cdn/i/")

_HTML_404 = b"<!doctype html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n"
_HTML_500 = (
    b"<!doctype html><html><head><title>500 Internal Server Error</title></head><body><h1>Oops</h1></body></html>\n"
)
_HTML_PAGE = (
    b"<!doctype html>\n<html><head><title>Shapes gallery</title></head>\n<body>\n<h1>Shapes gallery</h1>\n"
    b"<p>This page moved. <a href=\"/gallery\">Click here</a> to continue.</p>\n</body></html>\n"
)


def _package_dir(which: str) -> Path:
    """skimage/data or sklearn/datasets/images, found without importing the (slow to import) packages."""
    import importlib.util

    spec = importlib.util.find_spec("skimage" if which == "skimage" else "sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{which} is not installed; the demo corpus reads its packaged images")
    base = Path(list(spec.submodule_search_locations)[0])
    return base / "data" if which == "skimage" else base / "datasets" / "images"


def load_real_photo(which: str, name: str, short_side: int = 256) -> Image.Image:
    im = Image.open(_package_dir(which) / name)
    im.load()
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    w, h = im.size
    s = short_side / min(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)


def _encode(im: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _fit_font(draw: ImageDraw.ImageDraw, text: str, size: int, max_w: float) -> ImageFont.FreeTypeFont:
    while True:
        font = ImageFont.load_default(size=size)
        x0, _, x1, _ = draw.textbbox((0, 0), text, font=font, stroke_width=max(1, size // 14))
        if x1 - x0 <= max_w or size <= 8:
            return font
        size = int(size * 0.9)


def add_text_overlay(im: Image.Image, rng: random.Random) -> Image.Image:
    """Large random words over much of the image (an ad banner / meme look)."""
    im = im.copy()
    w, h = im.size
    draw = ImageDraw.Draw(im)
    lines = rng.randint(2, 4)
    band = h / lines
    for i in range(lines):
        text = " ".join(rng.choice(_OVERLAY_WORDS) for _ in range(rng.randint(1, 2)))
        font = _fit_font(draw, text, int(band * rng.uniform(0.75, 0.95)), w * 0.96)
        stroke = max(1, font.size // 14)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        x = rng.uniform(0, max(0.0, w - (x1 - x0))) - x0
        y = i * band + (band - (y1 - y0)) / 2 - y0
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        lum = 0.3 * fill[0] + 0.59 * fill[1] + 0.11 * fill[2]
        outline = (0, 0, 0) if lum > 110 else (255, 255, 255)
        draw.text((x, y), text, font=font, fill=fill, stroke_width=stroke, stroke_fill=outline)
    return im


def add_watermark(im: Image.Image, rng: random.Random) -> Image.Image:
    """A semi-transparent text watermark tiled diagonally over the whole image."""
    w, h = im.size
    text = rng.choice(_WATERMARKS)
    big = int(math.hypot(w, h)) + 4
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=max(10, int(min(w, h) * rng.uniform(0.12, 0.16))))
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    tw, th = x1 - x0, y1 - y0
    alpha = rng.randint(130, 170)
    light = rng.random() < 0.6
    fill = (255, 255, 255, alpha) if light else (0, 0, 0, alpha)
    stroke = (0, 0, 0, alpha // 2) if light else (255, 255, 255, alpha // 2)
    step_y = int(th * 2.2)
    for row, y in enumerate(range(-th, big, step_y)):
        offset = (row % 2) * (tw + th) // 2
        for x in range(-tw + offset, big, tw + th):
            draw.text((x - x0, y - y0), text, font=font, fill=fill, stroke_width=1, stroke_fill=stroke)
    layer = layer.rotate(rng.uniform(20, 40), resample=Image.BICUBIC)
    left, top = (big - w) // 2, (big - h) // 2
    layer = layer.crop((left, top, left + w, top + h))
    return Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB")


def junk_caption(kind: str, rng: random.Random, scene: Scene | None = None) -> str:
    """Alt text of the given junk kind (see JUNK_KINDS)."""
    if kind == "junk_filename":
        return rng.choice(
            [
                f"IMG_{rng.randint(1000, 9999)}.JPG",
                f"DSC{rng.randint(0, 99999):05d}.jpg",
                f"image_{rng.randint(0, 999):03d}.png",
                f"photo ({rng.randint(1, 9)}).jpeg",
                f"Screenshot 2021-0{rng.randint(1, 9)}-1{rng.randint(0, 9)} at 10.{rng.randint(10, 59)}.31.png",
                f"{rng.getrandbits(64):016x}.webp",
            ]
        )
    if kind == "junk_url":
        return rng.choice(
            [
                f"https://www.example.com/images/{rng.randint(100, 99999)}.jpg",
                f"http://cdn.shop-site.net/gallery?id={rng.randint(1, 9999)}&size=large",
                f"www.picturehost.org/u/{rng.getrandbits(32):08x}",
                f"https://i.imgcdn.io/{rng.getrandbits(40):010x}.png",
            ]
        )
    if kind == "junk_boilerplate":
        options = ["click here", "click to enlarge", "no description available", "placeholder image", "thumbnail",
                   "image not found", "loading...", "untitled"]
        if scene is not None:
            g = scene.groups[0]
            options.append(f"image may contain: {g.shape}, {g.color}")
        options.append("image may contain: one or more objects")
        return rng.choice(options)
    if kind == "junk_repeated":
        word = rng.choice(["image", "photo", "pic", "shape", "art", "cool"] + (
            [scene.groups[0].shape, scene.groups[0].color] if scene is not None else []))
        return " ".join([word] * rng.randint(4, 9))
    if kind == "junk_emoji":
        pool = ["😍", "🔥", "⭐", "🔴", "🔵", "💛", "✨", "👍", "🎨", "❤️", "🟢", "🟣"]
        return "".join(rng.choice(pool) for _ in range(rng.randint(2, 6)))
    if kind == "junk_html":
        return rng.choice(
            [
                "&nbsp;&nbsp;&amp;&nbsp;",
                "&lt;img src=&quot;pic.jpg&quot;&gt;",
                "&#8203;&#8203;&nbsp;&#160;",
                "&quot;&quot;&amp;nbsp;",
                "&lt;br /&gt;&lt;br /&gt;&nbsp;",
            ]
        )
    raise ValueError(kind)


def _phash(im: Image.Image) -> imagehash.ImageHash:
    return imagehash.phash(im.convert("RGB"))


def _phash_int(im: Image.Image) -> int:
    return int(str(_phash(im)), 16)


class _HashIndex:
    """64-bit pHashes of the distinct pictures so far, for a brute-force nearest distance."""

    def __init__(self, capacity: int):
        self.hashes = np.zeros(capacity, dtype=np.uint64)
        self.size = 0

    def add(self, h: int) -> None:
        if self.size == len(self.hashes):
            self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
        self.hashes[self.size] = h
        self.size += 1

    def min_distance(self, h: int) -> int:
        if not self.size:
            return 64
        return int(np.bitwise_count(self.hashes[: self.size] ^ np.uint64(h)).min())


def near_duplicate(kind: str, data: bytes, rng: random.Random, max_hamming: int = NEAR_DUP_MAX_HAMMING,
                   tries: int = 30) -> bytes | None:
    """JPEG bytes of a near-duplicate of the encoded image `data`, within `max_hamming` pHash bits of it.

    near_dup_reencode: JPEG quality 60-75; near_dup_resize: half the width and height; near_dup_crop: 5-10% of
    the area cut away (random sides). None when no try lands within `max_hamming`.
    """
    im = Image.open(io.BytesIO(data)).convert("RGB")
    h0 = _phash(im)
    for _ in range(tries):
        if kind == "near_dup_reencode":
            out = _encode(im, "jpg", quality=rng.randint(60, 75))
        elif kind == "near_dup_resize":
            out = _encode(im.resize((im.width // 2, im.height // 2), Image.LANCZOS), "jpg")
        elif kind == "near_dup_crop":
            keep = math.sqrt(1 - rng.uniform(0.05, 0.10))
            cw, ch = round(im.width * (1 - keep)), round(im.height * (1 - keep))
            left, top = rng.randint(0, cw), rng.randint(0, ch)
            out = _encode(im.crop((left, top, im.width - (cw - left), im.height - (ch - top))), "jpg")
        else:
            raise ValueError(kind)
        if _phash(Image.open(io.BytesIO(out))) - h0 <= max_hamming:
            return out
    return None


def short_caption(scene: Scene, rng: random.Random) -> str:
    """A one- or two-word caption naming part of the scene: 'circle', 'red square', 'stars'."""
    g = scene.groups[0]
    noun = g.shape + ("s" if g.count > 1 else "")
    return rng.choice([noun, f"{g.color} {noun}", g.shape])


def _counts(n: int) -> dict[str, int]:
    counts = {k: max(1, round(f * n)) for k, f in FRACTIONS.items()}
    counts["real_photo"] = len(REAL_PHOTOS)
    counts["text_image"] = len(TEXT_IMAGES)
    faulty = sum(counts.values())
    clean = n - faulty
    if clean < n // 2:
        raise ValueError(f"n={n} is too small for the demo corpus (need n >= 200)")
    counts["clean"] = clean
    return counts


class _Writer:
    """Collects rows, routes and files."""

    def __init__(self, root: Path, base_url: str, rng: random.Random):
        self.root = root
        self.base_url = base_url.rstrip("/")
        self.rng = rng
        self.routes: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []
        self.group = 0
        self.files_written: dict[str, int] = {}

    def new_path(self, ext: str) -> str:
        while True:
            path = f"{self.rng.choice(_URL_PREFIXES)}{self.rng.getrandbits(48):012x}.{ext}"
            if path not in self.routes:
                return path

    def write_file(self, rel: str, data: bytes) -> str:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        self.files_written[rel] = len(data)
        return rel

    def route(self, ext: str, file: str | None, status: int = 200, content_type: str | None = None,
              headers: dict[str, str] | None = None, delay_s: float = 0.0) -> str:
        path = self.new_path(ext)
        if content_type is None:
            content_type = {"jpg": "image/jpeg", "png": "image/png"}[ext]
        self.routes[path] = {"file": file, "status": status, "headers": dict(headers or {}), "delay_s": delay_s,
                             "content_type": content_type}
        return path

    def image_route(self, data: bytes, ext: str, **kw: Any) -> tuple[str, str]:
        path = self.new_path(ext)
        rel = self.write_file(f"files{path}", data)
        ctype = {"jpg": "image/jpeg", "png": "image/png"}[ext]
        self.routes[path] = {"file": rel, "status": kw.get("status", 200), "headers": dict(kw.get("headers") or {}),
                             "delay_s": kw.get("delay_s", 0.0), "content_type": ctype}
        return path, rel

    def next_group(self) -> int:
        self.group += 1
        return self.group - 1

    def add(self, path: str, text: str, fault: str, *, group: int, is_original: bool, scene: Scene | None,
            render_seed: int | None, file: str | None, reason: str | None = None) -> dict[str, Any]:
        stage, default_reason = FAULTS[fault]
        row = {
            "url": self.base_url + path,
            "caption": text,
            "fault": fault,
            "expected_stage": stage,
            "expected_reason": reason if reason is not None else default_reason,
            "group": group,
            "is_original": is_original,
            "scene": scene.to_json() if scene is not None else None,
            "render_seed": render_seed,
            "file": file,
        }
        self.rows.append(row)
        return row


def generate_corpus(out_dir: Path, n: int = 3000, seed: int = 0, base_url: str = DEFAULT_BASE_URL,
                    image_size: int = 128) -> dict:
    """Write the demo corpus under `out_dir` (see the module docstring); returns the summary."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "files").exists():
        shutil.rmtree(out_dir / "files")
    rng = random.Random(seed)
    counts = _counts(n)
    w = _Writer(out_dir, base_url, rng)
    S = image_size

    index = _HashIndex(n + 64)

    def new_scene() -> tuple[Scene, int, Image.Image]:
        scene = sample_scene(rng)
        rseed = rng.getrandbits(63)
        return scene, rseed, render_scene(scene, S, rseed)

    def scene_row(fault: str, *, im_transform=None, text=None, reason=None, fmt=None, **route_kw) -> dict:
        scene = sample_scene(rng)
        fmt = fmt or ("png" if rng.random() < 0.1 else "jpg")
        # Distinct pictures stay DISTINCT_MIN_HAMMING pHash bits apart, so that near-duplicate variants (within
        # NEAR_DUP_MAX_HAMMING of their original) are never near any other picture: redraw with a new seed if not.
        for attempt in range(50):
            rseed = rng.getrandbits(63)
            im = render_scene(scene, S, rseed)
            if im_transform is not None:
                im = im_transform(im)
            data = _encode(im, fmt)
            h = _phash_int(Image.open(io.BytesIO(data)))
            if index.min_distance(h) >= DISTINCT_MIN_HAMMING:
                break
        index.add(h)
        path, rel = w.image_route(data, fmt, **route_kw)
        text = text(scene) if callable(text) else (text or caption(scene, rng))
        return w.add(path, text, fault, group=w.next_group(), is_original=True, scene=scene, render_seed=rseed,
                     file=rel, reason=reason)

    # Clean originals.
    clean_rows = [scene_row("clean") for _ in range(counts["clean"])]

    # Real photos and text images from the packaged data folders.
    for fault, items in (("real_photo", REAL_PHOTOS), ("text_image", TEXT_IMAGES)):
        for which, name, text in items:
            data = _encode(load_real_photo(which, name), "jpg")
            index.add(_phash_int(Image.open(io.BytesIO(data))))
            path, rel = w.image_route(data, "jpg")
            w.add(path, text, fault, group=w.next_group(), is_original=True, scene=None, render_seed=None, file=rel)

    # Copies of clean originals: each original is copied at most once. Near-duplicate variants are re-drawn
    # until their pHash is within NEAR_DUP_MAX_HAMMING of the original's (pHash is fragile under crops).
    copy_kinds = ["exact_dup", "near_dup_reencode", "near_dup_resize", "near_dup_crop", "duplicate_input"]
    pool = list(clean_rows)
    rng.shuffle(pool)
    for kind in copy_kinds:
        made = 0
        while made < counts[kind]:
            src = pool.pop()
            scene = Scene.from_json(src["scene"])
            if kind == "duplicate_input":
                w.add(src["url"][len(w.base_url):], src["caption"], kind, group=src["group"], is_original=False,
                      scene=scene, render_seed=src["render_seed"], file=src["file"])
            elif kind == "exact_dup":
                path = w.route(src["file"].rsplit(".", 1)[1], src["file"])
                w.add(path, caption(scene, rng), kind, group=src["group"], is_original=False, scene=scene,
                      render_seed=src["render_seed"], file=src["file"])
            else:
                out = near_duplicate(kind, (out_dir / src["file"]).read_bytes(), rng)
                if out is None:
                    continue  # this original is too fragile for the variant: take another
                path, rel = w.image_route(out, "jpg")
                w.add(path, caption(scene, rng), kind, group=src["group"], is_original=False, scene=scene,
                      render_seed=src["render_seed"], file=rel)
            made += 1

    # Pictures with a caption that describes another scene.
    def wrong_text(scene: Scene) -> str:
        pairs = {(g.shape, g.color) for g in scene.groups}
        while True:
            other = sample_scene(rng)
            if not pairs & {(g.shape, g.color) for g in other.groups}:
                return caption(other, rng)

    for _ in range(counts["wrong_caption"]):
        scene_row("wrong_caption", text=wrong_text)

    for _ in range(counts["text_overlay"]):
        scene_row("text_overlay", im_transform=lambda im: add_text_overlay(im, rng))
    for _ in range(counts["watermark"]):
        scene_row("watermark", im_transform=lambda im: add_watermark(im, rng))

    for i in range(counts["junk_caption"]):
        kind = JUNK_KINDS[i % len(JUNK_KINDS)]
        scene_row("junk_caption", text=lambda sc, kind=kind: junk_caption(kind, rng, sc), reason=kind)
    for i in range(counts["foreign_language"]):
        lang = ("de", "fr", "es")[i % 3]
        scene_row("foreign_language", text=lambda sc, lang=lang: caption_foreign(sc, lang))
    for _ in range(counts["short_caption"]):
        scene_row("short_caption", text=lambda sc: short_caption(sc, rng))

    # Broken URLs.
    f404 = w.write_file("files/_errors/404.html", _HTML_404)
    f500 = w.write_file("files/_errors/500.html", _HTML_500)
    fpage = w.write_file("files/_errors/page.html", _HTML_PAGE)
    html = "text/html; charset=utf-8"
    for fault, status, body in (("http_404", 404, f404), ("http_500", 500, f500)):
        for _ in range(counts[fault]):
            path = w.route("jpg", body, status=status, content_type=html)
            w.add(path, caption(sample_scene(rng), rng), fault, group=w.next_group(), is_original=True, scene=None,
                  render_seed=None, file=body)
    for _ in range(counts["html_as_image"]):
        path = w.route("jpg", fpage, content_type="image/jpeg")
        w.add(path, caption(sample_scene(rng), rng), "html_as_image", group=w.next_group(), is_original=True,
              scene=None, render_seed=None, file=fpage)
    for _ in range(counts["timeout"]):
        scene_row("timeout", delay_s=TIMEOUT_DELAY_S)
    for _ in range(counts["optout"]):
        scene_row("optout", headers={"X-Robots-Tag": "noai"})
    for _ in range(counts["truncated"]):
        scene, rseed, im = new_scene()
        data = _encode(im, "jpg")
        cut = data[: int(len(data) * rng.uniform(0.4, 0.6))]
        path, rel = w.image_route(cut, "jpg")
        w.add(path, caption(scene, rng), "truncated", group=w.next_group(), is_original=True, scene=scene,
              render_seed=rseed, file=rel)

    rows = w.rows
    assert len(rows) == n, (len(rows), n)

    # Shuffle, then put each group's original first among the group's rows.
    rng.shuffle(rows)
    by_group: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_group.setdefault(r["group"], []).append(i)
    for idx in by_group.values():
        if len(idx) > 1:
            orig = next(i for i in idx if rows[i]["is_original"])
            first = min(idx)
            rows[orig], rows[first] = rows[first], rows[orig]

    seen: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (normalize_url(r["url"]), r["caption"])
        occ = seen.get(key, 0)
        seen[key] = occ + 1
        r["uid"] = make_uid(r["url"], r["caption"], occ)

    (out_dir / "routes.json").write_text(json.dumps(w.routes, indent=1, sort_keys=True))
    pq.write_table(
        pa.table({"url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows]}),
        out_dir / "urls.parquet",
    )
    label_schema = pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("fault", pa.string()),
            pa.field("expected_stage", pa.string()),
            pa.field("expected_reason", pa.string()),
            pa.field("group", pa.int64()),
            pa.field("is_original", pa.bool_()),
            pa.field("scene", pa.string()),
            pa.field("render_seed", pa.int64()),
            pa.field("file", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=label_schema), out_dir / "labels.parquet")

    fault_counts: dict[str, int] = {}
    for r in rows:
        fault_counts[r["fault"]] = fault_counts.get(r["fault"], 0) + 1
    summary = {
        "n": n,
        "seed": seed,
        "base_url": w.base_url,
        "image_size": image_size,
        "counts": dict(sorted(fault_counts.items())),
        "routes": len(w.routes),
        "files": len(w.files_written),
        "bytes": sum(w.files_written.values()),
        "paths": {
            "root": str(out_dir),
            "files": str(out_dir / "files"),
            "routes": str(out_dir / "routes.json"),
            "urls": str(out_dir / "urls.parquet"),
            "labels": str(out_dir / "labels.parquet"),
            "summary": str(out_dir / "corpus.json"),
        },
    }
    (out_dir / "corpus.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.corpus", description="Write the demo corpus.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-url", default=DEFAULT_BASE_URL)
    ap.add_argument("--image-size", type=int, default=128)
    a = ap.parse_args(argv)
    summary = generate_corpus(a.out_dir, n=a.n, seed=a.seed, base_url=a.base_url, image_size=a.image_size)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
