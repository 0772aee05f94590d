"""ingest: URL list -> downloaded pairs, with img2dataset's Downloader doing the fetching and resizing.

Plain Python: the flow distributes `ingest_shard` over Ray, one call per input shard. Every URL ends either
in the shard's pairs or in its rejects, with a reason from REASONS.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from PIL import Image

from schemas.columns import INGEST_FIELDS, INPUT_SCHEMA, REJECT_SCHEMA
from schemas.records import make_uid
from schemas.spec import IngestSpec, SourceSpec, is_uri
from stages.io.build_folder import BuildFolder, atomic_write_table, atomic_write_text
from stages.io.storage import Location, location, parquet_dataset

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

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


class IngestError(ValueError):
    """Bad input to ingest, with a message that names the file and the problem."""


# --------------------------------------------------------------------------- reading the URL list

_URL_LIST_SCHEMA = pa.schema([("url", pa.string()), ("text", pa.string()), ("malformed", pa.string())])

URL_BATCH_ROWS = 200_000  # rows of a URL list read at a time: what input preparation holds per batch


def read_url_list(src: SourceSpec) -> pa.Table:
    """The whole list as one table: iter_url_list's batches together (tests, small lists)."""
    return pa.Table.from_batches([b for t in iter_url_list(src) for b in t.to_batches()], schema=_URL_LIST_SCHEMA)


def iter_url_list(src: SourceSpec, batch_rows: int = URL_BATCH_ROWS) -> Iterator[pa.Table]:
    """Read the source list as tables of at most `batch_rows` (url, text, malformed) strings, in list order;
    one row per listed row, never more than a batch (and a reader block) in memory.

    A row that does not parse (a CSV line with too many or too few fields, a JSONL line that is not a JSON object)
    is kept as a row with `malformed` saying why, so it can be rejected and counted; those rows come last, after
    every parsed row (they are set aside on disk while reading). Bytes that are not UTF-8 are replaced (U+FFFD).
    A file that cannot be read at all, or lacks the URL or caption column, is an IngestError."""
    if is_uri(src.urls):  # read from object storage through a local copy
        with _local_copy(location(src.urls)) as copy:
            yield from iter_url_list(src.model_copy(update={"urls": str(copy)}), batch_rows)
        return
    path = Path(src.urls)
    fmt = src.format
    if fmt == "auto":
        suffix = "".join(path.suffixes[-1:]).lower()
        fmt = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix)
        if fmt is None:
            raise IngestError(f"{path}: cannot tell the format from the suffix {suffix!r}; set source.format")
    cols = (src.url_col, src.caption_col)
    clean = None
    set_aside = _MalformedRows(by_text=fmt in ("csv", "tsv"))
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path)
            _require_columns(path, cols, pf.schema_arrow.names)
            blocks = (pa.Table.from_batches([rb]) for rb in pf.iter_batches(batch_size=batch_rows,
                                                                              columns=list(dict.fromkeys(cols))))
        else:
            clean = _utf8_copy(path)
            text_path = clean or path
            if fmt in ("csv", "tsv"):
                blocks = _iter_delimited(path, text_path, "\t" if fmt == "tsv" else ",", cols, set_aside)
            else:
                blocks = _iter_jsonl(path, text_path, cols, set_aside)
        parsed = (pa.table({"url": _as_text(t.column(src.url_col)), "text": _as_text(t.column(src.caption_col)),
                            "malformed": pa.nulls(t.num_rows, pa.string())}, schema=_URL_LIST_SCHEMA) for t in blocks)
        yield from _rebatch(parsed, batch_rows)
        yield from set_aside.tables(batch_rows)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise IngestError(f"{path}: cannot read as {fmt}: {e}") from None
    finally:
        set_aside.close()
        if clean is not None:
            clean.unlink(missing_ok=True)


def _rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The same rows, in order, as tables of exactly `rows` rows (the last may hold fewer)."""
    held, n = [], 0
    for t in tables:
        held.append(t)
        n += t.num_rows
        while n >= rows:
            whole = pa.concat_tables(held)
            yield whole.slice(0, rows)
            held, n = [whole.slice(rows)], n - rows
    if n:
        yield pa.concat_tables(held)


class _MalformedRows:
    """Rows that do not parse, set aside on disk while the list is read; handed back (url null, text, malformed)
    after the parsed rows. CSV/TSV ones are ordered by line number, else by their text (the reader cannot number
    lines when values may hold newlines); JSONL ones stay in line order."""

    _SCHEMA = pa.schema([("seq", pa.int64()), ("number", pa.int64()), ("text", pa.string()),
                         ("malformed", pa.string())])

    def __init__(self, by_text: bool, flush_rows: int = 10_000):
        self.by_text, self.flush_rows = by_text, flush_rows
        self.rows: list[tuple] = []
        self.count = 0
        self.dir: Path | None = None
        self.writer: pq.ParquetWriter | None = None

    def add(self, number: int | None, malformed: str, text: str) -> None:
        self.rows.append((self.count, number, text[:10_000], malformed))
        self.count += 1
        if len(self.rows) >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self.writer is None:
            self.dir = Path(tempfile.mkdtemp(prefix="pairforge-malformed-"))
            self.writer = pq.ParquetWriter(self.dir / "rows.parquet", self._SCHEMA)
        self.writer.write_table(pa.table(list(zip(*self.rows)), schema=self._SCHEMA))
        self.rows = []

    def tables(self, batch_rows: int) -> Iterator[pa.Table]:
        self._flush()
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        import duckdb
        import pyarrow.dataset as pads

        order = "number NULLS LAST, text, seq" if self.by_text else "seq"
        con = duckdb.connect(config={"memory_limit": "256MB", "temp_directory": str(self.dir / "sort")})
        try:  # DuckDB sorts within its memory limit, spilling to disk past it
            con.register("malformed_rows", pads.dataset(self.dir / "rows.parquet", format="parquet"))
            for rb in con.sql(f"SELECT text, malformed FROM malformed_rows ORDER BY {order}").to_arrow_reader(
                    batch_rows):
                yield pa.table({"url": pa.nulls(rb.num_rows, pa.string()), "text": rb.column("text"),
                                "malformed": rb.column("malformed")}, schema=_URL_LIST_SCHEMA)
        finally:
            con.close()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def _local_copy(loc: Location):
    """A temporary local copy of a remote file (same suffix), removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="pairforge-source-", suffix=loc.suffix)
    try:
        with os.fdopen(fd, "wb") as out, loc.fs.open_input_stream(loc.path) as f:
            while chunk := f.read(1 << 24):
                out.write(chunk)
        yield Path(name)
    finally:
        os.unlink(name)


