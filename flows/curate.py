"""curate: the build's filters over an existing corpus (Parquet with image bytes, or a WebDataset folder).

Nothing is downloaded: the corpus rows become finished ingest shards, then stages, decide and write run as in
any build (resumable, with the same accounting).
"""
from __future__ import annotations

from prefect import flow

from flows import env  # noqa: F401
from flows.build import run_build
from flows.preflight import load_corpus_spec


@flow(name="pairforge-curate", validate_parameters=False, log_prints=True)
def curate_flow(spec_path: str, new: bool = False, quiet: bool = False, wait_lock: bool = False,
                fail_if_empty: bool = False) -> dict:
    return run_build(load_corpus_spec(spec_path), new=new, quiet=quiet, wait_lock=wait_lock,
                     fail_if_empty=fail_if_empty)
