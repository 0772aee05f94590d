"""The seven generators of rule negatives (one per SugarCrepe kind) and negatives_for, which draws from them."""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from typing import Iterable, Sequence

from negatives.text import grammar as G
from negatives.text import lexicon as L
from negatives.text.edits import (Edit, Negative, bare_singular, can_change_number, case_like, count_of, set_count,
                                  subject_verb)
from negatives.text.options import KINDS
from negatives.text.parsing import NP, Attr, Parse, fitting_categories, parse
from negatives.text.tokens import GENDER_PRONOUNS, NUMBER_PRONOUNS, SYMMETRIC_LINKS, caption_key

COUNT_SHARE_INV = 0.75  # replace_att: chance that attribute edits are tried before count edits
# add_att: how often each attribute category is tried first (common adjectives read as naturally as the caption;
# "an old printer", "a plaid hat" give themselves away to a text-only model)
ADD_ATT_WEIGHT = {"size": 1.0, "colour": 1.0, "age_person": 0.6, "material": 0.5, "height": 0.3}
ADD_WITH_RELATION = 0.5  # add_obj: chance that the object comes with a relation ("next to a dog") not "and"


def _pick(rng: random.Random, seq: Sequence):
    return seq[rng.randrange(len(seq))]


def _weighted_shuffle(rng: random.Random, items: list, weights: list[float]) -> list:
    """A random order in which heavier items tend to come first (Efraimidis-Spirakis keys u ** (1 / w))."""
    keys = [rng.random() ** (1.0 / max(w, 1e-9)) for w in weights]
    return [items[i] for i in sorted(range(len(items)), key=lambda i: -keys[i])]


def _common(lemma: str) -> float:
    """Sampling weight of a noun: the lexicon lists nouns from common to rare (Zipf-like 1 / (rank + 2))."""
    return 1.0 / (L.rank(lemma) + 2)


def _weighted_pick(rng: random.Random, words_: Sequence[str], weights: Sequence[float]) -> str:
    return rng.choices(list(words_), weights=list(weights))[0]


def gen_replace_obj(p: Parse, rng: random.Random) -> Iterable[Negative]:
    lemmas = p.lemmas()
    gendered = p.has(GENDER_PRONOUNS)
    cands = []
    for np_ in p.nps:
        if np_.plural is None and not np_.noun.mass and not np_.noun.plural_only:
            continue
        if _compound(p, np_) or bare_singular(p, np_):
            continue
        targets = [t for t in L.replacements_for(np_.noun.lemma)
                   if not any(L.too_close(t, other) for other in lemmas)]
        if gendered and np_.noun.gender:
            targets = [t for t in targets if L.LEXICON[t].gender == np_.noun.gender]
        if np_.head_end < len(p.lows) and p.lows[np_.head_end] == "of":  # "a plate of pizza": containers only
            targets = [t for t in targets if t in L.CONTAINERS] if np_.noun.lemma in L.CONTAINERS else []
        for t in targets:
            cands.append((np_, t))
    cands = _weighted_shuffle(rng, cands, [_common(t) for _, t in cands])
    for np_, t in cands:
        noun = L.LEXICON[t]
        form = noun.form(bool(np_.plural))
        e = Edit(p).replace(np_.head_start, np_.head_end, case_like(p, np_.head_start, form))
        e.article_before(np_.head_start, form)
        neg = e.result("replace_obj")
        if neg:
            yield neg


def _compound(p: Parse, np_: NP) -> bool:
    """A head right after a noun modifier ("park bench", "tennis court"): its replacements rarely fit the modifier."""
    if not np_.premods:
        return False
    w = p.lows[np_.premods[-1]]
    return w not in L.ATTRIBUTE_WORDS and (w in L.NOUN_FORMS or w in L.NOUN_MODIFIERS)


def _word_rank(category: str, word: str) -> int:
    """Position of an attribute word in its category (colours by use in captions, others cluster by cluster)."""
    if category == "colour" and word in L.COMMON_COLOURS:
        return L.COMMON_COLOURS.index(word)
    return L.attribute_cluster(category, word) or 0


def _colour_options(np_: NP) -> tuple[str, ...]:
    return L.COLOURS_FOR.get(np_.category, L.COMMON_COLOURS)


