"""What to make: the kinds, how many, by rule or by LM, and how plausibility and the blind check are judged.

The negatives_text stage's Params extend NegativeTextOptions with the resources every stage takes; the negatives
flow (negatives.images) uses it alone."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from schemas.spec import StrictModel, known_kinds

NEGATIVE_KINDS = ["replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att"]
KINDS = tuple(NEGATIVE_KINDS)


class NegativeTextOptions(StrictModel):
    kinds: list[str] = Field(default_factory=lambda: list(NEGATIVE_KINDS), description="SugarCrepe kinds to make")
    per_kind: int = Field(1, ge=1, le=20, description="negatives of each kind per caption, at most")
    seed: int = Field(0, description="negatives are deterministic for (caption, kind, seed)")
    method: Literal["rule", "lm"] = Field("rule", description="rule: lexicon edits; lm: a causal LM with examples")
    lm_model: str = Field("smollm2-135m", min_length=1,
                          description="causal LM for method lm and plausibility lm (stages.models.lm names)")
    max_blind_bias: float | None = Field(
        0.75, ge=0.5, le=1.0, description="per kind, drop the negatives a text-only n-gram LM spots most easily "
                                          "until it prefers the caption in at most this share of pairs; None: off")
    blind_two_sided: bool = Field(
        True, description="replace/swap kinds: also drop negatives the LM prefers to their caption until it does so "
                          "in at most this share (a negative that reads better is a text cue too)")
    blind_min_pairs: int = Field(50, ge=1, description="measure a kind's blind bias only on at least this many pairs")
    select_plausible: bool = Field(
        True, description="draw `pool` candidates per kind and keep those a cross-fitted n-gram LM finds as "
                          "plausible as the caption (rule method)")
    pool: int = Field(12, ge=1, le=100, description="candidates drawn per kind when select_plausible")
    plausibility: Literal["ngram", "lm"] = Field(
        "ngram", description="scorer of selection and the blind check: ngram (k-fold bigram LMs fitted on the "
                             "batch's captions) or lm (lm_model's log-likelihood; wants a GPU)")

    @field_validator("kinds")
    @classmethod
    def _known_negative_kinds(cls, v: list[str]) -> list[str]:
        return known_kinds(v, NEGATIVE_KINDS, "negative")

    @property
    def checks_blind_bias(self) -> bool:
        return self.max_blind_bias is not None and self.max_blind_bias < 1.0

    @property
    def selects(self) -> bool:
        """Rule candidates are drawn `pool` per kind and the most plausible kept."""
        return self.select_plausible and self.pool > self.per_kind

    @property
    def scores_with_lm(self) -> bool:
        """Plausibility is judged by lm_model (for the selection or the blind check)."""
        return self.plausibility == "lm" and (self.select_plausible or self.checks_blind_bias)

    @property
    def loads_lm(self) -> bool:
        """Whether making negatives may load lm_model (method lm, or plausibility lm)."""
        return self.method == "lm" or self.plausibility == "lm"
