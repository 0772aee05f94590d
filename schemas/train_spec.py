"""The training spec: YAML validated with pydantic, in the style of schemas.spec (errors name the file and field).

    version: 1
    name: demo-clip
    data:
      shards: [scenes/]            # folders of pairforge Parquet shards, or globs; relative to the spec file
      eval_fraction: 0.02          # held out by uid hash, never trained on
      synthetic: {n: 30000, seed: 0, image_sizes: [64, 128]}   # optional: write demo scenes first if missing
    model: {image_size: 64, patch_size: 8, vision_width: 128, vision_layers: 3, text_width: 128, text_layers: 3,
            projection_dim: 64, tokenizer: char}
    optim: {lr: 0.001, weight_decay: 0.1, warmup_steps: 50, steps: 800, batch_size: 128}
    loss: clip
    seed: 0
    checkpoint_every: 100
    out: ../demo-out/train/demo-clip
    export: models/demo-clip       # optional: the final model folder is also written here
    evals: [demo_scenes]           # optional: evaluators run on the final model (results go to training.json)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.spec import SpecError, is_uri, read_yaml, spec_error

TRAIN_SPEC_VERSION = 1

# Contrastive losses a spec may name; training.train registers an implementation for each (LOSSES).
# negclip / tripletclip read hard negatives (the neg_captions column; tripletclip also data.hard_negatives images).
KNOWN_LOSSES = ("clip", "negclip", "tripletclip")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticData(StrictModel):
    """Demo scenes (demo.train_data.write_scene_shards) written before training when `out` has none."""

    out: Path | None = Field(None, description="folder for the shards; default: the first entry of data.shards")
    n: int = Field(gt=0, description="pairs to write")
    seed: int = 0
    image_sizes: list[int] = Field(default_factory=lambda: [64], min_length=1,
                                   description="each scene is rendered at one of these sizes (pixels)")
    rows_per_shard: int = Field(5000, gt=0)

    @field_validator("image_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(s < 16 for s in v):
            raise ValueError(f"image sizes must be >= 16 pixels, got {v}")
        return v


class DataSpec(StrictModel):
    shards: list[str] = Field(min_length=1, description="folders of Parquet shards or glob patterns")
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="fraction of pairs held out (by uid hash)")
    eval_max_pairs: int = Field(1000, gt=0, description="held-out pairs used by the final evaluation at most")
    shuffle_buffer: int = Field(2048, gt=0)
    text_column: str = "text"
    image_column: str = "image"
    synthetic: SyntheticData | None = None
    max_negatives: int | None = Field(None, gt=0, description="negclip / tripletclip: negative captions per pair at "
                                                             "most (a seeded sample of the neg_captions column)")
    hard_negatives: list[str] | None = Field(None, description="tripletclip: Parquet files of negative images "
                                                               "(uid, neg_image, neg_text)")


class ModelSpec(StrictModel):
    image_size: int = Field(64, ge=16)
    patch_size: int = Field(8, gt=0)
    vision_width: int = Field(128, gt=0)
    vision_layers: int = Field(3, gt=0)
    vision_heads: int = Field(4, gt=0)
    text_width: int = Field(128, gt=0)
    text_layers: int = Field(3, gt=0)
    text_heads: int = Field(4, gt=0)
    mlp_ratio: int = Field(4, gt=0)
    projection_dim: int = Field(64, gt=0)
    max_text_length: int = Field(128, ge=8, description="tokens, bos and eos included; longer captions are cut")
    tokenizer: str = Field("char", description="'char' (a character-level CLIP tokenizer built in memory), 'word' "
                                               "(a word-level tokenizer fitted on the training captions, saved "
                                               "with the model) or the path / hub id of an existing tokenizer")

    @model_validator(mode="after")
    def _shapes(self) -> "ModelSpec":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for part in ("vision", "text"):
            w, h = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if w % h:
                raise ValueError(f"{part}_width {w} is not a multiple of {part}_heads {h}")
        return self


class OptimSpec(StrictModel):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="the cosine schedule ends at lr * min_lr_ratio")
    steps: int = Field(gt=0)
    batch_size: int = Field(128, ge=2, description="contrastive batch: each pair's negatives are the others")
    grad_clip: float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _warmup(self) -> "OptimSpec":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        return self


class AugmentSpec(StrictModel):
    """Label-preserving augmentations only: no flips (left/right is in the captions) and no colour changes."""

    crop_min_area: float = Field(1.0, gt=0.0, le=1.0,
                                 description="random crops keep at least this fraction of the area; 1 disables")
    crop_prob: float = Field(0.5, ge=0.0, le=1.0)


class TrainSpec(StrictModel):
    version: Literal[1] = 1
    name: str = Field("clip", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    optim: OptimSpec
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    loss: str = "clip"
    seed: int = 0
    threads: int | None = Field(None, gt=0, description="torch CPU threads; default: torch's own")
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints (the last step always saves)")
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0, description="steps between metrics lines (metrics.jsonl and the log)")
    out: Path = Path("train-out")
    export: Path | None = Field(None, description="also write the final model folder here")
    evals: list[str] = Field(default_factory=list, description="evaluators run on the final model (training.train"
                                                               ".EVALUATORS), e.g. demo_scenes")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in KNOWN_LOSSES:
            raise ValueError(f"unknown loss {v!r}; known: {list(KNOWN_LOSSES)}")
        return v

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def training_hash(self) -> str:
        """What a checkpoint must share with a spec to be resumed by it: everything but where outputs go."""
        d = self.to_dict()
        for k in ("out", "export", "checkpoint_every", "keep_checkpoints", "log_every", "threads", "evals"):
            d.pop(k, None)
        d["data"].pop("synthetic", None)
        d["data"].pop("eval_max_pairs", None)
        for k in ("max_negatives", "hard_negatives"):  # unset: hashes as before these fields existed
            if d["data"].get(k) is None:
                d["data"].pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def parse_train_spec(data: dict, base_dir: Path | None = None, origin: str = "<train spec>") -> TrainSpec:
    """Validate a training spec dict; relative paths (shards, out, export, synthetic.out) resolve against base_dir."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        spec = TrainSpec.model_validate(data)
    except ValidationError as e:
        raise spec_error(e, origin, TrainSpec) from None
    base = base_dir or Path.cwd()

    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    def resolve_data(s: str) -> str:  # shards may be in object storage (s3://bucket/prefix), as a build's are
        return s if is_uri(s) or Path(s).is_absolute() else str(base / s)

    spec.data.shards = [resolve_data(s) for s in spec.data.shards]
    if spec.data.hard_negatives:
        spec.data.hard_negatives = [resolve_data(s) for s in spec.data.hard_negatives]
    spec.out = resolve(spec.out)
    if spec.export is not None:
        spec.export = resolve(spec.export)
    syn = spec.data.synthetic
    if syn is not None:
        if syn.out is None:
            first = Path(spec.data.shards[0])
            if any(ch in first.name for ch in "*?["):
                raise SpecError(f"{origin}: data.synthetic.out: needed when data.shards[0] is a glob ({first})")
            syn.out = first
        syn.out = resolve(syn.out)
    tok = spec.model.tokenizer
    if tok not in ("char", "word") and (tok.startswith((".", "/")) or (base / tok).exists()):
        spec.model.tokenizer = str(resolve(Path(tok)))
    return spec


def load_train_spec(path: str | Path) -> TrainSpec:
    path = Path(path)
    return parse_train_spec(read_yaml(path), base_dir=path.parent.resolve(), origin=str(path))
