"""Model loading shared by the model stages: where a model lives, which device and dtype, loading a CLIP-like
dual encoder (CLIP, SigLIP, SigLIP 2 ...) and embedding image/text batches with it.

    resolve_device("auto", gpus)   cuda if torch sees one, else cpu. Inside a Ray worker, "auto" takes a GPU only
                                   when Ray assigned the actor one (gpus > 0): Ray then narrows CUDA_VISIBLE_DEVICES
                                   to that GPU, so it is cuda:0 here. A Ray actor with gpus: 0 stays on cpu even on a
                                   GPU machine, so GPUs Ray does not account for are never used behind its back.
                                   "cpu", "cuda", "cuda:1", "mps" are honoured; cuda where there is none ->
                                   StageConfigError.
    resolve_dtype("auto", device)  float16 on CUDA, float32 elsewhere; or float32 / float16 / bfloat16.
    locate_model(name)             an existing folder (absolute, relative to the repo root, or a name under
                                   stages/models/shipped/) -> its absolute path; anything else is taken as a hub id.
    check_loadable(name)           preflight: the folder has config.json, weights and processor files, or the hub id
                                   is in the local Hugging Face cache (HF_HUB_OFFLINE=1: nothing is fetched), and the
                                   config is a dual encoder this transformers knows. Time-boxed; StageConfigError
                                   "align: model 'x' cannot be loaded: <reason>".
    load_clip(name, device, dtype, threads)  -> ClipModel: AutoModel + AutoProcessor, eval mode, no grad.

`ClipModel.embed(images, texts)` runs ONE forward for a whole batch under torch.inference_mode() (no autograd
state, no dropout since the model is in eval mode) and returns L2-normalised float32 image and text embeddings.
It uses the model's forward outputs `image_embeds` / `text_embeds`, which are the projected embeddings for CLIP
and SigLIP (in transformers 5 `get_image_features` returns an output object, not a tensor). Text is truncated to
the model's positions; SigLIP text is padded to max_length, as SigLIP was trained (its docs say so); other models pad
to the longest caption in the batch. SigLIP's logit scale and bias do not matter: scores are cosines.

Threads: `torch.set_num_threads(threads)` is process-wide; a fixed count (default: the stage's cpus, at least 1)
makes CPU results repeatable run to run. Scores can differ in the last float32 bits between different batchings
(BLAS blocking depends on shapes), never between two runs of the same batch.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.base import StageConfigError

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = Path(__file__).resolve().parent / "shipped"  # model folders that ship with pairforge

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


# --------------------------------------------------------------------------- device, dtype, threads

def in_ray_worker() -> bool:
    """True inside a Ray task or actor (never imports ray itself)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        ctx = ray.get_runtime_context()
        return ctx.worker.mode == ray._private.worker.WORKER_MODE
    except Exception:
        return False


def ray_gpu_ids() -> list:
    ray = sys.modules.get("ray")
    try:
        return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
    except Exception:
        return []


