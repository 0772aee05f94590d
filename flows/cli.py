"""pairforge command line: build, demo, catalog, train, export, eval."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from flows import env  # noqa: F401


class RichReporter:
    """A progress bar per phase: rows done, rows/s, ETA."""

    def __init__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[summary]}"), transient=False)
        self.tasks: dict[str, tuple[int, float]] = {}
        self.progress.start()

    def start(self, phase, total, unit="rows"):
        self.tasks[phase] = (self.progress.add_task(phase, total=total, rate="", summary=""), time.perf_counter())

    def advance(self, phase, n):
        tid, t0 = self.tasks[phase]
        self.progress.advance(tid, n)
        done = self.progress.tasks[tid].completed
        self.progress.update(tid, rate=f"{done / max(time.perf_counter() - t0, 1e-6):,.0f}/s")

    def finish(self, phase, summary="", seconds=None):
        tid, _ = self.tasks[phase]
        t = self.progress.tasks[tid]
        fields = {"summary": summary}
        if seconds is not None:  # a fused pipeline step: its own working time and rate, not the pipeline's
            fields = {"rate": f"{t.completed / max(seconds, 1e-6):,.0f}/s",
                      "summary": f"{seconds:.1f}s of work" + (f"; {summary}" if summary else "")}
        self.progress.update(tid, total=t.completed if t.total is None else t.total, **fields)

    def close(self):
        self.progress.stop()


def _print_summary(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    if not sys.stdout.isatty():  # a log file or a pipe: plain lines, nothing cut to a guessed width
        print(plain_summary(result))
        return
    from rich.console import Console
    from rich.table import Table

    st = result["stats"]
    t = Table(title=f"build {result['build_id']}{' (resumed)' if result.get('resumed') else ''}")
    for c in ("stage", "in", "out", "rejected", "seconds"):
        t.add_column(c, justify="left" if c in ("stage", "rejected") else "right")
    for s in st["stages"]:
        rej = ", ".join(f"{k}={v}" for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1]))
        t.add_row(s["stage"], str(s["rows_in"]), str(s["rows_out"]), rej, f"{s['seconds']:.1f}")
    c = Console()
    c.print(t)
    c.print(f"{st['rows_listed']} listed = {st['rows_kept']} kept + {st['rows_rejected']} rejected\n"
            f"output: {result['build_dir']}" + (f"\ncatalog: {result['catalog']}" if result.get("catalog") else ""))


def plain_summary(result: dict) -> str:
    """The build summary as plain lines (no table drawing), for logs."""
    st = result["stats"]
    lines = [f"build {result['build_id']}{' (resumed)' if result.get('resumed') else ''}"]
    for s in st["stages"]:
        rej = ", ".join(f"{k}={v}" for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {s['stage']}: {s['rows_in']} in, {s['rows_out']} out, {s['seconds']:.1f}s"
                     + (f"; rejected {rej}" if rej else ""))
    lines.append(f"{st['rows_listed']} listed = {st['rows_kept']} kept + {st['rows_rejected']} rejected")
    lines.append(f"output: {result['build_dir']}")
    if result.get("catalog"):
        lines.append(f"catalog: {result['catalog']}")
    return "\n".join(lines)


def make_reporter(args):
    """No progress with --quiet or --json; bars on a terminal; plain lines anywhere else (cron, CI, nohup)."""
    from flows.engine.progress import PlainReporter

    if args.quiet or args.json:
        return None
    return RichReporter() if sys.stdout.isatty() else PlainReporter(sys.stdout)


def prefect_imported(args) -> None:
    """Prefect is imported (and its logging set up) by now: its ERROR log of a failed flow stays one line, the
    command's own error line says the rest (--debug keeps the tracebacks)."""
    if not args.debug:
        hide_log_tracebacks()


def _run(fn, args, spec=None, **kw):
    """Run a flow with the progress reporter the output wants. With `spec`, Prefect's temporary server and Ray
    start side by side first (flows.launch), after every check has passed."""
    from flows.engine.progress import set_reporter

    reporter = make_reporter(args)
    set_reporter(reporter)
    prefect_imported(args)
    try:
        if spec is None:
            return fn(**kw, quiet=args.quiet or args.json)
        from flows.launch import orchestration

        with orchestration(spec):
            return fn(**kw, quiet=args.quiet or args.json)
    finally:
        if reporter:
            reporter.close()
        set_reporter(None)


