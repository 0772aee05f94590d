"""balance: MetaCLIP's curation (arXiv 2309.16671; MetaCLIP 2, arXiv 2507.22062): captions matched against a
concept list, every concept capped at about t pairs over the whole build.

Per row (process_batch): the cleaned caption (`text`) matched against the concept list (stages.concepts: the list,
and the matcher: substrings with MetaCLIP's word boundaries, one Aho-Corasick automaton per language, built once
per worker process)
    concept_ids    list<int32>  the distinct concepts the caption matches (ids into the concept list)
    concept_count  int32        how many
With several `languages`, a row's `lang` column (the language stage) picks its list; a row whose language has no
list, or a build without the language stage, uses the first language's.

Rules:
- row-wise (decide): concept_count < min_concepts (1)                          -> no_concept ("0 concepts")
- over the whole build (one Counts step, stages.steps): count(c) = the rows alive before this stage that match
  concept c; each matched concept c keeps the row with probability min(1, t / count(c)), and the row is kept if
  any draw keeps it (MetaCLIP's balance_sampling), so a concept's kept rows are about min(count, t) when its rows
  match it alone, and a row matching several concepts is kept with 1 - prod(1 - min(1, t / count(c))).
                                                                               -> balanced_out
  ("'photo' 41230 matches > t 20000 (p 0.4851); 3 concepts, none drawn": the concept of the row with the lowest
  keep probability, the head concept whose cap dropped it). Rows without a concept (min_concepts: 0) are kept here.
  The draw of (row, concept) is a hash of the row's uid, the concept id and `seed`: a re-run, a resumed build and
  a refilter decide the same rows, and the step reads only the stored concept_ids (refilter --set balance.t=...
  matches nothing again).
- t: t >= 1 is a number of pairs (MetaCLIP: 20,000 for its 400M set, 170,000 for 2.5B); t < 1 a fraction of the
  pool (the rows the step sees: alive before the stage, with at least min_concepts concepts).
- several languages (MetaCLIP 2): t holds for the first language; each other language L gets the t_L that keeps
  the same tail proportion (the share of L's matches in concepts counted below t_L equals that share for the first
  language below t), as MetaCLIP 2's t_to_p / p_to_t do; per_language_t: false gives every language the same t.

The step records (stats.json, the step's summary; bounded: about 60 ranks and 20 head concepts) the concept
distribution before the stage by rank, the head concepts with their counts and keep probabilities, t per
language; the report draws it beside the distribution of the kept shards.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from schemas.spec import StageParams
from stages.base import (Column, DecideContext, Decision, Reason, Resources, Stage, StageConfigError, Threshold,
                         as_text, concat, fixed)
from stages.concepts import ConceptListError, load_concepts, matcher_for
from stages.concepts.lists import DEFAULT
from stages.language import canonical
from stages.steps import KEY, PRIOR, ROW, Counts, decisions, uid_bytes, uid_words

ROWS_KEY = np.uint64(1 << 62)  # a key every row of the step counts under once: the pool, for the summary
SUMMARY_RANKS = 60  # log-spaced ranks of the distribution recorded in the summary
SUMMARY_HEAD = 20  # head concepts recorded


class BalanceParams(StageParams):
    concepts: str = Field(DEFAULT, min_length=1,
                          description='"wordfreq" (the default list, built from wordfreq at first use) or a file: one '
                                      'entry a line, or MetaCLIP\'s JSON; "{lang}" in the path: one file a language')
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1,
                                 description="the concept lists' languages; with several, each row's `lang` picks "
                                             "its list (others: the first), and t is the first language's")
    max_words: int = Field(100_000, gt=0, description="default list: the most frequent words of each language")
    case_sensitive: bool = Field(False, description="match case as written (MetaCLIP); false lowercases both")
    t: float = Field(20_000, gt=0, description="cap per concept: t >= 1 pairs, t < 1 a fraction of the pool")
    per_language_t: bool = Field(True, description="MetaCLIP 2: each language's t keeps the first language's "
                                                   "tail proportion")
    min_concepts: int = Field(1, ge=0, description="reject captions matching fewer concepts (0: keep them)")
    seed: int = Field(0, ge=0, description="the draws' seed")

    @field_validator("languages")
    @classmethod
    def _codes(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(canonical(c) for c in v))

    @field_validator("concepts")
    @classmethod
    def _absolute(cls, v: str) -> str:
        """A concept file as an absolute path (Ray workers need not share the driver's working folder)."""
        return v if v == DEFAULT else str(Path(v).expanduser().absolute())

    def list_key(self) -> tuple:
        return self.concepts, tuple(self.languages), self.max_words, self.case_sensitive


def concepts_of(params: BalanceParams):
    return load_concepts(*params.list_key())


# ------------------------------------------------------------------------------------------------ the rule

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 (uint64 in, uint64 out)."""
    z = x + np.uint64(_MIX[0])
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX[1])
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX[2])
    return z ^ (z >> np.uint64(31))


def draws(uid: pa.Array, rows: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number for each (row, concept) pair: a hash of the row's uid, the concept id and the seed."""
    hi, lo = uid_words(uid_bytes(uid))
    with np.errstate(over="ignore"):
        z = _mix(ids.astype(np.uint64) + np.uint64(seed) * np.uint64(_MIX[0]))
        z = _mix(hi[rows] ^ _mix(lo[rows] ^ z))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def tail_share(counts: np.ndarray, t: float) -> float:
    """MetaCLIP 2's t_to_p: the share of matches in concepts counted below t."""
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total else 0.0


def threshold_for_share(counts: np.ndarray, share: float) -> float:
    """MetaCLIP 2's p_to_t: the count at which the cumulative share of matches (concepts by rising count) is nearest
    `share`."""
    c = np.sort(counts)
    portion = np.cumsum(c) / c.sum()
    return float(c[np.abs(portion - share).argmin()])


def thresholds(keys: np.ndarray, counts: np.ndarray, pool: int, params: BalanceParams, concepts) -> np.ndarray:
    """t of each language of the list (the first's from params.t; the others' by the same tail share)."""
    t0 = params.t if params.t >= 1 else params.t * pool
    out = np.full(len(concepts.langs), t0, np.float64)
    if params.per_language_t and len(concepts.langs) > 1:
        lang = concepts.lang_of(keys.astype(np.int64))
        share = tail_share(counts[lang == 0], t0)
        for k in range(1, len(concepts.langs)):
            c = counts[lang == k]
            if c.size and c.sum():
                out[k] = threshold_for_share(c, share)
    return out


def split_counts(counts: pa.Table) -> tuple[np.ndarray, np.ndarray, int]:
    """(concept keys sorted, their counts, rows in the step) from a Counts step's counts."""
    keys = counts.column(KEY).to_numpy()
    cnt = counts.column("count").to_numpy()
    rows = int(cnt[keys == ROWS_KEY].sum())
    keep = keys != ROWS_KEY
    keys, cnt = keys[keep], cnt[keep]
    o = np.argsort(keys)
    return keys[o], cnt[o], rows


def _concept_keys(rows: pa.Table, params: BalanceParams, state: dict) -> pa.Table:
    """Counts, map side: (row, concept id) of every match, and (row, ROWS_KEY) once a row."""
    ids = rows.column("concept_ids").combine_chunks()
    parents = pc.list_parent_indices(ids)
    row = rows.column(ROW).combine_chunks()
    return pa.table({ROW: pa.concat_arrays([row.take(parents), row]),
                     KEY: pa.concat_arrays([pc.list_flatten(ids).cast(pa.uint64()),
                                            pa.array(np.full(rows.num_rows, ROWS_KEY))])})


def keep_probabilities(ids: np.ndarray, keys: np.ndarray, cnt: np.ndarray, t_lang: np.ndarray, concepts
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, t, keep probability) of each concept id (keys sorted; an id absent from them counts 0)."""
    count = np.zeros(ids.size, np.int64)
    if keys.size:
        pos = np.minimum(np.searchsorted(keys, ids.astype(np.uint64)), keys.size - 1)
        count = np.where(keys[pos] == ids.astype(np.uint64), cnt[pos], 0)
    t = t_lang[concepts.lang_of(ids)]
    return count, t, np.minimum(1.0, t / np.maximum(count, 1))


def _balance_decide(rows: pa.Table, counts: pa.Table, params: BalanceParams, state: dict) -> pa.Table:
    """Counts, deciding side: MetaCLIP's draws, vectorised over the (row, concept) pairs."""
    concepts = concepts_of(params)
    keys, cnt, pool = split_counts(counts)
    t_lang = thresholds(keys, cnt, pool, params, concepts)
    ids_col = rows.column("concept_ids").combine_chunks()
    parents = pc.list_parent_indices(ids_col).to_numpy()
    ids = pc.list_flatten(ids_col).to_numpy().astype(np.int64)
    count, t, p = keep_probabilities(ids, keys, cnt, t_lang, concepts)
    kept_pair = draws(rows.column("uid").combine_chunks(), parents, ids, params.seed) < p
    n = rows.num_rows
    drawn = np.bincount(parents, minlength=n) > 0
    kept = np.bincount(parents, weights=kept_pair, minlength=n) > 0
    prior = rows.column(PRIOR).to_numpy(zero_copy_only=False)
    out = np.flatnonzero(drawn & ~kept & ~prior)
    if not out.size:
        return decisions([], "balanced_out", None)
    # each dropped row's head concept: its lowest keep probability (ties: the smaller id)
    mine = np.isin(parents, out)
    o = np.lexsort((ids[mine], p[mine], parents[mine]))
    par = parents[mine][o]
    first = np.flatnonzero(np.r_[True, par[1:] != par[:-1]])
    head = np.flatnonzero(mine)[o][first]
    how_many = np.bincount(parents, minlength=n)[out]
    detail = concat("'", concepts.names(ids[head]), "' ", as_text(pa.array(count[head])), " matches > t ",
                    fixed(pa.array(t[head]), 0), " (p ", fixed(pa.array(p[head]), 4), "); ",
                    as_text(pa.array(how_many)), pa.array(np.where(how_many == 1, " concept", " concepts")),
                    ", none drawn")
    return decisions(rows.column(ROW).take(pa.array(out)), "balanced_out", detail)


def _summarize(counts: pa.Table, params: BalanceParams) -> dict:
    """Bounded: the distribution before the stage at log-spaced ranks, the head concepts, t per language."""
    concepts = concepts_of(params)
    keys, cnt, pool = split_counts(counts)
    t_lang = thresholds(keys, cnt, pool, params, concepts)
    o = np.lexsort((keys, -cnt))
    keys, cnt = keys[o], cnt[o]
    n = int(keys.size)
    ranks = np.unique(np.round(np.logspace(0, math.log10(max(n, 1)), SUMMARY_RANKS)).astype(np.int64)) if n else \
        np.zeros(0, np.int64)
    ids = keys.astype(np.int64)
    t_of = t_lang[concepts.lang_of(ids)] if n else np.zeros(0)
    capped = cnt > t_of
    head = ids[:SUMMARY_HEAD]
    names = concepts.names(head).to_pylist()
    langs = concepts.lang_of(head)
    return {
        "key_column": "concept_ids", "reason": "balanced_out", "pool": pool, "concepts_matched": n,
        "matches": int(cnt.sum()), "t": float(t_lang[0]),
        "t_by_language": {lang: float(t_lang[k]) for k, lang in enumerate(concepts.langs)},
        "capped_concepts": int(capped.sum()), "capped_matches": int(cnt[capped].sum()),
        "rank_counts": [[int(r), int(cnt[r - 1])] for r in ranks],
        "head": [{"id": int(i), "concept": name, "lang": concepts.langs[int(k)], "count": int(c),
                  "p": round(min(1.0, float(t_lang[int(k)]) / int(c)), 6)}
                 for i, name, k, c in zip(head.tolist(), names, langs.tolist(), cnt[:SUMMARY_HEAD].tolist())],
    }


# ------------------------------------------------------------------------------------------------ the stage

class BalanceStage(Stage):
    name = "balance"
    version = 1
    summary = ("MetaCLIP's concept balancing: captions matched against a concept list (Aho-Corasick), each concept "
               "capped at t pairs over the whole build")
    Params = BalanceParams
    reads = ("text", "lang")  # lang (the language stage's) picks a row's list when there are several
    default_resources = Resources(cpus=1.0, batch_size=1024)
    columns = (
        Column("concept_ids", pa.list_(pa.int32()), "ids of the concepts the caption matches (stages.concepts)",
               "data"),
        Column("concept_count", pa.int32(), "number of concepts the caption matches"),
    )
    reasons = (
        Reason("no_concept", "the caption matches fewer than min_concepts concepts of the list", ("concept_count",),
               (Threshold("concept_count", "min_concepts", "min"),)),
        Reason("balanced_out", "no draw kept it: each concept it matches keeps a row with probability "
                               "min(1, t / the concept's count over the build) (MetaCLIP)", ("concept_count",),
               param="t"),
    )

    params: BalanceParams

    def preflight(self) -> None:
        """The concept list loads (the default is built into the cache here, once)."""
        try:
            concepts_of(self.params)
        except ConceptListError as e:
            raise StageConfigError(f"{self.name}: {e}") from None

    def setup(self) -> None:
        matcher_for(*self.params.list_key())

    @classmethod
    def global_steps(cls, params: BalanceParams) -> tuple:
        return (Counts("concepts", ("concept_ids",), _concept_keys, _balance_decide, _summarize,
                       needs=("concept_ids",)),)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        matcher = matcher_for(*self.params.list_key())
        lang_index = None
        if len(self.params.languages) > 1 and "lang" in batch.column_names:
            found = pc.index_in(batch.column("lang"), value_set=pa.array(self.params.languages))
            lang_index = pc.fill_null(found, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        ids = matcher.match(batch.column("text"), lang_index)
        return self.add_columns(batch, {"concept_ids": ids, "concept_count": pc.list_value_length(ids)})

    @classmethod
    def decide(cls, table: pa.Table, params: BalanceParams, ctx: DecideContext | None = None) -> Decision:
        d = cls.decision(table.num_rows)
        if "concept_count" not in table.column_names:
            return d
        count = table.column("concept_count")
        few = pc.less(pc.fill_null(count, 0), params.min_concepts)
        d.reject(few, "no_concept", concat(as_text(pc.fill_null(count, 0)), " concepts"))
        return d

    def metadata(self) -> dict:
        """The list the stored concept ids refer to (its digest: a refilter must use the same list)."""
        concepts = concepts_of(self.params)
        return {"version": self.version, "concepts": self.params.concepts, "languages": list(concepts.langs),
                "entries": len(concepts), "entries_per_language": dict(zip(
                    concepts.langs, np.diff(concepts.starts).tolist())), "digest": concepts.digest,
                "t": self.params.t, "case_sensitive": self.params.case_sensitive}
