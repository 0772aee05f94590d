"""A malformed spec fails before any work, naming the file and the field."""
import subprocess
import sys

import pytest
import yaml

from schemas.spec import SpecError, load_spec

GOOD = {"dataset": "t", "source": {"urls": "u.csv"}, "stages": [{"basic": {"min_side": 10}}]}


def write(tmp_path, data, name="spec.yaml"):
    (tmp_path / "u.csv").write_text("url,caption\nhttp://example.com/a.jpg,a red circle\n")
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_good_spec_resolves_defaults_and_paths(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.source.urls == str((tmp_path / "u.csv").resolve())
    assert spec.stage_params("basic").min_side == 10
    assert spec.stage_params("basic").max_aspect == 3.0  # default filled in
    assert spec.out == str((tmp_path / "builds").resolve())
    again = load_spec(write(tmp_path, yaml.safe_load(spec.to_yaml()), "resolved.yaml"))
    assert again.spec_hash() == spec.spec_hash()


@pytest.mark.parametrize(
    "patch, field, expected",
    [
        ({"stages": [{"bogus": {}}]}, "stages[0]", "unknown stage 'bogus'"),
        ({"stages": [{"basic": {"min_side": "big"}}]}, "stages[0].basic.min_side", "valid integer"),
        ({"stages": [{"basic": {"nope": 1}}]}, "stages[0].basic.nope", "unknown parameter 'nope' of stage 'basic'"),
        ({"ingest": {"timeout_s": -1}}, "ingest.timeout_s", "greater than 0"),
        ({"source": {"urls": "missing.parquet"}}, "source.urls", "file not found"),
        ({"source": {"url": "u.csv"}}, "source.url", "unknown field 'url' ("),
        ({"source": {}}, "source", "exactly one of source.urls"),
        ({"source": {"urls": "u.csv", "pairs": "u.csv"}}, "source", "exactly one of source.urls"),
        ({"dataset": "bad name!"}, "dataset", "pattern"),
        ({"stages": [{"basic": {}}, {"basic": {}}]}, "stages", "once"),
        ({"stage_modules": ["pairforge_no_such_stage_module"]}, "stage_modules",
         "cannot import 'pairforge_no_such_stage_module': ModuleNotFoundError: No module named "
         "'pairforge_no_such_stage_module'"),
        ({"stage_modules": ["my stages"]}, "stage_modules", "not a module path: 'my stages'"),
    ],
)
def test_bad_spec_names_file_and_field(tmp_path, patch, field, expected):
    p = write(tmp_path, GOOD | patch)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert str(p) in msg and field in msg and expected in msg, msg


def test_stage_modules_round_trip_and_stay_out_of_the_hash_when_absent(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert "stage_modules" not in spec.to_dict()  # specs written before the field keep their hash
    given = load_spec(write(tmp_path, GOOD | {"stage_modules": ["string"]}, "with.yaml"))  # imports, holds no stage
    assert given.to_dict()["stage_modules"] == ["string"] and given.spec_hash() != spec.spec_hash()
    again = load_spec(write(tmp_path, yaml.safe_load(given.to_yaml()), "again.yaml"))
    assert again.stage_modules == ["string"] and again.spec_hash() == given.spec_hash()


def test_a_stage_module_with_a_broken_stage_is_named(tmp_path, monkeypatch):
    (tmp_path / "pf_broken_stage.py").write_text(
        "from stages.base import Reason, Stage, Threshold\n\n"
        "class Broken(Stage):\n"
        "    name = 'pf_broken'\n"
        "    reasons = (Reason('r', 'doc', ('x',), (Threshold('x', 'nope', 'min'),)),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError, match=r"cannot import 'pf_broken_stage': StageDeclarationError: "
                                        r"stage 'pf_broken' .*parameter 'nope'"):
        load_spec(write(tmp_path, GOOD | {"stage_modules": ["pf_broken_stage"]}))


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(write(tmp_path, "dataset: [unclosed"))
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "absent.yaml")


def test_cli_fails_before_any_work(tmp_path):
    p = write(tmp_path, GOOD | {"stages": [{"bogus": {}}]})
    r = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "unknown stage 'bogus'" in r.stderr and str(p) in r.stderr
    assert not (tmp_path / "builds").exists()  # nothing was started or written
    assert "Prefect" not in r.stderr and "ray" not in r.stderr.lower()


def test_actor_pools_that_would_stall_ray_data_are_refused(tmp_path):
    from flows.engine.context import BuildError
    from flows.engine.resources import fit_resources
    from schemas.spec import load_spec

    p = write(tmp_path, GOOD | {"stages": [{"basic": {}}, {"safety": {"cpus": 0.5}}, {"text": {"cpus": 0.5}},
                                          {"align": {"cpus": 0.5}}]})
    spec = load_spec(p)
    with pytest.raises(BuildError, match="hold 1.5 of the cluster's 2 CPUs"):
        fit_resources(spec, 2.0)
    fit_resources(spec, 4.0)  # enough room: no error


def test_gpu_stages_fill_their_share_of_the_gpus(tmp_path):
    """A GPU stage without pool_size gets as many actors as its gpus fit in its share of the GPUs (several per GPU
    when gpus is fractional), their CPUs shared out; pools that want more GPUs than the cluster has are refused."""
    from flows.engine.context import BuildError
    from flows.engine.resources import fit_resources, pool_sizes

    def spec(*stages):
        return load_spec(write(tmp_path, GOOD | {"stages": [{"basic": {}}, *stages]}))

    quarter = spec({"align": {"gpus": 0.25}})
    assert pool_sizes(quarter, 16, 1) == {1: 4}
    assert pool_sizes(quarter, 16, 2) == {1: 8}
    assert pool_sizes(quarter, 4, 1) == {1: 4}  # four actors on 3 CPUs (4 less one for the reads): 0.75 each
    assert fit_resources(quarter, 4, 1)[1].cpus == 0.75
    assert pool_sizes(spec({"align": {}}), 16, 1) == {1: 1}  # a CPU stage keeps its default pool
    shared = spec({"align": {"gpus": 0.5}}, {"recaption": {"gpus": 0.25, "cpus": 0.5}})
    assert pool_sizes(shared, 16, 1) == {1: 1, 2: 2}  # half a GPU each
    fixed = spec({"align": {"gpus": 0.5, "pool_size": 1}}, {"recaption": {"gpus": 0.25, "cpus": 0.5}})
    assert pool_sizes(fixed, 16, 1) == {1: 1, 2: 2}
    with pytest.raises(BuildError, match="want 2 GPUs .* the cluster has 1"):
        fit_resources(spec({"align": {"gpus": 1, "pool_size": 2}}), 16, 1)
