"""Global dedup as a distributed operation over Ray Data, with the decisions of stages.dedup.DedupStage.decide.

dedup_decisions(alive, params, prior) returns (uid, reason, detail) for the rows of `alive` rejected as duplicates:
the same rows, reasons and details as DedupStage.decide over the same rows and prior rows. The steps run in
decide's order, each over the rows the earlier ones kept:

1. exact, 2. url   Rows are hash-partitioned on the key (sha256, normalised URL; polars' hash, the same in every
                   worker of one environment) and grouped per partition with a Ray Data groupby; each partition
                   picks its groups' survivors vectorised (stages.dedup.resolve_groups). The first of these steps
                   also numbers the rows (partition << 40 | position): the node ids of the near step.
3. near            Multi-index hashing, distributed. The covering design of stages.dedup (a family of block
                   subsets that any two hashes within k agree on one of) is split into k + 1 groups of masks that
                   share a block; no fewer groups can work (any k blocks miss some mask). Every pHash and crop pHash
                   goes once to each group, to the partition named by (group, the bits of the group's block): a
                   pair within k agrees on all bits of some mask, so it meets in that mask's group's partition.
                   Each partition runs stages.dedup.distinct_pairs with its group's masks, keeps a pair only in the
                   group of the first mask it agrees on (each pair is found once), and turns pairs into duplicate
                   edges with stages.dedup.evidence_edges, as decide does. The edges alone come to the driver;
                   connected components (scipy) label the rows they touch; the labels go back to the workers,
                   which pick survivors and write details per component. Exact: the same pairs as brute force.
4. semantic        SemDeDup as NeMo Curator runs it: k-means (decide's settings) fitted in one task on a sample,
                   every row when there are at most `semantic_sample` (so smaller builds get decide's clusters
                   exactly), a hash-chosen subset of about that many otherwise; cluster ids assigned in the
                   pipeline; pairs, components and survivors per cluster in parallel.

The driver holds row counts, the duplicate edges and their components' labels, and the k-means centroids: never a
table of rows. Intermediate tables live in the object store (Ray spills them to disk when large) or, with tmp_dir,
in Parquet files there (any filesystem pyarrow reads). `alive` is read twice when SemDeDup runs.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from stages.dedup import block_masks as _block_masks
from stages.dedup import column_or_nulls as _col
from stages.dedup import covering_blocks as _design_blocks
from stages.dedup import covering_design as _design
from stages.dedup import dictionary_codes as _codes
from stages.dedup import int_array as _int_np
from stages.dedup import plan_bits as _plan_bits
from stages.dedup import (
    CROP_BOXES,
    DedupParams,
    cluster_pairs,
    components,
    distinct_pairs,
    evidence_edges,
    near_distances,
    normalized_embeddings,
    resolve_groups,
    row_sizes,
    safe_normalize_url,
    semantic_cluster_count,
    semantic_kmeans,
    to_unsigned,
    uid_ranks,
)

RESULT_SCHEMA = pa.schema([("uid", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
NODE_SCHEMA = pa.schema([("uid", pa.string()), ("prior", pa.bool_()), ("area", pa.int64()), ("nbytes", pa.int64()),
                         ("sha256", pa.string()), ("url_norm", pa.string()), ("phash", pa.int64()),
                         ("phash_crops", pa.list_(pa.int64()))])
KEYED_SCHEMA = NODE_SCHEMA.append(pa.field("node", pa.int64())).append(pa.field("reason", pa.string())) \
    .append(pa.field("detail", pa.string()))
EMB_SCHEMA = pa.schema([("uid", pa.string()), ("area", pa.int64()), ("nbytes", pa.int64()),
                        ("image_emb", pa.list_(pa.float32())), ("emb_len", pa.int64())])
EDGE_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64())])

# Sort-based shuffles cost a fraction of a second each here, hash shuffles several seconds (aggregator actors),
# and were not slower at a million rows; set on this module's own (materialised) datasets only.
SHUFFLE_STRATEGY = "sort_shuffle_pull_based"
ROWS_PER_PARTITION = 250_000
ENTRIES_PER_NEAR_PARTITION = 2_000_000
SEMANTIC_SAMPLE = 100_000
_NODE_BITS = 40  # node id = partition << 40 | position in the partition
_CROPS = len(CROP_BOXES)
_INT_MAX = np.iinfo(np.int64).max


def dedup_decisions(alive, params: DedupParams, prior=None, *, tmp_dir: str | None = None,
                    partitions: int | None = None, semantic_sample: int = SEMANTIC_SAMPLE):
    """(uid, reason, detail) of the rows of `alive` that DedupStage.decide(alive, params, prior) rejects.

    alive: ray.data.Dataset of the rows still alive before dedup, metadata only (uid, url, sha256, url_norm, phash,
    phash_crops, image_bytes, original_width, original_height, width, height, and image_emb when align ran; absent
    columns count as null). prior: ray.data.Dataset of pairs earlier builds kept (uid, sha256, phash, phash_crops,
    url_norm), or None. partitions: hash partitions of the keyed steps (default: from the row count and the
    cluster's CPUs). Returns a materialised ray.data.Dataset with RESULT_SCHEMA.
    """
    return _Run(params, tmp_dir, partitions, semantic_sample).decide(alive, prior)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class NearPlan:
    """The covering design of stages.dedup split into groups of masks that share a block, and the partitions."""

    k: int
    masks: np.ndarray  # uint64, the whole design
    mask_group: np.ndarray  # group of each mask
    shifts: tuple[int, ...]  # per group: the lowest bit of its shared block
    subparts: tuple[int, ...]  # per group: partitions (a power of two within the block's values)
    offsets: tuple[int, ...]  # per group: its first partition id

    @classmethod
    def make(cls, k: int, entries: int, per_partition: int = ENTRIES_PER_NEAR_PARTITION) -> "NearPlan":
        key_bits = _plan_bits(k, max(entries, 2))
        b, fam = _design_blocks(k, key_bits)
        masks = np.array(_design(k, key_bits), np.uint64)
        blocks = _block_masks(b)
        # a small hitting set of blocks (greedy; k + 1 blocks for these designs, the least possible): every mask
        # holds one of them, and its group is the first such block
        group = np.full(len(fam), -1, np.int64)
        shared: list[int] = []
        while (group < 0).any():
            todo = np.flatnonzero(group < 0)
            best = max(range(b), key=lambda i: (sum(fam[t] >> i & 1 for t in todo), -i))
            group[[t for t in todo if fam[t] >> best & 1]] = len(shared)
            shared.append(best)
        shifts, subparts, offsets = [], [], []
        for g, blk in enumerate(shared):
            # a partition's work is about its entries times its group's masks: split the busier groups finer
            want = entries / per_partition * (group == g).sum() * len(shared) / len(fam)
            width = bin(blocks[blk]).count("1")
            shifts.append((blocks[blk] & -blocks[blk]).bit_length() - 1)
            offsets.append(sum(subparts))
            subparts.append(min(1 << max(0, math.ceil(math.log2(max(1.0, want)))), 1 << width))
        return cls(k, masks, group, tuple(shifts), tuple(subparts), tuple(offsets))

    @property
    def groups(self) -> int:
        return len(self.shifts)

    @property
    def partitions(self) -> int:
        return sum(self.subparts)

    def partition(self, values: np.ndarray, g: int) -> np.ndarray:
        """Partition of each hash in group g: the low bits of the group's shared block."""
        sub = (values >> np.uint64(self.shifts[g])) & np.uint64(self.subparts[g] - 1)
        return sub.astype(np.int64) + self.offsets[g]

    def group_of(self, part: int) -> int:
        return int(np.searchsorted(np.array(self.offsets), part, side="right")) - 1

    def pairs(self, uniq: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Pairs of distinct sorted hashes within k whose first agreeing mask is in group g."""
        ui, uj, _ = distinct_pairs(uniq, self.k, masks=tuple(int(m) for m in self.masks[self.mask_group == g]))
        if not ui.size:
            return ui, uj
        keep = np.empty(ui.size, bool)
        for a in range(0, ui.size, 1 << 16):
            x = uniq[ui[a:a + (1 << 16)]] ^ uniq[uj[a:a + (1 << 16)]]
            first = ((x[:, None] & self.masks[None, :]) == 0).argmax(axis=1)
            keep[a:a + x.size] = self.mask_group[first] == g
        return ui[keep], uj[keep]


# ----------------------------------------------------------------------------------- per-batch functions


def _string_partition(key: pa.Array, uid: pa.Array, parts: int) -> np.ndarray:
    """Partition of each row: a hash of its key, of its uid where the key is null."""
    h = pl.Series(key).hash(seed=0).to_numpy()
    hu = pl.Series(uid).hash(seed=0).to_numpy()
    h = np.where(np.asarray(key.is_valid()), h, hu)
    return (h % np.uint64(parts)).astype(np.int64)


def _node_rows(batch: pa.Table, is_prior: bool) -> pa.Table:
    """The columns the steps read, typed; the survivor sizes computed (prior rows: 0, as in decide)."""
    n = batch.num_rows
    if is_prior:
        area = nbytes = np.zeros(n, np.int64)
    else:
        area, nbytes = row_sizes(batch)
    if not is_prior and "url_norm" not in batch.column_names:
        url = pa.array([safe_normalize_url(u) for u in _col(batch, "url", n, pa.string()).to_pylist()], pa.string())
    else:
        url = _col(batch, "url_norm", n, pa.string())
    return pa.table([_col(batch, "uid", n, pa.string()), pa.array(np.full(n, is_prior)), pa.array(area),
                     pa.array(nbytes), _col(batch, "sha256", n, pa.string()), url, _col(batch, "phash", n, pa.int64()),
                     _col(batch, "phash_crops", n, pa.list_(pa.int64()))], schema=NODE_SCHEMA)


def _with_partition(batch: pa.Table, key: str | None, parts: int) -> pa.Table:
    uid = batch.column("uid").combine_chunks()
    k = batch.column(key).combine_chunks() if key else pa.nulls(batch.num_rows, pa.string())
    return batch.append_column("part", pa.array(_string_partition(k, uid, parts)))


def _scatter(n: int, idx: np.ndarray, values: pa.Array) -> pa.Array:
    """An array of n nulls with values at positions idx."""
    pos = np.full(n, -1, np.int64)
    pos[idx] = np.arange(idx.size)
    return values.take(pa.array(pos, mask=pos < 0))


def _details(uid: pa.Array, survivors: np.ndarray, is_prior: np.ndarray, extra: pa.Array | None) -> pa.Array:
    """decide's detail: "dup of <uid>" [+ " in an earlier build"] [+ " (<extra>)"]."""
    where = pc.if_else(pa.array(is_prior[survivors], pa.bool_()), " in an earlier build", "")
    text = pc.binary_join_element_wise("dup of ", uid.take(pa.array(survivors, pa.int64())), where, "")
    if extra is not None:
        text = pc.binary_join_element_wise(text, " (", extra, ")", "")
    return text.cast(pa.string())


def _rejects(uid: pa.Array, losers: np.ndarray, detail: pa.Array, reason: str) -> pa.Table:
    return pa.table([uid.take(pa.array(losers, pa.int64())), pa.repeat(pa.scalar(reason), losers.size), detail],
                    schema=RESULT_SCHEMA)


def _sizes(t: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
    uid = t.column("uid").combine_chunks()
    is_prior = np.asarray(t.column("prior").to_numpy(), bool) if "prior" in t.column_names else np.zeros(len(uid), bool)
    return uid, is_prior, _int_np(t.column("area").combine_chunks()), _int_np(t.column("nbytes").combine_chunks())


def _keyed_partition(t: pa.Table, key: str | None, reason: str, number: bool) -> pa.Table:
    """One hash partition of a keyed step: every row back, the rows losing their group with reason and detail."""
    n = t.num_rows
    if number:
        part = int(t.column("part")[0].as_py())
        t = t.drop_columns([c for c in ("node", "reason", "detail") if c in t.column_names])
        t = t.append_column("node", pa.array((part << _NODE_BITS) + np.arange(n, dtype=np.int64)))
    else:
        t = t.drop_columns(["reason", "detail"])
    uid, is_prior, area, nbytes = _sizes(t)
    labels = _codes(t.column(key).combine_chunks(), np.ones(n, bool)) if key else np.full(n, -1, np.int64)
    losers, survivors = resolve_groups(labels, uid_ranks(uid), is_prior, area, nbytes)
    detail = _details(uid, survivors, is_prior, None)
    t = t.append_column("reason", _scatter(n, losers, pa.repeat(pa.scalar(reason), losers.size)))
    t = t.append_column("detail", _scatter(n, losers, detail))
    return t.select(KEYED_SCHEMA.names).cast(KEYED_SCHEMA)


def _rejected_rows(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_valid(t.column("reason"))).select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)


def _alive_rows(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t.column("reason")))


def _near_entries(batch: pa.Table, plan: NearPlan, crops: bool) -> pa.Table:
    """Every pHash (and crop pHash) of the batch, once per mask group, as one row per partition holding lists."""
    ph = batch.column("phash").combine_chunks()
    has = np.asarray(ph.is_valid())
    rows = np.flatnonzero(has)
    node = _int_np(batch.column("node").combine_chunks())
    area = _int_np(batch.column("area").combine_chunks())
    values = [to_unsigned(_int_np(ph.take(pa.array(rows)), 0))]
    owner, sizes, full = [node[rows]], [area[rows]], [np.ones(rows.size, bool)]
    if crops:
        ca = batch.column("phash_crops").combine_chunks()
        cr = np.flatnonzero(has & (_int_np(pc.list_value_length(ca), 0) == _CROPS))
        values.append(to_unsigned(_int_np(ca.take(pa.array(cr)).flatten(), 0)))
        owner.append(np.repeat(node[cr], _CROPS))
        sizes.append(np.repeat(area[cr], _CROPS))
        full.append(np.zeros(cr.size * _CROPS, bool))
    values, owner, sizes, full = (np.concatenate(v) for v in (values, owner, sizes, full))
    tables = []
    for g in range(plan.groups):
        part = plan.partition(values, g)
        if plan.subparts[g] > 1:  # a counting (radix) sort: the sub-partitions are small integers
            order = np.argsort((part - plan.offsets[g]).astype(np.uint16 if plan.subparts[g] <= 1 << 16 else np.int64),
                               kind="stable")
            part = part[order]
        else:
            order = slice(None)
        starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]]) if part.size else np.empty(0, np.int64)
        offsets = pa.array(np.r_[starts, part.size], pa.int64())

        def lists(v: np.ndarray, typ: pa.DataType) -> pa.Array:
            return pa.LargeListArray.from_arrays(offsets, pa.array(v[order], typ))

        tables.append(pa.table({"part": pa.array(part[starts], pa.int64()),
                                "value": lists(values.view(np.int64), pa.int64()), "owner": lists(owner, pa.int64()),
                                "area": lists(sizes, pa.int64()), "full": lists(full, pa.bool_())}))
    return pa.concat_tables(tables)


