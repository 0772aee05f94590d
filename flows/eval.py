"""`pairforge eval` as a Prefect flow: the proxy evaluation (training.eval) of the builds given, on an evaluation set;
with no builds, the demo comparisons (training.demo_eval)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows import env  # noqa: F401
from training.eval import EvalError, load_eval_set, proxy_eval


@flow(name="pairforge-eval", validate_parameters=False, log_prints=True)
def eval_flow(out: str, builds: list[str] | None = None, eval_set: str | None = None, losses: list[str] | None = None,
              seeds: list[int] | None = None, n_build: int | None = None, n_eval: int | None = None,
              steps: int | None = None, batch_size: int | None = None, catalog_path: str | None = None,
              threads: int | None = 1, workers: int = 1) -> dict:
    """Train the proxy model at equal compute on each of `builds` (with each of `losses`) and evaluate it on
    `eval_set` (default: fresh demo scenes); with no builds, the demo comparisons (raw vs curated; clip vs negclip
    and tripletclip). Metrics go to the catalog."""
    logger = get_run_logger()

    def echo(text: str) -> None:
        logger.info("%s", text)

    seeds = tuple(seeds or (0,))
    if builds:
        if eval_set is None:
            from training.demo_eval import EVAL_SEED, N_EVAL, eval_scenes

            items = eval_scenes(n_eval or N_EVAL)
            detail = {"eval_scenes": len(items), "eval_seed": EVAL_SEED}
        else:
            items = load_eval_set(eval_set, n_eval)
            detail = {"eval_set": str(eval_set), "eval_pairs": len(items)}
        res = proxy_eval(builds, items, Path(out), seeds=seeds, losses=tuple(losses or ("clip",)), steps=steps,
                         batch_size=batch_size, catalog_path=catalog_path, threads=threads, workers=workers,
                         eval_detail=detail, echo=echo)
    else:
        if eval_set is not None or losses:
            raise EvalError("--eval-set and --loss go with builds: pairforge eval BUILD_A BUILD_B --eval-set SET "
                            "(with no builds, the demo comparisons run)")
        from training.demo_eval import N_BUILD, N_EVAL, demo_eval

        res = demo_eval(out, seeds=seeds, n_build=n_build or N_BUILD, n_eval=n_eval or N_EVAL, steps=steps,
                        batch_size=batch_size, catalog_path=catalog_path, threads=threads, workers=workers,
                        echo=echo)
    for r in res["results"]:
        r["shards"] = str(r["shards"])
    return res
