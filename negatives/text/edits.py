"""A negative and the character edits that make it, with the agreement they need (a/an, number, verb)."""
from __future__ import annotations

from dataclasses import dataclass

from negatives.text import grammar as G
from negatives.text import lexicon as L
from negatives.text.parsing import NP, Parse
from negatives.text.tokens import CONJUNCTIONS, PREPOSITIONS, RELATIVE, caption_key

@dataclass
class Negative:
    kind: str
    text: str
    span_start: int
    span_end: int
    edit_before: str
    edit_after: str
    method: str = "rule"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "text": self.text, "edit_before": self.edit_before, "edit_after": self.edit_after,
                "span_start": self.span_start, "span_end": self.span_end, "method": self.method}


class Edit:
    """Character edits on the caption, applied together; they may not overlap."""

    def __init__(self, p: Parse):
        self.p = p
        self.changes: dict[tuple[int, int], str] = {}

    def replace(self, i: int, j: int, new: str) -> "Edit":
        """Tokens i..j-1 become `new`."""
        t = self.p.toks
        self.changes[(t[i].start, t[j - 1].end)] = new
        return self

    def insert_before(self, i: int, new: str) -> "Edit":
        """`new` (with its trailing space) goes right before token i."""
        s = self.p.toks[i].start
        key = (s, s)
        self.changes[key] = self.changes.get(key, "") + new
        return self

    def insert_after(self, i: int, new: str) -> "Edit":
        e = self.p.toks[i].end
        key = (e, e)
        self.changes[key] = self.changes.get(key, "") + new
        return self

    def article_before(self, i: int, next_word: str) -> "Edit":
        """Make an a/an right before token i agree with `next_word`, the new first word there."""
        return self.set_article(i - 1, next_word) if i > 0 else self

    def set_article(self, det: int | None, next_word: str) -> "Edit":
        """Make the a/an at token `det` agree with `next_word`."""
        if det is None:
            return self
        tok = self.p.toks[det]
        if tok.low in ("a", "an"):
            want = G.match_case(tok.text, G.article_for(next_word))
            if want != tok.text:
                self.replace(det, det + 1, want)
        return self

    def result(self, kind: str) -> Negative | None:
        text = self.p.text
        items = sorted((k, v) for k, v in self.changes.items() if text[k[0]:k[1]] != v)
        if not items:
            return None
        last = -1
        for (s, e), _ in items:
            if s < last:
                return None
            last = e
        out, pos = [], 0
        for (s, e), v in items:
            out.append(text[pos:s])
            out.append(v)
            pos = e
        out.append(text[pos:])
        neg = "".join(out)
        s0, e0 = items[0][0][0], items[-1][0][1]
        after = neg[s0:len(neg) - (len(text) - e0)]
        if caption_key(neg) == caption_key(text):
            return None
        return Negative(kind, neg, s0, e0, text[s0:e0], after)


def case_like(p: Parse, i: int, word: str) -> str:
    return G.match_case(p.toks[i].text, word)


# ------------------------------------------------------------------------------------------------ agreement
def subject_verb(p: Parse, np_: NP) -> int | None:
    """The finite verb that agrees with np_ when np_ is a subject, else None."""
    lows = p.lows
    n = len(lows)
    j = np_.head_end
    if j < n and lows[j] in RELATIVE:
        j += 1
    if j < n and G.is_finite_verb(lows[j]):
        return j
    # "there is a cat" / "there are two cats"
    if np_.start >= 2 and lows[np_.start - 2] == "there" and lows[np_.start - 1] in G.AUX_NUMBER:
        return np_.start - 1
    # a sentence-initial subject: the first finite verb after it that is not a relative clause's
    if np_.start == 0:
        for k in range(np_.head_end, n):
            if lows[k] in (".", ";", ":"):
                break
            if G.is_finite_verb(lows[k]) and lows[k] in G.AUX_NUMBER:
                return None if lows[k - 1] in RELATIVE else k
    return None


def bare_singular(p: Parse, np_: NP) -> bool:
    """A singular count noun with no determiner inside a sentence ("in bed", "at home"): edits there misfire."""
    return (np_.det is None and np_.plural is False and not np_.noun.mass and not np_.noun.plural_only
            and np_.start > 0)


def can_change_number(p: Parse, np_: NP) -> bool:
    """Can np_ change number? Only when the word after it shows how (or that nothing) agrees with it."""
    lows = p.lows
    j = np_.head_end
    if j >= len(lows):
        return True
    w = lows[j]
    if not w[:1].isalnum() or w in PREPOSITIONS or w in CONJUNCTIONS or G.is_finite_verb(w):
        return True
    if w.endswith("ing") or w.endswith("ed") or w in ("alone", "together", "outside", "inside", "nearby"):
        return True
    return False


def number_change(p: Parse, e: Edit, np_: NP, plural: bool, new_noun: str | None = None) -> bool:
    """Re-inflect np_'s head (and its verb) for `plural`; False when it cannot be done safely."""
    noun = L.LEXICON.get(new_noun) if new_noun else np_.noun
    if noun.mass or noun.plural_only or not can_change_number(p, np_):
        return False
    form = noun.form(plural)
    e.replace(np_.head_start, np_.head_end, case_like(p, np_.head_start, form))
    v = subject_verb(p, np_)
    if v is not None:
        fixed = G.verb_for_number(p.toks[v].text, plural)
        if fixed is None:
            return False
        e.replace(v, v + 1, fixed)
    return True


def count_of(p: Parse, np_: NP) -> int | None:
    """The number a noun phrase states ("a" 1, "three" 3), None when it states none or counts something else."""
    if np_.det is None or np_.noun.mass or np_.noun.plural_only or np_.category not in L.COUNTABLE_CATEGORIES:
        return None
    if any(p.lows[j] in L.QUANTIFIERS for j in np_.premods) or np_.noun.generic and np_.noun.lemma != "person":
        return None
    if np_.head_end < len(p.lows) and p.lows[np_.head_end] == "of":  # "a plate of", "a piece of"
        return None
    d = p.lows[np_.det]
    if d in ("a", "an"):
        return 1
    return G.NUMBER_WORDS.get(d)


def set_count(p: Parse, e: Edit, np_: NP, old: int, new: int) -> bool:
    """Change np_'s count from old to new: determiner, noun number, verb agreement."""
    det_tok = p.toks[np_.det]
    first_after = np_.premods[0] if np_.premods else np_.head_start
    if new == 1:
        if p.lows[np_.det] == "one" or old == 1:
            word = "one" if p.lows[np_.det] == "one" else "a"
        else:
            word = "a"
        if word == "a":
            nxt = p.toks[first_after].text if np_.premods else (np_.noun.form(False))
            word = G.article_for(nxt)
    else:
        word = G.WORD_FOR_NUMBER[new]
    e.replace(np_.det, np_.det + 1, G.match_case(det_tok.text, word))
    if (old > 1) != (new > 1):
        return number_change(p, e, np_, new > 1)
    return True
