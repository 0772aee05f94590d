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
    load_clip(name, device, dtype, threads)  -> ClipModel: AutoModel (SDPA attention where the model has it) +
                                   AutoProcessor, eval mode, no grad; on CUDA warmed up by one small forward.
    load_preps(name)               the processor's image and text halves (PixelPrep, TextPrep), for CPU workers:
                                   no weights.

Feeding a model (PixelPrep, TextPrep, pixel_column / pixel_rows): CPU workers resize and crop into uint8 [3, H, W]
per row, handed over as an Arrow list column (null rows take no space), and turn captions into token ids; the
model's process pads the ids per forward, copies the pixels (pinned, non_blocking on CUDA) and rescales and
normalises them on the device. `ClipModel.run_forwards` queues a batch's forwards back to back on the calling
thread's CUDA stream and copies the embeddings back once (a threaded actor's two batches overlap).

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
from stages.imaging.decode import REDUCING_GAP, resize

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


# --------------------------------------------------------------------------- what feeding a model needs

def text_settings(config, tokenizer) -> tuple[int, str]:
    """(max_length, padding) of the model's captions: truncated to its positions; SigLIP pads to max_length, as it
    was trained (its docs say so), the others to the longest caption of a forward."""
    tcfg = config.text_config
    positions = getattr(tcfg, "max_position_embeddings", None) or 77
    tok_max = getattr(tokenizer, "model_max_length", None) or positions
    siglip = getattr(config, "model_type", "").startswith("siglip")
    return int(min(positions, tok_max)), "max_length" if siglip else "longest"


# --------------------------------------------------------------------------- loading and embedding

class PixelPrep:
    """The image half of a CLIP-like processor, cut in two so the costly half can run on CPU workers ahead of the
    model:

        pixels(images)   PIL RGB images -> the processor's resize and crop, without rescale and normalise:
                         uint8 [n, 3, H, W] (a quarter of float32's bytes to ship between processes and to copy
                         to a GPU).
        pixels_from(arrays, stored)  the same from RGB arrays, maybe decoded at a reduced scale (the shared decode,
                         stages.imaging.decode) of images stored at `stored` [height, width]: the resize has the
                         stored image's geometry and runs in Pillow directly (`plan`), with a reducing_gap.
        to_model(t, device, dtype)  moves the tensor (non_blocking: from pinned memory on CUDA it overlaps), then
                         applies the processor's rescale and mean/std there, in float32, then casts to dtype.
        from_device(images)  uint8 [3, H, W] images already on the device (decoded there) -> the plan's resize
                         (antialiased bicubic, as Pillow's) and crop there: uint8 [n, 3, H, W] on the device.

    The result matches the processor's own float32 output to float rounding (5e-7 on CLIP's). A probe image run
    once through the processor fixes the mode: "uint8" as above; "float32" (the whole processor on the CPU;
    to_model only moves and casts) for processors without rescale/normalise settings or whose resize gives other
    than whole numbers in 0..255; None when it gives more than pixel_values (SigLIP 2's NaFlex patches, say):
    such models take the whole processor in the model's process. `shape` is one row's [3, H, W].

    `plan` ((kind, size), resample, crop) is the processor's resize (kind "short": the shorter side to size,
    keeping the aspect as the processor rounds it; "fixed": to (height, width)) and centre crop, done in Pillow
    directly; it is kept only if it gives the processor's own pixels bit for bit on probe images, else None and
    the processor runs (on images made from the arrays). `side` is the shorter side its resize needs (a decode may
    stop there)."""

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
        self.plan = self._plan() if self.mode == "uint8" else None

    @property
    def side(self) -> int | None:
        if self.plan is None:
            return None
        (kind, size), _, _ = self.plan
        return size if kind == "short" else max(size)

    def _plan(self):
        import numpy as np

        ip = self.processor

        def get(d, k):
            return d.get(k) if isinstance(d, dict) else getattr(d, k, None)

        if not getattr(ip, "do_resize", False) or getattr(ip, "do_pad", False):
            return None
        size = ip.size
        short, height, width = get(size, "shortest_edge"), get(size, "height"), get(size, "width")
        if short and not get(size, "longest_edge"):
            target = ("short", int(short))
        elif height and width and not short:
            target = ("fixed", (int(height), int(width)))
        else:
            return None
        crop = None
        if getattr(ip, "do_center_crop", False):
            crop = (int(get(ip.crop_size, "height")), int(get(ip.crop_size, "width")))
            least = (target[1], target[1]) if target[0] == "short" else target[1]
            if crop[0] > least[0] or crop[1] > least[1]:
                return None  # the processor would pad the crop
        plan = (target, int(ip.resample if ip.resample is not None else 2), crop)
        rng = np.random.default_rng(1)
        for shape in ((37, 53), (53, 37), (301, 452), (250, 250)):
            arr = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            got = self._planned(plan, arr, shape, reducing_gap=None)  # the same resize, as the processor runs it
            want = self._raw([_pil(arr)])
            if got is None or want is None or not np.array_equal(got, np.asarray(want[0])):
                return None
        return plan

    @staticmethod
    def _planned(plan, arr, stored, reducing_gap: float | None = REDUCING_GAP):
        """One image's uint8 [3, H, W] by the plan; None where the crop would need padding (the processor pads)."""
        import numpy as np

        target, resample, crop = plan
        h, w = int(stored[0]), int(stored[1])
        nh, nw = _resized_size(target, h, w)
        out = np.asarray(resize(arr, (h, w), (nw, nh), resample, reducing_gap))
        if crop is not None:
            ch, cw = crop
            if ch > nh or cw > nw:
                return None
            top, left = (nh - ch) // 2, (nw - cw) // 2
            out = out[top:top + ch, left:left + cw]
        return out.transpose(2, 0, 1)

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

    def pixels_from(self, arrays: list, stored) -> "Any":
        """RGB uint8 arrays (HxWx3, maybe reduced) of images stored at `stored` ([n, 2] height, width) ->
        [n, *shape] of self.dtype, as pixels() gives from the stored images (see the class docstring)."""
        import numpy as np

        if self.mode is None:
            return None
        if self.plan is None or not arrays:
            return self.pixels([_pil(a) for a in arrays])
        out = np.empty((len(arrays), *self.shape), np.uint8)
        for i, (arr, hw) in enumerate(zip(arrays, stored)):
            got = self._planned(self.plan, arr, hw)
            out[i] = got if got is not None else self.pixels([_pil(arr)])[0]
        return out

    def from_device(self, images: list):
        """uint8 [3, H, W] tensors on one device -> uint8 [n, *shape] there, by the plan (antialiased bicubic or
        bilinear as the processor resamples; other resample filters: bicubic)."""
        import torch
        import torch.nn.functional as F

        target, resample, crop = self.plan
        mode = "bilinear" if resample == 2 else "bicubic"
        out = []
        for t in images:
            nh, nw = _resized_size(target, int(t.shape[1]), int(t.shape[2]))
            x = F.interpolate(t[None].float(), size=(nh, nw), mode=mode, antialias=True, align_corners=False)
            if crop is not None:  # never larger than the resized image (_plan)
                top, left = (nh - crop[0]) // 2, (nw - crop[1]) // 2
                x = x[:, :, top:top + crop[0], left:left + crop[1]]
            out.append(x.round_().clamp_(0, 255).to(torch.uint8))
        return torch.cat(out)

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


