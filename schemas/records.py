"""Record identity: normalised URLs and deterministic uids."""
from __future__ import annotations

import hashlib
from urllib.parse import urlsplit, urlunsplit


def normalize_url(url: str) -> str:
    """Lower-case scheme and host, drop the fragment and default ports; keep path and query as given.
    A URL that does not parse (a bad port, an unclosed IPv6 bracket) is returned stripped, as given."""
    try:
        u = urlsplit(url.strip())
        port = u.port
    except ValueError:
        return url.strip()
    host = (u.hostname or "").lower()
    if port and not ((u.scheme == "http" and port == 80) or (u.scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    if u.username or u.password:
        cred = u.username or ""
        if u.password:
            cred += ":" + u.password
        host = f"{cred}@{host}"
    return urlunsplit((u.scheme.lower(), host, u.path or "/", u.query, ""))


def make_uid(url: str, text: str | None, occurrence: int = 0) -> str:
    """128-bit hex uid of (normalised url, caption); the n-th repeat of a pair gets its own uid."""
    h = hashlib.blake2b(digest_size=16)
    h.update(normalize_url(url).encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update((text or "").encode("utf-8", "surrogatepass"))
    if occurrence:
        h.update(b"\x00%d" % occurrence)
    return h.hexdigest()
