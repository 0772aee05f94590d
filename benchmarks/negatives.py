"""Benchmark of hard-negative generation (text part: stages.negatives_text). Run on demand, not a test:

    .venv/bin/python benchmarks/negatives.py [--captions N] [--repeat R]

On the distinct COCO captions of SugarCrepe (or demo captions when those files are absent), one core:
- rule negatives per second per kind (parse + generate, first candidate), and the share of captions that get one;
- the stage's throughput with its defaults (k-fold n-gram LMs, plausibility selection over a pool of candidates,
  blind check): captions per second and negatives per second.
An image part (rendering negatives for the demo scenes) may be added beside this one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from flows.negatives_report import SUGARCREPE, coco_captions, demo_captions, load_sugarcrepe  # noqa: E402
from schemas.spec import NegativesTextParams  # noqa: E402
from stages.negatives_text import KINDS, NegativesTextStage, negatives_for, parse  # noqa: E402


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


if __name__ == "__main__":
    raise SystemExit(main())
