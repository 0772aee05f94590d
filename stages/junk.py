"""junk: alt text that says nothing about the picture, one reason per kind.

Kinds, checked in this order; a row's `junk_kind` is the first that matches (its reason when the kind is enabled):

- junk_html        HTML entities (&amp; &#39; &nbsp; ...) or tags (<b>, <br />, <a href=...>) left in the text.
                   A bare "&" ("Tom & Jerry", "S&P 500", "H&R Block") is not an entity.
- junk_emoji       no letter in any script: only emoji, symbols, punctuation or digits.
- junk_url         the caption is only URLs or bare domains ("https://...", "www.x.org/u/1", "hitachi-solutions.jp").
                   A URL inside a sentence ("Buy ... Online at johnlewis.com") is not junk.
- junk_filename    the caption is a file name: it ends in an image/file extension attached to its last word
                   ("IMG_2231.JPG", "photo (3).jpeg", "shaker-heritage-barn-wedding-day007.jpg", "Screenshot
                   2021-03-14 at 10.23.31.png", "Scorching June 14 for Alabama.jpg"), or, without an extension, it is a
                   camera name or a hash ("DSC00042", "IMG_20190305_123456", "9f86d081884c7d65", a UUID). Slug names
                   without an extension ("kennedy_nixon_debate_first_chicago_1960") are kept: they describe the image.
                   "Crocosmia in Pot PNG & PSD Images" and "Photo 15: DOWNTOWN Condo ..." are not file names.
- junk_boilerplate the whole caption is a known empty phrase (BOILERPLATE, compared without case, digits or
                   punctuation: "click here", "Image 1 of 5", "Stock Photo", "untitled-3", "loading...") or starts
                   with an auto-generated prefix (BOILERPLATE_PREFIXES: "image may contain: ...", "click here ...").
                   "Stock Photo" at the end of a real description is not junk.
- junk_repeated    one word, appearing >= 3 times, makes up more than half of the word tokens ("sale sale sale
                   sale"; "Baby baby blanket" is fine), or one 2- or 3-word phrase repeated >= 3 times covers more
                   than half of them ("buy now buy now buy now").
- junk_too_long    more than `max_chars` characters (params; default 1000). Computed in process_batch with the
                   stage's max_chars, so changing it needs the stage re-run (it is cheap).

Stats are computed for every row whatever `kinds` enables; decide() rejects a row with reason = junk_kind when that
kind is in params.kinds. Empty captions are not junk here (the basic stage's caption_too_short owns them).
"""
from __future__ import annotations

import html
import re
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from schemas.spec import StageParams, known_kinds
from stages.base import Column, DecideContext, Decision, Reason, Resources, Stage, Threshold

JUNK_KINDS = ["junk_html", "junk_emoji", "junk_url", "junk_filename", "junk_boilerplate", "junk_repeated",
              "junk_too_long"]


class JunkParams(StageParams):
    kinds: list[str] = Field(default_factory=lambda: list(JUNK_KINDS), description="junk kinds that reject")
    max_chars: int = Field(1000, gt=0, description="captions longer than this are junk_too_long")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v: list[str]) -> list[str]:
        return known_kinds(v, JUNK_KINDS, "junk")


KINDS = tuple(JUNK_KINDS)
KIND_DOCS = {
    "junk_html": "HTML entities or tags left in the text",
    "junk_emoji": "no letter in any script: only emoji, symbols, punctuation or digits",
    "junk_url": "the caption is only URLs or bare domains",
    "junk_filename": "the caption is a file name, a camera name or a hash",
    "junk_boilerplate": "the whole caption is an empty phrase (click here, Image 1 of 5, Stock Photo)",
    "junk_repeated": "one word or phrase repeated over most of the caption",
    "junk_too_long": "more characters than max_chars",
}

