"""Is a text a usable negative of its caption, of a given kind? (Used on LM output; rule negatives pass by
construction.) And where does it differ from the caption (edit_span)?"""
from __future__ import annotations

import difflib
from collections import Counter

from negatives.text import grammar as G
from negatives.text import lexicon as L
from negatives.text.tokens import caption_key, words

def edit_span(pos: str, neg: str) -> tuple[int, int, str]:
    """Smallest [start, end) of pos, on word boundaries, that neg replaces; and the replacing text."""
    a, b = pos, neg
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    while i > 0 and (a[i - 1].isalnum() or (i < len(a) and a[i].isalnum() and a[i - 1] in "-'")):
        i -= 1
    j = 0
    while j < min(len(a), len(b)) - i and a[len(a) - 1 - j] == b[len(b) - 1 - j]:
        j += 1
    while j > 0 and a[len(a) - j].isalnum():
        j -= 1
    return i, len(a) - j, b[i:len(b) - j]


def validate_negative(pos: str, neg: str, kind: str) -> str | None:
    """Why `neg` is not a usable negative of `pos` of this kind (None: it is): used on LM output."""
    if not neg or not neg.strip():
        return "empty"
    if caption_key(neg) == caption_key(pos):
        return "same as the caption"
    wp, wn = words(pos), words(neg)
    if kind.startswith("swap_"):
        if Counter(w for w in wn if w not in ("a", "an")) != Counter(w for w in wp if w not in ("a", "an")) \
                and not _count_swap_like(wp, wn):
            return "a swap must keep the words"
    elif kind.startswith("add_"):
        if len(wn) <= len(wp):
            return "an addition must add words"
        norm = lambda ws: [G.verb_for_number(w, True) or w for w in ws if w not in ARTICLES_AUX]  # noqa: E731
        if not _is_subsequence(norm(wp), norm(wn)):
            return "an addition must keep the caption's words in order"
    elif kind.startswith("replace_"):
        ops = [o for o in difflib.SequenceMatcher(None, wp, wn, autojunk=False).get_opcodes() if o[0] != "equal"]
        core = [o for o in ops if not _agreement_change(wp[o[1]:o[2]], wn[o[3]:o[4]])]
        if len(core) != 1:
            return f"a replacement must change one span, changed {len(core)}"
        if core[0][0] == "insert" or core[0][0] == "delete":
            return "a replacement must replace words"
        before, after = wp[core[0][1]:core[0][2]], wn[core[0][3]:core[0][4]]
        if len(before) == 1 and len(after) == 1 and (L.too_close(before[0], after[0]) or
                                                     _attr_synonyms(before[0], after[0])):
            return f"synonym swap {before[0]} -> {after[0]}"
    return None


ARTICLES_AUX = {"a", "an", "one", "is", "are", "was", "were", "has", "have", "does", "do"}


def _agreement_change(before: list[str], after: list[str]) -> bool:
    """Only articles, auxiliaries or a word's number changed ("a" -> "an", "is" -> "are", "cat" -> "cats")."""
    if set(before) | set(after) <= ARTICLES_AUX:
        return True
    return len(before) == len(after) and all(_same_word(b, a) or {a, b} <= ARTICLES_AUX
                                             for b, a in zip(before, after))


def _same_word(b: str, a: str) -> bool:
    return b == a or G.singularize(b) == G.singularize(a) or G.verb_for_number(b, True) == a or \
        G.verb_for_number(b, False) == a


def _attr_synonyms(a: str, b: str) -> bool:
    for cat in set(L.ATTRIBUTE_WORDS.get(a, [])) & set(L.ATTRIBUTE_WORDS.get(b, [])):
        if L.attribute_cluster(cat, a) == L.attribute_cluster(cat, b):
            return True
    return False


def _sg(w: str) -> str:
    """Singular for comparing word bags ("wine glasses" and "a wine glass" hold the same words)."""
    return w[:-2] if w in ("glasses",) else G.singularize(w)


def _count_swap_like(wp: list[str], wn: list[str]) -> bool:
    """The same words up to number, articles, auxiliaries and verb agreement (a swap of counts or objects)."""
    norm = lambda ws: Counter(_sg(w) for w in ws  # noqa: E731
                              if w not in ARTICLES_AUX and G.verb_for_number(w, False) is None)
    return norm(wp) == norm(wn)


def _is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(w in it for w in small)
