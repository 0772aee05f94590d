"""The proxy evaluation's demo default (`pairforge eval` with no builds or no evaluation set): two builds of the
synthetic scenes and an evaluation set of fresh ones. training.eval imports this module only for that default.

1. raw vs curated: two builds of the same demo scenes (`make_demo_builds`). raw = every pair as a crawl delivers
   it: `wrong_frac` of the captions belong to another scene (the demo corpus's wrong_caption kind) and `dup_frac`
   extra exact duplicates; curated = what the demo filters keep: the true pairs, duplicates removed, with the
   negatives_text column (neg_captions) added. Both train with loss clip.
2. without vs with hard negatives: clip vs negclip (negative captions) and tripletclip (negative captions plus one
   counterfactual image a pair with its caption, in the curated build's `hard-negatives/` folder) on the curated
   build. The negatives are Scene edits of the kinds below, the images the edited scene redrawn with the same
   layout seed (the demo's render editor); for the demo domain they are true negatives by construction; for real
   builds stages/negatives_text.py and flows/negatives.py write the same columns.
   Measured (tests/test_eval.py, seeds 0-2): tripletclip raises comp_mean by +0.024 to +0.047, negclip by +0.008 to
   +0.022 (negative captions alone teach the image encoder little at this compute).

Evaluation set (`eval_scenes(n, seed=EVAL_SEED)`): fresh demo scenes (demo.scenes) from a seed stream no build
uses ("pairforge-eval/{seed}/{i}"), rendered at the training size and JPEG-encoded like the builds, each with a
SugarCrepe-style hard negative of every kind that applies, made by editing the Scene (so the negative is false of
the picture by construction) and captioning it with the same caption variant:
    replace_att   one group's colour -> another colour          replace_obj  one group's shape -> another shape
    replace_rel   the relation reversed (left of <-> right of, above <-> below)
    swap_att      the colours of two groups exchanged           swap_obj     the shapes of two groups exchanged
    add_obj       a second group added next to a lone group     replace_cnt  a group's count changed (SugarCrepe
                                                                             files counts under replace_att)
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from demo.scenes import COLORS, INVERSE_RELATION, RELATIONS, SHAPES, Group, Scene, caption, encode_jpeg, \
    render_scene, sample_scene
from schemas.columns import PAIR_SCHEMA, stage_fields
from schemas.records import make_uid
from training.eval import IMAGE_SIZE, NEG_IMAGE_SCHEMA, NEG_IMAGES, compare, format_table, open_catalog

EVAL_SEED = 9_100_003  # the evaluation scenes' stream; builds here use "pairforge-eval-build/{seed}/{i}"
N_EVAL = 1000  # fresh evaluation scenes (embedding only: cheap; fewer make comp_mean noisy)
N_BUILD = 20000  # demo scenes per eval build: ~11k curated pairs, so 800 steps x 32 is ~2.3 epochs (2,000 overfit)
NEG_SCHEMA = pa.schema(list(PAIR_SCHEMA) + stage_fields("negatives_text"))


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
    """The demo's evaluation set: fresh scenes no build contains, as training.eval reads a set ({text, image (PIL,
    decoded from JPEG), negatives: [(kind, text)]}, plus the scene)."""
    from loaders.pairs import decode_image

    out = []
    for i in range(n):
        rng = random.Random(f"pairforge-eval/{seed}/{i}")
        scene = sample_scene(rng)
        im = decode_image(encode_jpeg(render_scene(scene, image_size, rng.getrandbits(63))))
        cseed = f"pairforge-eval-caption/{seed}/{i}"
        negs = [(n_["kind"], n_["text"]) for n_ in negative_captions(scene, cseed, rng)]
        out.append({"scene": scene, "text": caption(scene, random.Random(cseed)), "image": im, "negatives": negs})
    return out


def demo_eval(out: str | Path, seeds=(0,), n_build: int = N_BUILD, n_eval: int = N_EVAL, steps: int | None = None,
              batch_size: int | None = None, catalog_path: str | Path | None = None, threads: int | None = 1,
              comparisons=("curation", "negatives"), negative_losses=("negclip", "tripletclip"),
              workers: int = 1, echo=print) -> dict:
    """Both demo comparisons for each seed (the hard-negative one with each loss of `negative_losses`);
    returns {"results": [...], "table": str, "builds": {...}}."""
    out = Path(out)
    builds = make_demo_builds(out / "builds", n=n_build)
    scenes = eval_scenes(n_eval)
    catalog = open_catalog(catalog_path)
    runs = []
    cur = {"build_id": builds["curated"]["build_id"], "shards": builds["curated"]["dir"] / "shards",
           "hard_negatives": [builds["curated"]["dir"] / NEG_IMAGES]}
    if "curation" in comparisons:
        runs.append({"name": "raw/clip", "build_id": builds["raw"]["build_id"],
                     "shards": builds["raw"]["dir"] / "shards", "loss": "clip"})
    runs.append({"name": "curated/clip", **cur, "loss": "clip"})
    if "negatives" in comparisons:
        runs += [{"name": f"curated/{loss}", **cur, "loss": loss} for loss in negative_losses]
    results = compare(runs, scenes, out / "runs", seeds=seeds, steps=steps, batch_size=batch_size, catalog=catalog,
                      threads=threads, workers=workers,
                      eval_detail={"eval_scenes": len(scenes), "eval_seed": EVAL_SEED})
    table = format_table(results)
    echo(f"builds: raw {builds['raw']['rows']} rows, curated {builds['curated']['rows']} rows; "
         f"eval: {len(scenes)} fresh scenes (seed {EVAL_SEED})\n{table}")
    return {"results": results, "table": table,
            "builds": {k: {"build_id": v["build_id"], "rows": v["rows"], "dir": str(v["dir"])}
                       for k, v in builds.items()}}
