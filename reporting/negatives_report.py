"""Blind-bias report of the hard negative captions (negatives.text), next to SugarCrepe's reference negatives.

    .venv/bin/python -m reporting.negatives_report [--lm smollm2-135m|none] [--lm-pairs 150] [--lm-stage 200]
                                               [--demo 2000] [--sugarcrepe DIR] [--json FILE]

SugarCrepe's lesson: a negative that a text-only model tells from its caption teaches a contrastive model nothing
about the image. Per kind, the figure is the share of (caption, negative) pairs where a text-only plausibility score
prefers the caption: 0.50 is blind (the goal), 1.00 means the text alone gives the negative away, and well below
0.50 the negative reads *better* than its caption (a cue as well for replace/swap kinds; for add_* kinds a per-token
score favours the longer, predictable negative by construction, and length gives every addition away anyway).

Scorers:
- LM (the primary one when stages.models.lm can load it; --lm none skips it): mean token log-probability under a causal LM
  (SmolLM2-135M), on up to --lm-pairs random test pairs per kind. Nothing is fitted, so nothing leaks.
- n-gram: negatives.text.NgramLM (interpolated bigram/unigram, add-k), fitted on the *train* half of the
  domain's captions (split by a hash of the caption text; COCO: the real SugarCrepe captions, demo: demo captions)
  and applied to pairs made from the *test* half.

Rows per domain, (a) demo captions (demo.scenes) and (b) the 4,345 distinct COCO captions in SugarCrepe:
- raw:   rule negatives, the first candidate of each kind (negatives_for, no scorer);
- stage: the negatives_text stage with its defaults: plausibility selection against k-fold n-gram LMs fitted on the
         batch, then the blind check;
- stage-lm (with --lm-stage N > 0): the stage with plausibility "lm" (SmolLM2 selects and checks; pool 4) on N test
         captions: the LM figure of these is the stage's own target, so it is not an independent measurement;
         the n-gram one is;
- SugarCrepe (COCO): their reference negatives of the same test captions, the yardstick.
Coverage is the share of captions that get a negative of the kind; speed is rule negatives per second per kind.
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

from negatives.text import (KINDS, BatchNegatives, LmScorer, NegativeTextOptions, NgramLM,  # noqa: E402
                            blind_accuracy, negatives_for, split_of)

SUGARCREPE = ROOT / "tests" / "data" / "sugarcrepe"
DEFAULT_LM = "smollm2-135m"

Pairs = dict[str, list[tuple[str, str]]]


def load_sugarcrepe(folder: Path = SUGARCREPE) -> Pairs:
    """kind -> [(caption, reference negative)]."""
    out = {}
    for kind in KINDS:
        data = json.loads((Path(folder) / f"{kind}.json").read_text())
        out[kind] = [(v["caption"], v["negative_caption"]) for v in data.values()]
    return out


def coco_captions(ref: Pairs) -> list[str]:
    """The distinct captions (first occurrence order)."""
    seen, out = set(), []
    for pairs in ref.values():
        for cap, _ in pairs:
            if cap not in seen:
                seen.add(cap)
                out.append(cap)
    return out


def demo_captions(n: int = 2000, seed: int = 0) -> list[str]:
    from demo.scenes import caption, sample_scene

    rng = random.Random(seed)
    return [caption(sample_scene(rng), rng) for _ in range(n)]


def make_pairs(captions: list[str], kinds=KINDS, per_kind: int = 1, seed: int = 0) -> Pairs:
    out: Pairs = {k: [] for k in kinds}
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


def ngram_figures(train: list[str], pairs: Pairs) -> dict[str, tuple[float, int]]:
    lm = NgramLM(train)
    return {k: blind_accuracy(lm.score, v) for k, v in pairs.items()}


class CachedScorer:
    """An LmScorer whose scores are kept: a caption scored for one row is not scored again for the next."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.cache: dict[str, float] = {}

    def scores(self, texts: list[str]) -> list[float]:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            self.cache.update(zip(todo, self.scorer.scores(todo)))
        return [self.cache[t] for t in texts]


