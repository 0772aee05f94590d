"""CLIP and SigLIP at their published sizes with random weights: throughput work needs no trained weights.

    SIZES                          name -> the published architecture
        clip-vit-b-32              openai/clip-vit-base-patch32: vision 768 wide, 12 layers, patch 32, 224 px;
                                   text 512 wide, 12 layers, 77 positions; projection 512 (~151M parameters)
        clip-vit-l-14              openai/clip-vit-large-patch14: vision 1024, 24 layers, patch 14, 224 px;
                                   text 768, 12 layers; projection 768 (~428M)
        siglip-b-16                google/siglip-base-patch16-224: vision 768, 12 layers, patch 16, 224 px;
                                   text 768, 12 layers, 64 positions (~203M)
    sized_model(name)              the folder <cache>/models/random-<name> (cache: $PAIRFORGE_CACHE or
                                   ~/.cache/pairforge), built once with save_pretrained, then reused
    "random-<name>"                usable as a model path in a spec (align.model, recaption.score_model ...):
                                   stages.models.locate_model resolves it to that folder, building it on first use

The architecture (widths, depths, heads, patch, positions, vocabulary size), the image processor (resize, crop,
mean/std, bicubic) and the text padding are the published ones; the weights are random (the same arithmetic,
meaningless scores). The CLIP tokenizer is character-level (GPT-2's byte alphabet, no merges, as the demo model's):
a caption takes about four times as many tokens as with CLIP's BPE, so batches pad near the 77-token cap, the
text tower's longest case. SigLIP's tokenizer (a GemmaTokenizer over a character vocabulary; SiglipTokenizer needs
sentencepiece) pads to 64 tokens as SigLIP does, so its text cost is the published one.

The folder is written into a temporary sibling and renamed, under an fcntl lock: actors that start at once build
it once, and a killed build leaves no half folder. Weights are saved in float32 like the published checkpoints.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from stages.models.lm import cache_root

PREFIX = "random-"
MARKER = "pairforge_random.json"
FORMAT = 1  # bump when what is written changes

SIZES: dict[str, dict] = {
    "clip-vit-b-32": dict(family="clip", image_size=224, patch_size=32,
                          vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12),
                          text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                    num_attention_heads=8, max_position_embeddings=77, vocab_size=49408),
                          projection_dim=512, published_params=151_277_313),
    "clip-vit-l-14": dict(family="clip", image_size=224, patch_size=14,
                          vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16),
                          text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, max_position_embeddings=77, vocab_size=49408),
                          projection_dim=768, published_params=427_616_513),
    "siglip-b-16": dict(family="siglip", image_size=224, patch_size=16,
                        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12),
                        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=64, vocab_size=32000),
                        projection_dim=None, published_params=203_160_000),  # "203M" on its card
}


def is_sized_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX) and name[len(PREFIX):] in SIZES


def _size(name: str) -> tuple[str, dict]:
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if key not in SIZES:
        raise KeyError(f"unknown model size {name!r}; known: {sorted(SIZES)} (as a model path: {PREFIX}<size>)")
    return key, SIZES[key]


def folder_of(name: str) -> Path:
    key, _ = _size(name)
    return cache_root() / "models" / f"{PREFIX}{key}"


# --------------------------------------------------------------------------- tokenizers and configs

def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable-character table (what CLIP's byte-level BPE starts from)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def clip_char_tokenizer(max_length: int = 77):
    """A CLIPTokenizer with no merges: every byte-level character is a token, word-final ones with '</w>'."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in _byte_alphabet():
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def siglip_char_tokenizer(max_length: int = 64):
    """A GemmaTokenizer over byte-fallback tokens and single characters, right padding, eos appended (as SigLIP)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&":
        vocab.setdefault(ch, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], padding_side="right", add_bos_token=False, add_eos_token=True,
                          model_max_length=max_length)


def sized_config(name: str):
    """The transformers config (CLIPConfig or SiglipConfig) of a size, with the tokenizer's special token ids."""
    from transformers import CLIPConfig, SiglipConfig

    _, s = _size(name)
    vision = dict(s["vision"], image_size=s["image_size"], patch_size=s["patch_size"])
    if s["family"] == "clip":
        text = dict(s["text"], bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=s["projection_dim"])
    text = dict(s["text"], pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return SiglipConfig(text_config=text, vision_config=vision)


def sized_processor(name: str):
    _, s = _size(name)
    side = s["image_size"]
    if s["family"] == "clip":
        from transformers import CLIPImageProcessor, CLIPProcessor

        images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return CLIPProcessor(image_processor=images,
                             tokenizer=clip_char_tokenizer(s["text"]["max_position_embeddings"]))
    from transformers import SiglipImageProcessor, SiglipProcessor

    images = SiglipImageProcessor(size={"height": side, "width": side})
    return SiglipProcessor(image_processor=images, tokenizer=siglip_char_tokenizer(s["text"]["max_position_embeddings"]))


def model_class(name: str):
    from transformers import CLIPModel, SiglipModel

    return CLIPModel if _size(name)[1]["family"] == "clip" else SiglipModel


def parameter_count(name: str) -> int:
    """Parameters of the architecture, counted on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        model = model_class(name)(sized_config(name))
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the cached folder

def _complete(folder: Path, key: str) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("size") == key and marker.get("format") == FORMAT and (folder / "model.safetensors").is_file()


def sized_model(name: str, seed: int = 0) -> Path:
    """The folder of a size's random model, built on first call (see the module docstring)."""
    import torch

    key, s = _size(name)
    folder = folder_of(key)
    if _complete(folder, key):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(folder, key):  # another process built it while this one waited
            return folder
        from stages.models import quiet_transformers

        quiet_transformers()
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(seed)
        model = model_class(key)(sized_config(key)).eval()
        model.save_pretrained(tmp)
        sized_processor(key).save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        (tmp / MARKER).write_text(json.dumps({"size": key, "format": FORMAT, "seed": seed, "parameters": params,
                                              "published_parameters": s["published_params"],
                                              "weights": "random (torch.manual_seed(seed), the model's own init)"},
                                             indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:] or sorted(SIZES):
        print(sized_model(arg))
