"""Lexicons for rule-based caption edits (negatives.text): objects, attributes, relations, numbers.

Objects are COCO/LVIS-style nouns in fine categories (a replacement stays in its category, so a negative stays
plausible to a text-only reader: "a cat on a couch" -> "a dog on a couch", never "a pizza on a couch").
Attributes are grouped by category (colour, size, material, ...) and, inside a category, into clusters of words
that mean the same ("small", "little", "tiny"): a replacement comes from another cluster, so it changes meaning.
Relations are spatial phrases and a few action verbs, each with the phrases that contradict it.

SYNONYMS and RELATED (hypernym/hyponym pairs: "child"/"boy", "computer"/"laptop") keep paraphrases out: a
negative never swaps a word for one of these.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from negatives.text.grammar import INVARIANT_PLURALS, NUMBER_WORDS, PLURAL_ONLY, pluralize

# ================================================================================================ objects
# category -> entries. "man|men": explicit plural; "rice*": mass noun (no plural, no a/an); "glasses+": plural only.
NOUNS: dict[str, str] = {
    "person": "man|men, woman|women, boy, girl, child|children, kid, baby, lady, guy, gentleman|gentlemen, "
              "toddler, teenager, person|people, adult",
    "role": "player, skier, surfer, skateboarder, snowboarder, batter, catcher, pitcher, umpire, chef, cook, "
            "police officer, officer, soldier, worker, rider, tourist, bride, groom, family, crowd, "
            "passenger, pedestrian, athlete, cowboy, vendor, customer, student, team",
    "pet": "cat, dog, kitten, puppy, rabbit, hamster",
    "farm_animal": "horse, cow, sheep, goat, pig, donkey, pony, lamb, calf|calves",
    "wild_animal": "elephant, giraffe, zebra, bear, lion, tiger, monkey, deer, rhino, polar bear, brown bear, "
                   "black bear, grizzly bear",
    "bird": "duck, pigeon, seagull, goose|geese, swan, parrot, owl, chicken, eagle, crow, bird",
    "car_like": "car, truck, bus, van, motorcycle, bicycle, bike, scooter, taxi, tractor, jeep, suv, limo, "
                "motorbike, pickup truck, fire truck",
    "rail": "train, tram, trolley, locomotive, subway train",
    "aircraft": "airplane, plane, jet, helicopter, airliner, aeroplane, blimp",
    "boat": "boat, ship, kayak, canoe, sailboat, yacht, ferry",
    "dish": "pizza, sandwich, cake, donut, doughnut, hot dog, hotdog, burger, hamburger, salad, soup*, pasta*, pie, "
            "cupcake, muffin, bagel, taco, burrito, steak, omelet, pancake, waffle, cookie, croissant, "
            "sushi*, noodles+, fries+, rice*, bread*, cheese*",
    "fruit": "apple, banana, orange, lemon, strawberry, grape, pear, peach, pineapple, watermelon, cherry|cherries, "
             "kiwi",
    "vegetable": "carrot, broccoli*, tomato|tomatoes, potato|potatoes, onion, pepper, cucumber, lettuce*, corn*, "
                 "mushroom, cauliflower*, zucchini, asparagus*, celery*",
    "meat": "meat*, bacon*, ham*, sausage, egg, shrimp",
    "drink": "coffee*, tea*, wine*, beer*, juice*, milk*, soda*, lemonade*",
    "furniture": "table, chair, bench, couch, sofa, bed, desk, shelf|shelves, cabinet, dresser, stool, "
                 "dining table, armchair, bookshelf|bookshelves, nightstand, cupboard",
    "appliance": "refrigerator, fridge, oven, stove, microwave, toaster, dishwasher, blender, fireplace",
    "fixture": "toilet, sink, bathtub, tub, shower, mirror, urinal",
    "tableware": "plate, bowl, cup, mug, glass, bottle, fork, knife|knives, spoon, pot, pan, tray, vase, jar, "
                 "basket, box, bag, napkin, teapot, kettle, wine glass, container, platter, dish",
    "electronics": "laptop, computer, phone, cellphone, cell phone, smartphone, keyboard, mouse|mice, monitor, tv, "
                   "television, remote, remote control, camera, tablet, screen, printer, controller, "
                   "game controller, microphone, speaker, headphones+",
    "sports": "frisbee, kite, skateboard, surfboard, snowboard, ski, ball, baseball bat, bat, racket, racquet, "
              "tennis racket, baseball glove, soccer ball, football, tennis ball, basketball, volleyball",
    "clothing": "shirt, t-shirt, hat, cap, tie, jacket, coat, dress, suit, sweater, hoodie, scarf|scarves, helmet, "
                "shoe, boot, uniform, vest, skirt, jeans+, shorts+, pants+, glasses+, sunglasses+, gloves+, "
                "costume",
    "accessory": "umbrella, backpack, handbag, purse, suitcase, luggage*, briefcase, wallet, watch",
    "street_object": "sign, stop sign, street sign, fire hydrant, hydrant, traffic light, parking meter, pole, "
                     "lamp post, street light, clock, statue, fountain, mailbox, trash can, fence, cone, "
                     "street lamp, bus stop, billboard",
    "household": "book, lamp, pillow, blanket, candle, picture, painting, photo, photograph, rug, carpet, curtain, "
                 "towel, toothbrush, scissors+, vase, clock, newspaper, magazine, computer desk",
    "toy": "teddy bear, doll, stuffed animal, toy, toy car, action figure",
    "plant": "tree, plant, bush, palm tree, shrub, cactus|cacti, potted plant",
    "flower": "flower, rose, tulip, sunflower, daisy|daisies, lily|lilies, orchid",
    "room": "kitchen, bathroom, bedroom, living room, office, dining room, restaurant, classroom, garage, "
            "hallway, restroom",
    "urban_place": "street, road, city, sidewalk, parking lot, airport, runway, station, market, highway, "
                   "intersection, bridge, alley, track, court",
    "nature_place": "field, beach, park, yard, garden, forest, desert, mountain, hill, farm, zoo, meadow, "
                    "pasture, hillside, slope, woods+, backyard, lawn, path, trail",
    "water_place": "lake, river, ocean, sea, shore, harbor, dock, pond",
    "ground": "grass*, water*, snow*, sand*, dirt*, mud*, ice*, gravel*",
    "building": "building, house, tower, church, barn, castle, skyscraper, shop, store, hotel, school",
    "structure": "door, window, wall, floor, ceiling, roof, stairs+, staircase",
    "time": "day, night",
    "sky": "sky",
    "shape": "circle, square, triangle, star, heart, diamond",
}

# Nouns that name a whole class the others fall under: never a replacement source or target.
GENERIC = {"flower", "person", "adult", "bird", "couple", "family", "crowd", "team", "animal", "vehicle", "food",
           "fruit",
           "dish", "container", "toy", "picture", "photo", "photograph", "building", "plant", "sign", "ball",
           "screen", "computer", "phone", "bag", "box", "glass", "store", "shop", "place", "meat", "cake",
           "clock", "vase", "station", "controller", "remote", "track", "court", "path", "slope", "bridge"}

# Words that mean the same (or nearly): never replaced by one another, never swapped with one another.
SYNONYMS: list[set[str]] = [
    {"man", "guy", "gentleman"}, {"woman", "lady"}, {"child", "kid"}, {"baby", "toddler", "infant"},
    {"sofa", "couch"}, {"bike", "bicycle", "motorcycle", "motorbike", "scooter"},
    {"car", "taxi", "suv", "jeep", "limo"},
    {"truck", "pickup truck", "fire truck"},
    {"airplane", "plane", "jet", "airliner", "aeroplane"}, {"boat", "ship", "sailboat", "yacht", "ferry"},
    {"kayak", "canoe"}, {"train", "locomotive", "subway train"}, {"tram", "trolley"},
    {"donut", "doughnut"}, {"hot dog", "hotdog"}, {"burger", "hamburger"}, {"cake", "cupcake", "pie", "muffin"},
    {"cookie", "biscuit"}, {"pancake", "waffle"},
    {"cat", "kitten"}, {"dog", "puppy"}, {"horse", "pony"}, {"sheep", "lamb"}, {"cow", "calf", "cattle"},
    {"bear", "polar bear", "brown bear", "black bear", "grizzly bear", "teddy bear"},
    {"refrigerator", "fridge"}, {"oven", "stove", "microwave"}, {"bathtub", "tub"}, {"toilet", "urinal"},
    {"cup", "mug", "glass", "wine glass"}, {"plate", "dish", "platter", "tray"}, {"pot", "pan", "kettle", "teapot"},
    {"bowl", "dish"}, {"jar", "bottle", "container"}, {"basket", "box", "bag", "container"},
    {"laptop", "computer", "notebook"}, {"phone", "cellphone", "cell phone", "smartphone", "telephone"},
    {"tv", "television", "monitor", "screen"}, {"remote", "remote control", "controller", "game controller"},
    {"racket", "racquet", "tennis racket"}, {"bat", "baseball bat"}, {"glove", "baseball glove", "gloves"},
    {"ball", "soccer ball", "football", "tennis ball", "basketball", "volleyball"},
    {"shirt", "t-shirt", "tee"}, {"hat", "cap", "helmet"}, {"jacket", "coat", "hoodie", "sweater"},
    {"pants", "jeans", "trousers"}, {"glasses", "sunglasses"}, {"suit", "uniform", "costume"},
    {"bag", "handbag", "purse", "backpack"}, {"suitcase", "luggage", "briefcase"},
    {"sign", "stop sign", "street sign", "billboard"}, {"hydrant", "fire hydrant"},
    {"traffic light", "street light", "street lamp", "lamp post", "pole", "lamp"}, {"parking meter", "meter"},
    {"picture", "painting", "photo", "photograph", "image", "poster"}, {"rug", "carpet"},
    {"teddy bear", "stuffed animal", "toy"}, {"doll", "toy", "action figure"}, {"toy car", "toy"},
    {"book", "magazine", "newspaper"},
    {"plant", "bush", "shrub", "potted plant"}, {"tree", "palm tree"},
    {"desk", "table", "computer desk", "dining table"},
    {"cabinet", "cupboard", "dresser", "nightstand"}, {"shelf", "bookshelf"}, {"chair", "stool", "armchair"},
    {"bathroom", "restroom"}, {"kitchen", "dining room"}, {"living room", "room"},
    {"street", "road", "highway", "avenue", "alley"}, {"ocean", "sea"}, {"forest", "woods"},
    {"hill", "hillside", "slope", "mountain"}, {"field", "meadow", "pasture", "lawn", "yard", "backyard", "grass"},
    {"beach", "shore", "sand"}, {"dock", "harbor"}, {"path", "trail", "track"}, {"sidewalk", "street"},
    {"store", "shop", "market"}, {"building", "house", "tower", "skyscraper", "hotel", "school", "church"},
    {"dirt", "mud", "gravel"}, {"snow", "ice"}, {"lake", "pond"},
    {"juice", "lemonade"}, {"soda", "lemonade"},
]
# Hypernym/hyponym pairs (a boy is a child): replacing one by the other need not change meaning.
RELATED: set[frozenset[str]] = {frozenset(p) for p in [
    ("child", "boy"), ("child", "girl"), ("kid", "boy"), ("kid", "girl"), ("child", "baby"), ("kid", "baby"),
    ("child", "toddler"), ("child", "teenager"), ("kid", "teenager"), ("boy", "teenager"), ("girl", "teenager"),
    ("boy", "baby"), ("girl", "baby"), ("man", "adult"), ("woman", "adult"), ("goat", "lamb"),
    ("cake", "cupcake"), ("dish", "plate"), ("tree", "palm tree"), ("car", "van"), ("truck", "van"),
    ("bear", "teddy bear"),
    ("kettle", "pot"), ("hat", "helmet"), ("water", "lake"), ("water", "river"), ("water", "ocean"),
    ("water", "sea"), ("water", "pond"), ("shore", "lake"), ("shore", "ocean"), ("shore", "sea"), ("shore", "river"),
]}
# Spelling variants and informal or rare words: recognised, never produced by a replacement.
NOT_TARGET = {"guy", "gentleman", "lady", "kid", "toddler", "teenager", "hotdog", "doughnut", "aeroplane", "airliner",
              "motorbike", "racquet", "cellphone", "smartphone", "fridge", "tub", "limo", "suv", "t-shirt", "hoodie",
              "grizzly bear", "black bear", "brown bear", "subway train", "locomotive", "trolley", "blimp",
              "cupboard", "nightstand", "armchair", "bookshelf", "urinal", "platter", "remote control",
              "game controller", "speaker", "microphone", "printer", "costume", "vest", "croissant", "omelet",
              "burrito", "taco", "waffle", "kiwi", "zucchini", "asparagus", "celery", "cauliflower", "lemonade",
              "soda", "hamster", "rhino", "restroom", "hallway", "classroom", "alley", "meadow", "pasture",
              "hillside", "backyard", "harbor", "gravel", "mud", "staircase", "ceiling", "pond", "yacht", "ferry",
              "jeep", "scooter", "parrot", "crow", "eagle", "owl", "swan", "toy car", "action figure",
              "potted plant", "mailbox", "trash can", "street lamp", "lamp post", "billboard", "subway train"}
# Containers: the only objects that fit "a ___ of pizza".
CONTAINERS = {"plate", "bowl", "cup", "mug", "glass", "bottle", "jar", "basket", "box", "bag", "tray", "pot", "pan",
              "vase", "container", "platter", "dish", "can", "bucket", "carton", "wine glass"}
MALE = {"man", "boy", "guy", "gentleman", "groom", "father", "son", "husband", "king", "policeman", "cowboy"}
FEMALE = {"woman", "girl", "lady", "bride", "mother", "daughter", "wife", "queen"}

# Plural noun forms that are more often third-person verbs right after a subject ("a man skis down").
VERBISH_FORMS = {"skis", "surfs", "skates", "stands", "watches", "plays", "rides", "walks", "runs", "waves", "flies",
                 "parks", "shows", "looks", "faces", "heads", "cooks", "drinks", "signs", "lights", "sinks", "kites",
                 "trains", "boxes", "ties", "caps", "bats"}

# Words that, right after a noun, make that noun a modifier ("pizza box", "tennis court", "bus stop").
COMPOUND_HEADS = set(
    "stop court field station area lot room track tracks game games player players team uniform suit shop store "
    "stand stands rack pole post light lights sign signs top tops set holder cover lid seat seats handle line "
    "lane crossing bowl food bed toy shelf case counter cart board boards glove mitt racket racquet bat ball "
    "balls park paper cake tree trees house meter hydrant fork bag box ride trip trick tricks stall sauce cone "
    "cones pan slice slices topping toppings crust pieces piece truck engine wheel wheels parlor display "
    "window windows door doors wall walls floor floors tower screen keyboard mouse monitor control controls "
    "controller controllers remote machine sandwich roll dog dogs bun buns sticks stick lot tent bottle cup "
    "utensils utensil sheet sheets rider riders park boots suitcase net tile tiles set plate plates scene "
    "setting market bench benches pen cage crate dish dishes brush brushes shower tub lamp frame frames".split()
)

COMPOUND_HEADS |= set(
    "side top front back edge corner middle view branch branches trunk show piece pile group bunch herd flock "
    "number variety lots couple pair row kind type match scene background foreground distance air head hand "
    "hands face mouth body neck legs arms hair tongue leaves leaf wave waves sun shade smoke rain handle engine "
    "crust frosting icing chips meal dinner lunch breakfast dessert snack equipment gear stuff items things "
    "ramp rail wire wires cord cable log rocks hay leash collar saddle reins booth tent stall cage pen gate "
    "lane curb crosswalk harness trailer basket slope stop hole pad mat holder mirror tray bowl station "
    "terminal port gear feeder fountain statue sculpture clock tower museum exhibit enclosure costume".split())
# Nouns that count or group another noun ("a couple of dogs", "a couple men"): a count edit leaves them alone.
QUANTIFIERS = set("couple group bunch herd flock pair lot lots number variety collection row pile stack set "
                  "dozen few plenty team crowd family line series assortment array".split())

# Nouns used as modifiers right before a head noun ("tennis court", "bathroom sink"); not objects themselves.
NOUN_MODIFIERS = set(
    "tennis baseball soccer football basketball pizza bathroom kitchen street stop fire traffic computer coffee "
    "city police passenger cargo birthday wedding dining living bus train ski surf skate snow water ice cream "
    "hot dog cat teddy stuffed toilet bath shower beach mountain park parking grass dirt brick stone wood metal "
    "steel glass plastic paper leather ceramic cell toy video office hotel school farm home door window wine "
    "beer fruit vegetable chocolate cheese chicken baby flower garden book wall night".split()
)


@dataclass(frozen=True)
class Noun:
    lemma: str
    plural: str | None  # None: mass noun
    category: str
    mass: bool = False
    plural_only: bool = False

    @property
    def generic(self) -> bool:
        return self.lemma in GENERIC

    @property
    def gender(self) -> str | None:
        return "m" if self.lemma in MALE else "f" if self.lemma in FEMALE else None

    def form(self, plural: bool) -> str:
        if self.mass or self.plural_only or not plural:
            return self.lemma
        return self.plural


def rank(lemma: str) -> int:
    """Position of a noun in its category's list (the lists run from common to rare)."""
    return _RANK.get(lemma, 50)