def _near_partition_edges(t: pa.Table, plan: NearPlan) -> pa.Table:
    """The duplicate edges one near partition decides (see NearPlan.pairs and stages.dedup.evidence_edges)."""
    g = plan.group_of(int(t.column("part")[0].as_py()))

    def flat(name: str) -> np.ndarray:
        return pc.list_flatten(t.column(name)).to_numpy()

    area = flat("area")
    ei, ej = evidence_edges(to_unsigned(flat("value")), flat("owner"), flat("full").astype(bool),
                            np.where(area > 0, area, 0), np.where(area > 0, area, _INT_MAX),
                            lambda uniq: plan.pairs(uniq, g), same_value=g == 0)
    return pa.table([pa.array(ei, pa.int64()), pa.array(ej, pa.int64())], schema=EDGE_SCHEMA)


def _with_component(batch: pa.Table, nodes: np.ndarray, labels: np.ndarray, parts: int) -> pa.Table:
    """The batch's rows that some duplicate edge touches, with their component's label and partition."""
    node = _int_np(batch.column("node").combine_chunks())
    pos = np.minimum(np.searchsorted(nodes, node), max(nodes.size - 1, 0))
    hit = (nodes[pos] == node) if nodes.size else np.zeros(node.size, bool)
    rows = np.flatnonzero(hit)
    out = batch.take(pa.array(rows)).drop_columns(["reason", "detail", "sha256", "url_norm"])
    label = labels[pos[rows]]
    return out.append_column("label", pa.array(label, pa.int64())).append_column("part", pa.array(label % parts))


