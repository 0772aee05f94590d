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
