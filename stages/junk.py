"""junk: alt text with nothing usable left once normalised, one reason per kind.

The stage reads the normalised caption: `text` as the clean stage left it (with its `clean_edits`), or, in a spec
without a clean stage, `text` normalised here by the same function (stages.clean.normalize_caption). It also reads
what cleaning removed: the alt text as listed (clean's `text_raw`), so a caption that was only URLs, or a file
name under a label ("Name: DSC_0294.jpg"), is junk whatever clean made of it. Markup, mojibake, slugs and file
extensions are cleaned, not rejected: "Gotrek &amp; Felix", "<strong>Comet</strong> Paper Shredder", "Scorching
June 14 for Alabama.jpg" are usable captions.

A widget or search prefix ("Image result for ...", "Click here to enlarge image ...") hides no word: the caption is
judged without it, so "Image result for starfish" is usable and "Google Image Result for http://..." is a URL.

Kinds, checked in this order; a row's `junk_kind` is the first that matches (its reason when the kind is enabled):

- junk_html        markup only: the caption had HTML and no letter is left once it is stripped ("&nbsp;&amp;",
                   "&lt;img src=&quot;pic.jpg&quot;&gt;").
- junk_emoji       no letter in any script: only emoji, symbols, punctuation or digits.
- junk_url         the caption (or the alt text before cleaning) is only URLs or bare domains ("https://...",
                   "www.x.org/u/1", "hitachi-solutions.jp", a URL whose file name holds spaces), or spells a
                   domain out to dodge filters ("... www period tubetob period net": spam).
                   A URL inside a sentence ("Buy ... Online at johnlewis.com") is not junk.
- junk_filename    a file name with no description in it: a camera name or a hash ("DSC00042", "IMG_20190305_123456",
                   "9f86d081884c7d65", a UUID), with or without its extension ("IMG_2231.JPG", "photo (3).jpeg",
                   "Screenshot 2021-03-14 at 10.23.31.png"); or a file name or slug whose words hold no description
                   word (has_description: a word of some language's list that is not a file or page word and not a
                   name, i.e. not about equally frequent in every language): "stackable-1",
                   "JeffHerrington_MBMiami-cover-500". File names and slugs that describe ("Scorching June 14 for
                   Alabama.jpg", "kennedy_nixon_debate_first_chicago_1960") are cleaned into words and kept. Words
                   phones, apps and stock sites put before a number count as file words ("received_1234567890.jpeg",
                   "depositphotos_12345678-stock-photo.jpg"); a file name under a label is judged alone.
                   "Crocosmia in Pot PNG & PSD Images" and "Photo 15: DOWNTOWN Condo ..." are not file names.
- junk_boilerplate the whole caption is a known empty phrase (BOILERPLATE, compared without case, digits or
                   punctuation: "click here", "Image 1 of 5", "Stock Photo", "untitled-3", "loading...", a site's
                   page part such as "Hours & Location" or "Privacy Policy") or starts
                   with an auto-generated prefix (BOILERPLATE_PREFIXES: "image may contain: ...", "click here ..."),
                   or is a call to action about the site rather than a picture: it opens with a call verb (CTA_VERBS:
                   like, follow, welcome, help, subscribe, ...) and is short or speaks of the site or its readers
                   (CTA_TARGETS: our, us, facebook, newsletter, ...): "Welcome to Carousell!", "LIKE X.COM ON
                   FACEBOOK!", "Help our library WIN! Shop from booksellers that support this library.".
                   "Stock Photo" at the end of a real description is not junk; "Buy ... Online at johnlewis.com"
                   and "Watch the Entire Paul Lynde Halloween Special" describe a product or a video.
- junk_repeated    one word, appearing >= 3 times, makes up more than half of the word tokens ("sale sale sale
                   sale"; "Baby baby blanket" is fine), or one 2- or 3-word phrase repeated >= 3 times covers more
                   than half of them ("buy now buy now buy now").
- junk_too_long    more than `max_chars` characters (params; default 1000). Computed in process_batch with the
                   stage's max_chars, so changing it needs the stage re-run (it is cheap).

Stats are computed for every row whatever `kinds` enables; decide() rejects a row with reason = junk_kind when that
kind is in params.kinds. Empty captions are not junk here (the basic stage's caption_too_short owns them), unless
markup was all they held.
"""
from __future__ import annotations

