"""The build report (headless Chromium renders it, self-contained, sections match the build), `pairforge show`, and
the dataset card (YAML header parses, features match the shards, `datasets` loads the folder with it).

`derive_build` (also used by benchmarks/report.py) makes a build folder from a finished one: its rows repeated
under new uids, plus synthetic align / safety / text stats decided with the spec's thresholds, a `recaptions`
column and a negatives/ set, so the sections that the demo spec does not exercise are tested too.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from tests.builds import read_parts

pytestmark = pytest.mark.slow  # the demo build fixture

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]


# --------------------------------------------------------------------------- helpers

def chromium_binary() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def run_chromium(binary: str, page: Path, profile: Path, *args: str,
                 timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=timeout)


def console_lines(stderr: str) -> list[str]:
    """Chromium's console messages (with --enable-logging=stderr): the report has no script, so any is an error."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


class Dom(HTMLParser):
    """Elements with their attributes and their ancestors' attributes; text per element."""

    VOID = {"img", "meta", "link", "br", "hr", "input", "source", "wbr", "col", "area", "base", "embed"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[dict] = []
        self.elements: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "parents": [e["attrs"] for e in self.stack], "text": ""}
        self.elements.append(el)
        if tag not in self.VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        self.elements.append({"tag": tag, "attrs": dict(attrs), "parents": [e["attrs"] for e in self.stack],
                              "text": ""})

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i]["tag"] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        for el in self.stack:
            el["text"] += data

    def find(self, tag=None, **attrs) -> list[dict]:
        def ok(e):
            return (tag is None or e["tag"] == tag) and all(
                e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())
        return [e for e in self.elements if ok(e)]


def inside(el: dict, **attrs) -> bool:
    return any(all(p.get(k.replace("_", "-")) == v for k, v in attrs.items()) for p in el["parents"])


# --------------------------------------------------------------------------- a derived build

