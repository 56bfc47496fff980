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
