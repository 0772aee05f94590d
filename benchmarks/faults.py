"""Faults at scale (issue 25): resume after SIGKILL, a flaky object store, a lost worker node, two builds at once.
Each scenario builds a synthetic corpus (benchmarks/scale.py's: small JPEGs with planted copies and junk) with
`pairforge curate` as a user would (the CLI, in a fresh process), injects its faults, and compares the output with
an undisturbed build of the same corpus: the same uids kept, the same uids rejected with the same reasons, the same
image bytes (sha256 of each kept image).

    .venv/bin/python benchmarks/faults.py [--rows 20000] [--scenarios resume,s3,cluster,concurrent]

- resume: the same build as the undisturbed one, SIGKILLed (its whole process group) once 70% of the input shards'
  stats markers exist; the resume, timed. Goal: resume <= 0.4 x the undisturbed build's wall time.
- s3: corpus and output in moto's S3 on 127.0.0.1, behind tests/object_storage.py's fault proxy answering a
  fraction of all requests (the driver's and the workers') with 503 SlowDown, a reset, a cut body or a delay: a
  build, `refilter`, `export` and `verify`; then an outage (every request 503 from the end of the stats pass) that
  fails the build, and the resume after it.
- cluster: a 2-node Ray cluster on loopback (tests/test_cluster.py's LocalCluster); the worker node is SIGKILLed
  while it runs the stats pass, a replacement joins, and that one is killed in the global decisions (dedup decided
  distributed). The build finishes, or fails and is resumed.
- concurrent: two builds of one dataset from two processes, different `out` folders sharing one catalog: the
  second, started while the first runs, fails naming the lock; a third with --wait builds after the first.

Rows lost: listed rows missing from kept + rejected, plus rows whose outcome or image differs from the undisturbed
build. Retries taken: requests the store answered with a fault (each retried by the client), or Ray task and
whole-build retries. The last lines print the table the README carries.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_RESUME_RATIO = 0.4
KILL_AT = 0.7
STAGES = [{"junk": {}}, {"basic": {"min_side": 32, "max_aspect": 3.0, "min_words": 3}},
          {"dedup": {"near_hamming": 6, "near_crops": False, "semantic": False}}]
# the resume run's: a model stage (NudeNet, ~14 ms a row on one core), as in a curation the stats pass dominates
RESUME_STAGES = STAGES[:2] + [{"safety": {}}] + STAGES[2:]
S3_FAULTS = {"slowdown": 0.02, "reset": 0.01, "cut": 0.01, "delay": 0.01}


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def pairforge(*args: str, timeout: float = 7200) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    return time.perf_counter() - t0, r


def result_of(r: subprocess.CompletedProcess) -> dict:
    if r.returncode:
        raise RuntimeError(f"pairforge exited {r.returncode}:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])


def write_spec(path: Path, corpus: str, out: str, shard_rows: int, stages: list = STAGES, **extra) -> Path:
    spec = {"dataset": "faults", "source": {"pairs": corpus, "caption_col": "caption", "name": "faults-corpus"},
            "ingest": {"shard_rows": shard_rows}, "stages": stages, "write": {"rows_per_shard": 10_000},
            "out": out, "ray": {"num_cpus": 2, "object_store_gb": 1}} | extra
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def outcome(build_dir: str) -> dict:
    """uid -> None (kept) or (stage, reason); and uid -> sha256 of the kept image. Streamed a file at a time."""
    from dataio.storage import location

    rows, images = {}, {}
    root = location(build_dir)
    for f in (root / "rejects").glob("part-*.parquet"):
        t = f.read_table(columns=["uid", "stage", "reason"])
        rows.update({u: (s, r) for u, s, r in zip(*(t[c].to_pylist() for c in ("uid", "stage", "reason")))})
    for f in (root / "shards").glob("part-*.parquet"):
        for batch in f.parquet_file().iter_batches(columns=["uid", "image"], batch_size=2048):
            for u, b in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                rows[u] = None
                images[u] = hashlib.sha256(b).hexdigest()
    return {"rows": rows, "images": images}


def rows_lost(got: dict, want: dict, listed: int) -> int:
    """Listed rows not accounted for, plus rows whose outcome or image differs from the undisturbed build."""
    missing = listed - len(got["rows"])
    differ = sum(got["rows"].get(u, "absent") != v for u, v in want["rows"].items())
    differ += sum(got["images"].get(u) != h for u, h in want["images"].items())
    return missing + differ


def stats_markers(build: Path) -> tuple[int, int]:
    """(input shards whose stats finished, input shards) of a build folder."""
    done = len(list((build / "_work" / "processed" / "_done").glob("*.json")))
    return done, len(list((build / "_work" / "ingest").glob("[0-9]*[0-9].parquet")))


def newest_build(out: Path) -> Path | None:
    builds = sorted((out / "faults").glob("2*"))
    return builds[-1] if builds else None


# ------------------------------------------------------------------------------------------------- scenarios

def scenario_resume(a, corpus: Path, reference: dict) -> dict:
    spec = write_spec(a.work / "resume" / "spec.yaml", str(corpus), str(a.work / "resume" / "builds"), a.shard_rows,
                      reference["stages"])
    fresh_s = reference["seconds"]  # the undisturbed build, made the same way
    print(f"resume: the build again, SIGKILLed at {KILL_AT:.0%} of its stats pass", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "curate", str(spec), "--new", "--quiet"], cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    before = newest_build(a.work / "resume" / "builds")
    at = None
    while proc.poll() is None:
        build = newest_build(a.work / "resume" / "builds")
        if build is not None and build != before:
            done, shards = stats_markers(build)
            if shards and done >= math.ceil(KILL_AT * shards):
                os.killpg(proc.pid, signal.SIGKILL)
                at = (done, shards)
                break
        time.sleep(0.05)
    proc.wait()
    if at is None:
        raise RuntimeError("the build finished before 70% of its stats markers were seen: " + proc.stderr.read()[-3000:])
    print(f"  killed with {at[0]}/{at[1]} shards' stats done", flush=True)
    resume_s, r = pairforge("curate", str(spec), "--json")
    resumed = result_of(r)
    assert resumed["resumed"], "the second run did not resume"
    got = outcome(resumed["build_dir"])
    lost = rows_lost(got, reference, resumed["stats"]["rows_listed"])
    ratio = resume_s / fresh_s
    print(f"  resumed in {resume_s:.1f} s: {ratio:.2f} of the fresh build (goal <= {GOAL_RESUME_RATIO}); "
          f"rows lost {lost}", flush=True)
    return {"scenario": "SIGKILL at 70% of the stats pass, then resume", "faults": 1, "finished": "1/1",
            "lost": lost, "retries": "1 resume", "resume": f"{resume_s:.0f} s vs {fresh_s:.0f} s fresh "
                                                          f"(ratio {ratio:.2f}, goal <= {GOAL_RESUME_RATIO})",
            "ratio": ratio, "killed_at": at}


def scenario_s3(a, corpus: Path, reference: dict) -> dict:
    import boto3

    from tests.object_storage import s3_fault_proxy, s3_server

    with s3_server("faults") as bucket:
        s3 = boto3.client("s3")
        for f in sorted(corpus.glob("*.parquet")):
            s3.upload_file(str(f), bucket, f"corpus/{f.name}")
        spec = write_spec(a.work / "s3" / "spec.yaml", f"s3://{bucket}/corpus", f"s3://{bucket}/builds",
                          a.shard_rows, catalog=str(a.work / "s3" / "catalog.duckdb"))
        print(f"s3: a build, refilter, export and verify through faults {S3_FAULTS}", flush=True)
        finished, lost = 0, 0
        with s3_fault_proxy(S3_FAULTS, delay_s=0.5, seed=1) as proxy:
            _, r = pairforge("curate", str(spec), "--new", "--json")
            built = result_of(r)
            finished += 1
            lost += rows_lost(outcome(built["build_dir"]), reference, built["stats"]["rows_listed"])
            _, r = pairforge("refilter", built["build_dir"], "--set", "basic.min_side=48", "--json")
            child = result_of(r)
            finished += 1
            _, r = pairforge("export", built["build_dir"], "--format", "webdataset", f"s3://{bucket}/export",
                             "--json")
            exported = result_of(r)
            assert exported["samples"] == built["stats"]["rows_kept"], exported
            for b in (built["build_dir"], child["build_dir"]):
                _, r = pairforge("verify", b, "--json")
                assert r.returncode == 0, r.stdout[-3000:]
            steady = dict(proxy.faults), proxy.requests
            print(f"  {steady[1]:,} requests, faults answered {steady[0]}; rows lost {lost}", flush=True)

            print("s3: an outage from the end of the stats pass, then a resume", flush=True)
            proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "curate", str(spec), "--new", "--quiet"],
                                    cwd=ROOT, env=env() | {"PAIRFORGE_S3_MAX_ATTEMPTS": "3"},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            known = {k["Key"].split("/_work/")[0] for k in s3.list_objects_v2(Bucket=bucket, Prefix="builds/")
                     .get("Contents", []) if "/_work/" in k["Key"]}
            while proc.poll() is None and not proxy.fail_all:
                keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="builds/").get("Contents", [])]
                if any(k.endswith("_work/processed/_DONE.json") and k.split("/_work/")[0] not in known for k in keys):
                    proxy.fail_all = True
                time.sleep(0.2)
            err = proc.communicate()[1]
            outage = proxy.faults["slowdown"] - steady[0]["slowdown"]
            proxy.fail_all = False
            failed_clearly = proc.returncode != 0 and ("SlowDown" in err or "SLOW_DOWN" in err)
            print(f"  the build exited {proc.returncode} after {outage} refused requests; "
                  f"last line: {err.strip().splitlines()[-1][:200] if err.strip() else ''}", flush=True)
            resume_s, r = pairforge("curate", str(spec), "--json")
            resumed = result_of(r)
            finished += 1
            lost += rows_lost(outcome(resumed["build_dir"]), reference, resumed["stats"]["rows_listed"])
            total = dict(proxy.faults)
    injected = sum(total.values())
    print(f"  resumed in {resume_s:.1f} s; faults in all {total}; rows lost {lost}", flush=True)
    return {"scenario": "S3 behind a fault proxy: build, refilter, export, verify; then an outage",
            "faults": f"{injected:,} ({', '.join(f'{k} {v}' for k, v in total.items())}) in {steady[1]:,}+ requests",
            "finished": f"{finished}/3 builds (+ export, 2 verify); the outage run failed "
                        f"{'clearly' if failed_clearly else 'UNCLEARLY'}",
            "lost": lost, "retries": f"{sum(steady[0].values()):,} request retries; 1 resume",
            "resume": f"{resume_s:.0f} s after the outage"}


def scenario_cluster(a, corpus: Path, reference: dict) -> dict:
    from tests.test_cluster import LocalCluster, NodeKiller

    out = a.work / "cluster" / "builds"
    print("cluster: a worker node lost in the stats pass, its replacement in the global decisions", flush=True)
    with LocalCluster(workers=1, num_cpus=1) as cluster:
        spec = write_spec(a.work / "cluster" / "spec.yaml", str(corpus), str(out), a.shard_rows,
                          ray={"address": cluster.address}, decide={"driver_max_rows": 0})
        killer = NodeKiller(cluster, out)
        killer.start()
        runs, t_fail = [], None
        try:
            for _ in range(3):
                seconds, r = pairforge("curate", str(spec), "--json")
                runs.append((seconds, r.returncode, (r.stderr.strip().splitlines() or [""])[-1][:200]))
                if r.returncode == 0:
                    break
                t_fail = t_fail or time.perf_counter()
                killer.join(0 if len(killer.killed) < 2 else 600)
        finally:
            killer.stop_event.set()
            killer.join(30)
    result = result_of(r)
    lost = rows_lost(outcome(result["build_dir"]), reference, result["stats"]["rows_listed"])
    print(f"  kills {killer.killed}; runs (seconds, exit, last line) {runs}; rows lost {lost}", flush=True)
    return {"scenario": "2-node Ray cluster: worker node SIGKILLed in the stats pass, its replacement in the "
                        "global decisions", "faults": len(killer.killed), "finished": "1/1",
            "lost": lost, "retries": f"{len(runs) - 1} resume(s); Ray task retries inside",
            "resume": f"{runs[-1][0]:.0f} s" if len(runs) > 1 else "none needed"}


def scenario_concurrent(a, corpus: Path, reference: dict) -> dict:
    from catalogs import Catalog

    base = a.work / "concurrent"
    catalog = base / "catalog.duckdb"
    specs = [write_spec(base / f"spec-{n}.yaml", str(corpus), str(base / f"out-{n}"), a.shard_rows,
                        catalog=str(catalog)) for n in "ab"]
    print("concurrent: two builds of one dataset, two `out` folders, one catalog", flush=True)
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "curate", str(specs[0]), "--json"], cwd=ROOT,
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while first.poll() is None and not newest_build(base / "out-a"):  # the first holds the lock
        time.sleep(0.2)
    waiting = subprocess.Popen([sys.executable, "-m", "flows.cli", "curate", str(specs[1]), "--wait", "--json"],
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, second = pairforge("curate", str(specs[1]), "--json")
    a_result = result_of(subprocess.CompletedProcess([], first.wait(), *first.communicate()))
    c_result = result_of(subprocess.CompletedProcess([], waiting.wait(), *waiting.communicate()))
    refused = second.returncode == 2 and "another build of dataset 'faults' is running" in second.stderr
    cat = Catalog(catalog, read_only=True)
    rows = [cat.get_build(r["build_id"]) for r in (a_result, c_result)]
    whole = all(b["status"] == "complete" and sum(s["rows"] for s in b["shards"] if s["kind"] == "shard")
                == b["rows_kept"] for b in rows)
    waited = rows[1]["started"] >= rows[0]["finished"]
    lost = sum(rows_lost(outcome(r["build_dir"]), reference, r["stats"]["rows_listed"]) for r in (a_result, c_result))
    print(f"  refused while the first ran: {refused} ({second.stderr.strip()[-160:]}); the --wait build waited and "
          f"finished: {waited}; catalog whole: {whole}; rows lost {lost}", flush=True)
    return {"scenario": "3 builds of one dataset at once from 3 processes: 2 `out` folders, 1 catalog", "faults": 2,
            "finished": f"2/2 (the third refused{'' if refused else ' NOT'}, catalog "
                        f"{'whole' if whole else 'DAMAGED'})", "lost": lost, "retries": "1 waited for the lock",
            "resume": "-"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=40_000, help="corpus rows of the resume run")
    ap.add_argument("--small-rows", type=int, default=4_000, help="corpus rows of the s3, cluster and concurrent runs")
    ap.add_argument("--shard-rows", type=int, default=500)
    ap.add_argument("--scenarios", default="resume,s3,cluster,concurrent")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pairforge-faults"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from benchmarks.scale import make_corpus

    a.work.mkdir(parents=True, exist_ok=True)
    wanted = a.scenarios.split(",")
    rows_out = []
    groups = ((a.rows, RESUME_STAGES, [s for s in wanted if s == "resume"]),
              (a.small_rows, STAGES, [s for s in wanted if s in ("s3", "cluster", "concurrent")]))
    for size, stages, names in groups:
        if not names:
            continue
        corpus = make_corpus(a.work, size, a.seed, workers=2)
        ref_dir = a.work / f"reference-{size}-{len(stages)}"
        spec = write_spec(ref_dir / "spec.yaml", str(corpus), str(ref_dir / "builds"), a.shard_rows, stages)
        print(f"reference: an undisturbed build of {size:,} rows, stages {[next(iter(x)) for x in stages]}",
              flush=True)
        seconds, r = pairforge("curate", str(spec), "--new", "--json")
        ref = result_of(r)
        reference = outcome(ref["build_dir"]) | {"seconds": seconds, "stages": stages}
        print(f"  {seconds:.1f} s; {ref['stats']['rows_kept']:,} kept of {ref['stats']['rows_listed']:,}",
              flush=True)
        for name in names:
            row = globals()[f"scenario_{name}"](a, corpus, reference)
            row["rows"] = size
            rows_out.append(row)
    print("\n| fault | rows | faults injected | builds finished | rows lost | retries taken | resume time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['scenario']} | {r['rows']:,} | {r['faults']} | {r['finished']} | {r['lost']} | {r['retries']} | "
              f"{r['resume']} |")
    resume = next((r for r in rows_out if "ratio" in r), None)
    if resume:
        print(f"\nresume / fresh: {resume['ratio']:.2f} (goal <= {GOAL_RESUME_RATIO}: "
              f"{'met' if resume['ratio'] <= GOAL_RESUME_RATIO else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
