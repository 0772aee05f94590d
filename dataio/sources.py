"""Reading a source: URL lists (Parquet, CSV, TSV, JSONL; streamed in batches, malformed rows set aside) and
existing corpora with image bytes (Parquet files or folders, cut into row-group pieces from their footers, and
WebDataset tars). Plain Python: the engine (flows.engine.inputs) runs these readers inside Ray tasks."""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from dataio.reasons import IngestError
from dataio.storage import Location, location, parquet_dataset
from schemas.errors import did_you_mean
from schemas.spec import SourceSpec, is_uri

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
    fmt = url_list_format(src)
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
        con = duckdb.connect(config={"memory_limit": "256MB", "threads": 1,
                                     "temp_directory": str(self.dir / "sort")})
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


URL_LIST_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def url_list_format(src: SourceSpec) -> str:
    """parquet, csv, tsv or jsonl: source.format, or the file's suffix."""
    if src.format != "auto":
        if src.format == "webdataset":
            raise IngestError(f"{src.urls}: a URL list is parquet, csv, tsv or jsonl, not webdataset",
                              hint="set source.format, or give a WebDataset corpus as source.pairs",
                              field="source.format")
        return src.format
    suffix = PurePosixPath(str(src.urls)).suffix.lower()
    fmt = URL_LIST_SUFFIXES.get(suffix)
    if fmt is None:
        raise IngestError(f"{src.urls}: cannot tell the format from the suffix {suffix!r}",
                          hint="name the file .parquet, .csv, .tsv or .jsonl, or set source.format",
                          field="source.format")
    return fmt


def _require_columns(path, cols: tuple[str, str], names: list[str],
                     fields: tuple[str, str] = ("source.url_col", "source.caption_col")) -> None:
    """IngestError naming the first column the spec asks for that the file lacks, the field to set, the closest of
    the file's columns and all of them."""
    for col, field in zip(cols, fields):
        if col not in names:
            raise IngestError(f"{path}: column {col!r} not found", field=field,
                              hint=f"set {field} to one of the file's columns; "
                                   + did_you_mean(col, names, "the file has"))


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


# --------------------------------------------------------------------------- existing corpora (curate)

CORPUS_SCHEMA = pa.schema([("url", pa.string()), ("text", pa.string()), ("image", pa.binary())])
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
        for tar in location(src.pairs).glob("*.tar"):
            yield from _iter_tar(tar, batch_rows)
        return
    for piece in corpus_pieces(src, batch_rows):
        yield read_corpus_piece(src, piece)


@dataclass(frozen=True)
class CorpusPiece:
    """What a worker reads of a corpus: rows start .. start + num_rows - 1 of row group `row_group` of a Parquet
    file, or (row_group -1) a whole WebDataset tar, whose rows are counted only when it is read (num_rows -1)."""

    path: str
    row_group: int
    start: int
    num_rows: int

    @property
    def is_tar(self) -> bool:
        return self.row_group < 0


def _corpus_columns(src: SourceSpec, schema: pa.Schema) -> list[str]:
    """The corpus's columns to read, checked: a caption, image bytes (or a Hugging Face Image struct), the URL."""
    _require_columns(src.pairs, (src.caption_col, src.image_col), schema.names,
                     ("source.caption_col", "source.image_col"))
    image_type = schema.field(src.image_col).type
    if pa.types.is_struct(image_type):  # Hugging Face datasets' Image feature: {bytes, path}
        if image_type.get_field_index("bytes") < 0:
            raise IngestError(f"{src.pairs}: column {src.image_col!r} is a struct without a 'bytes' field "
                              f"({image_type}); expected image bytes", field="source.image_col",
                              hint="set source.image_col to the column of encoded image bytes (binary)")
        image_type = image_type.field("bytes").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type) or pa.types.is_null(image_type)):
        raise IngestError(f"{src.pairs}: column {src.image_col!r} holds {image_type}, not image bytes (binary)",
                          field="source.image_col",
                          hint="set source.image_col to the column of encoded image bytes (binary)")
    return list(dict.fromkeys([src.caption_col, src.image_col] + ([src.url_col] if src.url_col in schema.names
                                                                  else [])))