def _attr_options(a: Attr, p: Parse) -> list[str]:
    """Words that may replace attribute `a`: another cluster of its category, not already on its noun."""
    cat = L.ATTRIBUTE_CATEGORIES[a.category]
    cl = L.attribute_cluster(a.category, a.word)
    np_words = {p.lows[j] for j in a.np.premods}
    if a.category == "colour":
        opts = [c for c in _colour_options(a.np) if L.attribute_cluster("colour", c) != cl and c not in np_words]
        if a.word not in _colour_options(a.np) and a.np.category in L.COLOURS_FOR:
            return []
        return opts
    return [c[0] for k, c in enumerate(cat.clusters) if k != cl and c[0] not in np_words]


def gen_replace_att(p: Parse, rng: random.Random) -> Iterable[Negative]:
    attrs: list[tuple] = []
    for a in p.attrs:
        if a.word == "short":
            continue
        for o in _attr_options(a, p):
            attrs.append(("attr", a, o))
    counts: list[tuple] = []
    number_safe = not p.has(NUMBER_PRONOUNS) and "other" not in p.lows
    counted = any(w in G.NUMBER_WORDS for w in p.lows)
    for np_ in p.nps:
        c = count_of(p, np_)
        if c is None:
            continue
        if p.lows[np_.det] in ("a", "an") and (np_.start != 0 or not counted):
            # "on a table" -> "on two tables" reads oddly; "A stop sign" -> "Two stop signs" gives itself away
            # where the caption counts nothing (COCO: 0.87 by an n-gram LM); "a cat is" -> "two cats are" is
            # made where captions count things (the demo domain)
            continue
        for new in (c - 1, c + 1):
            if 1 <= new <= L.MAX_COUNT_EDIT and (number_safe or (new > 1) == (c > 1)):
                counts.append(("count", np_, c, new))
    attrs = _weighted_shuffle(rng, attrs, [1.0 / (2 + _word_rank(a.category, o)) for _, a, o in attrs])
    rng.shuffle(counts)
    # attributes first three times in four, so counts come up but do not crowd colours and sizes out
    cands = attrs + counts if rng.random() < COUNT_SHARE_INV else counts + attrs
    for cand in cands:
        e = Edit(p)
        if cand[0] == "attr":
            _, a, o = cand
            e.replace(a.tok, a.tok + 1, case_like(p, a.tok, o))
            e.article_before(a.tok, o)
        else:
            _, np_, c, new = cand
            if not set_count(p, e, np_, c, new):
                continue
        neg = e.result("replace_att")
        if neg:
            yield neg


def gen_replace_rel(p: Parse, rng: random.Random) -> Iterable[Negative]:
    cands = [(r, o, k) for r in p.rels for k, o in enumerate(r.options)]
    cands = [(r, o) for r, o, _ in _weighted_shuffle(rng, cands, [1.0 / (k + 1) for _, _, k in cands])]
    for r, o in cands:
        e = Edit(p).replace(r.start, r.end, case_like(p, r.start, o))
        neg = e.result("replace_rel")
        if neg:
            yield neg


def _symmetric_between(p: Parse, a: NP, b: NP) -> bool:
    between = p.lows[a.head_end:b.start]
    return all(w in SYMMETRIC_LINKS for w in between)


def _premod_words(p: Parse, np_: NP) -> list[str]:
    return [p.lows[j] for j in np_.premods]


def _slot_ok(noun: L.Noun, plural: bool | None) -> bool:
    if plural is None:
        return False
    if noun.mass:
        return False
    if noun.plural_only:
        return plural
    return True


