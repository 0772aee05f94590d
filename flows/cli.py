"""pairforge command line: build, demo, catalog, train, export, eval."""
from __future__ import annotations

import argparse
import json
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
            f"output: {result['build_dir']}")


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
    return "\n".join(lines)


def make_reporter(args):
    """No progress with --quiet or --json; bars on a terminal; plain lines anywhere else (cron, CI, nohup)."""
    from flows.engine.progress import PlainReporter

    if args.quiet or args.json:
        return None
    return RichReporter() if sys.stdout.isatty() else PlainReporter(sys.stdout)


def _run(fn, args, **kw):
    from flows.engine.progress import set_reporter

    reporter = make_reporter(args)
    set_reporter(reporter)
    try:
        return fn(**kw, quiet=args.quiet or args.json)
    finally:
        if reporter:
            reporter.close()
        set_reporter(None)


def cmd_build(args) -> int:
    from flows.build import build_flow
    from schemas.spec import load_spec

    from flows.build import preflight

    preflight(load_spec(args.spec))  # a bad spec or unloadable model fails here, before Prefect or Ray start
    result = _run(build_flow, args, spec_path=str(args.spec), new=args.new, wait_lock=args.wait)
    _print_summary(result, args.json)
    return 0


def cmd_demo(args) -> int:
    from flows.demo import demo_flow

    result = _run(demo_flow, args, out=str(args.out), size=args.size, seed=args.seed, port=args.port, new=args.new)
    _print_summary(result, args.json)
    return 0


def cmd_refilter(args) -> int:
    from flows.refilter import refilter_flow

    result = _run(refilter_flow, args, build_dir=str(args.build), overrides=args.set,
                  spec_path=str(args.spec) if args.spec else None)
    _print_summary(result, args.json)
    return 0


def cmd_curate(args) -> int:
    from flows.curate import curate_flow

    result = _run(curate_flow, args, spec_path=str(args.spec), new=args.new, wait_lock=args.wait)
    _print_summary(result, args.json)
    return 0


def cmd_catalog(args) -> int:
    from catalogs import Catalog, format_build, format_builds

    path = Path(args.catalog)
    if not path.exists():
        print(f"no catalog at {path}", file=sys.stderr)
        return 1
    cat = Catalog(path, read_only=True)
    if args.build_id:
        d = cat.get_build(args.build_id)
        print(json.dumps(d, indent=2, default=str) if args.json else format_build(d))
    else:
        rows = cat.list_builds(args.dataset)
        print(json.dumps(rows, indent=2, default=str) if args.json else format_builds(rows))
    return 0


