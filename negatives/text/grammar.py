"""Small English grammar for caption edits: articles, plurals, number and verb agreement, case.

Only what rule-based caption edits need (negatives.text): no tagger, no parser. Every function is pure.
"""
from __future__ import annotations

import re

# ------------------------------------------------------------------------------------------------ articles
# Words whose first letter is a vowel but whose sound is not ("a uniform"), and the other way round ("an hour").
_CONSONANT_SOUND = ("one", "once", "uni", "union", "unit", "usa", "usb", "use", "usu", "uten", "util", "uku", "ura",
                    "uri", "euro", "eu", "ewe", "ufo", "u-")
_VOWEL_AFTER_UNI = ("unin", "unim", "unid", "unil")  # "an uninhabited", "an unimpressed"
_VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir", "herb")


def article_for(word: str) -> str:
    """'a' or 'an' before `word` (by sound, for the common exceptions)."""
    w = word.lower().lstrip("\"'(")
    if not w:
        return "a"
    if w.startswith(_VOWEL_SOUND):
        return "an"
    if w[0].isdigit():
        return "an" if w[0] == "8" or (w.startswith(("11", "18")) and len(w) in (2, 5)) else "a"
    if w.startswith(_CONSONANT_SOUND) and not w.startswith(_VOWEL_AFTER_UNI):
        return "a"
    return "an" if w[0] in "aeiou" else "a"


def article_ok(article: str, next_word: str) -> bool:
    return article.lower() == article_for(next_word)


# ------------------------------------------------------------------------------------------------ plurals
IRREGULAR_PLURALS: dict[str, str] = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice", "goose": "geese",
    "foot": "feet", "tooth": "teeth", "ox": "oxen", "gentleman": "gentlemen", "policeman": "policemen",
    "fireman": "firemen", "businessman": "businessmen", "knife": "knives", "leaf": "leaves", "loaf": "loaves",
    "wolf": "wolves", "shelf": "shelves", "calf": "calves", "half": "halves", "scarf": "scarves", "wife": "wives",
    "life": "lives", "thief": "thieves", "elf": "elves", "potato": "potatoes", "tomato": "tomatoes",
    "mango": "mangoes", "hero": "heroes", "volcano": "volcanoes", "cactus": "cacti", "bus": "buses",
    "die": "dice", "kiss": "kisses", "louse": "lice", "fungus": "fungi", "octopus": "octopuses",
}
# Same form in both numbers.
INVARIANT_PLURALS = {"sheep", "deer", "fish", "moose", "bison", "aircraft", "series", "species", "cattle",
                     "salmon", "trout", "shrimp", "offspring", "swine"}
# Only plural (no singular form in use).
PLURAL_ONLY = {"glasses", "sunglasses", "scissors", "pants", "shorts", "jeans", "trousers", "pajamas", "tongs",
               "goggles", "headphones", "binoculars", "clothes"}
# Nouns ending in -ie (plural -ies, singular not -y).
IE_NOUNS = {"cookie", "movie", "hoodie", "brownie", "selfie", "rookie", "goalie", "smoothie", "veggie", "zombie",
            "calorie", "beanie", "necktie", "bowtie", "collie", "birdie", "genie", "cutie", "pixie", "prairie"}
_IRREGULAR_SINGULARS = {v: k for k, v in IRREGULAR_PLURALS.items()}
_F_TO_VES_EXCEPTIONS = {"roof", "chief", "belief", "chef", "cliff", "giraffe", "safe", "proof", "reef"}


def pluralize(noun: str) -> str:
    """Plural of a singular noun or noun compound (the last word inflects): 'teddy bear' -> 'teddy bears'."""
    if " " in noun:
        head, _, last = noun.rpartition(" ")
        return f"{head} {pluralize(last)}"
    if "-" in noun and noun.split("-")[-1] and noun not in IRREGULAR_PLURALS:
        head, _, last = noun.rpartition("-")
        if last.isalpha() and len(last) > 2:
            return f"{head}-{pluralize(last)}"
    low = noun.lower()
    if low in INVARIANT_PLURALS or low in PLURAL_ONLY:
        return noun
    if low in IRREGULAR_PLURALS:
        return _match_case(noun, IRREGULAR_PLURALS[low])
    if low.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if low.endswith("fe") and low not in _F_TO_VES_EXCEPTIONS:
        return noun[:-2] + "ves"
    return noun + "s"


