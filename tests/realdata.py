"""Paths of the real data under tests/data (README.md there says what each set is and its licence)."""
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
LAION = DATA / "laion-alt-text" / "laion_1000.parquet"
SUGARCREPE = DATA / "sugarcrepe"
SUGARCREPE_FILES = sorted(str(p) for p in SUGARCREPE.glob("*.json"))
LAION_LABELS = DATA / "laion-alt-text" / "labels.csv"  # hand labels of LAION's captions (LABELS.md beside it)
# The caption filters' validation set: 2,000 other LAION captions, labelled by the same rules; never tuned on.
LAION_VALIDATION = DATA / "laion-alt-text" / "laion_2000_validation.parquet"
LAION_VALIDATION_LABELS = DATA / "laion-alt-text" / "labels_validation.csv"
# A development set for the caption filters: the other 6,990 LAION captions of the same source, labelled the same way.
LAION_DEV = DATA / "laion-alt-text" / "laion_6990_dev.parquet"
LAION_DEV_LABELS = DATA / "laion-alt-text" / "labels_dev.csv"


# Real photos that ship in installed packages (scikit-image's data folder, scikit-learn's sample images).
_SITE = Path(__import__("numpy").__file__).resolve().parents[1]
PHOTOS = [_SITE / "skimage" / "data" / n for n in (
    "astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg",
    "hubble_deep_field.jpg", "retina.jpg")] + [_SITE / "sklearn" / "datasets" / "images" / n
                                               for n in ("china.jpg", "flower.jpg")]


def web_jpegs(n: int, seed: int = 0, sides: tuple[int, int] = (640, 1280), tiled: bool = True) -> list[bytes]:
    """n JPEGs of web size (each side in `sides`, mostly landscape 4:3, quality 80-90, 4:2:0) made of the real
    photos above. tiled: each image is filled with crops of the photos at about their own scale (0.8-1.25x), so
    its detail is a real photo's at that size, as a web image's is (a photo blown up would be smoother, and cheaper
    to decode); else one photo scaled to the size."""
    import io
    import random

    from PIL import Image

    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    out = []
    for _ in range(n):
        w = rng.randint(*sides)
        h = max(sides[0] * 3 // 4, min(sides[1], w * 3 // 4 if rng.random() < 0.7 else rng.randint(*sides)))
        if not tiled:
            canvas = rng.choice(photos).resize((w, h), Image.Resampling.LANCZOS)
        else:
            canvas = Image.new("RGB", (w, h))
            y = 0
            while y < h:
                x, row = 0, 0
                while x < w:
                    p = rng.choice(photos)
                    s = rng.uniform(0.8, 1.25)
                    p = p.resize((int(p.width * s), int(p.height * s)), Image.Resampling.BICUBIC)
                    cw, ch = min(p.width, w - x), min(p.height, h - y)
                    ox, oy = rng.randint(0, p.width - cw), rng.randint(0, p.height - ch)
                    canvas.paste(p.crop((ox, oy, ox + cw, oy + ch)), (x, y))
                    x, row = x + cw, max(row, ch)
                y += row
        b = io.BytesIO()
        canvas.save(b, "JPEG", quality=rng.choice((80, 85, 90)))
        out.append(b.getvalue())
    return out
