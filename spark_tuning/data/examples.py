"""Example data sets on real text for the tasks that the shared IMDB copy has no labels for, built offline
from its reviews with labels a reader can check by hand (`spark-tuning make-example NAME`).

imdb_scores (for regression): `score` = praise words minus criticism words among the review's first 150 words, from the two
fixed lists below (a rough, checkable sentiment intensity; whole words, case-insensitive). The text is the
whole review: a model sees the first data.max_length tokens, which cover those 150 words for almost every
review at max_length 256.

imdb_tags (for multilabel_classification): `tags` = the aspects a review's first 150 words talk about, each by its own word
list below (acting, music, visuals, story); a review may have none or all.

imdb_entities (for token_classification): sentences of the reviews, one per row, as `words` (punctuation split off:
the CoNLL shape) and `tags`, BIO tags of three entity types found by the rules below: GENRE (a genre word, or a
two-word genre such as "science fiction"), ROLE (a film-making role such as "director" or "supporting actress")
and RATING ("7/10", "8 out of 10"). Half the rows hold an entity, half none (seeded): entities are rare in
reviews (one word in 150), and a model sees too few of them among whole reviews.

imdb_pairs (for text pairs: classification with data.text_pair_column): `text` is a review's first 150 words,
`text_pair` one sentence (5 words or more) of those 150 words (`label` "quoted") or of another review's
("other"), half of each, seeded. Neither text alone says which: the model must read both.
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
GENRES = ("horror", "comedy", "comedies", "thriller", "thrillers", "drama", "dramas", "western", "westerns",
          "documentary", "musical", "musicals", "romance", "animation", "animated", "sci-fi", "fantasy", "mystery",
          "noir", "satire", "slasher", "melodrama", "cartoon", "anime", "mockumentary", "biopic", "sitcom")
GENRE_PAIRS = (("science", "fiction"), ("romantic", "comedy"), ("black", "comedy"), ("action", "film"),
               ("action", "movie"), ("war", "film"), ("war", "movie"), ("film", "noir"), ("martial", "arts"))
ROLES = ("director", "directors", "actor", "actors", "actress", "actresses", "writer", "writers", "producer",
         "producers", "screenwriter", "cinematographer", "composer", "editor", "narrator", "filmmaker", "filmmakers")
ROLE_PAIRS = (("supporting", "actor"), ("supporting", "actress"), ("lead", "actor"), ("lead", "actress"),
              ("supporting", "cast"))
RATING = re.compile(r"^\d+(\.\d+)?/10$")
SCORED_WORDS = 150
WORD = re.compile(r"[a-z']+")
SPLIT = re.compile(r"\w+(?:[-'/.]\w+)*|[^\w\s]")


def lexicon_score(text: str, words: int = SCORED_WORDS) -> float:
    """Praise minus criticism words among the first `words` words of `text`."""
    tokens = WORD.findall(text.lower())[:words]
    praise, criticism = set(PRAISE), set(CRITICISM)
    return float(sum(t in praise for t in tokens) - sum(t in criticism for t in tokens))


def aspect_tags(text: str, words: int = SCORED_WORDS) -> list[str]:
    """The aspects (ASPECTS) whose words occur among the first `words` words of `text`."""
    tokens = set(WORD.findall(text.lower())[:words])
    return [name for name, vocab in ASPECTS.items() if tokens & set(vocab)]


def entity_tags(text: str, words: int = SCORED_WORDS) -> dict[str, list[str]]:
    """The first `words` words of `text` (punctuation split off) and their BIO tags (GENRE, ROLE, RATING)."""
    return _tagged(SPLIT.findall(text)[:words])


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MAX_SENTENCE_WORDS = 60


def tagged_sentences(reviews, rows: int, seed: int = 0):
    """`rows` sentences of `reviews` (4 to 60 words) with their tags, half with an entity and half without."""
    import pandas as pd

    found = [_tagged(SPLIT.findall(s)[:MAX_SENTENCE_WORDS]) for text in reviews["text"]
             for s in SENTENCE_END.split(text)]
    found = pd.DataFrame([f for f in found if len(f["words"]) >= 4])
    has = found["tags"].map(lambda tags: any(t != "O" for t in tags))
    with_entity = found[has].sample(n=min(int(has.sum()), rows // 2), random_state=seed)
    without = found[~has].sample(n=min(int((~has).sum()), rows - len(with_entity)), random_state=seed)
    return pd.concat([with_entity, without]).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _tagged(ws: list[str]) -> dict[str, list[str]]:
    low = [w.lower() for w in ws]
    tags = ["O"] * len(ws)

    def mark(i: int, n: int, kind: str) -> None:
        if all(t == "O" for t in tags[i:i + n]):
            tags[i:i + n] = [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)

    for i in range(len(ws)):
        if low[i:i + 4][1:] == ["out", "of", "10"] and low[i].isdigit():
            mark(i, 4, "RATING")
        elif RATING.match(low[i]):
            mark(i, 1, "RATING")
        elif tuple(low[i:i + 2]) in GENRE_PAIRS:
            mark(i, 2, "GENRE")
        elif tuple(low[i:i + 2]) in ROLE_PAIRS:
            mark(i, 2, "ROLE")
        elif low[i] in GENRES:
            mark(i, 1, "GENRE")
        elif low[i] in ROLES:
            mark(i, 1, "ROLE")
    return {"words": ws, "tags": tags}


def _per_review(column: str, rule):
    def build(reviews, rows: int, seed: int):
        return reviews[["text"]].assign(**{column: reviews["text"].map(rule)})
    return build


# name -> (its columns, how it is built from the sampled reviews: (reviews, rows, seed) -> rows, what the labels mean)
EXAMPLES = {
    "imdb_scores": ("text, score", _per_review("score", lexicon_score), "praise minus criticism words"),
    "imdb_tags": ("text, tags", _per_review("tags", aspect_tags), "the aspects whose words occur"),
    "imdb_entities": ("words, tags", tagged_sentences, "sentences with genres, film-making roles and ratings tagged"),
    "imdb_pairs": ("text, text_pair, label", lambda reviews, rows, seed: quoted_pairs(reviews, seed),
                   "a review's first 150 words with one of their sentences ('quoted') or another review's ('other')"),
}


def quoted_pairs(reviews, seed: int = 0):
    """`reviews` (text) -> rows of (text, text_pair, label), half of each label: row i is review i's first
    SCORED_WORDS words with one of their sentences ("quoted", even i) or a sentence of another review ("other",
    odd i). Reviews without a sentence of 5 words or more are left out."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    heads, sentences = [], []
    for text in reviews["text"]:
        head = " ".join(text.split()[:SCORED_WORDS])
        found = [s for s in SENTENCE_END.split(head) if len(s.split()) >= 5]
        if found:
            heads.append(head)
            sentences.append(found)
    rows = []
    for i, head in enumerate(heads):
        j = i if i % 2 == 0 else int(rng.choice([k for k in range(len(heads)) if k != i]))
        pick = sentences[j][int(rng.integers(len(sentences[j])))]
        rows.append({"text": head, "text_pair": pick, "label": "quoted" if i % 2 == 0 else "other"})
    return pd.DataFrame(rows)


