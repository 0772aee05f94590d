"""The demo: generate the synthetic corpus, serve it on 127.0.0.1, build it with the embedded spec."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

import demo
from flows import env  # noqa: F401
from flows.build import run_build
from schemas.spec import load_spec

DEMO_SPEC = Path(demo.__file__).with_name("demo.yaml")
DEFAULT_PORT = 8619


def prepare_demo(out: Path, size: int, seed: int, port: int) -> Path:
    """Generate the corpus once per (size, seed, port) and write the demo spec; returns the spec path."""
    from demo.corpus import generate_corpus

    out = Path(out).resolve()
    corpus = out / "corpus"
    key = {"size": size, "seed": seed, "port": port}
    marker = corpus / "params.json"
    if not (marker.exists() and json.loads(marker.read_text()) == key):
        generate_corpus(corpus, n=size, seed=seed, base_url=f"http://127.0.0.1:{port}")
        marker.write_text(json.dumps(key))
    spec_path = out / "demo.yaml"
    spec_path.write_text(DEMO_SPEC.read_text().replace("{port}", str(port)))
    return spec_path


@flow(name="pairforge-demo", validate_parameters=False, log_prints=True)
def demo_flow(out: str = "demo-out", size: int = 3000, seed: int = 0, port: int = DEFAULT_PORT,
              quiet: bool = False, new: bool = False) -> dict:
    from demo.server import DemoServer

    spec_path = prepare_demo(Path(out), size, seed, port)
    spec = load_spec(spec_path)
    with DemoServer(Path(out).resolve() / "corpus", port=port):
        result = run_build(spec, quiet=quiet, new=new)
    result["spec"] = str(spec_path)
    return result