def _require_columns(path: Path, cols: tuple[str, str], names: list[str]) -> None:
    missing = [c for c in dict.fromkeys(cols) if c not in names]
    if missing:
        raise IngestError(f"{path}: column(s) {missing} not found (source.url_col / source.caption_col); "
                          f"the file has {names}")


def _as_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Any column as UTF-8 strings: bytes that are not UTF-8 become U+FFFD, nested values their JSON."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.cast(pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        try:
            return col.cast(pa.string())  # validates UTF-8
        except pa.ArrowInvalid:
            return pa.chunked_array([pa.array([None if b is None else b.decode("utf-8", "replace")
                                               for b in col.to_pylist()], pa.string())])
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.chunked_array([pa.array([None if v is None else json.dumps(v, default=str, ensure_ascii=False)
                                           for v in col.to_pylist()], pa.string())])


def _utf8_copy(path: Path, chunk: int = 1 << 24) -> Path | None:
    """None when the file is UTF-8 throughout; else a temporary copy with each bad byte replaced by U+FFFD."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        try:
            while block := f.read(chunk):
                decoder.decode(block)
            decoder.decode(b"", final=True)
            return None
        except UnicodeDecodeError:
            pass
        f.seek(0)
        fd, name = tempfile.mkstemp(prefix="pairforge-urls-", suffix=path.suffix)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            while block := f.read(chunk):
                out.write(decoder.decode(block))
            out.write(decoder.decode(b"", final=True))
    return Path(name)


def _iter_delimited(path: Path, text_path: Path, delimiter: str, cols: tuple[str, str],
                    set_aside: _MalformedRows) -> Iterator[pa.Table]:
    """CSV / TSV (`text_path`: the file, or its UTF-8 copy), a reader block at a time: only the two columns; rows
    with the wrong field count set aside."""
    import csv

    def bad_row(row) -> str:
        why = f"expected {row.expected_columns} fields, got {row.actual_columns}"
        set_aside.add(row.number, f"line {row.number}: {why}" if row.number else why, row.text)
        return "skip"

    wanted = list(dict.fromkeys(cols))
    try:
        reader = pacsv.open_csv(
            text_path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                             invalid_row_handler=bad_row),
            convert_options=pacsv.ConvertOptions(include_columns=wanted,
                                                 column_types={c: pa.string() for c in wanted}),
        )
    except pa.ArrowKeyError as e:  # a column not in the header
        with open(text_path, encoding="utf-8") as f:
            first = f.readline()
        _require_columns(path, cols, next(csv.reader([first], delimiter=delimiter), []))
        raise IngestError(f"{path}: {e}") from None
    for rb in reader:
        yield pa.Table.from_batches([rb])


JSONL_BLOCK_BYTES = 1 << 24  # JSON lines parsed at a time


def _iter_jsonl(path: Path, text_path: Path, cols: tuple[str, str], set_aside: _MalformedRows) -> Iterator[pa.Table]:
    """JSON lines (`text_path`: the file, or its UTF-8 copy), a block of whole lines at a time: Arrow's reader when
    every line of the block is a clean object; else line by line, each bad line set aside. The URL and caption
    columns must appear somewhere in the file (checked at its end)."""
    seen_cols: dict[str, None] = {}  # in the order first met, as Arrow's reader names them
    any_bad = False
    lines_before = 0
    with open(text_path, "rb") as f:
        rest = b""
        while True:
            chunk = f.read(JSONL_BLOCK_BYTES)
            data = rest + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            if chunk and not cut:  # one line longer than a block: read on
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            if block:
                table, bad = _jsonl_block(block, lines_before, cols, seen_cols, set_aside)
                any_bad |= bad
                lines_before += block.count(b"\n")
                if table.num_rows:
                    yield table
            if not chunk:
                break
    names = (sorted(seen_cols) if any_bad else list(seen_cols)) if seen_cols or not any_bad else list(cols)
    _require_columns(path, cols, names)


def _jsonl_block(block: bytes, lines_before: int, cols: tuple[str, str], seen_cols: dict[str, None],
                 set_aside: _MalformedRows) -> tuple[pa.Table, bool]:
    """One block of JSON lines -> (the two columns, whether a line was set aside)."""
    wanted = list(dict.fromkeys(cols))
    try:
        table = pajson.read_json(io.BytesIO(block))
        seen_cols.update(dict.fromkeys(table.column_names))
        return pa.table({c: table.column(c) if c in table.column_names else pa.nulls(table.num_rows, pa.string())
                         for c in wanted}), False
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    rows: dict[str, list] = {c: [] for c in wanted}
    bad = False
    for number, raw in enumerate(io.StringIO(block.decode("utf-8"), newline="\n"), start=lines_before + 1):
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            set_aside.add(number, f"line {number}: not JSON ({e})", line)
            bad = True
            continue
        if not isinstance(obj, dict):
            set_aside.add(number, f"line {number}: a JSON {type(obj).__name__}, not an object", line)
            bad = True
            continue
        seen_cols.update(dict.fromkeys(obj))
        for c in rows:
            v = obj.get(c)
            v = v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            # a lone surrogate ("\ud800" in the JSON) is no character: U+FFFD instead
            rows[c].append(None if v is None else v.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    return pa.table({c: pa.array(v, pa.string()) for c, v in rows.items()}), bad


def _url_problem(url: str) -> tuple[str | None, str | None]:
    """(bad_scheme | bad_url, detail) for a URL that is never fetched, else (None, None)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as e:
        return "bad_url", f"{url[:200]}: {e}"
    if parts.scheme.lower() not in FETCH_SCHEMES:
        return "bad_scheme", f"{parts.scheme or '(none)'}:// in {url[:200]}"
    if not parts.hostname:
        return "bad_url", f"no host in {url[:200]}"
    if "\ufffd" in url or any(c in url for c in "\x00\r\n"):
        return "bad_url", f"bytes that are not UTF-8, or control characters, in {url[:200]!r}"
    return None, None


