"""The balance stage (MetaCLIP's curation): matching as MetaCLIP matches, its rule on Zipf pools (in one process and
as Ray tasks), concept lists, and a real curate build with a refilter."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from flows.engine.global_decisions import decide_table
from stages.balance import BalanceParams, BalanceStage, tail_share, threshold_for_share
from stages.base import StageConfigError
from stages.concepts import load_concepts, spaced_entry, spacing
from stages.concepts.lists import ConceptList
from stages.concepts.matcher import Matcher

ROOT = Path(__file__).resolve().parents[1]
LAION = pq.read_table(ROOT / "tests/data/laion-alt-text/laion_1000.parquet", columns=["TEXT"])["TEXT"]


def concept_file(tmp_path: Path, entries, name: str = "concepts.txt") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(entries) if name.endswith(".json") else "\n".join(entries))
    return str(path)


# --------------------------------------------------------------------------- matching

def test_matching_follows_metaclip_word_boundaries():
    entries = ["cat", "hot dog", "dog", "new york", "york", "中国", "u.s", "the"]
    m = Matcher(ConceptList("t", ("en",), (0, len(entries)), pa.array(entries)), case_sensitive=False)
    got = m.match(pa.array(["A cat.", "cats and dogs", "hot dog,NEW YORK!", None, "我爱中国人", "concatenate",
                            "the u.s. army", "dog\tdog", ""])).to_pylist()
    names = [sorted(entries[i] for i in ids) for ids in got]
    assert names == [["cat"], [], ["dog", "hot dog", "new york", "york"], [], ["中国"], [], ["the"], ["dog"], []]
    exact = Matcher(ConceptList("t", ("en",), (0, 2), pa.array(["Apple", "apple"])), case_sensitive=True)
    assert exact.match(pa.array(["an Apple", "an apple"])).to_pylist() == [[0], [1]]


def test_automaton_equals_metaclips_plain_substring_rule_on_real_alt_text():
    """The Aho-Corasick matcher finds exactly the entries that MetaCLIP's reference rule finds (" entry " in the
    spaced caption) on 300 LAION alt texts, with 3,000 frequent words and every multi-word entry of the default."""
    full = load_concepts("wordfreq", ("en",), 100_000, False)
    entries = full.entries.to_pylist()
    sub = entries[:3000] + [e for e in entries if " " in e]
    m = Matcher(ConceptList("t", ("en",), (0, len(sub)), pa.array(sub)), case_sensitive=False)
    caps = [c or "" for c in LAION.to_pylist()[:300]] + ["two hot dogs and a teddy bear near a fire hydrant"]
    got = m.match(pa.array(caps)).to_pylist()
    spaced = [spaced_entry(e) for e in sub]
    for cap, ids in zip(caps, got):
        text = spacing(cap.lower())
        assert sorted(ids) == [i for i, e in enumerate(spaced) if e in text], cap
    assert {"hot dogs", "teddy bear", "fire hydrant"} <= {sub[i] for i in got[-1]}


# --------------------------------------------------------------------------- the rule on synthetic pools

def zipf_pool(n: int, k: int, per_row: tuple[int, ...] = (1,), s: float = 1.1, seed: int = 0) -> pa.Table:
    """n rows with hex uids; each row matches `per_row` concepts (drawn from the choices) of k, Zipf(s)."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, k + 1) ** s
    sizes = rng.choice(per_row, size=n)
    ids, offsets = [], [0]
    for size in sizes:  # test data only
        ids.append(np.sort(rng.choice(k, size=size, replace=False, p=w / w.sum())))
        offsets.append(offsets[-1] + size)
    uid = [f"{a:016x}{b:016x}" for a, b in rng.integers(0, 2**63, size=(n, 2)).tolist()]
    flat = np.concatenate(ids).astype(np.int32)
    return pa.table({"uid": uid, "concept_ids": pa.ListArray.from_arrays(pa.array(np.array(offsets, np.int32)),
                                                                          pa.array(flat))})


@pytest.fixture(scope="module")
def zipf_list(tmp_path_factory):
    return concept_file(tmp_path_factory.mktemp("concepts"), [f"concept {i}" for i in range(300)])


def kept_mask(pool: pa.Table, out: pa.Table) -> np.ndarray:
    return ~pc.is_in(pool["uid"], value_set=out["uid"]).to_numpy(zero_copy_only=False)


