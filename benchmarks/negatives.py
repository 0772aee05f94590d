"""Benchmark of hard-negative generation (text part: negatives.text and the negatives_text stage). On demand:

    .venv/bin/python benchmarks/negatives.py [--captions N] [--repeat R]

On the distinct COCO captions of SugarCrepe (or demo captions when those files are absent), one core:
- rule negatives per second per kind (parse + generate, first candidate), and the share of captions that get one;
- the stage's throughput with its defaults (k-fold n-gram LMs, plausibility selection over a pool of candidates,
  blind check): captions per second and negatives per second.
Image part (negatives.images / negatives.editors): `.venv/bin/python benchmarks/negatives.py image [--scenes N]`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from reporting.negatives_report import SUGARCREPE, coco_captions, demo_captions, load_sugarcrepe  # noqa: E402
from negatives.text import KINDS, negatives_for, parse  # noqa: E402
from stages.negatives_text import NegativesTextParams, NegativesTextStage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=4345)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    if SUGARCREPE.is_dir():
        caps, name = coco_captions(load_sugarcrepe())[: args.captions], "COCO (SugarCrepe)"
    else:
        caps, name = demo_captions(args.captions), "demo"
    caps = caps * args.repeat
    print(f"{len(caps)} {name} captions, one core")
    t0 = time.perf_counter()
    parsed = [parse(c) for c in caps]
    t_parse = time.perf_counter() - t0
    print(f"  parse: {len(caps) / t_parse:,.0f} captions/s")
    print(f"  {'kind':12s} {'negatives/s':>12s} {'(generate only)':>16s} {'coverage':>9s}")
    for k in KINDS:
        t0 = time.perf_counter()
        made = sum(len(negatives_for(c, (k,), 1, 0, parsed=p)) for c, p in zip(caps, parsed))
        dt = time.perf_counter() - t0
        print(f"  {k:12s} {made / (dt + t_parse):12,.0f} {made / dt:16,.0f} {made / len(caps):9.1%}")
    stage = NegativesTextStage(NegativesTextParams())
    t0 = time.perf_counter()
    n = 0
    for s in range(0, len(caps), 1024):
        n += sum(stage(pa.table({"text": caps[s:s + 1024]})).column("negatives_count").to_pylist())
    dt = time.perf_counter() - t0
    print(f"  stage (defaults, batches of 1024): {len(caps) / dt:,.0f} captions/s, {n / dt:,.0f} negatives/s, "
          f"{n / len(caps):.2f} negatives per caption")
    return 0


# --------------------------------------------------------------------------- image part (negatives.images)

def image_main(argv: list[str] | None = None) -> int:
    """Counterfactual images on freshly drawn demo scenes (128 px, JPEG q95), one thread:
    negatives per second per editor and kind (generation only, candidates that got an image), the scorer's
    validation time as a fraction of generation time, and the preference rate before / after validation."""
    from demo.scenes import scene_batch
    from stages.models import load_clip
    from negatives.images import NegativesImageSpec, make_negatives, summarize

    ap = argparse.ArgumentParser(description=image_main.__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    table, ctx = scene_batch(args.scenes, args.seed)
    spec = NegativesImageSpec()
    clip = load_clip(spec.scorer, "cpu", "float32", threads=1)
    out, tm = make_negatives(table, spec, clip, contexts=ctx)
    print(f"{args.scenes} demo scenes, {out.num_rows} candidates; generate {tm['generate_s']:.2f} s "
          f"(negative captions included), validate {tm['validate_s']:.2f} s "
          f"= {tm['validate_s'] / max(tm['generate_s'], 1e-9):.2f}x generation")
    rows = out.select(["editor", "kind", "neg_image", "gen_ms"]).to_pylist()
    print(f"  {'editor':9s} {'kind':12s} {'made':>5s} {'negatives/s':>12s}")
    for key in sorted({(r["editor"], r["kind"]) for r in rows}):
        made = [r for r in rows if (r["editor"], r["kind"]) == key and r["neg_image"] is not None]
        if made:
            ms = sum(r["gen_ms"] for r in made)
            print(f"  {key[0]:9s} {key[1]:12s} {len(made):5d} {1000 * len(made) / max(ms, 1e-9):12,.0f}")
    print(f"  {'editor':9s} {'cands':>6s} {'made':>5s} {'kept':>5s} {'pref before':>12s} {'pref kept':>10s}  drops")
    for ed, s in summarize(out).items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"  {ed:9s} {s['candidates']:6d} {s['made']:5d} {s['kept']:5d} {fmt(s['preferred_before']):>12s} "
              f"{fmt(s['preferred_kept']):>10s}  {s['dropped']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "image":
        raise SystemExit(image_main(sys.argv[2:]))
    raise SystemExit(main())
