"""A synthetic scene domain drawn with PIL: coloured shapes on smooth random backgrounds.

A `Scene` is 1-3 groups of identical objects (shape, colour, size, count); a two-group scene also has a spatial
relation between the groups that the drawn layout satisfies (every object of the first group lies strictly
left of / right of / above / below every object of the second). The model is pure and immutable: edit a scene
with `dataclasses.replace` (or `Scene.with_groups`) and re-render it with the same seed to get the same background
and layout, e.g. for hard negatives with swapped colours.

Rendering is deterministic for (scene, size, seed). The layout draws only depend on the groups' sizes and
counts and the relation (not on shapes or colours), so swapping colours or shapes keeps every position.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 165, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 25),
    "purple": (140, 45, 185),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# "medium" objects are drawn between small and large and their size is not mentioned in captions.
SIZES: tuple[str, ...] = ("small", "medium", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
MAX_COUNT = 3

# Bounding-circle radius of one object, as a fraction of the image side.
_RADIUS = {"small": (0.055, 0.070), "medium": (0.090, 0.105), "large": (0.145, 0.175)}
_GAP = 0.03  # minimum free space between objects and between the two groups of a relation, fraction of the side
_SS = 2  # supersampling factor for the shapes


@dataclass(frozen=True)
class Group:
    shape: str
    color: str
    size: str = "medium"
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if not 1 <= int(self.count) <= MAX_COUNT:
            raise ValueError(f"count must be 1..{MAX_COUNT}, got {self.count}")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "count": int(self.count)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Group":
        return cls(shape=d["shape"], color=d["color"], size=d.get("size", "medium"), count=int(d.get("count", 1)))


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    relation: str | None = None  # only with exactly two groups: groups[0] <relation> groups[1]

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not 1 <= len(self.groups) <= 3:
            raise ValueError(f"a scene has 1-3 groups, got {len(self.groups)}")
        if len(self.groups) == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"a two-group scene needs a relation in {RELATIONS}, got {self.relation!r}")
        elif self.relation is not None:
            raise ValueError("only two-group scenes have a relation")

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def with_groups(self, *groups: Group) -> "Scene":
        return replace(self, groups=tuple(groups))

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(groups=tuple(Group.from_dict(g) for g in d["groups"]), relation=d.get("relation"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Scene":
        return cls.from_dict(json.loads(s))


# ---------------------------------------------------------------- sampling


def sample_scene(rng: random.Random, shape_weights: list[float] | None = None,
                 color_weights: list[float] | None = None) -> Scene:
    """A random scene: 1 group (40%), 2 groups with a relation (45%) or 3 groups (15%), distinct (shape, colour);
    shapes and colours uniform, or drawn with weights (in SHAPES and COLORS order: a head-heavy crawl)."""
    n_groups = rng.choices((1, 2, 3), weights=(0.40, 0.45, 0.15))[0]
    max_count = 2 if n_groups == 3 else 3
    seen: set[tuple[str, str]] = set()
    groups = []
    while len(groups) < n_groups:
        shape = rng.choice(SHAPES) if shape_weights is None else rng.choices(SHAPES, shape_weights)[0]
        color = rng.choice(tuple(COLORS)) if color_weights is None else rng.choices(tuple(COLORS), color_weights)[0]
        if (shape, color) in seen:
            continue
        seen.add((shape, color))
        size = rng.choices(SIZES, weights=(0.35, 0.30, 0.35))[0]
        count = rng.choices((1, 2, 3), weights=(0.5, 0.3, 0.2))[0]
        if size == "large" and n_groups > 1:
            count = min(count, 2)  # room for the other groups
        groups.append(Group(shape, color, size, min(count, max_count)))
    relation = rng.choice(RELATIONS) if n_groups == 2 else None
    return Scene(tuple(groups), relation)


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def noun_phrase(group: Group) -> str:
    """'a large red circle', 'an orange star', 'two small blue squares', 'three green triangles'."""
    words = []
    if group.size != "medium":
        words.append(group.size)
    words.append(group.color)
    noun = group.shape if group.count == 1 else group.shape + "s"
    words.append(noun)
    head = _article(words[0]) if group.count == 1 else NUMBER_WORDS[group.count]
    return " ".join([head] + words)


_PREFIXES = ("a picture of ", "an image of ", "a drawing of ", "a simple drawing of ", "an illustration of ")


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A grammatical English caption that says exactly what is drawn.

    Without `rng` the canonical caption; with `rng` an equivalent variant (the relation stated from the other
    group, the groups of a three-group scene in another order, an optional 'a picture of ...' prefix).
    """
    groups = list(scene.groups)
    relation = scene.relation
    prefix = ""
    if rng is not None:
        if len(groups) == 2 and rng.random() < 0.5:
            groups = groups[::-1]
            relation = INVERSE_RELATION[relation]
        elif len(groups) == 3:
            rng.shuffle(groups)
        if rng.random() < 0.3:
            prefix = rng.choice(_PREFIXES)
    phrases = [noun_phrase(g) for g in groups]
    if len(phrases) == 1:
        text = phrases[0]
    elif len(phrases) == 2:
        text = f"{phrases[0]} {RELATION_PHRASE[relation]} {phrases[1]}"
    else:
        text = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    return prefix + text