def _resized_size(target, h: int, w: int) -> tuple[int, int]:
    """(height, width) after PixelPrep's resize: ("short", s) as transformers' get_resize_output_image_size
    (default_to_square=False) rounds it, or ("fixed", (height, width))."""
    kind, size = target
    if kind != "short":
        return size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def _pil(arr):
    from PIL import Image

    return Image.fromarray(arr, "RGB")


class TextPrep:
    """The tokenizer half, cut in two like PixelPrep: the CPU workers turn captions into token ids, the model's
    process pads them for each forward.

        ids(texts)       captions (None: "") -> list<int32> token ids, truncated to max_length, unpadded
        pad(ids)         a list<int32> column (or its values and offsets) -> the tokenizer's own padded inputs:
                         input_ids and, where the tokenizer makes one, attention_mask (int64 [n, width]), padded
                         on its padding side with its pad id to the longest row or to max_length (`padding`)

    pad(ids(texts)) equals tokenizer(texts, padding=..., truncation=True, max_length=...) bit for bit."""

    def __init__(self, tokenizer, max_length: int, padding: str):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.padding = padding
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        self.with_mask = "attention_mask" in getattr(tokenizer, "model_input_names", ["attention_mask"])

    def ids(self, texts: list):
        import itertools

        import numpy as np
        import pyarrow as pa

        enc = self.tokenizer([t or "" for t in texts], truncation=True, max_length=self.max_length,
                             padding=False)["input_ids"]
        offsets = np.zeros(len(enc) + 1, np.int32)
        np.cumsum([len(e) for e in enc], out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(enc), np.int32, int(offsets[-1]))
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))

    def pad(self, ids) -> dict:
        import numpy as np
        import pyarrow as pa

        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        offsets = np.asarray(ids.offsets.to_numpy(zero_copy_only=False), np.int64)
        values = np.asarray(ids.flatten().to_numpy(zero_copy_only=False), np.int64)
        lengths = np.diff(offsets)
        width = self.max_length if self.padding == "max_length" else int(lengths.max(initial=0))
        cols = np.arange(width)[None, :]
        valid = cols >= (width - lengths)[:, None] if self.left else cols < lengths[:, None]
        input_ids = np.full((len(lengths), width), self.pad_id, np.int64)
        input_ids[valid] = values
        out = {"input_ids": input_ids}
        if self.with_mask:
            out["attention_mask"] = valid.astype(np.int64)
        return out


