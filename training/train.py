"""The contrastive trainer: pairforge shards -> a small transformers CLIPModel, saved with save_pretrained.

`train(spec)` does the work and `train_flow(spec_path)` wraps it as a Prefect flow (`pairforge train SPEC`):

    data     ShardPairs over the spec's shards (loaders.pairs): seeded shuffle, eval split held out by uid hash;
             images decoded from their bytes and preprocessed by the model's own CLIPImageProcessor, so training
             and scoring see the same pixels (optional label-preserving random crops before it)
    model    CLIPModel from a small CLIPConfig; a character-level CLIPTokenizer built in memory (or a given one)
    loop     the model's contrastive loss through the loss registry (LOSSES), AdamW, linear warmup then cosine,
             gradient clipping; torch / numpy / random seeded from the spec
    state    out/checkpoints/step-NNNNNNN/ (state.safetensors + state.json: model, optimizer, scheduler, step, RNG
             states; no pickle); a rerun resumes from the newest one that belongs to the same training spec and sees
             exactly the batches an uninterrupted run would have seen (the loader skips the rows already consumed)
    metrics  out/metrics.jsonl every log_every steps (and the Prefect log); final held-out evaluation: image->text
             and text->image R@1/R@5 and pairwise accuracy (true caption vs another pair's caption)
    output   out/model/ (config.json, model.safetensors, tokenizer files, processor_config.json) loadable with
             transformers AutoModel / AutoProcessor, plus out/model/training.json; copied to `export` if set
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from loaders.pairs import HardNegativeCollate, ShardPairs, random_crop, resolve_shards
from schemas.train_spec import ModelSpec, TrainSpec, load_train_spec

log = logging.getLogger("pairforge.train")

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class TrainError(RuntimeError):
    pass


# --------------------------------------------------------------------------- losses

# name -> fn(model, batch) -> scalar loss; negclip / tripletclip read hard negatives from the batch.
LOSSES: dict[str, Callable] = {}


def register_loss(name: str):
    def deco(fn):
        LOSSES[name] = fn
        return fn

    return deco


@register_loss("clip")
def clip_loss(model, batch: dict):
    """The symmetric InfoNCE loss of CLIPModel itself (return_loss=True) over the in-batch pairs."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], return_loss=True)
    return out.loss


def _features(out):
    """get_*_features returns a tensor in most transformers versions and a ModelOutput in some."""
    return out if not hasattr(out, "pooler_output") else out.pooler_output


def _hard_negative_loss(model, batch: dict, with_images: bool):
    """NegCLIP / TripletCLIP over a HardNegativeCollate batch (loaders.pairs).

    Images I (B) and, with_images, negative images I' (K); texts T (B positives), T' (K captions of I') and N (M
    negative captions). Logits = scale * cos(images, [T; T'; N]). image->text: each image's label is its own caption
    among all texts (the negatives are extra columns); text->image: each paired caption (T; T') against all images
    (the negative images are extra rows). Negative captions N have no image, so they only appear as columns.
    With no negatives this is exactly CLIPModel's loss (mean of the two cross-entropies).
    """
    import torch
    import torch.nn.functional as F

    img = _features(model.get_image_features(pixel_values=batch["pixel_values"]))
    txt = _features(model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    if with_images and "neg_pixel_values" in batch:
        img = torch.cat([img, _features(model.get_image_features(pixel_values=batch["neg_pixel_values"]))])
        txt = torch.cat([txt, _features(model.get_text_features(input_ids=batch["neg_image_input_ids"],
                                                                attention_mask=batch["neg_image_attention_mask"]))])
    n_pairs = img.shape[0]
    if "neg_input_ids" in batch:
        txt = torch.cat([txt, _features(model.get_text_features(input_ids=batch["neg_input_ids"],
                                                                attention_mask=batch["neg_attention_mask"]))])
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T  # (pairs, pairs + M)
    labels = torch.arange(n_pairs, device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :n_pairs].T, labels)) / 2


@register_loss("negclip")
def negclip_loss(model, batch: dict):
    """NegCLIP (Yuksekgonul et al. 2023): the batch's negative captions are extra columns of the image->text
    logits."""
    return _hard_negative_loss(model, batch, with_images=False)


@register_loss("tripletclip")
def tripletclip_loss(model, batch: dict):
    """TripletCLIP (Patel et al. 2024): also negative images with their own captions, as extra pairs (rows and
    columns), besides the negative captions as extra columns."""
    return _hard_negative_loss(model, batch, with_images=True)


