"""Loader throughput: loaders.pairs.ShardPairs vs reading the same Parquet with pyarrow alone.

Both sides decode every image (PIL open + convert("RGB"), the loader's decode_image) and read uid / image / text of
every row group of every file once (one epoch). The loader adds its per-row work: uid split check, shuffle buffer,
item dicts. Usage: python -m benchmarks.loader [SHARDS] [--n 4000] [--repeat 3]; without SHARDS it writes demo scene
shards (demo.train_data) to a temp folder. The ratio loader/pyarrow is printed last (goal >= 0.9).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from loaders.pairs import ShardPairs, decode_image, resolve_shards


def pyarrow_epoch(files: list[Path]) -> int:
    n = 0
    for f in files:
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=["uid", "image", "text"])
            for uid, img, text in zip(*(t.column(c).to_pylist() for c in ("uid", "image", "text"))):
                decode_image(img)
                n += 1
    return n


def loader_epoch(files: list[Path]) -> int:
    n = 0
    for _ in ShardPairs(files, seed=0, epochs=1, shuffle_buffer=1024):
        n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shards", nargs="?")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    tmp = None
    if a.shards:
        files = resolve_shards([a.shards])
    else:
        from demo.train_data import write_scene_shards

        tmp = tempfile.TemporaryDirectory()
        write_scene_shards(Path(tmp.name) / "s", a.n, seed=0, image_size=64, rows_per_shard=1000)
        files = resolve_shards([Path(tmp.name) / "s"])
    best = {}
    for name, fn in (("pyarrow", pyarrow_epoch), ("loader", loader_epoch)) * a.repeat:
        t0 = time.perf_counter()
        n = fn(files)
        dt = time.perf_counter() - t0
        best[name] = min(best.get(name, float("inf")), dt)
        rows = n
    for name in ("pyarrow", "loader"):
        print(f"{name:8s} {rows / best[name]:10.0f} samples/s (best of {a.repeat}, {rows} rows, decode included)")
    print(f"ratio loader/pyarrow: {best['pyarrow'] / best['loader']:.3f}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
