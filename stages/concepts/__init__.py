"""Concepts for the balance stage (MetaCLIP's curation): the concept lists (`lists`) and the caption matcher
(`matcher`). Only stages/balance.py uses them."""
from __future__ import annotations

from stages.concepts.lists import ConceptList, ConceptListError, load_concepts
from stages.concepts.matcher import Matcher, matcher_for, spaced_entry, spacing

__all__ = ["ConceptList", "ConceptListError", "Matcher", "load_concepts", "matcher_for", "spaced_entry", "spacing"]
