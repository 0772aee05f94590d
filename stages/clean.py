"""clean: the caption normaliser. It rewrites `text`, keeps the alt text as it came in `text_raw`, rejects nothing.

Later stages, hard negatives and training read the cleaned `text`; uids were derived from the raw row at input
(schemas.records.make_uid), so identities do not change. Steps, in order; each one that changes the caption adds
its name to `clean_edits` (comma-separated, null when the caption came out unchanged):

- html          tags stripped (<b>, <br />, <a href=...>, also once unescaped: &lt;i&gt;) and entities unescaped
                (&amp; &#x27; &nbsp; ..., double escapes too); "AT&T", "S&P 500" have no entity and stay.
- mojibake      UTF-8 read as Latin-1/cp1252 and the like, repaired by ftfy.fix_encoding ("CafÃ©" -> "Café").
- control       control characters, NUL, zero-width and bidi marks, soft hyphens removed (ZWJ/ZWNJ, which
                shape Indic scripts and emoji, are kept).
- quotes        a caption still wrapped in CSV quoting ('"22"" Frozen Bubble Balloon"') is unwrapped.
- extension     an image-file extension on the last word is dropped ("Scorching June 14 for Alabama.jpg").
- ui_prefix     a gallery widget's prefix in front of a real caption is dropped ("Image is loading ...",
                "Click to enlarge ..."); alone it stays, for the junk stage.
- slug          underscores become spaces; a caption written as one slug ("inside-blue-mosque-istanbul-turkey",
                "CuteSpiderman") or holding a long slug token of 4+ parts is split into words; trailing ids of
                such captions (long numbers, hashes: "..._1372086846", "8de65cd444aa4") are dropped. URLs and
                domains stay whole (stages.nlp.urls), for junk and language to recognise.
- whitespace    runs of any Unicode space (no-break spaces included) collapse to one; ends are stripped.

`normalize_caption` is idempotent (a cleaned caption comes back unchanged) and takes a fast path for plain
ASCII prose. Whether what is left is usable is the junk stage's call; an empty result is null-free ("").
"""
from __future__ import annotations

import html
import re
from typing import ClassVar

import pyarrow as pa

from schemas.spec import StageParams
from stages.base import Column, DecideContext, Decision, Resources, Stage
from stages.nlp.urls import is_url_token


class CleanParams(StageParams):
    """The caption normaliser has no thresholds: it rewrites `text` and rejects nothing."""

EDITS = ("html", "mojibake", "control", "quotes", "extension", "ui_prefix", "slug", "whitespace")

IMAGE_EXTENSIONS = (
    "jpg jpeg jpe jfif png gif webp bmp tif tiff heic heif svg avif ico raw cr2 nef dng psd eps"
).split()

# Any tag-shaped run: "<" + a tag name + attributes + ">". "<3" and "a < b" are not tags.
_TAG = re.compile(r"<\s*/?\s*[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]{0,500})?\s*/?\s*>")
_ENTITY_HINT = re.compile(r"&(?:#\d|#[xX][0-9A-Fa-f]|[A-Za-z]{2,})")
_CONTROL = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u2069\ufeff\ufff9-\ufffb\ufffe\uffff]")
UI_PREFIXES = ("image is loading", "click to enlarge", "click to zoom", "click image to enlarge", "hover to zoom",
               "roll over image to zoom in", "tap to zoom", "click for larger image")
_UI_PREFIX = re.compile(r"^(?:" + "|".join(p.replace(" ", r"\s+") for p in UI_PREFIXES) + r")\b[\s:.,-]*",
                        re.IGNORECASE)
_SLUG_SEP = re.compile(r"[-+]+|%20")
_CAMEL = re.compile(r"(?<=[a-z]{2})(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z]{2})")
_EXTENSION_SET = frozenset(IMAGE_EXTENSIONS)
_NOT_SLUG = re.compile(r"[./:@]")  # a one-word caption with these is a URL, a domain or an e-mail: left whole
# Trailing ids left by slugs: long numbers, and hashes mixing digits and letters.
_ID_TOKEN = re.compile(r"^(?:\d{5,}|(?=[a-z0-9]*\d)(?=[a-z0-9]*[a-z])[a-z0-9]{8,})$", re.IGNORECASE)
_PLAIN = re.compile(r"^[A-Za-z0-9 ,.;:!?'()/#$%*=@\[\]{}|~^`\\+-]*$")  # ASCII without & < _ " or controls


def _strip_html(t: str) -> str:
    for _ in range(3):  # alt text is often escaped twice (&amp;lt;b&amp;gt;)
        u = html.unescape(_TAG.sub(" ", t))
        if u == t:
            break
        t = u
    return _TAG.sub(" ", t)


