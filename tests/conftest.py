import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import flows.env  # noqa: E402,F401
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # keeps Prefect quiet at interpreter exit
