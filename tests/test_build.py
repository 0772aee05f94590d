"""The spine's acceptance: a real demo build (Prefect flow, local Ray, loopback HTTP server, DuckDB catalog)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from demo.server import DemoServer
from tests.builds import N, image_digests, make_demo, manifest, read_parts

pytestmark = pytest.mark.slow
INGEST_STAGES = {"input", "ingest"}


def test_accounting_is_exact(demo):
    kept = read_parts(demo["build_dir"], "shards", ["uid"])["uid"].to_pylist()
    rejected = read_parts(demo["build_dir"], "rejects", ["uid"])["uid"].to_pylist()
    listed = set(demo["labels"]["uid"].to_pylist())
    assert len(kept) + len(rejected) == len(set(kept) | set(rejected)), "a uid appears twice"
    assert len(set(kept) | set(rejected)) == len(listed) + 2  # + the forbidden and the trickling URL
    assert listed <= set(kept) | set(rejected)
    st = demo["result"]["stats"]
    assert st["rows_listed"] == st["rows_kept"] + st["rows_rejected"] == len(listed) + 2
    m = manifest(demo["build_dir"])
    assert m["rows"] == len(kept) and sum(s["rows"] for s in m["shards"]) == len(kept)
    assert all(len(s["sha256"]) == 64 for s in m["shards"] + m["rejects"])
    for doc in ("report.html", "README.md", "spec.yaml", "stats.json"):
        assert (demo["build_dir"] / doc).stat().st_size > 0, doc


def test_each_injected_fault_ends_with_its_reason(demo):
    rej = read_parts(demo["build_dir"], "rejects", ["uid", "stage", "reason"])
    got = {u: (s, r) for u, s, r in zip(*(rej[c].to_pylist() for c in ("uid", "stage", "reason")))}
    kept = set(read_parts(demo["build_dir"], "shards", ["uid"])["uid"].to_pylist())
    spec_stages = set(demo["result"]["stats"]["stages"][i]["stage"] for i in range(len(demo["result"]["stats"]["stages"])))
    labels = demo["labels"].to_pylist()
    faults = {}
    for row in labels:
        faults.setdefault(row["fault"], []).append(row)
    checked = set()
    for fault, rows in faults.items():
        stage = rows[0]["expected_stage"]
        if stage in INGEST_STAGES or stage == "basic":
            for r in rows:
                assert got.get(r["uid"]) == (r["expected_stage"], r["expected_reason"]), (fault, r["url"])
            checked.add(fault)
        elif fault == "real_photo" and "align" in spec_stages:
            # the demo scorer knows only synthetic scenes (TRAINING.md): real photos may fall to align, nothing else
            assert all(r["uid"] in kept or got[r["uid"]] == ("align", "low_alignment") for r in rows), fault
        elif stage is None:  # clean rows: kept unless a later stage in the spec legitimately drops a few
            assert sum(r["uid"] in kept for r in rows) >= 0.95 * len(rows), fault
    for must in ("http_404", "http_500", "timeout", "truncated", "html_as_image", "optout", "duplicate_input"):
        assert must in checked, f"demo corpus lacks fault {must}"


def test_loopback_url_not_allowed_is_refused_unrequested(demo):
    rej = read_parts(demo["build_dir"], "rejects", ["url", "stage", "reason"]).to_pylist()
    secret = [r for r in rej if r["url"].endswith("/secret.jpg")]
    assert secret == [{"url": secret[0]["url"], "stage": "ingest", "reason": "blocked_address"}]
    assert demo["forbidden"].requests == []


def test_a_trickling_server_is_cut_at_the_deadline_and_the_build_finishes(demo):
    """The server sends one byte every 2 s, so no single read times out; the spec's timeout_s (5) ends the whole
    response, the row is rejected `timeout` and no fetch of the build took longer than that (+ slack)."""
    timeout_s = yaml.safe_load(demo["spec"].read_text())["ingest"]["timeout_s"]
    rej = read_parts(demo["build_dir"], "rejects", ["url", "stage", "reason", "detail"]).to_pylist()
    row = next(r for r in rej if r["url"] == demo["trickle_url"])
    assert (row["stage"], row["reason"]) == ("ingest", "timeout") and "timeout_s" in row["detail"]
    done = [json.loads(p.read_text()) for p in (demo["build_dir"] / "_work" / "ingest").glob("*.done.json")]
    slowest = max(ms for s in done for ms in s["fetch_ms"]) / 1000
    assert timeout_s - 0.5 <= slowest <= timeout_s + 1.5, slowest


def test_catalog_records_the_build(demo):
    from catalogs import Catalog

    cat = Catalog(demo["build_dir"].parents[1] / "catalog.duckdb", read_only=True)
    b = cat.get_build(demo["result"]["build_id"])
    assert b["status"] == "complete" and b["rows_kept"] == demo["result"]["stats"]["rows_kept"]
    assert {s["stage"] for s in b["stage_stats"]} >= {"input", "ingest", "basic", "write"}
    assert sum(s["rows"] for s in b["shards"] if s["kind"] == "shard") == b["rows_kept"]
    from schemas.spec import load_spec

    versions = load_spec(demo["spec"]).stage_versions()
    assert len(versions) >= 5 and b["stage_versions"] == [{"stage": k, "version": v} for k, v in versions.items()]
    r = subprocess.run([sys.executable, "-m", "flows.cli", "catalog", "--catalog",
                        str(demo["build_dir"].parents[1] / "catalog.duckdb"), demo["result"]["build_id"]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and demo["result"]["build_id"] in r.stdout and "complete" in r.stdout
    assert "stage versions" in r.stdout


def test_shards_load_with_common_readers(demo):
    import duckdb
    import polars as pl

    shards = str(demo["build_dir"] / "shards" / "*.parquet")
    n = demo["result"]["stats"]["rows_kept"]
    assert read_parts(demo["build_dir"], "shards").num_rows == n
    assert pl.read_parquet(shards).height == n
    assert duckdb.sql(f"select count(*), count(distinct uid) from read_parquet('{shards}')").fetchall()[0] == (n, n)
    import datasets

    ds = datasets.load_dataset("parquet", data_files=shards, split="train",
                               cache_dir=str(demo["root"] / "hf-cache"))
    assert len(ds) == n and {"uid", "text", "image"} <= set(ds.column_names)
    import ray

    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=300 * 2**20)
    try:
        assert ray.data.read_parquet(str(demo["build_dir"] / "shards")).count() == n
    finally:
        ray.shutdown()


def test_sigkill_mid_build_then_resume_matches_uninterrupted(demo, tmp_path):
    """Kill the whole build process group during ingest; re-run resumes, fetches no finished shard again."""
    d = make_demo(tmp_path, N, port=demo["port"], ingest={"shard_rows": 25}, like=demo["spec"],
                  extra_urls=[(f"{demo['forbidden'].url}/secret.jpg", "a secret red circle on a table")])
    cmd = [sys.executable, "-m", "flows.cli", "build", str(d["spec"]), "--quiet"]
    work = None
    with DemoServer(d["corpus"], port=d["port"]) as server:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        done_at_kill: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            dirs = list((tmp_path / "builds" / "demo-scenes").glob("*/_work/ingest"))
            if dirs:
                work = dirs[0].parent
                done_at_kill = sorted(dirs[0].glob("*.done.json"))
                if len(done_at_kill) >= 2:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the build finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (work.parent / "manifest.json").exists()
        shards_done = {int(p.name[:5]) for p in work.glob("ingest/*.done.json")}
        assert shards_done and len(shards_done) < 17
        done_urls = set()
        for i in shards_done:
            done_urls |= set(pq.read_table(work / "input" / f"{i:05d}.parquet", columns=["url"])["url"].to_pylist())
        server.clear_requests()
        # the resumed run prints its progress and summary to a pipe: plain lines, as in a cron or CI log
        r = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        refetched = {p for p in server.requests if any(u.endswith(p) for u in done_urls)}
        assert not refetched, f"finished shards fetched again: {sorted(refetched)[:5]}"
    out = r.stdout
    assert not any(c in out for c in ("\x1b", "\r", "━", "…")), out[:2000]  # no bars, colours or cut text
    assert re.search(r"^ingest: started, \d[\d,]* rows$", out, re.M), out[:2000]
    assert re.search(r"^ingest: done, [\d,]+ rows in \S+ \([\d,]+ rows/s\); \d+ shards fetched", out, re.M), out
    assert re.search(r"^build \S+ \(resumed\)$", out, re.M) and re.search(r"^\d+ listed = \d+ kept \+ \d+ rejected$",
                                                                        out, re.M), out
    result = {"build_dir": re.search(r"^output: (.+)$", out, re.M).group(1)}
    assert Path(result["build_dir"]) == work.parent
    # same uids kept and rejected, same image bytes, as the uninterrupted build of the same corpus (which also
    # lists the trickling URL)
    trickling = {r["uid"] for r in read_parts(demo["build_dir"], "rejects", ["uid", "url"]).to_pylist()
                 if r["url"] == demo["trickle_url"]}
    for sub in ("shards", "rejects"):
        a = set(read_parts(demo["build_dir"], sub, ["uid"])["uid"].to_pylist()) - trickling
        b = set(read_parts(result["build_dir"], sub, ["uid"])["uid"].to_pylist())
        assert a == b, f"{sub}: {len(a ^ b)} uids differ"
    assert image_digests(demo["build_dir"]) == image_digests(result["build_dir"])


def test_filters_catch_their_noise_kind(demo):
    """Each injected noise kind is caught by the stage meant for it: recall and precision >= 0.9 per kind."""
    rej = read_parts(demo["build_dir"], "rejects", ["uid", "stage", "reason"])
    got = {u: (s, r) for u, s, r in zip(*(rej[c].to_pylist() for c in ("uid", "stage", "reason")))}
    stages = {s["stage"] for s in demo["result"]["stats"]["stages"]}
    labels = demo["labels"].to_pylist()
    report, checked = [], 0
    by_reason: dict[tuple, list] = {}
    for r in labels:
        if r["expected_stage"] in stages and r["expected_stage"] not in ("input", "ingest", "dedup"):
            by_reason.setdefault((r["expected_stage"], r["expected_reason"]), []).append(r)
    for (stage, reason), rows in sorted(by_reason.items()):
        caught = sum(got.get(r["uid"]) == (stage, reason) for r in rows)
        flagged = [u for u, v in got.items() if v == (stage, reason)]
        labelled = {r["uid"] for r in rows}
        precision = sum(u in labelled for u in flagged) / max(1, len(flagged))
        recall = caught / len(rows)
        report.append(f"{stage}/{reason}: recall {recall:.2f} ({caught}/{len(rows)}) precision {precision:.2f}")
        if stage == "align":
            # Issue 4's bar: >= 90% of wrong captions removed, >= 90% of correct pairs kept. The demo scorer knows
            # only the synthetic domain, so it also drops the corpus's real photos (a documented limit).
            correct = [r for r in labels if r["expected_stage"] is None]
            kept = sum(got.get(r["uid"], (None,))[0] != "align" for r in correct) / len(correct)
            photos = sum(got.get(r["uid"], (None,))[0] == "align" for r in labels if r["fault"] == "real_photo")
            report.append(f"align: correct pairs kept {kept:.3f}; real photos dropped by align {photos}")
            assert recall >= 0.9 and kept >= 0.9, "\n".join(report)
        else:
            assert recall >= 0.9 and precision >= 0.9, "\n".join(report)
        checked += 1
    if "dedup" in stages:  # a group of copies of one picture: exactly one survives the dedup stage
        groups: dict[int, list] = {}
        for r in labels:
            groups.setdefault(r["group"], []).append(r)
        dup_groups = [g for g in groups.values() if len(g) > 1 and any(r["expected_stage"] == "dedup" for r in g)]
        ok = 0
        for g in dup_groups:
            others = [r for r in g if got.get(r["uid"], ("", ""))[0] not in ("", "dedup")]
            deduped = [r for r in g if got.get(r["uid"], ("", ""))[0] == "dedup"]
            ok += len(deduped) == len(g) - len(others) - 1
        flagged = [u for u, v in got.items() if v[0] == "dedup"]
        in_groups = {r["uid"] for g in dup_groups for r in g}
        precision = sum(u in in_groups for u in flagged) / max(1, len(flagged))
        report.append(f"dedup: groups resolved {ok}/{len(dup_groups)}, precision {precision:.2f}")
        assert ok >= 0.9 * len(dup_groups) and precision >= 0.9, "\n".join(report)
        checked += 1
    assert not [u for u, v in got.items() if v[0] == "safety"], "the demo has no NSFW content"
    print("\n".join(report))
    assert checked >= 3, f"too few filter stages in the demo spec: {sorted(stages)}"
