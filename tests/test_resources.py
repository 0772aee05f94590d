"""Resources that fit (flows/engine/resources.py): a spec that names no resources runs on a 2-core machine and on a
cluster (model stages share the CPUs left after the reads); explicit resources that cannot fit fail at preflight,
before anything is started or downloaded."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from flows.engine.context import BuildError
from flows.engine.resources import check_fit, fit_resources
from schemas.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
README_STAGES = [{"clean": {}}, {"junk": {}}, {"language": {"keep": ["en"]}}, {"basic": {"min_side": 64}},
                 {"safety": {}}, {"text": {}}, {"dedup": {}}]


def write_spec(tmp_path: Path, stages: list[dict], num_cpus: int = 2, **extra) -> Path:
    (tmp_path / "u.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a red circle\n")
    spec = {"dataset": "fit", "source": {"urls": "u.csv"}, "stages": stages, "out": str(tmp_path / "builds"),
            "ray": {"num_cpus": num_cpus, "object_store_gb": 0.5}} | extra
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_model_stages_without_resources_share_what_the_reads_leave(tmp_path):
    spec = load_spec(write_spec(tmp_path, README_STAGES))
    laptop = fit_resources(spec, 2)
    assert [(laptop[i].cpus, laptop[i].pool_size) for i in (4, 5)] == [(0.5, 1), (0.5, 1)]  # safety, text
    assert laptop[3].cpus == 1.0  # basic runs as tasks: its own default
    cluster = fit_resources(spec, 16)
    assert [(cluster[i].cpus, cluster[i].pool_size) for i in (4, 5)] == [(1.0, 1), (1.0, 1)]  # stage defaults
    assert check_fit(spec) == laptop  # the local Ray this spec starts: ray.num_cpus 2
    demo_stages = yaml.safe_load((ROOT / "demo" / "demo.yaml").read_text())["stages"]
    demo = load_spec(write_spec(tmp_path, demo_stages))  # no resources by hand: safety, text, align a third each
    assert sorted(r.cpus for i, r in fit_resources(demo, 2).items() if demo.stages[i].name in
                  ("safety", "text", "align")) == [0.333] * 3
    with pytest.raises(BuildError, match="none for safety, text"):
        fit_resources(spec, 1)  # one CPU: the read takes it all


def test_explicit_pools_take_theirs_first_and_the_others_share_the_rest(tmp_path):
    stages = [{"basic": {}}, {"safety": {"cpus": 0.5}}, {"text": {}}, {"align": {"model": "demo-clip"}}]
    fitted = fit_resources(load_spec(write_spec(tmp_path, stages)), 3)
    assert (fitted[1].cpus, fitted[2].cpus, fitted[3].cpus) == (0.5, 0.75, 0.75)  # 3 - 1 (reads) - 0.5, halved


def test_explicit_resources_that_cannot_fit_fail_at_preflight(tmp_path):
    """`pairforge build` with pools that would leave no CPU for the reads: one clear line, exit 2, and nothing
    started (no Prefect server, no Ray, no build folder, so no download)."""
    spec = write_spec(tmp_path, [{"basic": {}}, {"safety": {"cpus": 1}}, {"text": {"cpus": 1}}])
    r = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pairforge: the model stages' actor pools hold 2 of the "
                                                   "cluster's 2 CPUs (safety: 1 x 1, text: 1 x 1)"), r.stderr
    assert "leave `cpus` out" in lines[0]
    assert not (tmp_path / "builds").exists()
    with pytest.raises(BuildError, match="want 1 GPUs .* the cluster has 0"):
        check_fit(load_spec(write_spec(tmp_path, [{"align": {"model": "demo-clip", "gpus": 1}}])), (2.0, 0.0))


SKIMAGE = Path(np.__file__).resolve().parents[1] / "skimage" / "data"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "page.png"]
CAPTIONS = ["an astronaut in a white suit with a flag", "a tabby cat looking at the camera",
            "a cup of coffee on a saucer from above", "a rocket standing on its launch pad",
            "a red motorcycle parked on the street", "a printed page of an old book"]


@pytest.mark.slow
def test_a_spec_without_resources_builds_on_two_cpus(tmp_path, capsys):
    """clean, junk, language, basic, safety, text and dedup, no resources, local Ray with 2 CPUs: the build
    finishes and accounts for every row. Its progress lines (off a terminal) end each fused stage with its own
    time, as the closing table counts it, not the pipeline's."""
    from flows.cli import main

    rows = []
    for name, caption in zip(PHOTOS, CAPTIONS):
        im = Image.open(SKIMAGE / name).convert("RGB")
        im.thumbnail((256, 256))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        rows.append({"url": f"http://photos.test/{name}", "text": caption, "image": buf.getvalue()})
    rows += [dict(rows[1], url="http://photos.test/copy.jpg"),  # an exact copy
             dict(rows[2], url="http://photos.test/junk.jpg", text="IMG_2231.JPG"),
             dict(rows[3], url="http://photos.test/fr.jpg", text="une fusée sur son pas de tir au lever du soleil")]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), corpus / "part-0.parquet")
    spec = tmp_path / "curate.yaml"
    spec.write_text(yaml.safe_dump({
        "dataset": "fit-check", "source": {"pairs": str(corpus), "caption_col": "text"}, "stages": README_STAGES,
        "out": str(tmp_path / "b"), "ray": {"num_cpus": 2, "object_store_gb": 0.5}}))

    assert main(["curate", str(spec)]) == 0
    out = capsys.readouterr().out
    build = Path(re.search(r"^output: (.+)$", out, re.M).group(1))
    stats = json.loads((build / "stats.json").read_text())
    assert stats["rows_listed"] == len(rows) == stats["rows_kept"] + stats["rows_rejected"]
    by_stage = {s["stage"]: s for s in stats["stages"]}
    assert by_stage["dedup"]["rejected"] == {"duplicate_exact": 1}
    assert by_stage["junk"]["rejected"] == {"junk_filename": 1}
    assert by_stage["language"]["rejected"] == {"language_not_kept": 1}
    for name in ("clean", "junk", "language", "basic", "safety", "text"):
        done = re.search(rf"^{name}: done, ([0-9,]+) rows in ([0-9.]+)s \(([0-9,]+) rows/s\)$", out, re.M)
        assert done, (name, out)
        own, rounding = float(done.group(2)), (0.05 if "." in done.group(2) else 0.5)
        assert int(done.group(1).replace(",", "")) == len(rows)
        assert abs(own - by_stage[name]["seconds"]) <= rounding + 0.05, (name, own, by_stage[name]["seconds"])