import re
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from schemas.spec import StageParams, known_kinds
from stages.base import Column, DecideContext, Decision, Reason, Resources, Stage, Threshold
from stages.clean import IMAGE_EXTENSIONS, normalize_caption
from stages.nlp.urls import TLDS, only_urls

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
    "junk_html": "markup with nothing left once it is stripped",
    "junk_emoji": "no letter in any script: only emoji, symbols, punctuation or digits",
    "junk_url": "the caption is only URLs or bare domains",
    "junk_filename": "a file, camera or hash name, or a slug with no description word",
    "junk_boilerplate": "an empty phrase or a call to action (click here, Image 1 of 5, Stock Photo)",
    "junk_repeated": "one word or phrase repeated over most of the caption",
    "junk_too_long": "more characters than max_chars",
}

# ------------------------------------------------------------------------------------------------ url


# "www period example period net", "example dot com": a domain spelled out to get past filters (spam).
_SPELLED_DOMAIN = re.compile(
    r"\b(?:www\s+(?:dot|period)\s+\w+|\w+)\s+(?:dot|period)\s+(?:" + "|".join(TLDS[:12]) + r")\b", re.IGNORECASE)


# A URL whose file name holds spaces ("https://x.mobi/media/2018/12/Entrance Gate Of Motihari College.jpg").
_SPACED_URL = re.compile(r"^(?:https?|ftp)://\S+/[^/]*\.(?:" + "|".join(IMAGE_EXTENSIONS) + r")$", re.IGNORECASE)


def url_only(text: str) -> bool:
    """The text is only URLs, or one URL whose file name holds spaces."""
    return only_urls(text) or bool(_SPACED_URL.match(text.strip()))


def find_url(text: str) -> str | None:
    if url_only(text):
        return f"url {text.split()[0][:60]}"
    low = text.lower()
    m = _SPELLED_DOMAIN.search(text) if (" dot " in low or " period " in low) else None
    if m:
        return f"spelled-out url {m.group(0)[:60]!r}"
    return None


# ------------------------------------------------------------------------------------------------ filename
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


# Words of file and page furniture: they name a file's role, not what it shows.
FILE_WORDS = frozenset((
    "image images img photo photos pic pics picture foto screenshot screen shot whatsapp untitled unnamed scan "
    "scanned capture snapshot download file thumb thumbnail attachment upload default placeholder main banner slide "
    "hero header large small medium full copy").split()) | {
    "section", "cover", "page", "home", "final", "web", "edit", "edited", "crop", "cropped", "resized", "bg",
    "background", "logo", "icon", "hero", "banner", "slider", "min", "img", "pic", "jpg", "jpeg", "png", "new", "old",
    "version", "ver", "rev", "draft", "sample", "test", "temp", "tmp", "export", "original", "orig", "hires", "lores",
    "mp", "mov", "avi", "raw", "scaled", "feature", "featured", "post", "blog", "site", "wp", "content", "uploads",
    # what phones, apps and stock sites put before a number ("received_1234567890.jpeg", "media-1584739201.png",
    # "depositphotos_12345678-stock-photo.jpg")
    "received", "media", "mmexport", "snapchat", "picsart", "inshot", "retouch", "facetune", "vsco", "fb", "wa",
    "stock", "shutterstock", "istock", "istockphoto", "depositphotos", "dreamstime", "alamy", "gettyimages",
    "adobestock", "fotolia", "bigstock", "canstock", "freepik", "pexels", "pixabay", "unsplash",
    # camera and phone name prefixes (see _CAMERA)
    "dsc", "dscn", "dscf", "gopr", "dji", "pxl", "mvimg", "vid", "pano", "sam", "dcim", "cimg", "imag", "hpim",
    "sdc", "pict", "mvc"}
_LETTER_WORD = re.compile(r"[^\W\d_]{3,}")


def has_description(text: str) -> bool:
    """Whether the words hold a description word: in some language's word list (stages.nlp.wordfreqs), not a file or
    page word, and not name-like (about as frequent in most languages' lists as in its own: jeff, miami)."""
    from stages.nlp.wordfreqs import word_table

    words = [w for w in (w.casefold() for w in _LETTER_WORD.findall(text)) if w not in FILE_WORDS]
    return bool(words) and bool(word_table().describes(words).any())