def derive_build(src: Path, dst: Path, rows: int | None = None, seed: int = 0, extras: bool = True,
                 negatives: str = "column") -> Path:
    """A build folder from a finished build's rows, repeated to `rows` under new uids. With extras: synthetic stats
    of the align / safety / text stages the source spec lacks (decided with the thresholds written into the new
    spec), a `recaptions` column, and hard negatives: a `neg_captions` column (negatives="column", as the
    negatives_text stage writes it; kept when the source has one) or a negatives/ set with negative images
    (negatives="folder")."""
    from schemas.columns import build_schema, rejects_schema
    from stages.align import AlignParams
    from stages.safety import SafetyParams
    from stages.text import TextParams
    from dataio.shards import ShardWriter, atomic_write_text, write_manifest

    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    spec = yaml.safe_load((src / "spec.yaml").read_text())
    kept = read_parts(src, "shards")
    for c in ("stage", "reason", "detail"):
        kept = kept.append_column(c, pa.nulls(kept.num_rows, pa.string()))
    t = pa.concat_tables([kept, read_parts(src, "rejects")], promote_options="permissive").combine_chunks()
    n0 = t.num_rows
    if rows:
        t = t.take(pa.array(np.arange(rows) % n0))
        copies = (np.arange(rows) // n0).tolist()
        uids = [u if c == 0 else hashlib.md5(f"{u}/{c}".encode()).hexdigest()
                for u, c in zip(t["uid"].to_pylist(), copies)]
        t = t.set_column(t.column_names.index("uid"), t.schema.field("uid"), pa.array(uids, pa.string()))
    n = t.num_rows
    build_id = dst.name
    t = t.set_column(t.column_names.index("build_id"), "build_id", pa.array([build_id] * n, pa.string()))
    names = [next(iter(s)) for s in spec["stages"]]
    extra_fields = []
    if extras:
        rng = np.random.default_rng(seed)
        ok = pc.is_valid(t["image"])
        if "decode_ok" in t.column_names:
            ok = pc.and_(ok, pc.fill_null(t["decode_ok"], False))
        has = np.asarray(pc.fill_null(ok, False).to_numpy(zero_copy_only=False), bool)
        clip = np.round(rng.normal(0.31, 0.045, n), 4)
        nsfw = np.round(rng.beta(0.5, 9.0, n), 4)
        tfrac = np.round(rng.beta(0.6, 6.0, n), 4)
        dim = 64
        emb = rng.normal(size=(n, dim))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)

        def vec(a):
            flat = pa.array(a.astype(np.float16).ravel(), pa.float16())
            return pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), flat,
                                            mask=pa.array(~has))

        def col(values, typ):
            return pa.array([v if h else None for v, h in zip(values, has)], typ)

        texts = t["text"].to_pylist()
        synthetic = {
            "align": {"clip_score": col(clip.tolist(), pa.float32()), "image_emb": vec(emb),
                      "text_emb": vec(emb[::-1].copy())},
            "safety": {"nsfw_score": col(nsfw.tolist(), pa.float32()),
                       "nsfw_labels": col([f"FEMALE_BREAST_EXPOSED:{v:.2f}" if v >= 0.25 else "" for v in nsfw],
                                          pa.string())},
            "text": {"text_frac": col(tfrac.tolist(), pa.float32()),
                     "ocr_text": col(["SAMPLE PREVIEW" if f > 0.15 else "" for f in tfrac], pa.string()),
                     "ocr_words": col([2 if f > 0.15 else 0 for f in tfrac], pa.int32()),
                     "ocr_caption_overlap": col([None] * n, pa.float32())},
        }
        params = {"align": AlignParams(threshold=0.25), "safety": SafetyParams(threshold=0.5),
                  "text": TextParams(max_text_frac=0.15)}
        added = [s for s in ("align", "safety", "text") if s not in names]
        for name in added:
            for k, v in synthetic[name].items():
                t = t.append_column(k, v)
        rtype = pa.list_(pa.struct([("text", pa.string()), ("score", pa.float32()), ("model", pa.string())]))
        t = t.append_column("recaptions", pa.array(
            [[{"text": f"a photo showing {x}", "score": float(c) + 0.02, "model": "synthetic"}] if h and x else None
             for x, c, h in zip(texts, clip, has)], rtype))
        extra_fields = [pa.field("recaptions", rtype)]
        if negatives == "column" and "neg_captions" not in t.column_names:
            t = t.append_column("neg_captions", synthetic_neg_captions(texts, has))
            extra_fields.append(t.schema.field("neg_captions"))
        if negatives == "folder":
            t = t.drop_columns([c for c in ("neg_captions", "negatives_count") if c in t.column_names])
            names = [x for x in names if x != "negatives_text"]
            spec["stages"] = [s for s in spec["stages"] if next(iter(s)) != "negatives_text"]
        stage, reason, detail = (t[c].to_pylist() for c in ("stage", "reason", "detail"))
        for i in range(n):
            if reason[i] is not None or not has[i]:
                continue
            if "align" in added and clip[i] < params["align"].threshold:
                stage[i], reason[i], detail[i] = "align", "low_alignment", f"clip_score={clip[i]:.3f} < 0.25"
            elif "safety" in added and nsfw[i] >= params["safety"].threshold:
                stage[i], reason[i], detail[i] = "safety", "nsfw", f"score={nsfw[i]:.2f} labels=FEMALE_BREAST_EXPOSED"
            elif "text" in added and tfrac[i] > params["text"].max_text_frac:
                stage[i], reason[i], detail[i] = "text", "text_heavy", f"text_frac={tfrac[i]:.2f}"
        for c, v in (("stage", stage), ("reason", reason), ("detail", detail)):
            t = t.set_column(t.column_names.index(c), c, pa.array(v, pa.string()))
        for name in added:
            spec["stages"].append({name: params[name].model_dump(mode="json")})
            names.append(name)
    spec["dataset"] = spec.get("dataset", "derived")
    atomic_write_text(dst / "spec.yaml", yaml.safe_dump(spec, sort_keys=False))

    is_rej = np.asarray(pc.is_valid(t["reason"]).to_numpy(zero_copy_only=False), bool)
    rows_per = spec.get("write", {}).get("rows_per_shard", 10_000)
    base = build_schema(names)
    extra_fields = [f for f in extra_fields if f.name not in base.names]
    shards = ShardWriter(dst / "shards", pa.schema(list(base) + extra_fields), rows_per)
    rejects = ShardWriter(dst / "rejects", pa.schema(list(rejects_schema(names)) + extra_fields), rows_per)
    shards.write(t.filter(pa.array(~is_rej)))
    rejects.write(t.filter(pa.array(is_rej)))
    files = {"shards": shards.close(), "rejects": rejects.close()}

    counts: dict[str, dict[str, int]] = {}
    for s, r in zip(t["stage"].to_pylist(), t["reason"].to_pylist()):
        if s is not None:
            counts.setdefault(s, {})
            counts[s][r] = counts[s].get(r, 0) + 1
    stage_rows, alive = [], n
    for s in ["input", "ingest", *names]:
        rej = counts.get(s, {})
        stage_rows.append({"stage": s, "rows_in": alive, "rows_out": alive - sum(rej.values()), "rejected": rej,
                           "seconds": 0.0})
        alive -= sum(rej.values())
    stage_rows.append({"stage": "write", "rows_in": alive, "rows_out": alive, "rejected": {}, "seconds": 0.0})
    stats = {"build_id": build_id, "dataset": spec["dataset"], "rows_listed": n, "rows_kept": int((~is_rej).sum()),
             "rows_rejected": int(is_rej.sum()), "stages": stage_rows}
    atomic_write_text(dst / "stats.json", json.dumps(stats, indent=2))
    src_manifest = json.loads((src / "manifest.json").read_text())
    smeta = dict(src_manifest.get("stage_metadata") or {})
    if extras and "align" not in smeta:
        smeta["align"] = {"version": 1, "model": "synthetic"}
    write_manifest(dst, build_id=build_id, dataset=spec["dataset"], spec_hash=src_manifest.get("spec_hash", ""),
                   code_version=src_manifest.get("code_version", ""), shards=files["shards"], rejects=files["rejects"],
                   extra={"source": src_manifest.get("source"), "stages": names, "stage_metadata": smeta,
                          "derived_from": src.name})
    if extras and negatives == "folder":
        write_negatives(dst, t.filter(pa.array(~is_rej)), seed)
    return dst