def as_tensor(array):
    """A numpy array (possibly a read-only view of an Arrow buffer: only read here) as a torch tensor, no copy."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


def pixel_column(pixels, rows, n: int):
    """pixels [m, ...] of `rows` (sorted row numbers) -> an Arrow large_list column of length n holding each of those
    rows' values flattened, null elsewhere (what a prepare step hands the model's process). Null rows take no
    space, so a batch whose JPEGs go to the GPU as bytes carries pixels only for its other rows."""
    import numpy as np
    import pyarrow as pa

    size = int(np.prod(pixels.shape[1:])) if pixels.ndim > 1 else 0
    valid = np.zeros(n, bool)
    valid[rows] = True
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.where(valid, size, 0), out=offsets[1:])
    values = pa.array(np.ascontiguousarray(pixels).reshape(-1))
    return pa.LargeListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~valid))


def pixel_rows(column, shape):
    """The inverse of pixel_column, given one row's shape: (pixels [m, *shape] of the non-null rows, their row
    numbers); zero-copy."""
    import numpy as np

    col = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)
    rows = np.flatnonzero(valid)
    values = col.flatten().to_numpy(zero_copy_only=False)  # the non-null rows' values, offset respected
    return values.reshape(len(rows), *shape), rows


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
    text_prep: TextPrep | None = None
    attention: str = "eager"  # the attention implementation the model runs (sdpa where it supports it)
    _local: Any = field(default_factory=threading.local)  # per calling thread: its CUDA stream

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

    def _stream(self):
        """This thread's CUDA stream (None off CUDA): two threads of one actor overlap their copies and forwards."""
        import torch

        if self.device.type != "cuda":
            return None
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(self.device)
        return s

    def on_stream(self):
        """A context: device work in it runs on this thread's stream (a no-op off CUDA)."""
        import contextlib

        import torch

        stream = self._stream()
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _on_device(self, inputs: dict):
        """One forward pass, left on the device (CUDA runs it asynchronously) -> (image_emb, text_emb) float32,
        L2-normalised. uint8 pixel_values (PixelPrep.pixels) are rescaled and normalised on the device; numpy
        arrays are taken as tensors without a copy."""
        import torch

        cuda = self.device.type == "cuda"
        moved = {}
        for k, v in inputs.items():
            if k not in self._forward_args:
                continue
            if not isinstance(v, torch.Tensor):
                v = as_tensor(v)
            if cuda and v.device.type == "cpu" and not v.is_pinned():
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

    def run_forwards(self, chunks):
        """Model inputs of one forward each (dicts of numpy arrays or tensors; pixel_values may already be on the
        device) -> (image_emb, text_emb) as float32 numpy [n, dim]. On CUDA the forwards are queued back to back on
        this thread's stream and the results come back in one copy at the end, so the GPU never waits for the host
        between chunks, and a second thread's batch (a threaded actor) overlaps on its own stream."""
        import torch

        set_threads(self.threads)
        with torch.inference_mode(), self.on_stream():
            parts = [self._on_device(inputs) for inputs in chunks]
            if not parts:
                return None, None
            img = torch.cat([p[0] for p in parts]).cpu().numpy()
            txt = torch.cat([p[1] for p in parts]).cpu().numpy()
        return img, txt

    def embed_pixels(self, pixels, texts: list[str], batch_size: int):
        """pixels (PixelPrep.pixels: one row per caption) and captions -> (image_emb, text_emb) as float32 numpy
        [n, dim], forwards on chunks of batch_size (run_forwards)."""
        if len(pixels) != len(texts):
            raise ValueError(f"{len(pixels)} images but {len(texts)} texts")
        step = max(1, int(batch_size))
        return self.run_forwards({"pixel_values": as_tensor(pixels[s:s + step]), **self.tokenize(texts[s:s + step])}
                                 for s in range(0, len(texts), step))

    def embed_ids(self, pixels, ids, batch_size: int):
        """pixels (one per row: a numpy [n, ...] of PixelPrep.pixels, or a uint8 tensor on the device) and token
        ids (TextPrep.ids, a list<int32> column of n rows) -> (image_emb, text_emb) float32 numpy [n, dim]: the
        prepare step's hand-off, padded here per chunk of batch_size (run_forwards)."""
        if len(pixels) != len(ids):
            raise ValueError(f"{len(pixels)} images but {len(ids)} captions")
        step = max(1, int(batch_size))
        return self.run_forwards({"pixel_values": pixels[s:s + step], **self.text_prep.pad(ids.slice(s, step))}
                                 for s in range(0, len(ids), step))

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

    def warm_up(self) -> None:
        """One small forward at the model's input shape (CUDA kernels chosen and loaded, allocator primed) before the
        first real batch; then the device is synchronised, so other threads' streams see the loaded weights."""
        import numpy as np
        import torch

        if self.pixel_prep is None or self.pixel_prep.mode is None:
            return
        px = np.zeros((2, *self.pixel_prep.shape), self.pixel_prep.dtype)
        self.embed_pixels(px, ["a photo", "a longer caption of a photo"], 2)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Preps:
    """What a prepare step needs of a model, without its weights: PixelPrep and TextPrep."""

    pixel: PixelPrep
    text: TextPrep