def _near_partition_rejects(t: pa.Table, k: int, crops: bool) -> pa.Table:
    """Survivors and details of the components in one partition, as decide writes them."""
    uid, is_prior, area, nbytes = _sizes(t)
    n = t.num_rows
    losers, survivors = resolve_groups(_int_np(t.column("label").combine_chunks()), uid_ranks(uid), is_prior, area,
                                       nbytes)
    full = to_unsigned(_int_np(t.column("phash").combine_chunks(), 0))
    crop_hashes = np.zeros((n, _CROPS), np.uint64)
    crop_ok = np.zeros((n, _CROPS), bool)
    if crops:
        ca = t.column("phash_crops").combine_chunks()
        rows = np.flatnonzero(_int_np(pc.list_value_length(ca), 0) == _CROPS)
        if rows.size:
            crop_hashes[rows] = to_unsigned(_int_np(ca.take(pa.array(rows)).flatten(), 0)).reshape(rows.size, _CROPS)
            crop_ok[rows] = True
    dist, crop = near_distances(full, crop_hashes, crop_ok, losers, survivors)
    h = pc.cast(pa.array(dist), pa.string())
    extra = pc.if_else(pa.array((dist <= k) | (crop > dist), pa.bool_()),
                       pc.binary_join_element_wise("hamming=", h, ""),
                       pc.binary_join_element_wise("hamming=", h, ", crop hamming=",
                                                   pc.cast(pa.array(crop), pa.string()), ""))
    return _rejects(uid, losers, _details(uid, survivors, is_prior, extra), "duplicate_near")


