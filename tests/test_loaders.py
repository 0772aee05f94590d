"""loaders.pairs: sharding across workers and ranks, resume, hard negatives, HF datasets; loaders.export."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from loaders.pairs import HardNegativeCollate, ShardPairs, resolve_shards
from schemas.columns import PAIR_SCHEMA, stage_fields
from schemas.records import make_uid

N = 203  # rows; uneven over files and row groups on purpose
SCHEMA = pa.schema(list(PAIR_SCHEMA) + stage_fields("negatives_text"))


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader") / "shards"
    root.mkdir()
    imgs = [_jpeg((i * 40 % 256, 0, 0)) for i in range(7)]
    rows = []
    for i in range(N):
        url = f"synthetic://t/{i}.jpg"
        text = f"caption {i}"
        negs = [{"kind": "replace_att", "text": f"negative {i} a", "edit_before": None, "edit_after": None,
                 "span_start": None, "span_end": None, "method": "rule"},
                {"kind": "swap_att", "text": f"negative {i} b", "edit_before": None, "edit_after": None,
                 "span_start": None, "span_end": None, "method": "rule"}] if i % 3 else []
        rows.append({"uid": make_uid(url, text), "url": url, "text": text, "source": "t", "image": imgs[i % 7],
                     "width": 8, "height": 8, "original_width": 8, "original_height": 8, "sha256": "x",
                     "build_id": "b1", "neg_captions": negs, "negatives_count": len(negs)})
    for k, (a, b) in enumerate([(0, 90), (90, 150), (150, N)]):
        pq.write_table(pa.Table.from_pylist(rows[a:b], schema=SCHEMA), root / f"part-{k:05d}.parquet",
                       row_group_size=16)
    return root


def _all_uids(shards: Path) -> list[str]:
    return [u for f in resolve_shards([shards]) for u in pq.read_table(f, columns=["uid"]).column(0).to_pylist()]


def _collate_ids(items):
    return {"uid": [it["uid"] for it in items], "reader": [it["reader"] for it in items],
            "index": [it["index"] for it in items]}


def _epoch(shards, world=2, workers=2, **kw) -> list[list[str]]:
    out = []
    for rank in range(world):
        ds = ShardPairs(resolve_shards([shards]), seed=3, epochs=1, shuffle_buffer=32, rank=rank,
                        world_size=world, decode=False, **kw)
        dl = DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=_collate_ids,
                        multiprocessing_context="spawn" if workers else None)
        out.append([u for b in dl for u in b["uid"]])
    return out


def test_every_sample_once_per_epoch_2_workers_2_ranks(shards):
    per_rank = _epoch(shards)
    seen = Counter(u for r in per_rank for u in r)
    assert sorted(seen) == sorted(_all_uids(shards))
    assert set(seen.values()) == {1}
    assert all(len(r) > N // 4 for r in per_rank)  # both ranks get a share
    assert _epoch(shards) == per_rank  # deterministic for the seed


def test_single_reader_stream_unchanged_and_shuffled(shards):
    files = resolve_shards([shards])
    a = [it["uid"] for it in ShardPairs(files, seed=1, epochs=1, shuffle_buffer=32, decode=False)]
    b = [it["uid"] for it in ShardPairs(files, seed=1, epochs=1, shuffle_buffer=32, decode=False)]
    c = [it["uid"] for it in ShardPairs(files, seed=2, epochs=1, shuffle_buffer=32, decode=False)]
    assert a == b and a != c and sorted(a) == sorted(_all_uids(shards))
    tail = [it["uid"] for it in ShardPairs(files, seed=1, epochs=1, shuffle_buffer=32, decode=False, start=50)]
    assert tail == a[50:]


def test_resume_with_workers_yields_exactly_the_rest(shards):
    files = resolve_shards([shards])
    kw = dict(seed=5, epochs=1, shuffle_buffer=32, rank=1, world_size=2, decode=False)
    full_ds = ShardPairs(files, **kw)
    full = [u for b in DataLoader(full_ds, batch_size=4, num_workers=2, collate_fn=_collate_ids, multiprocessing_context="spawn") for u in b["uid"]]

    ds = ShardPairs(files, **kw)
    got = []
    for i, b in enumerate(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=_collate_ids, multiprocessing_context="spawn")):
        ds.record(b)
        got += b["uid"]
        if i == 6:
            break
    state = json.loads(json.dumps(ds.state_dict()))  # serialisable
    ds2 = ShardPairs(files, **kw)
    ds2.load_state_dict(state)
    rest = [u for b in DataLoader(ds2, batch_size=4, num_workers=2, collate_fn=_collate_ids, multiprocessing_context="spawn") for u in b["uid"]]
    assert sorted(got + rest) == sorted(full)
    assert not set(got) & set(rest)


def test_resume_in_process_counts_itself(shards):
    files = resolve_shards([shards])
    ds = ShardPairs(files, seed=9, epochs=2, shuffle_buffer=16, decode=False)
    full = [it["uid"] for it in ShardPairs(files, seed=9, epochs=2, shuffle_buffer=16, decode=False)]
    it = iter(ds)
    head = [next(it)["uid"] for _ in range(250)]  # into the second epoch
    ds2 = ShardPairs(files, seed=9, epochs=2, shuffle_buffer=16, decode=False)
    ds2.load_state_dict(ds.state_dict())
    assert head + [x["uid"] for x in ds2] == full


def test_images_pil_or_tensor(shards):
    files = resolve_shards([shards])
    item = next(iter(ShardPairs(files, seed=0, epochs=1)))
    assert isinstance(item["image"], Image.Image) and item["image"].size == (8, 8)
    tf = lambda im, rng: torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255  # noqa: E731
    item = next(iter(ShardPairs(files, seed=0, epochs=1, transform=tf)))
    assert item["image"].shape == (3, 8, 8)


def test_hard_negative_batches(shards, tmp_path):
    from training.train import char_tokenizer

    files = resolve_shards([shards])
    # a hard-negative image set: one negative image (with its caption) for a few uids
    uids = _all_uids(shards)[:20]
    pq.write_table(pa.table({"uid": uids, "neg_image": [_jpeg((0, 255, 0))] * 20,
                             "neg_text": [f"neg image {i}" for i in range(20)]}), tmp_path / "hn.parquet")
    tf = lambda im, rng: torch.from_numpy(np.array(im.resize((8, 8)))).permute(2, 0, 1).float()  # noqa: E731
    ds = ShardPairs(files, seed=0, epochs=1, shuffle=False, transform=tf, negatives=True, max_negatives=1,
                    hard_negatives=[tmp_path / "hn.parquet"])
    batch = next(iter(DataLoader(ds, batch_size=16, collate_fn=HardNegativeCollate(char_tokenizer(32)))))
    assert batch["pixel_values"].shape[0] == 16 and batch["input_ids"].shape[0] == 16
    m = batch["neg_input_ids"].shape[0]
    assert m == len(batch["neg_texts"]) == len(batch["neg_owner"]) == 10  # rows i % 3 != 0 of 0..15, 1 each
    for t, o in zip(batch["neg_texts"], batch["neg_owner"].tolist()):
        assert t.startswith(batch["text"][o].replace("caption", "negative"))  # each negative sits with its positive
    assert batch["neg_pixel_values"].shape == (16, 3, 8, 8)
    assert batch["neg_image_owner"].tolist() == list(range(16))


def test_hf_datasets_reads_the_same_rows(shards):
    from datasets import load_dataset

    files = [str(f) for f in resolve_shards([shards])]
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(shards.parent / "hf"))
    assert sorted(ds["uid"]) == sorted(_all_uids(shards))
    Image.open(io.BytesIO(ds[0]["image"])).convert("RGB")
    assert ds[1]["neg_captions"][0]["kind"] == "replace_att"


# --------------------------------------------------------------------------- exports

def test_export_webdataset_reads_back(shards, tmp_path):
    import webdataset as wds

    from loaders.export import export_webdataset

    s = export_webdataset(shards, tmp_path / "wds", samples_per_tar=50)
    assert s["samples"] == N and s["tars"][0] == "00000.tar" and len(s["tars"]) == 5
    src = {}
    for f in resolve_shards([shards]):
        t = pq.read_table(f, columns=["uid", "text", "image"])
        for u, tx, im in zip(*(t.column(c).to_pylist() for c in ("uid", "text", "image"))):
            src[u] = (tx, im)
    urls = [str(tmp_path / "wds" / n) for n in s["tars"]]
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"]
        got[meta["uid"]] = (sample["txt"].decode(), sample["jpg"])
        assert meta["url"].startswith("synthetic://") and "sha256" in meta
    assert got == src


def test_export_uids_npy(shards, tmp_path):
    from loaders.export import UID_DTYPE, export_uids, uids_from_array

    s = export_uids(shards, tmp_path / "subset")
    arr = np.load(s["out"])
    assert arr.dtype == UID_DTYPE == np.dtype("u8,u8")
    assert len(arr) == N and arr.tolist() == sorted(arr.tolist())
    assert uids_from_array(arr) == sorted(_all_uids(shards))
    u = sorted(_all_uids(shards))[0]
    assert (int(arr[0]["f0"]), int(arr[0]["f1"])) == (int(u[:16], 16), int(u[16:], 16))
