"""Caption stages on real alt text: the four goals on the hand-labelled LAION set, and rows/s per core.

    .venv/bin/python benchmarks/captions.py [--rows 1000] [--repeat 3] [--errors]

Goals (issue 15), measured on tests/data/laion-alt-text (labels.csv, rules in LABELS.md):
  English captions rejected by language <= 0.5%      non-English captions caught by language >= 85%
  usable captions (yes/clean) rejected by junk <= 0.5%  junk captions (no) caught by junk >= 80%
Speed is CPU time of one process (time.process_time), so it holds on a loaded machine: rows/s per core of
clean, clean + junk (goal >= 20,000) and language (goal >= 5,000), each over the same captions, after setup.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.clean import CleanParams  # noqa: E402

from stages.junk import JunkParams  # noqa: E402

from stages.language import LanguageParams  # noqa: E402
from stages.clean import CleanStage  # noqa: E402
from stages.junk import JunkStage  # noqa: E402
from stages.language import LanguageStage  # noqa: E402
from tests.realdata import LAION, LAION_LABELS  # noqa: E402

GOALS = {"english_rejected": 0.005, "foreign_caught": 0.85, "usable_rejected": 0.005, "junk_caught": 0.80}


def load_labelled() -> tuple[list[str], list[dict]]:
    """LAION captions and their hand labels; fails if a caption does not match its label's hash."""
    texts = pq.read_table(LAION, columns=["TEXT"]).column("TEXT").to_pylist()
    labels = list(csv.DictReader(LAION_LABELS.open()))
    if len(labels) != len(texts):
        raise ValueError(f"{LAION_LABELS}: {len(labels)} labels for {len(texts)} captions")
    for lab in labels:
        i = int(lab["row"])
        if hashlib.sha1(texts[i].encode()).hexdigest()[:10] != lab["text_sha1"]:
            raise ValueError(f"{LAION_LABELS}: row {i} does not match its caption {texts[i][:60]!r}")
    return texts, labels


def run_caption_stages(texts: list[str]) -> dict:
    """clean -> junk and clean -> language over the captions; the decisions and the stats tables."""
    table = pa.table({"text": pa.array(texts, pa.string())})
    clean = CleanStage(CleanParams())(table)
    junk = JunkStage(JunkParams())
    lang = LanguageStage(LanguageParams())
    lang.setup()
    junk_out, lang_out = junk(clean), lang(clean)
    return {"clean": clean, "junk": junk_out, "language": lang_out,
            "junk_reason": JunkStage.decide(junk_out, JunkParams()).reason,
            "language_reason": LanguageStage.decide(lang_out, LanguageParams()).reason}


def figures(texts: list[str], labels: list[dict]) -> tuple[dict, dict]:
    """The four goal figures and, per figure, the rows behind its errors."""
    out = run_caption_stages(texts)
    lang_rej = [r == "language_not_kept" for r in out["language_reason"]]
    junk_rej = [r is not None for r in out["junk_reason"]]
    english = [i for i, lab in enumerate(labels) if lab["lang"] == "en"]
    foreign = [i for i, lab in enumerate(labels) if lab["lang"] not in ("en", "mixed", "none")]
    usable = [i for i, lab in enumerate(labels) if lab["usable"] in ("yes", "clean")]
    junk = [i for i, lab in enumerate(labels) if lab["usable"] == "no"]
    errors = {"english_rejected": [i for i in english if lang_rej[i]],
              "foreign_missed": [i for i in foreign if not lang_rej[i]],
              "usable_rejected": [i for i in usable if junk_rej[i]],
              "junk_missed": [i for i in junk if not junk_rej[i]]}
    figs = {"english_rejected": len(errors["english_rejected"]) / len(english),
            "foreign_caught": 1 - len(errors["foreign_missed"]) / len(foreign),
            "usable_rejected": len(errors["usable_rejected"]) / len(usable),
            "junk_caught": 1 - len(errors["junk_missed"]) / len(junk),
            "counts": {"english": len(english), "foreign": len(foreign), "usable": len(usable), "junk": len(junk)}}
    figs["details"] = {i: (out["language"].column("lang")[i].as_py(), out["language"].column("lang_score")[i].as_py(),
                           out["junk"].column("junk_kind")[i].as_py()) for e in errors.values() for i in e}
    return figs, errors


def meets_goals(figs: dict) -> dict[str, bool]:
    return {"english_rejected": figs["english_rejected"] <= GOALS["english_rejected"],
            "foreign_caught": figs["foreign_caught"] >= GOALS["foreign_caught"],
            "usable_rejected": figs["usable_rejected"] <= GOALS["usable_rejected"],
            "junk_caught": figs["junk_caught"] >= GOALS["junk_caught"]}


def rows_per_core_second(texts: list[str], repeat: int) -> dict[str, float]:
    table = pa.table({"text": pa.array(texts, pa.string())})
    clean, junk, lang = CleanStage(CleanParams()), JunkStage(JunkParams()), LanguageStage(LanguageParams())
    lang.setup()
    junk(clean(table.slice(0, 8)))  # loads what the slug check reads, as setup would
    cleaned = clean(table)

    def rate(fn) -> float:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        return table.num_rows / best

    return {"clean": rate(lambda: clean(table)), "junk": rate(lambda: junk(cleaned)),
            "clean+junk": rate(lambda: junk(clean(table))), "language": rate(lambda: lang(cleaned))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000, help="captions timed (the labelled set, repeated as needed)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per stage; the fastest counts")
    ap.add_argument("--errors", action="store_true", help="list the captions behind each figure's errors")
    args = ap.parse_args()
    texts, labels = load_labelled()
    figs, errors = figures(texts, labels)
    ok = meets_goals(figs)
    c = figs["counts"]
    print(f"labelled LAION alt text: {len(texts)} captions ({c['english']} English, {c['foreign']} other languages, "
          f"{c['usable']} usable, {c['junk']} junk)")
    print(f"English rejected by language   {figs['english_rejected']:.2%}  (goal <= 0.5%)  {'ok' if ok['english_rejected'] else 'MISSED'}")
    print(f"non-English caught by language {figs['foreign_caught']:.2%}  (goal >= 85%)  {'ok' if ok['foreign_caught'] else 'MISSED'}")
    print(f"usable rejected by junk        {figs['usable_rejected']:.2%}  (goal <= 0.5%)  {'ok' if ok['usable_rejected'] else 'MISSED'}")
    print(f"junk caught by junk            {figs['junk_caught']:.2%}  (goal >= 80%)  {'ok' if ok['junk_caught'] else 'MISSED'}")
    if args.errors:
        for name, rows in errors.items():
            for i in rows:
                lang, score, kind = figs["details"][i]
                print(f"  {name:17s} row {i:4d} lang={lang} {score:.2f} junk={kind}: {texts[i][:90]!r}")
    timed = (texts * (args.rows // len(texts) + 1))[:args.rows]
    rates = rows_per_core_second(timed, args.repeat)
    print(f"rows/s per core over {len(timed)} captions (CPU time, fastest of {args.repeat}):")
    print(f"  clean {rates['clean']:,.0f}   junk {rates['junk']:,.0f}   clean + junk {rates['clean+junk']:,.0f} "
          f"(goal >= 20,000)   language {rates['language']:,.0f} (goal >= 5,000)")


if __name__ == "__main__":
    main()