def load_preps(name: str, *, stage: str = "align") -> Preps:
    """PixelPrep and TextPrep of a model's processor and config, without loading its weights (for prepare steps
    on CPU workers)."""
    from transformers import AutoConfig, AutoProcessor

    location = locate_model(name)
    quiet_transformers()
    try:
        processor = AutoProcessor.from_pretrained(location)
        config = AutoConfig.from_pretrained(location)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise model_error(stage, name, f"{type(e).__name__}: {msg}") from None
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        raise model_error(stage, name, f"its processor {type(processor).__name__} has no tokenizer and image "
                                       "processor")
    return Preps(PixelPrep(processor.image_processor), TextPrep(processor.tokenizer, *text_settings(config,
                                                                                                     processor.tokenizer)))


def load_pixel_prep(name: str, *, stage: str = "align") -> PixelPrep:
    """The PixelPrep of a model's processor, without loading its weights."""
    return load_preps(name, stage=stage).pixel


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. "requires torchvision ... falling back to the PIL backend"
    hf_logging.disable_progress_bar()  # "Loading weights" bars, per actor


def _from_pretrained(auto_model, location: str, dtype):
    """The model with SDPA attention where its architecture has it (PyTorch's fused kernels: flash or memory-
    efficient on CUDA); else the model's default. -> (model, attention implementation)."""
    try:
        model = auto_model.from_pretrained(location, dtype=dtype, attn_implementation="sdpa")
    except (ValueError, ImportError):  # "does not support an attention implementation through ...sdpa"
        model = auto_model.from_pretrained(location, dtype=dtype)
    cfg = model.config
    return model, str(getattr(cfg, "_attn_implementation", None) or "eager")


def load_clip(name: str, device: str = "auto", dtype: str = "auto", *, threads: int | None = None,
              gpus: float = 0, stage: str = "align") -> ClipModel:
    """Load a CLIP-like dual encoder by folder or hub id (see locate_model) for inference; on CUDA, warmed up."""
    import torch
    from transformers import AutoModel, AutoProcessor

    dev = resolve_device(device, gpus, stage=stage)
    dt = resolve_dtype(dtype, dev)
    n_threads = resolve_threads(threads, 1)
    set_threads(n_threads)
    location = locate_model(name)
    quiet_transformers()
    try:
        model, attention = _from_pretrained(AutoModel, location, dt)
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
    max_len, padding = text_settings(cfg, processor.tokenizer)
    dim = getattr(cfg, "projection_dim", None) or getattr(tcfg, "projection_size", None) or tcfg.hidden_size
    torch.manual_seed(0)  # nothing random runs in eval mode; this only pins anything that might
    clip = ClipModel(
        name=name, location=location, model=model, processor=processor, device=dev, dtype=dt, threads=n_threads,
        model_type=model_type, embedding_dim=int(dim), text_max_length=max_len, text_padding=padding,
        _forward_args=set(inspect.signature(model.forward).parameters),
        pixel_prep=PixelPrep(processor.image_processor), text_prep=TextPrep(processor.tokenizer, max_len, padding),
        attention=attention,
    )
    if dev.type == "cuda":
        clip.warm_up()
    return clip


def decode_rgb(data: bytes | None):
    """Image bytes -> an RGB PIL image (transparency composited on white), or None if it does not decode."""
    from stages.imaging.decode import decode_image, pil

    arr = decode_image(data)[0]
    return None if arr is None else pil(arr)
