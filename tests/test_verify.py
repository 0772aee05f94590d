"""`pairforge verify`: a finished build checks clean; a flipped byte, a truncated file, a deleted shard, an extra
row and a file the manifest does not list are each found and named; the command starts no Prefect or Ray."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.builds import manifest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# runs the CLI in a fresh interpreter and fails if verifying imported an orchestrator
NO_ORCHESTRATOR = ("import sys, json; from flows.cli import main; rc = main(sys.argv[1:]); "
                   "loaded = sorted(m for m in ('prefect', 'ray') if m in sys.modules); "
                   "print(json.dumps({'rc': rc, 'loaded': loaded}), file=sys.stderr); sys.exit(rc)")


def verify(build: Path | str, *extra: str) -> tuple[int, dict | str, list[str]]:
    r = subprocess.run([sys.executable, "-c", NO_ORCHESTRATOR, "verify", str(build), *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    tail = json.loads(r.stderr.strip().splitlines()[-1])
    assert tail["rc"] == r.returncode
    return r.returncode, (json.loads(r.stdout) if "--json" in extra else r.stdout), tail["loaded"]


def test_a_finished_build_verifies_without_prefect_or_ray(demo):
    rc, out, loaded = verify(demo["build_dir"], "--json")
    assert loaded == [], f"verify imported {loaded}"
    assert rc == 0 and out["ok"] and out["problems"] == [], out
    st = demo["result"]["stats"]
    assert (out["kept"], out["rejected"], out["listed"]) == (st["rows_kept"], st["rows_rejected"], st["rows_listed"])
    m = manifest(demo["build_dir"])
    assert out["files"] == len(m["shards"]) + len(m["rejects"]) and out["bytes"] > 0


def test_corruptions_are_each_found_and_named(demo, tmp_path):
    build = tmp_path / "copy"
    shutil.copytree(demo["build_dir"], build)
    m = manifest(build)
    shards = [f["path"] for f in m["shards"] if f["rows"]]
    rejects = [f["path"] for f in m["rejects"] if f["rows"]]
    assert len(shards) >= 3 and rejects, m
    flipped, truncated, deleted = shards[:3]
    extra_row = rejects[0]

    data = bytearray((build / flipped).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte, inside the data pages
    (build / flipped).write_bytes(bytes(data))
    whole = (build / truncated).read_bytes()
    (build / truncated).write_bytes(whole[: len(whole) - 100])
    (build / deleted).unlink()
    t = pq.read_table(build / extra_row)
    kept_uid = pq.read_table(build / shards[3 if len(shards) > 3 else 0], columns=["uid"])["uid"][0].as_py()
    dup = pa.Table.from_pylist([t.slice(0, 1).to_pylist()[0] | {"uid": kept_uid}], schema=t.schema)
    pq.write_table(pa.concat_tables([t, dup]), build / extra_row, compression="zstd")
    stray = build / "shards" / "part-99999-000.parquet"
    shutil.copy(build / shards[-1], stray)

    rc, text, loaded = verify(build)
    assert rc == 1 and loaded == []
    bad = {}
    for line in text.splitlines():
        if line.startswith("BAD "):
            name, _, what = line[4:].partition(": ")
            bad.setdefault(name, []).append(what)
    assert any("sha256" in p for p in bad[flipped]), bad.get(flipped)
    assert any("size" in p for p in bad[truncated]) and any("not a readable Parquet" in p for p in bad[truncated])
    assert bad[deleted] == ["missing (listed in the manifest)"]
    assert any(f"{t.num_rows + 1} rows, the manifest says {t.num_rows}" in p for p in bad[extra_row])
    assert any(f"uid {kept_uid} appears 2 times" in p for p in bad[extra_row])
    assert bad["shards/part-99999-000.parquet"] == ["not listed in the manifest"]
    assert "stats.json" in bad  # the row totals no longer add up
    assert text.splitlines()[-1].startswith(f"FAILED: {build}: ")

    rc, out, _ = verify(build, "--json")
    assert rc == 1 and not out["ok"] and {p["file"] for p in out["problems"]} >= {flipped, truncated, deleted,
                                                                                    extra_row}


def test_not_a_build_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.cli", "verify", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"pairforge: {tmp_path}: no manifest.json (not a finished " \
                                                     "build folder)"
