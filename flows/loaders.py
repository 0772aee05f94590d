"""Streaming readers of pairforge Parquet shards for training: a torch IterableDataset over row groups.

The stream is a pure function of (files, seed, split): epoch e visits the files and their row groups in an order
drawn from (seed, e) and passes the rows through a shuffle buffer seeded the same way. Images are decoded only when
a row leaves the buffer, and `start` skips that many rows of the stream without decoding them, so a resumed
training run sees exactly the rows an uninterrupted one would have seen next.

Rows are split into train and eval by a hash of their uid (`split_of`), so the held-out set does not depend on
shard layout or order. Per-row randomness (augmentation) comes from a generator seeded by (seed, stream position).
"""
from __future__ import annotations

import glob
import hashlib
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import IterableDataset

# Called per row with the decoded RGB image and a per-row generator; returns what the batch holds (a tensor).
ImageTransform = Callable[[Image.Image, random.Random], Any]


class LoaderError(ValueError):
    pass


def resolve_shards(patterns: list[str | Path]) -> list[Path]:
    """Folders (every *.parquet inside, recursively) and glob patterns -> sorted, unique Parquet files."""
    files: set[Path] = set()
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            found = [f for f in p.rglob("*.parquet") if not f.name.startswith(("_", "."))]
        elif any(ch in str(pat) for ch in "*?["):
            found = [Path(f) for f in glob.glob(str(pat), recursive=True) if f.endswith(".parquet")]
        elif p.is_file():
            found = [p]
        else:
            raise LoaderError(f"no such shard folder or file: {pat}")
        if not found:
            raise LoaderError(f"no Parquet shards match {pat}")
        files.update(f.resolve() for f in found)
    return sorted(files)


def split_of(uid: str, eval_fraction: float) -> str:
    """'eval' for a stable `eval_fraction` of uids, else 'train' (blake2b of the uid, independent of row order)."""
    if eval_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def _mix(*parts: int) -> int:
    """A 64-bit seed from integers (stable across processes, unlike hash())."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "big", signed=True))
    return int.from_bytes(h.digest(), "big")


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


@dataclass(frozen=True)
class _Unit:
    file: Path
    row_group: int


class ShardPairs(IterableDataset):
    """(image, text, uid) rows of pairforge shards, shuffled, for one split; endless unless `epochs` is set.

    Yields dicts {"image": transform(image, rng), "text": str, "uid": str, "index": stream position}.
    """

    def __init__(self, files: list[Path], *, transform: ImageTransform | None = None, seed: int = 0,
                 split: str = "train", eval_fraction: float = 0.0, shuffle: bool = True, shuffle_buffer: int = 2048,
                 epochs: int | None = None, start: int = 0, text_column: str = "text", image_column: str = "image",
                 uid_column: str = "uid"):
        if split not in ("train", "eval", "all"):
            raise LoaderError(f"split must be train, eval or all, got {split!r}")
        if not files:
            raise LoaderError("no shard files")
        self.files = [Path(f) for f in files]
        self.transform = transform
        self.seed = seed
        self.split = split
        self.eval_fraction = eval_fraction
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.epochs = epochs
        self.start = start
        self.columns = {"text": text_column, "image": image_column, "uid": uid_column}
        self._units = None
        for f in self.files:
            names = pq.read_schema(f).names
            missing = [c for c in self.columns.values() if c not in names]
            if missing:
                raise LoaderError(f"{f}: missing columns {missing} (has {names})")

    # ------------------------------------------------------------------ stream of raw rows

    def units(self) -> list[_Unit]:
        if self._units is None:
            self._units = [_Unit(f, rg) for f in self.files for rg in range(pq.ParquetFile(f).num_row_groups)]
        return self._units

    def _keep(self, uid: str) -> bool:
        return self.split == "all" or split_of(uid, self.eval_fraction) == self.split

    def _epoch_rows(self, epoch: int) -> Iterator[tuple[str, bytes, str]]:
        units = list(self.units())
        rng = random.Random(_mix(self.seed, epoch, 1))
        if self.shuffle:
            rng.shuffle(units)
        buffer: list[tuple[str, bytes, str]] = []
        cols = [self.columns["uid"], self.columns["image"], self.columns["text"]]
        open_files: dict[Path, pq.ParquetFile] = {}
        for u in units:
            pf = open_files.get(u.file) or open_files.setdefault(u.file, pq.ParquetFile(u.file))
            t = pf.read_row_group(u.row_group, columns=cols)
            for uid, img, text in zip(*(t.column(c).to_pylist() for c in cols)):
                if img is None or text is None or not self._keep(uid):
                    continue
                if not self.shuffle:
                    yield uid, img, text
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append((uid, img, text))
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], row = (uid, img, text), buffer[i]
                yield row
        rng.shuffle(buffer)
        yield from buffer

    def rows(self) -> Iterator[tuple[int, tuple[str, bytes, str]]]:
        """(stream position, (uid, image bytes, text)) from position 0, across epochs."""
        pos, epoch = 0, 0
        while self.epochs is None or epoch < self.epochs:
            empty = True
            for row in self._epoch_rows(epoch):
                empty = False
                yield pos, row
                pos += 1
            if empty:
                raise LoaderError(f"split {self.split!r} of {len(self.files)} shard files has no rows")
            epoch += 1

    def __iter__(self):
        for pos, (uid, img, text) in self.rows():
            if pos < self.start:
                continue
            image = decode_image(img)
            if self.transform is not None:
                image = self.transform(image, random.Random(_mix(self.seed, pos, 2)))
            yield {"image": image, "text": text, "uid": uid, "index": pos}

    def count(self) -> int:
        """Rows of this split in one epoch (reads the uid column only)."""
        n = 0
        for f in self.files:
            for uid in pq.read_table(f, columns=[self.columns["uid"]]).column(0).to_pylist():
                n += self._keep(uid)
        return n


def random_crop(image: Image.Image, rng: random.Random, min_area: float) -> Image.Image:
    """A crop keeping a random `min_area`..1 fraction of the area, aspect ratio kept within 10%."""
    if min_area >= 1.0:
        return image
    w, h = image.size
    area = rng.uniform(min_area, 1.0)
    ratio = rng.uniform(0.9, 1.1)
    cw = min(w, max(1, round(w * (area * ratio) ** 0.5)))
    ch = min(h, max(1, round(h * (area / ratio) ** 0.5)))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.crop((left, top, left + cw, top + ch))