# Translations (German, French, Spanish) written from the scene structure with a small lexicon.
_FR_SHAPE = {  # noun, gender, plural
    "circle": ("cercle", "m", "cercles"),
    "square": ("carré", "m", "carrés"),
    "triangle": ("triangle", "m", "triangles"),
    "star": ("étoile", "f", "étoiles"),
    "heart": ("cœur", "m", "cœurs"),
    "diamond": ("losange", "m", "losanges"),
}
_FR_COLOR = {  # m sg, f sg, m pl, f pl
    "red": ("rouge", "rouge", "rouges", "rouges"),
    "green": ("vert", "verte", "verts", "vertes"),
    "blue": ("bleu", "bleue", "bleus", "bleues"),
    "yellow": ("jaune", "jaune", "jaunes", "jaunes"),
    "purple": ("violet", "violette", "violets", "violettes"),
    "orange": ("orange", "orange", "orange", "orange"),
    "white": ("blanc", "blanche", "blancs", "blanches"),
    "black": ("noir", "noire", "noirs", "noires"),
}
_FR_SIZE = {
    "small": ("petit", "petite", "petits", "petites"),
    "large": ("grand", "grande", "grands", "grandes"),
}
_FR_REL = {"left of": "à gauche", "right of": "à droite", "above": "au-dessus", "below": "en dessous"}

_ES_SHAPE = {
    "circle": ("círculo", "m", "círculos"),
    "square": ("cuadrado", "m", "cuadrados"),
    "triangle": ("triángulo", "m", "triángulos"),
    "star": ("estrella", "f", "estrellas"),
    "heart": ("corazón", "m", "corazones"),
    "diamond": ("rombo", "m", "rombos"),
}
_ES_COLOR = {
    "red": ("rojo", "roja", "rojos", "rojas"),
    "green": ("verde", "verde", "verdes", "verdes"),
    "blue": ("azul", "azul", "azules", "azules"),
    "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
    "purple": ("morado", "morada", "morados", "moradas"),
    "orange": ("naranja", "naranja", "naranja", "naranja"),
    "white": ("blanco", "blanca", "blancos", "blancas"),
    "black": ("negro", "negra", "negros", "negras"),
}
_ES_SIZE = {
    "small": ("pequeño", "pequeña", "pequeños", "pequeñas"),
    "large": ("gran", "gran", "grandes", "grandes"),
}
_ES_REL = {"left of": "a la izquierda de", "right of": "a la derecha de", "above": "encima de", "below": "debajo de"}

_DE_SHAPE = {  # noun, gender, plural, dative plural
    "circle": ("Kreis", "m", "Kreise", "Kreisen"),
    "square": ("Quadrat", "n", "Quadrate", "Quadraten"),
    "triangle": ("Dreieck", "n", "Dreiecke", "Dreiecken"),
    "star": ("Stern", "m", "Sterne", "Sternen"),
    "heart": ("Herz", "n", "Herzen", "Herzen"),
    "diamond": ("Raute", "f", "Rauten", "Rauten"),
}
_DE_DATIVE_SG = {"Herz": "Herzen"}
_DE_COLOR = {
    "red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "violett",
    "orange": "orangefarben", "white": "weiß", "black": "schwarz",
}
_DE_SIZE = {"small": "klein", "large": "groß"}
_DE_REL = {"left of": "links von", "right of": "rechts von", "above": "über", "below": "unter"}


