"""Streaming readers of pairforge Parquet shards for training: a torch IterableDataset over row groups.

The stream is a pure function of (files, seed, split): epoch e visits the files and their row groups in an order
drawn from (seed, e) and passes the rows through a shuffle buffer seeded the same way. Images are decoded only when
a row leaves the buffer, and `start` skips that many rows of the stream without decoding them, so a resumed
training run sees exactly the rows an uninterrupted one would have seen next.

Rows are split into train and eval by a hash of their uid (`split_of`), so the held-out set does not depend on
shard layout or order. Per-row randomness (augmentation) comes from a generator seeded by (seed, stream position).

Parallel readers. The epoch's row groups are dealt round-robin (after the epoch's shuffle) to
`world_size * num_workers` readers: reader k = rank * num_workers + worker_id reads units[k::n], so every row is
yielded exactly once an epoch across all DataLoader workers and distributed ranks. rank / world_size are arguments,
or taken from torch.distributed when it is initialised. Each reader has its own shuffle buffer seeded by
(seed, epoch, reader). With one reader (the default, as the trainer uses it) the stream is the single-reader one.

Resuming. Every item carries "reader" and "index" (its position in that reader's stream). `state_dict()` holds the
rows consumed per reader: counted by the dataset itself when iterated in-process (num_workers=0), or recorded from
the batches the main process received with `record(batch)` when DataLoader workers read. `load_state_dict(state)` on
a fresh dataset (same files, seed, readers) makes each reader skip its consumed rows without decoding them, so the
resumed stream is exactly the remaining samples.

Hard negatives (`negatives=True`, CounterCurate / NegCLIP / TripletCLIP batching): each item also holds
"neg_texts" / "neg_kinds" from the `neg_captions` column (stages.negatives_text: list<struct<kind, text, ...>>), at
most `max_negatives` of them, and, when a hard-negative image set is given (`hard_negatives`: Parquet files with
columns uid, neg_image (bytes), neg_text), "neg_images" / "neg_image_texts" for the item's uid. `HardNegativeCollate`
keeps a positive with its negatives in the same batch: positives first, then the negatives of every positive with
an owner index (training.train's negclip / tripletclip losses read that layout).

Loading with Hugging Face datasets instead (the shards are plain Parquet):

    from datasets import load_dataset
    from loaders.pairs import resolve_shards
    ds = load_dataset("parquet", data_files=[str(f) for f in resolve_shards(["BUILD/shards"])], split="train")
    ds[0]["uid"], ds[0]["text"]; PIL.Image.open(io.BytesIO(ds[0]["image"]))   # image: the JPEG bytes
    # streaming=True gives an IterableDataset; ds.to_iterable_dataset(num_shards=n) splits it for workers

(tests/test_loaders.py checks that it reads the same rows.)
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

from dataio.storage import Location, is_uri, location
from schemas.errors import UserError

# Called per row with the decoded RGB image and a per-row generator; returns what the batch holds (a tensor).
ImageTransform = Callable[[Image.Image, random.Random], Any]


class LoaderError(UserError):
    pass


def resolve_shards(patterns: list[str | Path | Location]) -> list[Location]:
    """Folders (every *.parquet inside, recursively) and glob patterns -> sorted, unique Parquet files, local or in
    object storage (s3://bucket/prefix; there a glob may only be in the last name: s3://b/shards/part-*.parquet)."""
    files: set[Location] = set()
    for pat in patterns:
        text = str(pat)
        if any(ch in text for ch in "*?["):
            if is_uri(text):
                base, _, name = text.rpartition("/")
                if any(ch in base for ch in "*?["):
                    raise LoaderError(f"{text}: in object storage a glob may only be in the last name")
                found = [f for f in location(base).glob(name) if f.name.endswith(".parquet")]
            else:
                found = [location(f) for f in glob.glob(text, recursive=True) if f.endswith(".parquet")]
        else:
            p = location(pat)
            if p.is_dir():
                found = [f for f in p.rglob("*.parquet") if not f.name.startswith(("_", "."))]
            elif p.is_file():
                found = [p]
            else:
                raise LoaderError(f"no such shard folder or file: {pat}")
        if not found:
            raise LoaderError(f"no Parquet shards match {pat}")
        files.update(found)
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
    file: Location
    row_group: int


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover
        pass
    return 0, 1


class ShardPairs(IterableDataset):
    """(image, text, uid) rows of pairforge shards, shuffled, for one split; endless unless `epochs` is set.

    Yields dicts {"image": transform(image, rng) (the PIL image without a transform), "text": str, "uid": str,
    "index": position in this reader's stream, "reader": reader number}, plus the hard-negative fields with
    `negatives=True` (see the module docstring). `start` skips that many rows of every reader's stream.
    """

    def __init__(self, files: list[str | Path | Location], *, transform: ImageTransform | None = None, seed: int = 0,
                 split: str = "train", eval_fraction: float = 0.0, shuffle: bool = True, shuffle_buffer: int = 2048,
                 epochs: int | None = None, start: int = 0, text_column: str = "text", image_column: str = "image",
                 uid_column: str = "uid", rank: int | None = None, world_size: int | None = None,
                 negatives: bool = False, neg_column: str = "neg_captions", max_negatives: int | None = None,
                 neg_kinds: tuple[str, ...] | None = None, hard_negatives: list[str | Path | Location] | None = None,
                 decode: bool = True):
        if split not in ("train", "eval", "all"):
            raise LoaderError(f"split must be train, eval or all, got {split!r}")
        if not files:
            raise LoaderError("no shard files")
        self.files = [location(f) for f in files]
        self.transform = transform
        self.seed = seed
        self.split = split
        self.eval_fraction = eval_fraction
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.epochs = epochs
        self.start = start
        self.decode = decode
        self.columns = {"text": text_column, "image": image_column, "uid": uid_column}
        if rank is None and world_size is None:
            rank, world_size = _dist_rank_world()
        self.rank, self.world_size = int(rank or 0), int(world_size or 1)
        if not 0 <= self.rank < self.world_size:
            raise LoaderError(f"rank {self.rank} outside world_size {self.world_size}")
        self.negatives = negatives
        self.neg_column = neg_column
        self.max_negatives = max_negatives
        self.neg_kinds = tuple(neg_kinds) if neg_kinds else None
        self._hard_files = [location(f) for f in (hard_negatives or [])]
        self._hard: dict[str, list[tuple[bytes, str]]] | None = None
        self._units = None
        self._consumed: dict[int, int] = {}  # reader -> rows consumed (in-process iteration or record())
        self._resume: dict[int, int] = {}
        self._readers_total: int | None = None
        for f in self.files:
            names = f.read_schema().names
            missing = [c for c in self.columns.values() if c not in names]
            if missing:
                raise LoaderError(f"{f}: missing columns {missing} (has {names})")
            if negatives and neg_column not in names:
                raise LoaderError(f"{f}: negatives=True needs the {neg_column!r} column (the negatives_text stage)")

    # ------------------------------------------------------------------ readers

    def _reader(self) -> tuple[int, int]:
        """(this reader's number, readers in all) for the current process."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    # ------------------------------------------------------------------ stream of raw rows

    def units(self) -> list[_Unit]:
        if self._units is None:
            self._units = [_Unit(f, rg) for f in self.files for rg in range(f.parquet_file().num_row_groups)]
        return self._units

    def _keep(self, uid: str) -> bool:
        return self.split == "all" or split_of(uid, self.eval_fraction) == self.split

    def _epoch_rows(self, epoch: int, reader: int = 0, readers: int = 1) -> Iterator[tuple]:
        units = list(self.units())
        rng = random.Random(_mix(self.seed, epoch, 1))
        if self.shuffle:
            rng.shuffle(units)
        units = units[reader::readers]
        if readers > 1:
            rng = random.Random(_mix(self.seed, epoch, 3, reader))
        buffer: list[tuple] = []
        cols = [self.columns["uid"], self.columns["image"], self.columns["text"]]
        if self.negatives:
            cols.append(self.neg_column)
        open_files: dict[Location, pq.ParquetFile] = {}
        for u in units:
            pf = open_files.get(u.file) or open_files.setdefault(u.file, u.file.parquet_file())
            t = pf.read_row_group(u.row_group, columns=cols)
            for row in zip(*(t.column(c).to_pylist() for c in cols)):
                uid, img, text = row[0], row[1], row[2]
                if img is None or text is None or not self._keep(uid):
                    continue
                if not self.shuffle:
                    yield row
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(row)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], row = row, buffer[i]
                yield row
        rng.shuffle(buffer)
        yield from buffer

    def rows(self, reader: int = 0, readers: int = 1) -> Iterator[tuple[int, tuple]]:
        """(stream position, (uid, image bytes, text[, neg_captions])) of one reader from position 0, across
        epochs."""
        pos, epoch = 0, 0
        while self.epochs is None or epoch < self.epochs:
            empty = True
            for row in self._epoch_rows(epoch, reader, readers):
                empty = False
                yield pos, row
                pos += 1
            if empty and readers == 1:
                raise LoaderError(f"split {self.split!r} of {len(self.files)} shard files has no rows")
            if empty and self.epochs is None:
                return  # a reader with no row groups (more readers than row groups)
            epoch += 1

    def __iter__(self):
        reader, readers = self._reader()
        if self._resume and self._readers_total not in (None, readers):
            raise LoaderError(f"resume state was saved with {self._readers_total} readers, now {readers}")
        skip = self.start + self._resume.get(reader, 0)
        in_process = readers == self.world_size  # no DataLoader workers: count consumption here
        for pos, row in self.rows(reader, readers):
            if pos < skip:
                continue
            uid, img, text = row[0], row[1], row[2]
            image = decode_image(img) if self.decode else img
            if self.transform is not None and self.decode:
                image = self.transform(image, random.Random(_mix(self.seed, pos, 2, reader)
                                                            if readers > 1 else _mix(self.seed, pos, 2)))
            item = {"image": image, "text": text, "uid": uid, "index": pos, "reader": reader}
            if self.negatives:
                item.update(self._negatives(uid, row[3], pos, reader))
            if in_process:
                self._consumed[reader] = pos + 1 - self.start
                self._readers_total = readers
            yield item

    def _negatives(self, uid: str, negs, pos: int, reader: int) -> dict:
        negs = [n for n in (negs or []) if n and n.get("text") and (self.neg_kinds is None
                                                                    or n.get("kind") in self.neg_kinds)]
        if self.max_negatives is not None and len(negs) > self.max_negatives:
            rng = random.Random(_mix(self.seed, pos, 4, reader))
            negs = rng.sample(negs, self.max_negatives)
        out = {"neg_texts": [n["text"] for n in negs], "neg_kinds": [n.get("kind") for n in negs],
               "neg_images": [], "neg_image_texts": []}
        if self._hard_files:
            for data, text in self._hard_set().get(uid, []):
                im = decode_image(data) if self.decode else data
                if self.transform is not None and self.decode:
                    im = self.transform(im, random.Random(_mix(self.seed, pos, 5, reader)))
                out["neg_images"].append(im)
                out["neg_image_texts"].append(text)
        return out

    def _hard_set(self) -> dict[str, list[tuple[bytes, str]]]:
        if self._hard is None:
            self._hard = {}
            for f in self._hard_files:
                t = f.read_table(columns=["uid", "neg_image", "neg_text"])
                for uid, im, tx in zip(*(t.column(c).to_pylist() for c in ("uid", "neg_image", "neg_text"))):
                    if im is not None and tx:
                        self._hard.setdefault(uid, []).append((im, tx))
        return self._hard

    # ------------------------------------------------------------------ resume

    def record(self, batch) -> None:
        """Count the items of a batch (a collated dict with "reader"/"index", or a list of items) as consumed;
        call it in the main process for each batch a DataLoader with workers hands over."""
        if isinstance(batch, dict):
            pairs = zip(batch["reader"], batch["index"])
        else:
            pairs = ((it["reader"], it["index"]) for it in batch)
        for r, i in pairs:
            r, i = int(r), int(i)
            self._consumed[r] = max(self._consumed.get(r, 0), i + 1 - self.start)

    def state_dict(self) -> dict:
        consumed = dict(self._resume)
        for r, n in self._consumed.items():
            consumed[r] = max(consumed.get(r, 0), n + 0)
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "readers": self._readers_total, "consumed": {str(k): v for k, v in sorted(consumed.items())}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("world_size") != self.world_size:
            raise LoaderError("resume state belongs to another seed / world_size")
        self._resume = {int(k): int(v) for k, v in state["consumed"].items()}
        self._readers_total = state.get("readers")
        self._consumed = {}

    def count(self) -> int:
        """Rows of this split in one epoch (reads the uid column only)."""
        n = 0
        for f in self.files:
            for uid in f.read_table(columns=[self.columns["uid"]]).column(0).to_pylist():
                n += self._keep(uid)
        return n


class HardNegativeCollate:
    """Items of ShardPairs(negatives=True) -> one batch holding each positive with its negatives.

    {"pixel_values": (B, ...), "input_ids"/"attention_mask": the B positive captions,
     "neg_input_ids"/"neg_attention_mask": M negative captions, "neg_owner": (M,) index of their positive,
     "neg_pixel_values": (K, ...) negative images, "neg_image_input_ids"/"neg_image_attention_mask": their K
     captions, "neg_image_owner": (K,), plus "text", "neg_texts", "uid", "reader", "index"}.
    Images must already be tensors (a transform). Tokenizer: a transformers tokenizer.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _tok(self, texts: list[str]) -> tuple:
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def __call__(self, items: list[dict]) -> dict:
        import torch

        texts = [it["text"] for it in items]
        ids, mask = self._tok(texts)
        out = {"pixel_values": torch.stack([it["image"] for it in items]), "input_ids": ids, "attention_mask": mask,
               "text": texts, "uid": [it["uid"] for it in items],
               "reader": [it.get("reader", 0) for it in items], "index": [it.get("index", 0) for it in items]}
        neg_texts, owner, neg_ims, im_texts, im_owner = [], [], [], [], []
        for b, it in enumerate(items):
            for t in it.get("neg_texts", []):
                neg_texts.append(t)
                owner.append(b)
            for im, t in zip(it.get("neg_images", []), it.get("neg_image_texts", [])):
                neg_ims.append(im)
                im_texts.append(t)
                im_owner.append(b)
        out["neg_texts"] = neg_texts
        out["neg_owner"] = torch.tensor(owner, dtype=torch.long)
        if neg_texts:
            out["neg_input_ids"], out["neg_attention_mask"] = self._tok(neg_texts)
        out["neg_image_owner"] = torch.tensor(im_owner, dtype=torch.long)
        if neg_ims:
            out["neg_pixel_values"] = torch.stack(neg_ims)
            out["neg_image_input_ids"], out["neg_image_attention_mask"] = self._tok(im_texts)
        return out


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
