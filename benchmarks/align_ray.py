"""The align stage fed as a build feeds it (prepare tasks streaming ahead of an actor pool, flows.engine.runner's
stage_pipeline) against the raw model loop, on web-sized JPEGs; no Prefect, no download, no writes, so it runs where
only Ray, pydantic, torch and transformers are installed (a GPU machine's image, see benchmarks/gpu_feed.sh).

    .venv/bin/python benchmarks/align_ray.py [--sizes clip-vit-b-32=40000,clip-vit-l-14=10000] [--decode cpu,gpu]
        [--batch-size 512] [--gpus 0.5] [--pool 2] [--actor-cpus 1] [--distinct 1000] [--prepare-n 200] [--scores]
        [--prepare-only]

Data: --distinct JPEGs of 640-1,280 px made of real photos at about their own scale (tests/realdata.web_jpegs:
~150 KB, quality 80-90), captions from SugarCrepe's COCO captions; the rows of each size cycle over them, in files
of 1,000 rows (an ingest shard each).

1. prepare, on one core (CPU time, this process): today's path (each image decoded in full, the processor's
   resize and crop: what prepare_batch did before reduced decoding) and the stage's prepare_batch now (JPEG decoded
   at the smallest DCT scale that keeps the model's 224 px, Pillow's resize, plus the captions' token ids) over the
   same --prepare-n images: img/s per core of each and their ratio (goal >= 2), the pixels' mean difference, and
   with --scores the largest score difference of CLIP B/32 (random weights) between the two (goal <= 1e-2).
2. per size, raw: a fresh process loads the model (align's load_clip: device, dtype, SDPA), holds a batch's uint8
   pixels and token ids on the device, warms up, then times forwards (normalise on the device, forward, the
   embeddings back to the host) for a few seconds: the model's own rate, no feeding.
3. per size and --decode mode, the pipeline: rows / seconds in the steady state, from the driver's timestamps of
   output batches, between --warmup of the rows (actors loading and warming, queues filling) and 95% (the drain);
   its ratio to raw; the GPU's busy fraction over that window from NVML (pynvml; nvidia-smi where it is absent);
   the prepare step's img/s per core of CPU time, and the bytes a row carries into the actors.
Goals (issue 24), on one GPU: B/32 in the pipeline >= 5,000 img/s and >= 0.9 of raw with the GPU >= 80% busy; L/14
>= 0.95 of raw. The last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import flows.env  # noqa: E402,F401
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

FILE_ROWS = 1000
GOALS = {"clip-vit-b-32": {"rate": 5000, "ratio": 0.9, "busy": 0.8}, "clip-vit-l-14": {"ratio": 0.95}}


# --------------------------------------------------------------------------- data

def _make(args) -> list[bytes]:
    from tests.realdata import web_jpegs

    n, seed = args
    return web_jpegs(n, seed=seed)


def make_images(distinct: int, workers: int) -> list[bytes]:
    """`distinct` web JPEGs, made in parallel (chunks of 25 with their own seeds)."""
    from multiprocessing import get_context

    chunks = [(min(25, distinct - s), 1000 + s) for s in range(0, distinct, 25)]
    if workers <= 1 or len(chunks) == 1:
        return [j for c in chunks for j in _make(c)]
    with get_context("spawn").Pool(workers) as pool:
        return [j for part in pool.map(_make, chunks) for j in part]


def captions(n: int) -> list[str]:
    from tests.realdata import SUGARCREPE_FILES

    caps = [v["caption"] for f in SUGARCREPE_FILES for v in json.loads(Path(f).read_text()).values()]
    return [caps[i % len(caps)] for i in range(n)]


def write_files(images: list[bytes], texts: list[str], folder: Path, n: int) -> list[Path]:
    """n rows cycling over the images, FILE_ROWS to a file, each row its own uid."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, start in enumerate(range(0, n, FILE_ROWS)):
        m = min(FILE_ROWS, n - start)
        idx = [(start + i) % len(images) for i in range(m)]
        t = pa.table({"uid": [f"{k:08d}{i:024x}" for i in range(m)],
                      "text": [texts[(start + i) % len(texts)] for i in range(m)],
                      "image": pa.array([images[i] for i in idx], pa.binary())})
        path = folder / f"{k:05d}.parquet"
        pq.write_table(t, path, compression="none")
        files.append(path)
    return files


# --------------------------------------------------------------------------- 1. prepare on one core

