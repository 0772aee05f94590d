"""The caption filters' goals (issues 15 and 23) on hand-labelled LAION alt text (tests/data/laion-alt-text): held on
the validation set, which no filter was tuned on, and not below the issue-15 figures on the tuning set nor the
measured ones on the development set."""
from __future__ import annotations

import csv
import hashlib

import pyarrow.parquet as pq
import pytest

from benchmarks.captions import (DEV_FLOOR, GOALS, SETS, TUNING_FLOOR, VALIDATION_FLOOR, figures, holds_floor,
                                 load_labelled, meets_goals)
from tests.realdata import (LAION, LAION_DEV, LAION_DEV_LABELS, LAION_LABELS, LAION_VALIDATION,
                            LAION_VALIDATION_LABELS)


@pytest.mark.parametrize("texts_path,labels_path,n", [(LAION, LAION_LABELS, 1000),
                                                      (LAION_DEV, LAION_DEV_LABELS, 6990),
                                                      (LAION_VALIDATION, LAION_VALIDATION_LABELS, 2000)])
def test_labels_cover_every_caption_and_match_it(texts_path, labels_path, n):
    texts = pq.read_table(texts_path, columns=["TEXT"]).column("TEXT").to_pylist()
    labels = list(csv.DictReader(labels_path.open()))
    assert [int(r["row"]) for r in labels] == list(range(len(texts))) == list(range(n))
    assert all(hashlib.sha1(t.encode()).hexdigest()[:10] == r["text_sha1"] for t, r in zip(texts, labels))
    assert {r["usable"] for r in labels} == {"yes", "clean", "no"}
    assert all(r["lang"] in ("mixed", "none") or (len(r["lang"]) == 2 and r["lang"].isalpha()) for r in labels)
    assert (labels_path.parent / "LABELS.md").is_file()


def test_the_sets_share_no_caption_and_no_url():
    for column in ("TEXT", "URL"):
        tuning, dev, validation = (set(pq.read_table(p, columns=[column]).column(column).to_pylist())
                                   for p in (LAION, LAION_DEV, LAION_VALIDATION))
        assert not tuning & validation and not dev & validation and not tuning & dev


def test_a_changed_caption_is_detected(tmp_path, monkeypatch):
    rows = LAION_LABELS.read_text().splitlines()
    rows[5] = rows[5].replace(rows[5].split(",")[1], "0000000000")
    bad = tmp_path / "labels.csv"
    bad.write_text("\n".join(rows) + "\n")
    monkeypatch.setitem(SETS, "tuning", (LAION, bad))
    with pytest.raises(ValueError, match="row 4 does not match"):
        load_labelled("tuning")


def _shown(texts, figs, errors) -> str:
    return f"{ {k: round(figs[k], 4) for k in GOALS} }; errors { {k: [texts[i][:70] for i in v] for k, v in errors.items()} }"


@pytest.fixture(scope="module")
def validation():
    texts, labels = load_labelled("validation")
    return texts, *figures(texts, labels)


@pytest.mark.xfail(strict=True, reason="issue 23's goals are not met on the validation set yet (README, Known "
                                       "limits): English rejected 0.64%, non-English caught 71%, junk caught 45%")
def test_caption_goals_on_the_validation_set(validation):
    """Issue 23's acceptance: clean, junk, language keep [en] on 2,000 captions never tuned on. Strict: when the
    goals are met this fails, so the mark comes off."""
    texts, figs, errors = validation
    assert all(meets_goals(figs).values()), _shown(texts, figs, errors)


def test_validation_figures_do_not_regress(validation):
    texts, figs, errors = validation
    assert all(holds_floor(figs, VALIDATION_FLOOR).values()), f"floor {VALIDATION_FLOOR}; " + _shown(
        texts, figs, errors)


def test_tuning_set_figures_do_not_fall_below_issue_15s():
    texts, labels = load_labelled("tuning")
    figs, errors = figures(texts, labels)
    assert all(holds_floor(figs, TUNING_FLOOR).values()), f"floor {TUNING_FLOOR}; " + _shown(texts, figs, errors)


def test_dev_set_figures_do_not_regress():
    texts, labels = load_labelled("dev")
    figs, errors = figures(texts, labels)
    assert all(holds_floor(figs, DEV_FLOOR).values()), f"floor {DEV_FLOOR}; " + _shown(texts, figs, errors)