def corpus_pieces(src: SourceSpec, batch_rows: int) -> Iterator[CorpusPiece]:
    """A corpus cut into pieces in corpus order: Parquet into pieces of at most batch_rows rows, never across a row
    group (only the files' footers are read; the columns are checked here, once); WebDataset into its tars."""
    if corpus_kind(src) == "webdataset":
        for tar in location(src.pairs).glob("*.tar"):
            yield CorpusPiece(tar.path, -1, 0, -1)
        return
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


def corpus_shards(src: SourceSpec, shard_rows: int) -> Iterator[list[CorpusPiece]]:
    """The corpus's pieces, in order, coalesced into shards of at most shard_rows rows (a tar, whose rows are not
    known before it is read, is a shard of its own)."""
    held: list[CorpusPiece] = []
    rows = 0
    for piece in corpus_pieces(src, shard_rows):
        if held and (piece.is_tar or held[0].is_tar or rows + piece.num_rows > shard_rows):
            yield held
            held, rows = [], 0
        held.append(piece)
        rows += piece.num_rows
    if held:
        yield held


def read_corpus_piece(src: SourceSpec, piece: CorpusPiece, images_only: bool = False) -> pa.Table:
    """One piece of a corpus as (url, text, image), or with images_only just (image): a Parquet piece reads only
    those columns."""
    loc = location(src.pairs)
    if piece.is_tar:
        whole = pa.concat_tables(list(_iter_tar(Location(loc.fs, piece.path, loc.scheme), 1 << 30)) or
                                 [CORPUS_SCHEMA.empty_table()])
        return whole.select(["image"]) if images_only else whole
    try:
        pf = pq.ParquetFile(piece.path, filesystem=loc.fs)
        cols = _corpus_columns(src, pf.schema_arrow)
        rb = pf.read_row_group(piece.row_group, columns=[src.image_col] if images_only else cols).slice(
            piece.start, piece.num_rows)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise IngestError(f"{src.pairs}: cannot read as parquet: {e}") from None
    image = rb.column(src.image_col).combine_chunks()
    if pa.types.is_struct(image.type):
        image = image.field("bytes")
    image = image.cast(pa.binary())
    if images_only:
        return pa.table({"image": image})
    url = _as_text(rb.column(src.url_col)) if src.url_col in rb.column_names else pa.nulls(rb.num_rows, pa.string())
    return pa.table({"url": url, "text": _as_text(rb.column(src.caption_col)), "image": image},
                    schema=CORPUS_SCHEMA)


def _iter_tar(tar_path: Location, batch_rows: int):
    """The samples of one WebDataset tar as tables of at most batch_rows rows; a tar cut short is an IngestError."""
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
                        yield pa.table(rows, schema=CORPUS_SCHEMA)
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
        yield pa.table(rows, schema=CORPUS_SCHEMA)


# --------------------------------------------------------------------------- preflight

HEAD_BYTES = 1 << 20  # what check_source reads of a text list


def check_source(src: SourceSpec) -> dict:
    """What a build can know of its source before any work, from its head only (a Parquet footer, the first MiB of a
    text list, the first samples of a tar): that it reads in its format, has the columns the spec names, and
    whether it has rows. Returns {"format", "columns", "rows"}: rows exact for Parquet, else 0 (none) or 1 (some);
    an IngestError naming the field to fix otherwise."""
    return _check_url_list(src) if src.urls is not None else _check_corpus(src)