def write_example(name: str, imdb_parquet: str, out: str, rows: int = 3000, seed: int = 0,
                  overwrite: bool = False) -> str:
    """`rows` rows of example `name` (EXAMPLES) from `rows` seeded IMDB reviews, as Parquet at `out`, written
    atomically; an existing file is replaced only with `overwrite`."""
    import pandas as pd

    from spark_tuning.errors import InputError

    if name not in EXAMPLES:
        raise InputError(f"no example data set {name!r}: there are {sorted(EXAMPLES)}")
    if os.path.exists(out) and not overwrite:
        raise InputError(f"--out {out} already exists: pass --overwrite to replace it, or choose another path")
    if os.path.isdir(out) or os.path.realpath(out) == os.path.realpath(imdb_parquet):
        raise InputError(f"--out {out} is a folder or the IMDB source itself: an example is a new Parquet file; "
                         "choose another path")
    if not os.path.isfile(imdb_parquet):
        raise InputError(f"--imdb {imdb_parquet!r} does not exist: point it at the shared IMDB copy "
                         "(train.parquet with a text column)")
    reviews = pd.read_parquet(imdb_parquet, columns=["text", "label"])
    reviews = reviews.sample(n=min(rows, len(reviews)), random_state=seed).reset_index(drop=True)
    reviews["text"] = reviews["text"].str.replace("<br />", " ", regex=False)
    reviews = EXAMPLES[name][1](reviews, rows, seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.partial-{os.getpid()}"
    try:
        reviews.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
