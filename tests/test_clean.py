"""The clean stage (caption normaliser) and the contract that lets it, and only it, rewrite `text`."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.demo import DEMO_SPEC
from schemas.records import make_uid
from schemas.spec import parse_spec
from stages import stage_class
from stages.base import Stage, StageDeclarationError
from stages.clean import EDITS, CleanParams, CleanStage, normalize_caption
from stages.junk import JunkParams, JunkStage
from tests.realdata import LAION

CASES = {  # raw alt text -> (normalised, edits)
    "Gotrek &amp; Felix : The Third Omnibus": ("Gotrek & Felix : The Third Omnibus", ("html",)),
    "&amp;lt;b&amp;gt;Bold&amp;lt;/b&amp;gt; move": ("Bold move", ("html",)),  # escaped twice
    "<span class=meta>(AP Photo&#47; Franklin Reyes)</span>": ("(AP Photo/ Franklin Reyes)", ("html",)),
    "AT&T store, S&P 500, Tom & Jerry": ("AT&T store, S&P 500, Tom & Jerry", ()),
    "a <3 b": ("a <3 b", ()),
    "CafÃ© de Flore": ("Café de Flore", ("mojibake",)),
    "Stol\x00 obe\u200bdenny\u00ad": ("Stol obedenny", ("control",)),
    "Hartford\xa0Slim-Fit  Linen Trousers ": ("Hartford Slim-Fit Linen Trousers", ("whitespace",)),
    '"""Listen to the Kids"" Unisex T-Shirt"': ('"Listen to the Kids" Unisex T-Shirt', ("quotes",)),
    "Scorching June 14 for Alabama.jpg": ("Scorching June 14 for Alabama", ("extension",)),
    "https://example.com/a.jpg": ("https://example.com/a.jpg", ()),  # a URL stays whole, for junk
    "hitachi-solutions.jp": ("hitachi-solutions.jp", ()),
    # URLs of many hyphens or underscores stay whole too, alone or inside a caption (issue 23)
    "http://www.blog-example.fr/breves/le-community-manager-doit-il-travailler/":
        ("http://www.blog-example.fr/breves/le-community-manager-doit-il-travailler/", ()),
    "Photo by Ann - www.photos-de-voyage.fr/galerie/la-plage-de-nice":
        ("Photo by Ann - www.photos-de-voyage.fr/galerie/la-plage-de-nice", ()),
    "https://upload.example.org/thumb/The_Crew_of_KL_867.jpeg/520px-thumb.jpeg":
        ("https://upload.example.org/thumb/The_Crew_of_KL_867.jpeg/520px-thumb.jpeg", ()),
    "red_sofa see www.x.com/sofa_red": ("red sofa see www.x.com/sofa_red", ("slug",)),
    "inside-blue-mosque-istanbul-turkey": ("inside blue mosque istanbul turkey", ("slug",)),
    "MV046-CuteSpiderman-BW-Shirt.jpg": ("MV046 Cute Spiderman BW Shirt", ("extension", "slug")),
    "mount-everest-89590_1280": ("mount everest 89590 1280", ("slug",)),
    "Cowshed_Gorgeous_Cow_Blissful_Body_Lotion_300ml_1372086846":
        ("Cowshed Gorgeous Cow Blissful Body Lotion 300ml", ("slug",)),
    "IMG_20190305_123456": ("IMG 20190305 123456", ("slug",)),
    "Image is loading NWT-Polo-Sport-Ralph-Lauren-Drawstring-Bag-Backpack- 8de65cd444aa4":
        ("NWT Polo Sport Ralph Lauren Drawstring Bag Backpack", ("ui_prefix", "slug")),
    "Click to enlarge": ("Click to enlarge", ()),  # alone: the junk stage's
    "Broadlands Court, Bourton-On-The-Water, Cheltenham": ("Broadlands Court, Bourton-On-The-Water, Cheltenham", ()),
    "iPhone 7 case": ("iPhone 7 case", ()),
    "": ("", ()),
}


@pytest.mark.parametrize("raw", sorted(CASES))
def test_normalize_caption(raw):
    assert normalize_caption(raw) == CASES[raw]
    assert set(CASES[raw][1]) <= set(EDITS)


def test_none_stays_none_and_cleaning_is_idempotent():
    assert normalize_caption(None) == (None, ())
    texts = pq.read_table(LAION, columns=["TEXT"]).column("TEXT").to_pylist() + list(CASES)
    cleaned = [normalize_caption(t)[0] for t in texts]
    again = [(c, normalize_caption(c)) for c in cleaned if normalize_caption(c) != (c, ())]
    assert not again, again[:5]


def test_stage_rewrites_text_keeps_raw_and_identity():
    raw = ["Tom &amp; Jerry mug", "a red circle", None, "stackable-1"]
    uids = [make_uid(f"http://x/{i}.jpg", t) for i, t in enumerate(raw)]
    batch = pa.table({"uid": uids, "text": pa.array(raw, pa.string()), "width": pa.array([1, 2, 3, 4], pa.int32())})
    out = CleanStage(CleanParams())(batch)
    assert out.column("text").to_pylist() == ["Tom & Jerry mug", "a red circle", None, "stackable 1"]
    assert out.column("text_raw").to_pylist() == raw
    assert out.column("clean_edits").to_pylist() == ["html", None, None, "slug"]
    assert out.column("uid").to_pylist() == uids and out.column("width").equals(batch.column("width"))
    assert CleanStage.decide(out, CleanParams()).reason == [None] * 4
    assert [f.name for f in CleanStage.output_fields()] == ["text_raw", "clean_edits"]


def test_only_declared_rewrites_may_change_input_columns():
    class Sneaky(Stage):  # not registered (no `name` in its body); borrows junk's declared columns
        columns = JunkStage.columns

        def process_batch(self, batch):
            batch = batch.set_column(0, "text", pa.array(["changed"] * batch.num_rows))
            return self.add_columns(batch, {"junk_kind": [None] * batch.num_rows,
                                            "junk_detail": [None] * batch.num_rows})

    Sneaky.name = "sneaky"
    batch = pa.table({"text": ["a cat"]})
    with pytest.raises(RuntimeError, match="changed or dropped its input column 'text'"):
        Sneaky(JunkParams())(batch)
    with pytest.raises(StageDeclarationError, match="without declaring it"):
        Sneaky.rewrite_column(batch, "text", ["x"])


def test_registered_and_first_in_the_demo_spec(tmp_path):
    assert stage_class("clean").Params is CleanParams and stage_class("clean") is CleanStage
    demo = yaml.safe_load(DEMO_SPEC.read_text())
    assert list(demo["stages"][0]) == ["clean"] and list(demo["stages"][1]) == ["junk"]
    urls = tmp_path / "u.csv"
    urls.write_text("url,caption\nhttp://x/a.jpg,a cat\n")
    spec = parse_spec({"dataset": "d", "source": {"urls": str(urls)}, "stages": [{"clean": {}}, {"junk": {}}]})
    assert spec.stage_names() == ["clean", "junk"]
