"""URLs, domains and e-mail addresses in captions: what clean leaves whole, junk judges and language ignores.

A URL token is a scheme URL ("https://...", "ftp://..."), a "www." address, or a domain with a known top-level
domain and an optional port and path ("hitachi-solutions.jp", "example.de/ueber-uns/kontakt"). "Mr.Dyf", "No.1555"
and "St. Petersburg" are not: their last part is not a top-level domain.
"""
from __future__ import annotations

import re

TLDS = (
    "com net org info biz edu gov mil int io co me tv us uk de fr jp ru cn it es nl au ca br in eu pl ch se no dk fi "
    "at be cz gr hu pt ro tr ua kr tw hk sg nz za mx ar cl vn id my ph th ir il ie sk si hr rs bg lt lv ee is lu "
    "xyz online shop store site club app dev blog news top live art cc ly fm gl to ws"
).split()
_TLD = "(?:" + "|".join(TLDS) + ")"
_DOMAIN = r"[\w-]+(?:\.[\w-]+)*\." + _TLD + r"(?::\d+)?"

# One whitespace-delimited token that is a URL, a www. address or a domain (with its path), nothing else.
URL_TOKEN = re.compile(r"^(?:(?:https?|ftp)://\S+|www\.\S+|" + _DOMAIN + r"(?:[/?#]\S*)?)$", re.IGNORECASE)
# The same shapes inside running text, and e-mail addresses.
_URL_IN_TEXT = re.compile(
    r"(?:\b[a-z][a-z0-9+.-]*://|\bwww\.)\S+|\b[\w.+-]+@[\w-]+\.[\w.-]+\b|(?<![\w@.-])" + _DOMAIN
    + r"(?:[/?#]\S*)?(?![\w.-]*\w)", re.IGNORECASE)
_EDGE = "<>()[]{}\"'.,;:!?"


def is_url_token(token: str) -> bool:
    """A token (punctuation around it ignored) that is a URL, a www. address or a bare domain."""
    return bool(URL_TOKEN.match(token.strip(_EDGE)))


def only_urls(text: str) -> bool:
    """The text is one or more URL tokens and nothing else."""
    tokens = text.split()
    return bool(tokens) and all(is_url_token(t) for t in tokens)


def strip_urls(text: str) -> str:
    """The text with URLs, www. addresses, domains (and their paths) and e-mail addresses replaced by a space."""
    if "." not in text and "/" not in text and "@" not in text:
        return text
    return _URL_IN_TEXT.sub(" ", text)
