"""The recaption stage: the faithfulness gate on hand-built cases, the GGUF -> safetensors cache, and the real
SmolLM2-135M-Instruct rewriting real captions (demo scenes, COCO captions from SugarCrepe, LAION alt text).

Generation is the slow part on 2 shared cores (about 1-2 s a caption with the 6-example prompt), so the real-caption
test uses 16 demo + 8 COCO + 8 LAION captions; benchmarks/recaption.py --report runs 200 + 50 + 50.
Run with -s to see the measured numbers.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.columns import stage_fields
from schemas.spec import parse_spec
from stages import stage_class
from stages.base import StageConfigError
from stages.nlp.faithfulness import (
    GateConfig,
    added_names,
    facts,
    judge,
    lexical_violations,
    reason_code,
    repeated_words,
)
from stages.recaption import RecaptionExample, RecaptionParams, RecaptionStage, build_prompts, clean_output, summarize
from tests.realdata import LAION
from tests.realdata import SUGARCREPE_FILES as SUGARCREPE

CFG = GateConfig()


# --------------------------------------------------------------------------- the gate, no model

@pytest.mark.parametrize("original, rewrite, reason", [
    ("A cat and dog napping together on the couch.",
     "A cat and a dog napping together under a blanket on the couch.", "added_object:blanket"),
    ("A plate is filled with broccoli and noodles.", "A plate is filled with broccoli and a bowl of noodles.",
     "added_object:bowl"),
    ("three small black squares", "Three small black squares are placed on a table.", "added_object:table"),
    ("Two zebras are battling each other on hind legs.", "Three zebras fight on their hind legs.",
     "changed_number:3"),
    ("two dogs on the grass", "One dog on the grass.", "changed_number:1"),
    ("a dog on the grass", "A dog sits on the grass with 3 balls.", "added_object:ball"),
    ("a dog on the grass", "A dog resting on the grass, 3 of them.", "added_number:3"),
    ("two red diamonds below a large yellow star", "A red diamond below a large yellow star.",
     "changed_number:diamond singular"),
    ("A tan toilet and sink combination in a small room.", "A white toilet and sink combination in a small room.",
     "changed_colour:white"),
    ("dog on beach sunset pic 2019", "A golden dog on the beach at sunset in 2019.", "added_colour:gold"),
    ("a yellow star above a small green triangle", "A small green triangle above a yellow star.",
     "changed_relation:triangle above star"),
    ("a red circle and a blue square", "A red circle above a blue square.", "added_relation:above"),
    ("Yes I'm Single", "Yes, I'm not single.", "added_negation"),
    ("Hogsmeade Station", "Hogsmeade station in London.", "added_name:London"),
    ("a large orange square", "A large orange square is a large, large square.", "repetition:large"),
    ("a red diamond", "A red diamond is a rare gemstone.", "added_words:rare,gemstone"),
    ("three large blue squares", "Three large blue squares.", "echo"),
    ("a red circle", "Circle.", "too_short:1"),
])
def test_gate_rejects_with_its_reason(original, rewrite, reason):
    assert judge(original, rewrite, CFG) == reason
    assert reason_code(reason) == reason.split(":")[0]


@pytest.mark.parametrize("original, rewrite", [
    ("a yellow star above a small green triangle", "A small green triangle sits below a yellow star."),
    ("A brown dog standing on a wooden bench near a lemon tree.",
     "A brown dog stands on a wooden bench near a lemon tree."),
    ("A tan toilet and sink combination in a small room.", "A small room with a tan toilet and sink combination."),
    ("a dog on the beach", "One dog on a beach."),  # "one" where the original states no number
    ("hot dogs on a plate", "A plate with hot dogs."),  # a hot dog is not a dog
    ("A man riding a bike", "A guy riding a bicycle."),  # folded synonyms
    ("twenty-one candles on a cake", "A cake with 21 candles."),
    ("an orange cat on a sofa", "An orange cat lying on a couch."),
    ("Tavern Brawl by velinov", "A tavern brawl."),  # dropping a detail is allowed
])
def test_gate_keeps_faithful_paraphrases(original, rewrite):
    assert lexical_violations(original, rewrite) == []
    assert judge(original, rewrite, CFG) is None


def test_gate_concepts_allow_fused_facts():
    # fuse mode: facts from the visual concepts are not additions
    assert judge("IMG_0042", "A black cat sleeping on a sofa.", CFG) is not None
    assert judge("IMG_0042", "A black cat sleeping on a sofa.", CFG,
                 concepts="a black cat sleeping on a sofa") is None


def test_gate_model_checks():
    ok = ("a red circle above a blue square", "A blue square below a red circle.")
    assert judge(*ok, CFG, similarity=0.9, lang=("en", 0.99), score=0.30, score_original=0.31) is None
    assert judge(*ok, CFG, similarity=0.5) == "low_similarity:0.50"
    assert judge(*ok, CFG, similarity=0.9, score=0.20, score_original=0.31) == "score_drop:-0.110"
    assert judge(*ok, CFG, lang=("de", 0.95)) == "language:de"
    assert judge(*ok, CFG, lang=("de", 0.30)) is None  # the detector is unsure: the language stage's rule
    assert judge(*ok, GateConfig(max_words=4)) == "too_long:7"
    assert judge("x", "   ", CFG) == "empty"


def test_lexicons():
    f = facts("Two giraffes, a red bus and twenty-one people to the left of 3 dogs")
    assert {"giraffe", "bus", "person", "dog"} <= f.objects
    assert f.numbers == {2.0, 21.0, 3.0} and f.colours == {"red"}
    assert f.relations == (("person", "left", "dog"),)
    assert added_names("Yale-New Haven Children's Hospital", "The Yale-New Haven Children's Hospital.") == []
    assert repeated_words("a sign and a sign", "a sign and a sign") == []


def test_real_sentence_encoder_similarity():
    from stages.recaption import SentenceEncoder

    enc = SentenceEncoder()
    sims = enc.cosine(["A brown dog standing on a wooden bench near a lemon tree.", "Hogsmeade Station"],
                      ["A brown dog stands on a wooden bench near a lemon tree.",
                       "A plate of broccoli and noodles."])
    assert sims[0] > 0.9 and sims[1] < 0.3, sims


def test_clean_output():
    assert clean_output('Rewrite: "A dog on a beach."') == "A dog on a beach."
    assert clean_output("Here is the rewritten caption: A red circle.") == "A red circle."
    assert clean_output("  “A cat on a mat.”  ") == "A cat on a mat."
    assert clean_output("Caption: 'two hearts'") == "two hearts"
    assert clean_output("A dog's toy.") == "A dog's toy."


# --------------------------------------------------------------------------- spec, columns, decide, preflight

def test_spec_columns_and_registry(tmp_path):
    urls = tmp_path / "u.csv"
    urls.write_text("url,caption\nhttp://x/a.jpg,a\n")
    spec = parse_spec({"dataset": "d", "source": {"urls": str(urls)},
                       "stages": [{"recaption": {"mode": "rewrite", "n": 1, "cpus": 0.5, "pool_size": 1}}]})
    p = spec.stage_params("recaption")
    assert isinstance(p, RecaptionParams) and p.model == "smollm2-135m" and p.require_rewrite is False
    assert stage_class("recaption") is RecaptionStage
    assert [f.name for f in stage_fields("recaption")] == ["recaptions", "recaption_rejects"]
    prompts = build_prompts(RecaptionParams(n=3))
    assert len({pr.prompt_id for pr in prompts}) == 3 and prompts[1].examples[0] == prompts[0].examples[1]
    custom = build_prompts(RecaptionParams(examples=[RecaptionExample(original="a", rewrite="b")]))
    assert custom[0].prompt_id != prompts[0].prompt_id


def _decided(rows: list[list[dict]], **kw):
    struct = stage_fields("recaption")
    t = pa.table({"recaptions": pa.array(rows, struct[0].type),
                  "recaption_rejects": pa.array([[{"text": "x", "reason": "echo"}]] * len(rows), struct[1].type)})
    return RecaptionStage.decide(t, RecaptionParams(**kw))


def test_decide_keeps_every_pair_unless_required():
    kept = [{"text": "A dog.", "model": "m", "mode": "rewrite", "prompt_id": "p", "similarity": 0.9,
             "score": None, "score_original": None}]
    d = _decided([kept, []])
    assert d.reason == [None, None]
    d = _decided([kept, []], require_rewrite=True)
    assert d.reason == [None, "no_faithful_rewrite"] and d.detail[1] == "first candidate: echo"


def test_preflight(tmp_path):
    with pytest.raises(StageConfigError, match="recaption: model 'no-such-lm' cannot be loaded"):
        RecaptionStage(RecaptionParams(model="no-such-lm", score_model=None)).preflight()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(StageConfigError, match="has no weights"):
        RecaptionStage(RecaptionParams(model=str(tmp_path), score_model=None)).preflight()
    with pytest.raises(StageConfigError, match="score|cannot be loaded"):
        RecaptionStage(RecaptionParams(score_model="no-such-clip")).preflight()
    stage = RecaptionStage(RecaptionParams(score_model=None))
    stage.preflight()  # the shipped GGUF is found without importing its package
    meta = stage.metadata()
    assert meta["model"] == "smollm2-135m" and meta["score_model"] is None and "score_note" in meta


# --------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory):
    """A fresh cache: the first load converts the GGUF, the second reads the converted folder."""
    from stages.models.lm import SMOLLM2, load_lm

    old = os.environ.get("PAIRFORGE_CACHE")
    os.environ["PAIRFORGE_CACHE"] = str(tmp_path_factory.mktemp("pairforge-cache"))
    try:
        t0 = time.perf_counter()
        cold = load_lm(SMOLLM2, "cpu", "float32", threads=1)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = load_lm(SMOLLM2, "cpu", "float32", threads=1)
        warm_s = time.perf_counter() - t0
        del cold
        yield {"cold_s": cold_s, "warm_s": warm_s, "lm": warm, "cache": Path(os.environ["PAIRFORGE_CACHE"])}
    finally:
        if old is None:
            os.environ.pop("PAIRFORGE_CACHE", None)
        else:
            os.environ["PAIRFORGE_CACHE"] = old


def test_gguf_converted_once_then_loaded_from_cache(lm_cache):
    from safetensors import safe_open

    lm = lm_cache["lm"]
    folder = Path(lm.location)
    assert folder.parent == lm_cache["cache"] / "lm" and folder.name.startswith("smollm2-135m-")
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
              "pairforge_source.json"):
        assert (folder / f).is_file(), f
    src = json.loads((folder / "pairforge_source.json").read_text())
    assert src["tensors"] == 272 and src["dropped_tied_lm_head"] is True
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in fh.keys() and len(list(fh.keys())) == 272
    assert lm.load_info == {"converted": False, "folder": str(folder)}
    print(f"\nSmolLM2 load: cold (GGUF -> cache) {lm_cache['cold_s']:.1f}s, from the cache {lm_cache['warm_s']:.2f}s")
    assert lm_cache["warm_s"] < lm_cache["cold_s"] / 5
    # the tied lm_head came back
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def stage(lm_cache):
    st = RecaptionStage(RecaptionParams(threads=1, max_new_tokens=32, score_model="demo-clip"))
    st.setup()
    assert st.lm.location == lm_cache["lm"].location  # the module's fresh cache
    yield st
    st.teardown()


def _coco(n: int) -> list[str]:
    out = []
    for f in SUGARCREPE:
        out += [d["caption"].strip() for d in json.loads(Path(f).read_text()).values()][:2]
    return out[:n]


def _laion_english(n: int) -> list[str]:
    from stages.language import LanguageDetector

    det = LanguageDetector()
    out = []
    for t in pq.read_table(LAION)["TEXT"].to_pylist():
        lang, _, words = det.detect_one(t)
        if lang == "en" and words >= 3:
            out.append(t)
        if len(out) == n:
            break
    return out


# Measured with benchmarks/recaption.py --report (defaults: sampling T=0.8, seed 0, max_new_tokens 32, this gate,
# demo-clip scoring the demo captions) on the same 200 demo pairs (demo.scenes.sample_pairs(200)): kept
# 28/200 = 14% (rejects: echo 52, added_object 28, score_drop 27, repetition 20, changed_number 16,
# changed_relation 12 ...), mean image-text score change of the kept rewrites -0.015 (the bag-of-words demo scorer
# likes its own caption template best, so a faithful paraphrase loses a little); 17/50 = 34% of English LAION alt
# texts, 21/50 = 42% of COCO captions. This test (uids given, so other sampling seeds): kept 31/200 = 16%, mean
# change -0.008; real captions 6/16. The bounds leave room for float differences between machines; a broken
# prompt or gate lands outside them (0%, most, or a mean drop near max_score_drop).
DEMO_KEPT_BOUNDS = (0.07, 0.30)
DEMO_SCORE_CHANGE_BOUNDS = (-0.035, 0.01)
REAL_KEPT_BOUNDS = (0.10, 0.70)  # 16 real captions: measured 38% over the 100 of the report


def _check_kept(stage, kept, name):
    for row in kept:
        for c in row:  # what is kept passed the gate and is recorded with its provenance
            assert c["mode"] == "rewrite" and c["model"] == "smollm2-135m"
            assert c["prompt_id"].startswith("rewrite/0/") and c["similarity"] >= stage.params.min_similarity
            if c["score"] is not None:
                assert c["score"] - c["score_original"] >= -stage.params.max_score_drop
            else:
                assert name != "demo"


def test_demo_captions_kept_share_and_score_change(stage):
    """Issue 5's figure: the embedded SmolLM2 rewriting 200 demo captions, scored by the shipped demo scorer."""
    from demo.scenes import sample_pairs

    assert stage.scorer is not None and stage.score_model == "demo-clip"
    images, texts = sample_pairs(200)
    t0 = time.perf_counter()
    kept, rejected = stage.rewrite(texts, uids=[f"demo-{i}" for i in range(200)], images=images)
    s = summarize(kept, rejected)
    print(f"\n200 demo captions in {time.perf_counter() - t0:.0f}s: kept {s['kept']}/{s['candidates']} = "
          f"{s['kept_share']:.0%}, mean score change {s['mean_score_change']} over {s['scored']}; "
          f"rejects {s['reasons']}")
    assert s["candidates"] == 200 and s["scored"] == s["kept"]  # n=1; every kept demo rewrite is scored
    _check_kept(stage, kept, "demo")
    assert DEMO_KEPT_BOUNDS[0] <= s["kept_share"] <= DEMO_KEPT_BOUNDS[1], s
    assert DEMO_SCORE_CHANGE_BOUNDS[0] <= s["mean_score_change"] <= DEMO_SCORE_CHANGE_BOUNDS[1], s
    assert {"echo", "added_object", "score_drop"} <= set(s["reasons"])  # the gate's main reasons all fire


