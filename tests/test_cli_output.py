"""Output where builds really run: plain progress lines off a terminal; --quiet and --json on every command."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import parser
from flows.engine.progress import PlainReporter

# the positional arguments each command needs to parse
COMMANDS = {
    "build": ["s.yaml"], "demo": [], "refilter": ["b"], "curate": ["s.yaml"], "catalog": [], "train": ["t.yaml"],
    "serve": ["s.yaml"], "report": ["b"], "show": ["b", "uid"], "negatives": ["b"],
    "export": ["b", "--format", "uids", "o.npy"], "eval": [], "stages": [], "verify": ["b"],
}


def test_every_command_takes_quiet_and_json():
    sub = next(a for a in parser()._actions if a.dest == "cmd")
    assert set(sub.choices) == set(COMMANDS), "a command was added: list it here"
    for cmd, positional in COMMANDS.items():
        args = parser().parse_args([cmd, *positional, "--quiet", "--json"])
        assert args.quiet and args.json, cmd


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_plain_reporter_writes_whole_lines_at_a_modest_rate():
    out, clock = io.StringIO(), Clock()
    r = PlainReporter(out, interval_s=10, clock=clock)
    r.start("ingest", 3000)
    for _ in range(300):  # 3,000 rows over 30 s, advanced every 0.1 s
        clock.t += 0.1
        r.advance("ingest", 10)
    r.finish("ingest", "3 shards fetched")
    r.start("write", None)
    clock.t += 2
    r.finish("write", "1 shard")
    lines = out.getvalue().splitlines()
    assert lines[0] == "ingest: started, 3,000 rows"
    progress = lines[1:-3]
    assert 2 <= len(progress) <= 3  # one line per 10 s, not one per advance
    assert progress[0] == "ingest: 1,000/3,000 rows (33%), 100 rows/s, 10s elapsed, eta 20s"
    assert lines[-3] == "ingest: done, 3,000 rows in 30s (100 rows/s); 3 shards fetched"
    assert lines[-2:] == ["write: started", "write: done, 0 rows in 2s (0 rows/s); 1 shard"]
    assert not any(c in out.getvalue() for c in ("\x1b", "\r", "…"))


def test_fused_steps_end_with_their_own_time_and_rate():
    """Stages fused in one pipeline start and end together; each one's last line states its own working seconds
    (the StageTimer's sum, as the closing table does), not the pipeline's 3m23s."""
    from flows.engine.progress import phase, set_reporter

    out, clock = io.StringIO(), Clock()
    set_reporter(PlainReporter(out, interval_s=10, clock=clock))
    try:
        with phase("junk", total=2841) as junk, phase("safety", total=2841) as safety:
            clock.t += 203
            junk(2841, seconds=0.1)
            safety(2841, seconds=190.0)
    finally:
        set_reporter(None)
    lines = out.getvalue().splitlines()
    assert "junk: done, 2,841 rows in 0.1s (28,410 rows/s)" in lines
    assert "safety: done, 2,841 rows in 3m10s (15 rows/s)" in lines


def test_export_quiet_and_json_off_a_terminal(tmp_path):
    shards = tmp_path / "b" / "shards"
    shards.mkdir(parents=True)
    pq.write_table(pa.table({"uid": ["0" * 31 + "1", "0" * 31 + "2"], "text": ["a", "b"], "image": [b"x", b"y"]}),
                   shards / "part-00000.parquet")
    base = [sys.executable, "-m", "flows.cli", "export", str(tmp_path / "b"), "--format", "uids"]
    r = subprocess.run(base + [str(tmp_path / "u.npy"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"uids: 2 samples -> {tmp_path / 'u.npy'}"
    r = subprocess.run(base + [str(tmp_path / "v.npy"), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["uids"] == 2


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_show_and_catalog_accept_the_flags_and_fail_cleanly(tmp_path, flag):
    from flows.cli import main

    assert main(["catalog", "--catalog", str(tmp_path / "none.duckdb"), flag]) == 2
    assert main(["show", str(tmp_path), "abc", flag]) == 2


def test_reasons_are_explained_in_show_and_the_report(tmp_path):
    """too_many_redirects, tls_error, connection_refused, timeout...: `show` and the report say what each means and,
    where a spec value decided it, which one; a stage's reason means what its stage declares."""
    from reporting.report import load_build, render_report
    from reporting.show import format_record, show_record
    from dataio.reasons import REASONS
    from tests.test_fuzz import Elements, make_hostile_build

    build = make_hostile_build(tmp_path, [f"a red box {i}" for i in range(21)])
    rejects = pq.read_table(next((build / "rejects").glob("*.parquet")), columns=["uid", "stage", "reason"])
    by_reason = {r: u for u, s, r in zip(*(rejects[c].to_pylist() for c in ("uid", "stage", "reason")))
                 if s == "ingest"}
    assert {"timeout", "too_many_redirects", "tls_error", "connection_refused", "bad_scheme", "http_404"} <= set(
        by_reason)
    for reason, uid in by_reason.items():
        rec = show_record(build, uid)
        assert rec["rejection"]["reason"] == reason
        meaning = rec["rejection"]["meaning"]
        assert meaning == REASONS.get(reason, "the server answered HTTP 404 (Not Found)"), (reason, meaning)
        assert f"meaning: {meaning}" in format_record(rec)
    assert show_record(build, by_reason["timeout"])["rejection"]["param"] == {"name": "ingest.timeout_s", "value": 5}
    assert show_record(build, by_reason["too_many_redirects"])["rejection"]["param"]["name"] == "ingest.max_redirects"
    html = render_report(load_build(build))
    parsed = Elements(html)
    rows = re.findall(r'<tr data-stage="ingest" data-reason="([a-z_0-9]+)"[^>]*>.*?data-role="meaning">([^<]*)</td>',
                      html)
    cells = dict(rows)
    assert parsed.elements and cells["tls_error"] == REASONS["tls_error"]
    assert cells["too_many_redirects"] == REASONS["too_many_redirects"]
    # a stage's reason: the meaning its stage declares (stages/junk.py), in the report and in `show`
    from html import unescape

    from stages import stage_class

    doc = stage_class("junk").reason("junk_html").doc
    junk = re.search(r'<tr data-stage="junk" data-reason="junk_html"[^>]*>.*?data-role="meaning">([^<]*)</td>', html)
    assert doc and unescape(junk.group(1)) == doc
    uid = next(u for u, s in zip(rejects["uid"].to_pylist(), rejects["stage"].to_pylist()) if s == "junk")
    assert show_record(build, uid)["rejection"]["meaning"] == doc