def test_single_concept_pairs_keep_min_count_t_per_concept(zipf_list):
    pool = zipf_pool(60_000, 300)
    t = 400
    summaries: dict = {}
    out = decide_table("balance", BalanceParams(concepts=zipf_list, t=t), pool, summaries=summaries)
    kept = kept_mask(pool, out)
    ids = pc.list_flatten(pool["concept_ids"]).to_numpy()
    count = np.bincount(ids, minlength=300)
    got = np.bincount(ids[kept], minlength=300)
    p = np.minimum(1.0, t / np.maximum(count, 1))
    sd = np.sqrt(count * p * (1 - p))
    assert (count > t).sum() >= 20  # a real head
    assert np.all(np.abs(got - np.minimum(count, t)) <= 4 * sd + 1e-9), (got, count)
    assert np.array_equal(got[count <= t], count[count <= t])  # the tail keeps every pair
    total_sd = math.sqrt(float((sd ** 2).sum()))
    assert abs(got.sum() - np.minimum(count, t).sum()) <= 4 * total_sd
    assert set(out["reason"].to_pylist()) == {"balanced_out"}
    head = out["detail"].to_pylist()[0]
    assert head.startswith("'concept ") and "matches > t 400" in head
    s = summaries["concepts"]["summary"]
    assert s["pool"] == summaries["concepts"]["pool"] == pool.num_rows and s["t"] == t
    assert s["head"][0]["count"] == count.max() and s["rank_counts"][0] == [1, int(count.max())]


def test_multi_concept_pairs_keep_the_expected_total_and_ray_tasks_decide_the_same(zipf_list, local_ray):
    pool = zipf_pool(40_000, 300, per_row=(1, 2, 3, 4), seed=1)
    params = BalanceParams(concepts=zipf_list, t=250)
    here = decide_table("balance", params, pool)
    on_ray = decide_table("balance", params, pool, ray_tasks=True, parts=3)
    assert here.equals(on_ray)
    kept = kept_mask(pool, here)
    ids_col = pool["concept_ids"]
    ids = pc.list_flatten(ids_col).to_numpy()
    parents = pc.list_parent_indices(ids_col).to_numpy()
    count = np.bincount(ids, minlength=300)
    p_pair = np.minimum(1.0, 250 / count[ids])
    dropped = np.exp(np.bincount(parents, weights=np.log1p(-np.minimum(p_pair, 1 - 1e-12)), minlength=len(pool)))
    p_row = 1 - dropped
    p_row[np.bincount(parents, weights=p_pair >= 1, minlength=len(pool)) > 0] = 1.0
    expect, sd = p_row.sum(), math.sqrt(float((p_row * (1 - p_row)).sum()))
    assert 0.2 * len(pool) < expect < 0.9 * len(pool)
    assert abs(kept.sum() - expect) <= 4 * sd, (kept.sum(), expect, sd)
    # the detail names the dropped row's concept with the largest count
    first = here.slice(0, 1).to_pylist()[0]
    row_ids = pool["concept_ids"][pool["uid"].to_pylist().index(first["uid"])].as_py()
    assert first["detail"].startswith(f"'concept {max(row_ids, key=lambda i: (count[i], -i))}'")


def test_t_as_fraction_reruns_and_a_larger_t_only_keeps_more(zipf_list):
    pool = zipf_pool(20_000, 300, per_row=(1, 2), seed=2)
    absolute = decide_table("balance", BalanceParams(concepts=zipf_list, t=200), pool)
    fraction = decide_table("balance", BalanceParams(concepts=zipf_list, t=200 / 20_000), pool)
    assert absolute.equals(fraction)
    assert absolute.equals(decide_table("balance", BalanceParams(concepts=zipf_list, t=200), pool))
    looser = decide_table("balance", BalanceParams(concepts=zipf_list, t=800), pool)
    assert set(looser["uid"].to_pylist()) < set(absolute["uid"].to_pylist())
    other_seed = decide_table("balance", BalanceParams(concepts=zipf_list, t=200, seed=1), pool)
    assert set(other_seed["uid"].to_pylist()) != set(absolute["uid"].to_pylist())


def test_rows_without_a_concept_are_no_concept_or_kept():
    table = pa.table({"concept_count": pa.array([0, 1, 3, None], pa.int32())})
    d = BalanceStage.decide(table, BalanceParams())
    assert d.reason == ["no_concept", None, None, "no_concept"] and d.detail[0] == "0 concepts"
    assert BalanceStage.decide(table, BalanceParams(min_concepts=0)).reason == [None] * 4


