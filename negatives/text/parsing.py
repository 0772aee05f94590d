"""Noun phrases, their attributes and relations, found with the lexicon (no tagger, no parser)."""
from __future__ import annotations

from dataclasses import dataclass, field

from negatives.text import grammar as G
from negatives.text import lexicon as L
from negatives.text.tokens import AUXILIARIES, ING_MODIFIERS, PRONOUNS, RELATIVE, STOP, Tok, tokenize

@dataclass
class NP:
    start: int  # first token (determiner, first premodifier or head)
    det: int | None  # determiner / number token
    premods: list[int]  # tokens between determiner and head
    head_start: int
    head_end: int  # exclusive
    noun: L.Noun
    plural: bool | None  # None: unknown (sheep, deer without a determiner)

    @property
    def category(self) -> str:
        return self.noun.category


@dataclass
class Attr:
    tok: int
    word: str
    category: str
    np: NP


@dataclass
class Rel:
    start: int
    end: int  # exclusive tokens
    phrase: str
    options: tuple[str, ...]


@dataclass
class Parse:
    text: str
    toks: list[Tok]
    nps: list[NP]
    attrs: list[Attr]
    rels: list[Rel]
    lows: list[str] = field(default_factory=list)

    def lemmas(self) -> set[str]:
        return {np.noun.lemma for np in self.nps}

    def has(self, words: set[str]) -> bool:
        return any(w in words for w in self.lows)


def _is_attribute(low: str) -> bool:
    return low in L.ATTRIBUTE_WORDS


def _noun_at(lows: list[str], i: int) -> tuple[int, list[tuple[L.Noun, bool | None]]] | None:
    """Longest lexicon noun form starting at token i: (length, entries)."""
    for n in range(min(L.MAX_NOUN_WORDS, len(lows) - i), 0, -1):
        form = " ".join(lows[i:i + n])
        if form in L.NOUN_FORMS:
            return n, L.NOUN_FORMS[form]
    return None


def _verbish(lows: list[str], i: int) -> bool:
    """A noun form used as a verb right after its subject ("a man skis", "people watch a game")."""
    w = lows[i]
    if w not in L.VERBISH_FORMS and w not in ("watch", "ski", "surf", "skate", "park", "lie", "stand"):
        return False
    if i == 0:
        return False
    prev = lows[i - 1]
    return prev in L.NOUN_FORMS or prev in PRONOUNS or prev in RELATIVE


def _premod_ok(lows: list[str], j: int) -> bool:
    """Can token j sit between a determiner and its head noun ("a [small wooden park] bench")?"""
    w = lows[j]
    if not w[:1].isalpha() or w in STOP:
        return False
    if w in L.ATTRIBUTE_WORDS or w in L.NOUN_MODIFIERS or w in L.NOUN_FORMS:
        return True
    if G.is_finite_verb(w) or w in L.VERB_FORMS:
        return False
    if w.endswith("ing") and w not in ING_MODIFIERS:
        return False
    if w.endswith("ly"):
        return False
    return True


def parse(text: str) -> Parse:
    toks = tokenize(text)
    lows = [t.low for t in toks]
    n = len(toks)
    nps: list[NP] = []
    i = 0
    while i < n:
        m = _noun_at(lows, i) if toks[i].alpha else None
        if m is None:
            i += 1
            continue
        length, entries = m
        end = i + length
        nxt = lows[end] if end < n else None
        # a noun followed by a noun is a modifier ("pizza box"), unless that noun is a verb here ("a man skis")
        follower_noun = nxt is not None and (
            (nxt in L.COMPOUND_HEADS or _noun_at(lows, end) is not None) and not _verbish(lows, end))
        word = " ".join(lows[i:end])
        as_attribute = length == 1 and _is_attribute(word) and (
            follower_noun or (nxt in ("and", ",", "-") and end + 1 < n and _is_attribute(lows[end + 1])))
        if follower_noun or as_attribute or _verbish(lows, i) or (nxt == "'s") or (nxt == "-"):
            i += 1
            continue
        if i > 0 and lows[i - 1] == "-":  # "heart-shaped" pieces
            i = end
            continue
        noun, plural = entries[0]
        # premodifiers and determiner
        premods: list[int] = []
        det = None
        j = i - 1
        while j >= 0 and len(premods) < 5:
            w = lows[j]
            if w in G.DETERMINERS or w in G.NUMBER_WORDS:
                det = j
                break
            if w in ("and", ",") and premods and _is_attribute(lows[premods[0]]) and j > 0 \
                    and _is_attribute(lows[j - 1]):
                premods.insert(0, j)
                j -= 1
                continue
            if _premod_ok(lows, j):
                premods.insert(0, j)
                j -= 1
                continue
            break
        start = det if det is not None else (premods[0] if premods else i)
        if plural is None and det is not None:
            d = lows[det]
            if d in G.SINGULAR_DETERMINERS:
                plural = False
            elif d in G.PLURAL_DETERMINERS:
                plural = True
        nps.append(NP(start, det, premods, i, end, noun, plural))
        i = end
    attrs: list[Attr] = []
    for np_ in nps:
        for j in np_.premods:
            w = lows[j]
            cats = L.ATTRIBUTE_WORDS.get(w)
            if not cats:
                continue
            cat = _attr_category(w, cats, np_)
            if cat:
                attrs.append(Attr(j, w, cat, np_))
    return Parse(text, toks, nps, attrs, _relations(toks, lows, nps), lows)