def lm_figures(scorer, pairs: Pairs, max_pairs: int, seed: int = 0) -> dict[str, tuple[float, int]]:
    out = {}
    for k, v in pairs.items():
        v = list(v)
        random.Random(seed).shuffle(v)
        v = v[:max_pairs]
        texts = [t for pair in v for t in pair]
        score = dict(zip(texts, scorer.scores(texts)))
        out[k] = blind_accuracy(score.__getitem__, v)
    return out


def stage_pairs(captions: list[str], batch_size: int = 1024, **params) -> tuple[Pairs, dict]:
    """Make negatives of `captions` in batches, as the negatives_text stage does in a build.

    -> (kind -> pairs, {"dropped": negatives the blind check dropped per kind, "rows": rows with the kind})."""
    from stages.models.lm import shared_lm

    make = BatchNegatives(NegativeTextOptions(**params), load_lm=lambda name: shared_lm(name, threads=1))
    out: Pairs = {k: [] for k in KINDS}
    rows = {k: 0 for k in KINDS}
    for s in range(0, len(captions), batch_size):
        chunk = captions[s:s + batch_size]
        for cap, negs in zip(chunk, make(chunk)):
            for n in negs:
                out[n.kind].append((cap, n.text))
            for k in {n.kind for n in negs}:
                rows[k] += 1
    dropped = {k: v for k, v in make.dropped_by_blind_check.items() if v}
    return out, {"dropped": dropped, "rows": rows}


def resolve_lm(name: str | None) -> str | None:
    """The LM to score with: `name`, or for "auto" SmolLM2 when stages.models.lm can load it; None for none."""
    if name in (None, "", "none"):
        return None
    if name != "auto":
        return name
    try:
        from stages.models.lm import check_lm_loadable

        check_lm_loadable(DEFAULT_LM, stage="negatives_report")
        return DEFAULT_LM
    except Exception:  # noqa: BLE001 - no stages.models.lm, no model: fall back to the n-gram scorer alone
        return None


def report(sugarcrepe: Path = SUGARCREPE, demo_n: int = 2000, seed: int = 0, lm: str | None = None,
           lm_pairs: int = 150, lm_stage: int = 0, out=print) -> dict:
    ref = load_sugarcrepe(sugarcrepe)
    data = {"coco": coco_captions(ref), "demo": demo_captions(demo_n, seed)}
    scorer = None
    if lm:
        from stages.models.lm import shared_lm

        scorer = CachedScorer(LmScorer(shared_lm(lm)))
    res: dict = {"lm": lm}
    for dom, caps in data.items():
        train, test = split(caps)
        t0 = time.perf_counter()
        raw = make_pairs(test, seed=seed)
        t_raw = time.perf_counter() - t0
        t0 = time.perf_counter()
        staged, info = stage_pairs(test, seed=seed)
        t_stage = time.perf_counter() - t0
        test_set = set(test)
        r = {"n": len(caps), "train": len(train), "test": len(test), "dropped": info["dropped"],
             "coverage_raw": coverage(caps, seed=seed),
             "coverage_stage": {k: info["rows"][k] / max(1, len(test)) for k in KINDS},
             "ngram_raw": ngram_figures(train, raw), "ngram_stage": ngram_figures(train, staged),
             "seconds_raw": t_raw, "seconds_stage": t_stage,
             "negatives_raw": sum(map(len, raw.values())), "negatives_stage": sum(map(len, staged.values()))}
        ref_test = {k: [(c, n) for c, n in v if c in test_set] for k, v in ref.items()} if dom == "coco" else None
        if ref_test:
            r["ngram_ref"] = ngram_figures(train, ref_test)
        if scorer is not None:
            r["lm_raw"] = lm_figures(scorer, raw, lm_pairs, seed)
            r["lm_stage"] = lm_figures(scorer, staged, lm_pairs, seed)
            if ref_test:
                r["lm_ref"] = lm_figures(scorer, ref_test, lm_pairs, seed)
            if lm_stage > 0:
                sub = list(test)
                random.Random(seed).shuffle(sub)
                sub = sub[:lm_stage]
                t0 = time.perf_counter()
                lm_staged, lm_info = stage_pairs(sub, seed=seed, plausibility="lm", lm_model=lm, pool=4,
                                                 blind_min_pairs=20)
                r["seconds_stage_lm"] = time.perf_counter() - t0
                r["stage_lm_captions"] = len(sub)
                r["dropped_lm"] = lm_info["dropped"]
                r["lm_stage_lm"] = lm_figures(scorer, lm_staged, lm_pairs, seed)
                r["ngram_stage_lm"] = ngram_figures(train, lm_staged)
        res[dom] = r
    res["speed"] = speed(data["coco"][:1000], seed=seed)
    _print(res, scorer is not None, lm_stage > 0 and scorer is not None, out)
    return res