def resolve_device(device: str = "auto", gpus: float = 0, *, stage: str = "align", in_ray: bool | None = None):
    """The torch.device a model should run on (see the module docstring). in_ray: answer as inside a Ray actor
    given `gpus` (the driver describing its actors); None detects it."""
    import torch

    device = (device or "auto").strip().lower()
    if not _DEVICE.match(device):
        raise StageConfigError(f"{stage}: device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if in_ray is None and in_ray_worker():
            # Ray narrowed CUDA_VISIBLE_DEVICES to the GPUs it assigned: the first visible one is ours.
            return torch.device("cuda:0") if (gpus and ray_gpu_ids()) else torch.device("cpu")
        if in_ray:
            return torch.device("cuda:0") if gpus else torch.device("cpu")
        return torch.device("cuda:0")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StageConfigError(f"{stage}: device {device!r} asked for, but torch sees no CUDA device here")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise StageConfigError(f"{stage}: device {device!r} asked for, but torch sees only "
                                   f"{torch.cuda.device_count()} CUDA device(s)")
        return torch.device(f"cuda:{index}")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise StageConfigError(f"{stage}: device 'mps' asked for, but torch sees no MPS device here")
    return torch.device(device)


def resolve_dtype(dtype: str, device) -> "Any":
    import torch

    dtype = (dtype or "auto").strip().lower()
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise StageConfigError(f"dtype {dtype!r} is not one of auto, float32, float16, bfloat16")
    return table[dtype]


def resolve_threads(threads: int | None, cpus: float | None) -> int:
    """Torch CPU threads: the explicit count, else the stage's cpus rounded down (at least 1)."""
    if threads:
        return int(threads)
    return max(1, math.floor(cpus or 1))


def set_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- where a model lives

def locate_model(name: str) -> str:
    """An existing folder -> its absolute path (tried: as given, relative to the repo root, under stages/models/shipped/);
    otherwise the name itself, taken as a hub id."""
    p = Path(name).expanduser()
    cands = [p] if p.is_absolute() else [ROOT / p, MODELS_DIR / p]
    for c in cands:
        if c.is_dir():
            return str(c.resolve())
    return name


def is_local(location: str) -> bool:
    return Path(location).is_absolute() and Path(location).is_dir()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looked_in(name: str) -> str:
    p = Path(name).expanduser()
    if p.is_absolute():
        return str(p)
    return f"{ROOT / p}, {MODELS_DIR / p}"


def _fail(stage: str, name: str, reason: str) -> StageConfigError:
    return StageConfigError(f"{stage}: model {name!r} cannot be loaded: {reason}")


def _check_folder(folder: Path) -> str | None:
    """The first missing piece of a local model folder, or None."""
    if not (folder / "config.json").is_file():
        return f"folder {folder} has no config.json"
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        return f"folder {folder} has no weights ({', '.join(WEIGHT_FILES[::2])})"
    if not any((folder / f).is_file() for f in PROCESSOR_FILES):
        return f"folder {folder} has no image processor ({' or '.join(PROCESSOR_FILES)})"
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return f"folder {folder} has no tokenizer files"
    return None


def _hub_cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(repo, filename)
    return got if isinstance(got, str) else None


def _run_with_timeout(fn, timeout_s: float):
    """fn() in a daemon thread; (result, error) or raises TimeoutError. A stuck thread is abandoned, not killed."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # reported to the caller
            box["error"] = e

    th = threading.Thread(target=target, name="check-loadable", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box.get("result")


def check_loadable(name: str, *, stage: str = "align", timeout_s: float = 8.0) -> str:
    """Preflight: StageConfigError unless `name` can be loaded as a dual encoder here. Returns its location.

    Nothing heavy is loaded: a local folder must hold config.json, weights, processor and tokenizer files; a hub id
    must have its config (and, offline, its weights) in the local Hugging Face cache. The config is then parsed by
    transformers.AutoConfig within `timeout_s` (the time box guards against a slow hub, not the import)."""
    if not name or not str(name).strip():
        raise _fail(stage, str(name), "no model name given")
    location = locate_model(name)
    if is_local(location):
        missing = _check_folder(Path(location))
        if missing:
            raise _fail(stage, name, missing)
    else:
        p = Path(name).expanduser()
        if p.is_absolute() or name.startswith((".", "~")) or not _HUB_ID.match(name):
            raise _fail(stage, name, f"no such folder (looked in {_looked_in(name)})")
        cached = _hub_cached(name, "config.json")
        if cached is None and _offline():
            raise _fail(stage, name, f"no folder of that name (looked in {_looked_in(name)}) and not in the local "
                                     "Hugging Face cache (HF_HUB_OFFLINE=1, so nothing is downloaded)")
        if _offline() and not any(_hub_cached(name, f) for f in WEIGHT_FILES):
            raise _fail(stage, name, "its config is in the local Hugging Face cache but its weights are not "
                                     "(HF_HUB_OFFLINE=1, so nothing is downloaded)")

    from transformers import AutoConfig  # imported outside the time box: on a loaded machine this alone takes s

    try:
        config = _run_with_timeout(lambda: AutoConfig.from_pretrained(location), timeout_s)
    except TimeoutError:
        raise _fail(stage, name, f"its config did not load within {timeout_s:g} s (hub unreachable? set "
                                 "HF_HUB_OFFLINE=1 to use only the local cache)") from None
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(stage, name, f"{type(e).__name__}: {msg}") from None
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise _fail(stage, name, f"model_type {getattr(config, 'model_type', '?')!r} is not an image-text dual "
                                 "encoder (its config has no text_config and vision_config)")
    return location


# --------------------------------------------------------------------------- what a build records

_DIGESTS: dict = {}


def weights_sha256(folder: str | Path) -> str | None:
    """sha256 over the folder's weight files (all shards, in name order); cached per (path, size, mtime)."""
    folder = Path(folder)
    files = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            files = [folder / s for s in shards]
            break
    else:
        for f in ("model.safetensors", "pytorch_model.bin"):
            if (folder / f).is_file():
                files = [folder / f]
                break
    if not files:
        return None
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def training_card(location: str) -> dict:
    """training.json of a local model folder written by flows/training/train.py ({} when absent or unreadable)."""
    path = Path(location) / "training.json"
    if not (is_local(location) and path.is_file()):
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def config_summary(location: str) -> dict:
    """model_type, embedding dim and hub revision from config.json alone (no transformers import)."""
    if is_local(location):
        path = Path(location) / "config.json"
    else:
        cached = _hub_cached(location, "config.json")
        path = Path(cached) if cached else None
    if path is None or not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    out = {"model_type": cfg.get("model_type")}
    dim = cfg.get("projection_dim")
    if dim is None:  # SigLIP: the pooled text/vision width is the embedding
        dim = (cfg.get("text_config") or {}).get("projection_size") or (cfg.get("text_config") or {}).get("hidden_size")
    out["embedding_dim"] = dim
    if not is_local(location):
        parts = path.parts
        if "snapshots" in parts:
            out["revision"] = parts[parts.index("snapshots") + 1]
    return out


# --------------------------------------------------------------------------- loading and embedding

@dataclass
class ClipModel:
    name: str
    location: str
    model: Any
    processor: Any
    device: Any
    dtype: Any
    threads: int
    model_type: str
    embedding_dim: int
    text_max_length: int
    text_padding: str
    _forward_args: set = field(default_factory=set)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    def preprocess(self, images: list, texts: list[str]) -> dict:
        """Processor and tokenizer over the whole batch at once -> model inputs (on the CPU)."""
        px = self.image_processor(images=images, return_tensors="pt")
        tx = self.tokenizer([t or "" for t in texts], padding=self.text_padding, truncation=True,
                            max_length=self.text_max_length, return_tensors="pt")
        inputs = {**px, **tx}
        return {k: v for k, v in inputs.items() if k in self._forward_args}

    def forward(self, inputs: dict):
        """One forward pass -> (image_emb, text_emb), float32, L2-normalised, on the CPU."""
        import torch

        moved = {}
        for k, v in inputs.items():
            v = v.to(self.device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(self.dtype)
            moved[k] = v
        with torch.inference_mode():
            out = self.model(**moved, return_dict=True)
            img = out.image_embeds.float()
            txt = out.text_embeds.float()
            img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return img.cpu(), txt.cpu()

    def embed(self, images: list, texts: list[str]):
        """PIL RGB images and captions (same length) -> (image_emb, text_emb) as float32 [n, dim] tensors."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        set_threads(self.threads)
        return self.forward(self.preprocess(images, texts))


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. "requires torchvision ... falling back to the PIL backend"
    hf_logging.disable_progress_bar()  # "Loading weights" bars, per actor


def load_clip(name: str, device: str = "auto", dtype: str = "auto", *, threads: int | None = None,
              gpus: float = 0, stage: str = "align") -> ClipModel:
    """Load a CLIP-like dual encoder by folder or hub id (see locate_model) for inference."""
    import torch
    from transformers import AutoModel, AutoProcessor

    dev = resolve_device(device, gpus, stage=stage)
    dt = resolve_dtype(dtype, dev)
    n_threads = resolve_threads(threads, 1)
    set_threads(n_threads)
    location = locate_model(name)
    _quiet_transformers()
    try:
        model = AutoModel.from_pretrained(location, dtype=dt)
        processor = AutoProcessor.from_pretrained(location)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(stage, name, f"{type(e).__name__}: {msg}") from None
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise _fail(stage, name, f"its processor {type(processor).__name__} has no tokenizer and image processor")
    model.eval()
    model.to(dev)
    cfg = model.config
    model_type = getattr(cfg, "model_type", "")
    tcfg = cfg.text_config
    positions = getattr(tcfg, "max_position_embeddings", None) or 77
    tok_max = getattr(processor.tokenizer, "model_max_length", None) or positions
    max_len = int(min(positions, tok_max))
    siglip = model_type.startswith("siglip")
    dim = getattr(cfg, "projection_dim", None) or getattr(tcfg, "projection_size", None) or tcfg.hidden_size
    torch.manual_seed(0)  # nothing random runs in eval mode; this only pins anything that might
    return ClipModel(
        name=name, location=location, model=model, processor=processor, device=dev, dtype=dt, threads=n_threads,
        model_type=model_type, embedding_dim=int(dim), text_max_length=max_len,
        text_padding="max_length" if siglip else "longest",
        _forward_args=set(inspect.signature(model.forward).parameters),
    )


def decode_rgb(data: bytes | None):
    """Image bytes -> an RGB PIL image (transparency composited on white), or None if it does not decode."""
    from stages.imaging.decode import decode_image, pil

    arr = decode_image(data)[0]
    return None if arr is None else pil(arr)
