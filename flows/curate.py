"""curate: the build's filters over an existing corpus (Parquet with image bytes, or a WebDataset folder).

Nothing is downloaded: the corpus rows become finished ingest shards, then stages, decide and write run as in
any build (resumable, with the same accounting).
"""
from __future__ import annotations

from prefect import flow

from flows import env  # noqa: F401
from flows.build import run_build
from schemas.spec import SpecError, load_spec


@flow(name="pairforge-curate", validate_parameters=False, log_prints=True)
def curate_flow(spec_path: str, new: bool = False, quiet: bool = False, wait_lock: bool = False) -> dict:
    spec = load_spec(spec_path)
    if spec.source.pairs is None:
        raise SpecError(f"{spec_path}: curate reads source.pairs (a corpus with images), not a URL list: "
                        "use `pairforge build` for URLs")
    return run_build(spec, new=new, quiet=quiet, wait_lock=wait_lock)
