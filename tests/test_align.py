"""The align stage: real transformers code on tiny CLIP and SigLIP models built here, preflight, decide, Ray Data.

Acceptance tests on the trained demo model (stages/models/shipped/demo-clip) run when that folder exists; run with -s to see
the retrieval numbers they print.
"""
from __future__ import annotations

import hashlib
import io
import math
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from schemas.columns import stage_fields
from schemas.spec import parse_spec
from stages import stage_class
from stages.align import AlignParams, AlignStage
from stages.base import StageConfigError
from stages.models import MODELS_DIR, check_loadable, load_clip, locate_model, resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
DEMO_CLIP = MODELS_DIR / "demo-clip"


# --------------------------------------------------------------------------- tiny models, built in memory

def byte_level_vocab() -> dict[str, int]:
    """GPT-2's byte -> printable-character table, each char alone and as a word end: a BPE vocab with no merges."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    return vocab


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random tiny CLIPModel (hidden 32, 2 layers, 32 px images, patch 8, projection 16) with a byte-level
    CLIPTokenizer and a CLIPImageProcessor, saved with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = byte_level_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def build_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """A random tiny SiglipModel. SigLIP's own SiglipTokenizer needs sentencepiece, which is not installed and cannot
    be fetched offline; a GemmaTokenizer (tokenizers-backed, byte fallback, what SigLIP 2 uses) stands in, built
    from a character vocab, right padding and an eos token as SigLIP pads."""
    import torch
    from transformers import GemmaTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-":
        vocab.setdefault(c, len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=[], padding_side="right", add_bos_token=False, add_eos_token=True,
                         model_max_length=24)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24, pad_token_id=0, bos_token_id=2,
                         eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))
    torch.manual_seed(seed)
    model = SiglipModel(cfg).eval()
    proc = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "model")


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory) -> Path:
    return build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip") / "model")


# --------------------------------------------------------------------------- batches

def _jpeg(im: Image.Image, fmt: str = "JPEG") -> bytes:
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


def scene_pairs(n: int, seed: int = 0, size: int = 64) -> tuple[list[bytes], list[str]]:
    from demo.scenes import caption, render_scene, sample_scene

    rng = random.Random(seed)
    images, texts = [], []
    for i in range(n):
        scene = sample_scene(rng)
        images.append(_jpeg(render_scene(scene, size, seed * 100_003 + i)))
        texts.append(caption(scene, rng))
    return images, texts


def pair_table(images: list, texts: list, uids: list[str] | None = None) -> pa.Table:
    uids = uids or [f"{i:032x}" for i in range(len(images))]
    return pa.table({"uid": pa.array(uids, pa.string()), "text": pa.array(texts, pa.string()),
                     "image": pa.array(images, pa.binary())})


@pytest.fixture(scope="module")
def mixed_batch() -> pa.Table:
    return mixed_table()


def mixed_table(size: int = 64) -> pa.Table:
    """Scenes as JPEG, a transparent PNG, a palette GIF, an undecodable row, a missing image, a null caption."""
    images, texts = scene_pairs(10, seed=3, size=size)
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 20))
    images += [_jpeg(rgba, "PNG"), _jpeg(Image.new("P", (20, 20), 3), "GIF"), b"not an image", None, images[0]]
    texts += ["a blue rectangle", "a gif", "broken bytes", "no image", None]
    return pair_table(images, texts)


def _emb(col: pa.ChunkedArray) -> list:
    return [None if v is None else np.asarray(v, np.float32) for v in col.to_pylist()]


# --------------------------------------------------------------------------- scoring with real models

@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_stage_scores_tiny_models(which, tiny_clip, tiny_siglip, mixed_batch):
    folder = tiny_clip if which == "clip" else tiny_siglip
    stage = AlignStage(AlignParams(model=str(folder), batch_size=4))  # 4: several forwards per call
    stage.preflight()
    out = stage(mixed_batch)
    assert out.num_rows == mixed_batch.num_rows
    for f in stage_fields("align"):
        assert out.schema.field(f.name).type == f.type, f.name
    assert out.schema.field("image_emb").type == pa.list_(pa.float16())

    scores = out.column("clip_score").to_pylist()
    img, txt = _emb(out.column("image_emb")), _emb(out.column("text_emb"))
    bad = {12, 13}  # undecodable bytes, no image
    for i, s in enumerate(scores):
        if i in bad:
            assert s is None and img[i] is None and txt[i] is None
            continue
        assert -1.0 <= s <= 1.0
        assert img[i].shape == (16,) if which == "clip" else img[i].shape == (32,)
        assert abs(np.linalg.norm(img[i]) - 1) < 2e-3 and abs(np.linalg.norm(txt[i]) - 1) < 2e-3
        assert abs(float(img[i] @ txt[i]) - s) < 5e-3  # the stored float16 vectors give the score back
    # the last row repeats row 0's image with a null caption (scored as ""): the same image embedding, up to the
    # last float32 bits that differ between batch shapes (row 0 is in a forward of 4, row 14 alone), seen in float16
    np.testing.assert_allclose(img[14], img[0], rtol=0, atol=5e-4)

    # deterministic: the same stage twice, and a second stage loading the same folder
    again = stage(mixed_batch)
    other = AlignStage(AlignParams(model=str(folder), batch_size=4))(mixed_batch)
    for t in (again, other):
        assert t.column("clip_score").to_pylist() == scores
        assert t.column("image_emb").to_pylist() == out.column("image_emb").to_pylist()
    meta = stage.metadata()
    assert meta["model_type"] == which and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["embedding_dim"] == (16 if which == "clip" else 32)
    assert meta["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    if which == "siglip":
        assert stage.clip.text_padding == "max_length" and stage.clip.text_max_length == 24


def test_scores_are_the_projected_cosine(tiny_clip, mixed_batch):
    """clip_score is the cosine of CLIP's projected embeddings, computed here the long way from the towers."""
    import torch

    clip = load_clip(str(tiny_clip), "cpu", "float32", threads=1)
    images, texts = scene_pairs(6, seed=7, size=48)  # under twice the model's 32 px: decoded in full, as PIL does here
    out = AlignStage(AlignParams(model=str(tiny_clip)))(pair_table(images, texts))
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    inputs = clip.preprocess(pil, texts)
    with torch.inference_mode():
        v = clip.model.visual_projection(clip.model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        t = clip.model.text_projection(clip.model.text_model(input_ids=inputs["input_ids"],
                                                             attention_mask=inputs["attention_mask"]).pooler_output)
    want = torch.nn.functional.cosine_similarity(v, t).numpy()
    np.testing.assert_allclose(out.column("clip_score").to_numpy(), want, atol=1e-5)


def test_store_embeddings_off(tiny_clip, mixed_batch):
    out = AlignStage(AlignParams(model=str(tiny_clip), store_embeddings=False))(mixed_batch)
    assert out.column("image_emb").null_count == out.num_rows == out.column("text_emb").null_count
    assert out.column("clip_score").null_count == 2


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_prepare_batch_then_process_matches_direct_call(which, tiny_clip, tiny_siglip, mixed_batch):
    """prepare_batch (CPU only: decode, resize, crop; no model loaded) hands uint8 pixels over in a private column;
    process_batch on that gives the direct call's columns bit for bit and drops the private one. The pixels,
    rescaled and normalised where the model runs, equal the processor's own float32 output on the images as the
    prepare step decodes them (the scenes' 64 px JPEGs at 1/2: the model's 32 px)."""
    import torch

    from stages.align import PIXELS
    from stages.imaging.decode import decode_at, pil
    from stages.models import as_tensor, pixel_rows

    params = AlignParams(model=str(tiny_clip if which == "clip" else tiny_siglip), batch_size=4)
    preparer = AlignStage(params)
    prepared = preparer.prepare_batch(mixed_batch)
    assert preparer.clip is None  # the processor only
    col = prepared.column(PIXELS)
    assert col.type.value_type == pa.uint8() and preparer.pixel_prep().shape == (3, 32, 32)
    assert [i for i, ok in enumerate(col.is_valid().to_pylist()) if not ok] == [12, 13]  # undecodable, missing

    stage = AlignStage(params)
    direct, via = stage(mixed_batch), stage(prepared)
    assert via.column_names == direct.column_names and PIXELS not in via.column_names
    for c in ("clip_score", "image_emb", "text_emb"):
        assert via[c].to_pylist() == direct[c].to_pylist()

    pixels, rows = pixel_rows(col, (3, 32, 32))
    side = stage.pixel_prep().side
    assert side == 32 and decode_at(mixed_batch["image"][0].as_py(), side)[0].shape == (32, 32, 3)
    decoded = [pil(decode_at(d, side)[0]) for d in mixed_batch["image"].take(pa.array(rows)).to_pylist()]
    want = stage.clip.image_processor(images=decoded, return_tensors="pt")["pixel_values"]
    got = stage.clip.pixel_prep.to_model(as_tensor(pixels), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_processor_that_cannot_be_split_runs_whole(tiny_clip):
    """A processor giving more than pixel_values (SigLIP 2's NaFlex patches) has PixelPrep mode None: prepare_batch
    hands nothing over and process_batch decodes (in full) and runs the whole processor itself; scores agree (48 px
    scenes: under twice the model's side, so the split path decodes them in full too)."""
    from stages.align import PIXELS

    mixed_batch = mixed_table(48)
    stage = AlignStage(AlignParams(model=str(tiny_clip), batch_size=4))
    split = stage(mixed_batch)
    stage.clip.pixel_prep.mode = None
    assert PIXELS not in stage.prepare_batch(mixed_batch).column_names
    whole = stage(mixed_batch)
    assert whole.column("clip_score").is_valid().to_pylist() == split.column("clip_score").is_valid().to_pylist()
    ok = split.column("clip_score").is_valid().to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(whole.column("clip_score").to_numpy(zero_copy_only=False)[ok],
                               split.column("clip_score").to_numpy(zero_copy_only=False)[ok], rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_token_ids_handed_over_pad_like_the_tokenizer(which, tiny_clip, tiny_siglip):
    """The prepare step's token ids (unpadded list<int32>), padded in the model's process, are the tokenizer's own
    padded output bit for bit: CLIP to the longest caption of a forward, SigLIP to max_length."""
    from stages.models import load_preps

    preps = load_preps(str(tiny_clip if which == "clip" else tiny_siglip))
    text = preps.text
    texts = ["a red circle", None, "a very long caption " * 20, "", "two blue squares to the left of a tree"]
    ids = text.ids(texts)
    assert ids.type == pa.list_(pa.int32()) and len(ids) == len(texts)
    want = text.tokenizer([t or "" for t in texts], padding=text.padding, truncation=True,
                          max_length=text.max_length, return_tensors="np")
    for rows in (slice(0, 5), slice(1, 4)):  # a slice of the column too (offsets not starting at 0)
        got = text.pad(ids[rows])
        assert set(got) == set(want.keys())
        for k in got:
            part = want[k][rows]
            if text.padding == "longest":  # the tokenizer padded to the whole list's longest
                part = part[:, :got[k].shape[1]]
            np.testing.assert_array_equal(got[k], part)


def test_decode_gpu_is_refused_without_cuda_and_auto_falls_back(tiny_clip):
    from stages.align import decodes_on_gpu

    for params in (AlignParams(model=str(tiny_clip), decode="gpu"),
                   AlignParams(model=str(tiny_clip), decode="gpu", device="cpu")):
        with pytest.raises(StageConfigError, match="decode: gpu needs"):
            AlignStage(params).preflight()
    auto = AlignParams(model=str(tiny_clip))
    assert auto.decode == "auto" and not decodes_on_gpu(auto) and AlignStage.reads_pixels(auto)
    AlignStage(auto).preflight()
    assert AlignStage.pixel_side(auto) == 32
    with pytest.raises(Exception):
        AlignParams.model_validate({"model": str(tiny_clip), "decode": "nvjpeg"})


class _CpuJpegDecoder:
    """Stands in for stages.imaging.gpu_decode.JpegDecoder where there is no GPU: the same contract (uint8
    [3, H, W] tensors on the device, here the CPU; None for what it refuses), decoding with PIL in full."""

    def decode(self, datas):
        import torch

        out = []
        for d in datas:
            try:
                with Image.open(io.BytesIO(d)) as im:
                    out.append(torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy()))
            except Exception:
                out.append(None)
        return out


def test_jpeg_bytes_handed_over_are_decoded_next_to_the_model(tiny_clip):
    """decode: gpu: the prepare step hands JPEG rows over as bytes (no pixels), other formats as pixels; the model's
    process decodes the bytes (here with a CPU stand-in for the GPU decoder, then with none: the CPU fallback),
    resizes them there (antialiased bicubic, as Pillow's) and scores every row in order, as the CPU path does."""
    from stages.align import JPEG, PIXELS, TOKENS

    batch = mixed_table(96)  # JPEG scenes, a PNG, a GIF, broken bytes, no image
    cpu = AlignStage(AlignParams(model=str(tiny_clip), batch_size=4, decode="cpu"))(batch)
    stage = AlignStage(AlignParams(model=str(tiny_clip), batch_size=4, decode="gpu"))
    prepared = stage.prepare_batch(batch)
    jpeg_rows = [i for i, v in enumerate(prepared[JPEG].is_valid().to_pylist()) if v]
    assert jpeg_rows == list(range(10)) + [14]
    assert [i for i, v in enumerate(prepared[PIXELS].is_valid().to_pylist()) if v] == [10, 11]
    assert prepared[TOKENS].null_count == 0
    want = cpu["clip_score"].to_numpy(zero_copy_only=False)
    for decoder in (_CpuJpegDecoder(), False):  # False: no device decoder here, the CPU decodes them
        stage._jpeg = decoder
        out = stage(prepared)
        assert [c for c in out.column_names if c.startswith("_")] == []
        got = out["clip_score"].to_numpy(zero_copy_only=False)
        assert out["clip_score"].is_valid().to_pylist() == cpu["clip_score"].is_valid().to_pylist()
        ok = ~np.isnan(want)
        tol = 0 if decoder is False else 2e-2  # torch's antialiased bicubic is not Pillow's to the last level
        np.testing.assert_allclose(got[ok], want[ok], rtol=0, atol=tol + 1e-6)


def test_reduced_decode_scores_real_photos_like_a_full_decode(tmp_path_factory):
    """CLIP ViT-B/32 (the published architecture, random weights) on real photos at web sizes: the stage's pixels
    (JPEG decoded at 1/2 or 1/4, resized in Pillow) against today's (decoded in full, the processor's resize):
    about a level in 255 apart, scores within 1e-2 (seen: 5e-4)."""
    import os

    from stages.align import PIXELS
    from stages.models import pixel_rows
    from stages.models.sizes import sized_model
    from tests.realdata import web_jpegs

    old = os.environ.get("PAIRFORGE_CACHE")
    os.environ["PAIRFORGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        folder = str(sized_model("clip-vit-b-32"))
    finally:
        if old is None:
            os.environ.pop("PAIRFORGE_CACHE")
        else:
            os.environ["PAIRFORGE_CACHE"] = old
    images = web_jpegs(4, seed=3) + web_jpegs(4, seed=4, tiled=False)
    texts = ["a photo of a cat and a rocket", "an astronaut", "coffee", "flowers"] * 2
    table = pair_table(images, texts)
    stage = AlignStage(AlignParams(model=folder, batch_size=8, threads=2))
    out = stage(table)
    clip = stage.clip
    full = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    want_px = clip.pixel_prep.pixels(full)  # today: decoded in full, the processor's resize and crop
    got_px, _ = pixel_rows(stage.prepare_batch(table)[PIXELS], clip.pixel_prep.shape)
    assert np.abs(got_px.astype(np.int16) - want_px.astype(np.int16)).mean() < 1.5
    img, txt = clip.embed_pixels(want_px, texts, 8)
    want = np.einsum("nd,nd->n", img, txt)
    np.testing.assert_allclose(out["clip_score"].to_numpy(zero_copy_only=False), want, rtol=0, atol=1e-2)


def test_model_found_by_name_under_flows_models(tiny_clip, tmp_path, monkeypatch):
    import stages.models as models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    (tmp_path / "my-clip").symlink_to(tiny_clip, target_is_directory=True)
    assert locate_model("my-clip") == str(tiny_clip.resolve())
    assert check_loadable("my-clip") == str(tiny_clip.resolve())
    assert locate_model("org/not-here") == "org/not-here"  # anything else is a hub id


# --------------------------------------------------------------------------- preflight

@pytest.mark.parametrize("name", ["no-such-model", "/nonexistent/folder/clip", "./models/missing",
                                  "pairforge-tests/not-a-real-clip"])
def test_preflight_unloadable_model_fails_fast(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent/hf-cache")  # nothing cached, whatever this machine holds
    t0 = time.perf_counter()
    with pytest.raises(StageConfigError) as e:
        AlignStage(AlignParams(model=name)).preflight()
    assert time.perf_counter() - t0 < 10
    assert f"model {name!r} cannot be loaded" in str(e.value) and str(e.value).startswith("align:")


def test_preflight_incomplete_or_wrong_folders(tiny_clip, tmp_path):
    partial = tmp_path / "no-weights"
    partial.mkdir()
    for f in tiny_clip.iterdir():
        if f.name != "model.safetensors":
            (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(StageConfigError, match="has no weights"):
        AlignStage(AlignParams(model=str(partial))).preflight()
    text_only = tmp_path / "bert"
    text_only.mkdir()
    for f in tiny_clip.iterdir():
        (text_only / f.name).write_bytes(f.read_bytes())
    (text_only / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    with pytest.raises(StageConfigError, match="not an image-text dual encoder"):
        AlignStage(AlignParams(model=str(text_only))).preflight()


def _spec(tmp_path: Path, align: dict) -> Path:
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a red circle"]}), urls)
    spec = {"dataset": "align-preflight", "source": {"urls": str(urls)}, "out": str(tmp_path / "builds"),
            "stages": [{"basic": {}}, {"align": align}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_build_preflight_fails_before_any_data(tmp_path, monkeypatch, capsys):
    import flows.build
    from flows import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec_path = _spec(tmp_path, {"model": "nobody/no-such-clip"})
    spec = parse_spec(yaml.safe_load(spec_path.read_text()), tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(StageConfigError, match="'nobody/no-such-clip' cannot be loaded"):
        flows.build.preflight(spec)
    assert time.perf_counter() - t0 < 10

    def no_build(**kw):
        raise AssertionError("the build started although preflight should have failed")

    monkeypatch.setattr(flows.build, "build_flow", no_build)
    assert cli.main(["build", str(spec_path)]) == 2
    assert "nobody/no-such-clip" in capsys.readouterr().err
    assert not (tmp_path / "builds" / "align-preflight").exists()  # no build folder, nothing read


def test_build_preflight_records_metadata(tiny_clip, tmp_path):
    import flows.build

    spec_path = _spec(tmp_path, {"model": str(tiny_clip), "threshold": 0.2})
    meta = flows.build.preflight(parse_spec(yaml.safe_load(spec_path.read_text()), tmp_path))["align"]
    assert meta["location"] == str(tiny_clip.resolve()) and meta["local"] is True
    assert meta["embedding_dim"] == 16 and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert len(meta["weights_sha256"]) == 64 and meta["threshold"] == 0.2


def test_device_and_dtype():
    import torch

    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", 0, in_ray=True) == torch.device("cpu")  # an actor Ray gave no GPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for dev in ("cuda", "cuda:1"):
            with pytest.raises(StageConfigError, match="no CUDA device"):
                resolve_device(dev)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(StageConfigError):
        resolve_device("tpu")


def test_preflight_gpus_without_cuda(tiny_clip):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(StageConfigError, match="gpus=1 asked for, but torch sees no CUDA device"):
        AlignStage(AlignParams(model=str(tiny_clip), gpus=1)).preflight()
    with pytest.raises(StageConfigError, match="'cuda' asked for"):
        AlignStage(AlignParams(model=str(tiny_clip), device="cuda")).preflight()


# --------------------------------------------------------------------------- decide

def score_table(scores: list, uids: list[str] | None = None) -> pa.Table:
    uids = uids or [f"u{i:04d}" for i in range(len(scores))]
    return pa.table({"uid": pa.array(uids, pa.string()), "clip_score": pa.array(scores, pa.float32())})


class Decided:
    def __init__(self, reason: list, detail: list):
        self.reason, self.detail = reason, detail


def decide_align(t: pa.Table, params: AlignParams, **kw) -> Decided:
    """align as a build decides it: the threshold row by row, then the top fraction over the whole table (its
    global step, flows.engine.global_decisions.decide_table; kw: ray_tasks, parts)."""
    from flows.engine.global_decisions import decide_table

    d = AlignStage.decide(t, params)
    own = pa.array([0 if r else None for r in d.reason], pa.int32())  # rows the stage rejected row by row
    g = decide_table("align", params, t.append_column("reject_pos", own), **kw).to_pylist()
    by = {r["uid"]: (r["reason"], r["detail"]) for r in g}
    uids = t.column("uid").to_pylist()
    return Decided([by.get(u, (r, None))[0] for u, r in zip(uids, d.reason)],
                   [by.get(u, (None, x))[1] for u, x in zip(uids, d.detail)])


def test_decide_threshold():
    t = score_table([0.12, 0.28, 0.3, None, -0.5])
    d = AlignStage.decide(t, AlignParams(threshold=0.28))
    assert d.reason == ["low_alignment", None, None, None, "low_alignment"]
    assert d.detail[0] == "clip_score=0.120 < 0.28"
    assert AlignStage.decide(t, AlignParams()).reason == [None] * 5  # no rule set: keep everything


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3, 0.5, 0.999, 1.0])
def test_decide_top_fraction_exact_count(fraction):
    rng = np.random.default_rng(0)
    n = 1000
    scores = rng.normal(0.25, 0.05, n).astype(np.float32)
    t = score_table(scores.tolist() + [None] * 7)  # rows without a score are kept and do not count
    d = decide_align(t, AlignParams(top_fraction=fraction))
    kept = [i for i in range(n) if d.reason[i] is None]
    assert len(kept) == math.floor(fraction * n + 0.5)
    assert all(r is None for r in d.reason[n:])
    if len(kept) < n:
        assert scores[kept].min() >= max(scores[i] for i in range(n) if d.reason[i] is not None)
        i = next(i for i in range(n) if d.reason[i])
        assert d.reason[i] == "below_top_fraction" and f"below the top {fraction:g} cutoff" in d.detail[i]


def test_decide_top_fraction_ties_and_row_order():
    # 10 rows, 6 share the score at the cut: top 0.3 keeps 3 -> the 0.9 and the two smallest uids of the 0.5s
    uids = ["k", "c", "x", "a", "m", "b", "z", "q", "d", "e"]
    scores = [0.5, 0.5, 0.1, 0.5, 0.9, 0.5, 0.5, 0.2, 0.5, 0.3]
    d = decide_align(score_table(scores, uids), AlignParams(top_fraction=0.3))
    assert sorted(u for u, r in zip(uids, d.reason) if r is None) == ["a", "b", "m"]
    # global: the same rows in another order, or the table in chunks, give the same survivors
    perm = np.random.default_rng(1).permutation(10)
    t2 = score_table([scores[i] for i in perm], [uids[i] for i in perm])
    t2 = pa.concat_tables([t2.slice(0, 4), t2.slice(4)])
    d2 = decide_align(t2, AlignParams(top_fraction=0.3))
    assert sorted(u for u, r in zip(t2["uid"].to_pylist(), d2.reason) if r is None) == ["a", "b", "m"]


def test_decide_threshold_and_top_fraction():
    scores = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    d = decide_align(score_table(scores), AlignParams(threshold=0.15, top_fraction=0.5))
    assert d.reason[:2] == ["low_alignment"] * 2
    assert d.reason[2:5] == ["below_top_fraction"] * 3 and d.reason[5:] == [None] * 5


def test_spec_accepts_align():
    p = AlignParams.model_validate({"model": "x", "threshold": 0.3, "batch_size": 32, "gpus": 0.25})
    s = stage_class("align")(p)
    assert (s.resources.batch_size, s.resources.gpus, s.resources.cpus, s.resources.pool_size) == (32, 0.25, 1.0, 1)
    assert AlignStage(AlignParams()).params.model == "openai/clip-vit-base-patch32"  # a real CLIP, not the demo's
    with pytest.raises(StageConfigError, match="openai/clip-vit-base-patch32.*cannot be loaded"):
        AlignStage(AlignParams()).preflight()  # offline, not in the cache: a clear error before any data is read
    for bad in ({"top_fraction": 0}, {"top_fraction": 1.5}, {"dtype": "int8"}, {"device": "gpu"}, {"threads": 0}):
        with pytest.raises(Exception):
            AlignParams.model_validate(bad)


# --------------------------------------------------------------------------- inside Ray Data

@pytest.mark.slow
def test_ray_actor_pool_matches_direct_call(tiny_clip, tmp_path):
    """The build's own pipeline (flows.engine.runner.stage_pipeline) for basic then align: the shared decode at
    align's 32 px (basic needs only sizes), align's prepare task (resize, token ids), then its actor pool; the
    direct call's scores bit for bit, basic's stats as from a full decode, and neither `image` nor a private column
    comes out (they stop at the prepare step, before the actors)."""
    import ray

    from flows.engine.resources import fit_resources
    from flows.engine.runner import StageTimer, quiet_ray_data, stage_pipeline
    from stages.basic import BasicParams, BasicStage

    images, texts = scene_pairs(24, seed=11)
    images[5] = b"broken"
    table = pair_table(images, texts)
    params = AlignParams(model=str(tiny_clip), batch_size=8, cpus=0.5)
    direct = AlignStage(params)(table)
    basic = BasicStage(BasicParams())(table)
    (tmp_path / "u.csv").write_text("url,caption\n")
    spec = parse_spec({"dataset": "t", "source": {"urls": "u.csv"},
                       "stages": [{"basic": {"batch_size": 8}},
                                  {"align": {"model": str(tiny_clip), "batch_size": 8, "cpus": 0.5}}]}, tmp_path)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        quiet_ray_data()
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        timer = ray.remote(num_cpus=0)(StageTimer).options(name="align-test-timer").remote()
        ds = stage_pipeline(ray.data.from_arrow(table), spec, "align-test-timer", fit_resources(spec, 2))
        got = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        totals = ray.get(timer.get.remote())
        assert totals["decode"][0] == totals["align.prepare"][0] == totals["align"][0] == 24
    finally:
        if started:
            ray.shutdown()
    assert got["uid"].to_pylist() == table["uid"].to_pylist()
    assert [c for c in got.column_names if c.startswith("_") or c == "image"] == []
    # same batches (8 rows), same threads (1): bit-identical
    assert got["clip_score"].to_pylist() == direct["clip_score"].to_pylist()
    assert got["image_emb"].to_pylist() == direct["image_emb"].to_pylist()
    assert got["text_emb"].to_pylist() == direct["text_emb"].to_pylist()
    assert got["clip_score"].to_pylist()[5] is None
    for c in ("decode_ok", "min_side", "aspect_ratio"):
        assert got[c].to_pylist() == basic[c].to_pylist()
    assert got["decode_error"].is_null().to_pylist() == basic["decode_error"].is_null().to_pylist()


# --------------------------------------------------------------------------- the demo model (acceptance)

def needs_demo_clip(fn):
    skip = pytest.mark.skipif(not (DEMO_CLIP / "config.json").is_file(),
                              reason="stages/models/shipped/demo-clip is not trained yet (training/train.py)")
    return pytest.mark.slow(skip(fn))


def demo_threshold() -> float:
    """The threshold the demo build uses: demo/demo.yaml's align entry, else the model's recommended_threshold
    (training.json, written by training/train.py)."""
    from stages.models import training_card

    spec = yaml.safe_load((ROOT / "demo" / "demo.yaml").read_text())
    for entry in spec.get("stages") or []:
        if isinstance(entry, dict) and "align" in entry and (entry["align"] or {}).get("threshold") is not None:
            return float(entry["align"]["threshold"])
    t = training_card(str(DEMO_CLIP)).get("recommended_threshold")
    assert t is not None, "no default threshold: demo/demo.yaml sets none and demo-clip/training.json has none"
    return float(t)


@pytest.fixture(scope="module")
def demo_stage():
    stage = AlignStage(AlignParams(model="demo-clip"))
    stage.preflight()
    stage.setup()
    return stage


@needs_demo_clip
def test_demo_clip_true_caption_beats_wrong_and_retrieval(demo_stage):
    from demo.scenes import caption, render_scene, sample_scene

    rng = random.Random(2024_07)  # held out: the trainer draws its scenes from its own stream
    n = 1000
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [render_scene(s, 128, 10_000_000 + i) for i, s in enumerate(scenes)]
    texts = [caption(s, rng) for s in scenes]
    img_parts, txt_parts = [], []
    for s in range(0, n, 100):
        img, txt = demo_stage.clip.embed(images[s:s + 100], texts[s:s + 100])
        img_parts.append(img.numpy())
        txt_parts.append(txt.numpy())
    img, txt = np.concatenate(img_parts), np.concatenate(txt_parts)
    sim = img @ txt.T
    # a wrong caption: the next scene's whose caption text differs
    wrong = [next(j % n for j in range(i + 1, i + n) if texts[j % n] != texts[i]) for i in range(n)]
    wins = float(np.mean([sim[i, i] > sim[i, wrong[i]] for i in range(n)]))
    top1 = sim.argmax(1)
    r1 = float(np.mean([texts[top1[i]] == texts[i] for i in range(n)]))
    print(f"\ndemo-clip on {n} held-out scenes: true caption beats a wrong one for {wins:.1%}; "
          f"image->text R@1 among {n} captions = {r1:.1%} (chance {1 / n:.1%})")
    assert wins >= 0.95
    assert r1 > 10 / n


@needs_demo_clip
def test_demo_clip_threshold_on_demo_corpus(demo_stage, tmp_path):
    from demo.corpus import generate_corpus

    corpus = tmp_path / "corpus"
    generate_corpus(corpus, n=2000, seed=5)
    labels = pq.read_table(corpus / "labels.parquet").to_pylist()
    rows = [r for r in labels if r["fault"] in ("clean", "wrong_caption")]
    assert all(r["expected_stage"] == "align" and r["expected_reason"] == "low_alignment"
               for r in rows if r["fault"] == "wrong_caption")
    table = pair_table([(corpus / r["file"]).read_bytes() for r in rows], [r["caption"] for r in rows],
                       [r["uid"] for r in rows])
    out = demo_stage(table)
    t = demo_threshold()
    d = AlignStage.decide(out, AlignParams(threshold=t))
    wrong = [i for i, r in enumerate(rows) if r["fault"] == "wrong_caption"]
    clean = [i for i, r in enumerate(rows) if r["fault"] == "clean"]
    caught = np.mean([d.reason[i] == "low_alignment" for i in wrong])
    kept = np.mean([d.reason[i] is None for i in clean])
    s = out.column("clip_score").to_numpy(zero_copy_only=False)
    print(f"\ndemo corpus (n=2000, seed 5), threshold {t}: {caught:.1%} of {len(wrong)} wrong-caption pairs rejected, "
          f"{kept:.1%} of {len(clean)} clean pairs kept; clip_score clean median {np.median(s[clean]):.3f}, "
          f"wrong median {np.median(s[wrong]):.3f}")
    assert caught >= 0.90 and kept >= 0.90
