"""Start-up of a build, phase by phase, and how fast a mistake fails. Run on demand, not a test:

    .venv/bin/python benchmarks/startup.py [--runs 3] [--rows 50]

1. Fail fast: wall seconds of `pairforge curate` on a spec with a misspelled stage, and of `pairforge build` on a
   spec whose source is missing (fresh processes; goal < 3 s each).
2. A curate of --rows real photos (scikit-image's, with planted junk captions, copies and undecodable bytes) with
   the README's corpus stages (clean, junk, basic, dedup), as the command line runs it (`pairforge curate --quiet`,
   a fresh process each run; goal < 15 s on 2 cores).
   The CPU seconds of every process such a run starts (driver, Prefect's server, Ray's daemons and workers) bound
   its wall time from below on 2 cores, whatever the machine's load.
3. Where that time goes, in a fresh process per run: imports and checks, then Prefect's temporary server and
   Ray started side by side (flows.launch.orchestration, what the CLI does) or one after the other (the server
   when the flow starts, Ray inside it: how builds started before), the build's own phases from its stats.json,
   and what is left (Prefect's task bookkeeping, catalog, report and card), then Ray's shutdown.
Medians over --runs; the ratio of the two start-ups is measured in this run. The machine's load average is printed:
on a shared machine wall-clock figures move with it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ["clean", "junk", "basic", "dedup"]


def make_corpus(folder: Path, rows: int) -> Path:
    """rows pairs of real photos: every 10th a copy of another, every 9th a file-name caption, every 13th not an
    image."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import skimage.data
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "page", "immunohistochemistry", "hubble_deep_field"]
    photos = []
    for name in names:
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, format="JPEG", quality=90)
        photos.append(buf.getvalue())
    image, caption = [], []
    for i in range(rows):
        data = photos[i % len(photos)]
        if i % 10 != 9:  # a unique image: the photo re-encoded at its own quality
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buf, format="JPEG", quality=60 + i % 35)
            data = buf.getvalue()
        image.append(b"not an image at all" if i % 13 == 12 else data)
        caption.append(f"IMG_{i:04d}.jpg" if i % 9 == 8 else f"a photo of the {names[i % len(names)]}, number {i}")
    path = folder / "corpus.parquet"
    pq.write_table(pa.table({"image": image, "caption": caption}), path)
    return path


def write_spec(folder: Path, name: str, **fields) -> Path:
    import yaml

    spec = {"version": 1, "dataset": name, "source": {"pairs": "corpus.parquet"}, "stages": STAGES} | fields
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


CPU_SECONDS: dict[str, list[float]] = {}  # CPU time (user + sys) of the command's processes, by label