def _embedding_rows(batch: pa.Table) -> pa.Table:
    """Rows with a non-empty embedding (float32, exact from float16), their sizes and embedding length."""
    n = batch.num_rows
    emb = _col(batch, "image_emb", n, pa.list_(pa.float32()))
    lens = _int_np(pc.list_value_length(emb), 0)
    rows = pa.array(np.flatnonzero(np.asarray(emb.is_valid()) & (lens > 0)))
    area, nbytes = row_sizes(batch)
    return pa.table([_col(batch, "uid", n, pa.string()).take(rows), pa.array(area).take(rows),
                     pa.array(nbytes).take(rows), emb.take(rows), pa.array(lens).take(rows)], schema=EMB_SCHEMA)


def _drop_listed(t: pa.Table) -> pa.Table:
    """Anti-join within one uid partition: rows whose uid a `listed` row carries are dropped, as are those rows."""
    listed = np.asarray(t.column("listed").to_numpy(), bool)
    gone = t.column("uid").filter(pa.array(listed)).combine_chunks()
    keep = ~listed & ~np.asarray(pc.is_in(t.column("uid"), value_set=gone).to_numpy(), bool)
    return t.filter(pa.array(keep)).drop_columns(["listed", "part"]).cast(EMB_SCHEMA)


def _listed_uids(t: pa.Table, parts: int) -> pa.Table:
    n = t.num_rows
    uid = t.column("uid").combine_chunks()
    out = pa.table([uid, pa.array(np.zeros(n, np.int64)), pa.array(np.zeros(n, np.int64)),
                    pa.nulls(n, pa.list_(pa.float32())), pa.array(np.zeros(n, np.int64))], schema=EMB_SCHEMA)
    return _listed_flag(out, True, parts)


