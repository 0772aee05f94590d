"""Size and render time of the build report of a 10,000-row build.

    .venv/bin/python benchmarks/report.py [--rows 10000] [--from BUILD_DIR] [--renders 3] [--keep DIR]

The build: a finished demo build's rows (kept and rejected, images included) repeated to --rows under new uids by
tests.test_report.derive_build, with synthetic align / safety / text stats for the stages its spec lacks, a
`recaptions` column and `neg_captions` hard negatives, so every section of the report has data. The source build is
--from, else the newest finished build under demo-out/builds/, else a 400-row demo build made here (local Ray and a
loopback server, about a minute).

Measured:
- generation: reporting.report.write_report (reads metadata columns and the sampled rows' images only), wall and CPU
  seconds; the dataset card too.
- size of report.html (goal < 10 MB).
- render: headless Chromium loading file://report.html and writing a 1280x4000 screenshot, the whole process
  (start-up included), the median of --renders runs (goal < 5 s).
The ratios to the goals print last.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import flows.env  # noqa: E402,F401

SIZE_GOAL_MB = 10.0
RENDER_GOAL_S = 5.0


def newest_demo_build() -> Path | None:
    builds = [p.parent for p in (ROOT / "demo-out" / "builds").glob("*/*/manifest.json")]
    return max(builds, key=lambda p: p.stat().st_mtime) if builds else None


def make_demo_build(root: Path) -> Path:
    from flows.build import build_flow
    from demo.server import DemoServer
    from tests.builds import make_demo

    d = make_demo(root, 400)
    with DemoServer(d["corpus"], port=d["port"]):
        result = build_flow(str(d["spec"]), quiet=True)
    return Path(result["build_dir"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--from", dest="src", type=Path, help="a finished build to take rows from")
    ap.add_argument("--renders", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="write the derived build here and keep it")
    args = ap.parse_args()

    from reporting.report import write_dataset_card, write_report
    from tests.test_report import chromium_binary, console_lines, derive_build, run_chromium

    tmp = Path(tempfile.mkdtemp(prefix="pairforge-report-bench-"))
    try:
        src = args.src or newest_demo_build()
        if src is None:
            print("no finished demo build: making a 400-row one", flush=True)
            src = make_demo_build(tmp / "demo")
        dst = (args.keep or tmp) / f"bench-{args.rows}"
        t0 = time.perf_counter()
        derive_build(src, dst, rows=args.rows)
        manifest = json.loads((dst / "manifest.json").read_text())
        print(f"build: {args.rows:,} rows ({manifest['rows']:,} kept, {manifest['rejected_rows']:,} rejected) "
              f"from {src}, derived in {time.perf_counter() - t0:.1f} s; shards {manifest['bytes'] / 2**20:.1f} MB")

        w0, c0 = time.perf_counter(), time.process_time()
        report = write_report(dst)
        gen_wall, gen_cpu = time.perf_counter() - w0, time.process_time() - c0
        w0 = time.perf_counter()
        write_dataset_card(dst)
        card_s = time.perf_counter() - w0
        size_mb = report.size() / 2**20
        html = report.read_text()
        print(f"generate: {gen_wall:.2f} s wall, {gen_cpu:.2f} s CPU; dataset card {card_s:.2f} s; "
              f"{html.count('<img')} images embedded")
        print(f"size: {size_mb:.2f} MB (goal < {SIZE_GOAL_MB:g} MB)")

        binary = chromium_binary()
        render_s = None
        if binary is None:
            print("render: skipped, chromium is not installed (make chromium)")
        else:
            times, cpus = [], []
            for i in range(args.renders):
                t0 = time.perf_counter()
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                r = run_chromium(binary, report, tmp / f"profile{i}", "--enable-logging=stderr", "--v=0",
                                 f"--screenshot={tmp / 'shot.png'}", "--window-size=1280,4000")
                times.append(time.perf_counter() - t0)
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpus.append(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
                if r.returncode != 0 or console_lines(r.stderr):
                    print(f"render {i}: rc={r.returncode}, console: {console_lines(r.stderr)[:3]}")
                    return 1
            render_s = statistics.median(times)
            print(f"render: median {render_s:.2f} s of {args.renders} (min {min(times):.2f}, max {max(times):.2f}) "
                  f"headless Chromium load + screenshot, start-up included (goal < {RENDER_GOAL_S:g} s); "
                  f"Chromium CPU {statistics.median(cpus):.2f} s; load average {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} cores")
        if args.keep:
            print(f"kept: {dst}")
        ratios = [f"size {size_mb / SIZE_GOAL_MB:.3f}"]
        if render_s is not None:
            ratios.append(f"render {render_s / RENDER_GOAL_S:.3f}")
        print("ratio to goal (<= 1 meets it): " + ", ".join(ratios))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