# losses whose batches come from ShardPairs(negatives=True) through HardNegativeCollate
NEGATIVE_LOSSES = {"negclip", "tripletclip"}


# --------------------------------------------------------------------------- tokenizer, processor, model

def char_tokenizer(max_length: int = 128):
    """A CLIPTokenizer with no merges: every character (byte-level) is a token, word-final ones with '</w>'."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def word_tokenizer(texts, max_length: int = 32, vocab_size: int = 8192, min_count: int = 1):
    """A word-level tokenizer (Hugging Face `tokenizers` WordLevel) fitted on `texts`: NFKC + lowercase, split on
    whitespace and punctuation, the `vocab_size` most frequent words seen at least `min_count` times (ties in
    alphabetical order, so the same texts give the same ids), unknown words -> <unk>. Ids: <|startoftext|> 0,
    <|endoftext|> 1 (also padding: CLIP pools at the first eos), <unk> 2. Saved and reloaded with the processor."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    split = pre_tokenizers.Whitespace()
    counts = Counter(w for t in texts if t for w, _ in split.pre_tokenize_str(norm.normalize_str(t)))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for w, c in sorted(counts.items(), key=lambda x: (-x[1], x[0])):
        if c < min_count or len(vocab) >= vocab_size:
            break
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = norm
    tk.pre_tokenizer = split
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=max_length)


def training_texts(files: list[Path], column: str = "text", neg_column: str = "neg_captions") -> list[str]:
    """Every caption of the training files and, where the files have them, their negative captions (so a word
    tokenizer knows the words a negative brings in and <unk> never gives a negative away)."""
    import pyarrow.parquet as pq

    out = []
    for f in files:
        cols = [column] + ([neg_column] if neg_column in pq.read_schema(f).names else [])
        t = pq.read_table(f, columns=cols)
        out += [x for x in t.column(column).to_pylist() if x]
        if neg_column in cols:
            out += [n["text"] for negs in t.column(neg_column).to_pylist() for n in (negs or []) if n.get("text")]
    return out


def make_tokenizer(m: ModelSpec, texts=None):
    """m.tokenizer: 'char', 'word' (fitted on `texts`, a callable returning the training captions) or a
    tokenizer folder / hub id."""
    if m.tokenizer == "char":
        return char_tokenizer(m.max_text_length)
    if m.tokenizer == "word":
        if texts is None:
            raise TrainError("model.tokenizer 'word' is fitted on the training captions; none were given")
        return word_tokenizer(texts(), m.max_text_length)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(m.tokenizer)
    except (OSError, ValueError) as e:
        raise TrainError(f"model.tokenizer: cannot load {m.tokenizer!r}: {e}") from None
    tok.model_max_length = min(tok.model_max_length, m.max_text_length)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_processor(m: ModelSpec, tokenizer):
    """CLIPProcessor: the PIL CLIP image processor (shortest edge -> image_size, centre crop) and the tokenizer."""
    from transformers import CLIPProcessor

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    ip = ImageProcessor(size={"shortest_edge": m.image_size}, crop_size={"height": m.image_size, "width": m.image_size})
    return CLIPProcessor(image_processor=ip, tokenizer=tokenizer)


def make_model(m: ModelSpec, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    eos = tokenizer.eos_token_id
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=m.text_width, intermediate_size=m.text_width * m.mlp_ratio,
                         num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
                         max_position_embeddings=m.max_text_length, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=m.vision_width, intermediate_size=m.vision_width * m.mlp_ratio,
                           num_hidden_layers=m.vision_layers, num_attention_heads=m.vision_heads,
                           image_size=m.image_size, patch_size=m.patch_size),
        projection_dim=m.projection_dim,
    )
    if eos == 2:  # CLIP's text pooling treats eos_token_id 2 as the legacy "argmax of ids" rule
        raise TrainError("the tokenizer's eos token id is 2, which CLIP text pooling misreads; use another tokenizer")
    return CLIPModel(cfg)


class ImageTransform:
    """Decoded image -> pixel tensor exactly as the saved processor makes it, after an optional random crop."""

    def __init__(self, image_processor, crop_min_area: float = 1.0, crop_prob: float = 0.0):
        self.ip = image_processor
        self.crop_min_area = crop_min_area
        self.crop_prob = crop_prob

    def __call__(self, image, rng: random.Random):
        if self.crop_min_area < 1.0 and rng.random() < self.crop_prob:
            image = random_crop(image, rng, self.crop_min_area)
        return self.ip(images=image, return_tensors="pt")["pixel_values"][0]


