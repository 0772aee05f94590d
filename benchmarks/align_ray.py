"""The align stage at real sizes inside Ray Data, as a build runs it (prepare tasks streaming ahead of an actor pool
with fractional GPUs), against the raw model loop: no Prefect, no download, no writes, so it runs where only Ray,
torch and transformers are installed (a GPU machine's image, say).

    .venv/bin/python benchmarks/align_ray.py [--sizes clip-vit-b-32=40000,clip-vit-l-14=10000] [--batch-size 256]
                                             [--gpus 0.5] [--pool 2] [--actor-cpus 1] [--make 10000]

Per size: raw img/s (benchmarks/models.py's raw loop: pre-decoded tensors, a fresh process), then the stage's steady
img/s inside Ray Data (rows / span from the first batch into an actor to the last out; decoding and resizing in the
prepare tasks meanwhile) over files of 1,000 rows (an ingest shard each), their ratio, and on CUDA the GPU's busy
fraction over the span (nvidia-smi). --make: distinct demo scenes drawn (the rows cycle over them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import flows.env  # noqa: E402,F401
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.align import make_pairs  # noqa: E402
from benchmarks.models import GpuSampler, run_raw  # noqa: E402

FILE_ROWS = 1000


def in_ray(files: Path, model: str, batch: int, gpus: float, pool: int, cpus: float) -> dict:
    import ray

    import flows.engine.runner as fb
    from stages.align import AlignParams

    params = AlignParams(model=model, gpus=gpus, cpus=cpus, batch_size=batch).model_dump_json()
    fb.quiet_ray_data()
    name = f"timer-{model}"
    timer = ray.remote(num_cpus=0)(fb.StageTimer).options(name=name).remote()
    ds = ray.data.read_parquet(str(files)).map_batches(
        fb.run_prepare_task, fn_args=("align", params, name), num_cpus=fb.PREPARE_CPUS, batch_size=batch,
        batch_format="pyarrow").map_batches(
        fb.StageActor, fn_constructor_args=("align", params, name), compute=ray.data.ActorPoolStrategy(size=pool),
        num_cpus=cpus, num_gpus=gpus or None, batch_size=batch, batch_format="pyarrow")
    rows, t0 = 0, time.perf_counter()
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += b.num_rows
        if b.column("clip_score").null_count:
            raise RuntimeError("a scene was not scored")
    wall = time.perf_counter() - t0
    t = ray.get(timer.get.remote())["align"]
    ray.kill(timer)
    return {"rows": rows, "wall": wall, "span": t[5] - t[4], "span_start": t[4]}


def write_files(table: pa.Table, folder: Path, n: int) -> None:
    """n rows cycling over the table's scenes, FILE_ROWS to a file, each row its own uid."""
    folder.mkdir(parents=True)
    cycled = pa.concat_tables([table] * (n // table.num_rows + 1))
    for k, start in enumerate(range(0, n, FILE_ROWS)):
        t = cycled.slice(start, min(FILE_ROWS, n - start))
        t = t.set_column(0, "uid", pa.array([f"{k:08d}{i:024x}" for i in range(t.num_rows)]))
        pq.write_table(t, folder / f"{k:05d}.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="clip-vit-b-32=40000,clip-vit-l-14=10000", help="size=images, comma-separated")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--gpus", type=float, default=0.5, help="GPUs per actor on CUDA")
    ap.add_argument("--pool", type=int, default=2, help="actors")
    ap.add_argument("--actor-cpus", type=float, default=1.0)
    ap.add_argument("--make", type=int, default=10_000, help="distinct scenes drawn")
    a = ap.parse_args()

    import ray
    import torch

    from stages.models.sizes import sized_model

    sizes = {s.split("=")[0]: int(s.split("=")[1]) for s in a.sizes.split(",") if s.strip()}
    cuda = torch.cuda.is_available()
    gpus = a.gpus if cuda else 0.0
    print("device:", torch.cuda.get_device_name(0) if cuda else "cpu", "| torch", torch.__version__, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="align-ray-"))
    t0 = time.perf_counter()
    table = make_pairs(tmp / "all.parquet", min(max(sizes.values()), a.make))
    print(f"data: {table.num_rows} scenes, 256 px JPEG, in {time.perf_counter() - t0:.1f}s", flush=True)
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), object_store_memory=8 * 2**30,
             include_dashboard=False, log_to_driver=False)
    results = []
    for size, n in sizes.items():
        sized_model(size)
        model = f"random-{size}"
        part = tmp / size
        write_files(table, part / "files", n)
        pq.write_table(table.slice(0, min(n, table.num_rows)).rename_columns(["uid", "caption", "image"]),
                       part / "raw.parquet")
        raw = run_raw(part / "raw.parquet", model, a.batch_size, 4)
        raw_rate = raw["rows"] / raw["seconds"]
        print(f"{size}: raw {raw_rate:.0f} img/s on {raw['device']} {raw['dtype']}", flush=True)
        sampler = GpuSampler().start() if cuda else None
        try:
            r = in_ray(part / "files", model, a.batch_size, gpus, a.pool, a.actor_cpus)
        finally:
            if sampler:
                sampler.stop()
        busy = sampler.busy(r["span_start"], r["span_start"] + r["span"]) if sampler else None
        rate = r["rows"] / r["span"]
        print(f"  in Ray Data (prepare tasks + {a.pool} actors x {gpus:g} GPU): {r['rows']} rows, span "
              f"{r['span']:.1f}s = {rate:.0f} img/s steady; ratio {rate / raw_rate:.2f}; GPU busy "
              f"{'n/a' if busy is None else f'{busy:.0%}'}; wall {r['wall']:.1f}s", flush=True)
        results.append({"size": size, "n": n, "raw": raw_rate, "ray": rate, "ratio": rate / raw_rate, "busy": busy})
    print(json.dumps(results), flush=True)
    os._exit(0)  # skip Ray's slow teardown


if __name__ == "__main__":
    main()