def find_filename(text: str, edits: tuple[str, ...] = ()) -> str | None:
    """`text` is the normalised caption; edits says whether it was a file name ("extension") or a slug."""
    t = text.strip().strip("\"'")
    # Names that carry no words (camera names with a number, hashes), with or without their extension.
    if (re.search(r"\d", t) or "extension" in edits) and _uninformative_stem(t) \
            and not (_GENERIC_ONLY_NUMBER.match(t) and "extension" not in edits):
        return f"filename {t[:60]}"
    if "extension" in edits and not has_description(t):
        return f"filename without description {t[:60]}"
    return None


# A file name under a label ("Name: DSC_0294.jpg", "File: scan0001.tif"): the label describes nothing either.
_LABELLED_FILE = re.compile(
    r"^\s*(?:file\s*name|file|name|image|img|photo|picture|pic|foto|attachment)\s*[:=]\s*(\S+\.(?:"
    + "|".join(IMAGE_EXTENSIONS) + r"))\s*$", re.IGNORECASE)


def find_raw_filename(raw: str) -> str | None:
    """The alt text as listed (text_raw) was a file name under a label: judged as the file name alone."""
    m = _LABELLED_FILE.match(raw)
    if not m:
        return None
    stem, edits = normalize_caption(m.group(1))
    d = find_filename(stem or "", edits)
    return f"{d} (under a label)" if d else None


def find_nondescript_slug(text: str, edits: tuple[str, ...] = ()) -> str | None:
    """A caption that was one slug ("stackable-1", "JeffHerrington_MBMiami-cover-500") with no description word."""
    if "slug" in edits and "ui_prefix" not in edits and len(text.split()) <= 8 and not has_description(text):
        return f"slug without description {text[:60]}"
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
    # a site's navigation and page parts
    "home", "home page", "homepage", "about", "about us", "contact", "contact us", "hours location",
    "hours and location", "location and hours", "our team", "our story", "privacy policy", "terms of use",
    "terms and conditions", "terms of service", "site map", "sitemap", "faq", "faqs", "log in", "login", "sign in",
    "sign up", "my account", "shopping cart", "checkout", "subscribe", "newsletter", "rss", "rss feed", "rss feeds",
    "back to top", "next page", "previous page",
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
# Calls to action about the site, not the picture: a call verb first, and a short caption or one that speaks of the
# site, its pages or its readers.
CTA_VERBS = frozenset(
    "follow welcome help support join subscribe share donate vote visit register signup login contact call "
    "tap swipe pin retweet repost tag bookmark".split())
CTA_TARGETS = frozenset(
    "our us facebook twitter instagram pinterest youtube tiktok linkedin newsletter page website blog channel "
    "feed profile account".split())
CTA_MAX_WORDS_ALONE = 4


# "LIKE X.COM ON FACEBOOK!", "find us on Instagram": a call anywhere in the caption to a social network.
_SOCIAL_CALL = re.compile(r"\b(?:like|follow|find|join|add|friend|subscribe)\b.{0,60}?\bon\s+(?:facebook|twitter|"
                          r"instagram|pinterest|youtube|tiktok|linkedin|snapchat)\b", re.IGNORECASE)


_SOCIAL_NETWORK = re.compile(r"facebook|twitter|instagram|pinterest|youtube|tiktok|linkedin|snapchat")


def find_call_to_action(text: str) -> str | None:
    low = text.lower()
    m = _SOCIAL_CALL.search(text) if " on " in low and _SOCIAL_NETWORK.search(low) else None
    if m:
        return f"call to action {m.group(0)[:60]!r}"
    words = _WORD_LETTERS.findall(text.lower())
    if not words or words[0] not in CTA_VERBS:
        return None
    if len(words) <= CTA_MAX_WORDS_ALONE or CTA_TARGETS.intersection(words):
        return f"call to action {' '.join(words[:6])!r}"
    return None


_WORD_LETTERS = re.compile(r"[^\W\d_]+")
_NON_LETTERS = re.compile(r"[^\w\s]|[\d_]")


def normalize_phrase(text: str) -> str:
    return " ".join(_NON_LETTERS.sub(" ", text.lower()).split())


_PREFIX_STARTS = tuple(sorted({p.split()[0] for p in BOILERPLATE_PREFIXES}))
_MAX_PHRASE_CHARS = 3 * max(len(p) for p in BOILERPLATE)  # room for the digits and punctuation dropped around it