def test_real_captions_kept_share(stage):
    sets = {"coco": _coco(8), "laion": _laion_english(8)}
    assert len(sets["coco"]) == 8 and len(sets["laion"]) == 8
    kept_n = cand_n = 0
    for name, texts in sets.items():
        kept, rejected = stage.rewrite(texts, uids=[f"{name}-{i}" for i in range(len(texts))])
        s = summarize(kept, rejected)
        print(f"\n{name}: kept {s['kept']}/{s['candidates']} = {s['kept_share']:.0%}; rejects {s['reasons']}")
        assert s["candidates"] == len(texts) and s["scored"] == 0  # no images: no score
        _check_kept(stage, kept, name)
        kept_n += s["kept"]
        cand_n += s["candidates"]
    assert REAL_KEPT_BOUNDS[0] <= kept_n / cand_n <= REAL_KEPT_BOUNDS[1]


def test_sampling_is_seeded_and_batch_independent(lm_cache):
    st = RecaptionStage(RecaptionParams(threads=1, max_new_tokens=12, score_model=None, do_sample=True, seed=7,
                                        generate_batch_size=3))
    st.lm = lm_cache["lm"]
    st.encoder = _encoder()
    from stages.language import LanguageDetector

    st.detector = LanguageDetector()
    texts = ["a red circle above two blue squares", "A brown dog standing on a wooden bench.",
             "Vintage blue ceramic vase"]
    uids = ["u0", "u1", "u2"]

    def run(ts, us, **kw):
        st.params = st.params.model_copy(update=kw)
        kept, rej = st.rewrite(ts, uids=us)
        return {u: (k[0]["text"] if k else r[0]["text"]) for u, k, r in zip(us, kept, rej)}

    a = run(texts, uids)
    b = run(texts[::-1], uids[::-1], generate_batch_size=1)  # other order, batches of one
    assert a == b
    c = run(texts, uids, seed=8)
    assert c != a
    st.params = st.params.model_copy(update={"do_sample": False, "share_prefix": True})
    g1 = run(texts, uids)
    g2 = run(texts, uids, share_prefix=False)  # every prompt prefilled in full: the same tokens
    assert g1 == g2


