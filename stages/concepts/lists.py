"""Concept lists: what the balance stage matches captions against (MetaCLIP's "metadata").

A list is one block of entries per language; a concept's id is its position in the whole list (the blocks in the
order of `languages`), so counts per id are counts per (language, concept), as MetaCLIP 2 keeps them.

Sources (the stage's `concepts` parameter):
- "wordfreq" (the default): built at first use from the word-frequency lists the `wordfreq` package ships (~40
  languages), into $PAIRFORGE_CACHE/concepts/ (default ~/.cache/pairforge): the `max_words` most frequent words of
  the language that hold a letter, the numbers 0-99 (MetaCLIP 2 adds them to every language), and for English the
  multi-word object names of the caption lexicon (stages/nlp/lexicon.py: "hot dog", "teddy bears", "fire hydrant",
  ...: the part WordNet's multi-word synsets play in MetaCLIP's list). wordfreq ships unigrams only (no entry of
  any of its lists holds a space: its tokenizer splits on spaces), and no package in the stack ships phrase
  counts to derive PMI bigrams from, so the default has no Wikipedia-style bigrams or titles: for MetaCLIP's full
  list (WordNet, Wikipedia unigrams, bigrams and titles; ~500,000 entries) point `concepts` at its metadata.json.
- a file: one entry per line (.txt or any other suffix), or MetaCLIP's JSON: a list of entries (MetaCLIP's
  metadata.json) or an object whose keys are the entries (MetaCLIP 2's per-language files). "{lang}" in the path
  is replaced by each language's code (MetaCLIP 2's metadata_per_lang/{lang}.json); without it every language uses
  the same file (counted per language).
Entries are stripped; empty ones dropped; with case_sensitive false they are lowercased (captions are too) and
repeats within a language dropped, keeping the first.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

DEFAULT = "wordfreq"
# language codes as the language stage writes them (canonical) -> wordfreq's
WORDFREQ_CODES = {"no": "nb", "tl": "fil"}
NUMBERS = tuple(str(i) for i in range(100))
_LETTER = re.compile(r"[^\W\d_]")


class ConceptListError(ValueError):
    """A concept list that cannot be loaded (missing file, a language wordfreq has no list for, no entries)."""


@dataclass(frozen=True)
class ConceptList:
    source: str
    langs: tuple[str, ...]
    starts: tuple[int, ...]  # first id of each language's block, then the total
    entries: pa.Array  # string, by id

    def __len__(self) -> int:
        return len(self.entries)

    def block(self, lang_index: int) -> tuple[int, list[str]]:
        """(first id, entries) of one language's block."""
        a, b = self.starts[lang_index], self.starts[lang_index + 1]
        return a, self.entries.slice(a, b - a).to_pylist()

    def lang_of(self, ids: np.ndarray) -> np.ndarray:
        """The language index of each concept id."""
        return np.searchsorted(np.asarray(self.starts), ids, side="right") - 1

    def names(self, ids) -> pa.Array:
        return self.entries.take(pa.array(np.asarray(ids, np.int64)))

    @property
    def digest(self) -> str:
        """sha256 of the languages and entries: the ids a build stored mean these entries."""
        h = hashlib.sha256(json.dumps([self.langs, self.starts]).encode())
        for chunk in self.entries.buffers()[1:]:
            h.update(memoryview(chunk) if chunk is not None else b"")
        return h.hexdigest()


def cache_dir() -> Path:
    from stages.models.lm import cache_root

    return cache_root() / "concepts"


def wordfreq_entries(lang: str, max_words: int) -> list[str]:
    """The default list of one language (module docstring), built once into the cache."""
    import importlib.metadata

    import wordfreq

    code = WORDFREQ_CODES.get(lang, lang)
    if code not in wordfreq.available_languages("best"):
        raise ConceptListError(f"wordfreq has no word list for language {lang!r}; it has "
                               f"{', '.join(sorted(wordfreq.available_languages('best')))} (or give a concept file)")
    path = cache_dir() / f"wordfreq-{importlib.metadata.version('wordfreq')}-{code}-{max_words}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8").split("\n")
    words = [w for w in wordfreq.top_n_list(code, max_words, wordlist="best") if _LETTER.search(w)]
    extra = list(NUMBERS)
    if code == "en":
        from negatives.text.lexicon import NOUN_FORMS

        extra += sorted(f for f in NOUN_FORMS if " " in f)
    entries = list(dict.fromkeys(w.strip() for w in words + extra if w.strip() and "\n" not in w))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # whole or absent: written aside, then renamed
    tmp.write_text("\n".join(entries), encoding="utf-8")
    os.replace(tmp, path)
    return entries


def read_entries(path: Path) -> list[str]:
    """Entries of a concept file: one a line, or MetaCLIP's JSON (a list, or an object keyed by the entries)."""
    if not path.is_file():
        raise ConceptListError(f"concept file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConceptListError(f"concept file {path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = list(data)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ConceptListError(f"concept file {path}: expected a JSON list of strings or an object keyed by "
                                   f"the entries (MetaCLIP's metadata)")
        return data
    return text.splitlines()


def _clean(entries: list[str], case_sensitive: bool) -> list[str]:
    out = (e.strip() for e in entries)
    out = (e if case_sensitive else e.lower() for e in out if e)
    return list(dict.fromkeys(out))


@lru_cache(maxsize=4)
def load_concepts(source: str, languages: tuple[str, ...], max_words: int, case_sensitive: bool) -> ConceptList:
    """The concept list of a stage's params, once per process."""
    blocks = []
    for lang in languages:
        if source == DEFAULT:
            entries = wordfreq_entries(lang, max_words)
        else:
            entries = read_entries(Path(source.replace("{lang}", lang)))
        entries = _clean(entries, case_sensitive)
        if not entries:
            raise ConceptListError(f"concept list {source} has no entries for language {lang!r}")
        blocks.append(entries)
    starts = tuple(int(x) for x in np.cumsum([0] + [len(b) for b in blocks]))
    return ConceptList(source, tuple(languages), starts, pa.array([e for b in blocks for e in b], pa.string()))


__all__ = ["DEFAULT", "ConceptList", "ConceptListError", "load_concepts", "read_entries", "wordfreq_entries"]