def test_per_language_t_keeps_each_languages_tail_share(tmp_path):
    """MetaCLIP 2: t holds for the first language; the second gets the t with the same tail share."""
    a = concept_file(tmp_path, [f"a{i}" for i in range(200)], "en.txt")
    concept_file(tmp_path, [f"b{i}" for i in range(200)], "de.txt")
    source = a.replace("en.txt", "{lang}.txt")
    en = zipf_pool(30_000, 200, s=1.0, seed=3)
    de = zipf_pool(6_000, 200, s=1.3, seed=4)
    shifted = de["concept_ids"].combine_chunks()
    de = de.set_column(1, "concept_ids", pa.ListArray.from_arrays(
        shifted.offsets, pc.add(shifted.flatten(), 200).cast(pa.int32())))  # the second block's ids
    pool = pa.concat_tables([en, de])
    params = BalanceParams(concepts=source, languages=["en", "de"], t=300)
    s: dict = {}
    out = decide_table("balance", params, pool, summaries=s)
    t = s["concepts"]["summary"]["t_by_language"]
    ids = pc.list_flatten(pool["concept_ids"]).to_numpy()
    count = np.bincount(ids, minlength=400)
    share = tail_share(count[:200], 300)
    assert t["en"] == 300 and t["de"] == threshold_for_share(count[200:], share) != 300
    assert abs(tail_share(count[200:], t["de"]) - share) < 0.05
    kept = kept_mask(pool, out)
    got = np.bincount(ids[kept], minlength=400)
    top_de = 200 + int(np.argmax(count[200:]))
    assert got[top_de] < count[top_de] and abs(got[top_de] - t["de"]) <= 4 * math.sqrt(t["de"])
    flat = BalanceParams(concepts=source, languages=["en", "de"], t=300, per_language_t=False)
    s2: dict = {}
    decide_table("balance", flat, pool, summaries=s2)
    assert s2["concepts"]["summary"]["t_by_language"] == {"en": 300.0, "de": 300.0}


# --------------------------------------------------------------------------- concept lists

def test_concept_files_text_metaclip_json_and_per_language(tmp_path):
    txt = concept_file(tmp_path, ["Cat", "cat ", "", "hot dog"])
    assert load_concepts(txt, ("en",), 10, False).entries.to_pylist() == ["cat", "hot dog"]
    assert load_concepts(txt, ("en",), 10, True).entries.to_pylist() == ["Cat", "cat", "hot dog"]
    as_list = concept_file(tmp_path, ["photo", "red car"], "meta.json")
    assert load_concepts(as_list, ("en",), 10, False).entries.to_pylist() == ["photo", "red car"]
    (tmp_path / "fr.json").write_text(json.dumps({"chat": "w", "voiture rouge": "b"}))
    (tmp_path / "en.json").write_text(json.dumps({"cat": "w"}))
    per = load_concepts(str(tmp_path / "{lang}.json"), ("en", "fr"), 10, False)
    assert per.entries.to_pylist() == ["cat", "chat", "voiture rouge"] and per.starts == (0, 1, 3)
    assert per.lang_of(np.array([0, 1, 2])).tolist() == [0, 1, 1]
    m = Matcher(per, case_sensitive=False)
    assert m.match(pa.array(["a cat", "un chat et une voiture rouge", "a cat"]),
                   np.array([0, 1, 1])).to_pylist() == [[0], [1, 2], []]
    with pytest.raises(StageConfigError, match="does not exist"):
        BalanceStage(BalanceParams(concepts=str(tmp_path / "missing.txt"))).preflight()
    with pytest.raises(StageConfigError, match="no word list for language 'xx'"):
        BalanceStage(BalanceParams(languages=["xx"])).preflight()


