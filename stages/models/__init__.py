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
                                   stages/models/shipped/) -> its absolute path; "random-clip-vit-b-32" and the other
                                   published sizes of stages.models.sizes -> their cached random-weight folder;
                                   anything else is taken as a hub id.
    check_loadable(name)           preflight: the folder has config.json, weights and processor files, or the hub id
                                   is in the local Hugging Face cache (HF_HUB_OFFLINE=1: nothing is fetched), and the
                                   config is a dual encoder this transformers knows. Time-boxed; StageConfigError
                                   "align: model 'x' cannot be loaded: <reason>".
    load_clip(name, device, dtype, threads)  -> ClipModel: AutoModel + AutoProcessor, eval mode, no grad.
    load_pixel_prep(name)          the processor's image half alone (PixelPrep), for CPU workers: no weights.

Feeding a model (PixelPrep, pixel_column / pixel_rows): CPU workers resize and crop into uint8 [3, H, W] per row,
handed over as an Arrow fixed_shape_tensor column; the model's process copies them (pinned, non_blocking on CUDA)
and rescales and normalises them on the device. `ClipModel.embed_pixels` queues a batch's forwards back to back
and copies the embeddings back once.

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
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
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
    "random-<size>" (stages.models.sizes) -> its cached folder, built on first use; otherwise the name itself,
    taken as a hub id."""
    p = Path(name).expanduser()
    cands = [p] if p.is_absolute() else [ROOT / p, MODELS_DIR / p]
    for c in cands:
        if c.is_dir():
            return str(c.resolve())
    from stages.models.sizes import is_sized_name, sized_model

    if is_sized_name(name):
        return str(sized_model(name))
    return name


def is_local(location: str) -> bool:
    return Path(location).is_absolute() and Path(location).is_dir()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looked_in(name: str) -> str:
    p = Path(name).expanduser()
    if p.is_absolute():
        return str(p)
    return f"{ROOT / p}, {MODELS_DIR / p}"


MODEL_HINT = ("give a local model folder, or put the hub id's files in the local Hugging Face cache first (README: "
              "\"Real CLIP and SigLIP weights\")")


def model_error(stage: str, name: str, reason: str) -> StageConfigError:
    """A model a stage cannot load, and how to make it loadable."""
    return StageConfigError(f"{stage}: model {name!r} cannot be loaded: {reason}", hint=MODEL_HINT)


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


def hub_cached(repo: str, filename: str) -> str | None:
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
        raise model_error(stage, str(name), "no model name given")
    location = locate_model(name)
    if is_local(location):
        missing = _check_folder(Path(location))
        if missing:
            raise model_error(stage, name, missing)
    else:
        p = Path(name).expanduser()
        if p.is_absolute() or name.startswith((".", "~")) or not HUB_ID.match(name):
            raise model_error(stage, name, f"no such folder (looked in {_looked_in(name)})")
        cached = hub_cached(name, "config.json")
        if cached is None and hub_offline():
            raise model_error(stage, name, f"no folder of that name (looked in {_looked_in(name)}) and not in the local "
                                     "Hugging Face cache (HF_HUB_OFFLINE=1, so nothing is downloaded)")
        if hub_offline() and not any(hub_cached(name, f) for f in WEIGHT_FILES):
            raise model_error(stage, name, "its config is in the local Hugging Face cache but its weights are not "
                                     "(HF_HUB_OFFLINE=1, so nothing is downloaded)")

    from transformers import AutoConfig  # imported outside the time box: on a loaded machine this alone takes s

    try:
        config = _run_with_timeout(lambda: AutoConfig.from_pretrained(location), timeout_s)
    except TimeoutError:
        raise model_error(stage, name, f"its config did not load within {timeout_s:g} s (hub unreachable? set "
                                 "HF_HUB_OFFLINE=1 to use only the local cache)") from None
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise model_error(stage, name, f"{type(e).__name__}: {msg}") from None
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise model_error(stage, name, f"model_type {getattr(config, 'model_type', '?')!r} is not an image-text dual "
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
    """training.json of a local model folder written by training/train.py ({} when absent or unreadable)."""
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
        cached = hub_cached(location, "config.json")
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

class PixelPrep:
    """The image half of a CLIP-like processor, cut in two so the costly half can run on CPU workers ahead of the
    model:

        pixels(images)   PIL RGB images -> the processor's resize and crop, without rescale and normalise:
                         uint8 [n, 3, H, W] (a quarter of float32's bytes to ship between processes and to copy
                         to a GPU).
        to_model(t, device, dtype)  moves the tensor (non_blocking: from pinned memory on CUDA it overlaps), then
                         applies the processor's rescale and mean/std there, in float32, then casts to dtype.

    The result matches the processor's own float32 output to float rounding (5e-7 on CLIP's). A probe image run
    once through the processor fixes the mode: "uint8" as above; "float32" (the whole processor on the CPU;
    to_model only moves and casts) for processors without rescale/normalise settings or whose resize gives other
    than whole numbers in 0..255; None when it gives more than pixel_values (SigLIP 2's NaFlex patches, say):
    such models take the whole processor in the model's process. `shape` is one row's [3, H, W]."""

    SETTINGS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")

    def __init__(self, image_processor):
        import numpy as np
        from PIL import Image

        self.processor = image_processor
        self._stats: dict = {}
        probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
        self.mode, self.shape = None, None
        if all(getattr(image_processor, a, None) is not None for a in self.SETTINGS):
            px = self._raw([probe])
            if px is not None and px.min() >= 0 and px.max() <= 255 and np.array_equal(px, np.rint(px)):
                self.mode, self.shape = "uint8", tuple(px.shape[1:])
        if self.mode is None:
            px = self._full([probe])
            if px is not None:
                self.mode, self.shape = "float32", tuple(px.shape[1:])

    def _raw(self, images):
        out = self.processor(images=images, do_rescale=False, do_normalize=False, return_tensors="np")
        return out["pixel_values"] if set(out.keys()) == {"pixel_values"} else None

    def _full(self, images):
        import numpy as np

        out = self.processor(images=images, return_tensors="np")
        return np.asarray(out["pixel_values"], np.float32) if set(out.keys()) == {"pixel_values"} else None

    @property
    def dtype(self):
        import numpy as np

        return np.dtype(self.mode) if self.mode else None

    def pixels(self, images: list):
        """-> [n, *shape] of self.dtype; None when this processor cannot be split (mode None)."""
        import numpy as np

        if self.mode is None:
            return None
        if not images:
            return np.zeros((0, *self.shape), self.dtype)
        if self.mode == "float32":
            return self._full(images)
        px = np.asarray(self._raw(images))
        return px if px.dtype == np.uint8 else np.clip(np.rint(px), 0, 255).astype(np.uint8)

    def _mean_std(self, device):
        import torch

        key = str(device)
        if key not in self._stats:
            ip = self.processor
            mean = torch.tensor(list(ip.image_mean), dtype=torch.float32).view(-1, 1, 1).to(device)
            std = torch.tensor(list(ip.image_std), dtype=torch.float32).view(-1, 1, 1).to(device)
            self._stats[key] = (mean, std)
        return self._stats[key]

    def to_model(self, px, device, dtype):
        import torch

        px = px.to(device, non_blocking=True)
        if px.dtype == torch.uint8:
            ip = self.processor
            x = px.float()
            if ip.do_rescale:
                x.mul_(float(ip.rescale_factor))
            if ip.do_normalize:
                mean, std = self._mean_std(device)
                x.sub_(mean).div_(std)
            px = x
        return px.to(dtype)


def as_tensor(array):
    """A numpy array (possibly a read-only view of an Arrow buffer: only read here) as a torch tensor, no copy."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


def pixel_column(pixels, rows, n: int):
    """pixels [m, ...] of `rows` (sorted row numbers) -> an Arrow fixed_shape_tensor column of length n, null
    elsewhere (what a prepare step hands the model's process)."""
    import numpy as np
    import pyarrow as pa

    shape = list(pixels.shape[1:])
    size = int(np.prod(shape)) if shape else 0
    valid = np.zeros(n, bool)
    valid[rows] = True
    full = np.zeros((n, size), pixels.dtype)
    full[rows] = pixels.reshape(len(rows), size)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), size, mask=pa.array(~valid))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.from_numpy_dtype(pixels.dtype), shape), storage)


