"""Blind-bias report of the rule negatives (stages.negatives_text), next to SugarCrepe's reference negatives.

    .venv/bin/python -m flows.negatives_report [--sugarcrepe DIR] [--demo N] [--lm smollm2-135m] [--lm-pairs 300]

SugarCrepe's lesson: a negative that a text-only model tells from its caption teaches a contrastive model nothing
about the image. Per kind, the figure is the share of (caption, negative) pairs where a text-only plausibility score
prefers the caption: 0.5 is blind (good), 1.0 means the text alone gives the negative away.

Scorers:
- n-gram: stages.negatives_text.NgramLM (interpolated bigram/unigram, add-k), fitted on the *train* half of the
  captions of the domain (split by a hash of the caption text) and applied to pairs made from the *test* half.
  For COCO it is fitted on the real SugarCrepe captions, for the demo domain on demo captions.
- lm (with --lm): the mean token log-probability under a causal LM from stages.lm (SmolLM2-135M), on up to
  --lm-pairs test pairs per kind; no fitting.

Rows: our rule negatives on (a) demo captions (flows.demo.scenes) and (b) the 4,345 distinct COCO captions in
SugarCrepe; (c) SugarCrepe's own reference negatives (the yardstick). Coverage is the share of captions that get a
negative of the kind; speed is rule negatives per second per kind (one core, parsing included).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages.negatives_text import KINDS, NgramLM, blind_accuracy, negatives_for, split_of  # noqa: E402

SUGARCREPE = Path("/work/shared/data/sugarcrepe")


def load_sugarcrepe(folder: Path = SUGARCREPE) -> dict[str, list[tuple[str, str]]]:
    """kind -> [(caption, reference negative)]."""
    out = {}
    for kind in KINDS:
        data = json.loads((Path(folder) / f"{kind}.json").read_text())
        out[kind] = [(v["caption"], v["negative_caption"]) for v in data.values()]
    return out


def coco_captions(ref: dict[str, list[tuple[str, str]]]) -> list[str]:
    """The distinct captions (first occurrence order)."""
    seen, out = set(), []
    for pairs in ref.values():
        for cap, _ in pairs:
            if cap not in seen:
                seen.add(cap)
                out.append(cap)
    return out


def demo_captions(n: int = 2000, seed: int = 0) -> list[str]:
    from flows.demo.scenes import caption, sample_scene

    rng = random.Random(seed)
    return [caption(sample_scene(rng), rng) for _ in range(n)]


def make_pairs(captions: list[str], kinds=KINDS, per_kind: int = 1, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in kinds}
    for c in captions:
        for n in negatives_for(c, kinds, per_kind, seed):
            out[n.kind].append((c, n.text))
    return out


def coverage(captions: list[str], kinds=KINDS, seed: int = 0) -> dict[str, float]:
    got = {k: 0 for k in kinds}
    for c in captions:
        for k in {n.kind for n in negatives_for(c, kinds, 1, seed)}:
            got[k] += 1
    return {k: got[k] / max(1, len(captions)) for k in kinds}


def speed(captions: list[str], kinds=KINDS, seed: int = 0) -> dict[str, float]:
    """Rule negatives per second per kind (parse + generate, one kind at a time)."""
    out = {}
    for k in kinds:
        t0 = time.perf_counter()
        made = sum(len(negatives_for(c, (k,), 1, seed)) for c in captions)
        out[k] = made / max(time.perf_counter() - t0, 1e-9)
    return out


def split(captions: list[str]) -> tuple[list[str], list[str]]:
    train = [c for c in captions if split_of(c) == "train"]
    test = [c for c in captions if split_of(c) == "test"]
    return train, test


def ngram_figures(train: list[str], pairs: dict[str, list[tuple[str, str]]]) -> dict[str, tuple[float, int]]:
    lm = NgramLM(train)
    return {k: blind_accuracy(lm.score, v) for k, v in pairs.items()}


def lm_figures(scorer, pairs: dict[str, list[tuple[str, str]]], max_pairs: int, seed: int = 0):
    out = {}
    for k, v in pairs.items():
        v = list(v)
        random.Random(seed).shuffle(v)
        v = v[:max_pairs]
        texts = [t for pair in v for t in pair]
        s = scorer.scores(texts)
        score = dict(zip(texts, s))
        out[k] = blind_accuracy(score.__getitem__, v)
    return out


def stage_pairs(captions: list[str], batch_size: int = 1024, **params) -> tuple[dict[str, list[tuple[str, str]]],
                                                                              dict[str, int]]:
    """Run the negatives_text stage (default params: plausibility selection and the blind check) over `captions`
    in batches, as a build would. -> (kind -> pairs, negatives dropped by the blind check per kind)."""
    import pyarrow as pa

    from schemas.spec import NegativesTextParams
    from stages.negatives_text import NegativesTextStage

    stage = NegativesTextStage(NegativesTextParams(**params))
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    rows = {k: 0 for k in KINDS}
    for s in range(0, len(captions), batch_size):
        chunk = captions[s:s + batch_size]
        res = stage(pa.table({"text": chunk}))
        for cap, negs in zip(chunk, res.column("neg_captions").to_pylist()):
            for n in negs:
                out[n["kind"]].append((cap, n["text"]))
            for k in {n["kind"] for n in negs}:
                rows[k] += 1
    dropped = {k: v for k, v in stage.dropped_by_blind_check.items() if v}
    return out, {"dropped": dropped, "rows": rows}


def report(sugarcrepe: Path = SUGARCREPE, demo_n: int = 2000, seed: int = 0, lm: str | None = None,
           lm_pairs: int = 300, out=print) -> dict:
    ref = load_sugarcrepe(sugarcrepe)
    data = {"coco": coco_captions(ref), "demo": demo_captions(demo_n, seed)}
    scorer = None
    if lm:
        from stages.negatives_text import LmScorer

        scorer = LmScorer(lm)
    res: dict = {}
    for dom, caps in data.items():
        train, test = split(caps)
        t0 = time.perf_counter()
        raw = make_pairs(test, seed=seed)
        t_raw = time.perf_counter() - t0
        t0 = time.perf_counter()
        staged, info = stage_pairs(test, seed=seed)
        t_stage = time.perf_counter() - t0
        r = {"n": len(caps), "train": len(train), "test": len(test), "dropped": info["dropped"],
             "coverage_raw": coverage(caps, seed=seed),
             "coverage_stage": {k: info["rows"][k] / max(1, len(test)) for k in KINDS},
             "ngram_raw": ngram_figures(train, raw), "ngram_stage": ngram_figures(train, staged),
             "seconds_raw": t_raw, "seconds_stage": t_stage,
             "negatives_raw": sum(map(len, raw.values())), "negatives_stage": sum(map(len, staged.values()))}
        if dom == "coco":
            ref_test = {k: [(c, n) for c, n in v if c in set(test)] for k, v in ref.items()}
            r["ngram_ref"] = ngram_figures(train, ref_test)
        if scorer is not None:
            r["lm_raw"] = lm_figures(scorer, raw, lm_pairs, seed)
            r["lm_stage"] = lm_figures(scorer, staged, lm_pairs, seed)
            if dom == "coco":
                r["lm_ref"] = lm_figures(scorer, ref_test, lm_pairs, seed)
        res[dom] = r
    res["speed"] = speed(data["coco"][:1000], seed=seed)

    out("Blind bias per kind: share of test pairs where a text-only score prefers the caption to the negative")
    out("(0.50 = blind, the goal; 1.00 = the text gives the negative away; below 0.50 the negative reads better).")
    out("n-gram: bigram LM fitted on the domain's train captions; LM: mean token log-prob under " + (lm or "-") + ".")
    out("raw: rule negatives, first candidate; stage: the negatives_text stage with its defaults (plausibility "
        "selection against its own cross-fitted n-gram LMs, then the blind check).")
    for dom, name in (("demo", "(a) demo captions"), ("coco", "(b) COCO captions (SugarCrepe)")):
        r = res[dom]
        out("")
        out(f"{name}: {r['n']} captions, n-gram fitted on {r['train']}, pairs from {r['test']}; "
            f"dropped by the blind check: {r['dropped'] or 'none'}")
        head = f"  {'kind':12s} {'coverage':>8s} {'stage':>6s} | {'n-gram raw':>12s} {'stage':>12s}"
        if dom == "coco":
            head += f" {'SugarCrepe':>12s}"
        if scorer is not None:
            head += f" | {'LM raw':>11s} {'stage':>11s}" + (f" {'SugarCrepe':>11s}" if dom == "coco" else "")
        out(head)
        for k in KINDS:
            row = f"  {k:12s} {r['coverage_raw'][k]:8.1%} {r['coverage_stage'][k]:6.1%} | " \
                  f"{_f(r['ngram_raw'][k]):>12s} {_f(r['ngram_stage'][k]):>12s}"
            if dom == "coco":
                row += f" {_f(r['ngram_ref'][k]):>12s}"
            if scorer is not None:
                row += f" | {_f(r['lm_raw'][k]):>11s} {_f(r['lm_stage'][k]):>11s}"
                if dom == "coco":
                    row += f" {_f(r['lm_ref'][k]):>11s}"
            out(row)
        out(f"  negatives: raw {r['negatives_raw']} in {r['seconds_raw']:.1f} s, stage {r['negatives_stage']} in "
            f"{r['seconds_stage']:.1f} s")
    out("")
    out("Rule negatives per second per kind (1,000 COCO captions, parse included, no selection): " +
        ", ".join(f"{k} {v:.0f}" for k, v in res["speed"].items()))
    return res


def _f(v: tuple[float, int]) -> str:
    acc, n = v
    return "-" if n == 0 else f"{acc:.2f} ({n})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sugarcrepe", type=Path, default=SUGARCREPE)
    ap.add_argument("--demo", type=int, default=2000, help="demo captions to sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm", default=None, help="also score with this causal LM (stages.lm name, e.g. smollm2-135m)")
    ap.add_argument("--lm-pairs", type=int, default=300, help="test pairs per kind scored by the LM")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    res = report(args.sugarcrepe, args.demo, args.seed, args.lm, args.lm_pairs)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=list))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
