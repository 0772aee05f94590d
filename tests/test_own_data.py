"""The README's "Your own data" section, followed as written: its files are taken from the README itself (the
blocks marked `<!-- own-data: NAME -->`), so the section and this test cannot drift apart. A URL list served on
127.0.0.1 by `python -m http.server`, and a corpus made by the README's own snippet, each built with the CLI."""
from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import skimage.data
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

BASE_COLUMNS = ["uid", "url", "text", "source", "image", "width", "height", "original_width", "original_height",
                "sha256", "build_id"]


def readme_blocks() -> dict[str, str]:
    """{name: text} of the fenced blocks the README marks `<!-- own-data: NAME -->`."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"<!-- own-data: (\S+) -->\n```[a-z]*\n(.*?)\n```", text, re.S)
    return {name: body + "\n" for name, body in found}


def readme_columns() -> list[str]:
    """The columns the README's table of a kept shard names."""
    text = (ROOT / "README.md").read_text().split("### What a build writes", 1)[1].split("###", 1)[0]
    return [c for row in re.findall(r"^\| (`[^|]+) \|", text, re.M) for c in re.findall(r"`(\w+)`", row)]


def photo(name: str, fmt: str, size: tuple[int, int] | None = None) -> bytes:
    im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if size:
        im = im.resize(size)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pairforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=900, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_readme_has_the_blocks_and_columns():
    assert set(readme_blocks()) == {"urls.csv", "spec.yaml", "make_corpus.py", "corpus.yaml"}
    assert readme_columns() == BASE_COLUMNS


def test_a_url_list_served_on_loopback(tmp_path):
    blocks = readme_blocks()
    served = tmp_path / "pictures"
    served.mkdir()
    (served / "cat.jpg").write_bytes(photo("chelsea", "JPEG"))
    (served / "bike.png").write_bytes(photo("coffee", "PNG"))
    port = free_port()  # the README's 8000 may be taken on a shared machine: the same command on a free port
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=served,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        (tmp_path / "urls.csv").write_text(blocks["urls.csv"].replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
        (tmp_path / "spec.yaml").write_text(blocks["spec.yaml"])
        r = pairforge("build", "spec.yaml", cwd=tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=30)
    build = Path(re.search(r"^output: (.+)$", r.stdout, re.M).group(1))
    assert build.parent == tmp_path / "builds" / "my-photos"  # out: builds, beside the spec
    assert f"catalog: {tmp_path / 'builds' / 'catalog.duckdb'}" in r.stdout
    assert "2 listed = 2 kept + 0 rejected" in r.stdout
    kept = pads.dataset(str(build / "shards"), format="parquet").to_table()
    assert kept.column_names[:len(BASE_COLUMNS)] == BASE_COLUMNS
    assert sorted(kept["text"].to_pylist()) == ["a grey cat asleep on a red sofa",
                                                "a red bicycle leaning on a wall, in the sun"]
    assert {"min_side", "caption_words", "phash", "text_raw"} <= set(kept.column_names)  # stage stats
    sides = zip(kept["width"].to_pylist(), kept["height"].to_pylist())
    assert [min(wh) for wh in sides] == [256, 256]  # ingest resized the shorter side to image_size
    rejects = pads.dataset(str(build / "rejects"), format="parquet").schema
    assert {"stage", "reason", "detail"} <= set(rejects.names)
    listing = json.loads(pairforge("catalog", "--json", cwd=tmp_path).stdout)  # ./builds/catalog.duckdb
    assert listing["catalog"] == str(tmp_path / "builds" / "catalog.duckdb")
    assert [b["build_id"] for b in listing["builds"]] == [build.name]


def test_a_corpus_made_as_the_readme_says(tmp_path):
    blocks = readme_blocks()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (name, caption) in enumerate([("chelsea", "a tabby cat looking up"),
                                         ("astronaut", "an astronaut in front of a flag"),
                                         ("coffee", "a cup of coffee on a saucer")]):
        (photos / f"{i}.jpg").write_bytes(photo(name, "JPEG"))
        (photos / f"{i}.txt").write_text(caption + "\n")
    (photos / "3.jpg").write_bytes((photos / "0.jpg").read_bytes())  # the same photo again, another caption
    (photos / "3.txt").write_text("the same cat once more\n")
    (tmp_path / "make_corpus.py").write_text(blocks["make_corpus.py"])
    subprocess.run([sys.executable, "make_corpus.py"], cwd=tmp_path, check=True, timeout=120)
    (tmp_path / "corpus.yaml").write_text(blocks["corpus.yaml"])
    r = pairforge("curate", "corpus.yaml", cwd=tmp_path)
    build = Path(re.search(r"^output: (.+)$", r.stdout, re.M).group(1))
    assert build.parent == tmp_path / "builds" / "my-corpus"
    assert "4 listed = 3 kept + 1 rejected" in r.stdout
    kept = pads.dataset(str(build / "shards"), format="parquet").to_table()
    originals = {(photos / f"{i}.jpg").read_bytes() for i in range(3)}
    assert set(kept["image"].to_pylist()) == originals  # the corpus's own bytes, not re-encoded
    assert all(u.startswith("sha256:") for u in kept["url"].to_pylist())  # no URL: named by the image's hash
    card = (build / "README.md").read_text()
    assert "not resized and not re-encoded" in card and "Formats in the shards: JPEG 3." in card
    rej = pads.dataset(str(build / "rejects"), format="parquet").to_table(columns=["stage", "reason"]).to_pylist()
    assert rej == [{"stage": "dedup", "reason": "duplicate_exact"}]
