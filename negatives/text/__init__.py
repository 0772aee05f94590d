"""Hard negative captions of SugarCrepe's seven kinds, by rule (and by a causal LM): the parts of the
negatives_text stage (stages/negatives_text.py), also used by the negatives flow (negatives.images) and the
blind-bias report (reporting.negatives_report). Nothing here imports a stage.

A negative is {kind, text, edit_before, edit_after, span_start, span_end, method}.

Kinds (SugarCrepe, Hsieh et al. 2023):

    replace_obj   one object noun -> another of its fine category     "a cat on a couch" -> "a dog on a couch"
    replace_att   one attribute -> another of its category (colour, size, material, age, pattern, state...),
                  or a count -> another count                         "two red circles" -> "two blue circles",
                                                                      "a cat is sleeping" -> "two cats are sleeping"
    replace_rel   a spatial relation -> a contradicting one, or a posture/motion verb of an animate subject
                                                                      "left of" -> "right of", "sitting" -> "standing"
    swap_obj      two object nouns exchange places                    "a man holds a dog" -> "a dog holds a man"
    swap_att      two attributes of different objects exchange places "a red cup on a blue table" -> "a blue cup on
                                                                       a red table"
    add_obj       an object joins a noun phrase                       "a cat on a couch" -> "a cat and a dog on a couch"
    add_att       an attribute is added to a noun phrase that has none of its category
                                                                      "an apple" -> "a red apple"

Rules (lexicon holds the words, grammar the agreement):
- A caption is tokenised and its noun phrases found with the lexicon: a head noun (longest multi-word match that is
  not followed by another noun: "pizza box" is a box), its determiner or number, and its premodifiers.
- Replacements stay in the noun's fine category (plausible to a text-only reader) and never pick a synonym or
  hypernym (lexicon.too_close: no "sofa" -> "couch", no "child" -> "boy"); attribute replacements come from another
  cluster of the same category, colours from those that fit the object ("a purple dog" is never made).
- Agreement: a/an before the edited word, plural/singular nouns after a changed count, the finite verb of a subject
  whose number changes ("a cat is" -> "two cats are"). Edits that would need a pronoun fixed are not made (a
  count change in a caption with "its"/"their", a man -> woman swap in a caption with "his").
- Swaps that only reorder a symmetric phrase ("a man and a woman", "a cat next to a dog" with the same attributes)
  are paraphrases and are not made.
- A kind that does not apply to a caption gives no negative of that kind.

Each negative differs from its caption in one character span: [span_start, span_end) of the caption, holding
edit_before, becomes edit_after (the span covers the core edit and its agreement fixes; for swaps both words), so
caption[:span_start] + edit_after + caption[span_end:] == text exactly.

Candidates are drawn in a seeded order that favours common words (the lexicon lists run from common to rare;
colours by their use in COCO captions), since a replacement rarer than the word it replaces is a cue by itself.

Blind bias (SugarCrepe's lesson: a negative a text-only model tells from its caption teaches nothing). NgramLM
(interpolated bigram/unigram, add-k) scores a caption by its mean log-probability per word; the blind-bias figure of
a kind is the share of pairs with score(positive) > score(negative) (0.5: blind). Per batch (batch.py):
1. fits BLIND_FOLDS n-gram LMs on the batch's captions (k-fold: a caption is scored by the LM of the other folds);
2. select_plausible: draws up to `pool` candidates per kind and keeps the per_kind whose score is closest to the
   caption's;
3. blind check (max_blind_bias): for a kind with at least blind_min_pairs pairs whose figure lies outside
   [1 - b, b] (b = max_blind_bias - BLIND_SLACK), drops the pairs the LM separates best until it lies inside
   (SugarCrepe's adversarial refinement). Above b the caption reads better; below 1 - b the negative does, a cue
   too, except for add_* kinds: their negatives are longer, a score per token favours a predictable addition for
   that alone, and length gives them away whatever is done, so they are checked against b only (so are all kinds
   with blind_two_sided off).
So a caption's negatives depend on its batch (through the LMs); negatives_for(text, seed=...) without a scorer is a
function of the caption alone. reporting/negatives_report measures the figures with an LM fitted on other
captions, and with SmolLM2 (LmScorer), next to SugarCrepe's reference negatives.

method "lm": a causal LM (lm_model, loaded by the caller: stages.models.lm; SmolLM2-135M-Instruct by default)
completes a few-shot prompt (lm_prompt, SugarCrepe-style examples per kind); a completion is kept only when
validate_negative accepts it as an edit of that kind, and its span is found by diff (edit_span). The LM method
skips the selection step; the blind check applies to it too.

Modules: tokens (tokens, word classes), parsing (noun phrases, attributes, relations), edits (a negative and its
character edits, agreement), generators (the seven kinds, negatives_for), validation (validate_negative,
edit_span), scoring (NgramLM, LmScorer, fold LMs, blind-bias figures, rebalance), prompting (the LM method),
options (NegativeTextOptions), batch (a batch's negatives: selection and blind check); lexicon and grammar.
"""
from __future__ import annotations

from negatives.text.batch import MAX_CAPTION_CHARS, BatchNegatives, batch_negatives
from negatives.text.edits import Negative
from negatives.text.generators import GENERATORS, negatives_for
from negatives.text.options import KINDS, NEGATIVE_KINDS, NegativeTextOptions
from negatives.text.parsing import Parse, parse
from negatives.text.prompting import LmNegatives, lm_generator, lm_negative, lm_prompt
from negatives.text.scoring import LmScorer, NgramLM, blind_accuracy, fold_lms, rebalance, split_of, surface
from negatives.text.tokens import caption_key, words
from negatives.text.validation import edit_span, validate_negative

__all__ = ["BatchNegatives", "GENERATORS", "KINDS", "LmNegatives", "LmScorer", "MAX_CAPTION_CHARS", "NEGATIVE_KINDS",
           "Negative", "NegativeTextOptions", "NgramLM", "Parse", "batch_negatives", "blind_accuracy", "caption_key",
           "edit_span", "fold_lms", "lm_generator", "lm_negative", "lm_prompt", "negatives_for", "parse",
           "rebalance", "split_of", "surface", "validate_negative", "words"]
