"""Example data sets on real text for the tasks that the shared IMDB copy has no labels for, built offline
from its reviews with labels a reader can check by hand (`spark-tuning make-example NAME`).

imdb_scores (for regression): `score` = praise words minus criticism words among the review's first 150 words, from the two
fixed lists below (a rough, checkable sentiment intensity; whole words, case-insensitive). The text is the
whole review: a model sees the first data.max_length tokens, which cover those 150 words for almost every
review at max_length 256.

imdb_tags (for multilabel_classification): `tags` = the aspects a review's first 150 words talk about, each by its own word
list below (acting, music, visuals, story); a review may have none or all.
"""

from __future__ import annotations

import os
import re

PRAISE = ("great", "excellent", "wonderful", "best", "love", "loved", "beautiful", "brilliant", "perfect",
          "amazing", "superb", "favorite", "enjoyed", "fantastic", "masterpiece", "fun", "good", "well", "funny",
          "recommend")
CRITICISM = ("bad", "worst", "awful", "boring", "waste", "terrible", "poor", "stupid", "horrible", "dull",
             "lame", "mess", "worse", "pointless", "annoying", "ridiculous", "disappointing", "weak", "crap",
             "unfortunately")
ASPECTS = {
    "acting": ("acting", "actor", "actors", "actress", "performance", "performances", "cast", "role", "played"),
    "music": ("music", "score", "song", "songs", "soundtrack", "musical", "singing"),
    "visuals": ("cinematography", "camera", "visual", "visuals", "effects", "shot", "shots", "photography"),
    "story": ("plot", "story", "storyline", "script", "writing", "ending", "twist"),
}
SCORED_WORDS = 150
WORD = re.compile(r"[a-z']+")


def lexicon_score(text: str, words: int = SCORED_WORDS) -> float:
    """Praise minus criticism words among the first `words` words of `text`."""
    tokens = WORD.findall(text.lower())[:words]
    praise, criticism = set(PRAISE), set(CRITICISM)
    return float(sum(t in praise for t in tokens) - sum(t in criticism for t in tokens))


def aspect_tags(text: str, words: int = SCORED_WORDS) -> list[str]:
    """The aspects (ASPECTS) whose words occur among the first `words` words of `text`."""
    tokens = set(WORD.findall(text.lower())[:words])
    return [name for name, vocab in ASPECTS.items() if tokens & set(vocab)]


# name -> (label column, the rule that labels a review, what the label means)
EXAMPLES = {
    "imdb_scores": ("score", lexicon_score, "praise minus criticism words"),
    "imdb_tags": ("tags", aspect_tags, "the aspects whose words occur"),
}


def write_example(name: str, imdb_parquet: str, out: str, rows: int = 3000, seed: int = 0,
                  overwrite: bool = False) -> str:
    """`rows` seeded IMDB reviews with the label of example `name` (EXAMPLES), as Parquet at `out`, written
    atomically; an existing file is replaced only with `overwrite`."""
    import pandas as pd

    from spark_tuning.errors import InputError

    if name not in EXAMPLES:
        raise InputError(f"no example data set {name!r}: there are {sorted(EXAMPLES)}")
    if os.path.exists(out) and not overwrite:
        raise InputError(f"--out {out} already exists: pass --overwrite to replace it, or choose another path")
    if not os.path.isfile(imdb_parquet):
        raise InputError(f"--imdb {imdb_parquet!r} does not exist: point it at the shared IMDB copy "
                         "(train.parquet with a text column)")
    reviews = pd.read_parquet(imdb_parquet, columns=["text"])
    reviews = reviews.sample(n=min(rows, len(reviews)), random_state=seed).reset_index(drop=True)
    reviews["text"] = reviews["text"].str.replace("<br />", " ", regex=False)
    column, rule, _ = EXAMPLES[name]
    reviews[column] = reviews["text"].map(rule)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.partial-{os.getpid()}"
    try:
        reviews.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
