"""The align stage inside a Ray Data pipeline vs the same model in one plain process, on the same batches.

    .venv/bin/python benchmarks/align.py [--n 4096] [--batch-size 64] [--threads 1] [--single 256]

Data: N demo scenes rendered at 256 px (what ingest stores), JPEG, with their captions, in one Parquet file.
Model: stages/models/shipped/demo-clip when it exists, else a random CLIP of the same shape built on the fly (64 px, patch 8,
width 128, 3+3 layers, projection 64); the first line says which. Every variant uses the same torch thread count.

    raw        a fresh process (model load, Parquet read), batches of --batch-size: decode JPEG -> PIL, image processor + tokenizer once per batch,
               one forward (the same ClipModel the stage uses). The forward-only seconds are reported apart.
    stage      AlignStage called directly on the same batches in that process (its own overhead over raw).
    single     the raw path one pair at a time (batch of 1), on the first --single pairs.
    ray        read_parquet -> map_batches(the build's StageActor (+ CPU-time reporting), ActorPoolStrategy(size=1), num_cpus=1)
               -> write_parquet, in a local Ray with 2 CPUs. Steady state: rows / (end of the last batch - start of
               the first batch), timed inside the actor; Ray start-up and the actor's model load are one-time costs,
               reported apart (a long-running cluster pays them once per pipeline).

Raw runs twice, before and after the Ray run, and the ratio uses the faster one (on a shared machine the load
changes under a run). Prints images/s of each and, last, the ratio ray / raw (goal >= 0.90).
"""
from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import os  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import flows.env  # noqa: E402,F401
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def build_demo_shaped_clip(folder: Path) -> Path:
    """A random CLIP shaped like the demo model (see STACK.md) with a byte-level CLIPTokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from tests.test_align import byte_level_vocab

    vocab = byte_level_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                           image_size=64, patch_size=8),
        projection_dim=64)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
                  tokenizer=tok).save_pretrained(folder)
    return folder


def make_pairs(path: Path, n: int, size: int = 256) -> pa.Table:
    from demo.scenes import caption, render_scene, sample_scene

    rng = random.Random(0)
    images, texts = [], []
    for i in range(n):
        scene = sample_scene(rng)
        b = io.BytesIO()
        render_scene(scene, size, i).save(b, "JPEG", quality=90)
        images.append(b.getvalue())
        texts.append(caption(scene, rng))
    t = pa.table({"uid": [f"{i:032x}" for i in range(n)], "text": texts, "image": pa.array(images, pa.binary())})
    pq.write_table(t, path, row_group_size=512)
    return t


def run_raw(clip, table: pa.Table, batch_size: int, limit: int | None = None) -> tuple[float, float, int, float]:
    """(seconds, forward seconds, rows, CPU seconds) for the plain loop over batches of batch_size."""
    from stages.models import decode_rgb

    images = table.column("image").to_pylist()[:limit]
    texts = table.column("text").to_pylist()[:limit]
    fwd = 0.0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for s in range(0, len(images), batch_size):
        pil = [decode_rgb(b) for b in images[s:s + batch_size]]
        inputs = clip.preprocess(pil, texts[s:s + batch_size])
        t1 = time.perf_counter()
        img, txt = clip.forward(inputs)
        (img * txt).sum(-1)
        fwd += time.perf_counter() - t1
    return time.perf_counter() - t0, fwd, len(images), time.process_time() - c0


class _SpanTimer:
    """The build's timer interface (add(stage, rows, seconds)), also keeping the first start and last end."""

    def __init__(self):
        self.rows, self.busy, self.first, self.last, self.cpu = 0, 0.0, None, None, 0.0

    def add_cpu(self, seconds: float) -> None:
        self.cpu += seconds

    def add(self, stage: str, rows: int, seconds: float, cpu_seconds: float = 0.0, decoded: int = 0) -> None:
        now = time.time()
        self.rows += rows
        self.busy += seconds
        self.first = now - seconds if self.first is None else min(self.first, now - seconds)
        self.last = now

    def get(self) -> dict:
        return {"rows": self.rows, "busy": self.busy, "first": self.first, "last": self.last, "cpu": self.cpu}


def _bench_actor():
    import ray

    from flows.engine.runner import StageActor

    class BenchActor(StageActor):
        """The build's actor, also reporting the CPU seconds its process spent per batch."""

        def __call__(self, batch):
            c0 = time.process_time()
            out = super().__call__(batch)
            ray.get_actor(self.timer).add_cpu.remote(time.process_time() - c0)
            return out

    return BenchActor


def run_ray(parquet: Path, out: Path, model: str, batch_size: int, threads: int) -> dict:
    import ray

    from flows.engine.runner import quiet_ray_data
    from stages.align import AlignParams

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=2**30, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    ray_start = time.perf_counter() - t0
    try:
        quiet_ray_data()
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        params = AlignParams(model=model, batch_size=batch_size, threads=threads)
        timer = ray.remote(num_cpus=0)(_SpanTimer).options(name="align-bench-timer").remote()
        ds = ray.data.read_parquet(str(parquet)).map_batches(
            _bench_actor(), fn_constructor_args=("align", params.model_dump_json(), "align-bench-timer"),
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_size=batch_size, batch_format="pyarrow")
        t1 = time.time()
        ds.write_parquet(str(out))
        wall = time.time() - t1
        span = ray.get(timer.get.remote())
    finally:
        ray.shutdown()
    return {"ray_start": ray_start, "wall": wall, "rows": span["rows"], "steady": span["last"] - span["first"],
            "busy": span["busy"], "cpu": span["cpu"], "to_first_batch": span["first"] - t1}


