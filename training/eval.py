"""`pairforge eval`: DataComp in miniature. Train the same small proxy CLIP with the same compute on each build,
evaluate on a set drawn apart from every build, print a table, record every metric in the catalog.

Protocol (`compare`):
- proxy model: a tiny transformers CLIPModel (PROXY_MODEL: 48 px, patch 8, 2+2 layers of width 64, a word tokenizer
  fitted on the build's captions) trained by training.train.train with the same steps, batch size, lr schedule and
  seed on every build (equal compute); only the data (and, for the hard-negative comparison, the loss) differ.
  Equal compute means equal optimiser steps over equal batches of pairs: negclip also encodes the pairs' negative
  captions (PROXY_MAX_NEGATIVES each) and tripletclip also a counterfactual image a pair, as those papers do, so
  their steps cost more time (tripletclip about 2.5x clip's here).
- evaluation set: `eval_scenes(n, seed=EVAL_SEED)`, fresh demo scenes (demo.scenes) from a seed stream no
  build uses ("pairforge-eval/{seed}/{i}"), rendered at the training size and JPEG-encoded like the builds.
- metrics: image->text and text->image R@1 / R@5 among the eval scenes (training.train.retrieval_metrics), and
  SugarCrepe-style compositional accuracy per kind: the image's true caption scores above a hard negative made by
  editing the Scene (so the negative is false of the picture by construction) and captioning it with the same
  caption variant:
      replace_att   one group's colour -> another colour          replace_obj  one group's shape -> another shape
      replace_rel   the relation reversed (left of <-> right of, above <-> below)
      swap_att      the colours of two groups exchanged           swap_obj     the shapes of two groups exchanged
      add_obj       a second group added next to a lone group     replace_cnt  a group's count changed (SugarCrepe
                                                                               files counts under replace_att)
  `comp_mean` is the mean over kinds.

Demo comparisons (`demo_eval`, what `pairforge eval --demo` and tests/test_eval.py run):
1. raw vs curated: two builds of the same demo scenes (`make_demo_builds`). raw = every pair as a crawl delivers
   it: `wrong_frac` of the captions belong to another scene (the demo corpus's wrong_caption kind) and `dup_frac`
   extra exact duplicates; curated = what the demo filters keep: the true pairs, duplicates removed, with the
   negatives_text column (neg_captions) added. Both train with loss clip.
2. without vs with hard negatives: clip vs negclip (negative captions) and tripletclip (negative captions plus one
   counterfactual image a pair with its caption, in the curated build's `hard-negatives/` folder) on the curated
   build. The negatives are Scene edits of the kinds above, the images the edited scene redrawn with the same
   layout seed (the demo's render editor); for the demo domain they are true negatives by construction; for real
   builds stages/negatives_text.py and flows/negatives.py write the same columns.
   Measured (tests/test_eval.py, seeds 0-2): tripletclip raises comp_mean by +0.024 to +0.047, negclip by +0.008 to
   +0.022 (negative captions alone teach the image encoder little at this compute).
Each build id gets metrics "proxy-<loss>/<metric>" (with the seed in the detail) via Catalog.record_eval.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from demo.scenes import COLORS, INVERSE_RELATION, RELATIONS, SHAPES, Group, Scene, caption, encode_jpeg, \
    render_scene, sample_scene
from schemas.columns import PAIR_SCHEMA, stage_fields
from schemas.records import make_uid

EVAL_SEED = 9_100_003  # the evaluation scenes' stream; builds here use "pairforge-eval-build/{seed}/{i}"
IMAGE_SIZE = 48
PROXY_MODEL = dict(image_size=IMAGE_SIZE, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
                   text_width=64, text_layers=2, text_heads=4, mlp_ratio=2, projection_dim=64, max_text_length=32,
                   tokenizer="word")
PROXY_OPTIM = dict(lr=2e-3, weight_decay=0.1, warmup_steps=15, steps=800, batch_size=32)
PROXY_MAX_NEGATIVES = 4  # negative captions per pair in a negclip batch
N_EVAL = 1000  # fresh evaluation scenes (embedding only: cheap; fewer make comp_mean noisy)
N_BUILD = 20000  # demo scenes per eval build: ~11k curated pairs, so 800 steps x 32 is ~2.3 epochs (2,000 overfit)
COMP_KINDS = ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj", "add_obj", "replace_cnt")
NEG_SCHEMA = pa.schema(list(PAIR_SCHEMA) + stage_fields("negatives_text"))
NEG_IMAGES = "hard-negatives"  # a curated eval build's counterfactual images (loaders.pairs hard_negatives layout)
NEG_IMAGE_SCHEMA = pa.schema([("uid", pa.string()), ("kind", pa.string()), ("neg_text", pa.string()),
                              ("neg_image", pa.binary())])


# --------------------------------------------------------------------------- scene edits (hard negatives)

def scene_edits(scene: Scene, rng: random.Random) -> dict[str, Scene]:
    """kind -> an edited scene that is false of `scene`'s picture (kinds that do not apply are absent)."""
    g = list(scene.groups)
    out: dict[str, Scene] = {}
    used = {(x.shape, x.color) for x in g}
    i = rng.randrange(len(g))
    colors = [c for c in COLORS if c != g[i].color and (g[i].shape, c) not in used]
    if colors:
        out["replace_att"] = scene.with_groups(*(replace(x, color=rng.choice(colors)) if k == i else x
                                                 for k, x in enumerate(g)))
    shapes = [s for s in SHAPES if s != g[i].shape and (s, g[i].color) not in used]
    if shapes:
        out["replace_obj"] = scene.with_groups(*(replace(x, shape=rng.choice(shapes)) if k == i else x
                                                 for k, x in enumerate(g)))
    counts = [c for c in (1, 2, 3) if c != g[i].count and not (c == 3 and len(g) == 3)]
    out["replace_cnt"] = scene.with_groups(*(replace(x, count=rng.choice(counts)) if k == i else x
                                             for k, x in enumerate(g)))
    if len(g) >= 2:
        a, b = rng.sample(range(len(g)), 2)
        if g[a].color != g[b].color:
            sw = list(g)
            sw[a], sw[b] = replace(g[a], color=g[b].color), replace(g[b], color=g[a].color)
            if len({(x.shape, x.color) for x in sw}) == len(sw):
                out["swap_att"] = scene.with_groups(*sw)
        if g[a].shape != g[b].shape:
            sw = list(g)
            sw[a], sw[b] = replace(g[a], shape=g[b].shape), replace(g[b], shape=g[a].shape)
            if len({(x.shape, x.color) for x in sw}) == len(sw):
                out["swap_obj"] = scene.with_groups(*sw)
    if scene.relation is not None:
        out["replace_rel"] = replace(scene, relation=INVERSE_RELATION[scene.relation])
    if len(g) == 1:
        while True:
            new = Group(rng.choice(SHAPES), rng.choice(tuple(COLORS)), "medium", 1)
            if (new.shape, new.color) not in used:
                break
        out["add_obj"] = Scene((g[0], new), rng.choice(RELATIONS))
    return out


