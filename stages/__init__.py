"""One file per stage. The registry maps spec names to classes, imported lazily (model stages pull torch)."""
from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "clean": "stages.clean:CleanStage",
    "dedup": "stages.dedup:DedupStage",
    "basic": "stages.basic:BasicStage",
    "language": "stages.language:LanguageStage",
    "junk": "stages.junk:JunkStage",
    "align": "stages.align:AlignStage",
    "safety": "stages.safety:SafetyStage",
    "text": "stages.text:TextStage",
    "recaption": "stages.recaption:RecaptionStage",
    "negatives_text": "stages.negatives_text:NegativesTextStage",
}


def stage_class(name: str):
    try:
        module, cls = REGISTRY[name].split(":")
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {sorted(REGISTRY)}") from None
    return getattr(importlib.import_module(module), cls)