# --------------------------------------------------------------------------- uids and repeated rows
#
# A row's uid is make_uid(url, caption) the first time the (normalised url, caption) pair is listed, and
# make_uid(url, caption, n) for its n-th repeat (schemas.records); a row that cannot be named by its URL (malformed,
# no URL) gets make_uid("", caption, row + 1). Input preparation works in three steps, each over bounded data, so
# a list of any size never has to be in one process:
#   1. key_url_rows, per batch of the list: the row's key (its first-listing uid), bucket and never-fetch reason;
#   2. find_repeats, per bucket (a hash partition of the keys): which rows repeat an earlier row, and how often;
#   3. settle_url_rows, per batch: uids of the repeats, reasons, inputs and rejects.
# The flow (flows.pipeline.inputs) runs them as Ray tasks over files in a scratch folder; assign_uids runs them in
# memory over one table.

_KEYED_SCHEMA = pa.schema([("row", pa.int64()), ("uid", pa.string()), ("key", pa.string()), ("url", pa.string()),
                           ("fetch_url", pa.string()), ("text", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string())])
_REPEATS_SCHEMA = pa.schema([("row", pa.int64()), ("occurrence", pa.int64())])


def _url_key(url: str | None, text: str | None) -> tuple:
    """(stripped url, key, never-fetch reason, detail) of a listed row; all None when it has no URL."""
    url_s = (url or "").strip()
    if not url_s:
        return None, None, None, None
    return (url_s, make_uid(url_s, text)) + _url_problem(url_s)


def key_url_rows(batch: pa.Table, first_row: int) -> pa.Table:
    """A batch of the URL list (its rows numbered from first_row, in list order) -> keyed rows: `key` names the
    (normalised url, caption) pair, reasons for rows that are never fetched are set; malformed and URL-less rows
    get their final uid here (by row number), the others in settle_url_rows.

    The per-row step: uids are blake2b over Python's URL normalisation (schemas.records), which no Arrow kernel
    reproduces, so the stripped URL, key and URL check are computed row by row; every decision is vectorised."""
    n = batch.num_rows
    row = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    url = batch.column("url").combine_chunks().cast(pa.string())
    text = batch.column("text").combine_chunks().cast(pa.string())
    malformed = (batch.column("malformed").combine_chunks().cast(pa.string()) if "malformed" in batch.column_names
                 else pa.nulls(n, pa.string()))
    is_malformed = pc.is_valid(malformed)
    listed = pc.if_else(is_malformed, pa.nulls(n, pa.string()), url)
    derived = [_url_key(u, t) for u, t in zip(listed.to_pylist(), text.to_pylist())] if n else []
    fetch_url, key, problem, problem_detail = (pa.array(list(c), pa.string()) for c in (zip(*derived) if n
                                                                                          else ([],) * 4))
    no_url = pc.and_(pc.invert(is_malformed), pc.is_null(fetch_url))
    by_row = pc.or_(is_malformed, no_url)
    reason = pc.if_else(is_malformed, "malformed_row", pc.if_else(no_url, "missing_url", problem))
    detail = pc.if_else(is_malformed, malformed,
                        pc.if_else(no_url, pc.binary_join_element_wise("row ", row.cast(pa.string()), ""),
                                   problem_detail))
    named = np.flatnonzero(by_row.to_numpy(zero_copy_only=False))
    uid = pa.nulls(n, pa.string())
    if len(named):
        texts = pc.take(text, pa.array(named)).to_pylist()
        uid = pc.replace_with_mask(uid, by_row, pa.array(
            [make_uid("", t, first_row + int(i) + 1) for t, i in zip(texts, named)], pa.string()))
    return pa.table([row, uid, key, url, fetch_url, text, reason, detail], schema=_KEYED_SCHEMA)


def key_buckets(key: pa.Array, buckets: int) -> pa.Array:
    """The bucket (0..buckets-1) of each key: keys are hex digests, so their leading digits spread evenly."""
    import polars as pl

    return (pl.from_arrow(key).str.slice(0, 8).str.to_integer(base=16) % buckets).cast(pl.Int32).to_arrow()