def cmd_build(args) -> int:
    from flows.preflight import preflight
    from schemas.spec import load_spec

    spec = load_spec(args.spec)  # a bad spec, source, out or model fails here, before Prefect or Ray start
    preflight(spec, fail_if_empty=args.fail_if_empty, wait_lock=args.wait)
    from flows.build import build_flow

    result = _run(build_flow, args, spec, spec_path=str(args.spec), new=args.new, wait_lock=args.wait,
                  fail_if_empty=args.fail_if_empty)
    _print_summary(result, args.json)
    return 0


def cmd_curate(args) -> int:
    from flows.preflight import load_corpus_spec, preflight

    spec = load_corpus_spec(args.spec)
    preflight(spec, fail_if_empty=args.fail_if_empty, wait_lock=args.wait)
    from flows.curate import curate_flow

    result = _run(curate_flow, args, spec, spec_path=str(args.spec), new=args.new, wait_lock=args.wait,
                  fail_if_empty=args.fail_if_empty)
    _print_summary(result, args.json)
    return 0


def cmd_demo(args) -> int:
    from flows.demo import demo_flow

    result = _run(demo_flow, args, out=str(args.out), size=args.size, seed=args.seed, port=args.port, new=args.new)
    _print_summary(result, args.json)
    return 0


def cmd_refilter(args) -> int:
    from flows.refilter import child_spec, refilter_flow
    from dataio.storage import location

    spec = child_spec(location(args.build), args.set, args.spec, args.out, args.catalog)  # checked before any start
    if not (args.quiet or args.json):
        print(f"refilter of {args.build}: the new build goes to {spec.out}/{spec.dataset}/, "
              f"catalog {spec.catalog_path}", file=sys.stderr)
    result = _run(refilter_flow, args, spec, build_dir=str(args.build), overrides=args.set,
                  spec_path=str(args.spec) if args.spec else None, out=args.out, catalog=args.catalog)
    _print_summary(result, args.json)
    return 0


def cmd_catalog(args) -> int:
    from catalogs import Catalog, find_catalog, format_build, format_builds, resolve_build_id

    path, build_id = find_catalog(args.build, args.catalog)
    if not (args.quiet or args.json):
        print(f"catalog: {path}", file=sys.stderr)
    cat = Catalog(path, read_only=True)
    if build_id:
        d = cat.get_build(resolve_build_id(cat, build_id))
        print(json.dumps(d | {"catalog": str(path)}, indent=2, default=str) if args.json else format_build(d))
    else:
        rows = cat.list_builds(args.dataset)
        print(json.dumps({"catalog": str(path), "builds": rows}, indent=2, default=str) if args.json
              else format_builds(rows))
    return 0


def cmd_train(args) -> int:
    from schemas.train_spec import load_train_spec

    load_train_spec(args.spec)  # a bad spec fails here, before Prefect starts
    from training.train import train_flow

    prefect_imported(args)
    result = train_flow(spec_path=str(args.spec), fresh=args.fresh)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        info = result.get("training", {})
        print(f"{result['status']} at step {result['step']}; model: {result.get('model_dir')}"
              + (f"; exported to {result['export']}" if result.get("export") else ""))
        if info.get("heldout"):
            print("held-out:", json.dumps({k: round(v, 4) for k, v in info["heldout"].items()}))
    return 0


def cmd_serve(args) -> int:
    from flows.serve import serve_build

    prefect_imported(args)
    say = None
    if args.json:
        def say(message, **fields):
            print(json.dumps({"message": message, **fields}), flush=True)
    elif args.quiet:
        def say(message, **fields):
            pass
    serve_build(args.spec, cron=args.cron, name=args.name, port=args.port, prefect_home=args.prefect_home, say=say)
    return 0