def gen_swap_obj(p: Parse, rng: random.Random) -> Iterable[Negative]:
    gendered = p.has(GENDER_PRONOUNS)
    lemma_counts = Counter(np_.noun.lemma for np_ in p.nps)
    nps = [np_ for np_ in p.nps
           if not (np_.head_end < len(p.lows) and p.lows[np_.head_end] == "of") and not _compound(p, np_)
           and not np_.noun.generic and lemma_counts[np_.noun.lemma] == 1]  # "a table ... a table": which one?
    cands = []
    for x in range(len(nps)):
        for y in range(x + 1, len(nps)):
            a, b = nps[x], nps[y]
            if L.too_close(a.noun.lemma, b.noun.lemma):
                continue
            if not (_slot_ok(a.noun, b.plural) and _slot_ok(b.noun, a.plural)):
                continue
            if a.noun.mass != b.noun.mass:
                continue
            if gendered and (a.noun.gender or b.noun.gender) and a.noun.gender != b.noun.gender:
                continue
            if _symmetric_between(p, a, b) and sorted(_premod_words(p, a)) == sorted(_premod_words(p, b)):
                continue
            if L.SWAP_GROUPS.get(a.category, a.category) != L.SWAP_GROUPS.get(b.category, b.category) \
                    or bare_singular(p, a) or bare_singular(p, b):
                continue
            if not (_premods_fit(p, a, b.noun) and _premods_fit(p, b, a.noun)):
                continue
            cands.append((a, b))
    rng.shuffle(cands)
    for a, b in cands:
        fa, fb = b.noun.form(bool(a.plural)), a.noun.form(bool(b.plural))
        e = Edit(p)
        e.replace(a.head_start, a.head_end, case_like(p, a.head_start, fa))
        e.replace(b.head_start, b.head_end, case_like(p, b.head_start, fb))
        e.article_before(a.head_start, fa)
        e.article_before(b.head_start, fb)
        neg = e.result("swap_obj")
        if neg:
            yield neg


def _premods_fit(p: Parse, slot: NP, noun: L.Noun) -> bool:
    """Would `noun` fit the premodifiers of `slot` ("a blue cake" -> "a blue woman": no)?"""
    for j in slot.premods:
        a = next((a for a in p.attrs if a.tok == j), None)
        if a is None:
            return False
        fits = fitting_categories(noun)
        if a.category == "colour":
            if a.word not in L.COLOURS_FOR.get(noun.category, L.COMMON_COLOURS) and a.word not in L.COMMON_COLOURS:
                return False
            if noun.category in L.COLOURS_FOR and a.word not in L.COLOURS_FOR[noun.category]:
                return False
        elif a.category not in fits and not (a.category.startswith("age_") and any(f.startswith("age_") for f in fits)):
            return False
    return True


def _attr_fits(word: str, category: str, np_: NP) -> bool:
    if category == "colour":
        return word in _colour_options(np_) or np_.category not in L.COLOURS_FOR
    size_fits = category == "size" and np_.category not in ("person", "room")
    return category in fitting_categories(np_.noun) or size_fits


def gen_swap_att(p: Parse, rng: random.Random) -> Iterable[Negative]:
    cands = []
    attrs = p.attrs
    for x in range(len(attrs)):
        for y in range(x + 1, len(attrs)):
            a, b = attrs[x], attrs[y]
            if a.np is b.np or a.word == b.word or L.too_close(a.np.noun.lemma, b.np.noun.lemma):
                continue
            if a.category == b.category:
                if L.attribute_cluster(a.category, a.word) == L.attribute_cluster(b.category, b.word):
                    continue
                # the other noun must not already carry the incoming word
                if a.word in _premod_words(p, b.np) or b.word in _premod_words(p, a.np):
                    continue
            else:
                if len([t for t in a.np.premods if p.lows[t] in L.ATTRIBUTE_WORDS]) != 1 or \
                        len([t for t in b.np.premods if p.lows[t] in L.ATTRIBUTE_WORDS]) != 1:
                    continue
            if not (_attr_fits(b.word, b.category, a.np) and _attr_fits(a.word, a.category, b.np)):
                continue
            cands.append(("attr", a, b))
    counts = [(np_, count_of(p, np_)) for np_ in p.nps]
    counts = [(np_, c) for np_, c in counts if c is not None and not np_.noun.generic]
    number_safe = not p.has(NUMBER_PRONOUNS)
    for x in range(len(counts)):
        for y in range(x + 1, len(counts)):
            (a, ca), (b, cb) = counts[x], counts[y]
            if ca == cb or L.too_close(a.noun.lemma, b.noun.lemma):
                continue
            if (ca > 1) != (cb > 1) and not number_safe:
                continue
            cands.append(("count", a, b, ca, cb))
    rng.shuffle(cands)
    for cand in cands:
        e = Edit(p)
        if cand[0] == "attr":
            _, a, b = cand
            e.replace(a.tok, a.tok + 1, case_like(p, a.tok, b.word))
            e.replace(b.tok, b.tok + 1, case_like(p, b.tok, a.word))
            e.article_before(a.tok, b.word)
            e.article_before(b.tok, a.word)
        else:
            _, a, b, ca, cb = cand
            if not (set_count(p, e, a, ca, cb) and set_count(p, e, b, cb, ca)):
                continue
        neg = e.result("swap_att")
        if neg:
            yield neg


