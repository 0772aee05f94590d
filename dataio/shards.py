"""write: kept rows -> shards/part-NNNNN.parquet of a target row count, rejects -> rejects/, plus the manifest.

Each file is written whole or absent, locally or in object storage (dataio.storage).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

from dataio.build_folder import atomic_write_table, atomic_write_text
from dataio.storage import Location, location
from schemas.columns import SCHEMA_VERSION


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Buffers rows and writes part-NNNNN.parquet files of rows_per_shard rows (the last may be smaller)."""

    def __init__(self, folder: str | Path | Location, schema: pa.Schema, rows_per_shard: int,
                 compression: str = "zstd"):
        self.folder = location(folder).mkdir()
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.compression = None if compression == "none" else compression
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[dict] = []

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = conform(table, self.schema)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        combined = pa.concat_tables(self.pending)
        head, rest = combined.slice(0, n), combined.slice(n)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows
        path = self.folder / f"part-{len(self.files):05d}.parquet"
        self.files.append(atomic_write_table(head, path, self.compression, checksum=True,
                                             row_group_size=max(1, min(n, 1024))))

    def close(self) -> list[dict]:
        """Flush the rest; a writer that got no rows still leaves one empty file with the schema for readers."""
        if self.pending_rows or not self.files:
            if not self.pending:
                self.pending = [self.schema.empty_table()]
            self._flush(self.pending_rows)
        return self.files


IMAGE_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"), (b"II*\x00", "tiff"),
               (b"MM\x00*", "tiff"))


def image_formats(images: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """How many images of each format (jpeg, png, webp, gif, bmp, tiff, other; none for a null), from their first
    bytes, vectorised: what a dataset card says the shards hold."""
    import pyarrow.compute as pc

    out: dict[str, int] = {}
    for c in pc.value_counts(pc.binary_slice(images, 0, 4)).to_pylist():
        head, n = c["values"], c["counts"]
        if head is None:
            kind = "none"
        elif head == b"RIFF":
            continue  # counted below: RIFF holds WebP and other things
        else:
            kind = next((k for magic, k in IMAGE_MAGIC if head.startswith(magic)), "other")
        out[kind] = out.get(kind, 0) + n
    riff = pc.equal(pc.binary_slice(images, 0, 4), b"RIFF")
    webp = int(pc.sum(pc.and_(riff, pc.equal(pc.binary_slice(images, 8, 12), b"WEBP"))).as_py() or 0)
    other = int(pc.sum(riff).as_py() or 0) - webp
    for kind, n in (("webp", webp), ("other", other)):
        if n:
            out[kind] = out.get(kind, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast to schema; columns the table lacks become nulls (their fields must be nullable)."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def write_manifest(build_dir: str | Path | Location, *, build_id: str, dataset: str, spec_hash: str, code_version: str,
                   shards: list[dict], rejects: list[dict], extra: dict | None = None) -> dict:
    build_dir = location(build_dir)

    def rel(files):
        return [dict(f, path=location(f["path"]).relative_to(build_dir)) for f in files]

    manifest = {
        "build_id": build_id,
        "dataset": dataset,
        "schema_version": SCHEMA_VERSION,
        "spec_hash": spec_hash,
        "code_version": code_version,
        "rows": sum(f["rows"] for f in shards),
        "bytes": sum(f["bytes"] for f in shards),
        "rejected_rows": sum(f["rows"] for f in rejects),
        "shards": rel(shards),
        "rejects": rel(rejects),
        **(extra or {}),
    }
    atomic_write_text(build_dir / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
