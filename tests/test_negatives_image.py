"""Counterfactual hard-negative images: editors, validation, the negatives flow on the demo build."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from demo.scenes import scene_batch
from demo.render_editor import RenderEditor, parse_demo_caption
from negatives.editors import FlipEditor, RecolorEditor, colour_mapping, has_left_right, swap_left_right
from negatives.images import REASONS, NegativesImageSpec, decide, make_negatives, summarize, to_table


@pytest.fixture(scope="module")
def clip():
    from stages.models import load_clip

    return load_clip("demo-clip", "cpu", "float32", threads=1)


# ------------------------------------------------------------------ editors

def test_flip_only_for_left_right_captions():
    ed = FlipEditor()
    img = Image.new("RGB", (16, 8))
    img.putpixel((0, 0), (255, 0, 0))
    for cap in ("a red circle above a blue square", "two green stars", "a cat on the bright side"):
        assert not has_left_right(cap)
        assert ed.propose(cap) == []
        out, reason, _ = ed.try_edit(img, cap, cap + " x", "flip_lr")
        assert out is None and reason == "not_applicable"
    cap = "a red circle to the left of a blue square"
    (p,) = ed.propose(cap)
    assert p.text == swap_left_right(cap) == "a red circle to the right of a blue square"
    out = ed.edit(img, cap, p.text, p.kind)
    assert out.size == img.size and out.getpixel((15, 0)) == (255, 0, 0)
    # a negative caption that is not the swap is refused
    assert ed.edit(img, cap, "a red circle below a blue square", p.kind) is None


def test_recolor_and_render_on_a_demo_scene():
    from demo.scenes import Group, Scene, render_scene

    scene = Scene((Group("circle", "red", "large"), Group("square", "blue")), "left of")
    cap = "a large red circle to the left of a blue square"
    img = render_scene(scene, 128, 5)
    neg = "a large green circle to the left of a blue square"
    ctx = {"edit_before": "red", "edit_after": "green", "scene": scene.to_json(), "render_seed": 5}
    assert colour_mapping(cap, "red", "green") == {"red": "green"}
    rec = RecolorEditor().edit(img, cap, neg, "replace_att", ctx)
    ren = RenderEditor().edit(img, cap, neg, "replace_att", ctx)
    truth = np.asarray(render_scene(Scene((Group("circle", "green", "large"), Group("square", "blue")), "left of"),
                                    128, 5), float)
    # both put green where red was; the re-render is exact, the recolour close
    assert np.abs(np.asarray(ren, float) - truth).mean() == 0
    assert np.abs(np.asarray(rec, float) - truth).mean() < 0.25 * np.abs(np.asarray(img, float) - truth).mean()
    # size edits are not colour edits; a colour the image lacks has no region
    assert RecolorEditor().try_edit(img, cap, cap, "replace_att", dict(ctx, edit_before="large",
                                                                         edit_after="small"))[1] == "not_applicable"
    cap2 = "a large yellow circle to the left of a blue square"
    assert RecolorEditor().try_edit(img, cap2, neg, "replace_att", dict(ctx, edit_before="yellow"))[1] == "no_region"
    # render needs a scene; captions round-trip through the parser
    assert RenderEditor().try_edit(img, cap, neg, "replace_att", {})[1] == "not_applicable"
    assert parse_demo_caption("an image of a blue square to the right of a large red circle") is not None
    assert parse_demo_caption("a dog on a sofa") is None


def _tiny_sd_parts(tmp_path, in_channels: int):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8,
                                in_channels=in_channels, out_channels=4, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=520, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=32, projection_dim=16))
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = [chr(b) for b in bs] + [chr(256 + k) for k in range(256 - len(bs))]  # GPT-2's byte-level alphabet
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=32)
    sched = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("pipeline", ["instruct_pix2pix", "img2img"])
def test_tiny_diffusion_pipeline_through_the_editor(tmp_path, pipeline):
    """Random tiny weights: the output is noise; this checks the plumbing (save, reload by folder, run, size)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline

    from negatives.editors import make_editor

    cls = StableDiffusionInstructPix2PixPipeline if pipeline == "instruct_pix2pix" else StableDiffusionImg2ImgPipeline
    parts = _tiny_sd_parts(tmp_path, 8 if pipeline == "instruct_pix2pix" else 4)
    folder = tmp_path / "tiny"
    cls(**parts).save_pretrained(folder)
    ed = make_editor("diffusion", model=str(folder), pipeline=pipeline, device="cpu", dtype="float32", steps=2,
                     resolution=32)
    img = Image.new("RGB", (40, 30), (200, 20, 20))
    out, reason, _ = ed.try_edit(img, "a red circle", "a blue circle", "replace_att",
                                 {"edit_before": "red", "edit_after": "blue"})
    assert reason is None and out.size == (40, 30) and out.mode == "RGB"
    assert ed.metadata()["pipeline"] == pipeline


