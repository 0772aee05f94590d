"""The build spec: YAML validated with pydantic. Errors name the file, the field and what was expected."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from schemas.registry import StageModuleError, load_stages

SPEC_VERSION = 1


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file and the field."""


def is_uri(value) -> bool:
    """scheme://... (object storage), as opposed to a local path."""
    s = str(value)
    return "://" in s and not s.startswith("file://")


def _remote_exists(uri: str, want_file: bool) -> bool:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    kind = fs.get_file_info(path).type
    return kind == pafs.FileType.File if want_file else kind != pafs.FileType.NotFound


class StrictModel(BaseModel):
    """A spec section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class SourceSpec(StrictModel):
    """Either `urls` (a URL list to download) or `pairs` (an existing corpus with image bytes: curate, no download)."""

    urls: str | None = Field(None, description="URL list: parquet, csv, tsv or jsonl; a local path or a URI "
                                               "(s3://bucket/key)")
    pairs: str | None = Field(None, description="Parquet file/folder with image bytes, or a WebDataset folder of "
                                                "tars; a local path or a URI (s3://bucket/prefix)")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "webdataset"] = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    image_col: str = "image"
    name: str | None = None  # source name in the catalog; defaults to the file stem

    @field_validator("urls", "pairs", mode="before")
    @classmethod
    def _path_as_text(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @model_validator(mode="after")
    def _one_input(self) -> "SourceSpec":
        if (self.urls is None) == (self.pairs is None):
            raise ValueError("give exactly one of source.urls (a URL list) or source.pairs (a corpus with images)")
        return self

    @property
    def path(self) -> str:
        return self.urls if self.urls is not None else self.pairs


class IngestSpec(StrictModel):
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


class StageParams(StrictModel):
    """Resources every stage accepts; None keeps the stage's own default."""

    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, gt=0)
    pool_size: int | None = Field(None, gt=0)


def stage_params_models(modules: list[str] | tuple[str, ...] = ()) -> dict[str, type[StageParams]]:
    """Each stage's params model, by stage name (declared in the stage's own file): the stages of the
    `pairforge.stages` entry points and of `modules` (schemas.registry)."""
    return {name: cls.Params for name, cls in load_stages(modules).items()}


class StageEntry(StrictModel):
    name: str
    params: StageParams


class WriteSpec(StrictModel):
    rows_per_shard: int = Field(10_000, gt=0)
    compression: Literal["zstd", "snappy", "none"] = "zstd"


class DecideSpec(StrictModel):
    driver_max_rows: int = Field(
        100_000, ge=0, description="global decisions (dedup, top fractions) of builds with at most this many rows run "
                                   "in one process, one Ray task (no shuffles: faster for small builds; its memory is "
                                   "bounded by this number); larger builds run them as Ray tasks with hash "
                                   "partitions. 0: always partitioned")


class RaySpec(StrictModel):
    address: str | None = None  # None: start a local Ray; "auto" or host:port joins a cluster
    num_cpus: int | None = Field(None, gt=0)
    object_store_gb: float = Field(1.0, gt=0)