def _check_url_list(src: SourceSpec) -> dict:
    loc = location(src.urls)
    fmt = url_list_format(src)
    cols = (src.url_col, src.caption_col)
    try:
        if fmt == "parquet":
            with loc.fs.open_input_file(loc.path) as f:
                meta = pq.ParquetFile(f).metadata
                names, rows = meta.schema.to_arrow_schema().names, meta.num_rows
        else:
            with loc.open_input() as f:
                head = f.read(HEAD_BYTES)
                whole = len(head) < HEAD_BYTES
            names, rows = _text_head(head, fmt, whole)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise IngestError(f"{src.urls}: cannot read as {fmt}: {' '.join(str(e).split())}", field="source.urls",
                          hint="give a Parquet, CSV, TSV or JSONL file (or set source.format)") from None
    if rows or names:  # an empty file has no header to check
        _require_columns(src.urls, cols, names)
    return {"format": fmt, "columns": names, "rows": rows}


def _text_head(head: bytes, fmt: str, whole: bool) -> tuple[list[str], int]:
    """(columns, 0 or 1 rows) of the first bytes of a CSV, TSV or JSONL list."""
    import csv

    text = head.decode("utf-8", "replace")
    if not whole:
        text = text[:text.rfind("\n") + 1] or text
    lines = [line for line in text.splitlines() if line.strip()]
    if fmt in ("csv", "tsv"):
        if not lines:
            return [], 0
        header = next(csv.reader([lines[0]], delimiter="\t" if fmt == "tsv" else ","), [])
        return [h.strip() for h in header], int(len(lines) > 1 or not whole)
    names: dict[str, None] = {}
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            names.update(dict.fromkeys(obj))
    return list(names), int(bool(lines))


def _check_corpus(src: SourceSpec) -> dict:
    kind = corpus_kind(src)
    if kind == "webdataset":
        return _check_webdataset(location(src.pairs))
    loc = location(src.pairs)
    if loc.is_dir() and not loc.rglob("*"):
        raise IngestError(f"{src.pairs}: the folder holds no files", field="source.pairs",
                          hint="give a Parquet file or a folder of them, or a folder of WebDataset .tar files")
    try:
        ds = parquet_dataset(loc)
        _corpus_columns(src, ds.schema)
        rows = 0
        for frag in ds.get_fragments():  # stop at the first file with rows: "not empty" is all preflight asks
            rows += frag.metadata.num_rows
            if rows:
                break
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(f"{src.pairs}: cannot read as parquet: {' '.join(str(e).split())}", field="source.pairs",
                          hint="give Parquet files with a caption and an image-bytes column, or a folder of "
                               "WebDataset tars") from None
    return {"format": "parquet", "columns": ds.schema.names, "rows": int(bool(rows))}


def _check_webdataset(folder: Location) -> dict:
    """The first sample of the first tar that has one: an image member and a caption (.txt, or .json's caption)."""
    import tarfile

    for tar_path in folder.glob("*.tar"):
        try:
            with tar_path.open_input() as raw, tarfile.open(fileobj=raw) as tf:
                key, exts = None, set()
                for member in tf:
                    if not member.isfile():
                        continue
                    k, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                    if key is not None and k != key:
                        break
                    key = k
                    exts.add(ext.lower())
        except (tarfile.TarError, EOFError, OSError) as e:
            raise IngestError(f"{tar_path}: not a readable tar: {type(e).__name__}: {e}", field="source.pairs",
                              hint="give a folder of WebDataset tars (KEY.jpg + KEY.txt per sample)") from None
        if key is None:
            continue
        if not exts & set(IMAGE_EXTS):
            raise IngestError(f"{tar_path}: sample {key!r} has no image member ({', '.join(sorted(exts))})",
                              field="source.pairs", hint="each sample needs KEY.jpg (or .png, .webp, ...) beside "
                                                         "KEY.txt or KEY.json")
        if not exts & {"txt", "json"}:
            raise IngestError(f"{tar_path}: sample {key!r} has no caption member ({', '.join(sorted(exts))})",
                              field="source.pairs", hint="each sample needs KEY.txt (or KEY.json with a caption)")
        return {"format": "webdataset", "columns": sorted(exts), "rows": 1}
    return {"format": "webdataset", "columns": [], "rows": 0}