def synthetic_neg_captions(texts: list, has: np.ndarray) -> pa.Array:
    """neg_captions as stages.negatives_text writes them: a colour swap (replace_att) and a word swap (swap_obj)."""
    from schemas.columns import stage_fields

    typ = next(f.type for f in stage_fields("negatives_text") if f.name == "neg_captions")
    swaps = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green", "black": "white", "white": "black"}
    out = []
    for x, h in zip(texts, has):
        if not h or not x:
            out.append(None)
            continue
        items = []
        words = x.split()
        for i, w in enumerate(words):
            if w in swaps:
                start = len(" ".join(words[:i])) + (1 if i else 0)
                items.append({"kind": "replace_att", "text": x[:start] + swaps[w] + x[start + len(w):],
                              "edit_before": w, "edit_after": swaps[w], "span_start": start,
                              "span_end": start + len(w), "method": "rule"})
                break
        if len(words) >= 2:
            items.append({"kind": "swap_obj", "text": " ".join([words[-1], *words[1:-1], words[0]]),
                          "edit_before": x, "edit_after": " ".join([words[-1], *words[1:-1], words[0]]),
                          "span_start": 0, "span_end": len(x), "method": "rule"})
        out.append(items)
    return pa.array(out, typ)


def write_negatives(dst: Path, kept: pa.Table, seed: int, limit: int = 2000) -> None:
    """negatives/part-00000.parquet: two kinds, one with a negative image (another kept row's)."""
    rng = np.random.default_rng(seed + 1)
    m = min(limit, kept.num_rows)
    if m < 2:
        return
    pick = np.sort(rng.choice(kept.num_rows, m, replace=False))
    cols = ["uid", "text", "image"] + (["clip_score"] if "clip_score" in kept.column_names else [])
    rows = kept.take(pa.array(pick)).select(cols).to_pylist()
    swaps = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green", "small": "large", "large": "small"}
    out = []
    for j, r in enumerate(rows):
        words = (r["text"] or "").split()
        if j % 2 == 0:
            neg = " ".join(swaps.get(w, w) for w in words)
            kind, neg_image = "replace_att", rows[(j + 1) % m]["image"]
        else:
            neg, kind, neg_image = " ".join(reversed(words)), "swap_obj", None
        pos = r.get("clip_score") if r.get("clip_score") is not None else 0.3
        out.append({"uid": r["uid"], "text": r["text"], "neg_text": neg, "neg_image": neg_image, "kind": kind,
                    "clip_pos": pos, "clip_neg": pos - 0.03, "valid": True})
    (dst / "negatives").mkdir(exist_ok=True)
    schema = pa.schema([("uid", pa.string()), ("text", pa.string()), ("neg_text", pa.string()),
                        ("neg_image", pa.binary()), ("kind", pa.string()), ("clip_pos", pa.float32()),
                        ("clip_neg", pa.float32()), ("valid", pa.bool_())])
    pq.write_table(pa.Table.from_pylist(out, schema=schema), dst / "negatives" / "part-00000.parquet",
                   row_group_size=256)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def report(demo, tmp_path_factory):
    """The demo build's report, written by `pairforge report` into a temp folder."""
    from flows.cli import main

    out = tmp_path_factory.mktemp("report") / "report.html"
    t0 = time.perf_counter()
    assert main(["report", str(demo["build_dir"]), "--out", str(out), "--no-card", "--json"]) == 0
    seconds = time.perf_counter() - t0
    text = out.read_text()
    return {"path": out, "html": text, "dom": Dom(text), "seconds": seconds,
            "stats": json.loads((demo["build_dir"] / "stats.json").read_text())}