def find_boilerplate(text: str) -> str | None:
    low = text.lstrip(" \"'([{*#-").lower()
    if len(text) <= _MAX_PHRASE_CHARS or low.startswith(_PREFIX_STARTS):
        norm = normalize_phrase(text)
        if norm in BOILERPLATE:
            return f"phrase {norm!r}"
        for p in BOILERPLATE_PREFIXES:
            if norm == p or norm.startswith(p + " "):
                return f"prefix {p!r}"
    return find_call_to_action(text)


# Widget and search prefixes hide no word of what follows ("Image result for Roots: book cover", "Click here to
# enlarge image and see more about item ..."): the caption is judged without them (alone they are boilerplate).
WIDGET_PREFIXES = ("google image result for", "image result for", "click here to enlarge image",
                   "click here to enlarge", "click here to view", "click here", "click to view larger image of",
                   "click to view", "click to enlarge", "image is loading")
_WIDGET_PREFIX = re.compile(r"^\W*(?:" + "|".join(p.replace(" ", r"\s+") for p in WIDGET_PREFIXES) + r")\b[\s:.,-]*",
                            re.IGNORECASE)


def without_widget_prefix(text: str) -> str:
    """The caption without a widget or search prefix; the caption itself when it has none or is only one."""
    m = _WIDGET_PREFIX.match(text)
    rest = text[m.end():].strip() if m else ""
    return rest if rest and any(ch.isalpha() for ch in rest) else text


# ------------------------------------------------------------------------------------------------ repeated
_WORD = re.compile(r"\w+", re.UNICODE)


def find_repeated(text: str) -> str | None:
    tokens = _WORD.findall(text.lower())
    n = len(tokens)
    if n < 3 or len(set(tokens)) * 2 >= n + 6:  # no word or 2-3 word phrase can cover half of them
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
def junk_kind(text: str | None, max_chars: int = 1000, edits: tuple[str, ...] | None = None,
              raw: str | None = None) -> tuple[str | None, str | None]:
    """(kind, detail) of the first junk kind the caption shows, (None, None) for a usable caption.

    `edits` None: `text` is raw alt text, normalised here first. Otherwise `text` is already normalised, `edits`
    are the clean stage's steps for it and `raw` the alt text as listed (text_raw), read as evidence of what
    cleaning removed: URLs only, or a file name under a label."""
    if text is None:
        return None, None
    if edits is None:
        raw = text
        text, edits = normalize_caption(text)
    raw = raw if raw is not None and raw != text else None
    t = text.strip()
    if not any(ch.isalpha() for ch in t):
        if "html" in edits:
            return "junk_html", "markup only"
        return ("junk_emoji", "no letters") if t else (None, None)
    t = without_widget_prefix(t)
    d = find_url(t) or (raw and url_only(raw) and f"url before cleaning {raw.split()[0][:60]}")
    if d:
        return "junk_url", d
    d = find_filename(t, edits) or (raw and find_raw_filename(raw))
    if d:
        return "junk_filename", d
    d = find_boilerplate(t)
    if d:
        return "junk_boilerplate", d
    d = find_nondescript_slug(t, edits)
    if d:
        return "junk_filename", d
    d = find_repeated(t)
    if d:
        return "junk_repeated", d
    if len(t) > max_chars:
        return "junk_too_long", f"chars={len(t)}"
    return None, None


class JunkStage(Stage):
    name = "junk"
    version = 3  # issue 23: widget prefixes judged by what follows; URLs with spaces; page parts
    summary = "alt text that says nothing about the picture (judged after cleaning, and on the alt text as listed)"
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

    # `text`; with a clean stage before it, also its `clean_edits` and the alt text as listed, `text_raw`
    reads = ("text", "text_raw", "clean_edits")

    params: JunkParams

    def process_batch(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        if "clean_edits" in batch.column_names:  # the clean stage ran: text is normalised, its edits recorded
            edits = [tuple(e.split(",")) if e else () for e in batch.column("clean_edits").to_pylist()]
            raws = batch.column("text_raw").to_pylist() if "text_raw" in batch.column_names else [None] * len(texts)
        else:
            edits = [None] * len(texts)
            raws = [None] * len(texts)
        kinds, details = [], []
        for text, e, raw in zip(texts, edits, raws):
            k, d = junk_kind(text, self.params.max_chars, e, raw)
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