class Collate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        import torch

        enc = self.tokenizer([it["text"] for it in items], padding=True, truncation=True, return_tensors="pt")
        return {"pixel_values": torch.stack([it["image"] for it in items]), "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"], "text": [it["text"] for it in items],
                "uid": [it["uid"] for it in items]}


# --------------------------------------------------------------------------- schedule, seeds, checkpoints

def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based): linear warmup, then cosine to min_ratio."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(st: dict) -> None:
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])


# A checkpoint is a folder step-NNNNNNN/ of state.safetensors (every tensor: model, optimizer moments, RNG) and
# state.json (everything else: step, hashes, scheduler, optimizer groups, Python / numpy RNG). Nothing is pickled,
# so reading one runs no code from the file.
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


def _tensors_and_json(value, prefix: str, tensors: dict):
    """A nested state (dicts, lists, tuples, tensors, numpy arrays, scalars) -> its JSON form, tensors moved to
    `tensors` under path keys; tuples, numpy arrays and int dict keys are tagged so they come back as they were."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": prefix}
    if isinstance(value, dict):
        int_keys = all(isinstance(k, int) for k in value) and bool(value)
        body = {str(k): _tensors_and_json(v, f"{prefix}/{k}", tensors) for k, v in value.items()}
        return {"__intkeys__": body} if int_keys else body
    if isinstance(value, tuple):
        return {"__tuple__": [_tensors_and_json(v, f"{prefix}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_tensors_and_json(v, f"{prefix}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state at {prefix}: {type(value).__name__} is not saved (tensors, arrays, numbers, "
                    "strings, lists, tuples and dicts are)")


def _from_json(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__tuple__" in value:
            return tuple(_from_json(v, tensors) for v in value["__tuple__"])
        if "__intkeys__" in value:
            return {int(k): _from_json(v, tensors) for k, v in value["__intkeys__"].items()}
        return {k: _from_json(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    return value


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / CHECKPOINT_DIR).glob("step-*") if (p / STATE_JSON).is_file())


def save_checkpoint(out: Path, state: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{state['step']:07d}"
    tmp = folder / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors: dict = {}
    doc = _tensors_and_json(state, "state", tensors)
    save_file(tensors, tmp / STATE_TENSORS)
    (tmp / STATE_JSON).write_text(json.dumps(doc))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return path


def load_checkpoint(path: Path) -> dict:
    from safetensors.torch import load_file

    return _from_json(json.loads((path / STATE_JSON).read_text()), load_file(path / STATE_TENSORS))


def latest_checkpoint(out: Path, training_hash: str) -> dict | None:
    found = checkpoints(out)
    if not found:
        legacy = sorted((out / CHECKPOINT_DIR).glob("step-*.pt"))
        if legacy:
            raise TrainError(f"{out}: {legacy[-1].name} is a pickled checkpoint of an older pairforge, which is not "
                             "loaded (unpickling runs code from the file); pass fresh=True (--fresh) to start over")
        return None
    state = load_checkpoint(found[-1])
    if state.get("training_hash") != training_hash:
        raise TrainError(f"{out}: checkpoints there belong to another training spec; "
                         "use a new `out` folder or pass fresh=True (--fresh) to start over")
    return state


# --------------------------------------------------------------------------- evaluation

def embed(model, processor, images: list, texts: list[str], batch_size: int = 256):
    """L2-normalised (image_embeds, text_embeds) for PIL images and captions, through the processor."""
    import torch

    ims, txs = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, max(len(images), len(texts)), batch_size):
            im, tx = images[i:i + batch_size], texts[i:i + batch_size]
            if im:
                pv = processor.image_processor(images=im, return_tensors="pt")["pixel_values"]
                ims.append(model.get_image_features(pixel_values=pv))
            if tx:
                enc = processor.tokenizer(tx, padding=True, truncation=True, return_tensors="pt")
                txs.append(model.get_text_features(**enc))

    def norm(parts):
        if not parts:
            return torch.empty(0)
        x = torch.cat([p if isinstance(p, torch.Tensor) else p.pooler_output for p in parts])
        return torch.nn.functional.normalize(x, dim=-1)

    return norm(ims), norm(txs)


def retrieval_metrics(img, txt, texts: list[str], seed: int = 0) -> dict:
    """R@1/R@5 both ways (a caption equal to the true one counts as a hit) and pairwise accuracy vs another caption."""
    import torch

    n = len(texts)
    sim = img @ txt.T
    same = torch.tensor([[a == b for b in texts] for a in texts])
    out = {"pairs": n}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        true = s.diagonal().unsqueeze(1)
        # rank = number of candidates with a different caption scoring higher than the true one
        rank = ((s > true) & ~same).sum(1)
        for k in (1, 5):
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    rng = random.Random(seed)
    wins = total = 0
    for i in range(n):
        j = rng.randrange(n - 1) if n > 1 else 0
        j += j >= i
        if n < 2 or texts[j] == texts[i]:
            continue
        total += 1
        wins += bool(sim[i, i] > sim[i, j])
    out["pairwise_acc"] = wins / total if total else float("nan")
    out["cos_true_mean"] = float(sim.diagonal().mean())
    out["cos_other_mean"] = float((sim.sum() - sim.diagonal().sum()) / max(1, n * n - n))
    return out


def evaluate_heldout(model, processor, spec: TrainSpec, files: list[Path]) -> dict:
    """The final evaluation on held-out pairs of the spec's shards (the eval split)."""
    if spec.data.eval_fraction <= 0:
        return {}
    ds = ShardPairs(files, transform=None, seed=spec.seed, split="eval", eval_fraction=spec.data.eval_fraction,
                    shuffle=False, epochs=1, text_column=spec.data.text_column, image_column=spec.data.image_column)
    images, texts = [], []
    for item in ds:
        images.append(item["image"])
        texts.append(item["text"])
        if len(texts) >= spec.data.eval_max_pairs:
            break
    if len(texts) < 2:
        return {"pairs": len(texts)}
    img, txt = embed(model, processor, images, texts)
    return retrieval_metrics(img, txt, texts, seed=spec.seed)