def _parse_nouns() -> dict[str, Noun]:
    out: dict[str, Noun] = {}
    for category, entries in NOUNS.items():
        for raw in entries.split(","):
            e = raw.strip()
            if not e:
                continue
            mass, plural_only = e.endswith("*"), e.endswith("+")
            e = e.rstrip("*+")
            lemma, _, plural = e.partition("|")
            if lemma in out:  # first category wins ("vase" is tableware, "clock" a street object)
                continue
            if mass:
                noun = Noun(lemma, None, category, mass=True)
            elif plural_only or lemma in PLURAL_ONLY:
                noun = Noun(lemma, lemma, category, plural_only=True)
            else:
                noun = Noun(lemma, plural or pluralize(lemma), category)
            out[lemma] = noun
    return out


LEXICON: dict[str, Noun] = _parse_nouns()
_RANK: dict[str, int] = {}
for _n in LEXICON.values():
    _RANK[_n.lemma] = sum(1 for m in LEXICON.values() if m.category == _n.category and m.lemma in _RANK)


def _forms() -> dict[str, list[tuple[Noun, bool | None]]]:
    """form -> [(noun, plural)]; plural None when the form is both (sheep, deer, fish)."""
    forms: dict[str, list[tuple[Noun, bool | None]]] = {}
    for n in LEXICON.values():
        if n.mass:
            forms.setdefault(n.lemma, []).append((n, False))
        elif n.plural_only:
            forms.setdefault(n.lemma, []).append((n, True))
        elif n.lemma == n.plural or n.lemma in INVARIANT_PLURALS:
            forms.setdefault(n.lemma, []).append((n, None))
        else:
            forms.setdefault(n.lemma, []).append((n, False))
            forms.setdefault(n.plural, []).append((n, True))
    for f, entries in forms.items():  # a form that is a lemma itself reads as that lemma ("glasses": eyewear)
        entries.sort(key=lambda e: e[0].lemma != f)
    return forms