def _print(res: dict, with_lm: bool, with_lm_stage: bool, out) -> None:
    out("Blind bias per kind: share of test pairs where a text-only score prefers the caption to the negative")
    out("(0.50 = blind, the goal; 1.00 = the text gives the negative away; near 0 the negative reads better, which")
    out("for add_* kinds is the per-token score favouring a longer, predictable caption: checked one way only).")
    out(f"LM: mean token log-prob under {res['lm']}; " if with_lm else "LM: not used (--lm none or no stages.models.lm); ")
    out("n-gram: bigram LM fitted on the domain's train captions, pairs from its test captions.")
    out("raw: rule negatives, first candidate; stage: the stage's defaults (selection against k-fold n-gram LMs "
        "of the batch, blind check)" + ("; stage-lm: plausibility lm (its LM figure is its own target)."
                                       if with_lm_stage else "."))
    cols = [("coverage_raw", "cover"), ("coverage_stage", "stage")]
    for dom, name in (("demo", "(a) demo captions"), ("coco", "(b) COCO captions (SugarCrepe)")):
        r = res[dom]
        out("")
        out(f"{name}: {r['n']} captions, n-gram fitted on {r['train']}, pairs from {r['test']}; "
            f"dropped by the blind check: {r['dropped'] or 'none'}"
            + (f"; stage-lm on {r['stage_lm_captions']} captions in {r['seconds_stage_lm']:.0f} s, dropped "
               f"{r['dropped_lm'] or 'none'}" if with_lm_stage else ""))
        figs = []
        if with_lm:
            figs += [("lm_raw", "LM raw"), ("lm_stage", "LM stage")]
            if with_lm_stage:
                figs.append(("lm_stage_lm", "LM stage-lm"))
            if dom == "coco":
                figs.append(("lm_ref", "LM SugarCr."))
        figs += [("ngram_raw", "ngram raw"), ("ngram_stage", "ngram stage")]
        if with_lm_stage:
            figs.append(("ngram_stage_lm", "ngram st-lm"))
        if dom == "coco":
            figs.append(("ngram_ref", "ngram SugarCr."))
        out("  " + f"{'kind':12s}" + "".join(f"{h:>7s}" for _, h in cols) + " |" +
            "".join(f"{h:>15s}" for _, h in figs))
        for k in KINDS:
            out("  " + f"{k:12s}" + "".join(f"{r[c][k]:7.1%}" for c, _ in cols) + " |" +
                "".join(f"{_f(r[f][k]):>15s}" for f, _ in figs))
        out(f"  negatives: raw {r['negatives_raw']} in {r['seconds_raw']:.1f} s, stage {r['negatives_stage']} in "
            f"{r['seconds_stage']:.1f} s")
    out("")
    out("Rule negatives per second per kind (1,000 COCO captions, parse included, no selection): " +
        ", ".join(f"{k} {v:.0f}" for k, v in res["speed"].items()))


def _f(v: tuple[float, int]) -> str:
    acc, n = v
    return "-" if n == 0 else f"{acc:.2f} ({n})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sugarcrepe", type=Path, default=SUGARCREPE)
    ap.add_argument("--demo", type=int, default=2000, help="demo captions to sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm", default="auto", help="causal LM to score with (stages.models.lm name); auto: SmolLM2 when "
                                                  "it can be loaded; none: the n-gram scorer only")
    ap.add_argument("--lm-pairs", type=int, default=150, help="test pairs per kind scored by the LM")
    ap.add_argument("--lm-stage", type=int, default=200,
                    help="test captions per domain to run the stage with plausibility lm on (0: skip)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    res = report(args.sugarcrepe, args.demo, args.seed, resolve_lm(args.lm), args.lm_pairs, args.lm_stage)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=list))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