@pytest.fixture(scope="module")
def rendered(report, tmp_path_factory):
    """Chromium's screenshot (console on stderr) and DOM of the report; skips when there is no Chromium."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed and could not be (`make chromium` installs it with apt-get)")
    tmp = tmp_path_factory.mktemp("chromium")
    png = tmp / "report.png"
    t0 = time.perf_counter()
    shot = run_chromium(binary, report["path"], tmp / "profile", "--enable-logging=stderr", "--v=0",
                        f"--screenshot={png}", "--window-size=1280,4000")
    seconds = time.perf_counter() - t0
    dump = run_chromium(binary, report["path"], tmp / "profile2", "--dump-dom")
    return {"png": png, "shot": shot, "dump": dump, "dom": Dom(dump.stdout), "seconds": seconds}


@pytest.fixture(scope="module")
def derived(demo, tmp_path_factory):
    from reporting.report import write_report

    dst = derive_build(demo["build_dir"], tmp_path_factory.mktemp("derived") / "derived-build")
    path = write_report(dst)
    return {"dir": dst, "html": path.read_text(), "dom": Dom(path.read_text()),
            "stats": json.loads((dst / "stats.json").read_text())}


# --------------------------------------------------------------------------- the report

def test_report_renders_in_chromium_without_console_errors(rendered):
    from PIL import Image

    assert rendered["shot"].returncode == 0, rendered["shot"].stderr[-2000:]
    assert console_lines(rendered["shot"].stderr) == []
    with Image.open(rendered["png"]) as im:
        assert im.size == (1280, 4000)
        assert len(im.convert("L").getcolors(1 << 16) or []) > 50  # not a blank page
    assert rendered["dump"].returncode == 0
    dom = rendered["dom"]
    for section in ("summary", "funnel", "rejects", "distributions", "kept", "rejected", "rewrites", "negatives",
                    "spec"):
        assert dom.find("section", id=section), section
    # the browser decoded every embedded image (a broken data: URI would still be an <img>, so check the parse)
    assert len(dom.find("img")) == len(report_imgs(rendered["dom"]))


def report_imgs(dom: Dom) -> list[str]:
    return [e["attrs"]["src"] for e in dom.find("img") if e["attrs"].get("src", "").startswith("data:image/")]


def test_report_is_self_contained(report):
    dom = report["dom"]
    for e in dom.elements:
        for attr in ("src", "href", "srcset", "poster", "data", "action"):
            v = e["attrs"].get(attr)
            if v is not None:
                assert v.startswith(("data:", "#")), (e["tag"], attr, v[:80])
    assert dom.find("img") and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
                                   for s in report_imgs(dom))
    assert len(report_imgs(dom)) == len(dom.find("img"))
    assert "<script" not in report["html"].lower()
    assert "url(" not in report["html"].split("</style>")[0]  # no CSS fetches
    assert report["path"].stat().st_size < 10 * 2**20


def test_funnel_and_reasons_equal_stats(report):
    dom, stats = report["dom"], report["stats"]
    rows = [e for e in dom.find("tr") if inside(e, id="funnel")]
    assert [r["attrs"]["data-stage"] for r in rows if "data-stage" in r["attrs"]] == [
        s["stage"] for s in stats["stages"]]
    for s in stats["stages"]:
        r = next(r for r in rows if r["attrs"].get("data-stage") == s["stage"])
        assert int(r["attrs"]["data-rows-in"]) == s["rows_in"] and int(r["attrs"]["data-rows-out"]) == s["rows_out"]
        assert int(r["attrs"]["data-rejected"]) == sum(s["rejected"].values())
    reasons = {(e["attrs"]["data-stage"], e["attrs"]["data-reason"]): int(e["attrs"]["data-count"])
               for e in dom.find("tr") if inside(e, id="rejects") and "data-reason" in e["attrs"]}
    assert reasons == {(s["stage"], r): c for s in stats["stages"] for r, c in s["rejected"].items() if c}
    assert any(e["attrs"].get("alt") == "rejects by reason" for e in dom.find("img"))
    summary = {e["attrs"]["data-key"]: e["text"] for e in dom.find("td") if "data-key" in e["attrs"]}
    assert summary["rows listed"] == f"{stats['rows_listed']:,}"
    assert summary["rows rejected"] == f"{stats['rows_rejected']:,}"


def test_each_reject_reason_has_a_sample_grid(report, demo):
    from reporting.report import N_PER_REASON

    dom, stats = report["dom"], report["stats"]
    rej = read_parts(demo["build_dir"], "rejects", ["uid", "stage", "reason", "detail"])
    for s in stats["stages"]:
        for reason, count in s["rejected"].items():
            grid = dom.find("div", data_stage=s["stage"], data_reason=reason)
            assert len(grid) == 1, (s["stage"], reason)
            cards = [e for e in dom.find("figure") if inside(e, data_stage=s["stage"], data_reason=reason)]
            assert len(cards) == min(count, N_PER_REASON), (reason, len(cards))
            uids = {c["attrs"]["data-uid"] for c in cards}
            mine = rej.filter(pc.and_(pc.equal(rej["stage"], s["stage"]), pc.equal(rej["reason"], reason)))
            assert uids <= set(mine["uid"].to_pylist())  # each card is a row rejected with that reason
            if s["stage"] not in ("input", "ingest"):  # rows that reached the stages have pictures
                imgs = [e for e in dom.find("img") if inside(e, data_stage=s["stage"], data_reason=reason)
                        and not inside(e, data_role="survivor")]
                assert len(imgs) == len(cards) and all(i["attrs"]["src"].startswith("data:image/jpeg") for i in imgs)
            # the card names what decided it: the detail the stage wrote
            details = {d for d in mine["detail"].to_pylist() if d}
            if details:
                shown = [e["text"] for e in dom.find("div", data_role="detail")
                         if inside(e, data_stage=s["stage"], data_reason=reason)]
                assert shown and set(shown) <= details
    dups = [e for e in dom.find("figure") if any(p.get("data-reason", "").startswith("duplicate_")
                                                 for p in e["parents"])]
    survivors = dom.find("div", data_role="survivor")  # the kept row each duplicate lost to, beside it
    assert all(e["parents"][-1].get("class") == "card" for e in survivors)
    assert bool(dups) == bool(survivors)
    kept = [e for e in dom.find("figure") if inside(e, id="kept-grid")]
    assert len(kept) == min(24, stats["rows_kept"])
    assert all(e["attrs"]["src"].startswith("data:image/jpeg") for e in dom.find("img") if inside(e, id="kept-grid"))


def test_distributions_draw_the_spec_thresholds(report, demo):
    from reporting.report import stage_params

    dom = report["dom"]
    figs = {e["attrs"]["data-column"]: json.loads(e["attrs"].get("data-thresholds", "[]"))
            for e in dom.find("figure") if "data-column" in e["attrs"]}
    params = stage_params(yaml.safe_load((demo["build_dir"] / "spec.yaml").read_text()))
    schema = pq.read_schema(next((demo["build_dir"] / "shards").glob("part-*.parquet")))
    for c in ("caption_words", "caption_chars", "min_side", "aspect_ratio", "lang_score", "lang_words", "width"):
        if c in schema.names:
            assert c in figs, c
    assert params["basic"]["min_words"] in figs["caption_words"]
    assert params["basic"]["min_side"] in figs["min_side"]
    assert params["basic"]["max_aspect"] in figs["aspect_ratio"]
    assert params["language"]["not_kept_min_score"] in figs["lang_score"]
    assert "lang" in figs and "junk_kind" in figs  # categorical


def test_empty_states_for_missing_sections(report):
    """The demo spec has no recaption stage (an empty state) but does have negatives_text (a filled section)."""
    dom = report["dom"]
    empty = {section: [e for e in dom.find("p") if inside(e, id=section) and e["attrs"].get("class") == "empty"]
             for section in ("rewrites", "negatives")}
    assert empty["rewrites"] and "No " in empty["rewrites"][0]["text"]
    assert not empty["negatives"]
    cells = {e["text"] for e in dom.find("td") if inside(e, id="negatives")}
    assert {"replace_obj", "replace_att", "add_obj"} <= cells, cells


def test_sampling_is_seeded_and_order_free(demo):
    from reporting.report import seeded_sample

    t = read_parts(demo["build_dir"], "rejects", ["uid"])
    shuffled = t.take(pa.array(np.random.default_rng(3).permutation(t.num_rows)))
    pick = lambda tbl, key: sorted(tbl["uid"].take(pa.array(  # noqa: E731
        seeded_sample(tbl, np.ones(tbl.num_rows, bool), 10, key))).to_pylist())
    assert pick(t, "0/x") == pick(shuffled, "0/x")
    assert pick(t, "0/x") != pick(t, "1/x")


def test_rewrites_negatives_and_model_stats_sections(derived):
    from reporting.report import N_NEG_PER_KIND, N_REWRITES, stage_params

    dom, stats = derived["dom"], derived["stats"]
    rw = dom.find("div", **{"class": "rw"})
    assert len(rw) == N_REWRITES
    kept = read_parts(derived["dir"], "shards", ["uid", "text", "neg_captions"])
    originals = dict(zip(kept["uid"].to_pylist(), kept["text"].to_pylist()))
    for r in rw:
        uid = r["attrs"]["data-uid"]
        orig = next(e for e in dom.find("div", data_role="original") if inside(e, data_uid=uid))
        rewrite = next(e for e in dom.find("li", data_role="rewrite") if inside(e, data_uid=uid))
        assert originals[uid] in orig["text"] and f"a photo showing {originals[uid]}" in rewrite["text"]
        assert "score=" in rewrite["text"]
    negs = {}
    for u, items in zip(kept["uid"].to_pylist(), kept["neg_captions"].to_pylist()):
        for it in items or []:
            negs.setdefault(it["kind"], {})[u] = it["text"]
    counts = {e["attrs"]["data-neg-kind"]: int(e["attrs"]["data-count"]) for e in dom.find("tr")
              if "data-neg-kind" in e["attrs"]}
    assert counts == {k: len(v) for k, v in negs.items()}
    for kind, by_uid in negs.items():
        cards = [e for e in dom.find("figure") if inside(e, data_kind=kind)]
        assert len(cards) == min(N_NEG_PER_KIND, len(by_uid))
        for c in cards:
            neg = next(e for e in dom.find("div", data_role="negative") if inside(e, data_uid=c["attrs"]["data-uid"])
                       and inside(e, data_kind=kind))
            assert neg["text"].removeprefix("− ") == by_uid[c["attrs"]["data-uid"]]
        assert all(i["attrs"]["src"].startswith("data:image/jpeg") for i in dom.find("img")
                   if inside(i, data_kind=kind))
    figs = {e["attrs"]["data-column"]: json.loads(e["attrs"].get("data-thresholds", "[]"))
            for e in dom.find("figure") if "data-column" in e["attrs"]}
    params = stage_params(yaml.safe_load((derived["dir"] / "spec.yaml").read_text()))
    assert figs["clip_score"] == [params["align"]["threshold"]]
    assert figs["nsfw_score"] == [params["safety"]["threshold"]]
    assert figs["text_frac"] == [params["text"]["max_text_frac"]]
    for s in stats["stages"]:
        for reason, c in s["rejected"].items():
            assert dom.find("div", data_stage=s["stage"], data_reason=reason)
    assert "image_emb" not in figs  # embeddings are never read for the report


def test_negatives_from_a_negatives_set(demo, tmp_path):
    from reporting.report import N_NEG_PER_KIND, _negatives, load_build

    dst = derive_build(demo["build_dir"], tmp_path / "with-folder", negatives="folder")
    dom = Dom(_negatives(load_build(dst), seed=0))
    neg = pq.read_table(dst / "negatives" / "part-00000.parquet", columns=["uid", "neg_text", "kind"])
    for kind in ("replace_att", "swap_obj"):
        cards = [e for e in dom.find("figure") if inside(e, data_kind=kind)]
        assert len(cards) == N_NEG_PER_KIND
        imgs = [e for e in dom.find("img") if inside(e, data_kind=kind)]
        assert len(imgs) == (2 if kind == "replace_att" else 1) * N_NEG_PER_KIND  # + the negative image
        expected = {(u, t) for u, t, k in zip(*(neg[c].to_pylist() for c in ("uid", "neg_text", "kind"))) if k == kind}
        for c in cards:
            text = next(e["text"] for e in dom.find("div", data_role="negative") if inside(e, data_kind=kind)
                        and inside(e, data_uid=c["attrs"]["data-uid"]))
            assert (c["attrs"]["data-uid"], text.removeprefix("− ")) in expected
    assert "clip_pos=" in "".join(e["text"] for e in dom.find("figure"))


# --------------------------------------------------------------------------- show

def test_show_names_the_stage_reason_and_stat(demo, capsys):
    from flows.cli import main

    rej = read_parts(demo["build_dir"], "rejects", ["uid", "stage", "reason", "detail", "caption_words"])
    row = next(r for r in rej.to_pylist() if r["stage"] == "basic" and r["reason"] == "caption_too_few_words")
    assert main(["show", str(demo["build_dir"]), row["uid"]]) == 0
    out = capsys.readouterr().out
    assert "REJECTED" in out and "stage 'basic'" in out and "reason 'caption_too_few_words'" in out
    assert f"caption_words={row['caption_words']}" in out and "basic.min_words=3" in out
    assert f"detail: {row['detail']}" in out
    assert "image " in out and "JPEG" in out and "\\xff" not in out  # summarised, not the bytes

    assert main(["show", str(demo["build_dir"]), row["uid"][:14], "--json"]) == 0  # a unique prefix
    rec = json.loads(capsys.readouterr().out)
    assert rec["uid"] == row["uid"] and rec["status"] == "rejected"
    assert rec["rejection"] == {"stage": "basic", "reason": "caption_too_few_words", "detail": row["detail"],
                                "stats": {"caption_words": row["caption_words"]},
                                "param": {"name": "basic.min_words", "value": 3},
                                "meaning": "the caption has fewer than min_words words"}  # basic's declaration
    assert "meaning: the caption has fewer than min_words words" in out
    assert "image" not in rec["columns"] and rec["summaries"]["image"]["format"] == "JPEG"

    ingest = next(r for r in rej.to_pylist() if r["stage"] == "ingest")
    assert main(["show", str(demo["build_dir"]), ingest["uid"], "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["rejection"]["stage"] == "ingest" and rec["rejection"]["reason"] == ingest["reason"]
    assert rec["rejection"]["meaning"]  # what the ingest reason means

    kept_uid = read_parts(demo["build_dir"], "shards", ["uid"])["uid"][0].as_py()
    assert main(["show", str(demo["build_dir"]), kept_uid]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"uid {kept_uid}: KEPT") and "rejected by" not in out
    assert main(["show", str(demo["build_dir"]), "0123456789abcdef0123456789abcdef"]) == 2
    assert "neither" in capsys.readouterr().err


def test_show_summarises_embeddings(derived):
    from reporting.show import format_record, show_record

    rej = read_parts(derived["dir"], "rejects", ["uid", "reason", "clip_score"])
    row = next(r for r in rej.to_pylist() if r["reason"] == "low_alignment")
    rec = show_record(derived["dir"], row["uid"])
    assert rec["summaries"]["image_emb"]["dim"] == 64 and abs(rec["summaries"]["image_emb"]["norm"] - 1) < 0.01
    assert "image_emb" not in rec["columns"]
    assert rec["rejection"]["stats"]["clip_score"] == pytest.approx(row["clip_score"], abs=1e-5)
    spec = yaml.safe_load((derived["dir"] / "spec.yaml").read_text())
    threshold = next(s["align"] for s in spec["stages"] if "align" in s)["threshold"]
    assert rec["rejection"]["param"] == {"name": "align.threshold", "value": threshold}
    text = format_record(rec)
    assert "64 floats" in text and f"align.threshold={threshold}" in text


# --------------------------------------------------------------------------- the dataset card

def test_dataset_card_parses_and_matches_the_shards(demo, tmp_path):
    from datasets import Features
    from huggingface_hub import DatasetCard

    from reporting.report import _md_escape, size_category, write_dataset_card

    path = write_dataset_card(demo["build_dir"], out=tmp_path / "README.md")
    text = path.read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    card = DatasetCard.load(path)
    assert card.data.to_dict()["pretty_name"] == header["pretty_name"]
    manifest = json.loads((demo["build_dir"] / "manifest.json").read_text())
    shard = sorted((demo["build_dir"] / "shards").glob("part-*.parquet"))[0]
    assert Features._from_yaml_list(header["dataset_info"]["features"]) == Features.from_arrow_schema(
        pq.read_schema(shard))
    assert [f["name"] for f in header["dataset_info"]["features"]] == pq.read_schema(shard).names
    split = header["dataset_info"]["splits"][0]
    assert split["name"] == "train" and split["num_examples"] == manifest["rows"] and split["num_bytes"] > 0
    assert header["dataset_info"]["download_size"] == manifest["bytes"]
    assert header["size_categories"] == [size_category(manifest["rows"])]
    assert size_category(999) == "n<1K" and size_category(1000) == "1K<n<10K" and size_category(10**6) == "1M<n<10M"
    assert header["license"] == "unknown"
    assert header["task_categories"] == ["zero-shot-image-classification", "image-to-text"]
    assert header["configs"] == [{"config_name": "default",
                                  "data_files": [{"split": "train", "path": "shards/*.parquet"}]}]
    body = card.text
    spec_block = body.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(spec_block) == yaml.safe_load((demo["build_dir"] / "spec.yaml").read_text())
    for s in json.loads((demo["build_dir"] / "stats.json").read_text())["stages"]:
        assert f"| {_md_escape(s['stage'])} | {s['rows_in']:,} | {s['rows_out']:,} |" in body
    assert "## Known limits" in body and "## Source" in body


def test_dataset_card_loads_the_folder_with_datasets(demo, tmp_path):
    import datasets

    from reporting.report import write_dataset_card

    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "shards").symlink_to(demo["build_dir"] / "shards", target_is_directory=True)
    write_dataset_card(demo["build_dir"], out=folder / "README.md")
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    manifest = json.loads((demo["build_dir"] / "manifest.json").read_text())
    assert ds.num_rows == manifest["rows"]
    assert ds.features == datasets.Features.from_arrow_schema(
        pq.read_schema(sorted((demo["build_dir"] / "shards").glob("part-*.parquet"))[0]))


def test_report_is_computed_from_bounded_aggregates(demo, tmp_path, monkeypatch):
    """The report holds counts, fixed-bin histograms and seeded samples, never the build's rows: the histograms
    count every row with the stat, the samples stay at their size, and nothing depends on how the files are batched
    (the samples are the rows of smallest uid hash, merged batch by batch)."""
    import reporting.report as report
    from reporting.report import N_KEPT, N_PER_REASON, load_build, render_report

    n = demo["result"]["stats"]["rows_listed"]
    big = derive_build(demo["build_dir"], tmp_path / "big", rows=3 * n, extras=False)
    build = load_build(big)
    agg = build.aggregates(0)
    rows = pa.concat_tables([read_parts(big, "shards", ["uid", "min_side", "width"]),
                             read_parts(big, "rejects", ["uid", "min_side", "width"])])
    assert agg.rows == build.total_rows == rows.num_rows == 3 * n
    hists = {h.column: h for h in agg.hists}
    for c in ("min_side", "width"):
        assert int(hists[c].counts.sum()) == rows.num_rows - rows[c].null_count, c
        assert hists[c].edges[0] <= pc.min(rows[c]).as_py() and pc.max(rows[c]).as_py() <= hists[c].edges[-1]
    stats = json.loads((big / "stats.json").read_text())
    assert agg.kept == stats["rows_kept"]
    assert agg.reasons == {(s["stage"], r): c for s in stats["stages"] for r, c in s["rejected"].items() if c}
    assert len(agg.samples["kept"]) == N_KEPT
    assert all(len(agg.samples.get(k, [])) <= N_PER_REASON for k in agg.reasons)
    assert not any(isinstance(v, pa.Table) for v in vars(agg).values())

    monkeypatch.setattr(report, "BATCH_ROWS", 97)  # many small batches: the same aggregates
    again = load_build(big).aggregates(0)
    assert again.rows == agg.rows and again.reasons == agg.reasons
    assert all(np.array_equal(a.counts, b.counts) for a, b in zip(again.hists, agg.hists))
    assert {k: [r["uid"] for r in v] for k, v in again.samples.items()} == \
        {k: [r["uid"] for r in v] for k, v in agg.samples.items()}
    monkeypatch.undo()

    html = render_report(build)
    assert "Over a sample" not in html
    figs = {e["attrs"]["data-column"]: e["attrs"] for e in Dom(html).find("figure") if "data-column" in e["attrs"]}
    assert int(figs["min_side"]["data-rows"]) == rows.num_rows - rows["min_side"].null_count
    assert f"{stats['rows_kept']:,}" in html