NOUN_FORMS = _forms()
MAX_NOUN_WORDS = max(len(f.split()) for f in NOUN_FORMS)


def _synonym_index() -> dict[str, set[str]]:
    idx: dict[str, set[str]] = {}
    for group in SYNONYMS:
        for w in group:
            idx.setdefault(w, set()).update(group)
    return idx


_SYN = _synonym_index()


def too_close(a: str, b: str) -> bool:
    """True when swapping lemma a for b need not change meaning: equal, synonyms, or hypernym/hyponym."""
    a, b = a.lower(), b.lower()
    return a == b or b in _SYN.get(a, ()) or frozenset((a, b)) in RELATED


def _reordered(a: str, b: str) -> bool:
    """Compounds sharing a word in another position ("stop sign" / "bus stop", "bear" / "teddy bear")."""
    wa, wb = a.split(), b.split()
    return any(w in wb and (len(wa) != len(wb) or wa.index(w) != wb.index(w)) for w in wa)


@lru_cache(maxsize=None)
def replacements_for(lemma: str) -> tuple[str, ...]:
    """Nouns of the same fine category that are not too close to `lemma` (same mass/count kind)."""
    n = LEXICON[lemma]
    if n.generic or n.category == "role":
        return ()
    out = []
    for m in LEXICON.values():
        if m.category != n.category or m.generic or m.mass != n.mass or m.plural_only != n.plural_only:
            continue
        if too_close(lemma, m.lemma) or m.lemma in NOT_TARGET or _reordered(lemma, m.lemma):
            continue
        out.append(m.lemma)
    return tuple(out)


