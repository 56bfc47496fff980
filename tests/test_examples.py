"""The example data sets on real text (`spark-tuning make-example`): labels a reader can check by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from spark_tuning.data import examples
from spark_tuning.errors import InputError


def test_the_rules_count_whole_words_in_the_first_150():
    text = "A great cast, a great score. Boring plot? " + "filler " * 200 + "awful"
    assert examples.lexicon_score(text) == 1.0  # great x2, boring x1; "awful" is past word 150
    assert examples.aspect_tags(text) == ["acting", "music", "story"]
    assert examples.aspect_tags("greatly scored") == [] and examples.lexicon_score("greatly") == 0.0


def test_make_example_writes_once_and_refuses_to_overwrite(imdb_path, tmp_path):
    from spark_tuning.cli import main

    out = tmp_path / "tags.parquet"
    args = ["make-example", "imdb_tags", "--imdb", imdb_path, "--out", str(out), "--rows", "50"]
    assert main(args) == 0
    rows = pd.read_parquet(out)
    assert len(rows) == 50 and list(rows.columns) == ["text", "tags"]
    assert [list(t) for t in rows["tags"]] == [examples.aspect_tags(t) for t in rows["text"]]
    assert main(args) == 2  # exists: not replaced without --overwrite
    assert main(args + ["--overwrite"]) == 0
    with pytest.raises(InputError, match="does not exist"):
        examples.write_example("imdb_scores", str(tmp_path / "nope.parquet"), str(tmp_path / "x.parquet"))


def test_entity_tags_mark_genres_roles_and_ratings_in_bio():
    r = examples.entity_tags("A horror film; the supporting actress was fine. Science fiction fans: 7/10, or 8 out of 10!")
    tagged = [(w, t) for w, t in zip(r["words"], r["tags"]) if t != "O"]
    assert tagged == [("horror", "B-GENRE"), ("supporting", "B-ROLE"), ("actress", "I-ROLE"), ("Science", "B-GENRE"),
                      ("fiction", "I-GENRE"), ("7/10", "B-RATING"), ("8", "B-RATING"), ("out", "I-RATING"),
                      ("of", "I-RATING"), ("10", "I-RATING")]
    assert r["words"][:3] == ["A", "horror", "film"] and ";" in r["words"]  # punctuation split off


def test_quoted_pairs_are_half_a_sentence_of_the_text():
    reviews = pd.DataFrame({"text": [f"Review {i} starts here today. It then ends there, {i} times over." for i in range(40)]})
    pairs = examples.quoted_pairs(reviews)
    assert len(pairs) == 40 and (pairs["label"] == "quoted").sum() == 20
    assert [b in a for a, b in zip(pairs["text"], pairs["text_pair"])] == [lab == "quoted" for lab in pairs["label"]]


def test_tagged_sentences_are_half_with_an_entity():
    reviews = pd.DataFrame({"text": ["A fine horror film. It was long, very long indeed. The director tried. "
                                     "I liked none of it at all."] * 4})
    rows = examples.tagged_sentences(reviews, 6)
    has = rows["tags"].map(lambda tags: any(t != "O" for t in tags))
    assert len(rows) == 6 and has.sum() == 3 and all(len(w) == len(t) for w, t in zip(rows["words"], rows["tags"]))