def find_repeats(keys: pa.Table) -> pa.Table:
    """(key, row) rows -> (row, occurrence) for each row whose key an earlier row (lower row number) has, with
    how many earlier rows have it; sorted by row. The rows of a key must all be in `keys` (one bucket holds them)."""
    keys = keys.filter(pc.is_valid(keys.column("key")))
    n = keys.num_rows
    if n < 2:
        return _REPEATS_SCHEMA.empty_table()
    s = keys.sort_by([("key", "ascending"), ("row", "ascending")])
    k = s.column("key").combine_chunks()
    first = np.ones(n, bool)
    first[1:] = pc.not_equal(k.slice(1), k.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    pos = np.arange(n, dtype=np.int64)
    occurrence = pos - np.maximum.accumulate(np.where(first, pos, 0))
    out = pa.table({"row": s.column("row"), "occurrence": occurrence}, schema=_REPEATS_SCHEMA)
    return out.filter(pa.array(occurrence > 0)).sort_by("row")


def occurrences(row: pa.Array, repeats: pa.Table) -> pa.Array:
    """Each row's occurrence number from `repeats` (0: the first listing)."""
    at = pc.index_in(row, value_set=repeats.column("row").combine_chunks())
    return pc.fill_null(pc.take(repeats.column("occurrence").combine_chunks(), at), 0)


def repeat_uids(uid: pa.Array, occurrence: pa.Array, name: pa.Array, text: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(repeat mask, uids): the n-th repeat of a row gets make_uid(name, text, n) (a Python call per repeat only)."""
    repeat = pc.fill_null(pc.greater(occurrence, 0), False)
    again = np.flatnonzero(repeat.to_numpy(zero_copy_only=False))
    if len(again):
        at = pa.array(again)
        uid = pc.replace_with_mask(uid, repeat, pa.array(
            [make_uid(m, t, o) for m, t, o in zip(*(pc.take(c, at).to_pylist() for c in (name, text, occurrence)))],
            pa.string()))
    return repeat, uid


def settle_url_rows(keyed: pa.Table, occurrence: pa.Array, source: str) -> tuple[pa.Table, pa.Table]:
    """Keyed rows and their occurrence numbers -> (inputs, rejects), both in list order. A repeat gets the uid of
    its occurrence and, unless its URL is already refused, the reason duplicate_input_row."""
    key, text, fetch_url = (keyed.column(c).combine_chunks() for c in ("key", "text", "fetch_url"))
    repeat, uid = repeat_uids(pc.coalesce(keyed.column("uid").combine_chunks(), key), occurrence, fetch_url, text)
    nothing = pa.nulls(keyed.num_rows, pa.string())
    reason = pc.coalesce(keyed.column("reason"), pc.if_else(repeat, "duplicate_input_row", nothing))
    detail = pc.coalesce(keyed.column("detail"), pc.if_else(
        repeat, pc.binary_join_element_wise("repeat ", occurrence.cast(pa.string()), " of ", key, ""), nothing))
    keep = pc.is_null(reason)
    inputs = pa.table({"uid": uid, "url": fetch_url, "text": text}).filter(keep)
    inputs = inputs.append_column("source", pa.repeat(pa.scalar(source, pa.string()), inputs.num_rows))
    rejected = pc.invert(keep)
    rejects = pa.table({"uid": uid, "url": keyed.column("url"), "text": text, "stage": pc.if_else(
        rejected, "input", nothing), "reason": reason, "detail": detail, "build_id": nothing}).filter(rejected)
    return inputs.cast(INPUT_SCHEMA), rejects.cast(REJECT_SCHEMA)


def assign_uids(table: pa.Table, source: str) -> tuple[pa.Table, pa.Table]:
    """Give every listed row of a whole list (one table) a uid; rows that cannot be fetched go to rejects.
    Returns (inputs, rejects). The same steps input preparation distributes, in memory."""
    keyed = key_url_rows(table, 0)
    row = keyed.column("row").combine_chunks()
    return settle_url_rows(keyed, occurrences(row, find_repeats(keyed.select(["key", "row"]))), source)


# Scratch files of the distributed steps, under one folder (`work`): keyed/NNNNNN.parquet (a batch's keyed rows),
# keys/NNNNNN.parquet (its (bucket, key, row), one row group per bucket), repeats/BBBBB.parquet (a bucket's repeats).

def write_keyed_batch(work: Location, batch_no: int, keyed: pa.Table, buckets: int) -> int:
    """Step 1's files for one batch; returns its row count."""
    work = location(work)
    atomic_write_table(keyed, work / "keyed" / f"{batch_no:06d}.parquet")
    keys = keyed.select(["key", "row"]).filter(pc.is_valid(keyed.column("key")))
    keys = keys.append_column("bucket", key_buckets(keys.column("key").combine_chunks(), buckets))
    keys = keys.sort_by([("bucket", "ascending"), ("row", "ascending")])
    bucket = keys.column("bucket").to_numpy()
    sink = pa.BufferOutputStream()  # a batch's keys: small beside the batch
    with pq.ParquetWriter(sink, keys.schema) as w:  # one row group per bucket: a bucket's reader skips the rest
        edges = np.flatnonzero(np.diff(bucket)) + 1
        for start, stop in zip(np.r_[0, edges], np.r_[edges, len(bucket)]):
            w.write_table(keys.slice(int(start), int(stop - start)))
    (work / "keys" / f"{batch_no:06d}.parquet").write_bytes(sink.getvalue())
    return keyed.num_rows


def bucket_repeats(work: Location, bucket: int) -> int:
    """Step 2 for one bucket: its keys from every batch -> repeats/BBBBB.parquet (when any); returns their count."""
    work = location(work)
    files = (work / "keys").glob("*.parquet")
    if not files:
        return 0
    keys = parquet_dataset(files).to_table(columns=["key", "row"], filter=pc.field("bucket") == bucket)
    repeats = find_repeats(keys)
    if repeats.num_rows:
        atomic_write_table(repeats, work / "repeats" / f"{bucket:05d}.parquet")
    return repeats.num_rows


def batch_repeats(work: Location, first_row: int, rows: int) -> pa.Table:
    """The repeats among rows first_row .. first_row + rows - 1, from every bucket's file."""
    files = (location(work) / "repeats").glob("*.parquet")
    if not files:
        return _REPEATS_SCHEMA.empty_table()
    row = pc.field("row")
    return parquet_dataset(files, schema=_REPEATS_SCHEMA).to_table(
        filter=(row >= first_row) & (row < first_row + rows))


def key_url_batch(work: Location, batch_no: int, batch: pa.Table, first_row: int, buckets: int) -> int:
    """Step 1 of a URL list batch, to files."""
    return write_keyed_batch(work, batch_no, key_url_rows(batch, first_row), buckets)


def settle_url_batch(work: Location, batch_no: int, source: str) -> dict:
    """Step 3 of a URL list batch: settled/NNNNNN.parquet (inputs) and settled/NNNNNN.rejects.parquet."""
    work = location(work)
    keyed = (work / "keyed" / f"{batch_no:06d}.parquet").read_table()
    row = keyed.column("row").combine_chunks()
    first = row[0].as_py() if len(row) else 0
    inputs, rejects = settle_url_rows(keyed, occurrences(row, batch_repeats(work, first, len(row))), source)
    atomic_write_table(inputs, work / "settled" / f"{batch_no:06d}.parquet")
    atomic_write_table(rejects, work / "settled" / f"{batch_no:06d}.rejects.parquet")
    return {"rows": keyed.num_rows, "kept": inputs.num_rows, "rejected": rejects.num_rows}


# --------------------------------------------------------------------------- the address guard

FETCH_SCHEMES = ("http", "https")


class FetchError(Exception):
    """A URL that could not be fetched: `reason` is a key of REASONS (or http_NNN), `detail` says more."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@lru_cache(maxsize=65536)
def system_resolve(host: str) -> tuple[str, ...]:
    """The system resolver's addresses for host, in its order, cached per process."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(i[4][0] for i in infos))


_DNS_POOL = None


def _dns_pool():
    """Lookups run here so a caller can stop waiting: getaddrinfo has no timeout of its own."""
    global _DNS_POOL
    if _DNS_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _DNS_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="pairforge-dns")
    return _DNS_POOL


class AddressGuard:
    """Refuses URLs that are not http(s), or whose host resolves to a non-public address unless allow_hosts lists it.

    allow_hosts entries: a host name or IP ("127.0.0.1"), host:port ("127.0.0.1:8619") or a CIDR ("10.0.0.0/8").
    `resolver(host)` returns the host's addresses (default: the system resolver); a lookup that outlasts the
    caller's timeout is abandoned. `vet` hands the checked addresses to the fetcher, which connects to them and
    never resolves the name again.
    """

    def __init__(self, allow_hosts: list[str] | tuple[str, ...] = (), resolver=None):
        self.resolver = resolver or system_resolve
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

    def resolve(self, host: str, timeout: float | None = None) -> tuple[str, ...]:
        try:
            return (str(ipaddress.ip_address(host)),)
        except ValueError:
            pass
        from concurrent.futures import TimeoutError as FutureTimeout

        try:
            return tuple(_dns_pool().submit(self.resolver, host).result(timeout=timeout))
        except FutureTimeout:
            raise TimeoutError(f"resolving {host} took over {timeout:.1f}s") from None

    def _allowed(self, host: str, port: int, ip: str) -> bool:
        if host in self.hosts or ip in self.hosts:
            return True
        if (host, port) in self.host_ports or (ip, port) in self.host_ports:
            return True
        addr = ipaddress.ip_address(ip)
        return any(addr in n for n in self.networks)

    def vet(self, url: str, timeout: float | None = None) -> tuple[str, str, int, tuple[str, ...]]:
        """(scheme, host, port, addresses) of a URL that may be fetched; raises FetchError if it may not.
        Makes no connection to the host."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FetchError("bad_url", f"{url[:200]}: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in FETCH_SCHEMES:
            raise FetchError("bad_scheme", f"{scheme or '(none)'}:// is not fetched, only http and https")
        host = (parts.hostname or "").lower()
        if not host:
            raise FetchError("bad_url", f"no host in {url[:200]}")
        try:  # an internationalised name as DNS, the Host header and TLS carry it
            host = host.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise FetchError("bad_url", f"host {host[:100]!r}: {e}") from None
        port = port or (443 if scheme == "https" else 80)
        try:
            ips = self.resolve(host, timeout)
        except TimeoutError as e:
            raise FetchError("timeout", str(e)) from None
        except (OSError, UnicodeError) as e:
            raise FetchError("dns_error", f"{host}: {e}") from None
        if not ips:
            raise FetchError("dns_error", f"{host}: no address")
        for ip in ips:
            addr = ipaddress.ip_address(ip.split("%")[0])
            public = addr.is_global and not addr.is_multicast
            if not public and not self._allowed(host, port, str(addr)):
                raise FetchError("blocked_address",
                                 f"{host} -> {addr} (not public; allow it with ingest.allow_hosts)")
        return scheme, host, port, tuple(ips)

    def check(self, url: str, timeout: float | None = None) -> tuple[str, str] | None:
        """None if the URL may be fetched, else (reason, detail). Makes no connection to the host."""
        try:
            self.vet(url, timeout)
        except FetchError as e:
            return e.reason, e.detail
        return None


# --------------------------------------------------------------------------- the fetch: one deadline, pinned address

class _Deadline:
    """Every blocking call waits at most until `deadline` (time.monotonic()): a server trickling one byte at a time
    cannot stretch a fetch past it, as it can with a per-read timeout. Mixed into the plain and the TLS socket."""

    deadline: float = float("inf")

    def arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.settimeout(left)

    def recv(self, *args):
        self.arm()
        return super().recv(*args)

    def recv_into(self, *args):
        self.arm()
        return super().recv_into(*args)

    def sendall(self, *args):
        self.arm()
        return super().sendall(*args)


class _DeadlineSocket(_Deadline, socket.socket):
    def connect(self, address):
        self.arm()
        return super().connect(address)


class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    """SSLContext.wrap_socket makes these (sslsocket_class); the handshake runs under the plain socket's timeout,
    armed just before."""

    def read(self, *args):
        self.arm()
        return super().read(*args)


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """The default verifying context (certificate and host name checked), with deadline sockets."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.sslsocket_class = _DeadlineSSLSocket
    return ctx


def _connect_pinned(ips: tuple[str, ...], port: int, deadline: float) -> _DeadlineSocket:
    """A TCP connection to the first of the checked addresses that answers; never resolves a name."""
    err: OSError | None = None
    for ip in ips:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        sock.deadline = deadline
        try:
            sock.connect((ip, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except TimeoutError:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            err = e
    raise err if err else OSError("no address to connect to")


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a checked address: the Host header still names the URL's host."""

    def __init__(self, host: str, port: int, ips: tuple[str, ...], deadline: float, context=None):
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        self.pinned, self.deadline, self.peer = ips, deadline, None

    def connect(self):
        self.sock = _connect_pinned(self.pinned, self.port, self.deadline)
        self.peer = self.sock.getpeername()[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address: Host header, SNI and certificate check all use the URL's host."""

    def __init__(self, host: str, port: int, ips: tuple[str, ...], deadline: float, context=None):
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001), context=context)
        self.pinned, self.deadline, self.peer = ips, deadline, None

    def connect(self):
        sock = _connect_pinned(self.pinned, self.port, self.deadline)
        self.peer = sock.getpeername()[0]
        sock.arm()  # the handshake as a whole waits at most until the deadline
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock.deadline = self.deadline


@dataclass
class Fetched:
    """A complete response: final URL, status, headers, body, the address connected to, the redirects followed."""

    url: str
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    peer: str | None
    redirects: list[str]
    seconds: float


_REDIRECTS = (301, 302, 303, 307, 308)


class Fetcher:
    """GET with a deadline for the whole response (DNS, connect, TLS, headers, body and every redirect), to the
    address the guard checked (the name is never resolved again), http(s) only, capped at max_bytes.

    Every failure is a FetchError whose reason is a key of REASONS or http_NNN.
    """

    def __init__(self, guard: AddressGuard, deadline_s: float, max_bytes: int, max_redirects: int = 5,
                 context: ssl.SSLContext | None = None, user_agent: str | None = None):
        self.guard, self.deadline_s, self.max_bytes, self.max_redirects = guard, deadline_s, max_bytes, max_redirects
        self.context = context or tls_context()
        self.user_agent = user_agent
        self.durations: list[float] = []  # seconds per fetch, in completion order (list.append is thread-safe)

    def fetch(self, url: str, headers: dict[str, str] | None = None) -> Fetched:
        t0 = time.monotonic()
        try:
            return self._fetch(url, headers or {}, t0)
        finally:
            self.durations.append(time.monotonic() - t0)

    def _fetch(self, url: str, headers: dict[str, str], t0: float) -> Fetched:
        deadline = t0 + self.deadline_s
        chain = [url]
        current = url
        while True:
            try:
                scheme, host, port, ips = self.guard.vet(current, max(deadline - time.monotonic(), 0.001))
                status, reason, hdrs, body, peer = self._get(scheme, host, port, ips, current, headers, deadline)
            except FetchError as e:
                if len(chain) > 1:  # say which hop failed
                    raise FetchError(e.reason, f"{e.detail} (after redirects {' -> '.join(chain)})") from None
                raise
            except (TimeoutError, socket.timeout):
                raise FetchError("timeout", f"no complete answer within {self.deadline_s:g}s (ingest.timeout_s), "
                                            f"at {current[:200]}") from None
            except ssl.SSLError as e:  # includes certificate errors
                raise FetchError("tls_error", f"{host}: {e}") from None
            except ConnectionRefusedError as e:
                raise FetchError("connection_refused", f"{host}:{port}: {e.strerror or e}") from None
            except http.client.InvalidURL as e:
                raise FetchError("bad_url", f"{current[:200]}: {e}") from None
            except http.client.IncompleteRead as e:
                raise FetchError("truncated", f"the connection closed after {len(e.partial)} bytes, "
                                              f"{e.expected} more were announced") from None
            except (http.client.HTTPException, OSError) as e:
                raise FetchError("connection_error", f"{host}:{port}: {type(e).__name__}: {e}") from None
            if status in _REDIRECTS and hdrs.get("Location"):
                nxt = urljoin(current, hdrs["Location"].strip()).split("#", 1)[0]
                if nxt in chain:
                    raise FetchError("too_many_redirects", f"redirect loop: {' -> '.join(chain + [nxt])}"[:500])
                if len(chain) > self.max_redirects:
                    raise FetchError("too_many_redirects",
                                     f"more than {self.max_redirects} redirects (ingest.max_redirects): "
                                     f"{' -> '.join(chain[:3])} -> ..."[:500])
                chain.append(nxt)
                current = nxt
                continue
            if status >= 400:
                raise FetchError(f"http_{status}", f"{status} {reason}".strip())
            return Fetched(current, status, hdrs, body, peer, chain[1:], time.monotonic() - t0)

    def _get(self, scheme, host, port, ips, url, headers, deadline):
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # what a browser sends for a path with spaces or non-ASCII characters: their UTF-8, percent-encoded
        target = re.sub(r"[^\x21-\x7e]+", lambda m: quote(m.group(), safe=""), target)
        conn_cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = conn_cls(host, port, ips, deadline, self.context)
        try:
            hdrs = {"Accept-Encoding": "identity", "Connection": "close"}
            if self.user_agent:
                hdrs["User-Agent"] = self.user_agent
            conn.request("GET", target, headers=hdrs | headers)
            resp = conn.getresponse()
            if resp.status in _REDIRECTS or resp.status >= 400:
                return resp.status, resp.reason, resp.headers, b"", conn.peer
            length = resp.headers.get("Content-Length", "").strip()
            if length.isdigit() and int(length) > self.max_bytes:
                raise FetchError("too_large", f"Content-Length {length} > max_bytes {self.max_bytes}")
            chunks, size = [], 0
            while True:
                chunk = resp.read(min(65536, self.max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_bytes:
                    raise FetchError("too_large", f"body over max_bytes {self.max_bytes}")
            if length.isdigit() and size < int(length):
                raise FetchError("truncated", f"the connection closed after {size} of {length} bytes")
            return resp.status, resp.reason, resp.headers, b"".join(chunks), conn.peer
        finally:
            conn.close()


class _FetchedResponse(io.BytesIO):
    """What urlopen's caller sees: the body, `headers`, `status`, `url`; a context manager."""

    def __init__(self, f: Fetched):
        super().__init__(f.body)
        self.headers, self.status, self.url, self.fetched = f.headers, f.status, f.url, f

    def getcode(self) -> int:
        return self.status


class FetchOpener:
    """Stands in for urllib's opener (urllib.request.install_opener), so img2dataset's downloader, which calls
    urllib.request.urlopen, fetches through a Fetcher: no other handler (file:, ftp:, data:, proxies) is reachable."""

    def __init__(self, fetcher: Fetcher):
        self.fetcher = fetcher

    def open(self, fullurl, data=None, timeout=None):
        if data is not None:
            raise FetchError("bad_url", "ingest only GETs")
        if isinstance(fullurl, urllib.request.Request):
            url, headers = fullurl.full_url, dict(fullurl.header_items())
        else:
            url, headers = str(fullurl), {}
        return _FetchedResponse(self.fetcher.fetch(url, headers))


def install_fetcher(fetcher: Fetcher):
    """img2dataset fetches with urllib.request.urlopen, which uses the process-wide opener: ours while a shard
    downloads. Returns the opener it replaced, for restore_opener (other urlopen callers of the process, such as
    a health check, must not go through the download guard)."""
    previous = urllib.request._opener
    urllib.request.install_opener(FetchOpener(fetcher))
    return previous


def restore_opener(previous) -> None:
    urllib.request._opener = previous


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


# --------------------------------------------------------------------------- one shard

def ingest_shard(folder: BuildFolder, shard_id: int, params: IngestSpec, resolver=None) -> dict:
    """Download one input shard; writes its pairs and rejects, then a done marker. Idempotent.

    resolver(host) -> addresses replaces the system resolver (tests)."""
    paths = folder.ingest_shard(shard_id)
    if paths.done.exists():
        return json.loads(paths.done.read_text())
    inputs = folder.input_shard(shard_id).read_table()

    fetcher = Fetcher(AddressGuard(params.allow_hosts, resolver), params.timeout_s, params.max_bytes,
                      params.max_redirects)
    raw = _download(inputs, params, fetcher) if inputs.num_rows else None
    pairs, rej_rows = split_raw(raw, inputs.column("source")[0].as_py() if inputs.num_rows else None)
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
        "fetch_ms": sorted(round(1000 * d) for d in fetcher.durations),  # per attempt, for p50 / p99
    }
    atomic_write_text(paths.done, json.dumps(summary))
    return summary


PAIRS_SCHEMA = pa.schema(list(INPUT_SCHEMA) + INGEST_FIELDS)


def _download(inputs: pa.Table, params: IngestSpec, fetcher: Fetcher) -> pa.Table:
    """Run img2dataset's Downloader over one shard in this process, fetching through `fetcher`; returns its raw
    Parquet table."""
    from img2dataset.downloader import Downloader
    from img2dataset.writer import ParquetSampleWriter

    previous = install_fetcher(fetcher)
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
        restore_opener(previous)
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
    p = location(src.pairs)
    if p.is_dir() and p.glob("*.tar"):
        return "webdataset"
    return "parquet"


def iter_corpus(src: SourceSpec, batch_rows: int = 1000):
    """Yield tables (url, text, image) from a Parquet corpus or a WebDataset folder, in a stable order."""
    if corpus_kind(src) == "webdataset":
        yield from _iter_webdataset(location(src.pairs), batch_rows)
        return
    for piece in corpus_pieces(src, batch_rows):
        yield read_corpus_piece(src, piece)


@dataclass(frozen=True)
class CorpusPiece:
    """Rows start .. start + num_rows - 1 of one row group of one Parquet file of a corpus: what a worker reads."""

    path: str
    row_group: int
    start: int
    num_rows: int


def _corpus_columns(src: SourceSpec, schema: pa.Schema) -> list[str]:
    """The corpus's columns to read, checked: a caption, image bytes (or a Hugging Face Image struct), the URL."""
    missing = [c for c in (src.caption_col, src.image_col) if c not in schema.names]
    if missing:
        raise IngestError(f"{src.pairs}: column(s) {missing} not found (source.caption_col / source.image_col); "
                          f"the corpus has {schema.names}")
    image_type = schema.field(src.image_col).type
    if pa.types.is_struct(image_type):  # Hugging Face datasets' Image feature: {bytes, path}
        if image_type.get_field_index("bytes") < 0:
            raise IngestError(f"{src.pairs}: column {src.image_col!r} is a struct without a 'bytes' field "
                              f"({image_type}); expected image bytes")
        image_type = image_type.field("bytes").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type) or pa.types.is_null(image_type)):
        raise IngestError(f"{src.pairs}: column {src.image_col!r} holds {image_type}, not image bytes (binary); "
                          "set source.image_col")
    return list(dict.fromkeys([src.caption_col, src.image_col] + ([src.url_col] if src.url_col in schema.names
                                                                  else [])))


def corpus_pieces(src: SourceSpec, batch_rows: int) -> Iterator[CorpusPiece]:
    """A Parquet corpus cut into pieces of at most batch_rows rows, never across a row group, in corpus order; only
    the files' footers are read (the columns are checked here, once)."""
    try:
        ds = parquet_dataset(location(src.pairs))
        _corpus_columns(src, ds.schema)
        for frag in ds.get_fragments():
            meta = frag.metadata
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                for start in range(0, rows, batch_rows):
                    yield CorpusPiece(frag.path, g, start, min(batch_rows, rows - start))
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(f"{src.pairs}: cannot read as parquet: {e}") from None


def read_corpus_piece(src: SourceSpec, piece: CorpusPiece) -> pa.Table:
    """One piece of a Parquet corpus as (url, text, image)."""
    loc = location(src.pairs)
    try:
        pf = pq.ParquetFile(piece.path, filesystem=loc.fs)
        cols = _corpus_columns(src, pf.schema_arrow)
        rb = pf.read_row_group(piece.row_group, columns=cols).slice(piece.start, piece.num_rows)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise IngestError(f"{src.pairs}: cannot read as parquet: {e}") from None
    image = rb.column(src.image_col).combine_chunks()
    if pa.types.is_struct(image.type):
        image = image.field("bytes")
    url = _as_text(rb.column(src.url_col)) if src.url_col in rb.column_names else pa.nulls(rb.num_rows, pa.string())
    return pa.table({"url": url, "text": _as_text(rb.column(src.caption_col)), "image": image.cast(pa.binary())},
                    schema=_CORPUS_SCHEMA)


def _iter_webdataset(folder: Location, batch_rows: int):
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
        if not isinstance(meta, dict):
            meta = {}
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        text = parts["txt"].decode("utf-8", "replace") if "txt" in parts else meta.get("caption")
        url = meta.get("url")
        rows["url"].append(url if url is None or isinstance(url, str) else json.dumps(url))
        rows["text"].append(text if text is None or isinstance(text, str) else json.dumps(text))
        rows["image"].append(img)

    for tar_path in folder.glob("*.tar"):
        key, parts, member = None, {}, None
        try:
            with tar_path.open_input() as raw, tarfile.open(fileobj=raw) as tf:
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
                end = tf.offset
            with tar_path.open_input() as f:  # a tar cut at a member boundary reads as a shorter, complete one
                f.seek(end)
                if f.read(1024) != bytes(1024):
                    raise tarfile.ReadError("no end-of-archive marker after the last member read: cut short")
        except (tarfile.TarError, EOFError, OSError) as e:
            at = f" at member {member.name!r}" if member is not None else ""
            raise IngestError(f"{tar_path}: truncated or not a tar{at}: {type(e).__name__}: {e}") from None
        flush_sample(parts)
    if rows["url"]:
        yield pa.table(rows, schema=_CORPUS_SCHEMA)


_CORPUS_SCHEMA = pa.schema([("url", pa.string()), ("text", pa.string()), ("image", pa.binary())])


_CORPUS_KEYED_SCHEMA = pa.schema([("row", pa.int64()), ("key", pa.string()), ("name", pa.string()),
                                  ("url", pa.string()), ("text", pa.string()), ("image", pa.binary()),
                                  ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()),
                                  ("reason", pa.string())])