# ================================================================================================ attributes
@dataclass(frozen=True)
class AttrCategory:
    name: str
    clusters: tuple[tuple[str, ...], ...]  # words in one cluster mean the same
    order: float  # position in the English adjective order (smaller: further from the noun)


def _cat(name: str, order: float, *clusters: str) -> AttrCategory:
    return AttrCategory(name, tuple(tuple(c.split("/")) for c in clusters), order)


# Adjective order: opinion/state < size < age < weather/ground < shape < colour < pattern < material < noun.
ATTRIBUTE_CATEGORIES: dict[str, AttrCategory] = {c.name: c for c in [
    _cat("colour", 4.0, "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white",
         "gray/grey", "silver", "gold/golden", "tan/beige"),
    _cat("size", 1.0, "small/little/tiny/smaller", "large/big/huge/giant/larger/bigger"),
    _cat("height", 1.1, "tall", "short"),
    _cat("length", 1.2, "long", "short"),
    _cat("age_person", 2.0, "young", "old/elderly/older"),
    _cat("age_object", 2.0, "new/modern", "old/antique/vintage/older"),
    _cat("material", 5.0, "wooden/wood", "metal/metallic/steel/iron", "plastic", "glass", "stone/rock",
         "brick", "leather", "ceramic/porcelain", "paper/cardboard", "concrete/cement"),
    _cat("pattern", 4.5, "striped", "plaid/checkered/checked", "floral", "polka-dot/spotted"),
    _cat("fullness", 0.5, "empty", "full"),
    _cat("openness", 0.5, "open", "closed"),
    _cat("wetness", 0.5, "wet", "dry"),
    _cat("cleanness", 0.5, "clean/tidy/neat", "dirty/messy"),
    _cat("busyness", 0.5, "busy/crowded", "empty/deserted/quiet"),
    _cat("temperature", 0.5, "hot/warm", "cold/iced"),
    _cat("weather", 2.5, "sunny/clear", "cloudy/overcast", "rainy", "foggy/misty"),
    _cat("ground", 2.5, "snowy/snow-covered", "grassy", "sandy", "rocky"),
    _cat("shape_adj", 3.0, "round/circular", "square", "rectangular", "triangular", "oval"),
]}
ATTRIBUTE_WORDS: dict[str, list[str]] = {}  # word -> categories it can belong to
for _c in ATTRIBUTE_CATEGORIES.values():
    for _cl in _c.clusters:
        for _w in _cl:
            ATTRIBUTE_WORDS.setdefault(_w, []).append(_c.name)

