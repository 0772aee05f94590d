"""The first hour of a new user (issue 26): every mistake of the issue's list fails before any work with one line
`pairforge: <what> (<where>): <how to fix>`, exit code 2, an error object under --json, no traceback without
--debug, and nothing written or recorded; non-orchestrating commands start no Prefect server; text the tool prints
about itself is true."""
from __future__ import annotations

import fcntl
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from flows.cli import main, parser
from schemas.registry import load_stages

ROOT = Path(__file__).resolve().parents[1]
STAGE_LIST = ", ".join(sorted(load_stages(())))  # every registered stage, as the error lists them


def png(color=(200, 30, 30), size=(96, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def corpus(path: Path, n: int = 4, caption_col: str = "caption") -> Path:
    pq.write_table(pa.table({"image": [png((40 * i, 90, 200)) for i in range(n)],
                             caption_col: [f"a blue square number {i} on white" for i in range(n)]}), path)
    return path


def spec_file(tmp_path: Path, name: str = "spec.yaml", **fields) -> Path:
    data = {"version": 1, "dataset": "mine", "source": {"pairs": "corpus.parquet"}, "stages": ["basic"]} | fields
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_fails(argv, capsys, line: str, obj: dict, nothing_under: Path | None = None):
    """The one line on stderr and exit code 2; under --json the same error as an object on stdout; no traceback;
    no build folder or catalog written under `nothing_under`."""
    rc, out, err = run(argv, capsys)
    assert rc == 2, (rc, err)
    assert err == f"pairforge: {line}\n", err
    assert out == ""
    rc, out, err = run(argv + ["--json"], capsys)
    assert rc == 2 and json.loads(out) == obj, out
    assert err == f"pairforge: {line}\n" and "Traceback" not in err
    if nothing_under is not None:
        assert not list(nothing_under.rglob("catalog.duckdb")), "a catalog was written"
        assert not (nothing_under / "builds").exists(), "a build folder was made"


# --------------------------------------------------------------------------- the spec

def test_missing_spec_file(tmp_path, capsys):
    p = tmp_path / "missing.yaml"
    hint = "give the path of a YAML spec (see the README's \"Your own data\")"
    assert_fails(["build", str(p)], capsys, f"spec file not found ({p}): {hint}",
                 {"error": "spec file not found", "field": None, "where": str(p), "hint": hint}, tmp_path)


@pytest.mark.parametrize("cmd", ["build", "curate"])
def test_misspelled_stage_names_the_closest(tmp_path, capsys, cmd):
    corpus(tmp_path / "corpus.parquet")
    p = spec_file(tmp_path, stages=["clean", {"basik": {"min_side": 10}}])
    hint = f"did you mean 'basic'? stages: {STAGE_LIST}"
    assert_fails([cmd, str(p)], capsys, f"unknown stage 'basik' ({p}, stages[1]): {hint}",
                 {"error": "unknown stage 'basik'", "field": "stages[1]", "where": f"{p}, stages[1]", "hint": hint},
                 tmp_path)


def test_unknown_parameter_lists_the_valid_ones(tmp_path, capsys):
    corpus(tmp_path / "corpus.parquet")
    p = spec_file(tmp_path, stages=[{"basic": {"min_sid": 100}}])
    hint = ("did you mean 'min_side'? valid names: cpus, gpus, batch_size, pool_size, min_side, max_aspect, "
            "min_words, min_chars")
    where = f"{p}, stages[0].basic.min_sid"
    assert_fails(["curate", str(p)], capsys, f"unknown parameter 'min_sid' of stage 'basic' ({where}): {hint}",
                 {"error": "unknown parameter 'min_sid' of stage 'basic'", "field": "stages[0].basic.min_sid",
                  "where": where, "hint": hint}, tmp_path)


def test_unknown_spec_field_and_bad_value(tmp_path, capsys):
    corpus(tmp_path / "corpus.parquet")
    p = spec_file(tmp_path, source={"pair": "corpus.parquet"})
    rc, _, err = run(["curate", str(p)], capsys)
    assert rc == 2 and err == (f"pairforge: unknown field 'pair' ({p}, source.pair): did you mean 'pairs'? valid "
                               "names: urls, pairs, format, url_col, caption_col, image_col, name\n")
    p = spec_file(tmp_path, ingest={"timeout_s": -1})
    rc, _, err = run(["curate", str(p)], capsys)
    assert rc == 2 and err.startswith(f"pairforge: input should be greater than 0, got -1 ({p}, ingest.timeout_s): "
                                      "set ingest.timeout_s to a valid value (deadline of one fetch attempt")


def test_not_a_mapping_and_not_yaml(tmp_path, capsys):
    p = tmp_path / "list.yaml"
    p.write_text("- basic\n- dedup\n")
    rc, _, err = run(["build", str(p)], capsys)
    assert rc == 2 and err.startswith(f"pairforge: the spec is not a mapping but a list ({p}, top level): ")
    p.write_text("dataset: [unclosed\n")
    rc, _, err = run(["build", str(p)], capsys)
    assert rc == 2 and err.startswith("pairforge: not valid YAML: ") and err.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path):
    from schemas.spec import SpecError

    with pytest.raises(SpecError, match="spec file not found"):
        main(["build", str(tmp_path / "missing.yaml"), "--debug"])


def test_refilter_names_the_parameter_it_does_not_know(tmp_path, capsys):
    build = tmp_path / "builds" / "mine" / "20261207T000000-abcdef12"
    (build / "shards").mkdir(parents=True)
    (build / "manifest.json").write_text("{}")
    (build / "spec.yaml").write_text(yaml.safe_dump({"dataset": "mine", "source": {"pairs": "x"},
                                                     "stages": [{"basic": {}}]}))
    rc, out, err = run(["refilter", str(build), "--set", "basic.min_sid=3", "--json"], capsys)
    assert rc == 2 and json.loads(out) == {
        "error": "stage 'basic' has no parameter 'min_sid'", "field": "basic.min_sid", "where": "--set basic.min_sid=3",
        "hint": "did you mean 'min_side'? its parameters: cpus, gpus, batch_size, pool_size, min_side, max_aspect, "
                "min_words, min_chars"}
    assert sorted(x.name for x in build.parent.iterdir()) == [build.name]


# --------------------------------------------------------------------------- the source

def test_missing_source_fails_fast_without_prefect_or_ray(tmp_path):
    """A missing source and a misspelled stage: exit 2 from the checks alone; Prefect and Ray are never imported
    (so no server starts), nothing is written. The time it takes is measured in benchmarks/startup.py."""
    missing = spec_file(tmp_path, "missing.yaml", source={"pairs": "nowhere.parquet"})
    typo = spec_file(tmp_path, "typo.yaml", stages=["basik"])
    corpus(tmp_path / "corpus.parquet")
    code = ("import sys, json; from flows.cli import main; rc = [main(a) for a in json.loads(sys.argv[1])]; "
            "print(json.dumps({'rc': rc, 'loaded': [m for m in ('prefect', 'ray', 'torch') if m in sys.modules]}))")
    argv = [["curate", str(missing)], ["build", str(missing)], ["curate", str(typo)], ["build", str(typo), "--quiet"]]
    r = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"rc": [2, 2, 2, 2], "loaded": []}, (got, r.stderr)
    lines = r.stderr.splitlines()
    where = f"{missing}, source.pairs"
    assert lines[:2] == [f"pairforge: source file or folder not found: {tmp_path / 'nowhere.parquet'} ({where}): "
                         "check the path (a relative one is read from the spec file's folder)"] * 2
    assert lines[2].startswith("pairforge: unknown stage 'basik'") and len(lines) == 4
    assert not (tmp_path / "builds").exists()