def _listed_flag(t: pa.Table, listed: bool, parts: int) -> pa.Table:
    t = t.append_column("listed", pa.array(np.full(t.num_rows, listed)))
    return _with_partition(t, None, parts)


def _with_length(t: pa.Table, dim: int) -> pa.Table:
    return t.filter(pc.equal(t.column("emb_len"), dim))


def _in_sample(t: pa.Table, fraction: float) -> pa.Table:
    h = pl.Series(t.column("uid").combine_chunks()).hash(seed=1).to_numpy() >> np.uint64(11)
    return t.filter(pa.array(h < np.uint64(int(fraction * 2**53))))


def _fit_kmeans(clusters: int, dim: int, *tables: pa.Table):
    """decide's k-means over the sample's embeddings in uid order; only the centroids come back."""
    t = pa.concat_tables(tables)
    t = t.take(pc.sort_indices(t.column("uid")))
    x = normalized_embeddings(t.column("image_emb").combine_chunks(), dim)
    km = semantic_kmeans(clusters).fit(x)
    del km.labels_  # one per sample row: not needed to predict
    return km


def _with_cluster(batch: pa.Table, km, dim: int, parts: int) -> pa.Table:
    cluster = np.zeros(batch.num_rows, np.int64)
    if km is not None and batch.num_rows:
        cluster = km.predict(normalized_embeddings(batch.column("image_emb").combine_chunks(), dim)).astype(np.int64)
    return batch.append_column("cluster", pa.array(cluster)).append_column("part", pa.array(cluster % parts))


