"""Why a listed row was not fetched or not kept by input preparation and ingest: the reasons, what each means,
and the mapping from a failed download's error text to its reason."""
from __future__ import annotations

import re

from schemas.errors import UserError

# Reject reasons of the input and ingest steps.
REASONS = {
    "missing_url": "the row has no URL",
    "malformed_row": "the row does not parse: a CSV/TSV line with the wrong number of fields, a JSONL line that is "
                     "not a JSON object; `text` holds the line",
    "missing_image": "a corpus row has no image bytes",
    "bad_url": "the URL cannot be parsed or names no host",
    "bad_scheme": "the URL (or a redirect) is not http or https (file:, ftp:, data: ...): never fetched",
    "duplicate_input_row": "the same URL and caption are listed again",
    "seen_in_earlier_build": "an incremental build skips uids earlier builds of the source processed",
    "blocked_address": "the host resolves to a private, loopback, link-local or reserved address the spec does not allow",
    "dns_error": "the host name does not resolve",
    "connection_refused": "nothing listens on the host's port (connection refused)",
    "connection_error": "the connection failed, was reset or closed before a complete HTTP answer",
    "tls_error": "the TLS handshake failed: bad or expired certificate, wrong host name, no common protocol",
    "timeout": "no complete response (DNS, connect, headers and body together) within ingest.timeout_s",
    "too_many_redirects": "a redirect loop, or more redirects than ingest.max_redirects",
    "opt_out": "the server opts the image out of AI use (X-Robots-Tag)",
    "too_large": "the response is bigger than the spec's max_bytes",
    "decompression_bomb": "the image header declares more pixels than the spec's max_pixels",
    "truncated": "the file ends before the image does",
    "not_an_image": "the bytes are no image (HTML, text, unknown format)",
    "resize_failed": "the image could not be decoded or resized",
    "download_error": "any other download failure",
}


class IngestError(UserError):
    """Bad input to ingest, with a message that names the file and the problem."""


# --------------------------------------------------------------------------- errors -> reasons

_REASON_PREFIX = re.compile(r"^([a-z][a-z0-9_]*): ")


def classify_error(message: str | None) -> str:
    """The reason of a failed row from img2dataset's error text: ours start with "reason: " (FetchError, the
    guarded resizer); the rest are img2dataset's or urllib's own words."""
    text = message or ""
    hit = _REASON_PREFIX.match(text)
    if hit and (hit.group(1) in REASONS or re.fullmatch(r"http_[0-9]{3}", hit.group(1))):
        return hit.group(1)
    m = text.lower()
    if m.startswith("http error "):
        code = m.split()[2].rstrip(":")
        return f"http_{code}" if code.isdigit() else "download_error"
    if "x-robots-tag" in m:
        return "opt_out"
    if "image decoding error" in m:
        return "not_an_image"
    if "image area too large" in m:
        return "decompression_bomb"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "name or service not known" in m or "nodename nor servname" in m or "name resolution" in m:
        return "dns_error"
    if "refused" in m:
        return "connection_refused"
    if "reset" in m or "remote end closed" in m or "connection" in m:
        return "connection_error"
    return "download_error"


def reason_text(reason: str | None) -> str | None:
    """What an input or ingest reason means, for the report and `pairforge show`; None for other stages' reasons."""
    if reason in REASONS:
        return REASONS[reason]
    hit = re.fullmatch(r"http_([0-9]{3})", reason or "")
    if hit:
        from http import HTTPStatus

        code = int(hit.group(1))
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "unknown status"
        return f"the server answered HTTP {code} ({phrase})"
    return None