# Colours that fit a noun category (a text-only reader spots "a purple dog"); others may take any colour.
NATURAL_COLOURS = ("black", "white", "brown", "gray", "grey", "tan")
DEMO_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
COLOURS_FOR: dict[str, tuple[str, ...]] = {
    "pet": NATURAL_COLOURS, "farm_animal": NATURAL_COLOURS, "wild_animal": NATURAL_COLOURS,
    "bird": NATURAL_COLOURS + ("red", "blue", "yellow"), "electronics": ("black", "white", "silver", "gray", "red"),
    "appliance": ("white", "black", "silver", "red"), "fixture": ("white", "black", "blue", "pink", "green"),
    "shape": DEMO_COLOURS, "ground": (), "dish": (), "fruit": ("red", "green", "yellow"), "vegetable": (),
    "meat": (), "drink": (), "plant": (), "person": (), "role": (), "room": (), "urban_place": (),
    "nature_place": (), "water_place": (),
}
COLOURS_FOR["flower"] = ("red", "yellow", "white", "pink", "purple", "orange", "blue")
# In order of use in COCO captions (white 355, black 203, red 171, ... purple 16).
COMMON_COLOURS = ("white", "black", "red", "blue", "green", "brown", "yellow", "orange", "pink", "gray", "purple",
                  "silver")