_ENC = None


def _encoder():
    global _ENC
    if _ENC is None:
        from stages.recaption import SentenceEncoder

        _ENC = SentenceEncoder()
    return _ENC


def _jpeg(im) -> bytes:
    import io

    b = io.BytesIO()
    im.convert("RGB").save(b, "JPEG")
    return b.getvalue()


def test_process_batch_with_images_and_a_scorer(lm_cache, tmp_path):
    from demo.scenes import caption, render_scene, sample_scene
    from tests.test_align import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(2)]
    images = [_jpeg(render_scene(s, 64, i)) for i, s in enumerate(scenes)] + [None, None]
    texts = [caption(s) for s in scenes] + ["A brown dog standing on a wooden bench.", None]
    batch = pa.table({"uid": [f"{i:032x}" for i in range(4)], "text": pa.array(texts, pa.string()),
                      "image": pa.array(images, pa.binary())})
    st = RecaptionStage(RecaptionParams(threads=1, max_new_tokens=24, score_model=str(clip), max_score_drop=2.0,
                                        n=2))
    st.setup()
    out = st(batch)
    assert out.column("text").to_pylist() == texts  # never overwritten
    assert out.schema.field("recaptions").type == stage_fields("recaption")[0].type
    kept = out.column("recaptions").to_pylist()
    rejected = out.column("recaption_rejects").to_pylist()
    assert kept[3] == [] and rejected[3] == []  # no caption: nothing generated
    for i in range(3):
        assert len(kept[i]) + len(rejected[i]) == 2  # n=2 candidates, two prompts
    for c in [c for row in kept[:2] for c in row]:
        assert c["score"] is not None and c["score_original"] is not None
    for c in kept[2]:
        assert c["score"] is None  # no image
    traced = [t for t in st.trace if t["row"] < 2]
    assert traced and all(t["score_original"] is not None for t in traced)
    meta = st.metadata()
    assert meta["score_model"] == str(clip) and meta["location"] == lm_cache["lm"].location


