"""Text-only plausibility: the n-gram LM fitted on captions, a causal LM's score, and the blind-bias figures."""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Iterable, Sequence

from negatives.text.tokens import caption_key, words

FOLD_SALT = "negatives_text-fold:"  # the stage's caption folds (independent of split_of's default split)
BLIND_FOLDS = 4
# The batch's fold LMs are fitted on a few hundred captions and read less into a caption than an LM fitted on more
# (flows/negatives_report measures with one fitted on 2,172): the check aims this far inside the bound.
BLIND_SLACK = 0.05


class NgramLM:
    """Interpolated bigram/unigram LM with add-k smoothing over lower-cased words; a text-only plausibility score.

    score(text) is the mean log-probability per word (with the end-of-caption token), so captions of different
    lengths compare fairly.
    """

    def __init__(self, texts: Iterable[str] = (), k: float = 0.1, lam: float = 0.7):
        self.k, self.lam = k, lam
        self.uni: Counter = Counter()
        self.bi: Counter = Counter()
        for t in texts:
            ws = ["<s>"] + words(t) + ["</s>"]
            self.uni.update(ws[1:])
            self.bi.update(zip(ws, ws[1:]))
        self._finish()

    def _finish(self) -> None:
        self.ctx: Counter = Counter()
        for (a, _b), c in self.bi.items():
            self.ctx[a] += c
        self.vocab = len(self.uni) + 1
        self.total = sum(self.uni.values())

    def without(self, other: "NgramLM") -> "NgramLM":
        """This LM's counts less `other`'s (fitted on a subset of this one's texts)."""
        out = NgramLM(k=self.k, lam=self.lam)
        out.uni = self.uni - other.uni
        out.bi = self.bi - other.bi
        out._finish()
        return out

    def logprob(self, prev: str, w: str) -> float:
        pu = (self.uni[w] + self.k) / (self.total + self.k * self.vocab)
        pb = (self.bi[(prev, w)] + self.k) / (self.ctx[prev] + self.k * self.vocab)
        return math.log(self.lam * pb + (1 - self.lam) * pu)

    def score(self, text: str) -> float:
        ws = ["<s>"] + words(text) + ["</s>"]
        return sum(self.logprob(a, b) for a, b in zip(ws, ws[1:])) / (len(ws) - 1)


def surface(text: str) -> str:
    """The caption as a language model scores it: lower case, single spaces, no final punctuation (SugarCrepe's
    reference negatives are re-capitalised and end in a period; that must not count)."""
    return " ".join(text.lower().split()).rstrip(" .!")


class LmScorer:
    """Mean log-probability per token of a caption under a causal LM: a text-only plausibility score, stronger than
    NgramLM. `lm` is a loaded causal LM with `tokenizer`, `model` and `device` (stages.models.lm.shared_lm)."""

    def __init__(self, lm, batch_size: int = 64):
        self.lm = lm
        self.batch_size = batch_size

    def scores(self, texts: list[str]) -> list[float]:
        import torch  # noqa: PLC0415

        tok, model = self.lm.tokenizer, self.lm.model
        prefix = tok.bos_token or tok.eos_token or ""
        out: list[float] = [0.0] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        old_side = tok.padding_side
        tok.padding_side = "right"
        try:
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                enc = tok([prefix + surface(texts[i]) for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False)
                ids = enc["input_ids"].to(self.lm.device)
                mask = enc["attention_mask"].to(self.lm.device)
                with torch.inference_mode():
                    logits = model(input_ids=ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
                m = mask[:, 1:].float()
                mean = (logp * m).sum(1) / m.sum(1).clamp(min=1)
                for i, v in zip(idx, mean.tolist()):
                    out[i] = v
        finally:
            tok.padding_side = old_side
        return out


def fold_lms(texts: Sequence[str | None], k: int = 4, salt: str = "negatives_text-fold:") -> tuple[list[int],
                                                                                                  list[NgramLM]]:
    """k-fold n-gram LMs over `texts`: text i is scored by lms[folds[i]], fitted on the other folds' texts."""
    folds = [int.from_bytes(hashlib.blake2b((salt + caption_key(t or "")).encode(), digest_size=4).digest(),
                            "big") % k
             for t in texts]
    parts = [NgramLM(t for t, f in zip(texts, folds) if t and f == i) for i in range(k)]
    full = NgramLM()
    for part in parts:
        full.uni += part.uni
        full.bi += part.bi
    full._finish()
    return folds, [full.without(part) for part in parts]


def split_of(text: str, test_fraction: float = 0.5, salt: str = "") -> str:
    """'train' or 'test', stable for the caption text (and salt)."""
    h = int.from_bytes(hashlib.blake2b((salt + caption_key(text)).encode(), digest_size=4).digest(), "big")
    return "test" if h / 2**32 < test_fraction else "train"


def blind_accuracy(scorer, pairs: Iterable[tuple[str, str]]) -> tuple[float, int]:
    """Share of (positive, negative) pairs the scorer prefers the positive of (ties count half), and the pair count."""
    wins, n = 0.0, 0
    for pos, neg in pairs:
        a, b = scorer(pos), scorer(neg)
        wins += 1.0 if a > b else 0.5 if a == b else 0.0
        n += 1
    return (wins / n if n else float("nan")), n


def rebalance(margins: list[float], bound: float, two_sided: bool = True) -> set[int]:
    """Indices of pairs to drop so that the share of pairs with margin > 0 (score(positive) > score(negative), ties
    half) lies in [1 - bound, bound].

    Above the bound the pairs the scorer finds easiest (largest margin) go first: SugarCrepe's adversarial
    refinement; below 1 - bound (negatives systematically *more* plausible, a cue as well) the most negative go.
    """
    n = len(margins)
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    drop: set[int] = set()
    if n == 0:
        return drop
    if wins / n > bound:
        for i in sorted(range(n), key=lambda i: -margins[i]):
            if margins[i] <= 0 or wins / (n - len(drop)) <= bound:
                break
            drop.add(i)
            wins -= 1.0
    elif two_sided and wins / n < 1 - bound:
        for i in sorted(range(n), key=lambda i: margins[i]):
            if margins[i] >= 0 or wins / (n - len(drop)) >= 1 - bound:
                break
            drop.add(i)
    return drop
