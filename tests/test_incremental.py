"""Incremental builds: a re-run fetches only URLs the catalog has not seen, and dedups against earlier builds."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from demo.server import DemoServer
from tests.builds import make_demo, read_parts

pytestmark = pytest.mark.slow


def test_second_build_fetches_only_new_urls_and_dedups_against_the_first(tmp_path):
    from catalogs import Catalog
    from flows.build import build_flow

    stages = [{"junk": {}}, {"basic": {"min_side": 48}}, {"dedup": {"near_hamming": 6}}]  # no model stages: not the point here
    d = make_demo(tmp_path, 250, seed=5, incremental=True, ingest={"shard_rows": 125}, stages=stages)
    with DemoServer(d["corpus"], port=d["port"]) as server:
        first = build_flow(str(d["spec"]), quiet=True)
        first_kept = read_parts(first["build_dir"], "shards", ["uid", "url"]).to_pylist()
        # the list grows: 3 new URLs serving byte-identical copies of kept images, 1 new distinct picture's URL
        routes = json.loads((d["corpus"] / "routes.json").read_text())
        base = f"http://127.0.0.1:{d['port']}"
        new_rows = []
        for i, row in enumerate(first_kept[:3]):
            routes[f"/copy/{i}.jpg"] = routes[row["url"][len(base):]]
            new_rows.append((f"{base}/copy/{i}.jpg", f"a copy of picture {i} with a new caption"))
        (d["corpus"] / "routes.json").write_text(json.dumps(routes))
        urls = pq.read_table(d["corpus"] / "urls.parquet")
        extra = pa.table({"url": [u for u, _ in new_rows], "caption": [c for _, c in new_rows]}).cast(urls.schema)
        pq.write_table(pa.concat_tables([urls, extra]), d["corpus"] / "urls.parquet")
        server.clear_requests()
        server.routes.update(routes)  # the server read routes.json at start
        second = build_flow(str(d["spec"]), quiet=True)
        requested = set(server.requests)

    # only the new URLs, plus the URLs that failed to download last time (they are retried), were requested
    first_rej = read_parts(first["build_dir"], "rejects", ["url", "stage"]).to_pylist()
    retried = {r["url"][len(base):] for r in first_rej if r["stage"] == "ingest"}
    assert {f"/copy/{i}.jpg" for i in range(3)} <= requested <= {f"/copy/{i}.jpg" for i in range(3)} | retried
    rej = read_parts(second["build_dir"], "rejects", ["uid", "url", "stage", "reason", "detail"]).to_pylist()
    by_url = {r["url"]: r for r in rej}
    for u, _ in new_rows:
        assert by_url[u]["reason"] == "duplicate_exact" and "earlier build" in by_url[u]["detail"], by_url[u]
    seen = [r for r in rej if r["reason"] == "seen_in_earlier_build"]
    assert {r["uid"] for r in seen} >= {r["uid"] for r in first_kept}
    assert second["stats"]["rows_kept"] == 0
    b = Catalog(Path(d["root"]) / "builds" / "catalog.duckdb").get_build(second["build_id"])
    assert any(l["relation"] == "incremental_of" and l["parent_build_id"] == first["build_id"] for l in b["lineage"])