class BuildSpec(StrictModel):
    version: Literal[1] = 1
    dataset: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    source: SourceSpec
    ingest: IngestSpec = Field(default_factory=IngestSpec)
    stage_modules: list[str] = Field(
        default_factory=list, description="modules (or packages) of stages from outside pairforge, importable where "
                                          "the build runs (my_pkg.my_stage); installed packages can instead declare "
                                          "a `pairforge.stages` entry point")
    stages: list[StageEntry] = Field(default_factory=list)
    write: WriteSpec = Field(default_factory=WriteSpec)
    decide: DecideSpec = Field(default_factory=DecideSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    out: str = Field("builds", description="where builds go: a local folder or object storage (s3://bucket/prefix)")
    catalog: Path | None = Field(
        None, description="the catalog, a local DuckDB file. Default: <out>/catalog.duckdb; when `out` is in object "
                          "storage, catalog.duckdb beside the spec file")
    # An incremental build of a source skips uids earlier builds of it processed (rejected as
    # seen_in_earlier_build, never fetched) and dedups against the pairs they kept.
    incremental: bool = False

    @field_validator("out", mode="before")
    @classmethod
    def _out_as_text(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @field_validator("catalog", mode="before")
    @classmethod
    def _local_catalog(cls, v: Any) -> Any:
        if v is not None and is_uri(v):
            raise ValueError(f"must be a local DuckDB file, not {v}")
        return v

    @field_validator("stage_modules")
    @classmethod
    def _importable(cls, v: list[str]) -> list[str]:
        for name in v:
            if not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"not a module path: {name!r}")
            try:
                load_stages([name])
            except StageModuleError as e:
                cause = e.__cause__ or e
                raise ValueError(f"cannot import {name!r}: {type(cause).__name__}: {cause}") from None
        return v

    @field_validator("stages", mode="before")
    @classmethod
    def _parse_stages(cls, raw: Any, info: ValidationInfo) -> list[StageEntry]:
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
            models = stage_params_models(info.data.get("stage_modules") or ())
            if name not in models:
                raise ValueError(f"stages[{i}]: unknown stage {name!r}; known: {sorted(models)}")
            try:
                entries.append(StageEntry(name=name, params=models[name].model_validate(params or {})))
            except ValidationError as e:
                raise ValueError(f"stages[{i}].{name}: {format_errors(e)}") from None
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
        if self.catalog is not None:
            return self.catalog
        if is_uri(self.out):
            raise SpecError(f"out is in object storage ({self.out}): set `catalog` to a local DuckDB file")
        return Path(self.out) / "catalog.duckdb"

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_versions(self) -> dict[str, int]:
        """Each stage's `version`, in spec order: part of a build's resume key and of its catalog record."""
        stages = load_stages(self.stage_modules)
        return {s.name: int(stages[s.name].version) for s in self.stages}

    def stage_params(self, name: str) -> StageParams:
        for s in self.stages:
            if s.name == name:
                return s.params
        raise KeyError(name)

    def to_dict(self) -> dict:
        """The resolved spec, every default filled in, in the YAML layout (stage_modules only when given, so a spec
        without it keeps its hash)."""
        d = self.model_dump(mode="json", exclude={"stages"} | (set() if self.stage_modules else {"stage_modules"}))
        d["stages"] = [{s.name: s.params.model_dump(mode="json")} for s in self.stages]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def format_errors(e: ValidationError) -> str:
    """pydantic errors as "field.path: message; ..." (one line)."""
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
        raise SpecError(f"{origin}: {format_errors(e)}") from None
    base = base_dir or Path.cwd()
    field_name = "urls" if spec.source.urls is not None else "pairs"
    for name, value in ((f"source.{field_name}", spec.source.path), ("out", spec.out), ("catalog", spec.catalog)):
        if value is not None and ("\x00" in str(value) or not str(value).strip()):
            raise SpecError(f"{origin}: {name}: not a usable path: {str(value)!r}")
        if value is not None and is_uri(value) and "?" in str(value):
            raise SpecError(f"{origin}: {name}: query options in a storage URI are not supported; give the endpoint "
                            "and credentials in the AWS_* environment variables")
    if not is_uri(spec.source.path):
        setattr(spec.source, field_name, str((base / spec.source.path).resolve()))
    if not is_uri(spec.out):
        spec.out = str((base / spec.out).resolve())
    elif spec.catalog is None:  # the catalog stays local: beside the spec file
        spec.catalog = (base / "catalog.duckdb").resolve()
    if spec.catalog is not None and not spec.catalog.is_absolute():
        spec.catalog = (base / spec.catalog).resolve()
    want_file = field_name == "urls"
    try:
        if is_uri(spec.source.path):
            found = _remote_exists(spec.source.path, want_file)
        else:
            found = Path(spec.source.path).exists() and (not want_file or Path(spec.source.path).is_file())
    except (OSError, ValueError) as e:  # a name too long, an unknown scheme, storage out of reach
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