def cmd_train(args) -> int:
    from training.train import TrainError, train_flow
    from schemas.train_spec import load_train_spec

    load_train_spec(args.spec)  # a bad spec fails here, before Prefect starts
    try:
        result = train_flow(spec_path=str(args.spec), fresh=args.fresh)
    except TrainError as e:
        print(f"pairforge: {e}", file=sys.stderr)
        return 2
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
    from flows.serve import ServeError, serve_build

    try:
        say = None
        if args.json:
            def say(message, **fields):
                print(json.dumps({"message": message, **fields}), flush=True)
        elif args.quiet:
            def say(message, **fields):
                pass
        serve_build(args.spec, cron=args.cron, name=args.name, port=args.port, prefect_home=args.prefect_home,
                    say=say)
    except ServeError as e:
        print(f"pairforge: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_report(args) -> int:
    from reporting.report import ReportError, write_dataset_card, write_report

    try:
        t0 = time.perf_counter()
        report = write_report(args.build, out=args.out, seed=args.seed)
        card = None if args.no_card else write_dataset_card(args.build)
    except ReportError as e:
        print(f"pairforge: {e}", file=sys.stderr)
        return 1
    out = {"report": str(report), "report_bytes": report.size(), "card": str(card) if card else None,
           "seconds": round(time.perf_counter() - t0, 2)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"report: {report} ({report.size() / 2**20:.2f} MB, {out['seconds']:.1f} s)"
              + (f"\ncard:   {card}" if card else ""))
    return 0


def cmd_show(args) -> int:
    from reporting.report import ReportError
    from reporting.show import format_record, show_record

    try:
        rec = show_record(args.build, args.uid)
    except ReportError as e:
        print(f"pairforge: {e}", file=sys.stderr)
        return 1
    print(json.dumps(rec, indent=2, default=str) if args.json else format_record(rec))
    return 0


def cmd_negatives(args) -> int:
    from flows.negatives import load_negatives_spec, negatives_flow

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
    from loaders.export import ExportError, export

    try:
        out = export(args.build, args.format, args.out, samples_per_tar=args.samples_per_tar)
    except ExportError as e:
        print(f"pairforge: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else
          f"{args.format}: {out.get('samples', out.get('uids'))} samples -> {args.out}")
    return 0


def cmd_verify(args) -> int:
    """Orchestrates nothing: no Prefect, no Ray (dataio.verify reads the files directly)."""
    from dataio.verify import VerifyError, format_result, verify_build

    try:
        result = verify_build(args.build, threads=args.threads)
    except VerifyError as e:
        print(f"pairforge: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    elif not (args.quiet and result["ok"]):
        print(format_result(result))
    return 0 if result["ok"] else 1


def cmd_eval(args) -> int:
    from flows.eval import eval_flow
    from training.eval import EvalError

    try:
        res = eval_flow(out=str(args.out), builds=[str(b) for b in args.builds] or None,
                        eval_set=str(args.eval_set) if args.eval_set else None, losses=args.loss, seeds=args.seed,
                        n_build=args.n_build, n_eval=args.n_eval, steps=args.steps, batch_size=args.batch_size,
                        catalog_path=args.catalog, threads=args.threads, workers=args.workers)
    except EvalError as e:
        print(f"pairforge: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res["results"], indent=2, default=str) if args.json else res["table"])
    return 0


def cmd_stages(args) -> int:
    from stages import registry, stage_table

    if args.markdown:
        print(stage_table())
        return 0
    out = {}
    for name, cls in sorted(registry().items()):
        out[name] = {
            "summary": cls.summary, "version": cls.version, "model": cls.uses_model, "needs_image": cls.needs_image,
            "params": {k: {"default": f.default if f.default_factory is None else f.default_factory(),
                           "description": f.description} for k, f in cls.Params.model_fields.items()},
            "columns": [{"name": c.name, "type": str(c.type), "role": c.role, "doc": c.doc} for c in cls.columns],
            "reasons": [{"name": r.name, "doc": r.doc, "stats": list(r.stats), "param": r.deciding_param}
                        for r in cls.reasons],
        }
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    for name, d in out.items():
        print(f"{name}: {d['summary']}")
        print("  columns: " + ", ".join(c["name"] for c in d["columns"]))
        print("  reasons: " + (", ".join(f"{r['name']} ({r['param']})" if r["param"] else r["name"]
                                         for r in d["reasons"]) or "-"))
    return 0


@contextmanager
def quiet_logs(on: bool):
    """Prefect's INFO lines (flow started, training steps) off while a command runs: through the environment for a
    Prefect not imported yet, and on its logger for one that is; both restored after (main() may run in-process)."""
    if not on:
        yield
        return
    import logging
    import os

    before_env, logger = os.environ.get("PREFECT_LOGGING_LEVEL"), logging.getLogger("prefect")
    before_level = logger.level
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before_level)
        if before_env is None:
            os.environ.pop("PREFECT_LOGGING_LEVEL", None)
        else:
            os.environ["PREFECT_LOGGING_LEVEL"] = before_env


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pairforge", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--quiet", action="store_true",
                        help="no progress output (bars, lines, INFO logs); the result still prints")
        sp.add_argument("--json", action="store_true", help="print the result as JSON (implies --quiet)")

    b = sub.add_parser("build", help="build a dataset from a spec (resumes an unfinished build of the same spec)")
    b.add_argument("spec", type=Path)
    b.add_argument("--new", action="store_true", help="start a new build even if an unfinished one exists")
    b.add_argument("--wait", action="store_true", help="wait for another build of the dataset to finish")
    common(b)
    b.set_defaults(fn=cmd_build)

    d = sub.add_parser("demo", help="generate the synthetic demo corpus, serve it on 127.0.0.1 and build it")
    d.add_argument("--out", type=Path, default=Path("demo-out"))
    d.add_argument("--size", type=int, default=3000, help="pairs in the demo corpus")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--port", type=int, default=8619)
    d.add_argument("--new", action="store_true")
    common(d)
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("refilter", help="re-decide a finished build with new thresholds (no model runs)")
    r.add_argument("build", type=str, help="the finished build's folder (a path or s3://...)")
    r.add_argument("--set", action="append", default=[], metavar="STAGE.PARAM=VALUE")
    r.add_argument("--spec", type=Path, help="a whole spec with the same stages, instead of --set")
    common(r)
    r.set_defaults(fn=cmd_refilter)

    cu = sub.add_parser("curate", help="filter an existing corpus (source.pairs: Parquet with images or WebDataset)")
    cu.add_argument("spec", type=Path)
    cu.add_argument("--new", action="store_true")
    cu.add_argument("--wait", action="store_true", help="wait for another build of the dataset to finish")
    common(cu)
    cu.set_defaults(fn=cmd_curate)

    c = sub.add_parser("catalog", help="list builds, or show one")
    c.add_argument("build_id", nargs="?")
    c.add_argument("--catalog", default="demo-out/builds/catalog.duckdb")
    c.add_argument("--dataset")
    common(c)
    c.set_defaults(fn=cmd_catalog)

    t = sub.add_parser("train", help="train a CLIP model on pairforge shards (resumes from its latest checkpoint)")
    t.add_argument("spec", type=Path)
    t.add_argument("--fresh", action="store_true", help="drop existing checkpoints and start over")
    common(t)
    t.set_defaults(fn=cmd_train)

    sv = sub.add_parser("serve", help="serve the build of a spec on a cron schedule (a local Prefect server unless "
                                      "PREFECT_API_URL is set) until Ctrl-C")
    sv.add_argument("spec", type=Path)
    sv.add_argument("--cron", default="0 3 * * *", help='cron schedule, e.g. "*/30 * * * *" (default: 03:00 daily)')
    sv.add_argument("--name", help="deployment name (default: the spec's dataset)")
    sv.add_argument("--port", type=int, help="port of the local Prefect server (default: a free one)")
    sv.add_argument("--prefect-home", type=Path, help="PREFECT_HOME of the local server (default: <out>/_prefect)")
    common(sv)
    sv.set_defaults(fn=cmd_serve)

    rp = sub.add_parser("report", help="write a build's report.html and dataset card README.md from its files")
    rp.add_argument("build", type=str, help="the finished build's folder (a path or s3://...)")
    rp.add_argument("--out", type=str, help="report path (default: BUILD/report.html)")
    rp.add_argument("--seed", type=int, default=0, help="seed of the sample grids")
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
    ng.add_argument("--editors", help="comma-separated: flip,recolor,render,diffusion")
    ng.add_argument("--max-rows", dest="max_rows", type=int)
    ng.add_argument("--scorer")
    ng.add_argument("--scenes", help="parquet with uid, scene, render_seed (render editor)")
    ng.add_argument("--min-image-sim", dest="min_image_sim", type=float)
    ng.add_argument("--max-image-sim", dest="max_image_sim", type=float)
    common(ng)
    ng.set_defaults(fn=cmd_negatives)

    ex = sub.add_parser("export", help="export a build's pairs: WebDataset tars (img2dataset layout) or a DataComp "
                                       "uid subset (.npy)")
    ex.add_argument("build", type=str, help="the build's folder (its shards/), or a folder / glob of shards")
    ex.add_argument("--format", choices=("webdataset", "uids"), required=True)
    ex.add_argument("out", type=str, help="folder of tars (webdataset) or .npy file (uids)")
    ex.add_argument("--samples-per-tar", type=int, default=10000)
    common(ex)
    ex.set_defaults(fn=cmd_export)

    vf = sub.add_parser("verify", help="check a finished build against its manifest: every file's size and sha256, "
                                       "row counts, schemas, kept + rejected == listed, no uid twice; exits 1 naming "
                                       "each bad file")
    vf.add_argument("build", type=str, help="the build's folder (a path or s3://...)")
    vf.add_argument("--threads", type=int, default=8, help="files checked at a time")
    common(vf)
    vf.set_defaults(fn=cmd_verify)

    ev = sub.add_parser("eval", help="proxy training at equal compute on builds (two to compare), evaluated on an "
                                     "evaluation set: retrieval and SugarCrepe-style compositional accuracy; with no "
                                     "builds, the demo comparisons (raw vs curated; clip vs negclip and tripletclip)")
    ev.add_argument("builds", nargs="*", type=Path, help="build folders (or folders of shards) to train on")
    ev.add_argument("--eval-set", type=Path, help="Parquet (file, folder or build) with image, text and optional "
                                                  "neg_captions (default: fresh demo scenes)")
    ev.add_argument("--loss", action="append", choices=("clip", "negclip", "tripletclip"),
                    help="train each build with this loss (repeatable; default clip)")
    ev.add_argument("--out", type=Path, default=Path("demo-out/eval"))
    ev.add_argument("--seed", type=int, action="append", help="training seed (repeatable; default 0)")
    ev.add_argument("--n-build", type=int, help="demo default: scenes per build (training.demo_eval.N_BUILD)")
    ev.add_argument("--n-eval", type=int, help="evaluation pairs: the first N of the set, or N fresh demo scenes "
                                               "(training.demo_eval.N_EVAL)")
    ev.add_argument("--steps", type=int, help="training steps per run (default: training.eval.PROXY_OPTIM)")
    ev.add_argument("--batch-size", type=int)
    ev.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    ev.add_argument("--workers", type=int, default=1, help="training runs at a time (spawned processes); the "
                                                           "numbers do not depend on it")
    ev.add_argument("--catalog", default="demo-out/builds/catalog.duckdb", help="record metrics here")
    common(ev)
    ev.set_defaults(fn=cmd_eval)

    st = sub.add_parser("stages", help="the registered stages: params, columns and reasons, from their declarations")
    st.add_argument("--markdown", action="store_true", help="the README's stage table")
    common(st)
    st.set_defaults(fn=cmd_stages)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    with quiet_logs(args.quiet or args.json):
        from schemas.spec import SpecError
        from dataio.reasons import IngestError
        from flows.engine.context import BuildError  # not flows.build: commands that orchestrate import Prefect
        from stages.base import StageConfigError

        try:
            return args.fn(args)
        except (SpecError, IngestError, BuildError, StageConfigError) as e:
            print(f"pairforge: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # storage that failed every retry (in the driver or, wrapped by Ray, in a worker)
            print(f"pairforge: {io_error_line(e)}; run the same command again to resume", file=sys.stderr)
            return 3


def io_error_line(e: BaseException) -> str:
    """The error at the root of a Ray task's failure, on one line: `OSError: When reading ... AWS Error ...`."""
    while getattr(e, "cause", None) not in (None, e):  # ray.exceptions.RayTaskError(OSError) carries the original
        e = e.cause
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


if __name__ == "__main__":
    sys.exit(main())