def _tiny_captioner(folder: Path) -> Path:
    """A random VisionEncoderDecoder (tiny ViT + tiny GPT-2) with a byte-level tokenizer: plumbing only."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2TokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    vocab = {chr(c): i for i, c in enumerate(range(ord("a"), ord("z") + 1))}  # printable only: it decodes to text
    for t in ("\u0120", "<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    folder.mkdir(parents=True)
    tok = GPT2TokenizerFast(vocab=vocab, merges=[], bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>")
    enc = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8)
    dec = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                     bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = vocab["<|startoftext|>"]
    cfg.pad_token_id = vocab["<|endoftext|>"]
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(cfg).eval()
    model.generation_config.decoder_start_token_id = cfg.decoder_start_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.min_new_tokens = 4  # random weights: do not let it end at once
    model.generation_config.suppress_tokens = [vocab["<|startoftext|>"], vocab["<|endoftext|>"]]
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_fuse_concepts_from_ocr_column_or_a_captioner(lm_cache, tmp_path):
    from PIL import Image

    from stages.recaption import ConceptCaptioner

    st = RecaptionStage(RecaptionParams(mode="fuse", threads=1, max_new_tokens=24, score_model=None))
    st.lm = lm_cache["lm"]
    st.encoder = _encoder()
    from stages.language import LanguageDetector

    st.detector = LanguageDetector()
    batch = pa.table({"uid": ["a", "b"], "text": ["Summer poster", "handmade mug"],
                      "ocr_text": pa.array(["SUMMER SALE 50% OFF", None], pa.string())})
    out = st(batch)
    kept, rej = out.column("recaptions").to_pylist(), out.column("recaption_rejects").to_pylist()
    assert len(kept[0]) + len(rej[0]) == 1 and all(c["mode"] == "fuse" for c in kept[0])
    assert kept[1] == [] and rej[1] == [{"text": None, "reason": "no_visual_concepts"}]
    # an image-to-text model gives the concepts when the column is absent (random tiny model: plumbing only)
    import torch

    cap = ConceptCaptioner(str(_tiny_captioner(tmp_path / "cap")), torch.device("cpu"), torch.float32, 6)
    st.captioner = cap
    im = Image.new("RGB", (40, 40), (200, 30, 30))
    got = st._concepts(pa.table({"text": ["x", "y"]}), [im, None])
    assert isinstance(got[0], str) and got[0] and got[1] is None


def test_stage_runs_inside_a_real_build(lm_cache, tmp_path):
    """The demo build (Prefect flow, local Ray, loopback server) with recaption as an actor-pool stage, on the
    first 16 rows of a 200-row demo corpus (about 90 s here). Ray workers inherit PAIRFORGE_CACHE, so the actor
    loads the module's converted model."""
    from flows.build import build_flow
    from demo.server import DemoServer
    from tests.builds import make_demo, read_parts

    d = make_demo(tmp_path, 200, stages=[
        {"basic": {"min_side": 48, "max_aspect": 3.0, "min_words": 3, "min_chars": 6}},
        {"recaption": {"mode": "rewrite", "n": 1, "cpus": 0.5, "pool_size": 1, "batch_size": 16,
                       "max_new_tokens": 32, "score_model": "demo-clip"}}])
    urls = pq.read_table(d["corpus"] / "urls.parquet")
    pq.write_table(urls.slice(0, 16), d["corpus"] / "urls.parquet")
    with DemoServer(d["corpus"], port=d["port"]):
        result = build_flow(str(d["spec"]), quiet=True)
    build_dir = Path(result["build_dir"])
    t = read_parts(build_dir, "shards", ["uid", "text", "recaptions", "recaption_rejects"])
    rejects = read_parts(build_dir, "rejects", ["uid", "stage", "reason"])
    assert "recaption" not in rejects.column("stage").to_pylist()  # the stage never rejects a pair by default
    rows = t.to_pylist()
    assert rows and all(len(r["recaptions"]) + len(r["recaption_rejects"]) == 1 for r in rows)
    kept = [c for r in rows for c in r["recaptions"]]
    print(f"\nbuild: {len(rows)} pairs kept, {len(kept)} with a rewrite; "
          f"rejects {summarize([r['recaptions'] for r in rows], [r['recaption_rejects'] for r in rows])['reasons']}")
    meta = json.loads((build_dir / "manifest.json").read_text())["stage_metadata"]["recaption"]
    assert meta["model"] == "smollm2-135m" and meta["mode"] == "rewrite" and meta["prompt_ids"]