def pixel_rows(column):
    """The inverse of pixel_column: (pixels [m, ...] of the non-null rows, their row numbers); zero-copy."""
    import numpy as np

    col = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    storage = col.storage
    valid = np.asarray(storage.is_valid().to_numpy(zero_copy_only=False), bool)
    rows = np.flatnonzero(valid)
    values = storage.flatten().to_numpy(zero_copy_only=False)  # the non-null rows' values, offset respected
    return values.reshape(len(rows), *col.type.shape), rows


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
    pixel_prep: PixelPrep | None = None

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    def preprocess(self, images: list, texts: list[str]) -> dict:
        """The whole processor and the tokenizer over the batch at once -> model inputs (float32, on the CPU)."""
        px = self.image_processor(images=images, return_tensors="pt")
        inputs = {**px, **self.tokenize(texts)}
        return {k: v for k, v in inputs.items() if k in self._forward_args}

    def tokenize(self, texts: list[str]) -> dict:
        return dict(self.tokenizer([t or "" for t in texts], padding=self.text_padding, truncation=True,
                                   max_length=self.text_max_length, return_tensors="pt"))

    def _on_device(self, inputs: dict):
        """One forward pass, left on the device (CUDA runs it asynchronously) -> (image_emb, text_emb) float32,
        L2-normalised. uint8 pixel_values (PixelPrep.pixels) are rescaled and normalised on the device."""
        import torch

        cuda = self.device.type == "cuda"
        moved = {}
        for k, v in inputs.items():
            if k not in self._forward_args:
                continue
            if cuda and not v.is_pinned():
                v = v.pin_memory()  # page-locked: the copy below runs asynchronously
            if k == "pixel_values" and self.pixel_prep is not None:
                moved[k] = self.pixel_prep.to_model(v, self.device, self.dtype)
                continue
            v = v.to(self.device, non_blocking=True)
            moved[k] = v.to(self.dtype) if v.is_floating_point() else v
        with torch.inference_mode():
            out = self.model(**moved, return_dict=True)
            img = out.image_embeds.float()
            txt = out.text_embeds.float()
            img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return img, txt

    def forward(self, inputs: dict):
        """One forward pass -> (image_emb, text_emb), float32, L2-normalised, on the CPU."""
        img, txt = self._on_device(inputs)
        return img.cpu(), txt.cpu()

    def pixels(self, images: list):
        """PIL RGB images -> model-ready pixels on the CPU (PixelPrep.pixels), or None if this processor cannot
        be split."""
        return self.pixel_prep.pixels(images) if self.pixel_prep is not None else None

    def embed_pixels(self, pixels, texts: list[str], batch_size: int):
        """pixels (PixelPrep.pixels: one row per caption) and captions -> (image_emb, text_emb) as float32 numpy
        [n, dim]. Forwards run on chunks of batch_size; on CUDA they are queued back to back and the results come
        back in one copy at the end, so the GPU never waits for the host between chunks."""
        import torch

        if len(pixels) != len(texts):
            raise ValueError(f"{len(pixels)} images but {len(texts)} texts")
        set_threads(self.threads)
        step = max(1, int(batch_size))
        parts = [self._on_device({"pixel_values": as_tensor(pixels[s:s + step]), **self.tokenize(texts[s:s + step])})
                 for s in range(0, len(texts), step)]
        if not parts:
            return None, None
        img = torch.cat([p[0] for p in parts]).cpu().numpy()
        txt = torch.cat([p[1] for p in parts]).cpu().numpy()
        return img, txt

    def embed(self, images: list, texts: list[str]):
        """PIL RGB images and captions (same length) -> (image_emb, text_emb) as float32 [n, dim] tensors."""
        import torch

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        set_threads(self.threads)
        px = self.pixels(images) if images else None
        if px is None:
            return self.forward(self.preprocess(images, texts))
        img, txt = self.embed_pixels(px, texts, len(texts))
        return torch.from_numpy(img), torch.from_numpy(txt)