def _fr_np(g: Group, after_de: bool = False) -> str:
    noun, gender, plural = _FR_SHAPE[g.shape]
    idx = (0 if gender == "m" else 1) + (0 if g.count == 1 else 2)
    color = _FR_COLOR[g.color][idx]
    size = (_FR_SIZE[g.size][idx] + " ") if g.size in _FR_SIZE else ""
    if g.count == 1:
        det = "un" if gender == "m" else "une"
        if after_de:
            det = "d'" + det
        return f"{det} {size}{noun} {color}"
    num = {2: "deux", 3: "trois"}[g.count]
    return f"{'de ' if after_de else ''}{num} {size}{plural} {color}"


def _es_np(g: Group) -> str:
    noun, gender, plural = _ES_SHAPE[g.shape]
    idx = (0 if gender == "m" else 1) + (0 if g.count == 1 else 2)
    color = _ES_COLOR[g.color][idx]
    size = (_ES_SIZE[g.size][idx] + " ") if g.size in _ES_SIZE else ""
    if g.count == 1:
        det = "un" if gender == "m" else "una"
        return f"{det} {size}{noun} {color}"
    num = {2: "dos", 3: "tres"}[g.count]
    return f"{num} {size}{plural} {color}"


def _de_np(g: Group, dative: bool = False) -> str:
    noun, gender, plural, dat_plural = _DE_SHAPE[g.shape]
    adjs = [a for a in (_DE_SIZE.get(g.size), _DE_COLOR[g.color]) if a]
    if g.count == 1:
        if dative:
            det = "einer" if gender == "f" else "einem"
            ending = "en"
            noun = _DE_DATIVE_SG.get(noun, noun)
        else:
            det = "eine" if gender == "f" else "ein"
            ending = {"m": "er", "n": "es", "f": "e"}[gender]
        return " ".join([det] + [a + ending for a in adjs] + [noun])
    num = {2: "zwei", 3: "drei"}[g.count]
    ending = "en" if dative else "e"
    return " ".join([num] + [a + ending for a in adjs] + [dat_plural if dative else plural])


def caption_foreign(scene: Scene, lang: str) -> str:
    """The canonical caption in German ('de'), French ('fr') or Spanish ('es')."""
    g = scene.groups
    if lang == "fr":
        if len(g) == 1:
            return _fr_np(g[0])
        if len(g) == 2:
            return f"{_fr_np(g[0])} {_FR_REL[scene.relation]} {_fr_np(g[1], after_de=True)}"
        return f"{_fr_np(g[0])}, {_fr_np(g[1])} et {_fr_np(g[2])}"
    if lang == "es":
        if len(g) == 1:
            return _es_np(g[0])
        if len(g) == 2:
            return f"{_es_np(g[0])} {_ES_REL[scene.relation]} {_es_np(g[1])}"
        last = _es_np(g[2])
        conj = "e" if last[:1].lower() == "i" else "y"
        return f"{_es_np(g[0])}, {_es_np(g[1])} {conj} {last}"
    if lang == "de":
        if len(g) == 1:
            return _de_np(g[0])
        if len(g) == 2:
            return f"{_de_np(g[0])} {_DE_REL[scene.relation]} {_de_np(g[1], dative=True)}"
        return f"{_de_np(g[0])}, {_de_np(g[1])} und {_de_np(g[2])}"
    raise ValueError(f"unknown language {lang!r}; expected de, fr or es")


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class Placed:
    """One drawn object: its group index, centre and bounding-circle radius in pixels, rotation in degrees."""

    group: int
    x: float
    y: float
    r: float
    rotation: float
    jitter: tuple[float, ...] = field(default=())