# ------------------------------------------------------------------------------------------------ html
_NAMED_ENTITY = re.compile(r"&([A-Za-z][A-Za-z0-9]{1,31});")
_NUMERIC_ENTITY = re.compile(r"&#(?:\d{1,7}|[xX][0-9A-Fa-f]{1,6});?")
# The common ones also count without their semicolon ("&amp " "&nbsp"), when no letter follows.
_BARE_ENTITY = re.compile(r"&(?:amp|nbsp|quot|lt|gt|apos)(?![A-Za-z0-9])", re.IGNORECASE)
_HTML_TAGS = (
    "a abbr b big blockquote body br center code div em font h1 h2 h3 h4 h5 h6 head hr html i iframe img input "
    "label li link meta nobr noscript ol p picture pre s script small source span strike strong style sub sup "
    "table tbody td th thead title tr u ul wbr figure figcaption section article header footer nav button"
).split()
_TAG = re.compile(r"<\s*/?\s*(?:" + "|".join(_HTML_TAGS) + r")(?:\s[^<>]{0,500})?\s*/?\s*>", re.IGNORECASE)
_HTML5_ENTITIES = {name.rstrip(";").lower() for name in html.entities.html5}


def find_html(text: str) -> str | None:
    m = _TAG.search(text)
    if m:
        return f"tag {m.group(0)[:40]}"
    for m in _NAMED_ENTITY.finditer(text):
        if m.group(1).lower() in _HTML5_ENTITIES:
            return f"entity {m.group(0)}"
    m = _NUMERIC_ENTITY.search(text) or _BARE_ENTITY.search(text)
    if m:
        return f"entity {m.group(0)}"
    return None


# ------------------------------------------------------------------------------------------------ url
_TLDS = (
    "com net org info biz edu gov mil int io co me tv us uk de fr jp ru cn it es nl au ca br in eu pl ch se no dk fi "
    "at be cz gr hu pt ro tr ua kr tw hk sg nz za mx ar cl vn id my ph th ir il ie sk si hr rs bg lt lv ee is lu "
    "xyz online shop store site club app dev blog news top live art online cc ly fm gl to ws"
).split()
_URL_TOKEN = re.compile(
    r"^(?:(?:https?|ftp)://\S+|www\.\S+|[\w-]+(?:\.[\w-]+)*\.(?:" + "|".join(_TLDS) + r")(?::\d+)?(?:[/?#]\S*)?)$",
    re.IGNORECASE,
)


def find_url(text: str) -> str | None:
    tokens = text.split()
    if tokens and all(_URL_TOKEN.match(t.strip("<>()[]\"'.,;")) for t in tokens):
        return f"url {tokens[0][:60]}"
    return None


# ------------------------------------------------------------------------------------------------ filename
_EXTENSIONS = (
    "jpg jpeg jpe jfif png gif webp bmp tif tiff heic heif svg avif ico raw cr2 nef dng psd eps"
).split()
_WITH_EXT = re.compile(r"^(?P<stem>.*?\S)\.(?P<ext>" + "|".join(_EXTENSIONS) + r")$", re.IGNORECASE)
# Camera, phone and screenshot names; generic words followed only by numbers, dates and times.
_CAMERA = re.compile(
    r"^(?:img|dsc[nf]?|_?mg|gopr|gp|dji|pxl|mvimg|vid|pano|sam|dcim|cimg|imag|p|wp|hpim|sdc|pict|mvc|100_)"
    r"[\s_-]*\d{3,}(?:[\s_-]+[\w-]*\d[\w-]*)*(?:[\s_-]*\(\d+\))?$",
    re.IGNORECASE,
)
_GENERIC_WORDS = (
    r"image|images|img|photo|photos|pic|pics|picture|foto|screenshot|screen\s?shot|whatsapp\s+image|"
    r"untitled|unnamed|scan|scanned|capture|snapshot|download|file|thumb|thumbnail|attachment|upload|default|"
    r"placeholder|main|banner|slide|hero|header|large|small|medium|full|copy"
)
_GENERIC = re.compile(
    r"^(?:" + _GENERIC_WORDS + r")(?:[\s_.-]*(?:\d+|\(\d+\)|at|copy|am|pm|[a-z]?\d+[a-z]?))*$", re.IGNORECASE
)
# "Photo 3", "Slide 12", "untitled-3": boilerplate rather than a file name.
_GENERIC_ONLY_NUMBER = re.compile(r"^(?:" + _GENERIC_WORDS + r")[\s_-]+\d{1,2}$", re.IGNORECASE)
_HEX = re.compile(r"^(?=[0-9a-f_-]*\d)(?=[0-9a-f_-]*[a-f])[0-9a-f]{12,}$|^[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}$",
                  re.IGNORECASE)