def _attr_category(word: str, cats: list[str], np_: NP) -> str | None:
    """The category `word` has on this noun ("old" man: age_person; "old" truck: age_object)."""
    if len(cats) == 1:
        cat = cats[0]
    else:
        fits = fitting_categories(np_.noun)
        inside = [c for c in cats if c in fits]
        if any(c.startswith("age_") for c in cats):
            cat = L.AGE_CATEGORY_FOR.get(np_.category, "age_object")
        elif len(inside) == 1:
            cat = inside[0]
        else:
            return None  # "short": height or length? not sure, leave it
    if cat == "colour" and word in ("orange",) and np_.category in ("fruit", "drink"):
        return None
    return cat


def fitting_categories(noun: L.Noun) -> tuple[str, ...]:
    return L.FITS_FOR_LEMMA.get(noun.lemma, L.FITS.get(noun.category, ()))


def _np_after(nps: list[NP], tok: int) -> NP | None:
    for np_ in nps:
        if np_.start == tok:
            return np_
    return None


def _np_before(nps: list[NP], tok: int, max_gap: int = 0) -> NP | None:
    best = None
    for np_ in nps:
        if tok - max_gap <= np_.head_end <= tok:
            best = np_
    return best


def _relations(toks: list[Tok], lows: list[str], nps: list[NP]) -> list[Rel]:
    rels: list[Rel] = []
    n = len(toks)
    max_len = max(len(p.split()) for p in L.SPATIAL)
    i = 0
    while i < n:
        found = None
        for length in range(min(max_len, n - i), 0, -1):
            phrase = " ".join(lows[i:i + length])
            if phrase in L.SPATIAL:
                found = (phrase, length)
                break
        if found is None:
            v = _verb_relation(toks, lows, nps, i)
            if v:
                rels.append(v)
            i += 1
            continue
        phrase, length = found
        end = i + length
        target = _np_after(nps, end)
        prev = lows[i - 1] if i > 0 else ""
        options: tuple[str, ...] = ()
        if target is not None and not target.noun.generic or (target is not None and phrase not in ("on", "in")):
            if phrase == "on":
                options = () if prev in L.ON_IN_BLOCKERS else L.ON_REPLACEMENTS.get(target.category, ())
            elif phrase == "in":
                options = () if prev in L.ON_IN_BLOCKERS else L.IN_REPLACEMENTS.get(target.category, ())
            elif phrase in ("up", "down"):
                options = L.SPATIAL[phrase] if prev in L.UP_DOWN_VERBS else ()
            else:
                options = L.SPATIAL[phrase]
        if target is not None and end < n and target.head_end < n and lows[target.head_end] == "of" \
                and phrase in ("on", "in"):
            options = ()  # "on the side of", "in a pile of"
        options = tuple(o for o in options if not L.relation_too_close(phrase, o))
        if options:
            rels.append(Rel(i, end, phrase, options))
        i = end
    return rels


def _verb_relation(toks: list[Tok], lows: list[str], nps: list[NP], i: int) -> Rel | None:
    w = lows[i]
    info = L.VERB_FORMS.get(w)
    if info is None:
        return None
    group, ci, fi, _vi = info
    # the subject: a noun phrase ending right before, or before "is/are", "that is", "who are"
    j = i
    while j > 0 and lows[j - 1] in AUXILIARIES | RELATIVE | {"also", "just", "still"} and i - j < 3:
        j -= 1
    subj = _np_before(nps, j)
    if subj is None or subj.category not in L.ANIMATE_CATEGORIES:
        return None
    if fi == 2 and w in L.VERB_AMBIGUOUS and not subj.plural:
        return None
    if fi == 1 and subj.plural:
        return None
    clusters = L.VERB_GROUPS[group]
    options = tuple(cl[0][fi] for k, cl in enumerate(clusters) if k != ci)
    return Rel(i, i + 1, w, options) if options else None