def _semantic_partition_rejects(t: pa.Table, dim: int, threshold: float) -> pa.Table:
    """SemDeDup over the clusters of one partition: pairs above the threshold per cluster, components, survivors."""
    cluster = _int_np(t.column("cluster").combine_chunks())
    order = np.lexsort((uid_ranks(t.column("uid").combine_chunks()), cluster))
    t = t.take(pa.array(order))
    cluster = cluster[order]
    x = normalized_embeddings(t.column("image_emb").combine_chunks(), dim)
    bounds = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1], True])
    ei, ej = [], []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        i, j = cluster_pairs(x[a:b].copy(), threshold)
        ei.append(i + a)
        ej.append(j + a)
    ei, ej = np.concatenate(ei), np.concatenate(ej)
    if not ei.size:
        return RESULT_SCHEMA.empty_table()
    n = t.num_rows
    labels = components(n, ei, ej)
    grouped = np.zeros(n, bool)
    grouped[ei] = True
    grouped[ej] = True
    labels[~grouped] = -1
    uid, is_prior, area, nbytes = _sizes(t)
    losers, survivors = resolve_groups(labels, np.arange(n), is_prior, area, nbytes)
    cos = np.einsum("ij,ij->i", x[losers], x[survivors]).astype(np.float64)
    extra = pa.array(np.char.mod("cosine=%.3f", cos) if cos.size else [], pa.string())
    return _rejects(uid, losers, _details(uid, survivors, is_prior, extra), "duplicate_semantic")


# ------------------------------------------------------------------------------------------------- the run


