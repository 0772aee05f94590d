"""pairforge ingest vs plain img2dataset on the same loopback corpus, in one run.

    .venv/bin/python benchmarks/ingest.py [--n 5000]

Both fetch the same N clean JPEGs (demo scenes, 384 px) from one server process on 127.0.0.1, resize to 256 with
keep_ratio, compute sha256, write Parquet; both use 2 workers x 16 threads. pairforge runs its real phases
(input shards, then ingest as Ray tasks with the address guard and pre-decode checks); Ray start-up is reported
apart, as a long-running cluster pays it once. Prints images/s of each, their ratio (goal >= 0.95) last, and
decode+resize seconds per image on one core.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flows.env  # noqa: E402,F401
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def make_corpus(root: Path, n: int) -> list[str]:
    from demo.scenes import caption, render_scene, sample_scene

    files = root / "files"
    files.mkdir(parents=True)
    rng = random.Random(0)
    routes, caps = {}, []
    for i in range(n):
        scene = sample_scene(rng)
        b = io.BytesIO()
        render_scene(scene, 384, i).save(b, "JPEG", quality=90)
        (files / f"{i}.jpg").write_bytes(b.getvalue())
        routes[f"/img/{i}.jpg"] = {"file": f"files/{i}.jpg", "status": 200, "content_type": "image/jpeg"}
        caps.append(caption(scene))
    (root / "routes.json").write_text(json.dumps(routes))
    return caps


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_img2dataset(urls: Path, out: Path, workers: int, threads: int) -> float:
    from img2dataset import download

    t0 = time.perf_counter()
    download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
             output_format="parquet", output_folder=str(out), processes_count=workers, thread_count=threads,
             image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, number_sample_per_shard=1000,
             timeout=10, retries=0, compute_hash="sha256", extract_exif=False, distributor="multiprocessing")
    return time.perf_counter() - t0


def run_pairforge(spec_path: Path, workers: int) -> tuple[float, float, int]:
    import ray

    from flows.engine.context import open_build
    from flows.engine.ingest import ingest_all
    from flows.engine.inputs import prepare_inputs
    from schemas.spec import load_spec

    spec = load_spec(spec_path)
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=2**30, log_to_driver=False,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    t_ray = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        ctx = open_build(spec)
        prepared = prepare_inputs(ctx)
        ingest_all(ctx, prepared)
        t_ingest = time.perf_counter() - t1
    finally:
        ray.shutdown()
    ok = sum(pq.read_metadata(p).num_rows for p in ctx.folder.ingest_pair_files())
    return t_ingest, t_ray, ok


def decode_resize_seconds(corpus: Path, k: int = 300) -> float:
    import cv2

    from schemas.spec import IngestSpec
    from dataio.download import _guarded_resizer

    cv2.setNumThreads(1)
    resizer = _guarded_resizer(IngestSpec(image_size=256))
    blobs = [(corpus / "files" / f"{i}.jpg").read_bytes() for i in range(k)]
    t0 = time.perf_counter()
    for b in blobs:
        _, _, _, _, _, err = resizer(io.BytesIO(b))
        assert err is None, err
    return (time.perf_counter() - t0) / k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pairforge-bench-ingest-"))
    try:
        t0 = time.perf_counter()
        caps = make_corpus(tmp / "corpus", a.n)
        port = free_port()
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(a.n)]
        pq.write_table(pa.table({"url": urls, "caption": caps}), tmp / "urls.parquet")
        (tmp / "spec.yaml").write_text(
            "dataset: bench\nsource: {urls: urls.parquet}\n"
            f"ingest: {{image_size: 256, timeout_s: 10, allow_hosts: ['127.0.0.1:{port}'], thread_count: {a.threads},"
            f" shard_rows: 1000, cpus: 1}}\nout: builds\n")
        print(f"corpus: {a.n} JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
        server = subprocess.Popen([sys.executable, "-m", "demo.server", str(tmp / "corpus"), "--port", str(port)],
                                  stdout=subprocess.PIPE, cwd=ROOT)
        server.stdout.readline()
        try:
            t_i2d = run_img2dataset(tmp / "urls.parquet", tmp / "i2d", a.workers, a.threads)
            i2d_ok = sum(pq.read_table(p, columns=["status"])["status"].to_pylist().count("success")
                         for p in (tmp / "i2d").glob("*.parquet"))
            t_pf, t_ray, pf_ok = run_pairforge(tmp / "spec.yaml", a.workers)
        finally:
            server.terminate()
            server.wait()
        per_img = decode_resize_seconds(tmp / "corpus")
        print(f"img2dataset: {i2d_ok}/{a.n} ok in {t_i2d:.1f}s = {i2d_ok / t_i2d:.0f} img/s")
        print(f"pairforge ingest: {pf_ok}/{a.n} ok in {t_pf:.1f}s = {pf_ok / t_pf:.0f} img/s "
              f"(+{t_ray:.1f}s Ray start-up, once per cluster; with it: {pf_ok / (t_pf + t_ray):.0f} img/s)")
        print(f"decode+resize (guarded) on one core: {per_img * 1000:.2f} ms/image")
        print(f"ratio pairforge/img2dataset images/s: {(pf_ok / t_pf) / (i2d_ok / t_i2d):.2f} (goal >= 0.95)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