def _regions(scene: Scene, split: float) -> list[tuple[float, float, float, float]]:
    """Per group the allowed box (x0, y0, x1, y1) for object centres' bounding circles, in unit coordinates."""
    full = (0.0, 0.0, 1.0, 1.0)
    if len(scene.groups) != 2:
        return [full] * len(scene.groups)
    lo, hi = split - _GAP / 2, split + _GAP / 2
    first, second = {
        "left of": ((0.0, 0.0, lo, 1.0), (hi, 0.0, 1.0, 1.0)),
        "right of": ((hi, 0.0, 1.0, 1.0), (0.0, 0.0, lo, 1.0)),
        "above": ((0.0, 0.0, 1.0, lo), (0.0, hi, 1.0, 1.0)),
        "below": ((0.0, hi, 1.0, 1.0), (0.0, 0.0, 1.0, lo)),
    }[scene.relation]
    return [first, second]


def _try_layout(scene: Scene, rng: random.Random, scale: float) -> list[Placed] | None:
    split = rng.uniform(0.42, 0.58)
    regions = _regions(scene, split)
    placed: list[Placed] = []
    margin = 0.02
    for gi, g in enumerate(scene.groups):
        x0, y0, x1, y1 = regions[gi]
        for _ in range(g.count):
            lo, hi = _RADIUS[g.size]
            r = rng.uniform(lo, hi) * scale
            rotation = rng.uniform(-1.0, 1.0)
            jitter = (rng.random(), rng.random())
            for _try in range(120):
                cx = rng.uniform(x0 + r + margin, x1 - r - margin) if x1 - x0 > 2 * (r + margin) else None
                cy = rng.uniform(y0 + r + margin, y1 - r - margin) if y1 - y0 > 2 * (r + margin) else None
                if cx is None or cy is None:
                    return None
                if all(math.hypot(cx - p.x, cy - p.y) >= r + p.r + _GAP for p in placed):
                    placed.append(Placed(gi, cx, cy, r, rotation, jitter))
                    break
            else:
                return None
    if len(scene.groups) == 2:
        a = [p for p in placed if p.group == 0]
        b = [p for p in placed if p.group == 1]
        dx = abs(sum(p.x for p in a) / len(a) - sum(p.x for p in b) / len(b))
        dy = abs(sum(p.y for p in a) / len(a) - sum(p.y for p in b) / len(b))
        along, across = (dx, dy) if scene.relation in ("left of", "right of") else (dy, dx)
        if across > 0.6 * along:  # keep 'left of' from reading as 'above' as well
            return None
    return placed


def layout_scene(scene: Scene, seed: int) -> list[Placed]:
    """Object positions in unit coordinates (0..1), deterministic for (sizes, counts, relation, seed)."""
    rng = random.Random(seed)
    scale = 1.0
    for attempt in range(60):
        placed = _try_layout(scene, rng, scale)
        if placed is not None:
            return placed
        if attempt % 6 == 5:
            scale *= 0.92
    raise RuntimeError(f"could not lay out {scene!r}")  # pragma: no cover


# ---------------------------------------------------------------- drawing


_BG_RES = 48  # the background is smooth: compute it on a coarse grid and upsample


