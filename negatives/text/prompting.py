"""method "lm": a causal LM completes a few-shot prompt; a completion is kept only when it is an edit of its kind."""
from __future__ import annotations

from typing import Sequence

from negatives.text.edits import Negative
from negatives.text.tokens import caption_key
from negatives.text.validation import edit_span, validate_negative

LM_EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "replace_obj": [("A cat sleeping on a wooden bench.", "A dog sleeping on a wooden bench."),
                    ("Two men riding bikes down a street.", "Two women riding bikes down a street."),
                    ("A plate with a sandwich and a pickle.", "A plate with a burger and a pickle.")],
    "replace_att": [("A red truck parked by the curb.", "A blue truck parked by the curb."),
                    ("A small dog on a large bed.", "A large dog on a large bed."),
                    ("An empty glass next to a laptop.", "A full glass next to a laptop.")],
    "replace_rel": [("A lamp to the left of a sofa.", "A lamp to the right of a sofa."),
                    ("A boy sitting on the grass.", "A boy standing on the grass."),
                    ("A cat under a table.", "A cat on top of a table.")],
    "swap_obj": [("A man walking a dog on a leash.", "A dog walking a man on a leash."),
                 ("A bowl on top of a book.", "A book on top of a bowl."),
                 ("A bus parked in front of a truck.", "A truck parked in front of a bus.")],
    "swap_att": [("A white cup on a black table.", "A black cup on a white table."),
                 ("A large dog next to a small cat.", "A small dog next to a large cat."),
                 ("A wooden chair beside a metal desk.", "A metal chair beside a wooden desk.")],
    "add_obj": [("A cat sitting on a couch.", "A cat and a dog sitting on a couch."),
                ("A plate of pasta on a table.", "A plate of pasta and a glass of wine on a table."),
                ("A man riding a horse.", "A man riding a horse next to a fence.")],
    "add_att": [("A man holding an umbrella.", "A man holding a striped umbrella."),
                ("A bus driving down a street.", "A red bus driving down a street."),
                ("A vase on a table.", "A glass vase on a table.")],
}
LM_INSTRUCTIONS = {
    "replace_obj": "Replace one object with a different object.",
    "replace_att": "Replace one attribute (colour, size, material, count...) with a different one.",
    "replace_rel": "Replace one relation or action with a different one.",
    "swap_obj": "Swap the positions of two objects.",
    "swap_att": "Swap the attributes of two objects.",
    "add_obj": "Add one object that is not in the caption.",
    "add_att": "Add one attribute to an object that has none.",
}


def lm_prompt(caption: str, kind: str) -> str:
    """A few-shot prompt asking a causal LM for one negative of `kind` (SugarCrepe-style examples)."""
    lines = [f"Rewrite the caption so that it no longer describes the same picture. {LM_INSTRUCTIONS[kind]} "
             "Change as little as possible and keep the sentence fluent.", ""]
    for pos, neg in LM_EXAMPLES[kind]:
        lines += [f"Caption: {pos}", f"Rewrite: {neg}", ""]
    lines += [f"Caption: {caption.strip()}", "Rewrite:"]
    return "\n".join(lines)


def lm_negative(caption: str, kind: str, completion: str) -> Negative | None:
    """The negative an LM completion gives, when it passes validate_negative."""
    text = completion.strip().split("\n")[0].strip()
    if validate_negative(caption, text, kind) is not None:
        return None
    s, e, after = edit_span(caption, text)
    if caption[:s] + after + caption[e:] != text:
        return None
    return Negative(kind, text, s, e, caption[s:e], after, method="lm")


LM_MAX_NEW_TOKENS = 48


def lm_generator(lm, seed: int = 0):
    """generate(prompts, keys, sample) -> completions over a loaded causal LM (stages.models.lm): greedy, or seeded
    sampling with one key per caption, kind and draw; a completion ends at its first line."""
    def generate(prompts: list[str], keys: list[str], sample: bool) -> list[str]:
        gens = lm.generate(prompts, max_new_tokens=LM_MAX_NEW_TOKENS, do_sample=sample, temperature=0.8, top_p=0.95,
                           seed=seed, keys=keys, stop=["\n"])
        return [g.text for g in gens]
    return generate


class LmNegatives:
    """method "lm": a causal LM completes lm_prompt for each caption and kind; lm_negative keeps a completion only
    when it passes validate_negative (one edit of the kind, no synonym swap).

    `generate(prompts, keys, sample)` -> completions: lm_generator over a loaded LM, or any other backend. Greedy
    for per_kind == 1, sampling (one key per caption, kind and draw) otherwise.
    """

    def __init__(self, generate):
        self.generate = generate

    def negatives(self, texts: list[str], kinds: Sequence[str], per_kind: int) -> list[list[Negative]]:
        jobs = [(i, k, d) for i, t in enumerate(texts) if t and t.strip() for k in kinds for d in range(per_kind)]
        prompts = [lm_prompt(texts[i], k) for i, k, _ in jobs]
        keys = [f"{texts[i]}\x00{k}\x00{d}" for i, k, d in jobs]
        outs = self.generate(prompts, keys, per_kind > 1) if jobs else []
        result: list[list[Negative]] = [[] for _ in texts]
        for (i, k, _d), comp in zip(jobs, outs):
            neg = lm_negative(texts[i], k, comp)
            if neg and all(caption_key(neg.text) != caption_key(o.text) for o in result[i]):
                result[i].append(neg)
        return result
