"""ingest: URL list -> downloaded pairs, with img2dataset's Downloader doing the fetching and resizing.

Plain Python: the flow distributes `ingest_shard` over Ray, one call per input shard. Every URL ends either
in the shard's pairs or in its rejects, with a reason from REASONS.
"""
from __future__ import annotations

import io
import ipaddress
import json
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from PIL import Image

from schemas.columns import INGEST_FIELDS, INPUT_SCHEMA, REJECT_SCHEMA
from schemas.records import make_uid
from schemas.spec import IngestSpec, SourceSpec
from stages.io.build_folder import BuildFolder, atomic_write_table, atomic_write_text

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Reject reasons of the input and ingest steps.
REASONS = {
    "missing_url": "the row has no URL",
    "missing_image": "a corpus row has no image bytes",
    "bad_url": "the URL is not an http(s) URL",
    "duplicate_input_row": "the same URL and caption are listed again",
    "seen_in_earlier_build": "an incremental build skips uids earlier builds of the source processed",
    "blocked_address": "the host resolves to a private, loopback, link-local or reserved address the spec does not allow",
    "dns_error": "the host name does not resolve",
    "connection_error": "the connection was refused or reset",
    "timeout": "no answer within the spec's timeout",
    "opt_out": "the server opts the image out of AI use (X-Robots-Tag)",
    "too_large": "the response is bigger than the spec's max_bytes",
    "decompression_bomb": "the image header declares more pixels than the spec's max_pixels",
    "truncated": "the file ends before the image does",
    "not_an_image": "the bytes are no image (HTML, text, unknown format)",
    "resize_failed": "the image could not be decoded or resized",
    "download_error": "any other download failure",
}


class IngestError(ValueError):
    """Bad input to ingest, with a message that names the file and the problem."""


# --------------------------------------------------------------------------- reading the URL list

