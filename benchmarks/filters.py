"""Throughput and memory of the filter stages that load a model (safety, text) and of the caption stages
(language, junk), on demo images.

    .venv/bin/python benchmarks/filters.py [--stages safety,text,language,junk] [--full]

Each measurement runs in a fresh process with one intra-op thread: the stage is set up, then rows stream through
`stage(batch)` in the stage's default batch size, built by cycling over the decodable images and captions of a demo
corpus (n=600, seed 0: shapes, packaged photos, text overlays, watermarks). Nothing is kept between batches but a
row count.

- rows/s per core: rows / CPU seconds of the process after set-up (robust on a shared machine), and rows / wall
  seconds beside it.
- peak RSS of 10k vs 100k rows: the caption stages stream both for real. A model stage costs 10-70 ms a row on one
  core (100k rows of OCR would take about two hours), so by default it streams STREAM_ROWS rows, samples RSS after
  every batch, fits RSS against rows over the second half of the stream and extrapolates to 10k and 100k rows:
      peak(N) = max(observed peak, RSS at the end + max(0, slope) * (N - rows streamed))
  The printout says which numbers are extrapolated. `--full` streams 10k and 100k rows for every stage instead.
Goal: peak RSS at 100k rows <= 1.2x that at 10k rows. The ratios print last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_STAGES = ("safety", "text")
STREAM_ROWS = {"safety": 2048, "text": 1024}
GOAL = 1.2


def _params(name: str):
    from stages import stage_class

    extra = {"threads": 1} if name in MODEL_STAGES else {}
    return stage_class(name).Params(**extra)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(name: str, rows: int, corpus: Path) -> dict:
    """Runs in its own process: set up the stage, stream `rows` rows, report rates and RSS."""
    import resource

    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages import stage_class

    labels = pq.read_table(corpus / "labels.parquet").to_pylist()
    pool = [((corpus / r["file"]).read_bytes(), r["caption"]) for r in labels
            if r["file"] and r["file"].endswith((".jpg", ".png")) and r["expected_stage"] not in ("ingest", "input")]
    cls = stage_class(name)
    stage = cls(_params(name))
    t0 = time.perf_counter()
    stage.setup()
    setup_s = time.perf_counter() - t0
    bs = stage.resources.batch_size
    rss_after_setup = _rss_mb()
    samples: list[tuple[int, float]] = []
    done = 0
    w0, c0 = time.perf_counter(), time.process_time()
    while done < rows:
        n = min(bs, rows - done)
        picks = [pool[(done + i) % len(pool)] for i in range(n)]
        batch = pa.table({"image": pa.array([p[0] for p in picks], pa.binary()),
                          "text": pa.array([p[1] for p in picks], pa.string())})
        out = stage(batch)
        done += out.num_rows
        del batch, out, picks
        samples.append((done, _rss_mb()))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"stage": name, "rows": done, "batch_size": bs, "setup_s": setup_s, "wall_s": wall, "cpu_s": cpu,
            "rows_per_s_wall": done / wall, "rows_per_cpu_s": done / cpu, "rss_after_setup_mb": rss_after_setup,
            "peak_rss_mb": peak, "samples": samples, "images": len(pool)}


def run_child(name: str, rows: int, corpus: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, __file__, "--child", name, "--rows", str(rows), "--corpus", str(corpus)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{name} x {rows} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def extrapolate(r: dict, n: int) -> float:
    """peak(N) from a shorter stream: RSS-vs-rows slope over the stream's second half (never negative)."""
    s = r["samples"]
    tail = s[len(s) // 2:]
    if len(tail) >= 2:
        xs, ys = [x for x, _ in tail], [y for _, y in tail]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
    else:
        slope = 0.0
    r["rss_slope_mb_per_1k_rows"] = slope * 1000
    return max(r["peak_rss_mb"], s[-1][1] + max(0.0, slope) * max(0, n - r["rows"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="safety,text,language,junk")
    ap.add_argument("--full", action="store_true", help="stream 10k and 100k rows for the model stages too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        import flows.env  # noqa: F401

        print(json.dumps(child(a.child, a.rows, a.corpus)))
        return 0

    from demo.corpus import generate_corpus
    from stages import registry

    names = [n for n in a.stages.split(",") if n in registry()]
    with tempfile.TemporaryDirectory(prefix="pf-bench-filters-") as tmp:
        corpus = Path(tmp) / "corpus"
        generate_corpus(corpus, n=600, seed=0, base_url="http://127.0.0.1:9")
        ratios = []
        print(f"{'stage':9s} {'rows':>7s} {'rows/s/core':>12s} {'rows/s wall':>12s} {'ms/row':>7s} "
              f"{'setup s':>8s} {'RSS set-up MB':>14s} {'peak RSS MB':>12s}")
        for name in names:
            if name in MODEL_STAGES and not a.full:
                r = run_child(name, STREAM_ROWS[name], corpus)
                p10, p100 = extrapolate(r, 10_000), extrapolate(r, 100_000)
                how = (f"extrapolated from a {r['rows']}-row stream (slope "
                       f"{r['rss_slope_mb_per_1k_rows']:+.2f} MB per 1k rows)")
                runs = [r]
            else:
                r10, r100 = run_child(name, 10_000, corpus), run_child(name, 100_000, corpus)
                p10, p100 = r10["peak_rss_mb"], r100["peak_rss_mb"]
                how = "measured"
                runs = [r10, r100]
            for r in runs:
                print(f"{name:9s} {r['rows']:7d} {r['rows_per_cpu_s']:12.1f} {r['rows_per_s_wall']:12.1f} "
                      f"{1000 / r['rows_per_cpu_s']:7.2f} {r['setup_s']:8.2f} {r['rss_after_setup_mb']:14.0f} "
                      f"{r['peak_rss_mb']:12.0f}")
            ratios.append((name, p10, p100, how))
        print()
        print("peak RSS, 100k rows vs 10k rows (goal <= %.1fx):" % GOAL)
        for name, p10, p100, how in ratios:
            ok = "ok" if p100 / p10 <= GOAL else "OVER GOAL"
            print(f"  {name:9s} 10k {p10:7.0f} MB   100k {p100:7.0f} MB   ratio {p100 / p10:.3f}x  {ok}  ({how})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