def _corpus_row(url: str | None, text: str | None, img: bytes | None) -> tuple:
    """(name, key, width, height, sha256) of a corpus row: named by its URL, else by its image's sha256."""
    sha = hashlib.sha256(img).hexdigest() if img else None
    name = (url or "").strip() or (f"sha256:{sha}" if sha else "")
    w = h = None
    if img:
        try:
            with Image.open(io.BytesIO(img)) as im:
                w, h = im.width, im.height
        except Exception:
            pass  # basic's decode check owns undecodable images
    return name, make_uid(name, text), w, h, sha


def key_corpus_rows(batch: pa.Table, first_row: int) -> pa.Table:
    """A corpus batch (rows numbered from first_row) -> keyed rows, the corpus's step 1 (see key_url_rows).
    Per row: the image's sha256 and size, and the key (blake2b over the normalised name); decisions vectorised."""
    n = batch.num_rows
    url, text, image = (batch.column(c).combine_chunks() for c in ("url", "text", "image"))
    derived = [_corpus_row(u, t, i) for u, t, i in zip(url.to_pylist(), text.to_pylist(), image.to_pylist())]
    name, key, w, h, sha = (list(c) for c in zip(*derived)) if n else ([],) * 5
    no_image = pc.invert(pc.fill_null(pc.greater(pc.binary_length(image), 0), False))
    return pa.table({"row": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)), "key": key,
                     "name": name, "url": url, "text": text, "image": image, "width": w, "height": h, "sha256": sha,
                     "reason": pc.if_else(no_image, "missing_image", pa.nulls(n, pa.string()))},
                    schema=_CORPUS_KEYED_SCHEMA)