def test_missing_caption_column_fails_before_any_work(tmp_path, capsys):
    corpus(tmp_path / "corpus.parquet", caption_col="text")
    p = spec_file(tmp_path)
    where = f"{p}, source.caption_col"
    hint = "set source.caption_col to one of the file's columns; the file has: image, text"
    what = f"{tmp_path / 'corpus.parquet'}: column 'caption' not found"
    assert_fails(["curate", str(p)], capsys, f"{what} ({where}): {hint}",
                 {"error": what, "field": "source.caption_col", "where": where, "hint": hint}, tmp_path)
    (tmp_path / "urls.csv").write_text("URL,caption\nhttp://example.com/a.jpg,a cat\n")
    p = spec_file(tmp_path, "urls.yaml", source={"urls": "urls.csv"})
    rc, _, err = run(["build", str(p)], capsys)
    assert rc == 2 and err == (f"pairforge: {tmp_path / 'urls.csv'}: column 'url' not found ({p}, source.url_col): "
                               "set source.url_col to one of the file's columns; did you mean 'URL'? the file has: "
                               "URL, caption\n")
    assert not (tmp_path / "builds").exists()


def test_a_webdataset_sample_without_a_caption(tmp_path, capsys):
    import tarfile

    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "00000.tar", "w") as tf:
        data = png()
        info = tarfile.TarInfo("000001.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    p = spec_file(tmp_path, source={"pairs": "wds"})
    rc, _, err = run(["curate", str(p)], capsys)
    assert rc == 2 and err == (f"pairforge: {tmp_path / 'wds' / '00000.tar'}: sample '000001' has no caption member "
                               f"(png) ({p}, source.pairs): each sample needs KEY.txt (or KEY.json with a caption)\n")


def test_an_empty_corpus_folder(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    p = spec_file(tmp_path, source={"pairs": "corpus"})
    rc, _, err = run(["curate", str(p)], capsys)
    assert rc == 2 and err == (f"pairforge: {tmp_path / 'corpus'}: the folder holds no files ({p}, source.pairs): "
                               "give a Parquet file or a folder of them, or a folder of WebDataset .tar files\n")


def test_empty_source_fails_only_when_asked(tmp_path, capsys):
    (tmp_path / "urls.csv").write_text("url,caption\n")
    p = spec_file(tmp_path, source={"urls": "urls.csv"})
    where = f"{p}, source.urls"
    hint = "give a source with rows, or leave out --fail-if-empty to record an empty build"
    what = f"the source has no rows: {tmp_path / 'urls.csv'}"
    assert_fails(["build", str(p), "--fail-if-empty"], capsys, f"{what} ({where}): {hint}",
                 {"error": what, "field": "source.urls", "where": where, "hint": hint}, tmp_path)


def test_unwritable_out_and_catalog(tmp_path, capsys):
    corpus(tmp_path / "corpus.parquet")
    p = spec_file(tmp_path, out="corpus.parquet/builds")
    where = f"{p}, out"
    what = (f"out is not a folder that can be written: {tmp_path / 'corpus.parquet'} is a file, so no folder can be "
            "made under it")
    hint = "set `out:` to a folder you can write (default: builds/ beside the spec)"
    assert_fails(["curate", str(p)], capsys, f"{what} ({where}): {hint}",
                 {"error": what, "field": "out", "where": where, "hint": hint}, tmp_path)
    (tmp_path / "cat").mkdir()
    p = spec_file(tmp_path, catalog="cat")
    rc, _, err = run(["curate", str(p)], capsys)
    assert rc == 2 and err == (f"pairforge: the catalog cannot be written: {tmp_path / 'cat'} is a folder, not a file "
                               f"({p}, catalog): set `catalog:` to a DuckDB file you can write (default: "
                               "<out>/catalog.duckdb)\n")
    assert not (tmp_path / "builds").exists()


def test_a_running_build_of_the_dataset_is_named_before_any_start(tmp_path, capsys):
    corpus(tmp_path / "corpus.parquet")
    p = spec_file(tmp_path)
    lock = tmp_path / "builds" / "mine" / ".lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as fh:
        fh.write("pid 4242")
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_EX)
        rc, _, err = run(["curate", str(p)], capsys)
    assert rc == 2 and err == (f"pairforge: another build of dataset 'mine' is running (pid 4242) ({lock}): wait for "
                               "it, or pass --wait to queue behind it\n")
    assert sorted(x.name for x in lock.parent.iterdir()) == [".lock"]


def test_stages_that_do_not_fit_the_machine(tmp_path, capsys):
    corpus(tmp_path / "corpus.parquet")
    p = spec_file(tmp_path, stages=["basic", {"safety": {"cpus": 1}}, {"text": {"cpus": 1}}], ray={"num_cpus": 2})
    rc, out, err = run(["curate", str(p), "--json"], capsys)
    assert rc == 2, err
    obj = json.loads(out)
    assert obj["error"].startswith("the model stages' actor pools hold 2 of the cluster's 2 CPUs (safety: 1 x 1, "
                                   "text: 1 x 1)") and obj["error"].endswith("the pipeline would stall")
    assert obj["where"] == f"{p}, stages" and obj["hint"].startswith("Lower those stages' `cpus` or `pool_size`")
    assert not (tmp_path / "builds").exists()


def test_a_model_not_in_the_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus(tmp_path / "corpus.parquet")
    p = spec_file(tmp_path, stages=[{"align": {"model": "nobody/no-such-clip"}}])
    rc, out, err = run(["curate", str(p), "--json"], capsys)
    obj = json.loads(out)
    assert rc == 2 and obj["where"] == f"{p}, stages[0].align", obj
    assert obj["error"].startswith("align: model 'nobody/no-such-clip' cannot be loaded: ")
    assert "Hugging Face cache" in obj["hint"] and "Real CLIP and SigLIP weights" in obj["hint"]
    assert not (tmp_path / "builds").exists()


# --------------------------------------------------------------------------- catalog, show

def _catalog_with_a_build(tmp_path: Path) -> tuple[Path, Path]:
    from catalogs import Catalog

    out = tmp_path / "elsewhere" / "builds"
    build = out / "mine" / "20261207T000000-abcdef12"
    build.mkdir(parents=True)
    (build / "manifest.json").write_text("{}")
    cat = Catalog(out / "catalog.duckdb")
    cat.start_build(build.name, "mine", "corpus", "abcdef12", "test", "dataset: mine\n", str(build))
    cat.finish_build(build.name, "complete", 4, 3, 1)
    return out / "catalog.duckdb", build


def test_catalog_unknown_id_lists_the_builds(tmp_path, capsys):
    catalog, build = _catalog_with_a_build(tmp_path)
    rc, out, err = run(["catalog", "20261207T000000-abcdef13", "--catalog", str(catalog)], capsys)
    assert rc == 2 and out == ""
    assert err == (f"catalog: {catalog}\npairforge: unknown build id '20261207T000000-abcdef13' (catalog {catalog}): "
                   f"did you mean '{build.name}'? its builds: {build.name}\n")
    rc, out, err = run(["catalog", "nope", "--catalog", str(tmp_path / "none.duckdb"), "--json"], capsys)
    assert rc == 2 and json.loads(out) == {
        "error": f"no catalog at {tmp_path / 'none.duckdb'}", "field": "catalog", "where": "--catalog",
        "hint": "pass --catalog FILE (a build's <out>/catalog.duckdb), or a build folder"}


def test_catalog_is_found_beside_a_build_and_named(tmp_path, capsys, monkeypatch):
    catalog, build = _catalog_with_a_build(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(["catalog", str(build)], capsys)
    assert rc == 0 and err == f"catalog: {catalog}\n" and build.name in out and "complete" in out
    rc, out, _ = run(["catalog", str(build), "--json"], capsys)
    assert rc == 0 and json.loads(out)["catalog"] == str(catalog)
    rc, out, err = run(["catalog", "20261207T0000"], capsys)  # no catalog in the usual places from here
    looked = ", ".join(str(tmp_path / p) for p in ("catalog.duckdb", "builds/catalog.duckdb",
                                                   "demo-out/builds/catalog.duckdb"))
    assert rc == 2 and err == (f"pairforge: no catalog found (looked in {looked}): pass --catalog FILE (a build's "
                               "<out>/catalog.duckdb), or a build folder\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    rc, out, err = run(["catalog", "20261207T0000", "--json"], capsys)  # ./builds/catalog.duckdb, a unique prefix
    assert rc == 0 and json.loads(out)["build_id"] == build.name


def test_show_on_a_folder_that_does_not_exist(tmp_path, capsys):
    where = tmp_path / "nowhere"
    hint = "give a build folder, <out>/<dataset>/<build id>: the one that holds manifest.json, shards/ and rejects/"
    assert_fails(["show", str(where), "abc"], capsys, f"no build folder there: it does not exist ({where}): {hint}",
                 {"error": "no build folder there: it does not exist", "field": None, "where": str(where),
                  "hint": hint})


def test_undecodable_image_detail_has_no_memory_address():
    from dataio.download import precheck_image
    from stages.imaging.decode import decode_image

    assert decode_image(b"not an image")[1] == "UnidentifiedImageError: not an image format PIL can read"
    assert precheck_image(b"GIF89a not really", 10**6) == ("not_an_image: UnidentifiedImageError: not an image "
                                                             "format PIL can read")


# --------------------------------------------------------------------------- output of the libraries

def test_log_records_print_without_tracebacks():
    from flows.cli import hide_log_tracebacks

    stream = io.StringIO()
    logger = logging.getLogger("prefect.pairforge-test")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("bad input")
        except ValueError:
            logger.error("Encountered exception during execution", exc_info=True)
        assert "Traceback" in stream.getvalue()  # what Prefect's ERROR log carries
        stream.truncate(0)
        hide_log_tracebacks()
        try:
            raise ValueError("bad input")
        except ValueError:
            logger.error("Encountered exception during execution", exc_info=True)
        assert stream.getvalue().replace("\x00", "") == "Encountered exception during execution\n"
    finally:
        logger.removeHandler(handler)


QUIET_LOAD = """
import sys
from flows.cli import library_output
quiet = sys.argv[1] == "quiet"
with library_output(quiet, False):
    from transformers import CLIPModel
    model = CLIPModel.from_pretrained("stages/models/shipped/demo-clip")
    model.save_pretrained(sys.argv[2])
"""


def test_quiet_silences_the_model_librarys_progress_bars(tmp_path):
    """--quiet / --json: transformers' "Loading weights" and "Writing model shards" bars (what `eval --json`
    printed), and any tqdm bar, stay off."""
    loud = subprocess.run([sys.executable, "-c", QUIET_LOAD, "loud", str(tmp_path / "a")], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    quiet = subprocess.run([sys.executable, "-c", QUIET_LOAD, "quiet", str(tmp_path / "b")], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr
    assert "Loading weights" in loud.stderr and "Writing model shards" in loud.stderr  # the bars exist
    assert quiet.stderr == "" and quiet.stdout == ""


NO_SERVER = """
import json, sys
from flows.cli import main
rc = main(json.loads(sys.argv[1]))
print(json.dumps({"rc": rc, "prefect": "prefect" in sys.modules, "ray": "ray" in sys.modules}))
"""


@pytest.mark.parametrize("argv", [["stages", "--json"], ["stages", "basic"], ["catalog", "--json"],
                                  ["show", "BUILD", "0"], ["report", "BUILD", "--no-card", "--quiet"],
                                  ["export", "BUILD", "--format", "uids", "OUT"]])
def test_commands_that_do_not_orchestrate_start_no_prefect(tmp_path, argv):
    """show, catalog, stages, report and export never import Prefect (so no temporary server starts) or Ray."""
    catalog, build = _catalog_with_a_build(tmp_path)
    shards = build / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"uid": ["0" * 32], "url": ["http://x.test/a.png"], "text": ["a red square"],
                             "image": [png()]}), shards / "part-00000-000.parquet")
    argv = [str(build) if a == "BUILD" else str(tmp_path / "u.npy") if a == "OUT" else a for a in argv]
    r = subprocess.run([sys.executable, "-c", NO_SERVER, json.dumps(argv)], capture_output=True, text=True,
                       cwd=tmp_path / "elsewhere", timeout=300, env={**__import__("os").environ,
                                                                    "PYTHONPATH": str(ROOT)})
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["prefect"] is False and got["ray"] is False, (argv, got)
    assert "Starting temporary server" not in r.stderr


# --------------------------------------------------------------------------- text that is true

def _all_actions():
    """(command, action) of every option and positional of every command (help and the command list aside)."""
    import argparse

    top = parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if not isinstance(action, argparse._HelpAction):
                yield name, action


def test_every_option_has_help():
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in _all_actions() if not (a.help or "").strip()]
    assert not missing, missing


def test_eval_help_shows_real_defaults():
    from training.demo_eval import N_BUILD, N_EVAL
    from training.eval import PROXY_OPTIM

    r = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    text = " ".join(r.stdout.split("options:", 1)[1].split())
    assert r.returncode == 0 and "training." not in text and not re.search(r"\{[A-Za-z_]+\}", text), text
    for flag, value in (("--n-build", N_BUILD), ("--n-eval", N_EVAL), ("--steps", PROXY_OPTIM["steps"]),
                        ("--batch-size", PROXY_OPTIM["batch_size"])):
        assert f"(default: {value}" in text.split(f"{flag} ", 1)[1].split(" --", 1)[0], flag


def test_stages_prints_parameters_with_defaults_and_meanings(capsys):
    rc, out, _ = run(["stages", "basic"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("basic: ")
    assert "    min_side   = 200  keep images whose shorter side has at least this many pixels" in lines
    assert "  resources:" in lines
    assert "    batch_size = 256  rows per batch handed to the stage" in lines
    assert any(line.startswith("    too_small: ") and "(decided by min_side)" in line for line in lines)
    rc, out, err = run(["stages", "basik"], capsys)
    assert rc == 2 and "did you mean 'basic'?" in err


def test_every_stage_parameter_has_a_meaning():
    from stages import registry

    missing = [f"{n}.{k}" for n, cls in registry().items() for k, f in cls.Params.model_fields.items()
               if not (f.description or "").strip()]
    assert not missing, missing


# --------------------------------------------------------------------------- real builds (Prefect, Ray)

def _curate_corpus(tmp_path: Path, n: int = 4) -> Path:
    corpus(tmp_path / "corpus.parquet", n)
    return spec_file(tmp_path, stages=[{"basic": {"min_side": 50}}], ray={"num_cpus": 2, "object_store_gb": 0.5})


@pytest.mark.slow
def test_empty_sources_make_empty_builds(tmp_path, capsys):
    """An empty corpus and an empty URL list each make a 0-row build with its manifest, no crash."""
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "caption": pa.array([], pa.string())}),
                   tmp_path / "corpus.parquet")
    (tmp_path / "urls.csv").write_text("url,caption\n")
    ray = {"num_cpus": 2, "object_store_gb": 0.5}
    for cmd, source in (("curate", {"pairs": "corpus.parquet"}), ("build", {"urls": "urls.csv"})):
        p = spec_file(tmp_path, f"{cmd}.yaml", dataset=f"empty-{cmd}", source=source, ray=ray)
        rc, out, err = run([cmd, str(p), "--json"], capsys)
        assert rc == 0, err
        result = json.loads(out)
        st = result["stats"]
        assert (st["rows_listed"], st["rows_kept"], st["rows_rejected"]) == (0, 0, 0)
        manifest = json.loads((Path(result["build_dir"]) / "manifest.json").read_text())
        assert manifest["rows"] == 0 and manifest["rejected_rows"] == 0


