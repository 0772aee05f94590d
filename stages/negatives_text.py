"""negatives_text: hard negative captions of SugarCrepe's seven kinds, by rule (or by a causal LM).

For every caption the stage writes `neg_captions`, a list of {kind, text, edit_before, edit_after, span_start,
span_end, method} (caption[:span_start] + edit_after + caption[span_end:] == text), and `negatives_count`. It never
rejects a pair (decide keeps all). The negatives are made by negatives.text (its docstring has the kinds and the
rules); per batch, candidates are selected for plausibility and blind-checked against a text-only scorer
(negatives.text.batch), so a caption's negatives depend on its batch. Method or plausibility "lm" loads a causal LM
(stages.models.lm) and runs on an actor pool; the rule method is plain Python (tasks).
"""
from __future__ import annotations

import pyarrow as pa

from negatives.text import BatchNegatives, NegativeTextOptions
from schemas.spec import StageParams
from stages.base import Column, DecideContext, Decision, Resources, Stage
from stages.models.lm import check_lm_loadable, shared_lm


class NegativesTextParams(NegativeTextOptions, StageParams):
    """NegativeTextOptions (what to make) and the resources every stage takes."""


class NegativesTextStage(Stage):
    name = "negatives_text"
    version = 1
    summary = "hard negative captions of SugarCrepe's seven kinds, each edit recorded (keeps every pair)"
    Params = NegativesTextParams
    columns = (
        # caption[:span_start] + edit_after + caption[span_end:] == text
        Column("neg_captions", pa.list_(pa.struct([
            pa.field("kind", pa.string()),  # replace_obj replace_att replace_rel swap_obj swap_att add_obj add_att
            pa.field("text", pa.string()),
            pa.field("edit_before", pa.string()),
            pa.field("edit_after", pa.string()),
            pa.field("span_start", pa.int32()),  # character offsets in the caption
            pa.field("span_end", pa.int32()),
            pa.field("method", pa.string()),  # "rule" or "lm"
        ])), "hard negative captions, each with its kind and edit", "data"),
        Column("negatives_count", pa.int32(), "negative captions made for the pair"),
    )
    default_resources = Resources(cpus=1.0, batch_size=1024)

    params: NegativesTextParams

    def __init__(self, params: NegativesTextParams | None = None):
        super().__init__(params)
        self.make = BatchNegatives(self.params, self.load_lm)

    @classmethod
    def runs_as_actor(cls, params: NegativesTextParams) -> bool:
        """The rule method is plain Python (tasks); the LM method and LM plausibility load a model (actors)."""
        return params.loads_lm

    def load_lm(self, name: str):
        """The causal LM of method and plausibility "lm", once per process (the scorer and the generator share it)."""
        return shared_lm(name, "auto", threads=max(1, int(self.resources.cpus)), gpus=self.resources.gpus,
                         stage=self.name)

    def preflight(self) -> None:
        if self.params.method == "lm" or self.params.scores_with_lm:
            check_lm_loadable(self.params.lm_model, stage=self.name)

    def setup(self) -> None:
        if self.params.method == "lm":
            self.make.lm_negatives()

    @property
    def dropped_by_blind_check(self):
        return self.make.dropped_by_blind_check

    def process_batch(self, batch: pa.Table) -> pa.Table:
        negs = self.make(batch.column("text").to_pylist())
        return self.add_columns(batch, {
            "neg_captions": [[n.as_dict() for n in ns] for ns in negs],
            "negatives_count": [len(ns) for ns in negs],
        })

    @classmethod
    def decide(cls, table: pa.Table, params: NegativesTextParams, ctx: DecideContext | None = None) -> Decision:
        return cls.decision(table.num_rows)

    def metadata(self) -> dict:
        return {"version": self.version, "method": self.params.method, "plausibility": self.params.plausibility,
                "lm_model": self.params.lm_model, "dropped_by_blind_check": dict(self.dropped_by_blind_check)}