def prepare_per_core(images: list[bytes], texts: list[str], model: str, scores: bool) -> dict:
    from stages.align import PIXELS, AlignParams, AlignStage
    from stages.imaging.decode import decode_image, pil
    from stages.models import pixel_rows

    stage = AlignStage(AlignParams(model=model, batch_size=64, decode="cpu", threads=max(1, os.cpu_count() // 2)))
    pixel, _ = stage.preps()
    table = pa.table({"uid": [f"{i:032x}" for i in range(len(images))], "text": texts[:len(images)],
                      "image": pa.array(images, pa.binary())})
    pieces = [table.slice(s, 64) for s in range(0, table.num_rows, 64)]

    def today(piece):  # prepare_batch before reduced decoding: decode in full, the processor on the PIL images
        ims = [pil(decode_image(d)[0]) for d in piece.column("image").to_pylist()]
        return pixel.pixels(ims)

    stage.prepare_batch(pieces[0])  # imports and first-call costs outside the clock
    today(pieces[0])
    c0 = time.process_time()
    old = np.concatenate([today(p) for p in pieces])
    t_old = time.process_time() - c0
    c0 = time.process_time()
    new = np.concatenate([pixel_rows(stage.prepare_batch(p)[PIXELS], pixel.shape)[0] for p in pieces])
    t_new = time.process_time() - c0
    out = {"n": len(images), "today": len(images) / t_old, "now": len(images) / t_new,
           "pixel_diff": float(np.abs(old.astype(np.int16) - new.astype(np.int16)).mean())}
    out["ratio"] = out["now"] / out["today"]
    if scores:
        stage.setup()
        m = min(64, len(images))
        a = stage.clip.embed_pixels(old[:m], texts[:m], 32)
        b = stage.clip.embed_pixels(new[:m], texts[:m], 32)
        out["score_diff"] = float(np.abs(np.einsum("nd,nd->n", *a) - np.einsum("nd,nd->n", *b)).max())
        out["score_device"] = str(stage.clip.device)
        stage.teardown()
    return out


# --------------------------------------------------------------------------- 2. raw loop (its own process)

def raw_worker(model: str, batch_size: int, seconds: float) -> dict:
    import torch

    from stages.models import load_clip
    from tests.realdata import web_jpegs

    clip = load_clip(model, "auto", "auto", threads=4)
    images = [pil_from(j) for j in web_jpegs(min(batch_size, 64), seed=7)]
    px = clip.pixel_prep.pixels((images * (batch_size // len(images) + 1))[:batch_size])
    ids = clip.text_prep.ids(captions(batch_size))
    with clip.on_stream():
        inputs = {"pixel_values": torch.from_numpy(px).to(clip.device),
                  **{k: torch.from_numpy(v).to(clip.device) for k, v in clip.text_prep.pad(ids).items()}}
    clip.run_forwards([inputs])  # warm-up
    clip.run_forwards([inputs])
    rows, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        img, txt = clip.run_forwards([inputs])  # normalise on the device, forward, embeddings back to the host
        rows += len(img)
    wall = time.perf_counter() - t0
    return {"rows": rows, "seconds": wall, "rate": rows / wall, "device": str(clip.device),
            "dtype": str(clip.dtype).removeprefix("torch."), "attention": clip.attention}


def pil_from(data: bytes):
    from stages.imaging.decode import decode_image, pil

    return pil(decode_image(data)[0])


def run_raw(model: str, batch_size: int, seconds: float) -> dict:
    cmd = [sys.executable, __file__, "--raw-worker", model, "--batch-size", str(batch_size), "--raw-seconds",
           str(seconds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- 3. the pipeline

class Busy:
    """The GPU's utilisation (percent of time a kernel ran) every 50 ms from NVML, with the host time of each
    sample; benchmarks.models.GpuSampler (nvidia-smi) where pynvml is not installed."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.stop_event = threading.Event()
        self.fallback = None
        self.source = "nvml"

    def start(self) -> "Busy":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            from benchmarks.models import GpuSampler

            self.source = "nvidia-smi"
            self.fallback = GpuSampler().start()
            return self

        def run():
            while not self.stop_event.wait(0.05):
                self.samples.append((time.time(), float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)))

        threading.Thread(target=run, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.fallback is not None:
            self.fallback.stop()
            self.samples = self.fallback.samples

    def busy(self, first: float, last: float) -> float | None:
        inside = [u for t, u in self.samples if first <= t <= last]
        return sum(inside) / len(inside) / 100 if inside else None


def in_pipeline(files: list[Path], model: str, decode: str, a, cuda: bool) -> dict:
    import ray

    import flows.engine.runner as fr
    from flows.engine.resources import fit_resources
    from schemas.spec import parse_spec

    gpus = a.gpus if cuda else 0.0
    tmp = Path(tempfile.mkdtemp(prefix="align-ray-spec-"))
    (tmp / "u.csv").write_text("url,caption\n")
    spec = parse_spec({"dataset": "bench", "source": {"urls": "u.csv"},
                       "stages": [{"align": {"model": model, "decode": decode, "batch_size": a.batch_size,
                                             "gpus": gpus, "cpus": a.actor_cpus, "pool_size": a.pool,
                                             "threads": max(1, int(a.actor_cpus))}}]}, tmp)
    cluster = ray.cluster_resources()
    fitted = fit_resources(spec, cluster.get("CPU", 0.0), cluster.get("GPU", 0.0))
    fr.quiet_ray_data()
    ray.data.DataContext.get_current().enable_progress_bars = False
    name = f"timer-{model}-{decode}-{time.time_ns()}"
    timer = ray.remote(num_cpus=0)(fr.StageTimer).options(name=name).remote()
    ds = fr.stage_pipeline(ray.data.read_parquet([str(f) for f in files]), spec, name, fitted)
    marks, rows, t0 = [], 0, time.time()
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += b.num_rows
        marks.append((time.time(), rows))
        if b.column("clip_score").null_count:
            raise RuntimeError("an image was not scored")
        if "image" in b.column_names or any(c.startswith("_") for c in b.column_names):
            raise RuntimeError(f"columns that should have stopped before the actors came out: {b.column_names}")
    wall = time.time() - t0
    totals = ray.get(timer.get.remote())
    ray.kill(timer)
    lo, hi = a.warmup * rows, 0.95 * rows
    inside = [(t, r) for t, r in marks if lo <= r <= hi]
    if len(inside) < 2:  # too few batches for a window: from the first batch out to the last
        inside = [(t0, 0)] + marks[-1:] if len(marks) < 2 else [marks[0], marks[-1]]
    (t1, r1), (t2, r2) = inside[0], inside[-1]
    prep_cpu = sum(v[3] for k, v in totals.items() if k in ("decode", "align.prepare"))  # the shared decode too
    return {"rows": rows, "wall": wall, "steady": (r2 - r1) / max(t2 - t1, 1e-9), "window": (t1, t2),
            "prepare_per_core": rows / prep_cpu if prep_cpu else None, "pools": fitted[0].pool_size}


def carried_bytes(files: list[Path], model: str, decode: str) -> float:
    """Bytes a row carries into the actors (the prepare step's output, less nothing: what crosses) vs what a row
    carried before this change (image bytes + full pixels + the uint8 model pixels)."""
    from stages.align import AlignParams, AlignStage

    t = pq.read_table(files[0]).slice(0, 64)
    out = AlignStage(AlignParams(model=model, decode=decode)).prepare_batch(t).drop_columns(["image"])
    return out.nbytes / t.num_rows


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=None, help="size=rows, comma-separated (default: B/32 40000, L/14 10000 on "
                                                  "CUDA; B/32 256 on CPU)")
    ap.add_argument("--decode", default=None, help="align.decode modes to run per size (default cpu,gpu on CUDA "
                                                   "where a GPU JPEG decoder is installed, else cpu)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 512 on CUDA, 16 on CPU")
    ap.add_argument("--gpus", type=float, default=0.5, help="GPUs per actor on CUDA")
    ap.add_argument("--pool", type=int, default=2, help="actors")
    ap.add_argument("--actor-cpus", type=float, default=1.0)
    ap.add_argument("--distinct", type=int, default=1000, help="distinct web JPEGs made (rows cycle over them)")
    ap.add_argument("--prepare-n", type=int, default=200, help="images for the one-core prepare measure")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the rows before the steady window")
    ap.add_argument("--raw-seconds", type=float, default=8.0)
    ap.add_argument("--scores", action="store_true", help="B/32 score difference of today's vs the reduced pixels")
    ap.add_argument("--prepare-only", action="store_true", help="only the one-core prepare measure (no Ray)")
    ap.add_argument("--raw-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.raw_worker:
        print(json.dumps(raw_worker(a.raw_worker, a.batch_size, a.raw_seconds)))
        return

    import torch

    from stages.imaging import gpu_decode
    from stages.models.sizes import sized_model

    cuda = torch.cuda.is_available()
    a.batch_size = a.batch_size or (512 if cuda else 16)
    sizes = {s.split("=")[0]: int(s.split("=")[1]) for s in (a.sizes or (
        "clip-vit-b-32=40000,clip-vit-l-14=10000" if cuda else "clip-vit-b-32=256")).split(",") if s.strip()}
    decoder = gpu_decode.backend()
    modes = (a.decode or ("cpu,gpu" if cuda and decoder else "cpu")).split(",")
    if "gpu" in modes and not (cuda and decoder):
        print("decode=gpu left out: no CUDA device or no GPU JPEG decoder here", flush=True)
        modes = [m for m in modes if m != "gpu"] or ["cpu"]
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'} | torch {torch.__version__} | "
          f"{os.cpu_count()} CPUs | GPU JPEG decoder: {decoder}", flush=True)
    t0 = time.perf_counter()
    workers = max(1, (os.cpu_count() or 2) - 1)
    images = make_images(a.prepare_n if a.prepare_only else max(a.distinct, a.prepare_n), workers)
    texts = captions(len(images))
    print(f"data: {len(images)} web JPEGs ({np.mean([len(j) for j in images]) / 1e3:.0f} KB mean), made in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    b32 = f"random-{next(iter(sizes))}" if not a.prepare_only else "random-clip-vit-b-32"
    sized_model(b32.removeprefix("random-"))
    p = prepare_per_core(images[:a.prepare_n], texts, b32, a.scores)
    extra = (f"; {b32} scores max |diff| {p['score_diff']:.5f} over 64 of them on {p['score_device']} (goal <= 0.01)"
             if "score_diff" in p else "")
    print(f"prepare on one core, {p['n']} web JPEGs, {b32}'s 224 px: today {p['today']:.0f} img/s, now "
          f"{p['now']:.0f} img/s (with token ids): ratio {p['ratio']:.2f} (goal >= 2); pixels mean |diff| "
          f"{p['pixel_diff']:.2f} of 255{extra} [{time.perf_counter() - t0:.0f}s]", flush=True)
    summary = {"prepare": p, "sizes": []}
    if a.prepare_only:
        print(json.dumps(summary))
        return

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="align-ray-"))
    files = write_files(images, texts, tmp / "files", max(sizes.values()))
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), object_store_memory=16 * 2**30 if cuda
             else 2**30, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    for size, n in sizes.items():
        model = f"random-{size}"
        sized_model(size)
        part = files[:max(1, -(-n // FILE_ROWS))]
        raw = run_raw(model, a.batch_size, a.raw_seconds)
        print(f"{size}: raw {raw['rate']:.0f} img/s ({raw['device']}, {raw['dtype']}, attention {raw['attention']}, "
              f"batch {a.batch_size}, inputs on the device)", flush=True)
        for decode in modes:
            sampler = Busy().start() if cuda else None
            try:
                r = in_pipeline(part, model, decode, a, cuda)
            finally:
                if sampler:
                    sampler.stop()
            busy = sampler.busy(*r["window"]) if sampler else None
            carried = carried_bytes(part, model, decode)
            ratio = r["steady"] / raw["rate"]
            per_core = "n/a" if r["prepare_per_core"] is None else f"{r['prepare_per_core']:.0f}"
            print(f"  pipeline decode={decode} ({r['pools']} actors x {a.gpus if cuda else 0:g} GPU, batch "
                  f"{a.batch_size}): {r['rows']} rows, steady {r['steady']:.0f} img/s, ratio {ratio:.2f}; GPU busy "
                  f"{'n/a' if busy is None else f'{busy:.0%}'}"
                  f"{'' if sampler is None else f' ({sampler.source})'}; prepare {per_core} img/s per core; "
                  f"{carried / 1e3:.0f} KB a row into the actors; wall {r['wall']:.0f}s", flush=True)
            summary["sizes"].append({"size": size, "decode": decode, "rows": r["rows"], "raw": raw["rate"],
                                     "steady": r["steady"], "ratio": ratio, "busy": busy,
                                     "prepare_per_core": r["prepare_per_core"], "kb_per_row": carried / 1e3})
    print("\ngoals (issue 24): B/32 >= 5,000 img/s, >= 0.9 of raw, GPU busy >= 80%; L/14 >= 0.95 of raw")
    for s in summary["sizes"]:
        g = GOALS.get(s["size"], {})
        met = [s["ratio"] >= g.get("ratio", 0), s["steady"] >= g.get("rate", 0),
               s["busy"] is None or s["busy"] >= g.get("busy", 0)]
        print(f"  {s['size']} decode={s['decode']}: {s['steady']:.0f} img/s, ratio {s['ratio']:.2f}, busy "
              f"{'n/a' if s['busy'] is None else format(s['busy'], '.0%')}: {'met' if all(met) else 'not met'}")
    print(json.dumps(summary), flush=True)
    os._exit(0)  # skip Ray's slow teardown


if __name__ == "__main__":
    main()
