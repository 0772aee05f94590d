"""`pairforge eval`: DataComp in miniature. Train the same small proxy CLIP with the same compute on each build,
evaluate every model on one evaluation set, print a table, record every metric in the catalog.

    pairforge eval BUILD_A BUILD_B --eval-set SET [--loss clip --loss negclip]   two builds of your own
    pairforge eval                                                               the demo default

Builds: finished build folders (their `shards/`; the build id from manifest.json, or build.json), or any folder of
pairforge shards (columns uid, text, image). negclip needs the `neg_captions` column (the negatives_text stage);
tripletclip also a `hard-negatives/` folder of negative images (loaders.pairs: uid, neg_image, neg_text).

Evaluation set: pairs with captions and, for compositional accuracy, hard negative captions. A Parquet file, a
folder of them, or a build folder (its shards), with columns
    image          the encoded image (bytes)
    text           its true caption
    neg_captions   optional: list<struct<kind, text, ...>>, captions false of the image (the negatives_text stage's
                   column, so a build with that stage is an evaluation set; SugarCrepe's kinds, or any)
Nothing of an evaluation set may be in a build (the protocol cannot check that: keep them apart).

Protocol (`compare`):
- proxy model: a tiny transformers CLIPModel (PROXY_MODEL: 48 px, patch 8, 2+2 layers of width 64, a word tokenizer
  fitted on the build's captions) trained by training.train.train with the same steps, batch size, lr schedule and
  seed on every build (equal compute); only the data (and, for the hard-negative comparison, the loss) differ.
  Equal compute means equal optimiser steps over equal batches of pairs: negclip also encodes the pairs' negative
  captions (PROXY_MAX_NEGATIVES each) and tripletclip also a counterfactual image a pair, as those papers do, so
  their steps cost more time (tripletclip about 2.5x clip's here).
- metrics: image->text and text->image R@1 / R@5 among the set's pairs (training.train.retrieval_metrics), and
  SugarCrepe-style compositional accuracy per kind: the share of (image, negative) where the image's true caption
  scores above the negative. `comp_mean` is the mean over the kinds present.
Each build id gets metrics "proxy-<loss>/<metric>" (with the seed and the evaluation set in the detail) via
Catalog.record_eval.

The demo default (training/demo_eval.py, the only use of the demo domain in training/): two builds of synthetic
scenes (raw: wrong captions and duplicates; curated: the true pairs with negative captions and images), compared
with clip, negclip and tripletclip on fresh scenes; those scenes are also the evaluation set when builds are given
without one. The Prefect flow that picks between them is flows/eval.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


IMAGE_SIZE = 48
PROXY_MODEL = dict(image_size=IMAGE_SIZE, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
                   text_width=64, text_layers=2, text_heads=4, mlp_ratio=2, projection_dim=64, max_text_length=32,
                   tokenizer="word")
PROXY_OPTIM = dict(lr=2e-3, weight_decay=0.1, warmup_steps=15, steps=800, batch_size=32)
PROXY_MAX_NEGATIVES = 4  # negative captions per pair in a negclip batch
# Table order of the compositional kinds (SugarCrepe's but add_att, and the demo's replace_cnt); others follow sorted.
COMP_KINDS = ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj", "add_obj", "replace_cnt")
LOSSES = ("clip", "negclip", "tripletclip")
NEG_IMAGES = "hard-negatives"  # a build's counterfactual images for tripletclip (loaders.pairs hard_negatives layout)
NEG_IMAGE_SCHEMA = pa.schema([("uid", pa.string()), ("kind", pa.string()), ("neg_text", pa.string()),
                              ("neg_image", pa.binary())])


class EvalError(ValueError):
    """Builds or an evaluation set the proxy evaluation cannot use (missing columns, no negatives for the loss)."""


# --------------------------------------------------------------------------- builds and evaluation sets

def _parquet_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    folder = path / "shards" if (path / "shards").is_dir() else path
    files = sorted(f for f in folder.rglob("*.parquet") if not f.name.startswith(("_", ".")))
    if not files:
        raise EvalError(f"{path}: no Parquet files (a build folder, a folder of shards or a .parquet file)")
    return files


def read_build(path: str | Path, name: str | None = None) -> dict:
    """A build to train on: {"name", "build_id", "shards", "hard_negatives", "has_negatives", "rows"}."""
    path = Path(path)
    files = _parquet_files(path)
    build_id = None
    for meta in ("manifest.json", "build.json"):
        if (path / meta).is_file():
            build_id = json.loads((path / meta).read_text()).get("build_id")
            break
    schema = pq.read_schema(files[0])
    missing = [c for c in ("uid", "text", "image") if c not in schema.names]
    if missing:
        raise EvalError(f"{path}: its shards lack the columns {missing}")
    hard = path / NEG_IMAGES
    return {"name": name or path.name, "build_id": build_id or path.name,
            "shards": path / "shards" if (path / "shards").is_dir() else path,
            "hard_negatives": [hard] if hard.is_dir() else None, "has_negatives": "neg_captions" in schema.names,
            "rows": sum(pq.read_metadata(f).num_rows for f in files)}


def load_eval_set(path: str | Path, limit: int | None = None) -> list[dict]:
    """An evaluation set (module docstring) as [{"text", "image" (PIL RGB), "negatives": [(kind, text)]}], in file
    order, the first `limit` pairs when given."""
    from loaders.pairs import decode_image

    items: list[dict] = []
    for f in _parquet_files(Path(path)):
        names = pq.read_schema(f).names
        if "image" not in names or "text" not in names:
            raise EvalError(f"{f}: an evaluation set needs the columns image and text (has {names})")
        cols = ["image", "text"] + (["neg_captions"] if "neg_captions" in names else [])
        t = pq.read_table(f, columns=cols)
        if limit is not None:
            t = t.slice(0, limit - len(items))
        negs = t.column("neg_captions").to_pylist() if "neg_captions" in cols else [None] * t.num_rows
        for data, text, ns in zip(t.column("image").to_pylist(), t.column("text").to_pylist(), negs):
            if not data or not text:
                raise EvalError(f"{f}: every pair of an evaluation set needs an image and a caption")
            items.append({"text": text, "image": decode_image(data),
                          "negatives": [(n.get("kind") or "other", n["text"]) for n in ns or [] if n.get("text")]})
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise EvalError(f"{path}: the evaluation set is empty")
    return items


def write_eval_set(items: list[dict], path: str | Path) -> Path:
    """Write an evaluation set ({"text", "image": bytes, "negatives": [(kind, text)]}) as one Parquet file."""
    rows = [{"text": it["text"], "image": it["image"],
             "neg_captions": [{"kind": k, "text": t} for k, t in it.get("negatives", [])]} for it in items]
    schema = pa.schema([("text", pa.string()), ("image", pa.binary()),
                        ("neg_captions", pa.list_(pa.struct([("kind", pa.string()), ("text", pa.string())])))])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# --------------------------------------------------------------------------- train and evaluate

def proxy_spec(shards: Path, out: Path, loss: str = "clip", seed: int = 0, steps: int | None = None,
               batch_size: int | None = None, threads: int | None = 1,
               max_negatives: int | None = PROXY_MAX_NEGATIVES, hard_negatives: list | None = None):
    from schemas.train_spec import TrainSpec

    optim = dict(PROXY_OPTIM)
    if steps:
        optim["steps"] = steps
        optim["warmup_steps"] = min(optim["warmup_steps"], steps)
    if batch_size:
        optim["batch_size"] = batch_size
    if hard_negatives is None:
        hard_negatives = [Path(shards).parent / NEG_IMAGES]
    return TrainSpec.model_validate({
        "name": f"proxy-{loss}", "data": {"shards": [str(shards)], "eval_fraction": 0.0, "shuffle_buffer": 512,
                                          "max_negatives": max_negatives if loss != "clip" else None,
                                          "hard_negatives": ([str(p) for p in hard_negatives]
                                                             if loss == "tripletclip" else None)},
        "model": PROXY_MODEL, "optim": optim, "augment": {"crop_min_area": 1.0}, "loss": loss, "seed": seed,
        "threads": threads, "checkpoint_every": optim["steps"], "keep_checkpoints": 1, "log_every": 50,
        "out": str(out)})


def evaluate_model(model_dir: Path, items: list[dict]) -> dict:
    """Retrieval R@1/R@5 both ways and compositional accuracy per kind on an evaluation set (load_eval_set)."""
    import torch
    from transformers import AutoModel

    from training.train import embed, retrieval_metrics

    model = AutoModel.from_pretrained(model_dir)
    processor = _load_processor(model_dir)
    texts = [s["text"] for s in items]
    img, txt = embed(model, processor, [s["image"] for s in items], texts)
    m = retrieval_metrics(img, txt, texts)
    res = {k: m[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")}
    neg_texts, owners, kinds = [], [], []
    for i, s in enumerate(items):
        for kind, t in s["negatives"]:
            neg_texts.append(t)
            owners.append(i)
            kinds.append(kind)
    if not neg_texts:  # no negatives in the set: retrieval only
        return res
    _, neg = embed(model, processor, [], neg_texts)
    owners_t = torch.tensor(owners)
    pos_score = (img * txt).sum(-1)[owners_t]
    neg_score = (img[owners_t] * neg).sum(-1)
    wins = (pos_score > neg_score).tolist()
    for kind in comp_kinds(kinds):
        w = [x for x, k in zip(wins, kinds) if k == kind]
        res[f"comp_{kind}"] = sum(w) / len(w)
    comp = [res[f"comp_{k}"] for k in comp_kinds(kinds)]
    res["comp_mean"] = sum(comp) / len(comp)
    return res


def comp_kinds(kinds) -> list[str]:
    """The kinds present, in table order (COMP_KINDS first)."""
    present = set(kinds)
    return [k for k in COMP_KINDS if k in present] + sorted(present - set(COMP_KINDS))


def _load_processor(model_dir: Path):
    from transformers import AutoTokenizer

    from training.train import char_tokenizer, make_processor
    from schemas.train_spec import ModelSpec

    # the processor is rebuilt as trained (PIL image processor); a fitted tokenizer is read from the model folder
    m = ModelSpec(**PROXY_MODEL)
    tok = char_tokenizer(m.max_text_length) if m.tokenizer == "char" else AutoTokenizer.from_pretrained(model_dir)
    return make_processor(m, tok)


def train_and_eval(shards: Path, out: Path, items: list[dict], loss: str = "clip", seed: int = 0,
                   steps: int | None = None, batch_size: int | None = None, threads: int | None = 1,
                   hard_negatives: list | None = None) -> dict:
    from training.train import train

    spec = proxy_spec(shards, out, loss=loss, seed=seed, steps=steps, batch_size=batch_size, threads=threads,
                      hard_negatives=hard_negatives)
    t0 = time.perf_counter()
    r = train(spec, fresh=True)
    train_s = time.perf_counter() - t0
    res = evaluate_model(Path(r["model_dir"]), items)
    res["train_seconds"] = round(train_s, 1)
    return res


def _eval_job(job: dict) -> dict:
    """One (run, seed) of `compare`, in this process or a worker's."""
    return train_and_eval(Path(job["shards"]), Path(job["run_dir"]), job["items"], loss=job["loss"],
                          seed=job["seed"], steps=job["steps"], batch_size=job["batch_size"], threads=job["threads"],
                          hard_negatives=job.get("hard_negatives"))