# Categories whose nouns add_obj may add (places, scenery and roles are not objects one adds to a picture).
ADDABLE_CATEGORIES = {c for c in NOUNS} - {"role", "urban_place", "nature_place", "water_place", "room", "ground",
                                            "time", "sky", "structure", "building"}

# Attribute categories an object of each noun category can take (for add_att; replace_att keeps the category).
FITS: dict[str, tuple[str, ...]] = {
    "person": ("age_person",), "pet": ("size", "colour", "age_person", "wetness"),
    "farm_animal": ("size", "colour", "age_person"), "wild_animal": ("size", "age_person"),
    "bird": ("size", "colour"), "car_like": ("colour", "size", "age_object"), "rail": ("colour", "length"),
    "aircraft": ("colour", "size"), "boat": ("colour", "size", "age_object"), "dish": ("size",),
    "fruit": ("size",), "vegetable": ("size",), "drink": ("temperature",), "meat": (),
    "furniture": ("colour", "material", "size", "age_object"), "appliance": ("colour", "size", "age_object"),
    "fixture": ("colour", "size", "cleanness"), "tableware": ("colour", "material", "size", "fullness"),
    "electronics": ("colour", "size", "age_object"), "sports": ("colour", "size"),
    "clothing": ("colour", "pattern"), "accessory": ("colour", "size", "pattern"),
    "street_object": ("colour", "size", "age_object"), "household": ("colour", "size"), "toy": ("colour", "size"),
    "plant": ("size",), "flower": ("colour",),
    "room": ("size", "cleanness"), "urban_place": ("busyness",), "nature_place": ("size",), "water_place": (),
    "ground": (),
    "building": ("size", "colour", "age_object", "material"), "shape": ("size", "colour"), "role": (),
    "structure": ("colour",), "time": ("weather",), "sky": ("weather",),
}
# Per-noun overrides of FITS.
FITS_FOR_LEMMA: dict[str, tuple[str, ...]] = {
    "boy": ("size",), "girl": ("size",), "child": ("size",), "kid": ("size",), "baby": ("size",),
    "toddler": (), "teenager": (), "street": ("busyness",), "road": ("busyness",), "highway": ("busyness",),
    "sidewalk": ("busyness",), "field": ("size", "ground"), "hill": ("ground",), "hillside": ("ground",),
    "mountain": ("ground", "size"), "beach": ("size", "busyness"), "park": ("size", "busyness"),
    "door": ("colour", "openness"), "window": ("openness",), "laptop": ("colour", "openness", "age_object"),
    "refrigerator": ("colour", "openness", "size"), "fridge": ("colour", "openness", "size"),
    "tree": ("size", "height"), "building": ("height", "colour", "age_object", "material"),
    "tower": ("height", "colour", "age_object"), "table": ("colour", "material", "size", "shape_adj", "age_object"),
    "clock": ("shape_adj", "colour", "size", "age_object"), "mirror": ("shape_adj", "size"),
    "plate": ("colour", "size", "fullness", "shape_adj"), "train": ("colour", "length"),
    "bench": ("colour", "material", "age_object"), "fence": ("material", "colour", "height"),
    "wall": ("colour", "material", "height"), "kitchen": ("size", "cleanness", "age_object"),
    "bathroom": ("size", "cleanness", "age_object"), "dress": ("colour", "pattern", "length"),
    "shirt": ("colour", "pattern"), "tie": ("colour", "pattern"), "umbrella": ("colour", "pattern", "size"),
    "vase": ("colour", "material", "size"), "pizza": ("size",), "sky": ("weather",), "day": ("weather",),
}