def negative_captions(scene: Scene, caption_seed: str, rng: random.Random) -> list[dict]:
    """neg_captions records (schemas.columns, negatives_text) for the caption `caption(scene, Random(seed))`."""
    pos = caption(scene, random.Random(caption_seed))
    out = []
    for kind, edited in scene_edits(scene, rng).items():
        text = caption(edited, random.Random(caption_seed))  # the same variant (order, prefix) as the positive
        if text == pos:
            continue
        out.append({"kind": kind, "text": text, "edit_before": None, "edit_after": None, "span_start": None,
                    "span_end": None, "method": "scene"})
    return out


# --------------------------------------------------------------------------- builds and the evaluation set

def _write_build(folder: Path, rows: list[dict], schema: pa.Schema, build_id: str, rows_per_group: int = 128) -> Path:
    shards = folder / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["build_id"] = build_id
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), shards / "part-00000.parquet",
                   row_group_size=rows_per_group)
    (folder / "build.json").write_text(json.dumps({"build_id": build_id, "rows": len(rows)}, indent=2))
    return folder


def make_demo_builds(root: str | Path, n: int = N_BUILD, seed: int = 0, wrong_frac: float = 0.45,
                     dup_frac: float = 0.1, image_size: int = IMAGE_SIZE) -> dict:
    """Two builds of the same demo scenes: raw (wrong captions, duplicates) and curated (true pairs, deduplicated,
    with neg_captions). Returns {"raw": {"dir", "build_id", "rows"}, "curated": {...}}; reuses finished ones."""
    root = Path(root)
    params = {"n": n, "seed": seed, "wrong_frac": wrong_frac, "dup_frac": dup_frac, "image_size": image_size,
              "negative_images": 1}
    tag = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    out = {}
    for name in ("raw", "curated"):
        folder = root / f"{name}-{tag}"
        out[name] = {"dir": folder, "build_id": f"demo-eval-{name}-{tag}"}
    if all((v["dir"] / "build.json").exists() for v in out.values()):
        for v in out.values():
            v["rows"] = json.loads((v["dir"] / "build.json").read_text())["rows"]
        return out
    scenes, clean, raw = [], [], []
    for i in range(n):
        rng = random.Random(f"pairforge-eval-build/{seed}/{i}")
        scene = sample_scene(rng)
        layout_seed = rng.getrandbits(63)
        quality = rng.randint(75, 95)
        data = encode_jpeg(render_scene(scene, image_size, layout_seed), quality)
        cseed = f"caption/{seed}/{i}"
        text = caption(scene, random.Random(cseed))
        url = f"synthetic://pairforge-eval/{seed}/{i}.jpg"
        row = {"url": url, "source": "demo-eval", "image": data, "width": image_size, "height": image_size,
               "original_width": image_size, "original_height": image_size,
               "sha256": hashlib.sha256(data).hexdigest()}
        scenes.append((scene, cseed, rng, layout_seed, quality))
        clean.append(dict(row, text=text, uid=make_uid(url, text)))
    drng = random.Random(f"noise/{seed}")
    for i, r in enumerate(clean):
        r = dict(r)
        if drng.random() < wrong_frac:  # a caption of another scene (the demo corpus's wrong_caption)
            j = drng.randrange(n - 1)
            j += j >= i
            r["text"] = clean[j]["text"]
            r["uid"] = make_uid(r["url"], r["text"])
            raw.append(r)
            continue
        raw.append(r)
        if drng.random() < dup_frac:
            raw.append(dict(r, uid=make_uid(r["url"], r["text"], occurrence=1)))
    drng.shuffle(raw)
    raw_ids = {r["uid"] for r in raw}
    curated, neg_images = [], []
    for i, (r, (scene, cseed, rng, layout_seed, quality)) in enumerate(zip(clean, scenes)):
        if r["uid"] in raw_ids:  # the true pairs the raw build holds (the filters drop the wrong ones)
            negs = negative_captions(scene, cseed, rng)
            curated.append(dict(r, neg_captions=negs, negatives_count=len(negs)))
            # one counterfactual image a pair (the demo's render editor: the edited scene redrawn with the same
            # layout seed), captioned like the positive: TripletCLIP's negative image with its own caption
            irng = random.Random(f"neg-image/{seed}/{i}")
            edits = scene_edits(scene, irng)
            kind = irng.choice(sorted(edits))
            text = caption(edits[kind], random.Random(cseed))
            if text != r["text"]:
                neg_image = encode_jpeg(render_scene(edits[kind], image_size, layout_seed), quality)
                neg_images.append({"uid": r["uid"], "kind": kind, "neg_text": text, "neg_image": neg_image})
    (out["curated"]["dir"] / NEG_IMAGES).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(neg_images, schema=NEG_IMAGE_SCHEMA),
                   out["curated"]["dir"] / NEG_IMAGES / "part-00000.parquet")
    _write_build(out["raw"]["dir"], raw, PAIR_SCHEMA, out["raw"]["build_id"])
    _write_build(out["curated"]["dir"], curated, NEG_SCHEMA, out["curated"]["build_id"])  # build.json: done
    out["raw"]["rows"], out["curated"]["rows"] = len(raw), len(curated)
    return out


