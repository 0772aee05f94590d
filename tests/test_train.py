"""The trainer: spec errors, the shard loader, a tiny run (loss, checkpoints, exact resume, seeds, reload) and the
shipped demo scorer (hash, reload, true caption beats a wrong one on fresh scenes)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from demo.train_data import write_scene_shards
from loaders.pairs import ShardPairs, resolve_shards
from training.train import TrainError, file_sha256, train
from schemas.spec import SpecError
from schemas.train_spec import load_train_spec, parse_train_spec
from stages.models import MODELS_DIR

ROOT = Path(__file__).resolve().parents[1]
DEMO_CLIP = MODELS_DIR / "demo-clip"
STEPS = 30


def tiny_spec(shards: Path, out: Path, **over) -> dict:
    d = {
        "name": "tiny",
        "data": {"shards": [str(shards)], "eval_fraction": 0.1, "shuffle_buffer": 64},
        "model": {"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1, "vision_heads": 2,
                  "text_width": 32, "text_layers": 1, "text_heads": 2, "projection_dim": 16, "max_text_length": 104},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "steps": STEPS, "batch_size": 16},
        "augment": {"crop_min_area": 0.85},
        "seed": 3,
        "threads": 1,
        "checkpoint_every": 10,
        "log_every": 1,
        "out": str(out),
    }
    for k, v in over.items():
        d[k] = d[k] | v if isinstance(v, dict) and k in d else v
    return d


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train") / "shards"
    write_scene_shards(d, 300, seed=0, image_size=[32, 48], rows_per_shard=128)
    return d


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict:
    """A: uninterrupted; B: the same spec stopped after 12 steps, then resumed; C: A again in another folder."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("A", "B", "C"):
        spec = parse_train_spec(tiny_spec(shards, base / name))
        if name == "B":
            first = train(spec, stop_after=12)
            assert first["status"] == "stopped" and first["step"] == 12
            out["B_checkpoints_at_stop"] = sorted(p.name for p in (base / name / "checkpoints").glob("step-*"))
            out["B_metrics_at_stop"] = metrics(base / name)
        out[name] = train(spec)
        out[name + "_dir"] = base / name
    return out


# --------------------------------------------------------------------------- spec and loader

def test_spec_errors_name_the_field(tmp_path, shards):
    def load(d):
        p = tmp_path / "t.yaml"
        p.write_text(yaml.safe_dump(d))
        return load_train_spec(p)

    good = tiny_spec(shards, tmp_path / "o")
    assert load(good).optim.steps == STEPS
    for bad, field in [
        (good | {"loss": "nope"}, "loss"),
        (good | {"optim": good["optim"] | {"lrr": 1}}, "optim.lrr"),
        (good | {"optim": good["optim"] | {"warmup_steps": 99}}, "warmup_steps"),
        (good | {"model": good["model"] | {"image_size": 30}}, "patch_size"),
        (good | {"data": {"eval_fraction": 0.1}}, "data.shards"),
    ]:
        with pytest.raises(SpecError) as e:
            load(bad)
        assert "t.yaml" in str(e.value) and field in str(e.value), str(e.value)


def test_shards_in_object_storage_stay_uris(tmp_path):
    """A relative shard folder resolves against the spec's folder; an s3:// one (schemas.spec.is_uri) is kept."""
    spec = tiny_spec(Path("scenes"), tmp_path / "o")
    spec["data"] = spec["data"] | {"shards": ["scenes", "s3://bucket/builds/ds/b1/shards"],
                                   "hard_negatives": ["s3://bucket/builds/ds/b1/negatives"]}
    got = parse_train_spec(spec, base_dir=tmp_path)
    assert got.data.shards == [str(tmp_path / "scenes"), "s3://bucket/builds/ds/b1/shards"]
    assert got.data.hard_negatives == ["s3://bucket/builds/ds/b1/negatives"]


def test_loader_is_seeded_splits_by_uid_and_skips(shards):
    files = resolve_shards([shards])
    assert len(files) == 3

    def uids(**kw):
        return [it["uid"] for it in ShardPairs(files, eval_fraction=0.1, epochs=1, **kw)]

    a, b = uids(seed=1), uids(seed=1)
    assert a == b and len(a) == len(set(a))
    assert uids(seed=2) != a and sorted(uids(seed=2)) == sorted(a)
    ev = uids(seed=1, split="eval")
    assert ev and not set(ev) & set(a) and len(a) + len(ev) == 300
    assert uids(seed=1, start=37) == a[37:]  # a resumed stream continues where it stopped
    item = next(iter(ShardPairs(files)))
    assert item["image"].mode == "RGB" and isinstance(item["text"], str)


# --------------------------------------------------------------------------- the tiny run

