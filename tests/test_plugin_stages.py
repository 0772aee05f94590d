"""Stages from outside the repository, with the same contract as pairforge's own (schemas/registry.py):
- a tiny package written to a temp dir and installed with pip (into a target folder, not the shared venv), whose
  `pairforge.stages` entry point importlib.metadata finds: its `colourful` stage;
- a module on PYTHONPATH named by the spec's `stage_modules`: its `shouting` stage.
A real curate build of a small Parquet corpus of real photos (the CLI in a fresh process: Prefect, local Ray
workers that find both stages the same ways) writes their columns, and their decisions reach the rejects."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tests.builds import read_parts
from tests.layout import ROOT

pytestmark = pytest.mark.slow

SKIMAGE = Path(np.__file__).resolve().parents[1] / "skimage" / "data"
COLOUR = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
GREY = ["camera.png", "moon.png", "page.png"]  # one channel: no colour at all

PLUGIN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "pf-colour-plugin"
        version = "0.1.0"

        [project.entry-points."pairforge.stages"]
        colour = "pf_colour_plugin.colourful"

        [tool.setuptools]
        packages = ["pf_colour_plugin"]
        """,
    "pf_colour_plugin/__init__.py": "",
    "pf_colour_plugin/colourful.py": '''
        """colourful: Hasler and Suesstrunk's colourfulness of the decoded image (0 for a grey one)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        from pydantic import Field

        from schemas.spec import StageParams
        from stages.base import Column, Decision, Reason, Stage, Threshold, concat, fixed
        from stages.imaging.decode import images


        class ColourfulParams(StageParams):
            min_colourfulness: float = Field(5.0, ge=0.0, description="reject images less colourful than this")


        def colourfulness(rgb):
            x = rgb.astype(np.float32)
            rg, yb = x[..., 0] - x[..., 1], 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
            return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


        class ColourfulStage(Stage):
            name = "colourful"
            summary = "colourfulness (Hasler and Suesstrunk 2003)"
            Params = ColourfulParams
            needs_image = True
            columns = (Column("colourfulness", pa.float32(), "colourfulness of the image; null: undecodable"),)
            reasons = (Reason("too_grey", "colourfulness below min_colourfulness", ("colourfulness",),
                              (Threshold("colourfulness", "min_colourfulness", "min"),)),)

            def process_batch(self, batch):
                return self.add_columns(batch, {"colourfulness": [None if im is None else colourfulness(im)
                                                                  for im in images(batch)]})

            @classmethod
            def decide(cls, table, params, ctx=None) -> Decision:
                d = cls.decision(table.num_rows)
                c = table.column("colourfulness")
                d.reject(pc.less(c, params.min_colourfulness), "too_grey", concat("colourfulness=", fixed(c, 1)))
                return d
        ''',
}

SHOUTING = '''
    """shouting: captions mostly in capitals."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pydantic import Field

    from schemas.spec import StageParams
    from stages.base import Column, Decision, Reason, Stage, Threshold


    class ShoutingParams(StageParams):
        max_caps_share: float = Field(0.6, ge=0.0, le=1.0, description="reject captions with more capitals than this")


    class ShoutingStage(Stage):
        name = "shouting"
        summary = "captions in capitals"
        Params = ShoutingParams
        columns = (Column("caps_share", pa.float32(), "share of the caption's letters in capitals"),)
        reasons = (Reason("shouting", "caps_share above max_caps_share", ("caps_share",),
                          (Threshold("caps_share", "max_caps_share", "max"),)),)

        def process_batch(self, batch):
            text = pc.fill_null(batch.column("text"), "")
            letters = pc.utf8_length(pc.replace_substring_regex(text, r"[^A-Za-z]", ""))
            caps = pc.utf8_length(pc.replace_substring_regex(text, r"[^A-Z]", ""))
            share = pc.divide(pc.cast(caps, pa.float32()), pc.cast(pc.max_element_wise(letters, 1), pa.float32()))
            return self.add_columns(batch, {"caps_share": share})

        @classmethod
        def decide(cls, table, params, ctx=None) -> Decision:
            d = cls.decision(table.num_rows)
            d.reject(pc.greater(table.column("caps_share"), params.max_caps_share), "shouting")
            return d
    '''


def _write(base: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(textwrap.dedent(text).lstrip())


def _jpeg(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_third_party_stages_build_like_our_own(tmp_path):
    _write(tmp_path / "plugin", PLUGIN)
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--disable-pip-version-check", "--target", str(site),
                          str(tmp_path / "plugin")], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert list(site.glob("pf_colour_plugin-0.1.0.dist-info/entry_points.txt"))
    _write(tmp_path / "extra", {"pf_shouting_stage.py": SHOUTING})

    names = COLOUR + GREY
    captions = [f"a photo called {n.split('.')[0]}" for n in names]
    captions[1] = "A CAT SITTING ON A SOFA"  # chelsea: colourful, but shouting
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"url": [f"http://photos.test/{n}" for n in names], "text": captions,
                             "image": [_jpeg(SKIMAGE / n) for n in names]}), corpus / "part-0.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "dataset": "plugins", "source": {"pairs": str(corpus), "caption_col": "text"}, "out": str(tmp_path / "b"),
        "stage_modules": ["pf_shouting_stage"],
        "stages": [{"basic": {"min_side": 32}}, {"colourful": {"min_colourfulness": 5.0}}, {"shouting": {}}],
        "ray": {"num_cpus": 2, "object_store_gb": 0.5}}))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site), str(tmp_path / "extra"), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    listed = subprocess.run([sys.executable, "-m", "flows.cli", "stages"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert listed.returncode == 0 and "colourful" in listed.stdout, listed.stderr[-2000:]  # from the entry point
    r = subprocess.run([sys.executable, "-m", "flows.cli", "curate", str(spec), "--quiet", "--json"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    build_dir = Path(json.loads(r.stdout[r.stdout.index("{"):])["build_dir"])

    kept = read_parts(build_dir, "shards", ["url", "colourfulness", "caps_share"])
    rejects = read_parts(build_dir, "rejects", ["url", "stage", "reason", "colourfulness"])
    assert kept.num_rows + rejects.num_rows == len(names)
    outcome = {u.rsplit("/", 1)[1]: (s, r) for u, s, r in zip(*(rejects[c].to_pylist()
                                                                   for c in ("url", "stage", "reason")))}
    assert outcome == {**{n: ("colourful", "too_grey") for n in GREY}, "chelsea.png": ("shouting", "shouting")}
    assert all(c > 5.0 for c in kept["colourfulness"].to_pylist())
    assert all(c < 5.0 for u, c in zip(rejects["url"].to_pylist(), rejects["colourfulness"].to_pylist())
               if u.rsplit("/", 1)[1] in GREY)
    assert all(s < 0.6 for s in kept["caps_share"].to_pylist())
    resolved = yaml.safe_load((build_dir / "spec.yaml").read_text())
    assert resolved["stage_modules"] == ["pf_shouting_stage"]