def compare(runs: list[dict], items: list[dict], out: Path, seeds=(0,), steps: int | None = None,
            batch_size: int | None = None, catalog=None, threads: int | None = 1, workers: int = 1,
            eval_detail: dict | None = None) -> list[dict]:
    """runs: [{"name", "build_id", "shards", "loss"[, "hard_negatives"]}]; trains each for every seed at equal
    compute and evaluates it on `items` (an evaluation set), `workers` runs at a time in spawned processes (each run
    is seeded on its own, so the numbers do not depend on `workers`). Results in (seed, run) order; the catalog is
    written from this process, with `eval_detail` (what the evaluation set was) in each metric's detail."""
    jobs = [{**run, "seed": seed, "run_dir": str(out / f"{run['name'].replace('/', '-')}-s{seed}"), "steps": steps,
             "batch_size": batch_size, "threads": threads} for seed in seeds for run in runs]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            metrics = list(pool.map(_eval_job, [{**j, "items": items} for j in jobs]))
    else:
        metrics = [_eval_job({**j, "items": items}) for j in jobs]
    results = []
    for job, res in zip(jobs, metrics):
        run = {k: job[k] for k in ("name", "build_id", "shards", "loss")}
        results.append({**run, "seed": job["seed"], "metrics": res})
        if catalog is not None:
            detail = {"seed": job["seed"], "steps": steps or PROXY_OPTIM["steps"],
                      "batch_size": batch_size or PROXY_OPTIM["batch_size"], **(eval_detail or {}),
                      "model": PROXY_MODEL}
            for k, v in res.items():
                catalog.record_eval(run["build_id"], f"proxy-{run['loss']}/{k}", v, detail)
    return results