def _random_token(stem: str) -> bool:
    """A long single token mixing letters and digits with no word shape: a hash or a CDN id."""
    if " " in stem or len(stem) < 16:
        return False
    digits = sum(c.isdigit() for c in stem)
    letters = sum(c.isalpha() for c in stem)
    return digits >= 0.25 * len(stem) and letters >= 0.25 * len(stem) and not re.search(r"[aeiou]{2}", stem.lower()) \
        and not re.search(r"[_\-\s]", stem)


def _uninformative_stem(stem: str) -> bool:
    s = stem.strip()
    return bool(_CAMERA.match(s) or _GENERIC.match(s) or _HEX.match(s) or _random_token(s))


def find_filename(text: str) -> str | None:
    t = text.strip().strip("\"'")
    if _WITH_EXT.match(t):
        # Alt text that ends in ".jpg" is the file's name, however descriptive the name.
        return f"filename {t[:60]}"
    # No extension: only names that carry no words (camera names with a number, hashes).
    if re.search(r"\d", t) and _uninformative_stem(t) and not _GENERIC_ONLY_NUMBER.match(t):
        return f"filename {t[:60]}"
    return None


# ------------------------------------------------------------------------------------------------ boilerplate
BOILERPLATE = {
    # calls to action
    "click here", "click to enlarge", "click to view", "click to zoom", "click for larger image", "click image to enlarge",
    "click for more", "view larger image", "view larger", "larger image", "enlarge", "enlarge image", "zoom",
    "hover to zoom", "roll over image to zoom in", "see more", "read more", "more info", "view image", "view photo",
    "full size", "full size image", "open image", "download", "download image", "download now",
    # missing images
    "no description available", "no photo description available", "no image", "no image available", "no photo",
    "no picture", "no photo available", "image not found", "image not available", "image unavailable",
    "photo not available", "picture not available", "not available", "coming soon", "image coming soon",
    "photo coming soon", "loading", "please wait", "image loading", "broken image", "missing image",
    # placeholders and generic nouns
    "placeholder", "placeholder image", "image placeholder", "thumbnail", "thumbnail image", "thumb", "untitled",
    "untitled design", "untitled image", "untitled document", "untitled picture", "image", "images", "photo", "photos",
    "picture", "pictures", "pic", "pics", "img", "foto", "fotos", "photograph", "graphic", "icon", "logo", "banner",
    "spacer", "blank", "default", "default image", "featured image", "feature image", "header image", "hero image",
    "main image", "product image", "product photo", "gallery image", "cover image", "image of", "photo of",
    "picture of", "image description", "alt", "alt text", "alt tag", "null", "none", "undefined", "n a", "na", "nan",
    "tbd", "test", "test image", "image for", "photo for", "advertisement", "ad", "sponsored", "slide", "slider",
    "image result", "image result for", "related image", "related post", "related posts",
    # stock boilerplate on its own
    "stock photo", "stock photos", "stock image", "stock images", "stock photography", "stock picture",
    "stock vector", "royalty free", "royalty free stock photo", "royalty free image", "royalty free stock image",
    "stock photo royalty free", "free image", "free stock photo", "free photo", "premium photo", "premium vector",
    "free vector", "vector", "clipart", "clip art", "preview", "sample", "watermark",
}
BOILERPLATE_PREFIXES = (
    "image may contain", "may be an image of", "may be a image of", "may be a cartoon", "may be a meme",
    "may be a graphic", "no photo description available", "click here", "click to enlarge", "click to view",
    "this image has an empty alt attribute", "image result for", "image is loading",
)
_NON_LETTERS = re.compile(r"[^\w\s]|[\d_]")


