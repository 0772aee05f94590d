"""The faithfulness gate of the recaption stage: pure functions over strings and numbers, testable alone.

A rewrite is kept only if every check passes; the first failing check names the rejection
("reason:detail", the part before the colon is the reason code):

    empty                  nothing left after cleanup
    too_short / too_long   words (tokens with a letter or digit) outside [min_words, max_words]
    language               the rewrite's detected language is not kept, detector score >= lang_min_score and at
                           least lang_min_words words (the language stage's rule; short text is unreliable)
    echo                   the rewrite is the original again (case, spacing and punctuation ignored)
    added_object           an object noun (OBJECTS: COCO/LVIS-style nouns and the demo shapes, plural forms and a
                           few synonyms folded) absent from the original and the visual concepts: "added_object:dog"
    changed_number /       a number (words "one".."twenty", tens, "hundred", "thousand", "dozen", or digits;
    added_number           "3" == "three") absent from the original and the concepts: changed_ when the original
                           states some number, added_ when it states none. "one"/"single" are allowed when the
                           original states no number at all ("a dog" -> "one dog"), not when it states another
                           ("two dogs" -> "one dog" is changed_number:1). Also an object written in the singular
                           where the original only has its plural or the reverse ("two red diamonds" -> "a red
                           diamond": changed_number:diamond singular)
    changed_colour /       a colour word absent from the original and the concepts (spelling variants folded:
    added_colour           grey/gray, golden/gold, reddish/red ...); changed_ when the original names a colour
    added_relation /       a spatial relation (left/right of, above/below/under, on top of, behind/in front of)
    changed_relation       the original does not state, or whose objects differ: "a star above a triangle" may
                           become "a triangle below a star", not "a triangle above a star"
    added_negation         "not", "no", "without", "n't" ... where the original has none
    added_name             a capitalised word (not starting a sentence) the original and the concepts never use:
                           a place, brand or person the LM made up ("added_name:London")
    repetition             a content word repeated more often than in the original ("a large, large square")
    added_words            more than max_new_word_share (0.4) of the rewrite's content words (stopwords and
                           numbers left out, crude stems) appear nowhere in the original and the concepts:
                           "a red diamond" -> "A red diamond is a rare gemstone." (added_words:rare,gemstone)
    low_similarity         cosine(original, rewrite) with the sentence encoder < min_similarity
    score_drop             the image-text score of the rewrite < the original's - max_score_drop

Only additions are rejected: a rewrite may drop a detail (LaCLIP's rewrites do), never invent one. Lexicons are
English; for other languages only the similarity, length and score checks say anything.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass

# --------------------------------------------------------------------------- lexicons

COLOUR_FORMS: dict[str, str] = {}
for _canon, _forms in {
    "red": "red reddish", "orange": "orange orangey orangish", "yellow": "yellow yellowish",
    "green": "green greenish", "blue": "blue bluish blueish", "purple": "purple purplish",
    "violet": "violet", "pink": "pink pinkish", "brown": "brown brownish", "black": "black blackish",
    "white": "white whitish", "grey": "grey gray greyish grayish", "beige": "beige", "tan": "tan",
    "maroon": "maroon", "navy": "navy", "teal": "teal", "turquoise": "turquoise", "cyan": "cyan",
    "magenta": "magenta", "lavender": "lavender", "indigo": "indigo", "gold": "gold golden",
    "silver": "silver silvery", "bronze": "bronze", "cream": "cream", "ivory": "ivory", "khaki": "khaki",
    "olive": "olive", "burgundy": "burgundy", "crimson": "crimson", "scarlet": "scarlet", "amber": "amber",
    "aqua": "aqua", "lime": "lime", "mint": "mint", "coral": "coral", "peach": "peach", "salmon": "salmon",
    "charcoal": "charcoal", "copper": "copper", "mauve": "mauve", "lilac": "lilac", "fuchsia": "fuchsia",
    "ochre": "ochre ocher", "emerald": "emerald", "blond": "blond blonde", "brunette": "brunette",
    "colourful": "colourful colorful multicolored multicoloured multicolour multicolor",
}.items():
    for _f in _forms.split():
        COLOUR_FORMS[_f] = _canon
COLOURS = frozenset(COLOUR_FORMS.values())

NUMBER_WORDS: dict[str, int] = {
    "zero": 0, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40,
    "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
    "million": 1_000_000, "dozen": 12, "twin": 2, "twins": 2, "triple": 3, "double": 2,
}

# Common objects: the 80 COCO classes (multi-word ones below) and LVIS/Visual Genome-style everyday nouns, plus the
# demo domain's shapes. Singular forms; plurals are derived (PLURALS overrides the rule).
_OBJECT_TEXT = """
person man woman boy girl child baby kid people player lady guy gentleman teenager adult toddler crowd family
bicycle car motorcycle airplane bus train truck boat ship ferry canoe kayak sailboat yacht helicopter jet rocket
van taxi cab scooter skateboard surfboard snowboard ski sled tractor trailer wagon cart carriage ambulance
tram subway jeep limousine wheel tire engine
bird cat dog horse sheep cow elephant bear zebra giraffe lion tiger monkey deer rabbit mouse rat squirrel fox
wolf pig goat chicken duck goose swan pigeon owl eagle parrot penguin fish shark whale dolphin turtle frog
snake lizard butterfly bee insect spider dragonfly ant camel kangaroo panda donkey mule bull calf puppy kitten
pony lamb hen rooster seagull crab lobster octopus dinosaur dragon unicorn
backpack umbrella handbag tie suitcase frisbee kite bat glove racket bottle cup fork knife spoon bowl banana
apple sandwich orange broccoli carrot pizza donut cake chair couch bed toilet television laptop keyboard phone
microwave oven toaster sink refrigerator book clock vase scissors toothbrush
bag purse wallet box basket bucket barrel jar jug mug glass plate tray pan pot kettle teapot lid
table desk bench stool sofa cabinet shelf drawer wardrobe dresser mirror lamp candle curtain blanket pillow
cushion rug carpet towel door window wall fence gate roof chimney stair ladder pole sign flag banner poster
painting frame statue sculpture fountain tower bridge building house church castle tent barn
hat cap helmet shirt jacket coat dress skirt sweater hoodie shoe boot sandal sock scarf belt jeans shorts
pants trousers uniform suit vest apron mask sunglasses necklace ring bracelet earring watch
computer monitor screen mouse remote camera tablet headphone speaker microphone guitar piano violin drum
trumpet radio charger cable battery printer calculator
tree flower plant bush grass leaf rock stone mountain hill river lake sea ocean beach wave cloud sun moon
forest field garden island waterfall volcano desert snow rainbow
ball balloon toy doll puzzle game card dice trophy medal gift
bread cheese egg meat steak sausage burger hamburger fries salad soup rice noodle pasta cookie pie muffin
cupcake chocolate candy icecream coffee tea juice wine beer milk water lemon strawberry grape cherry
pineapple watermelon tomato potato onion pepper corn mushroom cucumber lettuce
pen pencil paper notebook envelope letter newspaper magazine map globe key lock hammer drill shovel
rope chain brush comb knob faucet hose
circle square triangle star heart diamond rectangle oval hexagon pentagon cube sphere cone cylinder
"""
MULTIWORD_OBJECTS = (
    "fire hydrant", "stop sign", "parking meter", "traffic light", "cell phone", "tennis racket", "wine glass",
    "baseball bat", "baseball glove", "dining table", "potted plant", "sports ball", "hair drier", "hair dryer",
    "hot dog", "teddy bear", "ice cream", "remote control", "fire truck", "police car", "christmas tree",
    "street light", "trash can", "polar bear", "ice cream cone", "bow tie", "t shirt", "tee shirt",
    "golf ball", "soccer ball", "tennis ball", "football", "basketball", "baseball",
)
# Folded to one lemma, so a paraphrase that swaps them is not an addition.
SYNONYMS: dict[str, str] = {
    "puppy": "dog", "doggy": "dog", "pup": "dog", "kitten": "cat", "kitty": "cat", "automobile": "car",
    "bike": "bicycle", "motorbike": "motorcycle", "aeroplane": "airplane", "plane": "airplane",
    "jetliner": "airplane", "airliner": "airplane", "tv": "television", "sofa": "couch", "cellphone": "phone",
    "smartphone": "phone", "cell phone": "phone", "telephone": "phone", "kid": "child", "lady": "woman",
    "gentleman": "man", "guy": "man", "doughnut": "donut", "racquet": "racket", "tennis racket": "racket",
    "fridge": "refrigerator", "hotdog": "hot dog", "icecream": "ice cream", "taxi": "car", "cab": "car",
    "hamburger": "burger", "handbag": "bag", "purse": "bag", "pc": "computer", "stone": "rock",
    "hair drier": "hair dryer", "tee shirt": "t shirt", "ship": "boat", "sailboat": "boat", "yacht": "boat",
    "trousers": "pants", "people": "person", "persons": "person",
    "dining table": "table", "desk": "table", "ocean": "sea",
}
PLURALS: dict[str, str] = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice", "goose": "geese",
    "foot": "feet", "tooth": "teeth", "knife": "knives", "leaf": "leaves", "shelf": "shelves", "wolf": "wolves",
    "calf": "calves", "scarf": "scarves", "loaf": "loaves", "sheep": "sheep", "fish": "fish", "deer": "deer",
    "gentleman": "gentlemen", "fireman": "firemen", "glass": "glasses", "bus": "buses", "box": "boxes",
    "octopus": "octopuses", "cactus": "cacti", "tomato": "tomatoes", "potato": "potatoes", "volcano": "volcanoes",
    "scissors": "scissors", "shorts": "shorts", "pants": "pants", "jeans": "jeans", "trousers": "trousers",
    "sunglasses": "sunglasses", "fries": "fries", "people": "people", "dice": "dice", "headphone": "headphones",
    "series": "series", "wife": "wives", "life": "lives",
}


def plural(noun: str) -> str:
    if noun in PLURALS:
        return PLURALS[noun]
    last = noun.split(" ")[-1]
    head = noun[: len(noun) - len(last)]
    if last in PLURALS:
        return head + PLURALS[last]
    if re.search(r"(s|x|z|ch|sh)$", last):
        return head + last + "es"
    if re.search(r"[^aeiou]y$", last):
        return head + last[:-1] + "ies"
    return head + last + "s"


# Nouns whose singular and plural look alike, or that are plural-only or number-neutral: no count is read from them.
_NO_COUNT = {"sheep", "fish", "deer", "scissors", "shorts", "pants", "jeans", "trousers", "sunglasses", "fries",
             "dice", "crowd", "family", "people", "glass", "series", "grass", "water", "snow", "rice", "meat",
             "bread", "cheese", "coffee", "tea", "juice", "wine", "beer", "milk", "pasta", "salad", "soup", "corn",
             "lettuce", "broccoli", "chocolate", "candy", "icecream", "ice cream", "paper"}


def _build_object_forms() -> tuple[dict[str, str], dict[str, bool | None]]:
    """form -> lemma, and form -> plural? (None: says nothing about the count)."""
    forms: dict[str, str] = {}
    number: dict[str, bool | None] = {}
    nouns = set(_OBJECT_TEXT.split()) | set(MULTIWORD_OBJECTS) | set(SYNONYMS)
    for noun in sorted(nouns):
        lemma = SYNONYMS.get(noun, noun)
        lemma = SYNONYMS.get(lemma, lemma)
        pl = plural(noun)
        forms[noun] = lemma
        forms.setdefault(pl, lemma)
        neutral = pl == noun or noun in _NO_COUNT or lemma in _NO_COUNT
        number.setdefault(noun, None if neutral else False)
        number.setdefault(pl, None if neutral else True)
    number["people"] = True  # person / people
    number["person"] = False
    return forms, number


OBJECT_FORMS, OBJECT_PLURAL = _build_object_forms()
OBJECTS = frozenset(OBJECT_FORMS.values())
_MAX_NGRAM = max(len(f.split()) for f in OBJECT_FORMS)

# Spatial relations, longest phrase first, folded to four directions and front/behind; INVERSE swaps the sides.
RELATION_PHRASES: tuple[tuple[str, str], ...] = (
    ("on top of", "above"), ("in front of", "front"), ("to the left of", "left"), ("to the right of", "right"),
    ("on the left of", "left"), ("on the right of", "right"), ("left of", "left"), ("right of", "right"),
    ("above", "above"), ("below", "below"), ("beneath", "below"), ("underneath", "below"), ("under", "below"),
    ("behind", "behind"),
)
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above", "front": "behind",
           "behind": "front"}
_RELATIONS = [(tuple(p.split()), r) for p, r in RELATION_PHRASES]
NEGATIONS = frozenset({"not", "no", "never", "nothing", "none", "nobody", "without", "neither", "nor"})


def _relation_at(toks: list[str], i: int) -> tuple[str, int] | None:
    for words, rel in _RELATIONS:
        if tuple(toks[i:i + len(words)]) == words:
            return rel, len(words)
    return None


# --------------------------------------------------------------------------- tokens and facts

_TOKEN = re.compile(r"[a-z]+|\d+(?:[.,]\d+)*")


_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_UNITS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}
_COMPOUND = re.compile(r"\b(" + "|".join(_TENS) + r")[- ](" + "|".join(_UNITS) + r")\b")


def tokens(text: str | None) -> list[str]:
    """Lowercase word and digit tokens; possessive 's dropped, hyphens and apostrophes split,
    "twenty-one" read as 21."""
    if not text:
        return []
    t = text.lower().replace("\u2019", "'")
    t = re.sub(r"'s\b", "", t)
    t = _COMPOUND.sub(lambda m: str(_TENS[m.group(1)] + _UNITS[m.group(2)]), t)
    return _TOKEN.findall(t)


def word_count(text: str | None) -> int:
    return len(tokens(text))


def _number_value(tok: str) -> float | None:
    if tok in NUMBER_WORDS:
        return float(NUMBER_WORDS[tok])
    if tok[0].isdigit():
        try:
            return float(tok.replace(",", ""))
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Facts:
    objects: frozenset[str]
    numbers: frozenset[float]
    colours: frozenset[str]
    counts: frozenset[tuple[str, bool]] = frozenset()  # (object lemma, written in the plural?)
    relations: tuple[tuple[str | None, str, str | None], ...] = ()  # (object before, relation, object after)
    negated: bool = False


def facts(text: str | None) -> Facts:
    """The objects, numbers and colours a text states (lemmas, numeric values, canonical colour names)."""
    toks = tokens(text)
    objects, numbers, colours = set(), set(), set()
    i = 0
    for tok in toks:  # every token, so "orange" is both a colour and an object
        v = _number_value(tok)
        if v is not None:
            numbers.add(v)
        if tok in COLOUR_FORMS:
            colours.add(COLOUR_FORMS[tok])
    counts = set()
    seq: list[tuple[str, str]] = []  # ("obj", lemma) and ("rel", relation) in text order
    while i < len(toks):
        rel = _relation_at(toks, i)
        if rel is not None:
            seq.append(("rel", rel[0]))
            i += rel[1]
            continue
        for n in range(min(_MAX_NGRAM, len(toks) - i), 0, -1):  # longest object phrase first ("hot dog")
            phrase = " ".join(toks[i:i + n])
            if phrase in OBJECT_FORMS:
                lemma = OBJECT_FORMS[phrase]
                objects.add(lemma)
                if OBJECT_PLURAL.get(phrase) is not None:
                    counts.add((lemma, bool(OBJECT_PLURAL[phrase])))
                seq.append(("obj", lemma))
                i += n
                break
        else:
            i += 1
    relations = []
    for k, (kind, value) in enumerate(seq):
        if kind == "rel":
            before = next((v for kd, v in reversed(seq[:k]) if kd == "obj"), None)
            after = next((v for kd, v in seq[k + 1:] if kd == "obj"), None)
            relations.append((before, value, after))
    negated = bool(NEGATIONS & set(toks)) or "n't" in (text or "").lower().replace("\u2019", "'")
    return Facts(frozenset(objects), frozenset(numbers), frozenset(colours), frozenset(counts), tuple(relations),
                 negated)


def _fmt_number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def lexical_violations(original: str, rewrite: str, concepts: str | None = None) -> list[str]:
    """Objects, numbers and colours the rewrite states that the original (and the concepts) do not:
    ["added_object:dog", "changed_number:3", "added_colour:red", ...]; empty when there are none."""
    src = facts(original)
    extra = facts(concepts) if concepts else Facts(frozenset(), frozenset(), frozenset())
    new = facts(rewrite)
    out = []
    for obj in sorted(new.objects - src.objects - extra.objects):
        out.append(f"added_object:{obj}")
    allowed_numbers = src.numbers | extra.numbers
    added = new.numbers - allowed_numbers
    if 1.0 in added and not allowed_numbers:
        added = added - {1.0}  # "a dog" -> "one dog"
    for v in sorted(added):
        out.append(f"{'changed' if allowed_numbers else 'added'}_number:{_fmt_number(v)}")
    allowed_colours = src.colours | extra.colours
    for c in sorted(new.colours - allowed_colours):
        out.append(f"{'changed' if allowed_colours else 'added'}_colour:{c}")
    # one object written in the singular where the original only has the plural, or the other way round
    if not added:
        allowed_counts = src.counts | extra.counts
        seen_lemmas = {lemma for lemma, _ in allowed_counts}
        for lemma, pl in sorted(new.counts - allowed_counts):
            if lemma in seen_lemmas:
                out.append(f"changed_number:{lemma} {'plural' if pl else 'singular'}")
    out.extend(relation_violations(src, new, extra))
    if new.negated and not (src.negated or extra.negated):
        out.append("added_negation")
    return out


def relation_violations(src: Facts, new: Facts, extra: Facts | None = None) -> list[str]:
    """A spatial relation the original does not state (as written or seen from the other side), or one whose
    two objects no longer match: "added_relation:above", "changed_relation:diamond below star"."""
    known = list(src.relations) + list(extra.relations if extra else ())
    kinds = {r for _, r, _ in known}
    out = []
    for before, rel, after in new.relations:
        if rel not in kinds and INVERSE[rel] not in kinds:
            out.append(f"added_relation:{rel}")
            continue
        if before is None or after is None:
            continue
        same = [(b, r, a) for b, r, a in known if b is not None and a is not None and r in (rel, INVERSE[rel])]
        if same and not any((b, r, a) == (before, rel, after) or (a, INVERSE[r], b) == (before, rel, after)
                            for b, r, a in same):
            out.append(f"changed_relation:{before} {rel} {after}")
    return out


_CAP_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019.-]*")
_SENTENCE_END = re.compile(r"[.!?:;]$")


def added_names(original: str, rewrite: str, concepts: str | None = None) -> list[str]:
    """Capitalised words of the rewrite (proper names: places, brands, people) that are not sentence starts and
    whose lowercase form the original and the concepts never use: ["London", ...]."""
    known = set(tokens(original)) | set(tokens(concepts))
    out = []
    for m in _CAP_WORD.finditer(rewrite or ""):
        word = m.group(0)
        before = rewrite[:m.start()].rstrip()
        start = not before or bool(_SENTENCE_END.search(before)) or before.endswith(("\"", "(", "\u201c", "-"))
        if start or not word[0].isupper() or word == "I":
            continue
        parts = tokens(word)
        if parts and not all(t in known for t in parts):
            out.append(word.strip(".'-"))
    return out


STOPWORDS = frozenset("""
a an the and or but if then than so as of in on at to for from by with without into onto over under about
above below between through during before after up down out off near next along across around behind beside
besides inside outside within against toward towards upon via per is are was were be been being am do does did
has have had having it its it's this that these those there here their them they he she him her his hers we us
our you your i me my mine who whom whose which what where when why how all any both each few more most other
some such only own same too very can will just should could would may might must shall also while one ones
together another image picture photo photograph shows showing shown depicts depicting featuring features
feature view close closeup stock
""".split())
_SUFFIXES = ("ing", "ed", "es", "s", "ly")


def stem(word: str) -> str:
    """A crude stem: enough to match runs / running / ran? no; runs / running / run yes."""
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            word = word[: -len(suf)]
            break
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":
        word = word[:-1]  # running -> runn -> run
    return word.rstrip("e") if len(word) > 3 else word


def content_key(word: str) -> str:
    """Object nouns to their lemma (synonyms folded), colours to their canonical name, other words to a stem."""
    return OBJECT_FORMS.get(word) or COLOUR_FORMS.get(word) or stem(word)


def content_words(text: str | None) -> list[str]:
    return [t for t in tokens(text) if t not in STOPWORDS and not t[0].isdigit() and t not in NUMBER_WORDS]


def content_stems(text: str | None) -> list[str]:
    return [content_key(t) for t in content_words(text)]


def new_content_words(original: str, rewrite: str, concepts: str | None = None) -> tuple[list[str], int]:
    """Content words of the rewrite (stopwords, numbers dropped; crude stems) the original and concepts never use,
    and how many content words the rewrite has."""
    known = set(content_stems(original)) | set(content_stems(concepts))
    words = content_words(rewrite)
    new = [w for w in words if content_key(w) not in known]
    return list(dict.fromkeys(new)), len(words)


def repeated_words(original: str, rewrite: str) -> list[str]:
    """Content words the rewrite repeats more often than the original does (a small LM's loops:
    "a large, large square", "three squares on the three squares")."""
    from collections import Counter

    src = Counter(content_stems(original))
    words = content_words(rewrite)
    new = Counter(content_key(w) for w in words)
    surface: dict[str, str] = {}
    for w in words:
        surface.setdefault(content_key(w), w)
    return [surface[s] for s, c in new.items() if c >= 2 and c > src.get(s, 0)]


_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


# --------------------------------------------------------------------------- the gate

@dataclass(frozen=True)
class GateConfig:
    min_similarity: float = 0.6
    languages: tuple[str, ...] = ("en",)
    lang_min_score: float = 0.4
    lang_min_words: int = 3
    min_words: int = 3
    max_words: int = 60
    max_score_drop: float = 0.05
    reject_echo: bool = True
    max_new_word_share: float | None = 0.4


def judge(original: str, rewrite: str, cfg: GateConfig, *, concepts: str | None = None,
          similarity: float | None = None, lang: tuple[str, float] | None = None,
          score: float | None = None, score_original: float | None = None) -> str | None:
    """None if the rewrite passes, else the first failing check as "reason" or "reason:detail".

    similarity, lang (code, score) and the image-text scores are computed by the caller; a check whose input is
    None is skipped (no sentence encoder, no image or no scorer)."""
    if not rewrite or not rewrite.strip():
        return "empty"
    words = word_count(rewrite)
    if words < cfg.min_words:
        return f"too_short:{words}"
    if words > cfg.max_words:
        return f"too_long:{words}"
    if lang is not None and cfg.languages:
        code, lscore = lang
        if (code not in cfg.languages and code != "und" and lscore >= cfg.lang_min_score
                and words >= cfg.lang_min_words):
            return f"language:{code}"
    if cfg.reject_echo and normalise(rewrite) == normalise(original):
        return "echo"
    bad = lexical_violations(original, rewrite, concepts)
    if bad:
        return bad[0]
    names = added_names(original, rewrite, concepts)
    if names:
        return f"added_name:{names[0]}"
    rep = repeated_words(original, rewrite)
    if rep:
        return f"repetition:{rep[0]}"
    if cfg.max_new_word_share is not None:
        new, total = new_content_words(original, rewrite, concepts)
        if total and len(new) / total > cfg.max_new_word_share:
            return f"added_words:{','.join(new[:4])}"
    if similarity is not None and similarity < cfg.min_similarity:
        return f"low_similarity:{similarity:.2f}"
    if score is not None and score_original is not None and score < score_original - cfg.max_score_drop:
        return f"score_drop:{score - score_original:+.3f}"
    return None


def reason_code(reason: str | None) -> str | None:
    return None if reason is None else reason.split(":", 1)[0]