# Attribute categories a replacement of a word may draw from, by noun category ("old" man -> "young"; "old"
# truck -> "new").
AGE_CATEGORY_FOR = {"person": "age_person", "pet": "age_person", "farm_animal": "age_person",
                    "wild_animal": "age_person", "bird": "age_person", "role": "age_person"}

# ================================================================================================ counts
COUNT_WORDS = dict(NUMBER_WORDS)  # "two" -> 2 (negatives.text.grammar.NUMBER_WORDS)
MAX_COUNT_EDIT = 6  # counts a replacement may produce

# ================================================================================================ relations
# phrase -> phrases that contradict it. Phrases are lower-case word sequences.
SPATIAL: dict[str, tuple[str, ...]] = {
    # replacements run from common to rare in captions (next to 328, on top of 195, in front of 189, near 154,
    # behind 85, outside 65, over 53, under 44, inside 39, above 30, beside 27, underneath 13, below 9 in COCO):
    # a rare replacement of a common phrase is a cue by itself, so the common ones are drawn more often
    "to the left of": ("to the right of",), "to the right of": ("to the left of",),
    "on the left of": ("on the right of",), "on the right of": ("on the left of",),
    "left of": ("right of",), "right of": ("left of",),
    "on the left side of": ("on the right side of",), "on the right side of": ("on the left side of",),
    "above": ("below", "under"), "below": ("above",), "over": ("under",), "underneath": ("on top of",),
    "beneath": ("on top of",), "under": ("on top of", "next to"),
    "on top of": ("under", "next to"), "atop": ("under",),
    "in front of": ("behind",), "behind": ("in front of", "next to"),
    "inside": ("outside",), "inside of": ("outside of",), "outside": ("inside",), "outside of": ("inside of",),
    "into": ("out of",), "out of": ("into",),
    "toward": ("away from",), "towards": ("away from",), "away from": ("toward",),
    "next to": ("behind", "in front of", "far from"), "beside": ("behind", "in front of", "far from"),
    "near": ("behind", "in front of", "far from"),
    "far from": ("next to",), "close to": ("far from",),
    "on": ("next to", "under"), "in": ("next to", "outside"),
    "up": ("down",), "down": ("up",),
}
# Phrases of the same meaning: never a replacement of one another.
SPATIAL_SYNONYMS: list[set[str]] = [
    {"next to", "beside", "near", "by", "close to", "alongside", "nearby"},
    {"above", "over", "on top of", "atop"}, {"below", "under", "underneath", "beneath"},
    {"on", "on top of", "atop", "upon"}, {"in", "inside", "inside of", "within"},
    {"outside", "outside of"}, {"far from", "away from"}, {"toward", "towards"},
    {"to the left of", "on the left of", "left of", "on the left side of"},
    {"to the right of", "on the right of", "right of", "on the right side of"},
]
# Relations add_obj may attach a new object with ("a cat next to a dog").
ADD_RELATIONS = ("next to", "behind", "in front of", "near")
# ...and, in captions that place things by direction (the demo domain), these.
DIRECTIONAL = ("to the left of", "to the right of", "above", "below")
# "on"/"in" only before these object categories, with these replacements.
ON_REPLACEMENTS: dict[str, tuple[str, ...]] = {
    "furniture": ("next to", "under"), "tableware": ("next to",), "appliance": ("next to",),
    "fixture": ("next to",), "urban_place": ("next to",), "nature_place": ("next to",), "water_place": ("next to",),
    "ground": (), "car_like": ("next to",),
    "rail": ("next to",), "boat": ("next to",), "sports": ("next to",), "pet": ("next to",),
    "farm_animal": ("next to",), "wild_animal": ("next to",), "street_object": ("next to",),
    "household": ("next to", "under"), "building": ("next to",),
}
IN_REPLACEMENTS: dict[str, tuple[str, ...]] = {
    "room": ("outside",), "building": ("outside",), "car_like": ("next to",), "rail": ("next to",),
    "boat": ("next to",), "fixture": ("next to",), "tableware": ("next to",), "furniture": ("next to",),
    "appliance": ("next to",), "urban_place": ("next to",), "nature_place": ("next to",),
}
# Verbs/words right before "on"/"in" that make it part of another phrase ("talking on", "turned on").
ON_IN_BLOCKERS = {"talking", "talks", "talk", "turned", "turn", "based", "depends", "focused", "focus", "written",
                  "printed", "painted", "drawn", "displayed", "shown", "put", "puts", "putting", "dressed",
                  "dress", "getting", "gets", "get", "hang", "hanging", "hangs", "try", "trying", "tries",
                  "take", "takes", "taking", "carry", "carried", "engaged", "interested", "reflected",
                  "reflection", "spelled", "spelt", "typed", "typing", "playing", "plays", "play", "working",
                  "works", "work", "cut", "cuts", "cutting", "written", "wrapped", "stuck", "mounted", "lined",
                  "covered", "filled", "served", "topped", "loaded", "parked", "stacked"}
