import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import flows.env  # noqa: E402,F401
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # keeps Prefect quiet at interpreter exit


import json  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the module's tests that run Ray tasks themselves (builds start their own)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=400 * 2**20,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_ray_left_behind(request):
    """A test that starts Ray itself (a library call that runs Ray tasks, not the local_ray fixture) must shut it
    down: a later build would run in it instead of the Ray its spec names."""
    ray = sys.modules.get("ray")
    running_before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if ray is not None and not running_before and "local_ray" not in request.fixturenames and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} left Ray running: use the local_ray fixture")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """One real demo build (Prefect flow, local Ray, loopback server), shared by the tests that read a build."""
    from flows.build import build_flow
    from demo.server import DemoServer
    from tests.builds import N, free_port, make_demo

    root = tmp_path_factory.mktemp("demo")
    forbidden_root = root / "forbidden"
    forbidden_root.mkdir()
    (forbidden_root / "secret.jpg").write_bytes(b"\xff\xd8secret\xff\xd9")
    (forbidden_root / "routes.json").write_text(json.dumps({"/secret.jpg": {"file": "secret.jpg", "status": 200}}))
    forbidden = DemoServer(forbidden_root).start()
    port = free_port()
    trickle_url = f"http://127.0.0.1:{port}/trickle.jpg"  # one byte every 2 s: only the whole-response deadline ends it
    d = make_demo(root, N, port=port, ingest={"shard_rows": 100},
                  extra_urls=[(f"{forbidden.url}/secret.jpg", "a secret red circle on a table"),
                              (trickle_url, "a red circle sent one byte at a time")])
    routes = json.loads((d["corpus"] / "routes.json").read_text())
    image = next(r for r in routes.values() if r.get("status", 200) == 200 and r.get("content_type") == "image/jpeg"
                 and not r.get("delay_s"))
    routes["/trickle.jpg"] = {**image, "trickle_s": 2.0}
    (d["corpus"] / "routes.json").write_text(json.dumps(routes))
    d["trickle_url"] = trickle_url
    with DemoServer(d["corpus"], port=d["port"]) as server:
        result = build_flow(str(d["spec"]), quiet=True)
        d["requests"] = list(server.requests)
    forbidden.stop()
    d.update(result=result, build_dir=Path(result["build_dir"]), forbidden=forbidden,
             labels=pq.read_table(d["corpus"] / "labels.parquet"))
    return d


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3 API (moto in server mode) on 127.0.0.1 with one bucket; the standard AWS_* variables point this
    process, pyarrow and the Ray workers it starts at it. Yields the bucket name."""
    from tests.object_storage import s3_server

    with s3_server() as bucket:
        yield bucket