def raw_worker(parquet: str, model: str, batch_size: int, threads: int, single: int) -> dict:
    """The raw measurements in a fresh process (same start as the actor's: model load, then a Parquet read)."""
    from stages.models import load_clip

    clip = load_clip(model, "cpu", "float32", threads=threads)
    table = pq.read_table(parquet)
    run_raw(clip, table, batch_size, limit=2 * batch_size)  # warm-up
    raw_s, fwd_s, rows, cpu = run_raw(clip, table, batch_size)
    out = {"seconds": raw_s, "forward": fwd_s, "rows": rows, "cpu": cpu}
    # the stage itself on the same batches in this process, sharing the loaded model: its own overhead
    from stages.align import AlignParams
    from stages.align import AlignStage

    stage = AlignStage(AlignParams(model=model, batch_size=batch_size, threads=threads))
    stage.clip = clip
    t0 = time.perf_counter()
    for s in range(0, table.num_rows, batch_size):
        stage(table.slice(s, batch_size))
    out["stage_seconds"] = time.perf_counter() - t0
    if single:
        one_s, _, one_rows, _ = run_raw(clip, table, 1, limit=single)
        out |= {"single_seconds": one_s, "single_rows": one_rows}
    return out


def run_raw_subprocess(parquet: Path, model: str, batch_size: int, threads: int, single: int) -> dict:
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--raw-worker", str(parquet), "--model", model, "--batch-size",
           str(batch_size), "--threads", str(threads), "--single", str(single)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core box 2 threads ran 17x slower from contention)")
    ap.add_argument("--single", type=int, default=256, help="pairs for the one-at-a-time loop")
    ap.add_argument("--raw-worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.raw_worker:
        import json

        print(json.dumps(raw_worker(a.raw_worker, a.model, a.batch_size, a.threads, a.single)))
        return

    from stages.models import MODELS_DIR

    tmp = Path(tempfile.mkdtemp(prefix="align-bench-"))
    try:
        demo = MODELS_DIR / "demo-clip"
        if (demo / "config.json").is_file():
            model, which = str(demo), "stages/models/shipped/demo-clip (trained demo model)"
        else:
            model = str(build_demo_shaped_clip(tmp / "model"))
            which = "a random demo-shaped CLIP built on the fly (stages/models/shipped/demo-clip not present)"
        print(f"model: {which}", flush=True)
        t0 = time.perf_counter()
        parquet = tmp / "pairs.parquet"
        table = make_pairs(parquet, a.n)
        print(f"data: {a.n} scenes, 256 px JPEG, {table.nbytes / 2**20:.1f} MiB, made in "
              f"{time.perf_counter() - t0:.1f}s; batch {a.batch_size}, {a.threads} torch threads everywhere", flush=True)
        del table

        r1 = run_raw_subprocess(parquet, model, a.batch_size, a.threads, a.single)
        rows = r1["rows"]
        print(f"raw, one process:   {rows} pairs in {r1['seconds']:.2f}s = {rows / r1['seconds']:.0f} img/s "
              f"(forward alone {r1['forward']:.2f}s = {rows / r1['forward']:.0f} img/s; decode + processor the rest)",
              flush=True)
        print(f"stage called directly on the same batches, same process: {rows / r1['stage_seconds']:.0f} img/s "
              f"(stage/raw {r1['seconds'] / r1['stage_seconds']:.2f})", flush=True)
        single = r1["single_rows"] / r1["single_seconds"]
        print(f"one pair at a time: {r1['single_rows']} pairs in {r1['single_seconds']:.2f}s = {single:.0f} img/s "
              f"(batched is {rows / r1['seconds'] / single:.1f}x faster)", flush=True)

        r = run_ray(parquet, tmp / "out", model, a.batch_size, a.threads)
        assert r["rows"] == a.n, r
        ray_rate = r["rows"] / r["steady"]
        print(f"ray data, actor pool: {r['rows']} pairs, steady {r['steady']:.2f}s = {ray_rate:.0f} img/s "
              f"(inside the stage {r['busy']:.2f}s); one-time: ray.init {r['ray_start']:.1f}s, "
              f"pipeline start + actor model load {r['to_first_batch']:.1f}s; end to end {r['wall']:.1f}s "
              f"= {r['rows'] / r['wall']:.0f} img/s", flush=True)

        r2 = run_raw_subprocess(parquet, model, a.batch_size, a.threads, 0)
        print(f"raw again, after ray: {rows} pairs in {r2['seconds']:.2f}s = {rows / r2['seconds']:.0f} img/s "
              f"(forward alone {rows / r2['forward']:.0f} img/s)", flush=True)
        raw = rows / min(r1["seconds"], r2["seconds"])  # shared machine: the better of the two raw runs
        raw_cpu_ms = 1000 * min(r1["cpu"], r2["cpu"]) / rows
        ray_cpu_ms = 1000 * r["cpu"] / r["rows"]
        print(f"CPU time per pair (steadier than wall time on a shared box): raw {raw_cpu_ms:.2f} ms, inside the "
              f"Ray actor {ray_cpu_ms:.2f} ms (raw/actor {raw_cpu_ms / ray_cpu_ms:.2f}; Ray's read/write tasks run in "
              f"other processes)", flush=True)
        print(f"ratio ray/raw = {ray_rate / raw:.2f} (goal >= 0.90)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