def cmd_report(args) -> int:
    from reporting.report import write_dataset_card, write_report

    t0 = time.perf_counter()
    report = write_report(args.build, out=args.out, seed=args.seed)
    card = None if args.no_card else write_dataset_card(args.build)
    out = {"report": str(report), "report_bytes": report.size(), "card": str(card) if card else None,
           "seconds": round(time.perf_counter() - t0, 2)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"report: {report} ({report.size() / 2**20:.2f} MB, {out['seconds']:.1f} s)"
              + (f"\ncard:   {card}" if card else ""))
    return 0


def cmd_show(args) -> int:
    from reporting.show import format_record, show_record

    rec = show_record(args.build, args.uid)
    print(json.dumps(rec, indent=2, default=str) if args.json else format_record(rec))
    return 0


def cmd_negatives(args) -> int:
    from flows.negatives import load_negatives_spec, negatives_flow

    prefect_imported(args)
    spec = load_negatives_spec(args.spec).model_dump()
    if args.editors:
        spec["editors"] = [e.strip() for e in args.editors.split(",") if e.strip()]
    for key in ("max_rows", "scorer", "scenes", "min_image_sim", "max_image_sim"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    result = negatives_flow(str(args.build), spec, quiet=args.quiet or args.json)
    st = result["stats"]
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        for ed, s in st["by_editor"].items():
            print(f"{ed:10s} candidates={s['candidates']} made={s['made']} kept={s['kept']} "
                  f"preferred_before={s['preferred_before']} dropped={s['dropped']}")
        print(f"{st['candidates']} candidates = {st['kept']} kept + {st['dropped']} dropped\noutput: {result['dir']}")
    return 0


def cmd_export(args) -> int:
    from loaders.export import export

    out = export(args.build, args.format, args.out, samples_per_tar=args.samples_per_tar)
    print(json.dumps(out, indent=2) if args.json else
          f"{args.format}: {out.get('samples', out.get('uids'))} samples -> {args.out}")
    return 0


def cmd_verify(args) -> int:
    """Orchestrates nothing: no Prefect, no Ray (dataio.verify reads the files directly)."""
    from dataio.verify import format_result, verify_build

    result = verify_build(args.build, threads=args.threads)  # VerifyError: a UserError, one line (main)
    if args.json:
        print(json.dumps(result, indent=2))
    elif not (args.quiet and result["ok"]):
        print(format_result(result))
    return 0 if result["ok"] else 1


def cmd_eval(args) -> int:
    from flows.eval import eval_flow

    prefect_imported(args)
    res = eval_flow(out=str(args.out), builds=[str(b) for b in args.builds] or None,
                    eval_set=str(args.eval_set) if args.eval_set else None, losses=args.loss, seeds=args.seed,
                    n_build=args.n_build, n_eval=args.n_eval, steps=args.steps, batch_size=args.batch_size,
                    catalog_path=args.catalog, threads=args.threads, workers=args.workers)
    print(json.dumps(res["results"], indent=2, default=str) if args.json else res["table"])
    return 0


def stage_descriptions() -> dict:
    """Each registered stage's declarations, resources with the stage's own defaults."""
    from schemas.spec import StageParams
    from stages import registry

    out = {}
    for name, cls in sorted(registry().items()):
        res = cls.default_resources
        params = {}
        for k, f in cls.Params.model_fields.items():
            default = f.default if f.default_factory is None else f.default_factory()
            resource = k in StageParams.model_fields
            params[k] = {"default": getattr(res, k) if resource and default is None else default,
                         "description": f.description, "resource": resource}
        out[name] = {
            "summary": cls.summary, "version": cls.version, "model": cls.uses_model, "needs_image": cls.needs_image,
            "params": params,
            "columns": [{"name": c.name, "type": str(c.type), "role": c.role, "doc": c.doc} for c in cls.columns],
            "reasons": [{"name": r.name, "doc": r.doc, "stats": list(r.stats), "param": r.deciding_param}
                        for r in cls.reasons],
        }
    return out


def format_stage(name: str, d: dict) -> str:
    """One stage as text: what it does, its parameters (default, meaning), resources, columns and reasons."""
    def param_lines(items):
        values = {k: json.dumps(v["default"], default=str) for k, v in items}
        width = max((len(k) for k in values), default=0)
        vwidth = max((len(x) for x in values.values() if len(x) <= 12), default=0)  # a long list: no padding
        return [f"    {k:<{width}} = {values[k]:<{vwidth}}" + (f"  {v['description']}" if v["description"] else "")
                for k, v in items]

    own = [(k, v) for k, v in d["params"].items() if not v["resource"]]
    resources = [(k, v) for k, v in d["params"].items() if v["resource"]]
    lines = [f"{name}: {d['summary']}", "  params:" + ("" if own else " -"), *param_lines(own),
             "  resources:", *param_lines(resources), "  columns:"]
    lines += [f"    {c['name']} ({c['type']}): {c['doc']}" for c in d["columns"]]
    lines.append("  reasons:" + ("" if d["reasons"] else " - (keeps every pair)"))
    lines += [f"    {r['name']}: {r['doc']}" + (f" (decided by {r['param']})" if r["param"] else "")
              for r in d["reasons"]]
    return "\n".join(lines)


def cmd_stages(args) -> int:
    from stages import stage_table

    if args.markdown:
        print(stage_table())
        return 0
    out = stage_descriptions()
    if args.name:
        from schemas.errors import UserError, did_you_mean

        unknown = [n for n in args.name if n not in out]
        if unknown:
            raise UserError(f"unknown stage {unknown[0]!r}", "pairforge stages NAME",
                            did_you_mean(unknown[0], list(out), "stages"), "name")
        out = {n: out[n] for n in args.name}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print("\n\n".join(format_stage(name, d) for name, d in out.items()))
    return 0


class _NoTraceback(logging.Formatter):
    """A handler's formatter without the traceback (a log record's exc_info / stack_info): the command's own error
    line says what went wrong; --debug keeps the tracebacks."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def hide_log_tracebacks() -> None:
    """Every console handler of the root, Prefect's and Ray's loggers prints records without their traceback."""
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
                                       if n.split(".")[0] in ("prefect", "ray", "pairforge")]
    for lg in loggers:
        for h in getattr(lg, "handlers", []):
            if isinstance(h, logging.StreamHandler) and not isinstance(h.formatter, _NoTraceback):
                h.setFormatter(_NoTraceback(h.formatter))


QUIET_ENV = {
    "PREFECT_LOGGING_LEVEL": "CRITICAL",  # Prefect's INFO lines and its ERROR log of a failed flow
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' and the hub's bars ("Loading weights", ...)
    "TQDM_DISABLE": "1",  # any other tqdm bar, in this process and those it spawns
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}


@contextmanager
def library_output(quiet: bool, debug: bool):
    """What the libraries print while a command runs. Quiet (--quiet, --json): no logs below CRITICAL, no progress
    bars, no warnings: through the environment for what is not imported yet (and the processes it spawns), on the
    loggers for what is. Without --debug, log records print without tracebacks. Restored after (main() may run
    in-process, as tests do)."""
    import os
    import warnings

    before_env = {k: os.environ.get(k) for k in QUIET_ENV}
    prefect_logger = logging.getLogger("prefect")
    before_level = prefect_logger.level
    if quiet:
        os.environ.update(QUIET_ENV)
        prefect_logger.setLevel(logging.CRITICAL)
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        try:
            yield
        finally:
            prefect_logger.setLevel(before_level)
            for k, v in before_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def error_of(e: BaseException) -> tuple[dict, int]:
    """({"error", "field", "where", "hint"}, exit code) of an exception that ended a command: 2 for bad input (a
    spec, a source, a path, a name), 1 for anything else (a bug or the environment: --debug shows its traceback)."""
    from schemas.errors import UserError

    while isinstance(getattr(e, "cause", None), BaseException):  # Ray wraps a worker's exception
        e = e.cause
    if isinstance(e, UserError):
        return e.as_json(), e.exit_code
    if isinstance(e, OSError):  # storage that failed every retry (in the driver or, wrapped by Ray, in a worker)
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return {"error": f"{type(e).__name__}: {lines[-1] if lines else ''}", "field": None, "where": None,
                "hint": "run the same command again to resume"}, 3
    expected = tuple(getattr(sys.modules.get(m), n) for m, n in (
        ("flows.engine.context", "BuildError"), ("training.train", "TrainError"), ("flows.serve", "ServeError"),
        ("training.eval", "EvalError"))
        if hasattr(sys.modules.get(m), n))
    text = " ".join(str(e).split())
    if expected and isinstance(e, expected):
        return {"error": text, "field": None, "where": None, "hint": None}, 2
    return {"error": f"{type(e).__name__}: {text}" if text else type(e).__name__, "field": None, "where": None,
            "hint": "rerun with --debug for the traceback"}, 1


def report_error(e: BaseException, as_json: bool) -> int:
    """One line `pairforge: <what> (<where>): <how to fix>` on stderr; under --json the error object on stdout."""
    obj, code = error_of(e)
    line = obj["error"] + (f" ({obj['where']})" if obj["where"] else "") + (f": {obj['hint']}" if obj["hint"] else "")
    print(f"pairforge: {line}", file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps(obj), flush=True)
    return code


class _LazyDefaults(argparse.HelpFormatter):
    """Help strings with {placeholders} filled from training.eval and training.demo_eval only when help is printed:
    importing them costs seconds, which no other use of the parser should pay."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "{" in text:
            from training.demo_eval import N_BUILD, N_EVAL
            from training.eval import PROXY_OPTIM

            for key, value in {"N_BUILD": N_BUILD, "N_EVAL": N_EVAL, **PROXY_OPTIM}.items():
                text = text.replace("{" + key + "}", str(value))
        return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pairforge", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def common(sp):
        sp.add_argument("--quiet", action="store_true",
                        help="no progress output (bars, lines, library logs and bars); the result still prints")
        sp.add_argument("--json", action="store_true", help="print the result as JSON, or an error as a JSON "
                                                            "object {error, field, where, hint} (implies --quiet)")
        sp.add_argument("--debug", action="store_true", help="show the Python traceback of an error")

    def fail_if_empty(sp):
        sp.add_argument("--fail-if-empty", dest="fail_if_empty", action="store_true",
                        help="fail before any work when the source has no rows (default: record an empty build)")

    b = sub.add_parser("build", help="build a dataset from a spec (resumes an unfinished build of the same spec)")
    b.add_argument("spec", type=Path, help="the build spec (YAML; see the README's \"Your own data\")")
    b.add_argument("--new", action="store_true", help="start a new build even if an unfinished one exists")
    b.add_argument("--wait", action="store_true", help="wait for another build of the dataset to finish")
    fail_if_empty(b)
    common(b)
    b.set_defaults(fn=cmd_build)

    d = sub.add_parser("demo", help="generate the synthetic demo corpus, serve it on 127.0.0.1 and build it")
    d.add_argument("--out", type=Path, default=Path("demo-out"),
                   help="folder of the corpus, spec and builds (default: demo-out)")
    d.add_argument("--size", type=int, default=3000, help="pairs in the demo corpus (default: 3000)")
    d.add_argument("--seed", type=int, default=0, help="seed of the generated corpus (default: 0)")
    d.add_argument("--port", type=int, default=8619, help="port of the corpus's loopback server (default: 8619)")
    d.add_argument("--new", action="store_true", help="start a new build even if an unfinished one exists")
    common(d)
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("refilter", help="re-decide a finished build with new thresholds (no model runs); the new "
                                        "build goes beside it")
    r.add_argument("build", type=str, help="the finished build's folder (a path or s3://...)")
    r.add_argument("--set", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                   help="a new parameter value (repeatable), e.g. --set basic.min_side=100")
    r.add_argument("--spec", type=Path, help="a whole spec with the same stages, instead of --set")
    r.add_argument("--out", type=str, help="where the new build goes (default: beside BUILD, in its <out>)")
    r.add_argument("--catalog", type=str, help="the catalog to record it in (default: <out>/catalog.duckdb)")
    common(r)
    r.set_defaults(fn=cmd_refilter)

    cu = sub.add_parser("curate", help="filter an existing corpus (source.pairs: Parquet with images or WebDataset)")
    cu.add_argument("spec", type=Path, help="the build spec, with source.pairs (see the README's \"Your own data\")")
    cu.add_argument("--new", action="store_true", help="start a new build even if an unfinished one exists")
    cu.add_argument("--wait", action="store_true", help="wait for another build of the dataset to finish")
    fail_if_empty(cu)
    common(cu)
    cu.set_defaults(fn=cmd_curate)

    c = sub.add_parser("catalog", help="list the builds of a catalog, or show one (shards, stage stats, lineage)")
    c.add_argument("build", nargs="?", metavar="BUILD",
                   help="a build id (or a unique prefix), or a build folder (its catalog is <out>/catalog.duckdb)")
    c.add_argument("--catalog", help="the catalog file (default: beside BUILD when it is a folder, else the first "
                                     "of ./catalog.duckdb, ./builds/catalog.duckdb, ./demo-out/builds/catalog.duckdb)")
    c.add_argument("--dataset", help="list only this dataset's builds")
    common(c)
    c.set_defaults(fn=cmd_catalog)

    t = sub.add_parser("train", help="train a CLIP model on pairforge shards (resumes from its latest checkpoint)")
    t.add_argument("spec", type=Path, help="the training spec (YAML; demo/train_demo.yaml is an example)")
    t.add_argument("--fresh", action="store_true", help="drop existing checkpoints and start over")
    common(t)
    t.set_defaults(fn=cmd_train)

    sv = sub.add_parser("serve", help="serve the build of a spec on a cron schedule (a local Prefect server unless "
                                      "PREFECT_API_URL is set) until Ctrl-C")
    sv.add_argument("spec", type=Path, help="the build spec to build on schedule")
    sv.add_argument("--cron", default="0 3 * * *", help='cron schedule, e.g. "*/30 * * * *" (default: 03:00 daily)')
    sv.add_argument("--name", help="deployment name (default: the spec's dataset)")
    sv.add_argument("--port", type=int, help="port of the local Prefect server (default: a free one)")
    sv.add_argument("--prefect-home", type=Path, help="PREFECT_HOME of the local server (default: <out>/_prefect)")
    common(sv)
    sv.set_defaults(fn=cmd_serve)

    rp = sub.add_parser("report", help="write a build's report.html and dataset card README.md from its files")
    rp.add_argument("build", type=str, help="the finished build's folder (a path or s3://...)")
    rp.add_argument("--out", type=str, help="report path (default: BUILD/report.html)")
    rp.add_argument("--seed", type=int, default=0, help="seed of the sample grids (default: 0)")
    rp.add_argument("--no-card", action="store_true", help="do not rewrite README.md")
    common(rp)
    rp.set_defaults(fn=cmd_report)

    sh = sub.add_parser("show", help="print one record of a build with its stats, and why it was rejected")
    sh.add_argument("build", type=str, help="the build's folder (a path or s3://...)")
    sh.add_argument("uid", help="a uid, or a unique prefix of one")
    common(sh)
    sh.set_defaults(fn=cmd_show)

    ng = sub.add_parser("negatives", help="counterfactual hard-negative images of a finished build (validated by "
                                          "the scorer) -> BUILD/negatives")
    ng.add_argument("build", type=Path, help="the finished build's folder")
    ng.add_argument("--spec", type=Path, help="YAML of negatives.images.NegativesImageSpec fields")
    ng.add_argument("--editors", help="comma-separated: flip,recolor,render,diffusion (default: flip,recolor,render)")
    ng.add_argument("--max-rows", dest="max_rows", type=int, help="positives to use, the first by uid (default: all)")
    ng.add_argument("--scorer", help="CLIP-like scorer validating the images: a model folder or name "
                                     "(default: demo-clip)")
    ng.add_argument("--scenes", help="parquet with uid, scene, render_seed (render editor; default: labels.parquet "
                                     "beside the build's source)")
    ng.add_argument("--min-image-sim", dest="min_image_sim", type=float,
                    help="below this image similarity a negative is too_different (default: 0.0)")
    ng.add_argument("--max-image-sim", dest="max_image_sim", type=float,
                    help="above this image similarity a negative is too_similar (default: 0.998)")
    common(ng)
    ng.set_defaults(fn=cmd_negatives)

    ex = sub.add_parser("export", help="export a build's pairs: WebDataset tars (img2dataset layout) or a DataComp "
                                       "uid subset (.npy)")
    ex.add_argument("build", type=str, help="the build's folder (its shards/), or a folder / glob of shards")
    ex.add_argument("--format", choices=("webdataset", "uids"), required=True,
                    help="webdataset: tars of KEY.jpg/.txt/.json; uids: a .npy of the kept uids")
    ex.add_argument("out", type=str, help="folder of tars (webdataset) or .npy file (uids)")
    ex.add_argument("--samples-per-tar", type=int, default=10000, help="samples per tar (default: 10000)")
    common(ex)
    ex.set_defaults(fn=cmd_export)

    vf = sub.add_parser("verify", help="check a finished build against its manifest: every file's size and sha256, "
                                       "row counts, schemas, kept + rejected == listed, no uid twice; exits 1 naming "
                                       "each bad file")
    vf.add_argument("build", type=str, help="the build's folder (a path or s3://...)")
    vf.add_argument("--threads", type=int, default=8, help="files checked at a time")
    common(vf)
    vf.set_defaults(fn=cmd_verify)

    ev = sub.add_parser("eval", formatter_class=_LazyDefaults,
                        help="proxy training at equal compute on builds (two to compare), evaluated on an "
                             "evaluation set: retrieval and SugarCrepe-style compositional accuracy; with no "
                             "builds, the demo comparisons (raw vs curated; clip vs negclip and tripletclip)")
    ev.add_argument("builds", nargs="*", type=Path, help="build folders (or folders of shards) to train on")
    ev.add_argument("--eval-set", type=Path, help="Parquet (file, folder or build) with image, text and optional "
                                                  "neg_captions (default: fresh demo scenes)")
    ev.add_argument("--loss", action="append", choices=("clip", "negclip", "tripletclip"),
                    help="train each build with this loss (repeatable; default: clip)")
    ev.add_argument("--out", type=Path, default=Path("demo-out/eval"), help="working folder (default: demo-out/eval)")
    ev.add_argument("--seed", type=int, action="append", help="training seed (repeatable; default: 0)")
    ev.add_argument("--n-build", type=int, help="with no builds: demo scenes per build (default: {N_BUILD})")
    ev.add_argument("--n-eval", type=int, help="evaluation pairs: the first N of the set, or N fresh demo scenes "
                                               "(default: {N_EVAL} scenes)")
    ev.add_argument("--steps", type=int, help="training steps per run (default: {steps})")
    ev.add_argument("--batch-size", type=int, help="training batch size (default: {batch_size})")
    ev.add_argument("--threads", type=int, default=1, help="torch threads per training run (default: 1)")
    ev.add_argument("--workers", type=int, default=1, help="training runs at a time (spawned processes); the "
                                                           "numbers do not depend on it (default: 1)")
    ev.add_argument("--catalog", default="demo-out/builds/catalog.duckdb",
                    help="record metrics here (default: demo-out/builds/catalog.duckdb)")
    common(ev)
    ev.set_defaults(fn=cmd_eval)

    st = sub.add_parser("stages", help="the registered stages: parameters (default, meaning), resources, columns "
                                       "and reasons, from their declarations")
    st.add_argument("name", nargs="*", help="only these stages (default: all)")
    st.add_argument("--markdown", action="store_true", help="the README's stage table")
    common(st)
    st.set_defaults(fn=cmd_stages)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    quiet = args.quiet or args.json
    with library_output(quiet, args.debug):
        try:
            return args.fn(args)
        except KeyboardInterrupt:
            print("pairforge: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader went away (`| head`): nothing more to say
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except Exception as e:
            if args.debug:
                raise
            return report_error(e, args.json)


if __name__ == "__main__":
    sys.exit(main())