def settle_corpus_rows(keyed: pa.Table, occurrence: pa.Array, source: str) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Keyed corpus rows and their occurrence numbers -> (inputs, pairs, rejects), in corpus order."""
    name, text, url = (keyed.column(c).combine_chunks() for c in ("name", "text", "url"))
    repeat, uid = repeat_uids(keyed.column("key").combine_chunks(), occurrence, name, text)
    nothing = pa.nulls(keyed.num_rows, pa.string())
    reason = pc.coalesce(keyed.column("reason"), pc.if_else(repeat, "duplicate_input_row", nothing))
    keep = pc.is_null(reason)
    kept = keyed.filter(keep)
    no_url = pc.fill_null(pc.equal(kept.column("url"), ""), True)
    w, h = kept.column("width"), kept.column("height")
    pairs = pa.table({"uid": pc.filter(uid, keep), "url": pc.if_else(no_url, kept.column("name"), kept.column("url")),
                      "text": kept.column("text"),
                      "source": pa.repeat(pa.scalar(source, pa.string()), kept.num_rows),
                      "image": kept.column("image"), "width": w, "height": h, "original_width": w,
                      "original_height": h, "sha256": kept.column("sha256")}).cast(PAIRS_SCHEMA)
    rejected = pc.invert(keep)
    rejects = pa.table({"uid": uid, "url": url, "text": text, "stage": pc.if_else(rejected, "input", nothing),
                        "reason": reason, "detail": nothing, "build_id": nothing}).filter(rejected)
    return pairs.select(INPUT_SCHEMA.names), pairs, rejects.cast(REJECT_SCHEMA)


def corpus_pairs(batch: pa.Table, source: str) -> tuple[pa.Table, pa.Table, pa.Table]:
    """A whole corpus batch -> (inputs, pairs, rejects), repeats found within the batch (in memory).
    Rows without a URL are named by their image's sha256."""
    keyed = key_corpus_rows(batch, 0)
    return settle_corpus_rows(keyed, occurrences(keyed.column("row").combine_chunks(),
                                                 find_repeats(keyed.select(["key", "row"]))), source)


