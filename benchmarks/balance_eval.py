"""Proxy evaluation of the balance stage: a balanced and an unbalanced build of a head-heavy demo corpus, trained at
equal compute by `pairforge eval`, evaluated on scenes of tail concepts (and, with the same trained models, on head
and uniform scenes: what balancing costs the head). Run on demand, not a test:

    .venv/bin/python benchmarks/balance_eval.py [--n 20000] [--t 1000] [--steps 2000] [--seeds 0,1,2,3,4]
        [--n-eval 400] [--n-probe 100] [--concepts FILE|scene-words]

The defaults are the README's proxy: at 400 steps on 6,000 scenes the small model barely learns shapes (head shape
recognition 0.24 against a chance of 0.17), so no build can show it a tail; at 2,000 steps on 20,000 it does.

1. Corpus: --n demo scenes (demo.scenes: 1-3 groups of coloured shapes) whose shapes and colours are drawn with
   weights 1/rank^2 (circle 67%, square 17%, ... diamond 2%; red 65%, ... black 1%): a head-heavy crawl. Images at
   the proxy's size, written as a Parquet corpus.
2. Builds (`pairforge curate`): unbalanced = clean only; balanced = clean + balance with the default concept list
   (wordfreq) and t = --t.
3. Evaluation sets of fresh scenes (a seed stream no build uses), --n-eval pairs each: tail (every group's shape in
   star, heart, diamond and colour in purple, orange, white, black: the concepts the crawl rarely shows), head
   (shapes circle, square, triangle; colours red, green, blue, yellow), uniform (demo.scenes.sample_scene).
4. `pairforge eval UNBALANCED BALANCED --eval-set tail.parquet --steps S --seed ...` (the same steps, batch size and
   seed for both builds: equal compute), then the trained models on the head and uniform sets.
5. Concept recognition with the same models: --n-probe one-group scenes per shape and per colour (the other
   attributes uniform); each image retrieves among the captions that differ only in that attribute (6 shapes or 8
   colours: zero-shot classification); accuracy per concept, averaged over the tail and over the head concepts.
Retrieval R@1 / R@5, image->text and text->image, among each set's pairs, and concept accuracy; means over seeds
printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TAIL_SHAPES, TAIL_COLORS = ("star", "heart", "diamond"), ("purple", "orange", "white", "black")
HEAD_SHAPES, HEAD_COLORS = ("circle", "square", "triangle"), ("red", "green", "blue", "yellow")
METRICS = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


def zipf(names, s: float = 2.0) -> list[float]:
    """Weights 1 / rank^s in the order of `names`."""
    return [1.0 / (i + 1) ** s for i in range(len(names))]


def scenes(n: int, stream: str, shapes: list | None, colors: list | None) -> list[tuple[bytes, str]]:
    """n (JPEG, caption) pairs at the proxy's image size, shapes and colours drawn with these weights (None:
    uniform)."""
    from demo.scenes import caption, encode_jpeg, render_scene, sample_scene
    from training.eval import IMAGE_SIZE

    out = []
    for i in range(n):
        rng = random.Random(f"{stream}/{i}")
        scene = sample_scene(rng, shapes, colors)
        data = encode_jpeg(render_scene(scene, IMAGE_SIZE, rng.getrandbits(63)), rng.randint(75, 95))
        out.append((data, caption(scene, rng)))
    return out


def concept_probe(n: int) -> dict[tuple[str, str], list[tuple[bytes, list[str]]]]:
    """(attribute, value) -> n one-group scenes showing that value: (JPEG, the captions for every value of the
    attribute, in SHAPES / COLORS order)."""
    from demo.scenes import COLORS, SHAPES, SIZES, Group, Scene, caption, encode_jpeg, render_scene
    from training.eval import IMAGE_SIZE

    probe: dict = {}
    for attr, values in (("shape", SHAPES), ("color", tuple(COLORS))):
        for v in values:
            for i in range(n):
                rng = random.Random(f"balance-eval-probe/{attr}/{v}/{i}")
                g = Group(rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(SIZES), rng.randint(1, 3))
                scene = Scene((replace(g, **{attr: v}),))
                data = encode_jpeg(render_scene(scene, IMAGE_SIZE, rng.getrandbits(63)), rng.randint(75, 95))
                texts = [caption(Scene((replace(g, **{attr: w}),))) for w in values]
                probe.setdefault((attr, v), []).append((data, texts))
    return probe


def concept_accuracy(model_dir: Path, probe: dict) -> dict[tuple[str, str], float]:
    """(attribute, value) -> share of its probe images whose own caption scores highest among the alternatives."""
    from demo.scenes import COLORS, SHAPES
    from loaders.pairs import decode_image
    from training.eval import _load_processor
    from training.train import embed
    from transformers import AutoModel

    model, processor = AutoModel.from_pretrained(model_dir), _load_processor(model_dir)
    out = {}
    for (attr, v), items in probe.items():
        truth = (SHAPES if attr == "shape" else tuple(COLORS)).index(v)
        img, txt = embed(model, processor, [decode_image(d) for d, _ in items], [t for _, ts in items for t in ts])
        scores = (img[:, None, :] * txt.view(len(items), -1, txt.shape[-1])).sum(-1)
        out[attr, v] = float((scores.argmax(-1) == truth).float().mean())
    return out


def write_corpus(pairs, folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": [f"synthetic://balance-eval/{i}.jpg" for i in range(len(pairs))],
                             "text": [c for _, c in pairs], "image": [d for d, _ in pairs]}),
                   folder / "part-0.parquet")


def finished_build(folder: Path, spec_text: str) -> dict | None:
    """The newest finished build in `folder` made from this spec (its manifest, stats), or None."""
    import yaml

    spec = yaml.safe_load(spec_text)
    want = [next(iter(e.items())) for e in spec["stages"]]
    for d in sorted(folder.glob("*/manifest.json"), reverse=True):
        built = yaml.safe_load((d.parent / "spec.yaml").read_text())
        have = [next(iter(e.items())) for e in built["stages"]]
        same = built["source"]["pairs"] == spec["source"]["pairs"] and [n for n, _ in have] == [n for n, _ in want]
        if same and all(h.get(k) == v for (_, w), (_, h) in zip(want, have) for k, v in w.items()):
            return {"build_dir": str(d.parent), "build_id": json.loads(d.read_text())["build_id"],
                    "stats": json.loads((d.parent / "stats.json").read_text())}
    return None


def run(cmd: list[str], env: dict) -> str:
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    if res.returncode:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-4000:])
    return res.stdout


def main() -> None:
    import pyarrow.parquet as pq
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--t", type=float, default=1000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--n-probe", type=int, default=100, help="one-group probe scenes per shape and per colour")
    ap.add_argument("--concepts", default=None, help="the balance stage's concept list: a file, or scene-words (the "
                    "demo's shape, plural shape and colour words); default: the stage's own (wordfreq)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/pairforge-balance-eval-20k"))
    args = ap.parse_args()
    out = args.out
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    from demo.scenes import COLORS, SHAPES
    from training.eval import write_eval_set

    corpus = out / "corpus"  # deterministic for --n: the same scenes every run
    if not corpus.exists() or pq.read_metadata(corpus / "part-0.parquet").num_rows != args.n:
        write_corpus(scenes(args.n, "balance-eval-crawl", zipf(SHAPES), zipf(COLORS)), corpus)
    only = lambda names, keep: [float(x in keep) for x in names]  # noqa: E731
    sets = {"tail": (only(SHAPES, TAIL_SHAPES), only(COLORS, TAIL_COLORS)),
            "head": (only(SHAPES, HEAD_SHAPES), only(COLORS, HEAD_COLORS)), "uniform": (None, None)}
    for name, (shapes, colors) in sets.items():
        if not (out / f"eval-{name}-{args.n_eval}.parquet").exists():
            pairs = scenes(args.n_eval, f"balance-eval-{name}", shapes, colors)
            write_eval_set([{"text": c, "image": d} for d, c in pairs], out / f"eval-{name}-{args.n_eval}.parquet")
    builds = {}
    if args.concepts == "scene-words":
        concept_list = out / "scene-words.txt"
        concept_list.write_text("\n".join([*SHAPES, *(f"{s}s" for s in SHAPES), *COLORS]) + "\n")
    else:
        concept_list = Path(args.concepts).resolve() if args.concepts else "wordfreq"
    for name, stages in (("unbalanced", [{"clean": {}}]),
                         ("balanced", [{"clean": {}}, {"balance": {"t": args.t, "concepts": str(concept_list)}}])):
        spec = out / f"{name}.yaml"
        spec.write_text(yaml.safe_dump({"dataset": f"balance-eval-{name}", "source": {
            "pairs": str(corpus), "caption_col": "text"}, "stages": stages, "out": str(out / "builds"),
            "ray": {"num_cpus": 2, "object_store_gb": 0.5}}))
        r = finished_build(out / "builds" / f"balance-eval-{name}", spec.read_text())
        if r is None or r["stats"]["rows_listed"] != args.n:  # not built yet with this spec
            run([sys.executable, "-m", "flows.cli", "curate", str(spec), "--new", "--quiet"], env)
            r = finished_build(out / "builds" / f"balance-eval-{name}", spec.read_text())
        builds[name] = r
        print(f"{name}: {r['stats']['rows_kept']:,} of {r['stats']['rows_listed']:,} rows kept", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    cmd = [sys.executable, "-m", "flows.cli", "eval", builds["unbalanced"]["build_dir"],
           builds["balanced"]["build_dir"], "--eval-set", str(out / f"eval-tail-{args.n_eval}.parquet"),
           "--steps", str(args.steps),
           "--out", str(out / "eval"), "--catalog", str(out / "catalog.duckdb"), "--workers", "2", "--json"]
    for s in seeds:
        cmd += ["--seed", str(s)]
    text = run(cmd, env)
    results = json.loads(text[text.index("\n[") + 1:] if not text.startswith("[") else text)
    from training.eval import evaluate_model, load_eval_set
    from training.train import MODEL_DIR

    probe = concept_probe(args.n_probe)
    table: dict = {}
    concepts: dict = {}
    for r in results:
        name = next(k for k, b in builds.items() if b["build_id"] == r["build_id"])
        table.setdefault((name, "tail"), []).append(r["metrics"])
        run_dir = out / "eval" / "runs" / f"{r['name'].replace('/', '-')}-s{r['seed']}"
        for set_name in ("head", "uniform"):
            items = load_eval_set(out / f"eval-{set_name}-{args.n_eval}.parquet")
            table.setdefault((name, set_name), []).append(evaluate_model(run_dir / MODEL_DIR, items))
        concepts.setdefault(name, []).append(concept_accuracy(run_dir / MODEL_DIR, probe))
    print(f"\nrows: unbalanced {builds['unbalanced']['stats']['rows_kept']:,}, balanced "
          f"{builds['balanced']['stats']['rows_kept']:,} (t = {args.t:g}); {args.steps} steps x 32 pairs each, "
          f"seeds {seeds}; {args.n_eval} pairs a set; {time.perf_counter() - t0:.0f} s, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'set':<9}{'build':<12}" + "".join(f"{m:>9}" for m in METRICS) + "   per seed (i2t_r1)")
    for set_name in ("tail", "head", "uniform"):
        for name in ("unbalanced", "balanced"):
            ms = table[(name, set_name)]
            mean = {m: sum(x[m] for x in ms) / len(ms) for m in METRICS}
            print(f"{set_name:<9}{name:<12}" + "".join(f"{mean[m]:>9.3f}" for m in METRICS)
                  + "   " + " ".join(f"{x['i2t_r1']:.3f}" for x in ms))
    groups = {"tail shapes": [("shape", v) for v in TAIL_SHAPES], "tail colours": [("color", v) for v in TAIL_COLORS],
              "head shapes": [("shape", v) for v in HEAD_SHAPES], "head colours": [("color", v) for v in HEAD_COLORS]}
    print(f"\nconcept recognition: {args.n_probe} one-group scenes a concept, each image against the captions that "
          f"differ only in that attribute (chance: shape 1/6, colour 1/8); accuracy, mean of the group's concepts")
    print(f"{'build':<12}" + "".join(f"{g:>14}" for g in groups) + "   per seed (tail shapes, tail colours)")
    for name in ("unbalanced", "balanced"):
        runs = concepts[name]
        mean = {g: sum(acc[k] for acc in runs for k in keys) / (len(runs) * len(keys)) for g, keys in groups.items()}
        per_seed = " ".join(f"{sum(acc[k] for k in groups['tail shapes']) / 3:.3f}/"
                            f"{sum(acc[k] for k in groups['tail colours']) / 4:.3f}" for acc in runs)
        print(f"{name:<12}" + "".join(f"{mean[g]:>14.3f}" for g in groups) + "   " + per_seed)
    for name in ("unbalanced", "balanced"):
        runs = concepts[name]
        print(f"{name} per concept:", " ".join(f"{v}={sum(acc[a, v] for acc in runs) / len(runs):.2f}"
                                             for a, v in runs[0]))


if __name__ == "__main__":
    main()