# "up"/"down" only after these motion verbs.
UP_DOWN_VERBS = {"walking", "walks", "walk", "going", "goes", "go", "running", "runs", "run", "riding", "rides",
                 "ride", "heading", "heads", "coming", "comes", "climbing", "climbs", "skiing", "skis", "driving",
                 "drives", "traveling", "travels", "travelling", "moving", "moves", "rolling", "rolls",
                 "looking", "looks", "skateboarding", "biking", "cycling", "sledding", "hiking", "jogging"}

# Action verbs of animate subjects: lemma forms (ing, third person, base) by cluster; replacements from another
# cluster of the same group.
VERB_GROUPS: dict[str, list[tuple[tuple[str, str, str], ...]]] = {
    "posture": [
        (("sitting", "sits", "sit"),),
        (("standing", "stands", "stand"),),
        (("lying", "lies", "lie"), ("laying", "lays", "lay")),
    ],
    "locomotion": [
        (("walking", "walks", "walk"),),
        (("running", "runs", "run"), ("jogging", "jogs", "jog")),
    ],
    "push_pull": [(("pushing", "pushes", "push"),), (("pulling", "pulls", "pull"),)],
    "enter_leave": [(("entering", "enters", "enter"),), (("leaving", "leaves", "leave"), ("exiting", "exits", "exit"))],
    "open_close": [(("opening", "opens", "open"),), (("closing", "closes", "close"),)],
    "throw_catch": [(("throwing", "throws", "throw"),), (("catching", "catches", "catch"),)],
}
VERB_FORMS: dict[str, tuple[str, int, int, int]] = {}  # form -> (group, cluster index, form index 0/1/2, variant)
for _g, _clusters in VERB_GROUPS.items():
    for _ci, _cl in enumerate(_clusters):
        for _vi, _forms_ in enumerate(_cl):
            for _fi, _f in enumerate(_forms_):
                VERB_FORMS.setdefault(_f, (_g, _ci, _fi, _vi))
# Verbs whose form is ambiguous with a noun or another use when not after a subject.
VERB_AMBIGUOUS = {"sit", "stand", "lie", "lay", "walk", "run", "jog", "push", "pull", "enter", "leave", "exit",
                  "open", "close", "throw", "catch", "lies", "leaves", "stands", "runs", "walks", "catches",
                  "opens", "closes", "exits"}
ANIMATE_CATEGORIES = {"person", "role", "pet", "farm_animal", "wild_animal", "bird"}
PLACE_CATEGORIES = {"room", "urban_place", "nature_place", "water_place", "ground", "building", "time", "sky",
                    "structure"}
# Objects one counts ("two plates"); clothing, places and scenery are not.
COUNTABLE_CATEGORIES = set(NOUNS) - PLACE_CATEGORIES - {"clothing", "drink", "ground", "meat"}


# Categories whose nouns may swap places (swap_obj): a man and a dog, a car and a bus, a cake and a salad
# read as well either way round; a hat and a cell phone, a vase and tulips do not.
SWAP_GROUPS: dict[str, str] = {}
for _grp, _cats in {
    "animate": ("person", "role", "pet", "farm_animal", "wild_animal", "bird"),
    "vehicle": ("car_like", "rail", "aircraft", "boat"),
    "food": ("dish", "fruit", "vegetable", "meat"),
    "furnishing": ("furniture", "appliance", "fixture"),
    "tableware": ("tableware",), "electronics": ("electronics",), "clothing": ("clothing", "accessory"),
    "street": ("street_object", "plant", "building"), "toy": ("toy", "sports", "household"),
    "shape": ("shape",), "place": ("room", "urban_place", "nature_place", "water_place"),
}.items():
    for _c in _cats:
        SWAP_GROUPS[_c] = _grp


def coarse(category: str) -> str:
    """animate, place or object."""
    return "animate" if category in ANIMATE_CATEGORIES else "place" if category in PLACE_CATEGORIES else "object"


# ================================================================================================ synonyms
def relation_too_close(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a == b or any(a in g and b in g for g in SPATIAL_SYNONYMS)


def attribute_cluster(category: str, word: str) -> int | None:
    for i, cl in enumerate(ATTRIBUTE_CATEGORIES[category].clusters):
        if word.lower() in cl:
            return i
    return None
