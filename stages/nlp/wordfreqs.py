"""Word frequencies of ~40 languages from `wordfreq`'s bundled lists, as one table (language and junk stages).

`word_table()` reads every wordfreq language that splits on spaces (not ja / zh / ko: their lists need MeCab or
jieba) down to zipf 3.0 (one occurrence per million words: the level every list reaches), and the 21 languages
with a large list (English among them) down to zipf 2.0, so that "dandelion" (2.9) is an English word and
"cenicero" (2.9) a Spanish one, into a sorted array of 64-bit word hashes and, per word, its (language, zipf x 10)
entries. About 2.8 million words, ~50 MB, built in ~5 s once per process; nothing is downloaded. Accented words
are also found written without their accents (`rows_unaccented`: alt text often drops them: "decoracion", "nino").

Zipf: log10 of a word's frequency per billion words (the: 7.7, house: 5.2, culottes: 2.3 in English).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MIN_ZIPF = 3.0
LARGE_MIN_ZIPF = 2.0  # how deep a language's large list is read (21 languages have one, English among them)
ABSENT_ZIPF = 2.5
NAME_MAX_PEAK = 1.0  # what a word missing from a list (below MIN_ZIPF there) counts as when comparing lists
# wordfreq code -> the code fastText and ISO 639-1 use
CANONICAL = {"fil": "tl", "nb": "no"}
SPACELESS = ("ja", "zh", "ko")  # their lists need a word segmenter: the language stage uses script for these


@dataclass(frozen=True)
class WordTable:
    langs: tuple[str, ...]
    keys: np.ndarray  # sorted uint64 hashes of the words
    starts: np.ndarray  # int64 (len(keys) + 1): word i's entries are [starts[i], starts[i + 1]) of the two below
    entry_lang: np.ndarray  # uint8: the language (index into langs) of each entry
    entry_zipf10: np.ndarray  # uint8: its zipf x 10
    name_like: np.ndarray  # bool per word: in at least half the lists, its top zipf < NAME_MAX_PEAK above its median
    common: np.ndarray  # bool per word: in some list at zipf >= MIN_ZIPF (not only in a large list's depths)
    folded_keys: np.ndarray  # sorted uint64 hashes of accented words with their accents dropped ("decoracion")
    folded_rows: np.ndarray  # the row of the accented word each folded key stands for

    def zipf10(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), len(langs)): zipf x 10 of each row's word per language, 0 where the word is not in that
        list (and for row -1). Kept sparse: a word is in a few of the ~40 lists."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(rows), len(self.langs)), np.uint8)
        found = np.flatnonzero(rows >= 0)
        begin, end = self.starts[rows[found]], self.starts[rows[found] + 1]
        counts = end - begin
        at = np.repeat(begin - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        out[np.repeat(found, counts), self.entry_lang[at]] = self.entry_zipf10[at]
        return out

    def rows(self, words: list[str]) -> np.ndarray:
        """Row index of each (lowercased) word, -1 for words in no list."""
        return _lookup(self.keys, None, words)

    def rows_unaccented(self, words: list[str]) -> np.ndarray:
        """Row of each (lowercased) word written without its accents ("decoracion", "nino", "Diésel" -> "diesel"),
        -1 where neither the word without accents nor an accented word that folds to it is in a list."""
        folded = [fold_accents(w) for w in words]
        r = _lookup(self.keys, None, folded)
        miss = np.flatnonzero(r < 0)
        if len(miss):
            r[miss] = _lookup(self.folded_keys, self.folded_rows, [folded[i] for i in miss])
        return r

    def describes(self, words: list[str]) -> np.ndarray:
        """Per (casefolded) word: in some list at zipf >= MIN_ZIPF, and not name-like."""
        r = self.rows(words)
        hit = r >= 0
        out = np.zeros(len(words), bool)
        out[hit] = self.common[r[hit]] & ~self.name_like[r[hit]]
        return out


class _AccentFolding(dict):
    """str.translate table: a code point -> its NFKD decomposition without combining marks, made when first met."""

    def __missing__(self, code: int) -> str:
        folded = "".join(c for c in unicodedata.normalize("NFKD", chr(code)) if not unicodedata.combining(c))
        self[code] = folded
        return folded


_FOLDING = _AccentFolding()


def fold_accents(word: str) -> str:
    """The word without combining accents ("decoración" -> "decoracion"); other letters stay."""
    return word if word.isascii() else word.translate(_FOLDING)


def _lookup(keys: np.ndarray, values: np.ndarray | None, words: list[str]) -> np.ndarray:
    if not words or not len(keys):
        return np.full(len(words), -1, np.int64)
    h = np.fromiter((hash(w) for w in words), np.int64, len(words)).view(np.uint64)
    pos = np.searchsorted(keys, h)
    pos[pos == len(keys)] = 0
    hit = keys[pos] == h
    return np.where(hit, pos if values is None else values[pos], -1).astype(np.int64)


def _name_like(table: WordTable) -> np.ndarray:
    """Names and brands are about as frequent in every list (jeff: 4.4 in English, ~4.0 in 26 other lists), while a
    word stands out in its own languages (section: 5.0 in English, absent from most). Absent counts ABSENT_ZIPF."""
    n, n_langs = len(table.keys), len(table.langs)
    out = np.zeros(n, bool)
    for start in range(0, n, 200_000):
        z = table.zipf10(np.arange(start, min(n, start + 200_000)))
        z[z < round(MIN_ZIPF * 10)] = 0  # judged on the lists' common words alone, as deep as every list goes
        present = (z > 0).sum(axis=1)
        filled = np.where(z > 0, z, np.uint8(ABSENT_ZIPF * 10))
        median = np.partition(filled, n_langs // 2, axis=1)[:, n_langs // 2]
        peak = (z.max(axis=1).astype(np.int16) - median) / 10.0
        out[start:start + 200_000] = (present * 2 >= n_langs) & (peak < NAME_MAX_PEAK)
    return out


@lru_cache(maxsize=1)
def word_table() -> WordTable:
    import wordfreq

    files = wordfreq.available_languages(wordlist="best")  # language -> its list's file
    langs = sorted(c for c in files if c not in SPACELESS)
    hashes, cols, values, accented, folded = [], [], [], [], []
    for j, lang in enumerate(langs):
        floor = LARGE_MIN_ZIPF if "large_" in str(files[lang]) else MIN_ZIPF
        # read_cBpack, not get_frequency_list: that one caches whole lists (~1 GB for all of them)
        for i, bucket in enumerate(wordfreq.read_cBpack(files[lang])):
            z = 9.0 - i / 100.0  # bucket i holds words of frequency 10^(-i/100)
            if z < floor:
                break
            if bucket:
                hashes.append(np.fromiter((hash(w) for w in bucket), np.int64, len(bucket)))
                cols.append(np.full(len(bucket), j, np.int16))
                values.append(np.full(len(bucket), round(z * 10), np.uint8))
                for w in bucket:
                    if not w.isascii():
                        f = fold_accents(w)
                        if f != w:
                            accented.append(hash(w))
                            folded.append(hash(f))
    h = np.concatenate(hashes).view(np.uint64)
    keys, inverse = np.unique(h, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.zeros(len(keys) + 1, np.int64)
    np.cumsum(np.bincount(inverse, minlength=len(keys)), out=starts[1:])
    # accent-free spellings: folded hash -> row of the (first, most frequent) accented word that folds to it
    fk, first = np.unique(np.array(folded, np.int64).view(np.uint64), return_index=True)
    fr = _lookup(keys, None, []) if not len(fk) else np.searchsorted(keys, np.array(accented, np.int64).view(
        np.uint64)[first])
    table = WordTable(tuple(CANONICAL.get(c, c) for c in langs), keys, starts,
                      np.concatenate(cols)[order].astype(np.uint8), np.concatenate(values)[order],
                      np.zeros(len(keys), bool), np.zeros(len(keys), bool), fk, fr.astype(np.int64))
    table.name_like[:] = _name_like(table)
    table.common[:] = np.maximum.reduceat(table.entry_zipf10, starts[:-1]) >= round(MIN_ZIPF * 10)
    return table