def eval_scenes(n: int = 300, seed: int = EVAL_SEED, image_size: int = IMAGE_SIZE) -> list[dict]:
    """Fresh scenes no build contains: {scene, text, image (PIL, decoded from JPEG), negatives: {kind: text}}."""
    from loaders.pairs import decode_image

    out = []
    for i in range(n):
        rng = random.Random(f"pairforge-eval/{seed}/{i}")
        scene = sample_scene(rng)
        im = decode_image(encode_jpeg(render_scene(scene, image_size, rng.getrandbits(63))))
        cseed = f"pairforge-eval-caption/{seed}/{i}"
        negs = {n_["kind"]: n_["text"] for n_ in negative_captions(scene, cseed, rng)}
        out.append({"scene": scene, "text": caption(scene, random.Random(cseed)), "image": im, "negatives": negs})
    return out


# --------------------------------------------------------------------------- train and evaluate

def proxy_spec(shards: Path, out: Path, loss: str = "clip", seed: int = 0, steps: int | None = None,
               batch_size: int | None = None, threads: int | None = 1,
               max_negatives: int | None = PROXY_MAX_NEGATIVES):
    from schemas.train_spec import TrainSpec

    optim = dict(PROXY_OPTIM)
    if steps:
        optim["steps"] = steps
        optim["warmup_steps"] = min(optim["warmup_steps"], steps)
    if batch_size:
        optim["batch_size"] = batch_size
    return TrainSpec.model_validate({
        "name": f"proxy-{loss}", "data": {"shards": [str(shards)], "eval_fraction": 0.0, "shuffle_buffer": 512,
                                          "max_negatives": max_negatives if loss != "clip" else None,
                                          "hard_negatives": ([str(Path(shards).parent / NEG_IMAGES)]
                                                             if loss == "tripletclip" else None)},
        "model": PROXY_MODEL, "optim": optim, "augment": {"crop_min_area": 1.0}, "loss": loss, "seed": seed,
        "threads": threads, "checkpoint_every": optim["steps"], "keep_checkpoints": 1, "log_every": 50,
        "out": str(out)})


