"""Training pairs for the demo scorer: clean synthetic scenes with true captions, as pairforge Parquet shards.

`write_scene_shards(out, n, seed, image_size)` draws `n` scenes (demo.scenes), renders each at `image_size`
(or at one of several sizes), encodes it as JPEG and writes rows in the pair-record schema (schemas.columns
PAIR_SCHEMA) to out/part-NNNNN.parquet, deterministically for its arguments. Captions are the equivalent variants
of `caption(scene, rng)` (relation stated from either group, optional 'a picture of ...' prefix), as in the demo
corpus. A finished folder holds _DONE.json with the arguments; calling again with the same arguments is a no-op.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from demo.scenes import caption, encode_jpeg, render_scene, sample_scene
from schemas.columns import PAIR_SCHEMA
from schemas.records import make_uid

SOURCE = "demo-scenes-train"


def scene_rows(n: int, seed: int, image_size: int | Sequence[int], start: int = 0,
               jpeg_quality: tuple[int, int] = (75, 95)) -> list[dict]:
    """Rows start..start+n-1 of the stream for `seed` (row i depends only on (seed, i, sizes, quality))."""
    sizes = [image_size] if isinstance(image_size, int) else list(image_size)
    rows = []
    for i in range(start, start + n):
        rng = random.Random(f"{seed}/{i}")
        scene = sample_scene(rng)
        size = rng.choice(sizes)
        im = render_scene(scene, size, rng.getrandbits(63))
        data = encode_jpeg(im, rng.randint(*jpeg_quality))
        text = caption(scene, rng)
        url = f"synthetic://{SOURCE}/{seed}/{i}.jpg"
        rows.append({
            "uid": make_uid(url, text), "url": url, "text": text, "source": SOURCE, "image": data,
            "width": size, "height": size, "original_width": size, "original_height": size,
            "sha256": hashlib.sha256(data).hexdigest(), "build_id": f"{SOURCE}-{seed}",
        })
    return rows


def write_scene_shards(out: str | Path, n: int, seed: int = 0, image_size: int | Sequence[int] = 64,
                       rows_per_shard: int = 5000) -> dict:
    """Write `n` scene pairs to out/part-NNNNN.parquet; returns the summary also stored in out/_DONE.json."""
    out = Path(out)
    sizes = [image_size] if isinstance(image_size, int) else [int(s) for s in image_size]
    params = {"n": n, "seed": seed, "image_sizes": sizes, "rows_per_shard": rows_per_shard, "source": SOURCE}
    done = out / "_DONE.json"
    if done.exists():
        summary = json.loads(done.read_text())
        if summary.get("params") == params:
            return summary
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = []
    for k, start in enumerate(range(0, n, rows_per_shard)):
        rows = scene_rows(min(rows_per_shard, n - start), seed, sizes, start=start)
        table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)
        name = f"part-{k:05d}.parquet"
        pq.write_table(table, tmp / name, row_group_size=256, compression="zstd")
        files.append({"path": name, "rows": table.num_rows})
    summary = {"params": params, "rows": n, "files": files}
    (tmp / "_DONE.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, nargs="+", default=[64])
    a = p.parse_args(argv)
    print(json.dumps(write_scene_shards(a.out, a.n, a.seed, a.image_size), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