def _background(size: int, rng: random.Random) -> np.ndarray:
    """A smooth random background: a two-colour linear gradient in a random direction plus faint blobs.

    Returns a (res, res, 3) uint8 array on a coarse grid (res <= size); the caller upsamples it.
    """
    res = min(size, _BG_RES)
    nrng = np.random.default_rng(rng.getrandbits(64))
    # Two low-saturation colours with clearly different luminance.
    l1 = rng.uniform(70, 195)
    while True:
        l2 = rng.uniform(70, 195)
        if abs(l2 - l1) >= 55:
            break

    def tinted(lum: float) -> np.ndarray:
        tint = nrng.normal(0, 1, 3)
        tint -= tint.mean()
        tint /= np.abs(tint).max() + 1e-6
        return (lum + tint * rng.uniform(0, 28)).astype(np.float32)

    c1, c2 = tinted(l1), tinted(l2)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:res, 0:res].astype(np.float32) / max(res - 1, 1)
    proj = (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)
    t = (proj - proj.min()) / (proj.max() - proj.min() + 1e-6)
    # A random non-linear ramp keeps gradients with similar directions apart.
    t = t ** rng.uniform(0.6, 1.6)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    for _ in range(rng.randint(3, 6)):
        cx, cy = rng.uniform(-0.1, 1.1), rng.uniform(-0.1, 1.1)
        sigma = rng.uniform(0.1, 0.28)
        amp = rng.uniform(22, 48) * rng.choice((-1, 1))
        w = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
        tint = (1 + nrng.normal(0, 0.15, 3)).astype(np.float32)
        img += w[..., None] * (amp * tint)[None, None, :]
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_points(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Polygon of a shape inside the bounding circle (cx, cy, r); rotation in [-1, 1] is a small tilt."""
    pts: list[tuple[float, float]]
    if shape == "square":
        tilt, s = rotation * 12, 0.74 * r
        base = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "diamond":
        tilt = rotation * 6
        base = [(0, -r), (0.68 * r, 0), (0, r), (-0.68 * r, 0)]
    elif shape == "triangle":
        tilt = rotation * 10
        base = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a)) + 0.12 * r) for a in (-90, 30, 150)]
    elif shape == "star":
        tilt = rotation * 10
        base = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = math.radians(-90 + 36 * k)
            base.append((rad * math.cos(a), rad * math.sin(a) + 0.05 * r))
    elif shape == "heart":
        tilt = rotation * 10
        base = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            base.append((x * r / 17, -(y + 2.5) * r / 17))
    else:
        raise ValueError(shape)
    c, s_ = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    pts = [(cx + x * c - y * s_, cy + x * s_ + y * c) for x, y in base]
    return pts


def _outline(color: str) -> tuple[int, int, int] | None:
    if color == "black":
        return None
    if color == "white":
        return (110, 110, 110)
    return tuple(int(v * 0.55) for v in COLORS[color])


def render_scene(scene: Scene, size: int = 128, seed: int = 0) -> Image.Image:
    """Draw `scene` as a size x size RGB image; deterministic for (scene, size, seed)."""
    master = random.Random(seed)
    bg_seed, layout_seed = master.getrandbits(64), master.getrandbits(64)
    bg = _background(size, random.Random(bg_seed))
    big = size * _SS
    canvas = Image.fromarray(bg, "RGB").resize((big, big), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(big / 128))
    for p in layout_scene(scene, layout_seed):
        g = scene.groups[p.group]
        cx, cy, r = p.x * big, p.y * big, p.r * big
        fill = COLORS[g.color]
        outline = _outline(g.color)
        if g.shape == "circle":
            rr = 0.92 * r
            box = (cx - rr, cy - rr, cx + rr, cy + rr)
            draw.ellipse(box, fill=fill, outline=outline, width=width if outline else 0)
        else:
            pts = _shape_points(g.shape, cx, cy, r, p.rotation)
            draw.polygon(pts, fill=fill, outline=outline, width=width if outline else 0)
    return canvas.reduce(_SS)


def render(scene: Scene, size: int = 128, rng: random.Random | None = None) -> Image.Image:
    """Draw `scene` with a seed taken from `rng` (a fresh random one without it)."""
    rng = rng or random.Random()
    return render_scene(scene, size, rng.getrandbits(63))


def sample_pairs(n: int, seed: int = 0, size: int = 128) -> tuple[list[Image.Image], list[str]]:
    """(RGB images, true captions) of n demo scenes drawn from Random(seed): the fixed demo sample that
    benchmarks/recaption.py --report and tests/test_recaption.py both measure."""
    rng = random.Random(seed)
    images, texts = [], []
    for i in range(n):
        scene = sample_scene(rng)
        images.append(render_scene(scene, size, seed * 100_003 + i).convert("RGB"))
        texts.append(caption(scene, rng))
    return images, texts


def encode_jpeg(im: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of a rendered image (the demo corpus encodes at 90)."""
    import io

    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def scene_batch(n: int, seed: int = 11, size: int = 128, quality: int = 95):
    """(pa.Table of uid, text, image; per-row contexts {scene, render_seed}) of n demo scenes from Random(seed):
    what the render editor (demo.render_editor.RenderEditor) needs to redraw a scene."""
    import pyarrow as pa

    rng = random.Random(seed)
    uids, texts, images, contexts = [], [], [], []
    for i in range(n):
        scene = sample_scene(rng)
        render_seed = rng.getrandbits(63)
        uids.append(f"u{i:05d}")
        texts.append(caption(scene, rng))
        images.append(encode_jpeg(render_scene(scene, size, render_seed), quality))
        contexts.append({"scene": scene.to_json(), "render_seed": render_seed})
    return pa.table({"uid": uids, "text": texts, "image": images}), contexts
