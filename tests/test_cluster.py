"""A build on a real 2-node Ray cluster on this host (`ray start --head` + `ray start --address`), joined through
`ray: {address: ...}` in the spec: both nodes run ingest tasks, and a worker killed mid-task is retried.

Each node is a `ray start --block` process in its own session with its own --temp-dir; stopping it (SIGTERM) drains
and stops that node's processes only, so other Ray instances on a shared machine are left alone (no `ray stop`).
Ray resolves --node-ip-address 127.0.0.1 to the host's own address; the ports are free ones picked here.
"""
from __future__ import annotations

import json

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from demo.server import DemoServer
from tests.builds import free_port, make_demo, read_parts

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# caption-only stages (Ray tasks): what is tested here is where the work runs, not the models; model stages'
# actor pools would also hold CPUs a 2 x 1-CPU cluster needs for Ray Data's read tasks
CAPTION_STAGES = [{"junk": {}}, {"language": {"keep": ["en"]}},
                  {"basic": {"min_side": 48, "max_aspect": 3.0, "min_words": 3, "min_chars": 6}}]
# and a global stage, decided as distributed Ray Data operations (driver_max_rows 0), as at scale
CLUSTER_STAGES = CAPTION_STAGES + [{"dedup": {"near_hamming": 6, "semantic": False}}]
RAY = str(Path(sys.executable).with_name("ray"))
NOT_WORK = ("ray::IDLE", "ray::Dashboard", "ray::RuntimeEnv")  # an idle worker, a node's agents