def _companions(p: Parse, np_: NP) -> list[str]:
    lemmas = p.lemmas()
    out = []
    for m in L.LEXICON.values():
        if m.category != np_.category or m.generic or m.lemma in L.NOT_TARGET or m.mass != np_.noun.mass \
                or m.plural_only:
            continue
        if any(L.too_close(m.lemma, other) for other in lemmas):
            continue
        out.append(m.lemma)
    return out


def _companion_phrase(p: Parse, host: NP, lemma: str, rng: random.Random) -> str:
    noun = L.LEXICON[lemma]
    words = []
    host_cats = [a.category for a in p.attrs if a.np is host]
    for cat in sorted(set(host_cats), key=lambda c: L.ATTRIBUTE_CATEGORIES[c].order):
        if cat == "colour":
            opts = [c for c in _colour_options(host) if c in L.COLOURS_FOR.get(noun.category, L.COMMON_COLOURS)]
        elif cat in ("size",):
            opts = [c[0] for c in L.ATTRIBUTE_CATEGORIES[cat].clusters]
        else:
            continue
        if opts:
            words.append(_pick(rng, opts))
    words.append(noun.lemma)
    if noun.mass:
        return " ".join(words)
    return f"{G.article_for(words[0])} {' '.join(words)}"


def gen_add_obj(p: Parse, rng: random.Random) -> Iterable[Negative]:
    lows = p.lows
    n = len(lows)
    if lows.count("and") >= 2:
        return
    cands = []
    for np_ in p.nps:
        if np_.noun.generic or np_.category not in L.ADDABLE_CATEGORIES:
            continue
        nxt = lows[np_.head_end] if np_.head_end < n else None
        prev = lows[np_.start - 1] if np_.start > 0 else None
        if nxt in ("of", "'s", "-") or bare_singular(p, np_):
            continue
        in_list = nxt in ("and", ",", "or")
        if not in_list and prev in ("and", ",", "or"):
            continue
        comps = _companions(p, np_)
        if np_.noun.mass and not in_list:
            comps = [c for c in comps if L.LEXICON[c].mass]
        for c in comps:
            cands.append((np_, c, in_list))
    cands = _weighted_shuffle(rng, cands, [_common(c) for _, c, _ in cands])
    number_safe = not p.has(NUMBER_PRONOUNS | GENDER_PRONOUNS)
    for np_, c, in_list in cands:
        phrase = _companion_phrase(p, np_, c, rng)
        e = Edit(p)
        if not in_list and rng.random() < ADD_WITH_RELATION:
            # "a cat [next to a dog] on a couch": the object comes with a relation, no agreement to fix
            directional = any(r.phrase in L.DIRECTIONAL for r in p.rels) or np_.category == "shape"
            rel = _pick(rng, L.DIRECTIONAL if directional else L.ADD_RELATIONS)
            e.insert_after(np_.head_end - 1, f" {rel} {phrase}")
            neg = e.result("add_obj")
            if neg:
                yield neg
            continue
        e.insert_after(np_.head_end - 1, (", " if in_list else " and ") + phrase)
        if not in_list:
            v = subject_verb(p, np_)
            if v is not None or (np_.start == 0 and not can_change_number(p, np_)):
                if not number_safe or v is None:
                    continue
                fixed = G.verb_for_number(p.toks[v].text, True)
                if fixed is None:
                    continue
                e.replace(v, v + 1, fixed)
        neg = e.result("add_obj")
        if neg:
            yield neg


