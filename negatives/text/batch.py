"""Negative captions of a batch of texts, as the negatives_text stage makes them.

1. candidates: rule negatives (negatives_for; `pool` per kind when selecting) or, for method "lm", an LM's
   completions (LmNegatives);
2. plausibility selection (rule method, select_plausible): per caption and kind, the per_kind candidates whose
   score is closest to the caption's, by k-fold n-gram LMs fitted on the batch's captions (a caption is scored by
   the LM of the other folds) or by a causal LM (plausibility "lm");
3. blind check (max_blind_bias): per kind with at least blind_min_pairs pairs, drop the pairs the scorer tells apart
   most easily until the share it prefers the caption in lies within [1 - b, b], b = max_blind_bias - BLIND_SLACK
   (add_* kinds, and all kinds with blind_two_sided off, against b only).
So a caption's negatives depend on its batch (through the fold LMs). A causal LM is loaded only for method or
plausibility "lm", through the `load_lm` given (name -> loaded LM, e.g. stages.models.lm.shared_lm).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

from negatives.text.edits import Negative
from negatives.text.generators import negatives_for
from negatives.text.options import NegativeTextOptions
from negatives.text.prompting import LmNegatives, lm_generator
from negatives.text.scoring import BLIND_FOLDS, BLIND_SLACK, FOLD_SALT, LmScorer, fold_lms, rebalance

MAX_CAPTION_CHARS = 2000  # longer captions get no negatives: no text encoder reads that far; they cost seconds each


class BatchNegatives:
    """Negatives per caption of each batch it is called on; `dropped_by_blind_check` counts, per kind, what the
    blind check dropped over all batches so far."""

    def __init__(self, options: NegativeTextOptions, load_lm: Callable[[str], object] | None = None):
        self.options = options
        self.load_lm = load_lm
        self.dropped_by_blind_check: Counter = Counter()
        self._generator: LmNegatives | None = None
        self._scorer: LmScorer | None = None

    def _lm(self):
        if self.load_lm is None:
            raise ValueError(f"method or plausibility 'lm' needs a causal LM ({self.options.lm_model}): give load_lm")
        return self.load_lm(self.options.lm_model)

    def lm_negatives(self) -> LmNegatives:
        if self._generator is None:
            self._generator = LmNegatives(lm_generator(self._lm(), self.options.seed))
        return self._generator

    def __call__(self, texts: Sequence[str | None]) -> list[list[Negative]]:
        ps = self.options
        texts = [t if t is None or len(t) <= MAX_CAPTION_CHARS else None for t in texts]
        if ps.method == "lm":
            negs = self.lm_negatives().negatives([t or "" for t in texts], ps.kinds, ps.per_kind)
            return self.blind_check(texts, negs, self.margins(texts, negs) if ps.checks_blind_bias else None)
        select = ps.selects
        negs = [negatives_for(t, ps.kinds, ps.pool if select else ps.per_kind, ps.seed) for t in texts]
        if not select and not ps.checks_blind_bias:
            return negs
        margins = self.margins(texts, negs)
        if select:
            kept_negs, kept_margins = [], []
            for ns, ms in zip(negs, margins):
                by_kind: dict[str, list[int]] = {}
                for j, n in enumerate(ns):
                    by_kind.setdefault(n.kind, []).append(j)
                keep = sorted(j for js in by_kind.values()
                              for j in sorted(js, key=lambda j: (abs(ms[j]), j))[:ps.per_kind])
                kept_negs.append([ns[j] for j in keep])
                kept_margins.append([ms[j] for j in keep])
            negs, margins = kept_negs, kept_margins
        return self.blind_check(texts, negs, margins)

    def margins(self, texts: Sequence[str | None], negs: list[list[Negative]]) -> list[list[float]]:
        """score(caption) - score(negative) for every negative, by the `plausibility` scorer: "ngram" (k-fold LMs
        fitted on the batch's captions; a caption is scored by the LM of the other folds) or "lm" (lm_model)."""
        if self.options.plausibility == "lm":
            if self._scorer is None:
                self._scorer = LmScorer(self._lm())
            uniq = list(dict.fromkeys([t for t, ns in zip(texts, negs) if ns] + [n.text for ns in negs for n in ns]))
            score = dict(zip(uniq, self._scorer.scores(uniq)))
            return [[score[t] - score[n.text] for n in ns] if ns else [] for t, ns in zip(texts, negs)]
        folds, lms = fold_lms(texts, BLIND_FOLDS, FOLD_SALT)
        out = []
        for t, f, ns in zip(texts, folds, negs):
            if not ns:
                out.append([])
                continue
            sp = lms[f].score(t)
            out.append([sp - lms[f].score(n.text) for n in ns])
        return out

    def blind_check(self, texts: Sequence[str | None], negs: list[list[Negative]],
                    margins: list[list[float]] | None = None) -> list[list[Negative]]:
        """Per kind, drop the negatives the plausibility scorer tells apart most easily until the share it prefers
        the caption in lies within [1 - b, b], b = max_blind_bias - BLIND_SLACK (kinds with fewer than
        blind_min_pairs pairs in the batch are left as they are)."""
        ps = self.options
        if not ps.checks_blind_bias:
            return negs
        if margins is None:
            margins = self.margins(texts, negs)
        by_kind: dict[str, list[tuple[int, int, float]]] = {}
        for i, (ns, ms) in enumerate(zip(negs, margins)):
            for j, (n, m) in enumerate(zip(ns, ms)):
                by_kind.setdefault(n.kind, []).append((i, j, m))
        drop: set[tuple[int, int]] = set()
        for kind, items in by_kind.items():
            if len(items) < ps.blind_min_pairs:
                continue
            # an added word or object makes the negative longer, so a score per token can favour it for that
            # alone (and length gives every add_* negative away whatever is done): add kinds are checked one way
            two_sided = ps.blind_two_sided and not kind.startswith("add_")
            idx = rebalance([m for _, _, m in items], max(0.5, ps.max_blind_bias - BLIND_SLACK), two_sided)
            for k in idx:
                drop.add(items[k][:2])
            self.dropped_by_blind_check[kind] += len(idx)
        if not drop:
            return negs
        return [[n for j, n in enumerate(ns) if (i, j) not in drop] for i, ns in enumerate(negs)]


def batch_negatives(texts: Sequence[str | None], options: NegativeTextOptions | None = None,
                    load_lm: Callable[[str], object] | None = None) -> list[list[Negative]]:
    """Negative captions of a batch of texts (one list per text), as the stage makes them for that batch."""
    return BatchNegatives(options or NegativeTextOptions(), load_lm)(texts)
