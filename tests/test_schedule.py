"""Scheduled builds (`pairforge serve`: a real local Prefect server, a cron deployment) and the dataset lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from demo.server import DemoServer
from tests.builds import free_port, make_demo, manifest, read_parts

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# caption-only stages keep these builds short: scheduling, incremental runs and the lock are what is tested here
CAPTION_STAGES = [{"junk": {}}, {"language": {"keep": ["en"]}},
                  {"basic": {"min_side": 48, "max_aspect": 3.0, "min_words": 3, "min_chars": 6}}]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


def _stop(proc: subprocess.Popen, sig=signal.SIGINT, grace: float = 60.0) -> None:
    """Signal the process, then its whole process group (it was started in its own session) if it lingers."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    for s in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, s)  # runner-started flow runs and their local Ray share the session
        except ProcessLookupError:
            return
        time.sleep(2)


def _flow_runs(api_url: str) -> list[dict]:
    import httpx

    r = httpx.post(f"{api_url}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC", "limit": 50}, timeout=10)
    r.raise_for_status()
    return r.json()


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_cron_deployment_runs_twice_and_the_second_run_is_incremental(tmp_path):
    """`pairforge serve` with "* * * * *": two scheduled runs complete; the second fetches nothing already processed."""
    from catalogs import Catalog
    from flows.serve import api_healthy

    d = make_demo(tmp_path, 250, seed=7, incremental=True, ingest={"shard_rows": 125}, stages=CAPTION_STAGES)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect"
    log_path = tmp_path / "serve.log"
    requests: list[tuple[float, str]] = []
    server = DemoServer(d["corpus"], port=d["port"])
    record = server._record
    server._record = lambda path: (requests.append((time.time(), path)), record(path))
    cmd = [sys.executable, "-m", "flows.cli", "serve", str(d["spec"]), "--cron", "* * * * *", "--name", "every-minute",
           "--port", str(port), "--prefect-home", str(home)]
    env = _env(PREFECT_HOME=str(home), PREFECT_RUNNER_POLL_FREQUENCY="2")
    with server, open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 330
            runs: list[dict] = []
            while time.time() < deadline:
                assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                if api_healthy(api):
                    runs = _flow_runs(api)
                    bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
                    assert not bad, f"a scheduled run failed: {bad[0]['state_name']}\n{log_path.read_text()[-4000:]}"
                    if sum(r["state_type"] == "COMPLETED" for r in runs) >= 2:
                        break
                time.sleep(2)
            else:
                pytest.fail(f"fewer than 2 completed runs after 330 s: {[r['state_name'] for r in runs]}\n"
                            f"{log_path.read_text()[-4000:]}")
        finally:
            _stop(proc)
    assert not api_healthy(api), "the Prefect server serve started is still up after Ctrl-C"

    done = [r for r in runs if r["state_type"] == "COMPLETED"][:2]
    assert all(r["deployment_id"] and r["auto_scheduled"] for r in done), "runs were not created by the schedule"
    assert all(r["parameters"]["spec_path"] == str(d["spec"]) for r in done)

    cat = Catalog(tmp_path / "builds" / "catalog.duckdb", read_only=True)
    builds = sorted((b for b in cat.list_builds("demo-scenes") if b["status"] == "complete"), key=lambda b: b["started"])
    assert len(builds) >= 2
    first, second = (cat.get_build(b["build_id"]) for b in builds[:2])
    assert {"child_build_id": second["build_id"], "parent_build_id": first["build_id"],
            "relation": "incremental_of"} in second["lineage"]

    # the second run fetched only the URLs that failed to download in the first (they are retried), nothing it processed
    base = f"http://127.0.0.1:{d['port']}"
    first_rej = read_parts(first["out_dir"], "rejects", ["url", "stage"]).to_pylist()
    failed = {r["url"] for r in first_rej if r["stage"] in ("input", "ingest")}
    processed = set(read_parts(first["out_dir"], "shards", ["url"])["url"].to_pylist()) | \
        {r["url"] for r in first_rej if r["stage"] not in ("input", "ingest")}
    second_state = json.loads((Path(second["out_dir"]) / "_work" / "state.json").read_text())
    t_second = _ts(second_state["started"])
    fetched_again = {p for t, p in requests if t >= t_second} & {urlsplit(u).path for u in processed}
    assert not fetched_again, f"the incremental run fetched processed URLs again: {sorted(fetched_again)[:5]}"
    stats = {s["stage"]: s for s in json.loads((Path(second["out_dir"]) / "stats.json").read_text())["stages"]}
    assert stats["input"]["rejected"].get("seen_in_earlier_build") == len(processed)
    ingest_failed_first = sum(1 for r in first_rej if r["stage"] == "ingest")
    assert stats["ingest"]["rows_in"] == ingest_failed_first < len(processed)
    assert second["rows_kept"] == 0 and first["rows_kept"] > 0
    assert all(u.startswith(base) for u in failed | processed)