def evaluate_model(model_dir: Path, scenes: list[dict]) -> dict:
    """Retrieval R@1/R@5 both ways and compositional accuracy per kind on the eval scenes."""
    import torch
    from transformers import AutoModel

    from training.train import embed, retrieval_metrics

    model = AutoModel.from_pretrained(model_dir)
    processor = _load_processor(model_dir)
    texts = [s["text"] for s in scenes]
    img, txt = embed(model, processor, [s["image"] for s in scenes], texts)
    m = retrieval_metrics(img, txt, texts)
    res = {k: m[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")}
    neg_texts, owners, kinds = [], [], []
    for i, s in enumerate(scenes):
        for kind, t in s["negatives"].items():
            neg_texts.append(t)
            owners.append(i)
            kinds.append(kind)
    _, neg = embed(model, processor, [], neg_texts)
    owners_t = torch.tensor(owners)
    pos_score = (img * txt).sum(-1)[owners_t]
    neg_score = (img[owners_t] * neg).sum(-1)
    wins = (pos_score > neg_score).tolist()
    for kind in COMP_KINDS:
        w = [x for x, k in zip(wins, kinds) if k == kind]
        if w:
            res[f"comp_{kind}"] = sum(w) / len(w)
    comp = [res[f"comp_{k}"] for k in COMP_KINDS if f"comp_{k}" in res]
    res["comp_mean"] = sum(comp) / len(comp)
    return res


def _load_processor(model_dir: Path):
    from transformers import AutoTokenizer

    from training.train import char_tokenizer, make_processor
    from schemas.train_spec import ModelSpec

    # the processor is rebuilt as trained (PIL image processor); a fitted tokenizer is read from the model folder
    m = ModelSpec(**PROXY_MODEL)
    tok = char_tokenizer(m.max_text_length) if m.tokenizer == "char" else AutoTokenizer.from_pretrained(model_dir)
    return make_processor(m, tok)


def train_and_eval(shards: Path, out: Path, scenes: list[dict], loss: str = "clip", seed: int = 0,
                   steps: int | None = None, batch_size: int | None = None, threads: int | None = 1) -> dict:
    from training.train import train

    spec = proxy_spec(shards, out, loss=loss, seed=seed, steps=steps, batch_size=batch_size, threads=threads)
    t0 = time.perf_counter()
    r = train(spec, fresh=True)
    train_s = time.perf_counter() - t0
    res = evaluate_model(Path(r["model_dir"]), scenes)
    res["train_seconds"] = round(train_s, 1)
    return res


def _eval_job(job: dict) -> dict:
    """One (run, seed) of `compare`, in this process or a worker's."""
    return train_and_eval(Path(job["shards"]), Path(job["run_dir"]), job["scenes"], loss=job["loss"],
                          seed=job["seed"], steps=job["steps"], batch_size=job["batch_size"], threads=job["threads"])


def compare(runs: list[dict], scenes: list[dict], out: Path, seeds=(0,), steps: int | None = None,
            batch_size: int | None = None, catalog=None, threads: int | None = 1, workers: int = 1) -> list[dict]:
    """runs: [{"name", "build_id", "shards", "loss"}]; trains and evaluates each for every seed at equal compute,
    `workers` runs at a time in spawned processes (each run is seeded on its own, so the numbers do not depend on
    `workers`). Results in (seed, run) order; the catalog is written from this process."""
    jobs = [{**run, "seed": seed, "run_dir": str(out / f"{run['name'].replace('/', '-')}-s{seed}"), "steps": steps,
             "batch_size": batch_size, "threads": threads} for seed in seeds for run in runs]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            metrics = list(pool.map(_eval_job, [{**j, "scenes": scenes} for j in jobs]))
    else:
        metrics = [_eval_job({**j, "scenes": scenes}) for j in jobs]
    results = []
    for job, res in zip(jobs, metrics):
        run = {k: job[k] for k in ("name", "build_id", "shards", "loss")}
        results.append({**run, "seed": job["seed"], "metrics": res})
        if catalog is not None:
            detail = {"seed": job["seed"], "steps": steps or PROXY_OPTIM["steps"],
                      "batch_size": batch_size or PROXY_OPTIM["batch_size"], "eval_scenes": len(scenes),
                      "eval_seed": EVAL_SEED, "model": PROXY_MODEL}
            for k, v in res.items():
                catalog.record_eval(run["build_id"], f"proxy-{run['loss']}/{k}", v, detail)
    return results


def format_table(results: list[dict]) -> str:
    cols = ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"] + [f"comp_{k}" for k in COMP_KINDS] + ["comp_mean"]
    short = {c: c.replace("comp_", "").replace("replace_", "r_").replace("swap_", "s_") for c in cols}
    head = f"{'run':<22}{'seed':>5} " + " ".join(f"{short[c]:>8}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in results:
        m = r["metrics"]
        lines.append(f"{r['name']:<22}{r['seed']:>5} " + " ".join(
            f"{m[c]:>8.3f}" if c in m else f"{'-':>8}" for c in cols))
    return "\n".join(lines)


def demo_eval(out: str | Path, seeds=(0,), n_build: int = N_BUILD, n_eval: int = N_EVAL, steps: int | None = None,
              batch_size: int | None = None, catalog_path: str | Path | None = None, threads: int | None = 1,
              comparisons=("curation", "negatives"), negative_losses=("negclip", "tripletclip"),
              workers: int = 1, echo=print) -> dict:
    """Both demo comparisons for each seed (the hard-negative one with each loss of `negative_losses`);
    returns {"results": [...], "table": str, "builds": {...}}."""
    out = Path(out)
    builds = make_demo_builds(out / "builds", n=n_build)
    scenes = eval_scenes(n_eval)
    catalog = None
    if catalog_path is not None:
        from catalogs import Catalog

        catalog = Catalog(catalog_path)
    runs = []
    cur = {"build_id": builds["curated"]["build_id"], "shards": builds["curated"]["dir"] / "shards"}
    if "curation" in comparisons:
        runs.append({"name": "raw/clip", "build_id": builds["raw"]["build_id"],
                     "shards": builds["raw"]["dir"] / "shards", "loss": "clip"})
    runs.append({"name": "curated/clip", **cur, "loss": "clip"})
    if "negatives" in comparisons:
        runs += [{"name": f"curated/{loss}", **cur, "loss": loss} for loss in negative_losses]
    results = compare(runs, scenes, out / "runs", seeds=seeds, steps=steps, batch_size=batch_size, catalog=catalog,
                      threads=threads, workers=workers)
    table = format_table(results)
    echo(f"builds: raw {builds['raw']['rows']} rows, curated {builds['curated']['rows']} rows; "
         f"eval: {len(scenes)} fresh scenes (seed {EVAL_SEED})\n{table}")
    return {"results": results, "table": table,
            "builds": {k: {"build_id": v["build_id"], "rows": v["rows"], "dir": str(v["dir"])}
                       for k, v in builds.items()}}


from prefect import flow, get_run_logger  # noqa: E402


@flow(name="pairforge-eval", validate_parameters=False, log_prints=True)
def eval_flow(out: str, seeds: list[int] | None = None, n_build: int = N_BUILD, n_eval: int = N_EVAL,
              steps: int | None = None, batch_size: int | None = None, catalog_path: str | None = None,
              threads: int | None = 1, workers: int = 1) -> dict:
    """The demo comparisons (raw vs curated; clip vs negclip and tripletclip) at equal compute; metrics go to the
    catalog."""
    logger = get_run_logger()
    res = demo_eval(out, seeds=tuple(seeds or (0,)), n_build=n_build, n_eval=n_eval, steps=steps,
                    batch_size=batch_size, catalog_path=catalog_path, threads=threads, workers=workers,
                    echo=lambda s: logger.info("%s", s))
    for r in res["results"]:
        r["shards"] = str(r["shards"])
    return res