@pytest.mark.slow
def test_refilter_of_a_copy_writes_beside_it_and_the_card_is_true(tmp_path, capsys):
    """refilter of a copied build writes beside the copy (and its catalog), never into the original's; a curate
    build's card says its images are the corpus's own bytes, with their format."""
    import shutil

    from catalogs import Catalog

    rc, out, err = run(["curate", str(_curate_corpus(tmp_path)), "--json"], capsys)
    assert rc == 0, err
    build = Path(json.loads(out)["build_dir"])
    card = (build / "README.md").read_text()
    assert "Images are the corpus's own bytes, as listed: not resized and not re-encoded" in card
    assert "Formats in the shards: PNG 4." in card and "re-encoded as jpg" not in card

    copy = tmp_path / "copy" / "builds" / "mine" / build.name
    shutil.copytree(build, copy)
    rc, out, err = run(["refilter", str(copy), "--set", "basic.min_side=90"], capsys)
    assert rc == 0, err
    assert err.startswith(f"refilter of {copy}: the new build goes to {copy.parents[1]}/mine/, catalog "
                          f"{copy.parents[1] / 'catalog.duckdb'}\n")
    child = Path(out.split("output: ", 1)[1].splitlines()[0])
    assert child.parent == copy.parent and child != copy
    assert f"catalog: {copy.parents[1] / 'catalog.duckdb'}" in out
    assert [b["build_id"] for b in Catalog(copy.parents[1] / "catalog.duckdb", read_only=True).list_builds()] == [
        child.name]
    original = Catalog(build.parents[1] / "catalog.duckdb", read_only=True).list_builds()
    assert [b["build_id"] for b in original] == [build.name]  # nothing recorded in the original's catalog
    assert sorted(x.name for x in build.parent.iterdir() if x.is_dir()) == [build.name]


FAILING_BUILD = """
import json, sys
from flows.cli import main
sys.exit(main(json.loads(sys.argv[1])))
"""


@pytest.mark.slow
def test_a_failure_inside_the_build_is_one_line(tmp_path):
    """A corpus file that breaks only when read in full passes the checks and fails inside the build: under --json
    the error object on stdout, one line on stderr, no Prefect ERROR log, no traceback (--debug shows it)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    corpus(folder / "a.parquet")
    (folder / "b.parquet").write_bytes((folder / "a.parquet").read_bytes()[:300])  # cut short: no footer
    p = spec_file(tmp_path, source={"pairs": "corpus"}, ray={"num_cpus": 2, "object_store_gb": 0.5})
    r = subprocess.run([sys.executable, "-c", FAILING_BUILD, json.dumps(["curate", str(p), "--json"])], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert "b.parquet" in obj["error"] and "cannot read as parquet" in obj["error"]
    assert "Traceback" not in r.stderr and "ERROR" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        f"pairforge: {obj['error']}" + (f" ({obj['where']})" if obj["where"] else "")
        + (f": {obj['hint']}" if obj["hint"] else "")], r.stderr
