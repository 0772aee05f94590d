"""Captions matched against a concept list by substring, with word boundaries as MetaCLIP defines them.

Followed from facebookresearch/MetaCLIP (metaclip/substr_matching.py and, for MetaCLIP 2,
metaclip/curation/substr_matching.py):
- the caption is spaced: " " + caption + " ", each of , . ; : ? ! ` wrapped in spaces, tab / newline / CR made
  spaces (`spacing`);
- an entry is matched as " entry ": a space added before it unless its first character is CJK-like (CJK, Thai,
  Lao, Burmese, Khmer, Tibetan) or punctuation, and after it likewise for its last character (`spaced_entry`), so
  "cat" matches "a cat." and "cat, dog" but not "cats" or "concatenate", and entries of scripts written without
  spaces match anywhere;
- every occurrence counts, overlapping ones too (Aho-Corasick's standard matching, MetaCLIP's `automaton.iter`);
  a caption's concepts are the distinct entries found.
One difference, a parameter: MetaCLIP matches case-sensitively; here `case_sensitive: false` (the default) lowercases
captions and entries (wordfreq's lists are lowercase). Set it true to match MetaCLIP's metadata as MetaCLIP does.

The automaton is ahocorasick-rs (Rust `aho-corasick`), one per language block, built once per process
(`matcher_for`, cached) and run once per batch over all its captions: the spaced captions, joined with a NUL
between them, are one haystack read straight from the Arrow buffer; match offsets map back to rows by a
searchsorted over the captions' offsets. No Python loop runs per caption.
"""
from __future__ import annotations

import string
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.concepts.lists import ConceptList, load_concepts
from stages.steps import distinct

PUNCT_WRAP = (",", ".", ";", ":", "?", "!", "`")
TO_SPACE = ("\t", "\n", "\r")
SEP = "\x00"  # between two captions of a haystack: no entry holds it, so no match spans two captions
_MORE_PUNCT = set("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")
_CJK_LIKE = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
             (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
             (0x2FF0, 0x2FFF), (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF),
             (0x0F00, 0x0FFF))


def spacing(text: str) -> str:
    """MetaCLIP's spacing of one caption (the reference the vectorised `spaced_column` follows)."""
    out = f" {text} "
    for p in PUNCT_WRAP:
        out = out.replace(p, f" {p} ")
    for c in TO_SPACE:
        out = out.replace(c, " ")
    return out


def spaced_column(texts: pa.Array, lower: bool) -> pa.Array:
    """spacing() of every caption (nulls as ""), lowercased when `lower`, each followed by SEP."""
    t = pc.fill_null(texts.cast(pa.large_string()), "")
    if lower:
        t = pc.utf8_lower(t)
    for p in PUNCT_WRAP:
        t = pc.replace_substring(t, p, f" {p} ")
    for c in TO_SPACE:
        t = pc.replace_substring(t, c, " ")
    edge = lambda s: pa.scalar(s, pa.large_string())  # noqa: E731
    return pc.binary_join_element_wise(edge(" "), t, edge(" " + SEP), edge(""))


def _unspaced_end(ch: str) -> bool:
    """MetaCLIP 2's is_cjk_or_similar: an entry edge that gets no space."""
    cp = ord(ch)
    return any(a <= cp <= b for a, b in _CJK_LIKE) or ch in string.punctuation or ch in _MORE_PUNCT


def spaced_entry(entry: str) -> str:
    out = entry if _unspaced_end(entry[0]) else f" {entry}"
    return out if _unspaced_end(entry[-1]) else f"{out} "


class Matcher:
    """Concept ids of captions, one automaton per language block of a ConceptList."""

    def __init__(self, concepts: ConceptList, case_sensitive: bool):
        import ahocorasick_rs

        self.concepts = concepts
        self.lower = not case_sensitive
        self.automata = []
        for k in range(len(concepts.langs)):
            first, entries = concepts.block(k)
            patterns = [spaced_entry(e).encode() for e in entries]
            self.automata.append((first, ahocorasick_rs.BytesAhoCorasick(
                patterns, matchkind=ahocorasick_rs.MatchKind.Standard)))

    def match(self, texts: pa.Array | pa.ChunkedArray, lang_index: np.ndarray | None = None) -> pa.ListArray:
        """list<int32> of each caption's distinct concept ids (sorted); lang_index: each row's language block
        (None: the first)."""
        texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
        n = len(texts)
        if lang_index is None:
            lang_index = np.zeros(n, np.int64)
        rows_parts, ids_parts = [], []
        for k, (first, automaton) in enumerate(self.automata):
            rows = np.flatnonzero(lang_index == k)
            if not rows.size:
                continue
            r, i = self._match_block(texts.take(pa.array(rows)), automaton)
            rows_parts.append(rows[r])
            ids_parts.append(i + first)
        rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, np.int64)
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        key = distinct(rows * np.int64(len(self.concepts)) + ids)  # distinct (row, id), by row then id
        rows, ids = key // len(self.concepts), key % len(self.concepts)
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int32)))

    def _match_block(self, texts: pa.Array, automaton) -> tuple[np.ndarray, np.ndarray]:
        """(row, pattern index) of every match in the captions (rows of `texts`)."""
        spaced = spaced_column(texts, self.lower)
        if isinstance(spaced, pa.ChunkedArray):
            spaced = spaced.combine_chunks()
        offsets = np.frombuffer(spaced.buffers()[1], np.int64)[spaced.offset:spaced.offset + len(spaced) + 1]
        data = spaced.buffers()[2]
        lo, hi = int(offsets[0]), int(offsets[-1])
        if hi == lo:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        found = automaton.find_matches_as_indexes(memoryview(data).cast("B")[lo:hi], overlapping=True)
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        m = np.array(found, dtype=np.int64)
        rows = np.searchsorted(offsets - lo, m[:, 1], side="right") - 1
        return rows, m[:, 0]


@lru_cache(maxsize=2)
def matcher_for(source: str, languages: tuple[str, ...], max_words: int, case_sensitive: bool) -> Matcher:
    """The matcher of a stage's params, built once per process (worker), not per batch."""
    return Matcher(load_concepts(source, languages, max_words, case_sensitive), case_sensitive)


__all__ = ["Matcher", "matcher_for", "spaced_column", "spaced_entry", "spacing"]
