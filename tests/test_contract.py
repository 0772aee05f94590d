"""The stage contract, over every registered stage.

Declarations: they hold together, params round-trip through YAML, the report knows every threshold, the README's
stage table is the one `pairforge stages --markdown` prints.

Behaviour (`check_stage`, run by hypothesis on generated batches of real photos from scikit-image and
scikit-learn, broken and empty images, and real LAION alt text, empty, null, whitespace and very long captions;
model stages with their real shipped models):
- process_batch never raises on a bad row, keeps the row count and the input columns (Stage.__call__);
- it writes exactly its declared columns with their declared types; a value that does not fit its declared type
  fails (Stage.add_columns casts safely);
- decide emits only declared reasons;
- moving each threshold parameter in its declared direction (Threshold bound "min": lower; "max": higher) never
  rejects a row the tighter value kept;
- a stage that decodes images declares `needs_image` (Stage.__call__ watches the shared decoder's count), and an
  image stage given the build's decoded pixels does not decode again.

The planted mistakes at the end (one test each) are the ones this contract did not catch before: a float written
into an int32 column, a threshold declared "max" where the code rejects below, an image stage without
`needs_image`, an undeclared reason, and a README table that no longer matches the stages.
"""
from __future__ import annotations

import ast
import io
import math
import typing
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from schemas.columns import PAIR_SCHEMA
from schemas.spec import StageParams, parse_spec, stage_params_models
from stages import registry, stage_class, stage_table
from stages.base import Column, Decision, Reason, Stage, StageDeclarationError, Threshold
from stages.imaging.decode import add_pixels, decodes, images

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(registry())


# --------------------------------------------------------------------------- declarations

def test_every_module_in_stages_is_a_stage_and_registered():
    modules = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem not in ("__init__", "base", "steps"))
    owners = sorted({cls.__module__.rsplit(".", 1)[-1] for cls in registry().values()})
    assert modules == owners, "every file directly in stages/ holds a stage (helpers go in subfolders)"
    assert stage_params_models() == {n: c.Params for n, c in registry().items()}


def test_nothing_in_stages_imports_flows():
    for path in (ROOT / "stages").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "flows" or n.startswith("flows.") for n in names), f"{path} imports {names}"


@pytest.mark.parametrize("name", STAGES)
def test_declarations(name):
    cls = stage_class(name)
    assert issubclass(cls.Params, StageParams) and cls.summary
    owners = {}
    for other, ocls in registry().items():
        for c in ocls.columns:
            assert c.name not in owners, f"{c.name} declared by {owners.get(c.name)} and {other}"
            owners[c.name] = other
    core = set(PAIR_SCHEMA.names)
    for c in cls.columns:
        assert isinstance(c.type, pa.DataType) and c.doc and c.role in ("stat", "category", "detail", "data")
    for r in cls.reasons:
        assert r.doc, r.name
        for col in list(r.stats) + [t.column for t in r.thresholds]:
            assert col in owners or col in core, f"{name}.{r.name} reads {col}, which no stage or core schema has"
        for t in r.thresholds:
            assert cls.Params.model_fields[t.param].annotation is not bool


@pytest.mark.parametrize("name", STAGES)
def test_params_round_trip_through_yaml(name, tmp_path):
    cls = stage_class(name)
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://example.com/a.jpg,a red square\n")
    spec = parse_spec({"dataset": "rt", "source": {"urls": "urls.csv"}, "stages": [{name: {}}]}, tmp_path)
    text = spec.to_yaml()
    again = parse_spec(yaml.safe_load(text), tmp_path)
    assert again.stage_params(name) == spec.stage_params(name) == cls.Params()
    assert again.to_yaml() == text


def test_reasons_a_stage_does_not_declare_are_refused():
    class Loose(Stage):  # not registered: no `name` in its own body
        reasons = (Reason("declared", "a declared reason"),)

    Loose.name = "loose"
    d = Loose.decision(3)
    d.reject([True, False, False], "declared")
    with pytest.raises(StageDeclarationError, match="does not declare"):
        d.reject([False, True, False], "made_up")
    assert d.reason == ["declared", None, None]
    assert Decision(2).reason == [None, None]