# ------------------------------------------------------------------ validation

def test_decide_reasons():
    spec = NegativesImageSpec(min_image_sim=0.2, max_image_sim=0.99)
    rows = [
        {"uid": "a", "reason": None, "score_neg": 0.9, "score_pos": 0.5, "image_sim": 0.8},  # kept
        {"uid": "b", "reason": None, "score_neg": 0.4, "score_pos": 0.5, "image_sim": 0.8},  # not_preferred
        {"uid": "c", "reason": None, "score_neg": 0.9, "score_pos": 0.5, "image_sim": 0.999},  # too_similar
        {"uid": "d", "reason": None, "score_neg": 0.9, "score_pos": 0.5, "image_sim": 0.1},  # too_different
        {"uid": "e", "reason": "no_region", "detail": "x"},
    ]
    reasons, details = decide(to_table(rows), spec)
    assert reasons == [None, "not_preferred", "too_similar", "too_different", "no_region"]
    assert all(d for r, d in zip(reasons, details) if r)


def test_validation_on_demo_scenes(clip):
    table, ctx = scene_batch(40)
    spec = NegativesImageSpec()
    out, tm = make_negatives(table, spec, clip, contexts=ctx)
    kept = out.filter(out.column("kept"))
    dropped = out.filter(pa.compute.invert(out.column("kept")))
    assert out.num_rows == kept.num_rows + dropped.num_rows
    assert set(dropped.column("reason").to_pylist()) <= set(REASONS)
    assert kept.column("reason").null_count == kept.num_rows
    assert kept.num_rows > 0
    pref = np.array(kept.column("preferred").to_pylist())
    assert pref.mean() >= 0.9
    summ = summarize(out)
    assert {"flip", "recolor", "render"} <= set(summ)
    for s in summ.values():
        assert s["candidates"] == s["kept"] + sum(s["dropped"].values())
    for r in out.filter(pa.compute.equal(out.column("editor"), "flip")).to_pylist():
        assert has_left_right(r["caption"])


# ------------------------------------------------------------------ the flow on the demo build

def test_negatives_flow_on_demo_build(demo, tmp_path):
    import shutil

    from catalogs import Catalog
    from flows.negatives import negatives_flow

    build = tmp_path / demo["build_dir"].name  # a copy: the shared build stays without negatives for other tests
    shutil.copytree(demo["build_dir"], build)
    res = negatives_flow(str(build), {"max_rows": 40, "rows_per_shard": 50}, quiet=True)
    st = res["stats"]
    out = build / "negatives"
    kept = pq.read_table([f["path"] for f in res["files"]][0]) if len(res["files"]) == 1 else \
        pa.concat_tables([pq.read_table(f["path"]) for f in res["files"]])
    rej = pa.concat_tables([pq.read_table(f["path"]) for f in res["rejects"]])
    assert st["candidates"] == st["kept"] + st["dropped"] == kept.num_rows + rej.num_rows
    assert st["kept"] > 0 and "render" in st["by_editor"]
    assert st["by_editor"]["render"]["made"] > 0  # scenes came from the corpus labels beside the source
    assert all(r in REASONS for r in rej.column("reason").to_pylist())
    assert np.mean(kept.column("preferred").to_pylist()) >= 0.9
    assert all(has_left_right(c) for c, e in zip(kept.column("caption").to_pylist(), kept.column("editor").to_pylist())
               if e == "flip")
    # grouped by uid: sorted, and no uid in two shards
    seen = {}
    for f in res["files"]:
        uids = pq.read_table(f["path"], columns=["uid"]).column("uid").to_pylist()
        assert uids == sorted(uids)
        for u in set(uids):
            assert seen.setdefault(u, f["path"]) == f["path"]
    im = Image.open(io.BytesIO(kept.column("neg_image")[0].as_py()))
    assert im.size == Image.open(io.BytesIO(kept.column("image")[0].as_py())).size
    assert (out / "stats.json").is_file()
    cat = Catalog(demo["build_dir"].parent.parent / "catalog.duckdb", read_only=True)
    b = cat.get_build(res["negatives_id"])
    assert b["status"] == "complete"
    assert {s["kind"] for s in b["shards"]} == {"negatives", "negatives_rejects"}
    assert any(l["relation"] == "negatives_of" and l["parent_build_id"] == st["source_build_id"]
               for l in b["lineage"])