def _unquote_csv(t: str) -> str:
    if len(t) > 2 and t[0] == '"' and t[-1] == '"':
        inner = t[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return t


def _has_extension(t: str) -> bool:
    """An image extension on the last word, which is not a URL or path ("https://x.org/a.jpg" is left to junk)."""
    head, dot, ext = t.rpartition(".")
    return bool(dot) and ext.lower() in _EXTENSION_SET and bool(head) and (head[-1].isalnum() or head[-1] in ")]_") \
        and "/" not in head.rpartition(" ")[2]


def _is_long_slug(token: str) -> bool:
    """A token of 5+ hyphen-joined parts with letters: "NWT-Polo-Sport-Ralph-Lauren-Drawstring-Bag-Backpack-"."""
    return token.count("-") >= 4 and sum(any(c.isalpha() for c in p) for p in token.split("-")) >= 4


def _split_long_slugs(t: str) -> str:
    if t.count("-") < 4:
        return t
    return " ".join(_split_slug(w) if _is_long_slug(w) and not is_url_token(w) else w for w in t.split(" "))


def _split_slug(token: str) -> str:
    words = _SLUG_SEP.sub(" ", token).split()
    return " ".join(_CAMEL.sub(" ", w) for w in words)


def _underscores_to_spaces(t: str) -> str:
    if "_" not in t:
        return t
    if "/" not in t and "." not in t:
        return t.replace("_", " ")
    return " ".join(w if is_url_token(w) else w.replace("_", " ") for w in t.split(" "))


def _drop_trailing_ids(t: str) -> str:
    """Drop trailing ids, if two words with letters remain ("IMG 20190305 123456" stays a camera name)."""
    words = t.split()
    n = len(words)
    while n > 1 and _ID_TOKEN.match(words[n - 1]):
        n -= 1
    if sum(any(c.isalpha() for c in w) for w in words[:n]) < 2:
        return t
    return " ".join(words[:n])


def normalize_caption(text: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(cleaned caption, names of the steps that changed it). None stays None."""
    if text is None:
        return None, ()
    if " " in text and _PLAIN.match(text) and "  " not in text and text == text.strip() \
            and not _has_extension(text) and not _UI_PREFIX.match(text) and _split_long_slugs(text) == text:
        return text, ()  # plain ASCII prose: nothing to do
    edits: list[str] = []
    t = text
    if "<" in t or _ENTITY_HINT.search(t):
        u = _strip_html(t)
        if u != t:
            edits.append("html")
            t = u
    if not t.isascii():
        import ftfy

        u = ftfy.fix_encoding(t)
        if u != t:
            edits.append("mojibake")
            t = u
    u = _CONTROL.sub("", t)
    if u != t:
        edits.append("control")
        t = u
    if " ".join(text.split()) != text:
        edits.append("whitespace")
    t = " ".join(t.split())
    for step, fn in (("quotes", _unquote_csv), ("extension", lambda x: x.rpartition(".")[0].rstrip() if _has_extension(x) else x)):
        u = fn(t)
        if u != t:
            edits.append(step)
            t = u
    m = _UI_PREFIX.match(t)
    if m and len(t[m.end():].split()) >= 2:
        edits.append("ui_prefix")
        t = t[m.end():]
    u = _underscores_to_spaces(t)
    if " " not in t and not _NOT_SLUG.search(t) and (_SLUG_SEP.search(u) or _CAMEL.search(u) or u != t):
        u = _split_slug(u)
    else:
        u = _split_long_slugs(u)
    if u != t:
        edits.append("slug")
        t = _drop_trailing_ids(u)
    return " ".join(t.split()), tuple(edits)


class CleanStage(Stage):
    name = "clean"
    version = 2
    summary = "caption normaliser: HTML, mojibake, control characters, slugs and file names; rewrites `text`"
    Params = CleanParams
    default_resources = Resources(cpus=1.0, batch_size=1024)
    columns = (
        Column("text_raw", pa.string(), "the caption as listed, before stages.clean normalised `text`", "detail"),
        Column("clean_edits", pa.string(), "comma-separated steps that changed it (stages.clean.EDITS); null: none",
               "category"),
    )
    # The one stage allowed to change an input column (checked in Stage.__call__).
    rewrites: ClassVar[tuple[str, ...]] = ("text",)
    reads = ("text",)

    params: CleanParams

    def process_batch(self, batch: pa.Table) -> pa.Table:
        raw = batch.column("text")
        cleaned, edits = [], []
        for t in raw.to_pylist():
            c, e = normalize_caption(t)
            cleaned.append(c)
            edits.append(",".join(e) if e else None)
        out = self.add_columns(batch, {"text_raw": raw, "clean_edits": edits})
        return self.rewrite_column(out, "text", cleaned)

    @classmethod
    def decide(cls, table: pa.Table, params: CleanParams, ctx: DecideContext | None = None) -> Decision:
        return cls.decision(table.num_rows)  # the junk stage judges what is left
