"""The stage contract, over every registered stage: declarations hold together, params round-trip through YAML,
reasons are declared, declared columns are written with their types, and the report knows every threshold."""
from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from schemas.spec import StageParams, parse_spec, stage_params_models
from stages import registry, stage_class
from stages.base import Column, Decision, Reason, Stage, StageDeclarationError, Threshold

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(registry())


def test_every_module_in_stages_is_a_stage_and_registered():
    modules = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem not in ("__init__", "base"))
    owners = sorted({cls.__module__.rsplit(".", 1)[-1] for cls in registry().values()})
    assert modules == owners, "every file directly in stages/ holds a stage (helpers go in subfolders)"
    assert stage_params_models() == {n: c.Params for n, c in registry().items()}


def test_nothing_in_stages_imports_flows():
    for path in (ROOT / "stages").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "flows" or n.startswith("flows.") for n in names), f"{path} imports {names}"


@pytest.mark.parametrize("name", STAGES)
def test_declarations(name):
    cls = stage_class(name)
    assert issubclass(cls.Params, StageParams) and cls.summary
    owners = {}
    for other, ocls in registry().items():
        for c in ocls.columns:
            assert c.name not in owners, f"{c.name} declared by {owners.get(c.name)} and {other}"
            owners[c.name] = other
    core = set(parse_core_columns())
    for c in cls.columns:
        assert isinstance(c.type, pa.DataType) and c.doc and c.role in ("stat", "category", "detail", "data")
    for r in cls.reasons:
        assert r.doc, r.name
        for col in list(r.stats) + [t.column for t in r.thresholds]:
            assert col in owners or col in core, f"{name}.{r.name} reads {col}, which no stage or core schema has"
        for t in r.thresholds:
            assert cls.Params.model_fields[t.param].annotation is not bool


@pytest.mark.parametrize("name", STAGES)
def test_params_round_trip_through_yaml(name, tmp_path):
    cls = stage_class(name)
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://example.com/a.jpg,a red square\n")
    spec = parse_spec({"dataset": "rt", "source": {"urls": "urls.csv"}, "stages": [{name: {}}]}, tmp_path)
    text = spec.to_yaml()
    again = parse_spec(yaml.safe_load(text), tmp_path)
    assert again.stage_params(name) == spec.stage_params(name) == cls.Params()
    assert again.to_yaml() == text


def test_reasons_a_stage_does_not_declare_are_refused():
    class Loose(Stage):  # not registered: no `name` in its own body
        reasons = (Reason("declared", "a declared reason"),)

    Loose.name = "loose"
    d = Loose.decision(3)
    d.reject([True, False, False], "declared")
    with pytest.raises(StageDeclarationError, match="does not declare"):
        d.reject([False, True, False], "made_up")
    assert d.reason == ["declared", None, None]
    assert Decision(2).reason == [None, None]


def test_inconsistent_declarations_fail_at_class_definition():
    class P(StageParams):
        limit: float = 1.0

    with pytest.raises(StageDeclarationError, match="names parameter 'nope'"):
        type("Bad", (Stage,), {"name": "bad_contract_probe", "Params": P,
                               "reasons": (Reason("r", "doc", ("x",), (Threshold("x", "nope", "min"),)),)})
    with pytest.raises(StageDeclarationError, match="declared twice"):
        type("Twice", (Stage,), {"name": "twice_contract_probe", "Params": P,
                                 "columns": (Column("a", pa.int32(), "a"), Column("a", pa.int32(), "a"))})
    assert "bad_contract_probe" not in registry() and "twice_contract_probe" not in registry()


def test_add_columns_types_and_refuses_undeclared():
    cls = stage_class("basic")
    batch = pa.table({"x": [1, 2]})
    values = {c.name: [None, None] for c in cls.columns}
    out = cls.add_columns(batch, values)
    assert [out.schema.field(c.name).type for c in cls.columns] == [c.type for c in cls.columns]
    with pytest.raises(StageDeclarationError, match="undeclared"):
        cls.add_columns(batch, values | {"surprise": [1, 2]})
    with pytest.raises(StageDeclarationError, match="did not write"):
        cls.add_columns(batch, {k: v for k, v in values.items() if k != "min_side"})


def test_report_knows_every_threshold():
    from reporting.report import deciding_param, thresholds_map

    tm = thresholds_map()
    for name, cls in registry().items():
        for r in cls.reasons:
            for t in r.thresholds:
                assert (name, t.param, t.bound) in tm[t.column]
            if r.deciding_param:
                value = cls.Params().model_dump()[r.deciding_param]
                got = deciding_param({name: {r.deciding_param: 1 if value is None else value}}, r.name, name)
                assert got is not None and got[0] == f"{name}.{r.deciding_param}"


@pytest.mark.slow
def test_demo_build_columns_types_and_reasons_are_declared(demo):
    """The shared demo build: every stage's declared columns are in the shards with their declared types, and
    every reason a stage emitted is one it declares."""
    from tests.builds import read_parts

    spec = yaml.safe_load(Path(demo["spec"]).read_text())
    names = [next(iter(s)) for s in spec["stages"]]
    shards = read_parts(demo["build_dir"], "shards")
    for name in names:
        for c in stage_class(name).columns:
            assert shards.schema.field(c.name).type == c.type, (name, c.name)
    rej = read_parts(demo["build_dir"], "rejects", ["stage", "reason"])
    for stage, reason in set(zip(rej["stage"].to_pylist(), rej["reason"].to_pylist())):
        if stage in names:
            assert reason in {r.name for r in stage_class(stage).reasons}, (stage, reason)
    assert not any(c.startswith("_") for c in shards.column_names)  # private pixel columns never written


def parse_core_columns() -> list[str]:
    from schemas.columns import PAIR_SCHEMA

    return PAIR_SCHEMA.names
