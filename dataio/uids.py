"""Every listed row's uid, and which rows repeat an earlier one: the steps input preparation runs per batch and
per hash bucket of keys, for URL lists and for corpora, plus in-memory versions over one table (assign_uids,
corpus_pairs)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from dataio.build_folder import BuildFolder, atomic_write_table, atomic_write_text
from dataio.fetch import FETCH_SCHEMES
from dataio.sources import CorpusPiece, read_corpus_piece
from dataio.storage import Location, location, parquet_dataset
from schemas.columns import DOWNLOADED_SCHEMA, INPUT_SCHEMA, REJECT_SCHEMA
from schemas.records import make_uid
from schemas.spec import SourceSpec


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
# The flow (flows.engine.inputs) runs them as Ray tasks over files in a scratch folder; assign_uids runs them in
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


def settle_corpus_rows(keyed: pa.Table, occurrence: pa.Array, source: str,
                       carry: tuple[str, ...] = ()) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Keyed corpus rows and their occurrence numbers -> (inputs, pairs, rejects), in corpus order; the pairs carry
    the keyed columns named in `carry` too."""
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
                      "original_height": h, "sha256": kept.column("sha256")}).cast(DOWNLOADED_SCHEMA)
    for c in carry:
        pairs = pairs.append_column(c, kept.column(c))
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


# A corpus shard (curate) is a list of corpus pieces, read by the workers: step 1 reads them whole (sha256, size and
# key of each row), the stage pipeline and the writer read their image bytes again (shard_pairs), so no copy of
# the bytes is written before the output shards. Its rows are numbered (shard << 32) + position: corpus order,
# whatever the rows per shard (a tar's are known only once it is read).
PIECES_KEY = b"pairforge.corpus_pieces"  # schema metadata of the keyed and pair files: the shard's pieces (JSON)
PIECE_ROW = "piece_row"  # a pair's row among its shard's pieces


def _pieces_json(pieces: list[CorpusPiece]) -> bytes:
    return json.dumps([dataclasses.astuple(p) for p in pieces]).encode()


def shard_pieces(metadata: dict | None) -> list[CorpusPiece] | None:
    """The corpus pieces a keyed or pair file's rows come from, from its schema or file metadata (None: the file
    holds its own image bytes)."""
    raw = (metadata or {}).get(PIECES_KEY)
    return None if raw is None else [CorpusPiece(*p) for p in json.loads(raw)]


def pair_units(meta: pq.FileMetaData) -> int:
    """How many units an ingest shard's pairs are read in (shard_pairs): its corpus pieces, else its row groups."""
    pieces = shard_pieces(meta.metadata)
    return meta.num_row_groups if pieces is None else len(pieces)


def first_row(shard: int) -> int:
    return shard << 32


def key_corpus_shard(source: str, src: SourceSpec, work: Location, shard: int, pieces: list[CorpusPiece],
                     buckets: int) -> int:
    """Step 1 of a corpus shard, in a worker: its pieces read, each row keyed; the keyed rows (no image bytes; the
    pieces in the file's metadata) and keys to files. Returns the shard's rows."""
    batch = pa.concat_tables([read_corpus_piece(src, p) for p in pieces])
    keyed = key_corpus_rows(batch, first_row(shard)).drop_columns(["image"])
    keyed = keyed.replace_schema_metadata({PIECES_KEY: _pieces_json(pieces)})
    return write_keyed_batch(work, shard, keyed, buckets)


def settle_corpus_shard(folder: BuildFolder, work: Location, shard: int, source: str) -> dict:
    """Step 3 of a corpus shard: input shard `shard` and its pairs (their metadata, each pair's row among the pieces,
    which the pair file names; no image bytes), marked done as an ingest shard; its rejects go to
    settled/NNNNNN.rejects.parquet."""
    work = location(work)
    keyed = (work / "keyed" / f"{shard:06d}.parquet").read_table()
    pieces = shard_pieces(keyed.schema.metadata)
    row = keyed.column("row").combine_chunks()
    occurrence = occurrences(row, batch_repeats(work, first_row(shard), 1 << 32))
    keyed = keyed.append_column("image", pa.nulls(keyed.num_rows, pa.binary()))
    inputs, pairs, rejects = settle_corpus_rows(keyed, occurrence, source, carry=("row",))
    position = pc.subtract(pairs.column("row"), pa.scalar(first_row(shard), pa.int64()))
    pairs = pairs.drop_columns(["image", "row"]).append_column(PIECE_ROW, position)
    paths = folder.ingest_shard(shard)
    atomic_write_table(inputs, folder.input_shard(shard))
    atomic_write_table(pairs.replace_schema_metadata({PIECES_KEY: _pieces_json(pieces)}), paths.pairs)
    atomic_write_table(REJECT_SCHEMA.empty_table(), paths.rejects)
    atomic_write_text(paths.done, json.dumps({"shard": shard, "rows_in": inputs.num_rows,
                                              "pairs": inputs.num_rows, "rejects": 0}))
    atomic_write_table(rejects, work / "settled" / f"{shard:06d}.rejects.parquet")
    return {"rows": keyed.num_rows, "kept": inputs.num_rows, "rejected": rejects.num_rows}


def shard_pairs(src: SourceSpec, pairs: Location, columns: list[str] | None = None,
                units: Iterable[int] | None = None) -> Iterator[pa.Table]:
    """An ingest shard's pairs with their image bytes, a unit at a time (`units`: which, default all; pair_units
    counts them): the file holds the bytes (downloads, refilter; a unit is a row group), or (curate) names the corpus
    pieces that do (a unit is a piece) and each pair's row among them."""
    pf = location(pairs).parquet_file()
    pieces = shard_pieces(pf.metadata.metadata)
    units = range(pair_units(pf.metadata)) if units is None else units
    if pieces is None:
        for g in units:
            yield pf.read_row_group(g, columns=columns)
        return
    refs = pf.read(columns=None if columns is None else [c for c in columns if c != "image"] + [PIECE_ROW])
    at = refs.column(PIECE_ROW).combine_chunks()
    refs = refs.drop_columns([PIECE_ROW]).replace_schema_metadata(None)
    starts = np.cumsum([0] + [max(p.num_rows, 0) for p in pieces])  # a tar (rows unknown) is its shard's one piece
    for u in units:
        offset = int(starts[u])
        image = read_corpus_piece(src, pieces[u], images_only=True).column("image").combine_chunks()
        mine = pc.and_(pc.greater_equal(at, offset), pc.less(at, offset + len(image)))
        part = refs.filter(mine)
        if part.num_rows:
            local = pc.subtract(at.filter(mine), pa.scalar(offset, pa.int64()))
            part = part.append_column("image", image.take(local))
            yield part if columns is None else part.select(columns)