def normalize_phrase(text: str) -> str:
    return " ".join(_NON_LETTERS.sub(" ", text.lower()).split())


def find_boilerplate(text: str) -> str | None:
    norm = normalize_phrase(text)
    if not norm:
        return None
    if norm in BOILERPLATE:
        return f"phrase {norm!r}"
    for p in BOILERPLATE_PREFIXES:
        if norm == p or norm.startswith(p + " "):
            return f"prefix {p!r}"
    return None


# ------------------------------------------------------------------------------------------------ repeated
_WORD = re.compile(r"\w+", re.UNICODE)


def find_repeated(text: str) -> str | None:
    tokens = _WORD.findall(text.lower())
    n = len(tokens)
    if n < 3:
        return None
    word, count = Counter(tokens).most_common(1)[0]
    if count >= 3 and count * 2 > n:
        return f"token {word!r} x{count} of {n}"
    for size in (2, 3):
        if n < 3 * size:
            continue
        grams = Counter(tuple(tokens[i:i + size]) for i in range(n - size + 1))
        gram, _ = grams.most_common(1)[0]
        # non-overlapping occurrences
        reps, i = 0, 0
        while i <= n - size:
            if tuple(tokens[i:i + size]) == gram:
                reps += 1
                i += size
            else:
                i += 1
        if reps >= 3 and reps * size * 2 > n and len(set(gram)) == size:
            return f"phrase {' '.join(gram)!r} x{reps}"
    return None


# ------------------------------------------------------------------------------------------------ all kinds
def junk_kind(text: str | None, max_chars: int = 1000) -> tuple[str | None, str | None]:
    """(kind, detail) of the first junk kind the caption shows, (None, None) for a usable caption."""
    if text is None or not text.strip():
        return None, None
    t = text.strip()
    d = find_html(t)
    if d:
        return "junk_html", d
    if not any(ch.isalpha() for ch in t):
        return "junk_emoji", "no letters"
    d = find_url(t)
    if d:
        return "junk_url", d
    d = find_filename(t)
    if d:
        return "junk_filename", d
    d = find_boilerplate(t)
    if d:
        return "junk_boilerplate", d
    d = find_repeated(t)
    if d:
        return "junk_repeated", d
    if len(text) > max_chars:
        return "junk_too_long", f"chars={len(text)}"
    return None, None


class JunkStage(Stage):
    name = "junk"
    version = 1
    summary = "alt text that says nothing about the picture, one reason per kind"
    Params = JunkParams
    default_resources = Resources(cpus=1.0, batch_size=1024)
    columns = (
        Column("junk_kind", pa.string(), "first junk kind found (stages.junk.KINDS), null when none", "category"),
        Column("junk_detail", pa.string(), "what matched", "detail"),
    )
    reasons = tuple(
        Reason(k, KIND_DOCS[k], ("caption_chars", "junk_detail"), (Threshold("caption_chars", "max_chars", "max"),))
        if k == "junk_too_long" else Reason(k, KIND_DOCS[k], ("junk_kind", "junk_detail"))
        for k in KINDS)

    params: JunkParams

    def process_batch(self, batch: pa.Table) -> pa.Table:
        kinds, details = [], []
        for text in batch.column("text").to_pylist():
            k, d = junk_kind(text, self.params.max_chars)
            kinds.append(k)
            details.append(d)
        return self.add_columns(batch, {"junk_kind": kinds, "junk_detail": details})

    @classmethod
    def decide(cls, table: pa.Table, params: JunkParams, ctx: DecideContext | None = None) -> Decision:
        d = cls.decision(table.num_rows)
        kinds, details = table.column("junk_kind"), table.column("junk_detail")
        for kind in params.kinds:
            d.reject(pc.equal(kinds, kind), kind, details)
        return d