def read_url_list(src: SourceSpec) -> pa.Table:
    """Read the source list into (url, text) strings; clear errors for a bad file or missing columns."""
    path = Path(src.urls)
    fmt = src.format
    if fmt == "auto":
        suffix = "".join(path.suffixes[-1:]).lower()
        fmt = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix)
        if fmt is None:
            raise IngestError(f"{path}: cannot tell the format from the suffix {suffix!r}; set source.format")
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        elif fmt in ("csv", "tsv"):
            table = pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={src.url_col: pa.string(), src.caption_col: pa.string()}
                ),
            )
        else:
            table = pajson.read_json(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(f"{path}: cannot read as {fmt}: {e}") from None
    missing = [c for c in (src.url_col, src.caption_col) if c not in table.column_names]
    if missing:
        raise IngestError(
            f"{path}: column(s) {missing} not found (source.url_col / source.caption_col); "
            f"the file has {table.column_names}"
        )
    urls = table.column(src.url_col).cast(pa.string())
    texts = table.column(src.caption_col).cast(pa.string())
    return pa.table({"url": urls, "text": texts})


def assign_uids(table: pa.Table, source: str, seen: dict[str, int] | None = None) -> tuple[pa.Table, pa.Table]:
    """Give every listed row a uid; rows that cannot be fetched go to rejects. Returns (inputs, rejects)."""
    seen = {} if seen is None else seen
    keep = {"uid": [], "url": [], "text": [], "source": []}
    rej = {k: [] for k in REJECT_SCHEMA.names}
    for row, (url, text) in enumerate(zip(table.column("url").to_pylist(), table.column("text").to_pylist())):
        url_s = (url or "").strip()
        reason = None
        if not url_s:
            reason, detail, uid = "missing_url", f"row {row}", make_uid("", text, row + 1)
        else:
            parts = urlsplit(url_s)
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                reason, detail = "bad_url", url_s[:200]
            key = make_uid(url_s, text)
            n = seen.get(key, 0)
            seen[key] = n + 1
            uid = make_uid(url_s, text, n) if n else key
            if n and reason is None:
                reason, detail = "duplicate_input_row", f"repeat {n} of {key}"
        if reason:
            for k, v in zip(REJECT_SCHEMA.names, (uid, url, text, "input", reason, detail, None)):
                rej[k].append(v)
        else:
            keep["uid"].append(uid)
            keep["url"].append(url_s)
            keep["text"].append(text)
            keep["source"].append(source)
    return pa.table(keep, schema=INPUT_SCHEMA), pa.table(rej, schema=REJECT_SCHEMA)


# --------------------------------------------------------------------------- the address guard

class AddressGuard:
    """Refuses URLs whose host resolves to a non-public address, unless allow_hosts lists it.

    allow_hosts entries: a host name or IP ("127.0.0.1"), host:port ("127.0.0.1:8619") or a CIDR ("10.0.0.0/8").
    """

    def __init__(self, allow_hosts: list[str] | tuple[str, ...] = ()):
        self.hosts: set[str] = set()
        self.host_ports: set[tuple[str, int]] = set()
        self.networks = []
        for entry in allow_hosts:
            entry = entry.strip().lower()
            if "/" in entry:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            elif entry.count(":") == 1 and entry.rsplit(":", 1)[1].isdigit():
                host, port = entry.rsplit(":", 1)
                self.host_ports.add((host, int(port)))
            else:
                self.hosts.add(entry.strip("[]"))

    @staticmethod
    @lru_cache(maxsize=65536)
    def resolve(host: str) -> tuple[str, ...]:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return tuple(sorted({i[4][0] for i in infos}))

    def _allowed(self, host: str, port: int, ip: str) -> bool:
        if host in self.hosts or ip in self.hosts:
            return True
        if (host, port) in self.host_ports or (ip, port) in self.host_ports:
            return True
        addr = ipaddress.ip_address(ip)
        return any(addr in n for n in self.networks)

    def check(self, url: str) -> tuple[str, str] | None:
        """None if the URL may be fetched, else (reason, detail). Makes no connection to the host."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return "bad_url", f"bad port in {url[:200]}"
        try:
            ips = self.resolve(host)
        except (socket.gaierror, UnicodeError) as e:
            return "dns_error", f"{host}: {e}"
        for ip in ips:
            addr = ipaddress.ip_address(ip.split("%")[0])
            public = addr.is_global and not addr.is_multicast
            if not public and not self._allowed(host, port, str(addr)):
                return "blocked_address", f"{host} -> {addr} (not public; allow it with ingest.allow_hosts)"
        return None


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only if its target passes the guard."""

    def __init__(self, guard: AddressGuard):
        self.guard = guard

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        verdict = self.guard.check(newurl)
        if verdict:
            raise urllib.error.URLError(f"{verdict[0]}: redirect to {newurl}: {verdict[1]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _ByteCap(urllib.request.BaseHandler):
    """Refuses responses over max_bytes, by Content-Length up front and by counting while reading."""

    handler_order = 1000

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def http_response(self, request, response):
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise urllib.error.URLError(f"too_large: Content-Length {length} > max_bytes {self.max_bytes}")
        read, cap = response.read, self.max_bytes

        def capped_read(amt=None):
            data = read(cap + 1) if amt is None or amt > cap + 1 else read(amt)
            if amt is None and len(data) > cap:
                raise urllib.error.URLError(f"too_large: body over max_bytes {cap}")
            return data

        response.read = capped_read
        return response

    https_response = http_response


def install_guarded_opener(guard: AddressGuard, max_bytes: int) -> None:
    """img2dataset fetches with urllib.request.urlopen, which uses the process-wide opener."""
    urllib.request.install_opener(urllib.request.build_opener(_GuardedRedirects(guard), _ByteCap(max_bytes)))


# --------------------------------------------------------------------------- guarded decode

def _truncation(data: bytes, fmt: str | None) -> str | None:
    tail = data.rstrip(b"\x00")
    if fmt == "JPEG" and b"\xff\xd9" not in tail[-64:]:
        return "JPEG ends without its end-of-image marker"
    if fmt == "PNG" and b"IEND" not in tail[-16:]:
        return "PNG ends without its IEND chunk"
    if fmt == "GIF" and not tail.endswith(b";"):
        return "GIF ends without its trailer"
    return None


def precheck_image(data: bytes, max_pixels: int) -> str | None:
    """Cheap checks before any pixel is decoded: not an image, too many pixels, cut short."""
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in head:
        return "not_an_image: HTML document"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h, fmt = im.width, im.height, im.format
    except Image.DecompressionBombError as e:
        return f"decompression_bomb: {e}"
    except Exception as e:
        return f"not_an_image: {type(e).__name__}: {e}"
    if w * h > max_pixels:
        return f"decompression_bomb: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}"
    cut = _truncation(data, fmt)
    return f"truncated: {cut}" if cut else None


def _guarded_resizer(params: IngestSpec):
    from img2dataset.resizer import Resizer

    class GuardedResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            data = img_stream.getvalue() if hasattr(img_stream, "getvalue") else img_stream.read()
            problem = precheck_image(data, params.max_pixels)
            if problem:
                return None, None, None, None, None, problem
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

    return GuardedResizer(
        image_size=params.image_size,
        resize_mode=params.resize_mode,
        resize_only_if_bigger=params.resize_only_if_bigger,
        encode_format=params.encode_format,
        encode_quality=params.encode_quality,
        max_image_area=params.max_pixels,
    )


# --------------------------------------------------------------------------- errors -> reasons

def classify_error(message: str | None) -> str:
    m = (message or "").lower()
    for prefix in ("blocked_address", "too_large", "decompression_bomb", "truncated", "not_an_image"):
        if prefix in m:
            return prefix
    if m.startswith("http error "):
        code = m.split()[2].rstrip(":")
        return f"http_{code}" if code.isdigit() else "download_error"
    if "x-robots-tag" in m:
        return "opt_out"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "name or service not known" in m or "nodename nor servname" in m or "name resolution" in m:
        return "dns_error"
    if "refused" in m or "reset" in m or "remote end closed" in m or "connection" in m:
        return "connection_error"
    if "image decoding error" in m:
        return "not_an_image"
    if "image area too large" in m:
        return "decompression_bomb"
    return "download_error"


# --------------------------------------------------------------------------- one shard

def ingest_shard(folder: BuildFolder, shard_id: int, params: IngestSpec) -> dict:
    """Download one input shard; writes its pairs and rejects, then a done marker. Idempotent."""
    paths = folder.ingest_shard(shard_id)
    if paths.done.exists():
        return json.loads(paths.done.read_text())
    inputs = pq.read_table(folder.input_shard(shard_id))

    guard = AddressGuard(params.allow_hosts)
    verdicts = [guard.check(u) for u in inputs.column("url").to_pylist()]
    blocked = pa.array([v is not None for v in verdicts])
    to_fetch = inputs.filter(pa.compute.invert(blocked))
    refused = inputs.filter(blocked)
    rej_rows = [
        (uid, url, text, "ingest", v[0], v[1])
        for (uid, url, text), v in zip(
            zip(*(refused.column(c).to_pylist() for c in ("uid", "url", "text"))), [v for v in verdicts if v]
        )
    ]

    raw = _download(to_fetch, params) if to_fetch.num_rows else None
    pairs, fetch_rejects = split_raw(raw, inputs.column("source")[0].as_py() if inputs.num_rows else None)
    rej_rows += fetch_rejects
    rejects = pa.table(
        {k: [r[i] for r in rej_rows] for i, k in enumerate(REJECT_SCHEMA.names[:6])} | {"build_id": [None] * len(rej_rows)},
        schema=REJECT_SCHEMA,
    )
    if pairs.num_rows + rejects.num_rows != inputs.num_rows:
        raise RuntimeError(
            f"ingest shard {shard_id}: {inputs.num_rows} in, {pairs.num_rows} pairs + {rejects.num_rows} rejects out"
        )
    atomic_write_table(rejects, paths.rejects)
    atomic_write_table(pairs, paths.pairs)
    summary = {
        "shard": shard_id,
        "rows_in": inputs.num_rows,
        "pairs": pairs.num_rows,
        "rejects": rejects.num_rows,
        "bytes": int(sum(len(b) for b in pairs.column("image").to_pylist() if b)),
    }
    atomic_write_text(paths.done, json.dumps(summary))
    return summary


PAIRS_SCHEMA = pa.schema(list(INPUT_SCHEMA) + INGEST_FIELDS)


def _download(inputs: pa.Table, params: IngestSpec) -> pa.Table:
    """Run img2dataset's Downloader over one shard in this process; returns its raw Parquet table."""
    from img2dataset.downloader import Downloader
    from img2dataset.writer import ParquetSampleWriter

    install_guarded_opener(AddressGuard(params.allow_hosts), params.max_bytes)
    tmp = Path(tempfile.mkdtemp(prefix="pairforge-ingest-"))
    try:
        feed = tmp / "input.arrow"
        table = pa.table({"uid": inputs["uid"], "url": inputs["url"], "caption": inputs["text"]})
        with pa.OSFile(str(feed), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        (tmp / "out").mkdir()
        downloader = Downloader(
            sample_writer_class=ParquetSampleWriter,
            resizer=_guarded_resizer(params),
            thread_count=params.thread_count,
            save_caption=False,
            extract_exif=False,
            output_folder=str(tmp / "out"),
            column_list=["uid", "url", "caption"],
            timeout=params.timeout_s,
            number_sample_per_shard=max(inputs.num_rows, 10),
            oom_shard_count=5,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=params.encode_format,
            retries=params.retries,
            user_agent_token=params.user_agent_token,
            disallowed_header_directives=params.optout_directives if params.respect_optout else None,
        )
        downloader.download_shard((0, str(feed)))
        return pq.read_table(tmp / "out" / "00000.parquet")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def split_raw(raw: pa.Table | None, source: str | None) -> tuple[pa.Table, list[tuple]]:
    """img2dataset's raw rows -> (pairs table, reject tuples (uid, url, text, stage, reason, detail))."""
    if raw is None or raw.num_rows == 0:
        return PAIRS_SCHEMA.empty_table(), []
    d = raw.to_pydict()
    img_col = next(c for c in ("jpg", "png", "webp") if c in d)
    pairs = {k: [] for k in PAIRS_SCHEMA.names}
    rejects = []
    for i, status in enumerate(d["status"]):
        if status == "success":
            pairs["uid"].append(d["uid"][i])
            pairs["url"].append(d["url"][i])
            pairs["text"].append(d["caption"][i])
            pairs["source"].append(source)
            pairs["image"].append(d[img_col][i])
            for k in ("width", "height", "original_width", "original_height", "sha256"):
                pairs[k].append(d[k][i])
        else:
            msg = d["error_message"][i]
            rejects.append((d["uid"][i], d["url"][i], d["caption"][i], "ingest", classify_error(msg), msg))
    return pa.table(pairs, schema=PAIRS_SCHEMA), rejects


# --------------------------------------------------------------------------- existing corpora (curate)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")


def corpus_kind(src: SourceSpec) -> str:
    if src.format not in ("auto", "parquet", "webdataset"):
        raise IngestError(f"{src.pairs}: source.pairs reads parquet or webdataset, not {src.format}")
    if src.format != "auto":
        return src.format
    p = Path(src.pairs)
    if p.is_dir() and any(p.glob("*.tar")):
        return "webdataset"
    return "parquet"


def iter_corpus(src: SourceSpec, batch_rows: int = 1000):
    """Yield tables (url, text, image) from a Parquet corpus or a WebDataset folder, in a stable order."""
    if corpus_kind(src) == "webdataset":
        yield from _iter_webdataset(Path(src.pairs), batch_rows)
        return
    import pyarrow.dataset as pads

    try:
        ds = pads.dataset(str(src.pairs), format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(f"{src.pairs}: cannot read as parquet: {e}") from None
    missing = [c for c in (src.caption_col, src.image_col) if c not in ds.schema.names]
    if missing:
        raise IngestError(f"{src.pairs}: column(s) {missing} not found (source.caption_col / source.image_col); "
                          f"the corpus has {ds.schema.names}")
    cols = [src.caption_col, src.image_col] + ([src.url_col] if src.url_col in ds.schema.names else [])
    for rb in ds.to_batches(columns=cols, batch_size=batch_rows):
        image = rb.column(src.image_col)
        if pa.types.is_struct(image.type):  # Hugging Face datasets' Image feature: {bytes, path}
            image = image.field("bytes")
        n = rb.num_rows
        url = rb.column(src.url_col).cast(pa.string()) if src.url_col in rb.schema.names else pa.nulls(n, pa.string())
        yield pa.table({"url": url, "text": rb.column(src.caption_col).cast(pa.string()),
                        "image": image.cast(pa.binary())})


def _iter_webdataset(folder: Path, batch_rows: int):
    import tarfile

    rows: dict[str, list] = {"url": [], "text": [], "image": []}

    def flush_sample(parts: dict):
        if not parts:
            return
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
            except ValueError:
                meta = {}
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        text = parts["txt"].decode("utf-8", "replace") if "txt" in parts else meta.get("caption")
        rows["url"].append(meta.get("url"))
        rows["text"].append(text)
        rows["image"].append(img)

    for tar_path in sorted(folder.glob("*.tar")):
        key, parts = None, {}
        with tarfile.open(tar_path) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                if k != key:
                    flush_sample(parts)
                    key, parts = k, {}
                    if len(rows["url"]) >= batch_rows:
                        yield pa.table(rows, schema=_CORPUS_SCHEMA)
                        rows = {"url": [], "text": [], "image": []}
                parts[ext.lower()] = tf.extractfile(member).read()
        flush_sample(parts)
    if rows["url"]:
        yield pa.table(rows, schema=_CORPUS_SCHEMA)


_CORPUS_SCHEMA = pa.schema([("url", pa.string()), ("text", pa.string()), ("image", pa.binary())])


def corpus_pairs(batch: pa.Table, source: str, seen: dict[str, int]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """A corpus batch -> (inputs, pairs, rejects). Rows without a URL are named by their image's sha256."""
    import hashlib

    pairs = {k: [] for k in PAIRS_SCHEMA.names}
    rej = {k: [] for k in REJECT_SCHEMA.names}
    for url, text, img in zip(*(batch.column(c).to_pylist() for c in ("url", "text", "image"))):
        sha = hashlib.sha256(img).hexdigest() if img else None
        name = (url or "").strip() or (f"sha256:{sha}" if sha else "")
        key = make_uid(name, text)
        n = seen.get(key, 0)
        seen[key] = n + 1
        uid = make_uid(name, text, n) if n else key
        reason = "missing_image" if not img else ("duplicate_input_row" if n else None)
        if reason:
            for k, v in zip(REJECT_SCHEMA.names, (uid, url, text, "input", reason, None, None)):
                rej[k].append(v)
            continue
        try:
            with Image.open(io.BytesIO(img)) as im:
                w, h = im.width, im.height
        except Exception:
            w = h = None  # basic's decode check owns undecodable images
        for k, v in (("uid", uid), ("url", url or name), ("text", text), ("source", source), ("image", img),
                     ("width", w), ("height", h), ("original_width", w), ("original_height", h), ("sha256", sha)):
            pairs[k].append(v)
    pairs_t = pa.table(pairs, schema=PAIRS_SCHEMA)
    return pairs_t.select(INPUT_SCHEMA.names), pairs_t, pa.table(rej, schema=REJECT_SCHEMA)
