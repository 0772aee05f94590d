"""No file the project reads can run code: no pickle, no torch.load without weights_only=True, no remote code."""
from __future__ import annotations

import re
from pathlib import Path

from tests.layout import project_packages

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in project_packages() + ["benchmarks"] for p in (ROOT / d).rglob("*.py")]
FORBIDDEN = {
    r"\bimport (c?pickle|dill|joblib|cloudpickle)\b": "a pickle module",
    r"\bpickle\.loads?\(": "unpickling",
    r"weights_only\s*=\s*False": "torch.load of a pickle",
    r"trust_remote_code": "running a model repository's code",
    r"allow_pickle\s*=\s*True": "numpy arrays of pickled objects",
}


def test_no_source_unpickles_or_runs_remote_code():
    assert len(SOURCES) > 40
    found = []
    for path in SOURCES:
        text = path.read_text()
        for pattern, what in FORBIDDEN.items():
            for m in re.finditer(pattern, text):
                found.append(f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {what}")
        for m in re.finditer(r"\btorch\.load\(", text):  # every torch.load names weights_only=True
            call = text[m.start():text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                found.append(f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {call}")
    assert not found, "\n".join(found)
