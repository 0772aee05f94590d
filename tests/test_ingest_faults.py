"""The ingest load test on fewer URLs (benchmarks/ingest_faults.py runs 20,000): a loopback server mixing fast,
slow, stalling, trickling, failing, oversized and redirecting paths; Ray tasks as in a build. Every row ends with
the reason its path calls for, no URL outlasts the deadline, the wall time stays under the deadline x workers
bound, and no task or connection is left behind (the checks live in `run` and raise if they fail)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts Ray

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "ingest_faults.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("ingest_faults", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ingest_under_faults_accounts_for_every_row_within_the_deadline():
    bench = load_benchmark()
    fig = bench.run(n=1500, workers=2, threads=32, deadline=2.0, shard_rows=250, log=lambda s: None)
    assert fig["kept"] + fig["rejected"] == 1500
    assert fig["max_s"] <= 2.0 + bench.SLACK_S and fig["open_connections_after"] == 0
    by_reason = fig["by_reason"]
    for reason in ("timeout", "too_many_redirects", "bad_scheme", "connection_refused", "connection_error",
                   "too_large", "truncated", "http_500", "http_404", "not_an_image", "kept"):
        assert by_reason.get(reason, 0) > 0, (reason, by_reason)