def test_inconsistent_declarations_fail_at_class_definition():
    class P(StageParams):
        limit: float = 1.0

    with pytest.raises(StageDeclarationError, match="names parameter 'nope'"):
        type("Bad", (Stage,), {"name": "bad_contract_probe", "Params": P,
                               "reasons": (Reason("r", "doc", ("x",), (Threshold("x", "nope", "min"),)),)})
    with pytest.raises(StageDeclarationError, match="declared twice"):
        type("Twice", (Stage,), {"name": "twice_contract_probe", "Params": P,
                                 "columns": (Column("a", pa.int32(), "a"), Column("a", pa.int32(), "a"))})
    assert "bad_contract_probe" not in registry() and "twice_contract_probe" not in registry()


def test_add_columns_types_and_refuses_undeclared_and_lossy():
    cls = stage_class("basic")
    batch = pa.table({"x": [1, 2]})
    values = {c.name: [None, None] for c in cls.columns}
    out = cls.add_columns(batch, values)
    assert [out.schema.field(c.name).type for c in cls.columns] == [c.type for c in cls.columns]
    with pytest.raises(StageDeclarationError, match="undeclared"):
        cls.add_columns(batch, values | {"surprise": [1, 2]})
    with pytest.raises(StageDeclarationError, match="did not write"):
        cls.add_columns(batch, {k: v for k, v in values.items() if k != "min_side"})
    # whole numbers fit an int32 column however they come; fractions and overflows do not
    for fits in ([1.0, 40.0], np.array([1.0, 40.0]), pa.array([1, 40], pa.int64())):
        assert cls.add_columns(batch, values | {"min_side": fits})["min_side"].to_pylist() == [1, 40]
    for lossy in ([1.5, 40.7], np.array([1.5, 40.7]), pa.array([1.5, 40.7]), [3e9, 1]):
        with pytest.raises(StageDeclarationError, match="stage basic writes column 'min_side' declared int32"):
            cls.add_columns(batch, values | {"min_side": lossy})
    # nested declared types: struct fields matched by name, missing ones null, a lossy member refused
    negs = stage_class("negatives_text")
    ok = negs.add_columns(batch, {"neg_captions": [[{"text": "a", "kind": "swap_obj", "span_start": 2}], []],
                                  "negatives_count": [1, 0]})
    first = ok["neg_captions"].to_pylist()[0][0]
    assert first["span_start"] == 2 and first["method"] is None
    with pytest.raises(StageDeclarationError, match="'neg_captions'"):
        negs.add_columns(batch, {"neg_captions": [[{"text": "a", "span_start": 2.5}], []], "negatives_count": [1, 0]})


def test_report_knows_every_threshold():
    from reporting.report import deciding_param, thresholds_map

    tm = thresholds_map()
    for name, cls in registry().items():
        for r in cls.reasons:
            for t in r.thresholds:
                assert (name, t.param, t.bound) in tm[t.column]
            if r.deciding_param:
                value = cls.Params().model_dump()[r.deciding_param]
                got = deciding_param({name: {r.deciding_param: 1 if value is None else value}}, r.name, name)
                assert got is not None and got[0] == f"{name}.{r.deciding_param}"


