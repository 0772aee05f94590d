"""Helpers for tests that run real builds: a demo corpus on a loopback server and its spec."""
from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from demo.corpus import generate_corpus
from flows.demo import DEMO_SPEC


N = 400  # rows of the shared demo build in tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_demo(root: Path, n: int, seed: int = 1, port: int | None = None, extra_urls=(), like: Path | None = None,
              **spec_patch) -> dict:
    """Generate a demo corpus for port, append extra (url, caption) rows, write a spec (the demo's, or a copy of
    the spec file `like`, re-pointed at this corpus); returns paths."""
    port = port or free_port()
    corpus = root / "corpus"
    generate_corpus(corpus, n=n, seed=seed, base_url=f"http://127.0.0.1:{port}")
    if extra_urls:
        t = pq.read_table(corpus / "urls.parquet")
        extra = pa.table({"url": [u for u, _ in extra_urls], "caption": [c for _, c in extra_urls]})
        pq.write_table(pa.concat_tables([t, extra.cast(t.schema)]), corpus / "urls.parquet")
    spec = yaml.safe_load((Path(like).read_text() if like else DEMO_SPEC.read_text()).replace("{port}", str(port)))
    spec["source"]["urls"] = "corpus/urls.parquet"
    spec["out"] = "builds"
    for section, values in spec_patch.items():
        if isinstance(values, dict):
            spec.setdefault(section, {}).update(values)
        else:
            spec[section] = values
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return {"root": root, "corpus": corpus, "port": port, "spec": spec_path}


def read_parts(build_dir: Path, sub: str, columns=None) -> pa.Table:
    files = sorted((Path(build_dir) / sub).glob("part-*.parquet"))
    return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=columns)


def image_digests(build_dir: Path) -> dict[str, str]:
    t = read_parts(build_dir, "shards", ["uid", "image"])
    return {u: hashlib.sha256(b).hexdigest() for u, b in zip(t["uid"].to_pylist(), t["image"].to_pylist())}


def manifest(build_dir: Path) -> dict:
    return json.loads((Path(build_dir) / "manifest.json").read_text())