def test_serve_uses_the_server_prefect_api_url_names(tmp_path):
    """With PREFECT_API_URL set, `pairforge serve` starts no server of its own: it registers the deployment there,
    and on SIGTERM stops serving (schedule paused) and leaves that server running."""
    import httpx

    from flows.serve import LocalPrefectServer, api_healthy

    d = make_demo(tmp_path, 200, seed=2, stages=CAPTION_STAGES)
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "serve", str(d["spec"]), "--cron", "61 * * * *"],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a valid cron expression" in bad.stderr
    with LocalPrefectServer(tmp_path / "prefect") as srv:
        env = _env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=srv.api_url)
        with open(tmp_path / "serve.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(d["spec"]), "--cron", "0 3 * * *"],
                                    env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 180
            deps: list[dict] = []
            while not deps:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.time() < deadline, "no deployment registered"
                time.sleep(1)
                deps = httpx.post(f"{srv.api_url}/deployments/filter", json={}, timeout=10).json()
            dep = deps[0]
            assert dep["name"] == "demo-scenes" and dep["entrypoint"] == "flows.build.build_flow"
            assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
            assert dep["parameters"] == {"spec_path": str(d["spec"]), "quiet": True, "wait_lock": True}
            time.sleep(2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        finally:
            _stop(proc, signal.SIGTERM, grace=10)
        log_text = (tmp_path / "serve.log").read_text()
        assert f"using the Prefect server at {srv.api_url}" in log_text and "starting a Prefect server" not in log_text
        assert api_healthy(srv.api_url), "serve stopped a server it did not start"
        dep = httpx.get(f"{srv.api_url}/deployments/{dep['id']}", timeout=10).json()
        assert dep["paused"] or not any(s["active"] for s in dep["schedules"]), "schedule still active after stop"


def test_two_builds_of_one_dataset_at_once(tmp_path):
    """While build A holds the dataset lock, B (same `out`, no --wait) fails naming the dataset, C (another `out`
    sharing A's catalog, as from another machine, --wait) waits for A; the catalog records both, whole."""
    import psutil
    import yaml

    from catalogs import Catalog
    from flows.serve import LocalPrefectServer

    d = make_demo(tmp_path, 120, seed=3, incremental=True, ingest={"shard_rows": 60, "timeout_s": 120, "retries": 0},
                  stages=CAPTION_STAGES)
    lock = tmp_path / "builds" / "demo-scenes" / ".lock"
    catalog = tmp_path / "builds" / "catalog.duckdb"  # A's, by default
    catalog_lock = tmp_path / "builds" / "catalog.duckdb.demo-scenes.lock"
    other_out = yaml.safe_load(d["spec"].read_text()) | {"out": "builds-c", "catalog": str(catalog)}
    (tmp_path / "spec-c.yaml").write_text(yaml.safe_dump(other_out, sort_keys=False))
    gate = threading.Event()
    server = DemoServer(d["corpus"], port=d["port"])
    read = server.read

    def gated_read(rel):  # A's downloads hang until the test lets them through
        gate.wait(180)
        return read(rel)

    server.read = gated_read
    for route in server.routes.values():  # no 30 s "timeout" rows: the gate is what holds A
        route["delay_s"] = 0.0
    # one real Prefect server for the three builds (three temporary servers starting at once on a busy machine
    # time out)
    prefect = LocalPrefectServer(tmp_path / "prefect").start()
    env = _env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=prefect.api_url)
    cmd = [sys.executable, "-m", "flows.cli", "build", str(d["spec"]), "--quiet", "--json"]
    procs: list[subprocess.Popen] = []

    def start(*extra, spec=d["spec"]):
        p = subprocess.Popen(cmd[:4] + [str(spec)] + cmd[5:] + list(extra), env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(p)
        return p

    with server:
        try:
            a = start()
            deadline = time.time() + 180
            while not server.requests:  # A is downloading: it holds the lock
                assert a.poll() is None, a.communicate()[1][-3000:]
                assert time.time() < deadline, "build A never started downloading"
                time.sleep(0.2)
            assert lock.read_text().strip() == catalog_lock.read_text().strip() == f"pid {a.pid}"
            b, c = start(), start("--wait", spec=tmp_path / "spec-c.yaml")
            _, b_err = b.communicate(timeout=180)
            assert b.returncode == 2, b_err[-3000:]
            assert "another build of dataset 'demo-scenes' is running" in b_err and f"pid {a.pid}" in b_err
            deadline = time.time() + 180
            while str(catalog_lock) not in {f.path for f in psutil.Process(c.pid).open_files()}:  # C waits on it
                assert c.poll() is None, c.communicate()[1][-3000:]
                assert time.time() < deadline, "build C never reached the dataset lock"
                time.sleep(0.2)
            time.sleep(1)
            assert c.poll() is None and catalog_lock.read_text().strip() == f"pid {a.pid}"
            gate.set()
            a_out, a_err = a.communicate(timeout=300)
            assert a.returncode == 0, a_err[-3000:]
            c_out, c_err = c.communicate(timeout=300)
            assert c.returncode == 0, c_err[-3000:]
        finally:
            gate.set()
            for p in procs:
                if p.poll() is None:
                    _stop(p, signal.SIGTERM, grace=10)
            prefect.stop()

    ra, rc = (json.loads(out[out.index("{"):]) for out in (a_out, c_out))
    assert ra["build_dir"] != rc["build_dir"]
    state = {k: json.loads((Path(r["build_dir"]) / "_work" / "state.json").read_text()) for k, r in (("a", ra), ("c", rc))}
    assert state["a"]["status"] == state["c"]["status"] == "complete"
    assert _ts(state["c"]["started"]) >= _ts(state["a"]["finished"]), "C started its build before A finished"
    # A's output is whole: every file in its manifest has its recorded rows and sha256; accounting is exact
    from dataio.shards import file_sha256

    for r in (ra, rc):
        m = manifest(r["build_dir"])
        for f in m["shards"] + m["rejects"]:
            path = Path(r["build_dir"]) / f["path"]
            assert file_sha256(path) == f["sha256"], path
        st = r["stats"]
        assert st["rows_listed"] == st["rows_kept"] + st["rows_rejected"]
        kept = read_parts(r["build_dir"], "shards", ["uid"])["uid"].to_pylist()
        assert len(kept) == st["rows_kept"] == m["rows"]
    assert ra["stats"]["rows_kept"] > 0
    assert Path(rc["build_dir"]).parent.parent == tmp_path / "builds-c"
    # the shared catalog holds both builds, whole: C, incremental, saw every uid A decided as seen
    cat = Catalog(catalog, read_only=True)
    builds = {b["build_id"]: b for b in cat.list_builds("demo-scenes")}
    assert set(builds) == {ra["build_id"], rc["build_id"]}
    for r in (ra, rc):
        row = cat.get_build(r["build_id"])
        assert row["status"] == "complete" and row["rows_kept"] == r["stats"]["rows_kept"]
        assert sum(s["rows"] for s in row["shards"] if s["kind"] == "shard") == r["stats"]["rows_kept"]
    assert rc["stats"]["rows_kept"] == 0, "C rebuilt what A had already built"


def test_ingest_task_is_retried_after_a_transient_failure(monkeypatch):
    """The Prefect ingest task is retried after an infrastructure error; the retry resumes (ingest_all skips
    shards with a done marker), so nothing finished is fetched twice."""
    import flows.build as fb
    from prefect import flow

    assert fb.ingest_task.retries >= 1
    fast = fb.ingest_task.with_options(retry_delay_seconds=0)
    calls: list[str] = []

    def flaky(ctx, prepared):
        calls.append("flaky")
        if len(calls) == 1:
            raise ConnectionError("lost the connection to a Ray node")
        return {"seconds": 0.0, "shards_fetched": 0}

    @flow(name="retry-probe")
    def probe():
        return fast(None, {})

    monkeypatch.setattr(fb, "ingest_all", flaky)
    assert probe() == {"seconds": 0.0, "shards_fetched": 0}
    assert calls == ["flaky", "flaky"]