def singularize(noun: str) -> str:
    """Singular of a plural noun: the inverse of pluralize for the nouns it produces."""
    if " " in noun:
        head, _, last = noun.rpartition(" ")
        return f"{head} {singularize(last)}"
    low = noun.lower()
    if low in INVARIANT_PLURALS or low in PLURAL_ONLY:
        return noun
    if low in _IRREGULAR_SINGULARS:
        return _match_case(noun, _IRREGULAR_SINGULARS[low])
    if low in IRREGULAR_PLURALS or low.endswith(("us", "ss")):  # already singular: "bus", "glass"
        return noun
    if low.endswith("ies"):
        if len(low) <= 4 or low[:-1] in IE_NOUNS:  # "pies", "ties", "cookies"
            return noun[:-1]
        return noun[:-3] + "y"
    for suffix in ("sses", "xes", "zzes", "ches", "shes"):
        if low.endswith(suffix):
            return noun[:-2]
    if low.endswith("s") and not low.endswith("ss"):
        return noun[:-1]
    return noun


# ------------------------------------------------------------------------------------------------ numbers
NUMBER_WORDS: dict[str, int] = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12,
}
WORD_FOR_NUMBER = {v: k for k, v in NUMBER_WORDS.items()}
SINGULAR_DETERMINERS = {"a", "an", "one", "this", "that", "each", "every", "another"}
PLURAL_DETERMINERS = {"these", "those", "several", "many", "few", "both", "two", "three", "four", "five", "six",
                      "seven", "eight", "nine", "ten", "eleven", "twelve", "multiple", "various", "numerous"}
DETERMINERS = SINGULAR_DETERMINERS | PLURAL_DETERMINERS | {
    "the", "his", "her", "their", "its", "my", "our", "your", "some", "no", "all", "any", "other",
}

# ------------------------------------------------------------------------------------------------ verbs
AUX_NUMBER: dict[str, tuple[str, str]] = {  # form -> (singular, plural)
    "is": ("is", "are"), "are": ("is", "are"), "was": ("was", "were"), "were": ("was", "were"),
    "has": ("has", "have"), "have": ("has", "have"), "does": ("does", "do"), "do": ("does", "do"),
    "isn't": ("isn't", "aren't"), "aren't": ("isn't", "aren't"), "wasn't": ("wasn't", "weren't"),
    "weren't": ("wasn't", "weren't"), "doesn't": ("doesn't", "don't"), "don't": ("doesn't", "don't"),
}
# Present-tense lexical verbs common in captions: base -> third person singular.
PRESENT_VERBS: dict[str, str] = {
    "sit": "sits", "stand": "stands", "lie": "lies", "lay": "lays", "walk": "walks", "run": "runs", "hold": "holds",
    "ride": "rides", "eat": "eats", "look": "looks", "play": "plays", "wait": "waits", "fly": "flies",
    "swim": "swims", "rest": "rests", "sleep": "sleeps", "wear": "wears", "carry": "carries", "graze": "grazes",
    "pose": "poses", "watch": "watches", "drink": "drinks", "lean": "leans", "hang": "hangs", "cross": "crosses",
    "pull": "pulls", "push": "pushes", "jump": "jumps", "kneel": "kneels", "climb": "climbs", "surf": "surfs",
    "skate": "skates", "ski": "skis", "smile": "smiles", "stare": "stares", "drive": "drives", "park": "parks",
    "cook": "cooks", "read": "reads", "talk": "talks", "hit": "hits", "throw": "throws", "catch": "catches",
    "prepare": "prepares", "enter": "enters", "leave": "leaves", "contain": "contains", "show": "shows",
    "sits": "sits",
}
PRESENT_VERBS.pop("sits")
_THIRD_PERSON = {v: k for k, v in PRESENT_VERBS.items()}


def verb_for_number(word: str, plural: bool) -> str | None:
    """The form of a finite verb (aux or present-tense verb) agreeing with a singular/plural subject.

    None when `word` is not a verb this module knows.
    """
    low = word.lower()
    if low in AUX_NUMBER:
        return _match_case(word, AUX_NUMBER[low][1 if plural else 0])
    if low in _THIRD_PERSON:
        return _match_case(word, _THIRD_PERSON[low] if plural else low)
    if low in PRESENT_VERBS:
        return _match_case(word, low if plural else PRESENT_VERBS[low])
    return None


def is_finite_verb(word: str) -> bool:
    low = word.lower()
    return low in AUX_NUMBER or low in _THIRD_PERSON or low in PRESENT_VERBS


# ------------------------------------------------------------------------------------------------ case
def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def match_case(template: str, word: str) -> str:
    """`word` with the capitalisation of `template` (first letter, or all caps)."""
    return _match_case(template, word)


_WORD = re.compile(r"[A-Za-z]")


def capitalized(text: str) -> bool:
    m = _WORD.search(text)
    return bool(m) and m.group(0).isupper()