def format_table(results: list[dict]) -> str:
    kinds = comp_kinds(k[len("comp_"):] for r in results for k in r["metrics"]
                       if k.startswith("comp_") and k != "comp_mean")
    cols = ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"] + [f"comp_{k}" for k in kinds] + ["comp_mean"]
    short = {c: c.replace("comp_", "").replace("replace_", "r_").replace("swap_", "s_") for c in cols}
    head = f"{'run':<22}{'seed':>5} " + " ".join(f"{short[c]:>8}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in results:
        m = r["metrics"]
        lines.append(f"{r['name']:<22}{r['seed']:>5} " + " ".join(
            f"{m[c]:>8.3f}" if c in m else f"{'-':>8}" for c in cols))
    return "\n".join(lines)


def open_catalog(catalog_path: str | Path | None):
    if catalog_path is None:
        return None
    from catalogs import Catalog

    return Catalog(catalog_path)


def build_runs(builds: list[dict], losses=("clip",)) -> list[dict]:
    """Each build trained with each loss; a loss whose negatives a build lacks is refused up front."""
    runs = []
    for b in builds:
        for loss in losses:
            if loss not in LOSSES:
                raise EvalError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
            if loss != "clip" and not b["has_negatives"]:
                raise EvalError(f"{b['shards']}: loss {loss} needs the neg_captions column (the negatives_text stage)")
            if loss == "tripletclip" and not b["hard_negatives"]:
                raise EvalError(f"{b['shards']}: loss tripletclip needs negative images in {NEG_IMAGES}/ beside the "
                                f"shards (columns uid, neg_image, neg_text)")
            runs.append({"name": f"{b['name']}/{loss}", "build_id": b["build_id"], "shards": b["shards"],
                         "loss": loss, "hard_negatives": b["hard_negatives"]})
    return runs


def proxy_eval(builds: list[str | Path], items: list[dict], out: str | Path, seeds=(0,), losses=("clip",),
               steps: int | None = None, batch_size: int | None = None, catalog_path: str | Path | None = None,
               threads: int | None = 1, workers: int = 1, eval_detail: dict | None = None, echo=print) -> dict:
    """The proxy evaluation of any builds (two to compare) on an evaluation set (`items`: load_eval_set, or the
    demo's scenes); returns {"results", "table", "builds"}. Builds of the same folder name get their position."""
    read = [read_build(b) for b in builds]
    names = [b["name"] for b in read]
    for i, b in enumerate(read):
        if names.count(b["name"]) > 1:
            b["name"] = f"{i}-{b['name']}"
    runs = build_runs(read, losses)
    results = compare(runs, items, Path(out) / "runs", seeds=seeds, steps=steps, batch_size=batch_size,
                      catalog=open_catalog(catalog_path), threads=threads, workers=workers, eval_detail=eval_detail)
    table = format_table(results)
    echo("builds: " + ", ".join(f"{b['name']} {b['rows']} rows" for b in read) + f"; eval: {len(items)} pairs\n"
         + table)
    return {"results": results, "table": table,
            "builds": {b["name"]: {"build_id": b["build_id"], "rows": b["rows"], "dir": str(b["shards"])}
                       for b in read}}
