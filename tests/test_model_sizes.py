"""CLIP ViT-B/32 and ViT-L/14 and SigLIP B/16 at their published sizes with random weights (stages.models.sizes)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from schemas.spec import parse_spec

from stages.align import AlignParams
from stages.models.sizes import SIZES, folder_of, parameter_count, sized_config, sized_model, sized_processor


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes_are_the_published_architectures(name):
    """Parameter counts (on the meta device: no memory) match the published checkpoints': exactly for OpenAI's CLIPs
    (151,277,313 and 427,616,513), within 0.01% for SigLIP (its card says 203M)."""
    count = parameter_count(name)
    assert math.isclose(count, SIZES[name]["published_params"], rel_tol=1e-4), count
    cfg, proc = sized_config(name), sized_processor(name)
    want = {"clip-vit-b-32": (768, 12, 32, 512, 12, 77), "clip-vit-l-14": (1024, 24, 14, 768, 12, 77),
            "siglip-b-16": (768, 12, 16, 768, 12, 64)}[name]
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, t.hidden_size, t.num_hidden_layers,
            t.max_position_embeddings) == want
    assert v.image_size == 224
    px = proc.image_processor(images=[np.zeros((300, 200, 3), np.uint8)], return_tensors="np")["pixel_values"]
    assert px.shape == (1, 3, 224, 224)
    ids = proc.tokenizer(["a photo of a cat"] * 2, padding="max_length" if name.startswith("siglip") else "longest",
                         max_length=t.max_position_embeddings, truncation=True)["input_ids"]
    assert max(max(row) for row in ids) < t.vocab_size


def test_a_random_size_is_a_model_path_in_a_spec(tmp_path, monkeypatch):
    """`random-clip-vit-b-32` in a spec: built once into the cache on preflight, then scored with like any folder."""
    import flows.build
    from stages.align import AlignStage
    from tests.test_align import pair_table, scene_pairs

    monkeypatch.setenv("PAIRFORGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "u.csv").write_text("url,caption\nhttp://example.com/a.jpg,a red circle\n")
    spec = parse_spec({"dataset": "t", "source": {"urls": "u.csv"},
                       "stages": [{"align": {"model": "random-clip-vit-b-32", "batch_size": 2}}]}, tmp_path)
    meta = flows.build.preflight(spec)["align"]
    folder = folder_of("clip-vit-b-32")
    assert meta["location"] == str(folder) and meta["local"] is True
    assert meta["model_type"] == "clip" and meta["embedding_dim"] == 512 and len(meta["weights_sha256"]) == 64
    built = (folder / "model.safetensors").stat().st_mtime_ns
    assert sized_model("random-clip-vit-b-32") == folder  # reused, not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == built
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]

    images, texts = scene_pairs(3, seed=5)
    out = AlignStage(AlignParams(model="random-clip-vit-b-32", batch_size=2, threads=1))(pair_table(images, texts))
    scores = out.column("clip_score").to_numpy()
    assert np.isfinite(scores).all() and (np.abs(scores) <= 1).all()
    assert len(out.column("image_emb")[0].as_py()) == 512


def test_unknown_size_is_not_built(tmp_path, monkeypatch):
    from stages.base import StageConfigError
    from stages.models import check_loadable

    monkeypatch.setenv("PAIRFORGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(StageConfigError, match="random-clip-vit-h-99"):
        check_loadable("random-clip-vit-h-99")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(KeyError, match="unknown model size"):
        sized_model("random-clip-vit-h-99")