def key_corpus_batch(folder: BuildFolder, source: str, work: Location, batch_no: int, batch: pa.Table, first_row: int,
                     buckets: int) -> int:
    """Step 1 of a corpus batch: the keyed rows to files, without their image bytes, which go straight to the
    batch's ingest shard (as if no row repeated an earlier one; step 3 rewrites it only in a batch with repeats):
    the bytes are written once before the output shards."""
    keyed = key_corpus_rows(batch, first_row)
    n = keyed.num_rows
    _, pairs, _ = settle_corpus_rows(keyed, pa.nulls(n, pa.int64()), source)
    atomic_write_table(pairs, folder.ingest_shard(batch_no).pairs)
    return write_keyed_batch(work, batch_no, keyed.set_column(keyed.schema.get_field_index("image"), "image",
                                                                 pa.nulls(n, pa.binary())), buckets)


def key_corpus_piece(folder: BuildFolder, source: str, src: SourceSpec, work: Location, batch_no: int,
                     piece: CorpusPiece, first_row: int, buckets: int) -> int:
    """Step 1 of a Parquet corpus piece, read here in the worker (the driver reads only footers)."""
    return key_corpus_batch(folder, source, work, batch_no, read_corpus_piece(src, piece), first_row, buckets)


def settle_corpus_batch(folder: BuildFolder, work: Location, batch_no: int, source: str) -> dict:
    """Step 3 of a corpus batch: input shard `batch_no`, its ingest shard without the repeats, marked done; its
    rejects go to settled/NNNNNN.rejects.parquet."""
    work = location(work)
    keyed = (work / "keyed" / f"{batch_no:06d}.parquet").read_table()
    row = keyed.column("row").combine_chunks()
    first = row[0].as_py() if len(row) else 0
    occurrence = occurrences(row, batch_repeats(work, first, len(row)))
    inputs, _, rejects = settle_corpus_rows(keyed, occurrence, source)
    paths = folder.ingest_shard(batch_no)
    # step 1's pairs: a row for each keyed row without a reason; read whole (image bytes) only to drop repeats
    if paths.pairs.read_metadata().num_rows != inputs.num_rows:
        first_listing = pc.invert(pc.fill_null(pc.greater(occurrence, 0), False))
        pairs = paths.pairs.read_table()
        pairs = pairs.filter(first_listing.filter(pc.is_null(keyed.column("reason")).combine_chunks()))
        atomic_write_table(pairs, paths.pairs)
        uids = pairs.column("uid")
    else:
        uids = paths.pairs.read_table(columns=["uid"]).column("uid")
    if not uids.equals(inputs.column("uid")):
        raise RuntimeError(f"corpus batch {batch_no}: step 1's pairs and step 3's inputs differ")
    atomic_write_table(inputs, folder.input_shard(batch_no))
    atomic_write_table(REJECT_SCHEMA.empty_table(), paths.rejects)
    atomic_write_text(paths.done, json.dumps({"shard": batch_no, "rows_in": inputs.num_rows,
                                              "pairs": inputs.num_rows, "rejects": 0}))
    atomic_write_table(rejects, work / "settled" / f"{batch_no:06d}.rejects.parquet")
    return {"rows": keyed.num_rows, "kept": inputs.num_rows, "rejected": rejects.num_rows}