def gen_add_att(p: Parse, rng: random.Random) -> Iterable[Negative]:
    cands = []
    for np_ in p.nps:
        if np_.noun.generic or np_.noun.plural_only or bare_singular(p, np_):
            continue
        fits = fitting_categories(np_.noun)
        if not fits:
            continue
        present = {a.category for a in p.attrs if a.np is np_}
        if np_.category == "person" and np_.premods:
            continue  # "a young girl" -> "a small young girl"
        orders = []
        ok = True
        for j in np_.premods:
            w = p.lows[j]
            a = next((a for a in p.attrs if a.tok == j), None)
            if a is not None:
                orders.append((j, L.ATTRIBUTE_CATEGORIES[a.category].order))
            elif w in L.NOUN_MODIFIERS or w in L.NOUN_FORMS:
                orders.append((j, 6.0))
            else:
                ok = False
                break
        if not ok:
            continue
        for cat in fits:
            if cat in present or (cat in ("size", "height", "length") and present & {"size", "height", "length"}):
                continue
            if cat.startswith("age_") and present & {"age_person", "age_object"}:
                continue
            c = L.ATTRIBUTE_CATEGORIES[cat]
            if cat == "colour":
                words = [w for w in _colour_options(np_) if w in L.COMMON_COLOURS or np_.category == "shape"]
            else:
                words = [cl[0] for cl in c.clusters]
            words = [w for w in words if w not in p.lows]
            if not words:
                continue
            pos = next((j for j, o in orders if o > c.order), np_.head_start)
            cands.append((np_, cat, words, pos))
    cands = _weighted_shuffle(rng, cands, [ADD_ATT_WEIGHT.get(c[1], 0.15) for c in cands])
    for np_, cat, words, pos in cands:
        word = _weighted_pick(rng, words, [1.0 / (i + 2) for i in range(len(words))])
        e = Edit(p)
        if pos == 0 and G.capitalized(p.toks[0].text):
            first = p.toks[0].text
            lowered = first if first.isupper() and len(first) > 1 else first[:1].lower() + first[1:]
            e.replace(0, 1, word[:1].upper() + word[1:] + " " + lowered)
        else:
            e.insert_before(pos, word + " ")
        e.article_before(pos, word)
        neg = e.result("add_att")
        if neg:
            yield neg


GENERATORS = {
    "replace_obj": gen_replace_obj, "replace_att": gen_replace_att, "replace_rel": gen_replace_rel,
    "swap_obj": gen_swap_obj, "swap_att": gen_swap_att, "add_obj": gen_add_obj, "add_att": gen_add_att,
}


def _rng(seed: int, kind: str, text: str) -> random.Random:
    h = hashlib.blake2b(f"{seed}\x00{kind}\x00{text}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "big"))


def negatives_for(text: str | None, kinds: Sequence[str] = KINDS, per_kind: int = 1, seed: int = 0,
                  parsed: Parse | None = None, scorer=None, pool: int = 12) -> list[Negative]:
    """Rule negatives of `text`, at most per_kind of each kind, deterministic for (text, kinds, per_kind, seed).

    Without `scorer` the first per_kind candidates of a seeded shuffle. With `scorer` (text -> plausibility, e.g.
    NgramLM.score) up to `pool` candidates are drawn and the per_kind whose plausibility is closest to the
    caption's are kept (ties: shuffle order), so a text-only reader cannot tell them by plausibility.
    """
    if not text or not text.strip():
        return []
    p = parsed or parse(text)
    out: list[Negative] = []
    base = scorer(text) if scorer is not None else 0.0
    want = per_kind if scorer is None else max(pool, per_kind)
    for kind in kinds:
        seen = {caption_key(text)}
        got: list[Negative] = []
        for neg in GENERATORS[kind](p, _rng(seed, kind, text)):
            key = caption_key(neg.text)
            if key in seen:
                continue
            seen.add(key)
            got.append(neg)
            if len(got) >= want:
                break
        if scorer is not None and len(got) > per_kind:
            gaps = [abs(base - scorer(n.text)) for n in got]
            order = sorted(range(len(got)), key=lambda i: (gaps[i], i))
            got = [got[i] for i in order[:per_kind]]
        out.extend(got)
    return out
