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
        processed/                  rows with every stage's stats; processed/_DONE.json

Every file is written under a temporary name and renamed, so a file is whole or absent, and a phase is done exactly
when its marker exists.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: the file is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_table(table: pa.Table, path: Path, compression: str | None = "zstd", **kw) -> None:
    """Write Parquet via a temporary file and rename: the file is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression=None if compression == "none" else compression, **kw)
    os.replace(tmp, path)


@dataclass(frozen=True)
class IngestShard:
    """The files of one download task."""

    pairs: Path
    rejects: Path
    done: Path


class BuildFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BuildFolder({str(self.root)!r})"

    def __reduce__(self):  # Ray tasks receive it by path
        return (BuildFolder, (str(self.root),))

    # layout ----------------------------------------------------------------
    @property
    def build_id(self) -> str:
        return self.root.name

    @property
    def work(self) -> Path:
        return self.root / "_work"

    @property
    def spec_file(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects"

    @property
    def input_dir(self) -> Path:
        return self.work / "input"

    def input_shard(self, i: int) -> Path:
        return self.input_dir / f"{i:05d}.parquet"

    @property
    def input_rejects(self) -> Path:
        return self.work / "input_rejects.parquet"

    @property
    def ingest_dir(self) -> Path:
        return self.work / "ingest"

    def ingest_shard(self, i: int) -> IngestShard:
        d = self.ingest_dir
        return IngestShard(d / f"{i:05d}.parquet", d / f"{i:05d}.rejects.parquet", d / f"{i:05d}.done.json")

    def ingest_pair_files(self) -> list[Path]:
        return sorted(self.ingest_dir.glob("[0-9]*[0-9].parquet"))

    def ingest_reject_files(self) -> list[Path]:
        return sorted(self.ingest_dir.glob("*.rejects.parquet"))

    @property
    def processed_dir(self) -> Path:
        return self.work / "processed"

    def processed_files(self) -> list[Path]:
        return sorted(self.processed_dir.glob("*.parquet"))

    def parts(self, sub: str) -> list[Path]:
        """The part files of shards/ or rejects/."""
        return sorted((self.root / sub).glob("part-*.parquet"))

    # phase markers -----------------------------------------------------------
    def _marker(self, phase: str) -> Path:
        return {"input": self.input_dir, "processed": self.processed_dir}[phase] / "_DONE.json"

    def done(self, phase: str) -> dict | None:
        """The phase's summary if it finished, else None."""
        m = self._marker(phase)
        return json.loads(m.read_text()) if m.exists() else None

    def mark_done(self, phase: str, summary: dict) -> None:
        atomic_write_text(self._marker(phase), json.dumps(summary))

    # state -----------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.work / "state.json"

    def state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def set_state(self, **kw) -> None:
        atomic_write_text(self.state_file, json.dumps(self.state() | kw, indent=2))

    # writes ----------------------------------------------------------------
    @staticmethod
    def fresh_dir(path: Path) -> Path:
        """An empty folder at path (what a phase that restarts from scratch writes into)."""
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def drop_work_copies(self) -> None:
        """A finished build's shards and rejects hold every row: drop _work's copies of the image bytes."""
        shutil.rmtree(self.processed_dir, ignore_errors=True)
        for f in self.ingest_pair_files():
            f.unlink()