def readme_table_problem(readme: str) -> str | None:
    """Why README's stage table is not the one the declarations make, or None when it is."""
    table = stage_table()
    if table in readme:
        return None
    have = {line.split("|")[1].strip() for line in readme.splitlines() if line.startswith("| `")}
    want = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `")}
    return (f"README's stage table is stale (regenerate it with `pairforge stages --markdown`): stages missing "
            f"{sorted(want - have)}, extra {sorted(have - want)}, or a row differs")


def test_declarations_reach_the_readme_table():
    assert "| `blur` |" in stage_table()
    problem = readme_table_problem((ROOT / "README.md").read_text())
    assert problem is None, problem


# --------------------------------------------------------------------------- generated batches

SKIMAGE = Path(np.__file__).resolve().parents[1] / "skimage" / "data"
SKLEARN = Path(np.__file__).resolve().parents[1] / "sklearn" / "datasets" / "images"
PHOTO_FILES = [SKIMAGE / n for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png",
                                      "color.png", "text.png", "motorcycle_left.png")] + \
              [SKLEARN / n for n in ("china.jpg", "flower.jpg")]
IMAGE_PX = 96  # small: the contract is about behaviour, not quality (a CI budget)


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _photos() -> dict[str, bytes]:
    out = {}
    for path in PHOTO_FILES:
        with Image.open(path) as im:
            im.thumbnail((IMAGE_PX, IMAGE_PX))
            out[path.stem] = _encode(im.convert("RGB"), "JPEG") if im.mode not in ("L", "RGBA") else _encode(im, "PNG")
    with Image.open(SKIMAGE / "page.png") as im:  # printed text the OCR reads, at a size it reads it
        out["page"] = _encode(im.crop((0, 0, 380, 120)), "PNG")
    with Image.open(SKIMAGE / "no_time_for_that_tiny.gif") as im:
        out["animated_gif"] = (SKIMAGE / "no_time_for_that_tiny.gif").read_bytes()
    return out


PHOTOS = _photos()
BROKEN: dict[str, bytes | None] = {
    "missing": None,
    "empty": b"",
    "truncated_jpeg": PHOTOS["chelsea"][: len(PHOTOS["chelsea"]) // 2],
    "html": b"<!doctype html><html><body>404 Not Found</body></html>",
    "noise": bytes(range(256)) * 4,
    "one_pixel": _encode(Image.new("RGB", (1, 1), "red"), "PNG"),
    "strip": _encode(Image.new("RGB", (300, 3), "blue"), "PNG"),
    "transparent": _encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "PNG"),
    "palette": _encode(Image.new("P", (20, 20), 3), "GIF"),
}
IMAGES = {**PHOTOS, **BROKEN}
_laion = pq.read_table(ROOT / "tests/data/laion-alt-text/laion_1000.parquet", columns=["URL", "TEXT"]).slice(0, 60)
LAION = list(zip(_laion["URL"].to_pylist(), _laion["TEXT"].to_pylist()))
CAPTIONS = [t for _, t in LAION] + [
    None, "", "   ", "\x00\x07\u202e", "a", "🙂🙂🙂", "IMG_2231.JPG", "<b>Click here</b> &amp; buy now!!!",
    "Un chat noir dort sur un canapé rouge dans le salon", "a red circle to the left of a blue square",
    "a photograph of a cat " * 800,  # very long (17,600 characters)
    "word" * 3000,  # one very long word
]
URLS = [u for u, _ in LAION] + ["", "not a url", "http://example.com/a.jpg", "http://EXAMPLE.com/a.jpg?utm_source=x"]


def make_batch(rows: list[tuple[str, str | None, str]]) -> pa.Table:
    """A batch of pairs as ingest writes them: (image name in IMAGES, caption, url) a row."""
    import hashlib

    out = []
    for i, (img, text, url) in enumerate(rows):
        data = IMAGES[img]
        size = None
        if img in PHOTOS and img != "animated_gif":
            with Image.open(io.BytesIO(data)) as im:
                size = im.size
        out.append({"uid": f"{i:032x}", "url": url, "text": text, "source": "contract",
                    "image": data, "width": size and size[0], "height": size and size[1],
                    "original_width": size and size[0], "original_height": size and size[1],
                    "sha256": data and hashlib.sha256(data).hexdigest(), "build_id": "contract"})
    return pa.Table.from_pylist(out, schema=PAIR_SCHEMA)


ROW = st.tuples(st.sampled_from(sorted(IMAGES)), st.sampled_from(CAPTIONS) | st.text(max_size=40),
                st.sampled_from(URLS))
BATCHES = st.lists(ROW, min_size=1, max_size=6).map(make_batch)
# Every photo and every broken image once, with every kind of caption: the fixed first example of each stage.
EVERY_KIND = make_batch([(img, CAPTIONS[(7 * i) % len(CAPTIONS)], URLS[i % len(URLS)])
                         for i, img in enumerate(sorted(IMAGES))]
                        + [("chelsea", c, "http://example.com/a.jpg") for c in CAPTIONS[-12:]])
# A language model writes about a caption a second on 2 cores: recaption's fixed example is a short one.
FEW_KINDS = make_batch([("astronaut", CAPTIONS[0], URLS[0]), ("truncated_jpeg", CAPTIONS[1], URLS[1]),
                        ("coffee", None, URLS[2]), ("missing", "", URLS[3]), ("china", CAPTIONS[-2], URLS[4])])
FIXED = {"recaption": FEW_KINDS}

# Spec params a stage runs with here: the shipped models, cheapest settings. Each stage's decisions are exercised.
PARAMS = {
    "align": {"model": "demo-clip", "threshold": 0.772},  # the demo scorer ships in stages/models/shipped
    "recaption": {"n": 1, "max_new_tokens": 8, "max_input_chars": 120, "do_sample": False, "score_model": None,
                  "require_rewrite": True},
    "text": {"max_ocr_words": 3, "reject_caption_overlap": 0.5},
}
EXAMPLES = {"recaption": 2, "text": 6, "safety": 6, "align": 6}  # hypothesis examples for the model stages
CHEAP_EXAMPLES = 15


@pytest.fixture(scope="module")
def stages_cache():
    """Stages set up once for this module (model loads are the expensive part), torn down at its end."""
    made: dict[str, Stage] = {}

    def get(name: str) -> Stage:
        if name not in made:
            cls = stage_class(name)
            stage = cls(cls.Params.model_validate(PARAMS.get(name, {})))
            stage.preflight()
            stage.setup()
            made[name] = stage
        return made[name]

    yield get
    for stage in made.values():
        stage.teardown()


# --------------------------------------------------------------------------- the contract check

def rejected(cls: type[Stage], table: pa.Table, params: StageParams) -> np.ndarray:
    """Row mask of the rows the stage rejects, row by row (decide) and over the whole table (its global steps, run
    in one process as a small build runs them), after checking it emits only declared reasons."""
    from flows.engine.global_decisions import decide_table

    d = cls.decide(table, params)
    reasons, _ = d.arrays()
    mask = reasons.is_valid().to_numpy(zero_copy_only=False)
    emitted = set(pc.unique(reasons.drop_null()).to_pylist())
    if cls.global_steps(params):
        own = pa.array(np.where(mask, 0, -1), pa.int32(), mask=~mask)  # its row-wise rejections stand
        g = decide_table(cls.name, params, table.append_column("reject_pos", own))
        emitted |= set(g.column("reason").to_pylist())
        mask = mask | pc.is_in(table.column("uid"), value_set=g.column("uid")).to_numpy(zero_copy_only=False)
    undeclared = emitted - {r.name for r in cls.reasons}
    assert not undeclared, f"stage {cls.name} emits reasons it does not declare: {sorted(undeclared)}"
    return mask


def _is_int(cls: type[Stage], param: str) -> bool:
    ann = cls.Params.model_fields[param].annotation
    return ann is int or int in typing.get_args(ann)


def threshold_values(cls: type[Stage], t: Threshold, out: pa.Table, params: StageParams) -> list:
    """Values of t.param to try, ordered from tight to loose (bound "min": falling; "max": rising): the
    default (and its half and double, 0 and 1), and the column's values in the batch with their neighbours, each
    valid for the Params model."""
    default = getattr(params, t.param)
    seen = [0, 1] + ([] if default is None else [default / 2, default, default * 2])
    if t.column in out.column_names:
        col = out.column(t.column)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            seen += [v for v in pc.unique(col.drop_null()).to_pylist() if math.isfinite(v)]
    raw = set()
    for v in seen:
        if _is_int(cls, t.param):
            raw |= {math.floor(v), math.floor(v) + 1, math.floor(v) - 1}
        else:  # float32 stats: the neighbours of a value as float32 holds it
            f = np.float32(v)
            raw |= {v, np.nextafter(f, np.float32(-np.inf)).item(), np.nextafter(f, np.float32(np.inf)).item()}
    values = []
    for v in sorted(raw, reverse=(t.bound == "min")):
        try:
            cls.Params.model_validate(params.model_dump() | {t.param: v})
        except ValueError:
            continue
        values.append(v)
    return values


def check_stage(cls: type[Stage], stage: Stage, batch: pa.Table) -> pa.Table:
    """Run one stage on a batch as a build does and check the contract (module docstring). Returns its output."""
    fed = add_pixels(batch) if cls.needs_image else batch  # the build decodes once, for the image stages
    before = decodes()
    out = stage(fed)  # Stage.__call__: row count, input columns kept, no undeclared decoding
    if cls.needs_image:
        assert decodes() == before, f"stage {cls.name} decoded images itself instead of reading the shared decode"
    added = [c for c in out.column_names if c not in fed.column_names and not c.startswith("_")]
    declared = [c.name for c in cls.columns]
    assert sorted(added) == sorted(declared), f"stage {cls.name} wrote {sorted(added)}, declares {sorted(declared)}"
    for c in cls.columns:
        assert out.schema.field(c.name).type == c.type, \
            f"stage {cls.name} column {c.name} is {out.schema.field(c.name).type}, declared {c.type}"
    base = rejected(cls, out, stage.params)
    for t in {t for r in cls.reasons for t in r.thresholds}:
        values = threshold_values(cls, t, out, stage.params)
        prev, prev_v = None, None
        for v in values:
            params = cls.Params.model_validate(stage.params.model_dump() | {t.param: v})
            if t.column in declared:  # a threshold on the stage's own stat: decide compares them
                table = out
            else:  # on another stage's column (junk's max_chars): applied while processing
                table = cls(params)(fed)
            now = rejected(cls, table, params)
            if prev is not None:
                more = np.flatnonzero(now & ~prev)
                assert not more.size, (
                    f"stage {cls.name}: moving {t.param} ({t.bound}) from {prev_v!r} to {v!r} rejects rows "
                    f"{more.tolist()} it kept: the declared bound does not match what decide does")
            prev, prev_v = now, v
    assert base.shape == (batch.num_rows,)
    return out


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_keeps_the_contract_on_generated_batches(name, stages_cache):
    """check_stage on the stage's fixed batch, then on generated ones. The fixed batch holds rows the stage
    rejects (for a stage that declares reasons), so its reason and threshold checks compare real decisions."""
    cls = stage_class(name)
    stage = stages_cache(name)
    fixed = FIXED.get(name, EVERY_KIND)

    @settings(max_examples=EXAMPLES.get(name, CHEAP_EXAMPLES), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=BATCHES)
    @example(batch=fixed)
    def run(batch):
        out = check_stage(cls, stage, batch)
        if batch is fixed and cls.reasons:
            assert rejected(cls, out, stage.params).any(), f"stage {name} rejects no row of its fixed batch"

    run()


# --------------------------------------------------------------------------- planted mistakes

class PlantedParams(StageParams):
    limit: float = 10.0


def planted(name: str, **body) -> type[Stage]:
    """A stage class as a contributor might write it, not registered (the registry is left alone)."""
    cls = type(name, (Stage,), {"Params": PlantedParams, "summary": "a planted mistake", **body})
    cls.name = name
    return cls


def _chars(batch: pa.Table) -> pa.Array:
    return pc.utf8_length(pc.fill_null(batch.column("text"), ""))


def _run_planted(cls: type[Stage]) -> None:
    check_stage(cls, cls(), EVERY_KIND)


def test_planted_float_in_an_int32_column_is_caught():
    def process_batch(self, batch):
        return self.add_columns(batch, {"planted_ratio": pc.divide(pc.cast(_chars(batch), pa.float64()), 3.0)})

    cls = planted("planted_float", columns=(Column("planted_ratio", pa.int32(), "chars / 3"),),
                  process_batch=process_batch)
    with pytest.raises(StageDeclarationError, match="stage planted_float writes column 'planted_ratio' declared int32"):
        _run_planted(cls)


def test_planted_threshold_declared_max_where_the_code_rejects_below_is_caught():
    def process_batch(self, batch):
        return self.add_columns(batch, {"planted_chars": _chars(batch)})

    @classmethod
    def decide(cls, table, params, ctx=None):
        d = cls.decision(table.num_rows)
        d.reject(pc.less(table.column("planted_chars"), params.limit), "planted_short")  # rejects BELOW the limit
        return d

    cls = planted("planted_bound", columns=(Column("planted_chars", pa.int32(), "caption characters"),),
                  reasons=(Reason("planted_short", "short caption", ("planted_chars",),
                                  (Threshold("planted_chars", "limit", "max"),)),),  # ... declared as a maximum
                  process_batch=process_batch, decide=decide)
    with pytest.raises(AssertionError, match="moving limit \\(max\\) from .* rejects rows"):
        _run_planted(cls)


def test_planted_image_stage_without_needs_image_is_caught():
    def process_batch(self, batch):
        return self.add_columns(batch, {"planted_width": [None if a is None else a.shape[1] for a in images(batch)]})

    cls = planted("planted_pixels", columns=(Column("planted_width", pa.int32(), "image width"),),
                  process_batch=process_batch)  # reads pixels, forgets needs_image = True
    with pytest.raises(StageDeclarationError, match="stage planted_pixels decoded images but does not declare"):
        _run_planted(cls)
    cls.needs_image = True
    _run_planted(cls)  # declared, it passes


def test_planted_undeclared_reason_is_caught():
    def process_batch(self, batch):
        return self.add_columns(batch, {"planted_chars": _chars(batch)})

    @classmethod
    def decide(cls, table, params, ctx=None):
        d = Decision(table.num_rows)  # bypasses cls.decision(), which would refuse the reason itself
        d.reject(pc.equal(table.column("planted_chars"), 0), "planted_empty_caption")
        return d

    cls = planted("planted_reason", columns=(Column("planted_chars", pa.int32(), "caption characters"),),
                  reasons=(Reason("planted_short", "short caption"),), process_batch=process_batch, decide=decide)
    with pytest.raises(AssertionError, match="emits reasons it does not declare: \\['planted_empty_caption'\\]"):
        _run_planted(cls)


@contextmanager
def registered(cls: type[Stage]):
    Stage.registry[cls.name] = cls
    try:
        yield
    finally:
        Stage.registry.pop(cls.name, None)


def test_planted_stale_readme_table_is_caught():
    readme = (ROOT / "README.md").read_text()
    assert readme_table_problem(readme) is None
    with registered(planted("planted_new")):  # a new stage, README not regenerated
        assert "stages missing ['`planted_new`']" in readme_table_problem(readme)
    stale = readme.replace("variance of the Laplacian", "sharpness")  # a row edited by hand
    assert readme_table_problem(stale) is not None


@pytest.mark.slow
def test_demo_build_columns_types_and_reasons_are_declared(demo):
    """The shared demo build: every stage's declared columns are in the shards with their declared types, and
    every reason a stage emitted is one it declares."""
    from tests.builds import read_parts

    spec = yaml.safe_load(Path(demo["spec"]).read_text())
    names = [next(iter(s)) for s in spec["stages"]]
    shards = read_parts(demo["build_dir"], "shards")
    for name in names:
        for c in stage_class(name).columns:
            assert shards.schema.field(c.name).type == c.type, (name, c.name)
    rej = read_parts(demo["build_dir"], "rejects", ["stage", "reason"])
    for stage, reason in set(zip(rej["stage"].to_pylist(), rej["reason"].to_pylist())):
        if stage in names:
            assert reason in {r.name for r in stage_class(stage).reasons}, (stage, reason)
    assert not any(c.startswith("_") for c in shards.column_names)  # private pixel columns never written