class _Run:
    def __init__(self, params: DedupParams, tmp_dir: str | None, partitions: int | None, semantic_sample: int):
        self.params = params
        self.tmp_dir = tmp_dir.rstrip("/") if tmp_dir else None
        self.partitions = partitions
        self.semantic_sample = semantic_sample
        self.tag = uuid.uuid4().hex[:8]

    # ------------------------------------------------------------------------------------------- helpers
    def checkpoint(self, ds, name: str, schema: pa.Schema):
        """ds computed once: materialised in the object store, or written to tmp_dir/<name> and read back."""
        import ray

        if self.tmp_dir is None:
            out = ds.materialize()
        else:
            import pyarrow.fs as pafs

            path = f"{self.tmp_dir}/dedup-{self.tag}/{name}"
            fs, where = pafs.FileSystem.from_uri(path)
            fs.create_dir(where, recursive=True)
            fs.delete_dir_contents(where)
            ds.write_parquet(path)
            files = [f for f in fs.get_file_info(pafs.FileSelector(where)) if f.path.endswith(".parquet")]
            out = ray.data.read_parquet(path, schema=schema) if files else ray.data.from_arrow(schema.empty_table())
        out.context.shuffle_strategy = SHUFFLE_STRATEGY
        return out

    def grouped(self, ds, fn, fn_args=(), blocks: int | None = None):
        """fn over each partition ("part") of ds. The sort-based shuffle makes as many blocks as it is given, so
        the input is cut into `blocks` (default: the keyed steps' partitions) first: that many tasks in parallel."""
        ds = ds.repartition(blocks or self.partitions)
        return ds.groupby("part").map_groups(fn, fn_args=fn_args, batch_format="pyarrow")

    # ------------------------------------------------------------------------------------------- steps
    def decide(self, alive, prior):
        import ray

        params = self.params
        columns = alive.columns() or []
        nodes = alive.map_batches(_node_rows, fn_args=(False,), batch_format="pyarrow", batch_size=65536)
        if prior is not None:
            nodes = nodes.union(prior.map_batches(_node_rows, fn_args=(True,), batch_format="pyarrow",
                                                  batch_size=65536))
        nodes = self.checkpoint(nodes, "nodes", NODE_SCHEMA)
        rows = nodes.count()
        if self.partitions is None:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.partitions = max(4, 2 * cpus, math.ceil(rows / ROWS_PER_PARTITION))
        rejected = []
        near = params.near_hamming > 0 and "phash" in columns
        keyed = [(key, reason) for key, reason, on in (("sha256", "duplicate_exact", params.exact),
                                                         ("url_norm", "duplicate_url", params.url)) if on]
        if near and not keyed:
            keyed = [(None, "")]  # numbers the rows only
        for i, (key, reason) in enumerate(keyed):
            step = self.grouped(nodes.map_batches(_with_partition, fn_args=(key, self.partitions),
                                                  batch_format="pyarrow"),
                                _keyed_partition, (key, reason, i == 0))
            step = self.checkpoint(step, f"step-{i}", KEYED_SCHEMA)
            rejected.append(step.map_batches(_rejected_rows, batch_format="pyarrow"))
            nodes = step.map_batches(_alive_rows, batch_format="pyarrow")
        if near and rows:
            rejected.append(self.near(nodes, rows))
        if params.semantic and "image_emb" in columns:
            rejected.append(self.semantic(alive, rejected))
        out = rejected[0].union(*rejected[1:]) if len(rejected) > 1 else (
            rejected[0] if rejected else ray.data.from_arrow(RESULT_SCHEMA.empty_table()))
        out = out.materialize()
        if self.tmp_dir is not None:
            import pyarrow.fs as pafs

            fs, where = pafs.FileSystem.from_uri(f"{self.tmp_dir}/dedup-{self.tag}")
            fs.delete_dir(where)
        return out

    def near(self, nodes, rows: int):
        p = self.params
        plan = NearPlan.make(p.near_hamming, rows * (1 + _CROPS * p.near_crops))
        entries = nodes.map_batches(_near_entries, fn_args=(plan, p.near_crops), batch_format="pyarrow",
                                    batch_size=16384)
        edges = self.grouped(entries, _near_partition_edges, (plan,), max(self.partitions, plan.partitions))
        ei, ej = [], []
        for batch in edges.iter_batches(batch_format="numpy", batch_size=None):
            ei.append(batch["a"])
            ej.append(batch["b"])
        if not ei or not sum(a.size for a in ei):
            return self.empty()
        ends = np.concatenate(ei + ej)
        ids, inv = np.unique(ends, return_inverse=True)
        labels = components(ids.size, inv[:ends.size // 2], inv[ends.size // 2:])
        del ends, inv, ei, ej
        touched = nodes.map_batches(_with_component, fn_args=(ids, labels, self.partitions), batch_format="pyarrow")
        return self.checkpoint(self.grouped(touched, _near_partition_rejects, (p.near_hamming, p.near_crops)),
                               "near", RESULT_SCHEMA)

    def semantic(self, alive, rejected: list):
        import ray

        emb = alive.map_batches(_embedding_rows, batch_format="pyarrow", batch_size=65536)
        if rejected:
            gone = rejected[0].union(*rejected[1:]) if len(rejected) > 1 else rejected[0]
            both = gone.map_batches(_listed_uids, fn_args=(self.partitions,), batch_format="pyarrow").union(
                emb.map_batches(_listed_flag, fn_args=(False, self.partitions), batch_format="pyarrow"))
            both.context.shuffle_strategy = SHUFFLE_STRATEGY  # the union's own copy of the context
            emb = self.grouped(both, _drop_listed)
        emb = self.checkpoint(emb, "embeddings", EMB_SCHEMA)
        lengths = {int(r["emb_len"]): int(r["count()"]) for r in emb.groupby("emb_len").count().take_all()}
        if sum(lengths.values()) < 2:
            return self.empty()
        dim = min(lengths, key=lambda d: (-lengths[d], d))  # the most common length, as decide takes it
        emb = emb.map_batches(_with_length, fn_args=(dim,), batch_format="pyarrow")
        rows = emb.count()
        clusters = semantic_cluster_count(self.params, rows)
        km = None
        if clusters > 1:
            sample_size = max(self.semantic_sample, 20 * clusters)
            sample = emb if rows <= sample_size else emb.map_batches(_in_sample, fn_args=(sample_size / rows,),
                                                                      batch_format="pyarrow")
            refs = sample.select_columns(["uid", "image_emb"]).to_arrow_refs()
            km = ray.get(ray.remote(num_cpus=1)(_fit_kmeans).remote(clusters, dim, *refs))
            del refs
        assigned = emb.map_batches(_with_cluster, fn_args=(km, dim, self.partitions), batch_format="pyarrow")
        return self.checkpoint(self.grouped(assigned, _semantic_partition_rejects,
                                            (dim, 1.0 - self.params.semantic_eps)), "semantic", RESULT_SCHEMA)

    @staticmethod
    def empty():
        import ray

        return ray.data.from_arrow(RESULT_SCHEMA.empty_table())
