"""Download: an input shard's URLs -> downloaded pairs, with img2dataset's Downloader doing the fetching and
resizing through our fetch (dataio.fetch) and a guarded decode.

Plain Python: the engine distributes `ingest_shard` over Ray, one call per input shard. Every URL ends either in the
shard's pairs or in its rejects, with a reason from dataio.reasons.REASONS.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dataio.build_folder import BuildFolder, atomic_write_table, atomic_write_text
from dataio.fetch import AddressGuard, Fetcher, install_fetcher, restore_opener
from dataio.reasons import classify_error
from schemas.columns import DOWNLOADED_SCHEMA, REJECT_SCHEMA
from schemas.errors import exception_text
from schemas.spec import IngestSpec

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations


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
        return f"not_an_image: {exception_text(e)}"
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
        return DOWNLOADED_SCHEMA.empty_table(), []
    d = raw.to_pydict()
    img_col = next(c for c in ("jpg", "png", "webp") if c in d)
    pairs = {k: [] for k in DOWNLOADED_SCHEMA.names}
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
    return pa.table(pairs, schema=DOWNLOADED_SCHEMA), rejects
