"""Global decisions as declared steps: what a stage that decides over the whole build declares in its own file.

A stage whose decision needs more than one batch (dedup, a top fraction, concept balancing) returns its steps from
`Stage.global_steps(params)`; the engine (flows.engine.global_decisions) runs them after the stats pass, in spec
order, in one process for small builds and as Ray tasks for large ones: the same steps, one implementation. A step is
plain Python over Arrow tables; it never sees Ray, a file or the driver.

The rows a step sees. Every row has the engine's columns
    row     int64, the row's id: input shard << 32 | its position in that shard's processed rows (prior rows: < 0)
    prior   bool, a row an earlier build of the source kept (incremental builds); prior rows are never rejected
plus the columns the step declares in `reads` (absent columns come as nulls). A step sees the rows still alive after
every earlier stage and after the earlier steps of its own stage. A stage's row-wise rejections stand: its steps do
not see those rows, except TopFraction, which ranks every row alive before the stage (DataComp's fraction is of the
scored pool) and rejects only the others.

The steps:
    Shuffle      keys(rows) -> the keys each row contributes (column `key`, unsigned); the engine hash-partitions them
                 so that every row of one key lands in one partition, then group(partition) -> decisions, or, with
                 `survivors`, edges between rows that duplicate each other.
    Survivors    (after a Shuffle that returns edges) components of the edges bound the work; inside each, the rows
                 are taken greedily best first by their `rank`: a row is kept unless an edge joins it to a kept row,
                 and a rejected row's detail names that kept row (never a chain of rows it may not resemble). The
                 group() may return bare edges (row ids and a payload): the engine then reads the rows they touch
                 (only those) and the step's join() completes the edges from them, so the shuffle carries no more
                 than a key, a value and a row id per entry.
    TopFraction  keep the round(fraction * n) rows with the highest score (ties: smaller uid first), exact over the
                 whole build; reject the rest.
    Fit          a model fitted once on a deterministic sample of the rows (by uid hash), handed to later steps of the
                 stage in `state[name]` (e.g. SemDeDup's k-means centroids); the sample's size may grow with the
                 build, and fit() is told which share of the rows it holds.
    Counts       keys(rows) -> (row, key) pairs; the engine counts rows per key over the whole build (and the rows,
                 the pool), then decide(rows, counts) -> decisions, row-wise with the global counts (e.g. concept
                 balancing); summarize(counts) -> what the build records about them.

Decisions are tables with DECISION_SCHEMA: (row, reason, detail), one row per rejected row, reasons the stage's own.
Functions get (table, params, state); they must be module-level functions (the engine ships them to workers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

ROW, PRIOR, KEY = "row", "prior", "key"
DECISION_SCHEMA = pa.schema([(ROW, pa.int64()), ("reason", pa.string()), ("detail", pa.string())])
# what Survivors reads from an edge table: the two rows, and each one's rank and uid (for the detail)
EDGE_FIELDS = [pa.field("a", pa.int64()), pa.field("b", pa.int64()),
               pa.field("a_rank", pa.uint64()), pa.field("b_rank", pa.uint64()),
               pa.field("a_uid", pa.binary(16)), pa.field("b_uid", pa.binary(16))]

StepFn = Callable[[pa.Table, Any, dict], pa.Table]


@dataclass(frozen=True)
class Survivors:
    """Who is kept among rows joined by duplicate edges (see the module docstring).

    The edges come from the Shuffle's group(): EDGE_FIELDS plus any payload the detail needs; or, with `join`, bare
    edges (`a`, `b` row ids and a payload) that join(edges, rows, params, state) completes to EDGE_FIELDS, where
    `rows` holds the rows the edges touch (`row`, `prior`, `uid` and the columns in `reads`; join may drop edges).
    rank: larger is better (ties: the smaller uid). detail(chosen) -> the detail text of each rejected row, where
    `chosen` holds the edge that rejected it (its columns, with `loser`/`keeper` naming which end is which,
    `keeper_uid` the kept row's uid as text and `keeper_prior` whether it is a row of an earlier build)."""

    reason: str
    detail: StepFn
    reads: tuple[str, ...] = ()
    join: Callable[[pa.Table, pa.Table, Any, dict], pa.Table] | None = None


@dataclass(frozen=True)
class Shuffle:
    name: str
    reads: tuple[str, ...]
    keys: StepFn
    group: StepFn
    survivors: Survivors | None = None
    needs: tuple[str, ...] = ()  # columns without which the step is skipped (no row of the build has them)
    # keys that are ids below key_space(params, state) (default: keys are hashes): keys() that returns its rows
    # ordered by key has them cut into the reduce partitions by slices, with no sort or copy
    key_space: Callable[[Any, dict], int] | None = None


@dataclass(frozen=True)
class TopFraction:
    """Keep round(fraction * n) of the n rows with a score (the highest; ties: the smaller uid first); the build
    records the cutoff score."""

    name: str
    reads: tuple[str, ...]
    score: Callable[[pa.Table, Any], pa.Array]  # float64 per row; null: not ranked
    fraction: float
    reason: str
    detail: Callable[[pa.Table, Any, float], pa.Array]  # (rows below, params, cutoff score) -> detail text


@dataclass(frozen=True)
class Fit:
    name: str
    reads: tuple[str, ...]
    sample_rows: int | Callable[[Any, int], int]  # rows to sample, or (params, rows the stage sees) -> rows
    fit: Callable[[pa.Table, Any, float], Any]  # (sample, params, share of the rows sampled) -> state; deterministic
    needs: tuple[str, ...] = ()

    def fraction(self, params, rows: int) -> float:
        """The share of the stage's rows to sample (1.0: every row)."""
        want = self.sample_rows(params, rows) if callable(self.sample_rows) else self.sample_rows
        return min(1.0, want / max(rows, 1))


@dataclass(frozen=True)
class Counts:
    """keys(rows) -> (row, key uint64), any number of keys per row; decide(rows, counts, params, state) with counts
    (key, count) over the whole build and state["pool"] the number of rows the step saw. summarize(counts, params)
    (optional) -> a small dict the build records with the step (stats.json), e.g. the head of the distribution."""

    name: str
    reads: tuple[str, ...]
    keys: StepFn
    decide: Callable[[pa.Table, pa.Table, Any, dict], pa.Table]
    summarize: Callable[[pa.Table, Any], dict] | None = None
    needs: tuple[str, ...] = ()


Step = Union[Shuffle, TopFraction, Fit, Counts]


@dataclass
class StepContext:
    """What a step's functions get beside the rows: the stage's params and the states of its earlier Fit steps."""

    params: Any
    state: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ uids and ranks

def uid_bytes(uid: pa.Array | pa.ChunkedArray) -> pa.Array:
    """128-bit hex uids -> 16-byte binary (order preserved: byte order = hex text order)."""
    s = pl.Series(pa.chunked_array([uid]) if isinstance(uid, pa.Array) else uid).cast(pl.String)
    return s.str.decode("hex").to_arrow().cast(pa.binary(16))


def uid_text(uid: pa.Array | pa.ChunkedArray) -> pa.Array:
    """16-byte binary uids -> their 32-character hex text."""
    s = pl.Series(pa.chunked_array([uid]) if isinstance(uid, pa.Array) else uid).cast(pl.Binary)
    return s.bin.encode("hex").to_arrow().cast(pa.string())


def uid_words(uid16: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """16-byte uids as two uint64 words (big-endian), for sorting: (hi, lo) order = uid order."""
    arr = uid16.combine_chunks() if isinstance(uid16, pa.ChunkedArray) else uid16
    buf = np.frombuffer(arr.buffers()[1], np.uint8)[arr.offset * 16:(arr.offset + len(arr)) * 16]
    words = buf.reshape(-1, 2, 8)[:, :, ::-1].copy().view(np.uint64).reshape(-1, 2)
    return words[:, 0], words[:, 1]


# ------------------------------------------------------------------------------------------------ primitives

def distinct(a: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an array: np.unique by a sort (numpy 2.4's np.unique of integers without
    return_inverse hashes, about 15x slower on a million row ids)."""
    s = np.sort(a)
    return s[np.r_[True, s[1:] != s[:-1]]] if s.size else s


def key_runs(key: np.ndarray, key_space: int) -> np.ndarray:
    """Where each key 0 <= x < key_space starts in a sorted key array, and its end: key x is [runs[x], runs[x + 1]).
    Searched in the keys' own width where the ids fit it (no copy of the keys)."""
    fits = key.dtype.kind in "iu" and key_space - 1 <= np.iinfo(key.dtype).max
    ids = np.arange(key_space, dtype=key.dtype if fits else np.int64)
    return np.r_[np.searchsorted(key, ids), key.size]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label of each of n nodes given undirected edges (i, j)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.empty(0, np.int64)
    g = coo_matrix((np.ones(len(i), np.int8), (np.asarray(i, np.int64), np.asarray(j, np.int64))), shape=(n, n))
    return connected_components(g.tocsr(), directed=False)[1].astype(np.int64)


def greedy_keep(order: np.ndarray, i: np.ndarray, j: np.ndarray, forced: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy survivors over n = order.size nodes and undirected edges (i, j): nodes are taken by `order` (0 first);
    a node is kept unless an edge joins it to a node kept before it; `forced` nodes are kept whatever their edges.
    Returns (kept, by): kept[v] whether v is kept; by[v] the first kept node (in order) that v is joined to, -1 for
    kept nodes.

    The same result as the sequential loop, computed in rounds over the edges (vectorised): each round rejects the
    undecided nodes joined to a kept node, then keeps the undecided nodes that no undecided better node is joined to.
    For orders unrelated to the graph (image sizes, uids) the rounds are few (O(log^2 n) expected)."""
    n = order.size
    state = np.zeros(n, np.int8)  # 0 undecided, 1 kept, 2 rejected
    by = np.full(n, -1, np.int64)
    if forced is not None:
        state[forced] = 1
    if not n:
        return state == 1, by
    better = order[i] < order[j]  # each edge from its better end (a) to its worse end (b)
    a, b = np.where(better, i, j), np.where(better, j, i)
    both = [(a, b)] if forced is None else [(a, b), (b, a)]  # a forced node rejects better nodes too
    while (state == 0).any():
        und = state == 0
        for x, y in both:  # 1. reject undecided nodes joined to a kept node; name the best such node
            hit = (state[x] == 1) & und[y]
            if hit.any():
                hx, hy = x[hit], y[hit]
                o = np.lexsort((order[hx], hy))
                hx, hy = hx[o], hy[o]
                first = np.r_[True, hy[1:] != hy[:-1]]
                take = by[hy[first]] < 0
                state[hy[first][take]] = 2
                by[hy[first][take]] = hx[first][take]
        und = state == 0
        blocked = np.zeros(n, bool)  # 2. keep undecided nodes that no undecided better node is joined to
        blocked[b[und[a] & und[b]]] = True
        state[und & ~blocked] = 1
    return state == 1, by


def rank_order(rank: np.ndarray, uid16: pa.Array) -> np.ndarray:
    """Position of each row when sorted best first: rank descending, then uid ascending."""
    hi, lo = uid_words(uid16)
    o = pl.DataFrame({"r": ~rank.astype(np.uint64), "hi": hi, "lo": lo}).select(  # 2x np.lexsort's speed
        pl.arg_sort_by("r", "hi", "lo")).to_series().to_numpy()
    pos = np.empty(o.size, np.int64)
    pos[o] = np.arange(o.size)
    return pos


_TOP = np.uint64(np.iinfo(np.uint64).max)


def resolve_edges(edges: pa.Table) -> pa.Table:
    """Survivors over an edge table (EDGE_FIELDS + payload): for each rejected row the edge to the kept row that
    rejects it, as rows of `edges` with `loser`, `keeper`, `keeper_uid` (text) and `keeper_prior` added.

    Prior rows (row < 0) rank first and are never rejected. Optional columns: `weight` (of two edges between the same
    rows, the lighter is the one named) and `alias` (a -> b: row a is a copy of b that can never be kept: it is
    rejected by b when b is kept, else by whatever rejects b, with that edge)."""
    cols = edges.column_names
    alias = edges.column("alias").to_numpy(zero_copy_only=False).astype(bool) if "alias" in cols \
        else np.zeros(edges.num_rows, bool)
    a, b = edges.column("a").to_numpy(), edges.column("b").to_numpy()
    aliased = distinct(a[alias & (a >= 0)])
    plain = ~alias & ~np.isin(a, aliased) & ~np.isin(b, aliased)
    if "weight" in cols:  # the lightest edge of a pair first: index_in below names the first match
        o = np.argsort(edges.column("weight").to_numpy(), kind="stable")
        edges, a, b, alias, plain = edges.take(pa.array(o)), a[o], b[o], alias[o], plain[o]
    ends = np.concatenate([a, b])
    nodes, inv = np.unique(ends, return_inverse=True)
    ia, ib = inv[:a.size], inv[a.size:]
    rank = np.zeros(nodes.size, np.uint64)
    rank[ia] = edges.column("a_rank").to_numpy()
    rank[ib] = edges.column("b_rank").to_numpy()
    rank[nodes < 0] = _TOP  # prior rows first
    uid = pa.concat_arrays([edges.column("a_uid").combine_chunks(), edges.column("b_uid").combine_chunks()])
    first = np.empty(nodes.size, np.int64)
    first[inv[::-1]] = np.arange(ends.size)[::-1]  # one occurrence of each node among the ends
    uid = uid.take(pa.array(first))
    kept, by = greedy_keep(rank_order(rank, uid), ia[plain], ib[plain], forced=np.flatnonzero(nodes < 0))
    for v in np.flatnonzero(np.isin(nodes, aliased)):
        kept[v] = False  # aliases are never kept (their by is set below)
    losers = np.flatnonzero(~kept & (by >= 0))
    # the edge of each plain loser to its keeper: the (lighter) edge between them
    span = np.int64(nodes.size)
    pid = np.minimum(ia, ib) * span + np.maximum(ia, ib)
    at = pc.index_in(pa.array(np.minimum(losers, by[losers]) * span + np.maximum(losers, by[losers])),
                     value_set=pa.array(np.where(plain, pid, -1))).to_numpy()
    edge_at = np.full(nodes.size, -1, np.int64)
    edge_at[losers] = at
    keeper = by.copy()
    # aliases: their copy's keeper and edge, or their copy and the alias edge when the copy is kept
    ai, aj = ia[alias], ib[alias]
    real = nodes[ai] >= 0
    ai, aj, arow = ai[real], aj[real], np.flatnonzero(alias)[real]
    copy_kept = kept[aj]
    keeper[ai] = np.where(copy_kept, aj, by[aj])
    edge_at[ai] = np.where(copy_kept, arow, edge_at[aj])
    losers = distinct(np.r_[losers, ai[keeper[ai] >= 0]])
    chosen = edges.take(pa.array(edge_at[losers]))
    k = keeper[losers]
    return chosen.append_column("loser", pa.array(nodes[losers])).append_column("keeper", pa.array(nodes[k])) \
        .append_column("keeper_uid", uid_text(uid.take(pa.array(k)))).append_column("keeper_prior", pa.array(nodes[k] < 0))


def survivor_decisions(edges: pa.Table, survivors: Survivors, ctx: StepContext, rows: pa.Table | None = None
                       ) -> pa.Table:
    """Decisions from the edges of one Shuffle (completed by the step's join() from the touched `rows` when it has
    one): greedy survivors, reason and detail."""
    if survivors.join is not None:
        edges = survivors.join(edges, rows, ctx.params, ctx.state)
    if not edges.num_rows:
        return DECISION_SCHEMA.empty_table()
    chosen = resolve_edges(edges)
    return decisions(chosen.column("loser"), survivors.reason, survivors.detail(chosen, ctx.params, ctx.state))


def decisions(rows, reason: str, detail) -> pa.Table:
    """A decision table: the given rows rejected with reason and detail (a column, or one text for all)."""
    rows = pa.array(rows, pa.int64()) if not isinstance(rows, (pa.Array, pa.ChunkedArray)) else rows
    n = len(rows)
    if isinstance(detail, str) or detail is None:
        detail = pa.array([detail] * n, pa.string())
    return pa.table([rows, pa.array([reason] * n, pa.string()), detail], schema=DECISION_SCHEMA)


def top_fraction_keep(n: int, fraction: float) -> int:
    """Rows a top fraction keeps among n scored rows: floor(fraction * n + 1/2)."""
    return math.floor(fraction * n + 0.5)


def below_cutoff(score: pa.Array, uid: pa.Array, cutoff: tuple[float, str] | None) -> pa.Array:
    """Rows ranked below the cutoff (score, uid) of the last kept row: score lower, or equal with a larger uid.
    None keeps every row; a NaN score keeps none. Unscored rows are never below."""
    if cutoff is None:
        return pa.array(np.zeros(len(score), bool))
    cs, cu = cutoff
    if math.isnan(cs):
        return pc.fill_null(pc.is_valid(score), False)
    return pc.fill_null(pc.or_(pc.less(score, cs), pc.and_(pc.equal(score, cs), pc.greater(uid, cu))), False)


__all__ = ["Counts", "DECISION_SCHEMA", "EDGE_FIELDS", "Fit", "KEY", "PRIOR", "ROW", "Shuffle", "Step",
           "StepContext", "Survivors", "TopFraction", "below_cutoff", "components", "decisions", "greedy_keep",
           "rank_order", "resolve_edges", "survivor_decisions", "top_fraction_keep", "uid_bytes", "uid_text",
           "uid_words"]