# --------------------------------------------------------------------------- evaluators run after training

def _demo_scenes_eval(model_dir: Path, spec: TrainSpec) -> dict:
    from demo.scorer_eval import evaluate_scorer

    return evaluate_scorer(model_dir)


# name -> fn(model_dir, spec) -> dict merged into training.json under "evals"; "recommended_threshold" is lifted.
EVALUATORS: dict[str, Callable] = {"demo_scenes": _demo_scenes_eval}


# --------------------------------------------------------------------------- the run

def prepare_data(spec: TrainSpec) -> list[Path]:
    syn = spec.data.synthetic
    if syn is not None:
        from demo.train_data import write_scene_shards

        t0 = time.perf_counter()
        s = write_scene_shards(syn.out, syn.n, syn.seed, syn.image_sizes, syn.rows_per_shard)
        log.info("synthetic scenes: %d pairs in %s (%.1fs)", s["rows"], syn.out, time.perf_counter() - t0)
    try:
        return resolve_shards(spec.data.shards)
    except ValueError as e:
        raise TrainError(f"data.shards: {e}") from None


def prepare_hard_negatives(spec: TrainSpec) -> list[Path] | None:
    """Parquet files of negative images (uid, neg_image, neg_text) for tripletclip, from data.hard_negatives."""
    pats = getattr(spec.data, "hard_negatives", None)
    if not pats or spec.loss != "tripletclip":
        return None
    try:
        return resolve_shards(pats)
    except ValueError as e:
        raise TrainError(f"data.hard_negatives: {e}") from None


from dataio.shards import file_sha256  # noqa: E402  (one sha256-of-a-file helper for the project)