def test_loss_goes_down_and_checkpoints_are_written(runs):
    m = metrics(runs["A_dir"])
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    first, last = [r["loss"] for r in m[:5]], [r["loss"] for r in m[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 0.2, (first, last)
    ckpts = sorted(p.name for p in (runs["A_dir"] / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000020", f"step-{STEPS:07d}"]  # keep_checkpoints=2
    assert runs["B_checkpoints_at_stop"][-1] == "step-0000012"
    # safetensors + JSON, nothing pickled
    assert sorted(p.name for p in (runs["A_dir"] / "checkpoints" / ckpts[-1]).iterdir()) == ["state.json",
                                                                                            "state.safetensors"]


def test_resume_continues_with_identical_losses_and_weights(runs):
    a, b = metrics(runs["A_dir"]), metrics(runs["B_dir"])
    assert [r["step"] for r in runs["B_metrics_at_stop"]] == list(range(1, 13))
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert b[12]["loss"] == a[12]["loss"]  # step 13, the first after resuming
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    wa, wb = weights(runs["A_dir"]), weights(runs["B_dir"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_same_seed_same_weights_other_seed_other_weights(runs, shards, tmp_path):
    wa, wc = weights(runs["A_dir"]), weights(runs["C_dir"])
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    spec = parse_train_spec(tiny_spec(shards, tmp_path / "D", seed=4, optim={"steps": 4, "warmup_steps": 1}))
    train(spec)
    wd = weights(tmp_path / "D")
    assert not torch.equal(wa["text_projection.weight"], wd["text_projection.weight"])


def test_saved_model_reloads_with_auto_classes(runs):
    from transformers import AutoModel, AutoProcessor
    from PIL import Image

    folder = runs["A_dir"] / "model"
    model = AutoModel.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    assert proc.image_processor.crop_size["height"] == 32
    inputs = proc(text=["a red circle", "two small blue squares above a green star"],
                  images=[Image.new("RGB", (100, 80), (200, 20, 20))] * 2, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_embeds.shape == (2, 16) and out.text_embeds.shape == (2, 16)
    info = json.loads((folder / "training.json").read_text())
    assert info["steps"] == STEPS and info["model_sha256"] == file_sha256(folder / "model.safetensors")
    assert set(info["heldout"]) >= {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "pairwise_acc"}
    assert (runs["A_dir"] / "metrics.jsonl").exists() and (folder / "TRAINING.md").exists()


def test_checkpoints_of_another_spec_are_not_resumed(runs, shards):
    spec = parse_train_spec(tiny_spec(shards, runs["A_dir"], optim={"lr": 1e-3}))
    with pytest.raises(TrainError, match="another training spec"):
        train(spec)


def test_a_pickled_checkpoint_is_never_loaded(shards, tmp_path):
    """A step-*.pt from an older version (or anyone) is refused, not unpickled: unpickling runs the file's code."""
    import pickle

    spec = parse_train_spec(tiny_spec(shards, tmp_path / "P"))
    (tmp_path / "P" / "checkpoints").mkdir(parents=True)

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / "P" / "checkpoints" / "step-0000005.pt").write_bytes(pickle.dumps({"step": 5, "x": Boom()}))
    with pytest.raises(TrainError, match="pickled checkpoint .* not loaded"):
        train(spec)
    assert not (tmp_path / "ran").exists()


def test_cli_has_train():
    from flows.cli import cmd_train, parser

    args = parser().parse_args(["train", "demo/train_demo.yaml", "--fresh"])
    assert args.fn is cmd_train and args.fresh
    spec = load_train_spec(ROOT / "demo" / "train_demo.yaml")
    assert spec.export == DEMO_CLIP and spec.loss == "clip"


# --------------------------------------------------------------------------- the shipped demo scorer

def test_shipped_demo_clip_reloads_and_scores_fresh_scenes():
    from demo.scorer_eval import evaluate_scorer

    info = json.loads((DEMO_CLIP / "training.json").read_text())
    assert file_sha256(DEMO_CLIP / "model.safetensors") == info["model_sha256"]
    assert (DEMO_CLIP / "model.safetensors").stat().st_size < 10 * 2**20
    assert -1 < info["recommended_threshold"] < 1
    r = evaluate_scorer(DEMO_CLIP, n=200, seed=123_457, near_dups=False, real_photos=False)
    assert r["pairwise_acc"] >= 0.95, r["markdown"]
    assert r["wrong_caption_acc"] >= 0.95, r["markdown"]
    assert not math.isnan(r["recommended_threshold"])


def test_word_tokenizer_is_fitted_deterministic_and_reloads(shards, tmp_path):
    """model.tokenizer 'word': fitted on the training captions, same ids for the same texts, unknown words -> <unk>,
    eos (pooling position) 1 not CLIP's legacy 2; a model trained with it reloads with AutoProcessor and pools at
    the caption's end."""
    from transformers import AutoModel, AutoProcessor

    from training.train import word_tokenizer

    texts = ["a large red circle to the left of two small blue squares", "A red star.", "two red stars"]
    tok = word_tokenizer(texts, max_length=8)
    again = word_tokenizer(list(reversed(texts)), max_length=8)
    assert tok.get_vocab() == again.get_vocab()
    ids = tok(["a red circle", "A RED zebra"], padding=True, truncation=True)["input_ids"]
    v = tok.get_vocab()
    assert ids[0] == [0, v["a"], v["red"], v["circle"], 1] and ids[1] == [0, v["a"], v["red"], 2, 1]
    assert v["red"] == 3  # the most frequent word first
    long = tok(" ".join(["red"] * 20), truncation=True)["input_ids"]
    assert len(long) == 8 and long[-1] == 1
    spec = parse_train_spec(tiny_spec(shards, tmp_path / "w", model={"tokenizer": "word", "max_text_length": 24},
                                      optim={"steps": 4, "warmup_steps": 1}))
    res = train(spec)
    folder = Path(res["model_dir"])
    proc = AutoProcessor.from_pretrained(folder)
    vocab = proc.tokenizer.get_vocab()
    assert {"circle", "left", "squares"} <= set(vocab) and proc.tokenizer.eos_token_id == 1
    model = AutoModel.from_pretrained(folder).eval()
    enc = proc.tokenizer(["a red circle", "a red circle above a blue star"], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model.get_text_features(**enc)
        alone = model.get_text_features(**proc.tokenizer(["a red circle"], return_tensors="pt"))
    feats = padded if isinstance(padded, torch.Tensor) else padded.pooler_output
    one = alone if isinstance(alone, torch.Tensor) else alone.pooler_output
    assert torch.allclose(feats[0], one[0], atol=1e-5)  # padding does not change the pooled caption