def timed_cli(args: list[str], cwd: Path, expect: int, label: str | None = None) -> float:
    """Wall seconds of one `pairforge` command in a fresh process; its CPU seconds (and its children's) go to
    CPU_SECONDS[label]: on a loaded machine wall time grows with the load, CPU time much less."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env(), capture_output=True,
                       text=True, timeout=900)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert r.returncode == expect, (args, r.returncode, r.stderr[-2000:])
    if label:
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        CPU_SECONDS.setdefault(label, []).append(cpu)
    return dt


def tree_cpu_seconds(args: list[str], cwd: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, CPU seconds by process name) of one `pairforge` command and every process it
    starts (Prefect's server, Ray's daemons and workers), sampled every 0.1 s: on 2 cores its wall time cannot be
    less than half its CPU time, whatever the load."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    seen: dict[int, tuple[str, float]] = {}
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.Error:  # a process ended while the tree was read: read it again
            continue
        for p in tree:
            try:
                t = p.cpu_times()
                seen[p.pid] = (p.name(), t.user + t.system)
            except psutil.Error:
                pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    by_name: dict[str, float] = {}
    for name, cpu in seen.values():
        key = "ray worker" if name.startswith("ray::") else name
        by_name[key] = by_name.get(key, 0.0) + cpu
    return wall, sum(by_name.values()), dict(sorted(by_name.items(), key=lambda kv: -kv[1]))


PHASES = r'''
import json, sys, time
t0 = time.perf_counter()
from flows.preflight import load_corpus_spec, preflight
spec = load_corpus_spec(sys.argv[1])
preflight(spec)
t_checked = time.perf_counter()
from flows.curate import curate_flow
from flows.launch import orchestration
t_imported = time.perf_counter()
timings = {}
if sys.argv[2] == "side-by-side":
    with orchestration(spec, timings):
        t_up = time.perf_counter()
        result = curate_flow(spec_path=sys.argv[1], new=True, quiet=True)
        t_flow = time.perf_counter()
else:  # the server when the flow's client first asks for it, Ray inside the flow
    t_up = time.perf_counter()
    result = curate_flow(spec_path=sys.argv[1], new=True, quiet=True)
    t_flow = time.perf_counter()
t_done = time.perf_counter()
stats = json.load(open(result["build_dir"] + "/stats.json"))
print(json.dumps({"imports_and_checks": t_checked - t0, "flow_imports": t_imported - t_checked,
                  "servers_up": t_up - t_imported, "flow": t_flow - t_up, "after_flow": t_done - t_flow,
                  "timings": timings, "stages": {s["stage"]: s["seconds"] for s in stats["stages"]},
                  "kept": stats["rows_kept"], "listed": stats["rows_listed"]}))
'''


def phases(spec: Path, mode: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PHASES, str(spec), mode], cwd=spec.parent, env=env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process"] = time.perf_counter() - t0
    return out


def median(xs) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=50)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="pairforge-startup-") as tmp:
        folder = Path(tmp)
        make_corpus(folder, args.rows)
        typo = write_spec(folder, "typo", stages=["clean", "basik"])
        missing = write_spec(folder, "missing", source={"urls": "nowhere.csv"})
        good = write_spec(folder, "photos")

        fail_typo = [timed_cli(["curate", str(typo)], folder, 2, "typo") for _ in range(args.runs)]
        fail_missing = [timed_cli(["build", str(missing)], folder, 2, "missing") for _ in range(args.runs)]
        print(f"fail fast, misspelled stage (curate): median {median(fail_typo):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in fail_typo)}; goal < 3 s), CPU {median(CPU_SECONDS['typo']):.2f} s")
        print(f"fail fast, missing source (build):    median {median(fail_missing):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in fail_missing)}; goal < 3 s), CPU "
              f"{median(CPU_SECONDS['missing']):.2f} s")

        cli = [timed_cli(["curate", str(good), "--new", "--quiet"], folder, 0) for _ in range(args.runs)]
        print(f"`pairforge curate --quiet`, {args.rows} rows: median {median(cli):.1f} s "
              f"({', '.join(f'{x:.1f}' for x in cli)}; goal < 15 s)")

        wall, cpu, by_name = tree_cpu_seconds(["curate", str(good), "--new", "--quiet"], folder)
        print(f"the same, CPU time of every process it starts: {cpu:.1f} s in {wall:.1f} s wall ("
              + ", ".join(f"{k} {v:.1f}" for k, v in list(by_name.items())[:6])
              + f"); on 2 cores it cannot take less than {cpu / 2:.1f} s")

        runs = {mode: [phases(good, mode) for _ in range(args.runs)] for mode in ("side-by-side", "one-after-other")}
        for mode, rs in runs.items():
            print(f"\nphases, {mode} (median of {len(rs)} fresh processes, seconds):")
            keys = ["imports_and_checks", "flow_imports", "servers_up", "flow", "after_flow", "process"]
            for k in keys:
                print(f"  {k:<20} {median([r[k] for r in rs]):6.2f}")
            if rs[0]["timings"]:
                for k in ("prefect_server", "ray_init", "ray_shutdown"):
                    print(f"    {k:<18} {median([r['timings'].get(k, 0.0) for r in rs]):6.2f}")
            stage_keys = list(rs[0]["stages"])
            inside = {k: median([r["stages"][k] for r in rs]) for k in stage_keys}
            print("  inside the flow: " + ", ".join(f"{k} {v:.2f}" for k, v in inside.items()))
            print(f"  rows: {rs[0]['listed']} listed, {rs[0]['kept']} kept")
        side = median([r["servers_up"] + r["flow"] + r["after_flow"] for r in runs["side-by-side"]])
        seq = median([r["servers_up"] + r["flow"] + r["after_flow"] for r in runs["one-after-other"]])
        print(f"\nserver + Ray + build + shutdown: side by side {side:.1f} s, one after the other {seq:.1f} s, "
              f"ratio {seq / side:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