class LocalCluster:
    """A head node (`head_cpus` CPUs, `num_cpus` if None) and `workers` more nodes, each `num_cpus` CPUs, as
    `ray start --block` child processes."""

    def __init__(self, workers: int = 1, num_cpus: int = 1, object_store_mb: int = 300, head_cpus: int | None = None):
        self.workers = workers
        self.num_cpus = num_cpus
        self.head_cpus = num_cpus if head_cpus is None else head_cpus
        self.object_store = object_store_mb * 2**20
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp = Path(tempfile.mkdtemp(prefix="pfray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
        self.nodes: list[tuple[str, subprocess.Popen, Path]] = []
        self.env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                                 "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.env.pop("RAY_ADDRESS", None)

    def _start_node(self, name: str, args: list[str], timeout: float = 180, cpus: int | None = None) -> None:
        log = self.tmp / f"{name}.log"
        cpus = self.num_cpus if cpus is None else cpus
        cmd = [RAY, "start", "--block", "--num-cpus", str(cpus), "--node-ip-address", "127.0.0.1",
               "--object-store-memory", str(self.object_store), "--temp-dir", str(self.tmp / name),
               "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port()),
               "--metrics-export-port", str(free_port())] + args
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.tmp)
        self.nodes.append((name, proc, log))
        deadline = time.time() + timeout
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray node {name} did not start (rc {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    def start(self) -> "LocalCluster":
        try:
            self._start_node("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                      "--dashboard-port", str(free_port())], cpus=self.head_cpus)
            for i in range(self.workers):
                self._start_node(f"node{i + 1}", ["--address", self.address])
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, name: str) -> None:
        """One more worker node (a replacement for a lost one, as an autoscaler would start)."""
        self._start_node(name, ["--address", self.address])

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of node `name` at once (its raylet, object store and workers): the node is lost."""
        pids = self.node_pids()[name]
        proc = next(p for n, p, _ in self.nodes if n == name)
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: `ray start` and what it started
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        proc.wait(timeout=30)

    def busy_workers(self) -> dict[str, list[str]]:
        """Titles (`ray::<task or actor>`) of the worker processes at work (idle workers and the node's agents left
        out), per node."""
        found: dict[str, list[str]] = {}
        for name, pids in self.task_workers("").items():
            for pid in pids:
                try:
                    title = psutil.Process(pid).cmdline()[0]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, IndexError):
                    continue
                if not title.startswith(NOT_WORK):
                    found.setdefault(name, []).append(title)
        return found

    def node_pids(self) -> dict[str, set[int]]:
        """Every live process of each node (the `ray start` process and all its descendants)."""
        out = {}
        for name, proc, _ in self.nodes:
            try:
                p = psutil.Process(proc.pid)
                out[name] = {proc.pid} | {c.pid for c in p.children(recursive=True)}
            except psutil.NoSuchProcess:
                out[name] = set()
        return out

    def task_workers(self, *task_names: str) -> dict[str, set[int]]:
        """pids of the worker processes now running a task whose name starts with one of task_names (Ray titles
        them `ray::<name>`), per node."""
        found: dict[str, set[int]] = {}
        for name, pids in self.node_pids().items():
            for pid in pids:
                try:
                    cmd = psutil.Process(pid).cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if cmd and cmd[0].startswith(tuple(f"ray::{t}" for t in task_names)):
                    found.setdefault(name, set()).add(pid)
        return found

    def stop(self) -> None:
        leftovers = set().union(*self.node_pids().values()) if self.nodes else set()
        for name, proc, _ in reversed(self.nodes):  # workers first, then the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its node's processes
        for name, proc, _ in reversed(self.nodes):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for pid in leftovers:  # only processes of these nodes, by pid
            try:
                psutil.Process(pid).kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Watcher(threading.Thread):
    """Samples which node runs each `ray::ingest_shard` worker; kills one on node `victim` once both nodes are busy."""

    def __init__(self, cluster: LocalCluster, on_both_busy):
        super().__init__(daemon=True, name="ingest-watcher")
        self.cluster = cluster
        self.on_both_busy = on_both_busy
        self.seen: dict[str, set[int]] = {}
        self.killed: tuple[str, int] | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = self.cluster.task_workers("ingest_shard")
            for node, pids in now.items():
                self.seen.setdefault(node, set()).update(pids)
            if self.killed is None and len(now) >= 2:
                node = next(n for n in now if n != "head")
                pid = min(now[node])
                os.kill(pid, signal.SIGKILL)
                self.killed = (node, pid)
                self.on_both_busy()
            self.stop_event.wait(0.1)


@pytest.fixture(scope="module")
def cluster_build(tmp_path_factory):
    """One build of the demo corpus on a 2-node cluster; an ingest worker on the second node is SIGKILLed mid-task."""
    from flows.build import build_flow

    root = tmp_path_factory.mktemp("cluster")
    gate = threading.Event()
    with LocalCluster(workers=1, num_cpus=1) as cluster:
        d = make_demo(root, 250, seed=11, ingest={"shard_rows": 50, "cpus": 1, "timeout_s": 20, "retries": 0},
                      ray={"address": cluster.address}, stages=CLUSTER_STAGES, decide={"driver_max_rows": 0})
        server = DemoServer(d["corpus"], port=d["port"])
        read = server.read

        def gated_read(rel):  # downloads hang until a worker on each node is busy and one has been killed
            gate.wait(90)
            return read(rel)

        server.read = gated_read
        for route in server.routes.values():  # no slow "timeout" rows: the gate is what holds the tasks
            route["delay_s"] = 0.0
        watcher = Watcher(cluster, on_both_busy=gate.set)
        watcher.start()
        t0 = time.perf_counter()
        try:
            with server:
                result = build_flow(str(d["spec"]), quiet=True)
        finally:
            gate.set()
            watcher.stop_event.set()
            watcher.join(5)
        d.update(result=result, seconds=time.perf_counter() - t0, seen=watcher.seen, killed=watcher.killed,
                 build_dir=Path(result["build_dir"]))
    return d


def test_both_nodes_run_ingest_tasks(cluster_build):
    seen = cluster_build["seen"]
    assert set(seen) == {"head", "node1"}, f"ingest workers seen per node: {seen}"
    assert cluster_build["result"]["stats"]["rows_kept"] > 0


def test_both_nodes_write_shards(cluster_build):
    """Workers write the output shards (one task per input shard, spread over the cluster), not the driver."""
    written = sorted((cluster_build["build_dir"] / "_work" / "written").glob("[0-9]*.json"))
    nodes = [json.loads(p.read_text())["node"] for p in written]
    assert len(written) >= 4 and None not in nodes
    assert len(set(nodes)) == 2, f"shards written per node: {nodes}"


def test_killed_ingest_worker_is_retried_and_accounting_is_exact(cluster_build):
    import pyarrow.parquet as pq

    assert cluster_build["killed"] is not None, "no ingest worker was killed"
    node, pid = cluster_build["killed"]
    assert node == "node1"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    work = cluster_build["build_dir"] / "_work"
    shards = len(list((work / "input").glob("*.parquet")))
    assert shards >= 4 and len(list((work / "ingest").glob("*.done.json"))) == shards
    st = cluster_build["result"]["stats"]
    kept = read_parts(cluster_build["build_dir"], "shards", ["uid"])["uid"].to_pylist()
    rej = read_parts(cluster_build["build_dir"], "rejects", ["uid", "stage", "reason"]).to_pylist()
    uids = kept + [r["uid"] for r in rej]
    assert len(uids) == len(set(uids)), "a uid appears twice"
    listed = set(pq.read_table(cluster_build["corpus"] / "labels.parquet", columns=["uid"])["uid"].to_pylist())
    assert set(uids) == listed
    assert st["rows_listed"] == st["rows_kept"] + st["rows_rejected"] == len(listed)
    assert st["rows_kept"] == len(kept) > 0


class NodeKiller(threading.Thread):
    """Kills a worker node once it works in a phase: node1 in the stats pass (ingest done, no
    _work/processed/_DONE.json), then node2 in the global decisions (processed/_DONE.json, no shard written yet, the
    worker running a task that is not a shard writer). node3 joins as node1's replacement. node2 is in the cluster
    from the start, so the global decisions reach it however short they are. Assumes those phase names
    (flows/engine/runner.py, flows/engine/global_decisions.py, flows/engine/outputs.py)."""

    PHASES = ("stages", "global decisions")

    def __init__(self, cluster: LocalCluster, out: Path):
        super().__init__(daemon=True, name="node-killer")
        self.cluster, self.out = cluster, out
        self.worker = "node1"
        self.killed: list[tuple[str, str, list[str]]] = []  # (phase, node, what its workers ran)
        self.stop_event = threading.Event()

    def phase(self, titles: list[str]) -> str | None:
        work = next(iter(self.out.glob("*/*/_work")), None)
        if work is None:
            return None
        if not (work / "processed" / "_DONE.json").exists():
            inputs = len(list((work / "input").glob("[0-9]*.parquet")))
            done = len(list((work / "ingest").glob("*.done.json")))
            return "stages" if inputs and done == inputs else None
        writing = list((work / "written").glob("*.json")) or any(t.startswith("ray::write_shard") for t in titles)
        return "global decisions" if (work / "global").exists() and not writing else None

    def run(self) -> None:
        for target in self.PHASES:
            while not self.stop_event.is_set():
                titles = self.cluster.busy_workers().get(self.worker, [])
                if titles and self.phase(titles) == target:
                    self.cluster.kill_node(self.worker)
                    self.killed.append((target, self.worker, sorted(t[5:40] for t in titles)))
                    self.worker = f"node{len(self.killed) + 1}"
                    if len(self.killed) == 1:  # node3 stands in for node1; node2's loss leaves node3 at work
                        self.cluster.add_worker("node3")
                    break
                self.stop_event.wait(0.05)


def test_a_lost_worker_node_in_the_stages_and_in_the_global_decisions(cluster_build, tmp_path):
    """A worker node is SIGKILLed while it runs the stats pass, a replacement joins, and the other worker node is
    killed while it runs the global decisions (the head has no CPUs: the work is on the worker nodes). The build
    finishes through Ray's retries, or fails with Ray's error and resumes when run again; its output (uids kept and
    rejected with their reasons, image bytes) is the same corpus's build in the fixture, whose stages and global
    decisions ran undisturbed."""
    import yaml

    from flows.build import build_flow
    from tests.builds import image_digests

    spec = yaml.safe_load(cluster_build["spec"].read_text())
    spec |= {"out": str(tmp_path / "builds"), "catalog": str(tmp_path / "catalog.duckdb")}
    spec["source"]["urls"] = str(cluster_build["corpus"] / "urls.parquet")
    spec_path = tmp_path / "spec.yaml"
    failures: list[str] = []
    with LocalCluster(workers=2, num_cpus=1, head_cpus=0) as cluster:
        spec["ray"]["address"] = cluster.address
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        server = DemoServer(cluster_build["corpus"], port=cluster_build["port"])
        for route in server.routes.values():  # as in the fixture's build
            route["delay_s"] = 0.0
        killer = NodeKiller(cluster, tmp_path / "builds")
        killer.start()
        try:
            with server:
                for _ in range(3):  # the build, then as many resumes as it takes
                    try:
                        result = build_flow(str(spec_path), quiet=True)
                        break
                    except Exception as e:  # a lost node Ray could not retry past: clear, and resumable
                        failures.append(f"{type(e).__name__}: {str(e).splitlines()[0]}")
                        killer.join(0 if len(killer.killed) < 2 else 300)
                else:
                    pytest.fail(f"the build did not finish after resumes: {failures}")
        finally:
            killer.stop_event.set()
            killer.join(30)
    assert [k[0] for k in killer.killed] == list(NodeKiller.PHASES), killer.killed
    assert all(k[2] for k in killer.killed), killer.killed  # the node was at work when it died
    assert not failures or result["resumed"], failures
    st = result["stats"]
    assert st["rows_listed"] == st["rows_kept"] + st["rows_rejected"] == cluster_build["result"]["stats"]["rows_listed"]
    build_dir = Path(result["build_dir"])
    for sub, cols in (("shards", ["uid"]), ("rejects", ["uid", "stage", "reason"])):
        got = sorted(tuple(r.values()) for r in read_parts(build_dir, sub, cols).to_pylist())
        want = sorted(tuple(r.values()) for r in read_parts(cluster_build["build_dir"], sub, cols).to_pylist())
        assert got == want, f"{sub} differ"
    assert image_digests(build_dir) == image_digests(cluster_build["build_dir"])
    print(f"node kills: {killer.killed}; failures then resumed: {failures}")
