"""The build folder: one class owns its layout, completion markers, state and atomic writes.

    <out>/<dataset>/<build_id>/
      spec.yaml  manifest.json  stats.json  report.html  README.md
      shards/part-NNNNN.parquet     kept rows
      rejects/part-NNNNN.parquet    every other row, with its stage, reason and detail
      _work/                        intermediate state; what makes a resume skip finished work
        state.json                  spec hash, source fingerprint, status, timings
        input/NNNNN.parquet         uids to fetch, one file per download task
        input/_DONE.json            the input phase's summary
        input_rejects.parquet       rows rejected before any fetch
        ingest/NNNNN.parquet        downloaded pairs of input shard NNNNN
        ingest/NNNNN.rejects.parquet, ingest/NNNNN.done.json
        processed/input_shard=N/    rows of input shard N with every stage's stats (no image bytes)
        processed/_done/NNNNN.json  input shard NNNNN's stats are whole; processed/_DONE.json: all of them

The folder may be local or in object storage (dataio.storage): every path it hands out is a Location. Every file
is written whole or absent, and a phase is done exactly when its marker exists.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow as pa

from dataio.storage import Location, location, write_table_whole


def atomic_write_text(path: str | os.PathLike | Location, text: str) -> None:
    """Write text whole or absent (a temporary file renamed locally, one upload in object storage)."""
    location(path).write_text(text)


def atomic_write_table(table: pa.Table, path: str | os.PathLike | Location, compression: str | None = "zstd",
                       checksum: bool = False, **kw) -> dict:
    """Write Parquet whole or absent; returns {path, rows, bytes, sha256 (with checksum)}."""
    return write_table_whole(table, path, compression, checksum, **kw)


@dataclass(frozen=True)
class IngestShard:
    """The files of one download task."""

    pairs: Location
    rejects: Location
    done: Location


class BuildFolder:
    def __init__(self, root: str | os.PathLike | Location):
        self.root = location(root)

    def __repr__(self) -> str:
        return f"BuildFolder({str(self.root)!r})"

    def __reduce__(self):  # Ray tasks receive it by path
        return (BuildFolder, (str(self.root),))

    # layout ----------------------------------------------------------------
    @property
    def build_id(self) -> str:
        return self.root.name

    @property
    def work(self) -> Location:
        return self.root / "_work"

    @property
    def spec_file(self) -> Location:
        return self.root / "spec.yaml"

    @property
    def manifest(self) -> Location:
        return self.root / "manifest.json"

    @property
    def stats(self) -> Location:
        return self.root / "stats.json"

    @property
    def shards(self) -> Location:
        return self.root / "shards"

    @property
    def rejects(self) -> Location:
        return self.root / "rejects"

    @property
    def input_dir(self) -> Location:
        return self.work / "input"

    def input_shard(self, i: int) -> Location:
        return self.input_dir / f"{i:05d}.parquet"

    @property
    def input_rejects(self) -> Location:
        return self.work / "input_rejects.parquet"

    @property
    def ingest_dir(self) -> Location:
        return self.work / "ingest"

    def ingest_shard(self, i: int) -> IngestShard:
        d = self.ingest_dir
        return IngestShard(d / f"{i:05d}.parquet", d / f"{i:05d}.rejects.parquet", d / f"{i:05d}.done.json")

    def ingest_pair_files(self) -> list[Location]:
        return self.ingest_dir.glob("[0-9]*[0-9].parquet")

    def ingest_reject_files(self) -> list[Location]:
        return self.ingest_dir.glob("*.rejects.parquet")

    @property
    def processed_dir(self) -> Location:
        return self.work / "processed"

    def stats_marker(self, src: int) -> Location:
        """Written once every row of input shard `src` has its stats in processed/."""
        return self.processed_dir / "_done" / f"{src:05d}.json"

    def stats_done(self) -> set[int]:
        """Input shards whose stats finished (one listing, no marker read)."""
        return {int(m.stem) for m in (self.processed_dir / "_done").glob("[0-9]*.json")}

    def parts(self, sub: str) -> list[Location]:
        """The part files of shards/ or rejects/."""
        return (self.root / sub).glob("part-*.parquet")

    # phase markers -----------------------------------------------------------
    def _marker(self, phase: str) -> Location:
        return {"input": self.input_dir, "processed": self.processed_dir}[phase] / "_DONE.json"

    def done(self, phase: str) -> dict | None:
        """The phase's summary if it finished, else None."""
        m = self._marker(phase)
        return json.loads(m.read_text()) if m.exists() else None

    def mark_done(self, phase: str, summary: dict) -> None:
        atomic_write_text(self._marker(phase), json.dumps(summary))

    # state -----------------------------------------------------------------
    @property
    def state_file(self) -> Location:
        return self.work / "state.json"

    def state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def set_state(self, **kw) -> None:
        atomic_write_text(self.state_file, json.dumps(self.state() | kw, indent=2))

    # writes ----------------------------------------------------------------
    @staticmethod
    def fresh_dir(path: Location) -> Location:
        """An empty folder at path (what a phase that restarts from scratch writes into)."""
        path.rmtree()
        return path.mkdir()

    def drop_work_copies(self) -> None:
        """A finished build's shards and rejects hold every row: drop _work's copies of the image bytes."""
        self.processed_dir.rmtree()
        for f in self.ingest_pair_files():
            f.unlink()