def load_pixel_prep(name: str, *, stage: str = "align") -> PixelPrep:
    """The PixelPrep of a model's processor, without loading its weights (for prepare steps on CPU workers)."""
    from transformers import AutoProcessor

    location = locate_model(name)
    quiet_transformers()
    try:
        processor = AutoProcessor.from_pretrained(location)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise model_error(stage, name, f"{type(e).__name__}: {msg}") from None
    if not hasattr(processor, "image_processor"):
        raise model_error(stage, name, f"its processor {type(processor).__name__} has no image processor")
    return PixelPrep(processor.image_processor)


def quiet_transformers():
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
    quiet_transformers()
    try:
        model = AutoModel.from_pretrained(location, dtype=dt)
        processor = AutoProcessor.from_pretrained(location)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise model_error(stage, name, f"{type(e).__name__}: {msg}") from None
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise model_error(stage, name, f"its processor {type(processor).__name__} has no tokenizer and image processor")
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
        pixel_prep=PixelPrep(processor.image_processor),
    )


def decode_rgb(data: bytes | None):
    """Image bytes -> an RGB PIL image (transparency composited on white), or None if it does not decode."""
    from stages.imaging.decode import decode_image, pil

    arr = decode_image(data)[0]
    return None if arr is None else pil(arr)
