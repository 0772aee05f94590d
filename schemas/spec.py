"""The build spec: YAML validated with pydantic. Errors name the file, the field and what was expected."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from schemas.errors import UserError, did_you_mean
from schemas.registry import StageModuleError, load_stages

SPEC_VERSION = 1


class SpecError(UserError):
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

    cpus: float | None = Field(None, gt=0, description="CPUs per task or actor of this stage (fractions share a CPU)")
    gpus: float | None = Field(None, ge=0, description="GPUs per actor of a model stage (0.25: four actors share "
                                                       "one GPU)")
    batch_size: int | None = Field(None, gt=0, description="rows per batch handed to the stage")
    pool_size: int | None = Field(None, gt=0, description="actors of a model stage (default: as many as its "
                                                          "`gpus` fit in the GPUs, else 1)")


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
    dataset: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the dataset's name (letters, digits, "
                         "_ . -): its builds go to <out>/<dataset>/<build id>")
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
    _origin: str = PrivateAttr("<spec>")  # the spec file it was read from, for error messages

    @property
    def origin(self) -> str:
        return self._origin

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
                raise SpecError(f"unknown stage {name!r}", hint=did_you_mean(name, sorted(models), "stages"),
                                field=f"stages[{i}]")
            try:
                entries.append(StageEntry(name=name, params=models[name].model_validate(params or {})))
            except ValidationError as e:
                raise spec_error(e, None, models[name], prefix=f"stages[{i}].{name}", thing="parameter",
                                 of=f" of stage {name!r}") from None
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


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model found by following field names `loc` from `model` (None where it is no model)."""
    import typing

    for part in loc:
        field = (model.model_fields if model else {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        options = typing.get_args(ann) or (ann,)
        model = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def spec_error(e: ValidationError, origin: str | None, model: type[BaseModel] | None = None, prefix: str = "",
               thing: str = "field", of: str = "") -> SpecError:
    """A pydantic ValidationError as one SpecError: its first problem, what it is, where (file and field) and how to
    fix it (an unknown name gets the valid ones and the closest; a bad value the field's meaning)."""
    errs = e.errors()
    err = errs[0]
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    inner = (err.get("ctx") or {}).get("error")
    loc = ".".join(str(x) for x in err["loc"])
    field = ".".join(x for x in (prefix, loc) if x) or "(top level)"

    def at(f: str) -> str:
        return f"{origin}, {f}" if origin else f

    if isinstance(inner, UserError):  # raised by a validator of ours: it says what and how already
        field = inner.field or field
        return SpecError(inner.what + more, at(field), inner.hint, field)
    name = str(err["loc"][-1]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, err["loc"][:-1])
        valid = list(parent.model_fields) if parent else []
        return SpecError(f"unknown {thing} {name!r}{of}{more}", at(field), did_you_mean(name, valid, "valid names"),
                         field)
    owner = _model_at(model, err["loc"][:-1])
    info = owner.model_fields.get(name) if owner and name else None
    meaning = f" ({info.description})" if info is not None and info.description else ""
    if err["type"] == "missing":
        return SpecError(f"missing {thing} {name!r}{of}{more}", at(field), f"add `{name}:` to the spec{meaning}", field)
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    got = f", got {_short(err['input'])}" if err["type"] != "value_error" and "input" in err else ""
    return SpecError(f"{msg}{got}{more}", at(field), f"set {field} to a valid value{meaning}", field)


def parse_spec(data: dict, base_dir: Path | None = None, origin: str = "<spec>") -> BuildSpec:
    """Validate a spec dict; relative paths resolve against base_dir; files must exist."""
    if not isinstance(data, dict):
        raise SpecError(f"the spec is not a mapping but a {type(data).__name__}", f"{origin}, top level",
                        "write the spec as YAML keys (version, dataset, source, stages, ...): see the README")
    try:
        spec = BuildSpec.model_validate(data)
    except ValidationError as e:
        raise spec_error(e, origin, BuildSpec) from None
    spec._origin = origin
    base = base_dir or Path.cwd()
    field_name = "urls" if spec.source.urls is not None else "pairs"
    for name, value in ((f"source.{field_name}", spec.source.path), ("out", spec.out), ("catalog", spec.catalog)):
        if value is not None and ("\x00" in str(value) or not str(value).strip()):
            raise SpecError(f"not a usable path: {str(value)!r}", f"{origin}, {name}", "give a file or folder path",
                            name)
        if value is not None and is_uri(value) and "?" in str(value):
            raise SpecError("query options in a storage URI are not supported", f"{origin}, {name}",
                            "give the endpoint and credentials in the AWS_* environment variables", name)
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
        raise SpecError(f"the source cannot be read: {e}", f"{origin}, source.{field_name}",
                        "check the path and, for object storage, the AWS_* variables", f"source.{field_name}") from None
    if not found:
        what = "file" if want_file else "file or folder"
        raise SpecError(f"source {what} not found: {spec.source.path}", f"{origin}, source.{field_name}",
                        "check the path (a relative one is read from the spec file's folder)", f"source.{field_name}")
    return spec


def read_yaml(path: str | Path):
    """A spec file's YAML, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a spec file" if path.is_dir() else "spec file not found"
        raise SpecError(what, str(path), "give the path of a YAML spec (see the README's \"Your own data\")")
    fix = "fix the YAML (a spec is a mapping of keys: version, dataset, source, stages, ...)"
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SpecError(f"not valid YAML: not UTF-8 text ({e})", str(path), fix) from None
    except yaml.YAMLError as e:
        raise SpecError("not valid YAML: " + " ".join(str(e).split()), str(path), fix) from None
    except RecursionError:
        raise SpecError("not valid YAML: nested too deeply", str(path), fix) from None


def load_spec(path: str | Path) -> BuildSpec:
    path = Path(path)
    return parse_spec(read_yaml(path), base_dir=path.parent.resolve(), origin=str(path))