def test_default_list_is_built_once_into_the_cache_with_multiword_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("PAIRFORGE_CACHE", str(tmp_path))
    load_concepts.cache_clear()
    try:
        c = load_concepts("wordfreq", ("en", "de"), 5000, False)
        files = sorted(p.name for p in (tmp_path / "concepts").iterdir())
        assert len(files) == 2 and files[0].startswith("wordfreq-") and files[0].endswith("-de-5000.txt")
        en = c.block(0)[1]
        assert en[:3] == ["the", "to", "and"] and {"hot dog", "teddy bears", "42"} <= set(en)
        assert "katze" in c.block(1)[1]
        stage = BalanceStage(BalanceParams(languages=["en", "de"], max_words=5000))
        stage.setup()
        out = stage(pa.table({"uid": ["0" * 32] * 3, "text": ["Eine Katze", "a hot dog", "qqq zzz"],
                              "lang": ["de", "en", "fr"]}))
        names = [[c.entries[i].as_py() for i in ids] for ids in out["concept_ids"].to_pylist()]
        assert names[0] == ["eine", "katze"] and {"hot", "dog", "hot dog", "a"} <= set(names[1]) and names[2] == []
        assert out["concept_count"].to_pylist() == [2, len(names[1]), 0]
        assert stage.metadata()["entries_per_language"]["en"] == len(en)
    finally:
        load_concepts.cache_clear()


# --------------------------------------------------------------------------- a real build

@pytest.mark.slow
def test_curate_build_balances_and_refilter_moves_t_without_matching(tmp_path):
    """A curate build (Prefect, Ray, shards) with clean + balance: captions without a concept are rejected
    no_concept, head-concept rows balanced_out naming their concept, tail rows all kept; every row accounted.
    refilter --set balance.t=... re-decides from the stored concept ids; the report shows the distribution."""
    import io

    from PIL import Image

    from flows.curate import curate_flow
    from flows.refilter import refilter_flow
    from reporting.report import load_build, render_report
    from tests.builds import read_parts

    rows = []
    for i in range(60):
        text = ("A photo of a dog on the grass" if i < 40 else "a red kite over the beach" if i < 52
                else "zzqx 1234 vvk")
        im = Image.new("RGB", (40, 40), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        rows.append({"url": f"http://photos.test/{i}.png", "text": f"{text} ({i})" if i >= 52 else text,
                     "image": buf.getvalue()})
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), corpus / "part-0.parquet")
    concepts = concept_file(tmp_path, ["photo", "dog", "grass", "kite", "beach", "red"])
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "dataset": "balanced", "source": {"pairs": str(corpus), "caption_col": "text"},
        "stages": [{"clean": {}}, {"balance": {"concepts": concepts, "t": 8}}], "out": str(tmp_path / "b"),
        "ray": {"num_cpus": 2, "object_store_gb": 0.5}}))
    r = curate_flow(str(spec), quiet=True)
    kept = read_parts(r["build_dir"], "shards", ["text", "concept_ids"])
    rej = read_parts(r["build_dir"], "rejects", ["text", "stage", "reason", "detail"]).to_pylist()
    assert r["stats"]["rows_listed"] == 60 == kept.num_rows + len(rej)
    by_reason: dict = {}
    for x in rej:
        by_reason.setdefault(x["reason"], []).append(x)
    assert {x["text"] for x in by_reason["no_concept"]} == {rows[i]["text"] for i in range(52, 60)}
    assert all(x["stage"] == "balance" and x["text"].startswith("A photo") for x in by_reason["balanced_out"])
    assert all(x["detail"].startswith(("'photo' 40 matches > t 8", "'dog' 40 matches > t 8", "'grass' 40"))
               for x in by_reason["balanced_out"])
    assert sum(t.startswith("a red kite") for t in kept["text"].to_pylist()) == 12  # the tail keeps every pair
    head_kept = sum(t.startswith("A photo") for t in kept["text"].to_pylist())
    assert 0 < head_kept < 40 and len(by_reason["balanced_out"]) == 40 - head_kept
    html = render_report(load_build(r["build_dir"]))
    assert 'id="balance"' in html and 'data-concept="photo"' in html and "A photo of a dog" in html

    child = refilter_flow(r["build_dir"], overrides=["balance.t=100"], quiet=True)
    rej2 = read_parts(child["build_dir"], "rejects", ["reason"])["reason"].to_pylist()
    assert sorted(set(rej2)) == ["no_concept"] and child["stats"]["rows_kept"] == 52
    again = refilter_flow(child["build_dir"], overrides=["balance.t=8"], quiet=True)
    assert sorted(read_parts(again["build_dir"], "shards", ["text"])["text"].to_pylist()) == \
        sorted(kept["text"].to_pylist())  # the same draws from the stored ids: the first build's rows
