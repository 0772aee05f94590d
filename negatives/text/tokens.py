"""Tokens and word classes of a caption: what parsing and the edits read."""
from __future__ import annotations

import re
from dataclasses import dataclass

from negatives.text import grammar as G

_TOKEN = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*|\d+(?:[.,]\d+)*|\S")


@dataclass(frozen=True)
class Tok:
    text: str
    start: int
    end: int

    @property
    def low(self) -> str:
        return self.text.lower()

    @property
    def alpha(self) -> bool:
        return self.text[:1].isalpha()


def tokenize(text: str) -> list[Tok]:
    return [Tok(m.group(0), m.start(), m.end()) for m in _TOKEN.finditer(text)]


PREPOSITIONS = set(
    "of on in at with by for from to into onto over under near behind beside above below through across along "
    "around down up inside outside next off out against between underneath beneath toward towards during without "
    "like as about past atop upon among beyond within via than".split()
)
CONJUNCTIONS = set("and or but while that which who whom whose where when then so if because".split())
PRONOUNS = set("he she it they we i you him her them his its their this these those there here someone "
               "something somebody everyone anyone everything itself himself herself themselves".split())
AUXILIARIES = set(G.AUX_NUMBER) | {"be", "been", "being", "am", "can", "could", "will", "would", "may", "might",
                                   "should", "must", "had"}
ADVERBS = set("very really quite just also almost nearly too so still only not partially fully completely".split())
STOP = PREPOSITIONS | CONJUNCTIONS | PRONOUNS | AUXILIARIES | ADVERBS | G.DETERMINERS
ING_MODIFIERS = {"dining", "living", "sitting", "running", "skiing", "surfing", "swimming", "parking", "baking",
                 "cutting", "ceiling", "building", "clothing", "wedding", "passing", "shopping", "washing",
                 "frosting", "stuffing", "fishing", "sailing", "serving", "camping", "changing", "walking"}
NUMBER_PRONOUNS = {"it", "its", "itself", "they", "their", "them", "themselves", "theirs", "each"}
GENDER_PRONOUNS = {"he", "she", "his", "her", "him", "hers", "himself", "herself"}
RELATIVE = {"that", "which", "who"}
# Words between two noun phrases that make their order not matter ("a cat and a dog", "a cup next to a plate").
SYMMETRIC_LINKS = {"and", ",", "with", "next", "to", "beside", "near", "by", "alongside", "or", "plus", "together",
                   "sitting", "standing", "lying", "laying", "parked", "are", "is", "both", "each", "other"}


_WORDS = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*|\d+")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORDS.findall(text)]


def caption_key(text: str) -> str:
    """The caption's words, lower case, single spaces: two texts with the same key are the same caption."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))