def train(spec: TrainSpec, *, fresh: bool = False, stop_after: int | None = None, logger=None,
          spec_text: str | None = None, spec_file: str | None = None) -> dict:
    """Train per `spec`, resuming from out/checkpoints unless `fresh`. `stop_after` ends this call after that many
    optimizer steps in total (a checkpoint is written there), as if interrupted; a later call resumes.

    Returns {"status": "complete" | "stopped", "step", "out", "model_dir"?, "export"?, "training"?}.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        return _train(spec, fresh=fresh, stop_after=stop_after, logger=logger, spec_text=spec_text,
                      spec_file=spec_file)
    finally:
        torch.set_num_threads(threads)


def _train(spec: TrainSpec, *, fresh: bool, stop_after: int | None, logger, spec_text: str | None,
           spec_file: str | None) -> dict:
    import torch
    from torch.utils.data import DataLoader

    logger = logger or log
    if spec.loss not in LOSSES:
        raise TrainError(f"loss: no implementation registered for {spec.loss!r}; known: {sorted(LOSSES)}")
    unknown = [e for e in spec_evals(spec) if e not in EVALUATORS]
    if unknown:
        raise TrainError(f"evals: unknown evaluators {unknown}; known: {sorted(EVALUATORS)}")
    out = spec.out
    if fresh and out.exists():
        for sub in (CHECKPOINT_DIR, MODEL_DIR, METRICS_FILE):
            p = out / sub
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    files = prepare_data(spec)
    thash = spec.training_hash()
    o = spec.optim

    seed_everything(spec.seed)
    tokenizer = make_tokenizer(spec.model, texts=lambda: training_texts(files, spec.data.text_column))
    processor = make_processor(spec.model, tokenizer)
    model = make_model(spec.model, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, o.steps, o.min_lr_ratio))

    step, seconds = 0, 0.0
    state = None if fresh else latest_checkpoint(out, thash)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, seconds = state["step"], state["seconds"]
        logger.info("resuming %s from step %d of %d", spec.name, step, o.steps)
    metrics_path = out / METRICS_FILE
    _truncate_metrics(metrics_path, step)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("training %s: %d parameters, %d shard files, %d steps of %d pairs, loss %s",
                spec.name, n_params, len(files), o.steps, o.batch_size, spec.loss)

    loss_fn = LOSSES[spec.loss]
    if step < o.steps:
        ds = ShardPairs(files, transform=ImageTransform(processor.image_processor, spec.augment.crop_min_area,
                                                        spec.augment.crop_prob),
                        seed=spec.seed, split="train", eval_fraction=spec.data.eval_fraction,
                        shuffle_buffer=spec.data.shuffle_buffer, start=step * o.batch_size,
                        text_column=spec.data.text_column, image_column=spec.data.image_column,
                        negatives=spec.loss in NEGATIVE_LOSSES, max_negatives=spec.data.max_negatives,
                        hard_negatives=prepare_hard_negatives(spec))
        collate = HardNegativeCollate(tokenizer) if spec.loss in NEGATIVE_LOSSES else Collate(tokenizer)
        loader = DataLoader(ds, batch_size=o.batch_size, collate_fn=collate, num_workers=0)
        model.train()
        t_last, window = time.perf_counter(), []
        with open(metrics_path, "a") as mf:
            for batch in loader:
                t0 = time.perf_counter()
                lr = opt.param_groups[0]["lr"]
                loss = loss_fn(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if o.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                opt.step()
                sched.step()
                with torch.no_grad():  # CLIP's recipe: the learned temperature is clamped at 100
                    model.logit_scale.clamp_(0, math.log(100))
                step += 1
                window.append(loss.item())
                seconds += time.perf_counter() - t0
                if step % spec.log_every == 0 or step == o.steps:
                    now = time.perf_counter()
                    rec = {"step": step, "loss": window[-1], "loss_avg": sum(window) / len(window),
                           "lr": lr, "logit_scale": model.logit_scale.detach().exp().item(),
                           "pairs_per_s": len(window) * o.batch_size / max(now - t_last, 1e-9),
                           "seconds": round(seconds, 3)}
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                    logger.info("step %d/%d loss %.4f (avg %.4f) lr %.2e scale %.1f %.0f pairs/s", step, o.steps,
                                rec["loss"], rec["loss_avg"], rec["lr"], rec["logit_scale"], rec["pairs_per_s"])
                    t_last, window = now, []
                stopping = stop_after is not None and step >= stop_after
                if step % spec.checkpoint_every == 0 or step == o.steps or stopping:
                    save_checkpoint(out, {"step": step, "seconds": seconds, "training_hash": thash,
                                          "model": model.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict(), "rng": _rng_state()},
                                    spec.keep_checkpoints)
                if step >= o.steps or stopping:
                    break
    if step < o.steps:
        return {"status": "stopped", "step": step, "out": str(out)}

    t0 = time.perf_counter()
    heldout = evaluate_heldout(model, processor, spec, files)
    logger.info("held-out: %s", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in heldout.items()}))
    model_dir = out / MODEL_DIR
    save_model(model, processor, model_dir)
    info = {
        "name": spec.name,
        "spec_file": spec_file,
        "spec_yaml": spec_text,
        "spec": spec.to_dict() if spec_text is None else None,
        "seed": spec.seed,
        "steps": step,
        "batch_size": o.batch_size,
        "pairs_seen": step * o.batch_size,
        "train_pairs_per_epoch": None,
        "parameters": n_params,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "final_loss": _last_loss(metrics_path),
        "heldout": heldout,
        "model_sha256": file_sha256(model_dir / "model.safetensors"),
        "versions": _versions(),
    }
    info["train_pairs_per_epoch"] = ShardPairs(files, split="train", eval_fraction=spec.data.eval_fraction).count()
    evals = {}
    for name in spec_evals(spec):
        logger.info("evaluator %s ...", name)
        evals[name] = EVALUATORS[name](model_dir, spec)
        if "recommended_threshold" in evals[name]:
            info["recommended_threshold"] = evals[name]["recommended_threshold"]
    if evals:
        info["evals"] = evals
    info["eval_seconds"] = round(time.perf_counter() - t0, 1)
    info = {k: v for k, v in info.items() if v is not None}
    (model_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    (model_dir / "TRAINING.md").write_text(training_markdown(info))
    if spec.export is not None:
        export(model_dir, spec.export)
        logger.info("exported to %s", spec.export)
    return {"status": "complete", "step": step, "out": str(out), "model_dir": str(model_dir),
            "export": str(spec.export) if spec.export else None, "training": info}


def spec_evals(spec: TrainSpec) -> list[str]:
    return list(getattr(spec, "evals", None) or [])


def save_model(model, processor, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def export(model_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _last_loss(path: Path) -> float | None:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return json.loads(lines[-1])["loss_avg"] if lines else None


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def training_markdown(info: dict) -> str:
    h = info.get("heldout", {})
    lines = [f"# {info['name']}", "",
             "A small CLIP (transformers CLIPModel) trained from scratch by `training/train.py`"
             + (f" from `{info['spec_file']}`." if info.get("spec_file") else "."), "",
             f"- steps: {info['steps']} x batch {info['batch_size']} = {info['pairs_seen']} pairs "
             f"({info.get('train_pairs_per_epoch', '?')} training pairs per epoch), seed {info['seed']}",
             f"- parameters: {info['parameters']:,}; training time {info['train_seconds']} s on {info['threads']} "
             "CPU threads",
             f"- final training loss (avg of the last logged window): {info.get('final_loss', float('nan')):.4f}",
             f"- model.safetensors sha256: `{info['model_sha256']}`", ""]
    if h:
        lines += ["## Held-out pairs of the training shards", "",
                  f"{h.get('pairs')} pairs: image->text R@1 {h.get('i2t_r1', 0):.3f}, R@5 {h.get('i2t_r5', 0):.3f}; "
                  f"text->image R@1 {h.get('t2i_r1', 0):.3f}, R@5 {h.get('t2i_r5', 0):.3f}; pairwise accuracy "
                  f"(true caption vs another pair's) {h.get('pairwise_acc', 0):.4f}", ""]
    for name, ev in (info.get("evals") or {}).items():
        lines += [f"## Evaluation: {name}", ""]
        if "markdown" in ev:
            lines += [ev["markdown"], ""]
        else:
            lines += ["```json", json.dumps(ev, indent=2), "```", ""]
    if "recommended_threshold" in info:
        lines += [f"Recommended cosine threshold for the align stage: **{info['recommended_threshold']}**", ""]
    if info.get("spec_yaml"):
        lines += ["## Spec", "", "```yaml", info["spec_yaml"].rstrip(), "```", ""]
    lines += ["Load it with `transformers.AutoModel.from_pretrained(folder)` and "
              "`transformers.AutoProcessor.from_pretrained(folder, backend=\"pil\")` (it was trained and evaluated "
              "with the PIL image backend; where torchvision is installed transformers would otherwise pick its "
              "torchvision backend, which resamples slightly differently); cosine = the dot product of the "
              "normalised `image_embeds` and `text_embeds`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the flow

from prefect import flow, get_run_logger  # noqa: E402


@flow(name="pairforge-train", validate_parameters=False, log_prints=True)
def train_flow(spec_path: str, fresh: bool = False) -> dict:
    """Train a CLIP model from a training spec; resumes from the newest checkpoint of the same spec."""
    spec = load_train_spec(spec_path)
    return train(spec, fresh=fresh, logger=get_run_logger(), spec_text=Path(spec_path).read_text(),
                 spec_file=_rel(Path(spec_path)))


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(p)
