"""task: token_classification — windows and sub-token alignment, entity decoding against seqeval, the Spark
checks of both row shapes, and one run the whole way (words and tags; 2 processes, windows with a stride,
served and verified by the job, scored in Spark)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pandas as pd
import pytest

from conftest import FILLER, tiny_job_config
from spark_tuning.errors import InputError

PEOPLE = ["alice", "bob", "carol", "dave"]
PLACES = ["paris", "london", "rome", "tokyo"]


def make_conll(n: int, seed: int = 0, long_every: int = 7) -> list[dict]:
    """Rows of filler words with people (a first name, sometimes with 'smith' after it: B-PER I-PER) and places
    (B-LOC); every `long_every`-th row is long enough to need several windows at max_length 32."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words, tags = [], []
        for _ in range(rng.randint(8, 16) * (4 if i % long_every == 0 else 1)):
            r = rng.random()
            if r < 0.12:
                words.append(rng.choice(PEOPLE))
                tags.append("B-PER")
                if rng.random() < 0.5:
                    words.append("smith")
                    tags.append("I-PER")
            elif r < 0.22:
                words.append(rng.choice(PLACES))
                tags.append("B-LOC")
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        rows.append({"words": words, "tags": tags})
    return rows


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    from transformers import AutoTokenizer

    from spark_tuning.text.token_spans import plain_tokenizer

    return plain_tokenizer(AutoTokenizer.from_pretrained(tiny_bert_dir).backend_tokenizer.to_str())


def test_windows_own_every_token_once():
    from spark_tuning.text.token_spans import windows

    for n, budget, stride in [(5, 8, 2), (10, 4, 2), (100, 30, 10), (31, 30, 0), (61, 30, 15)]:
        ws = windows(n, budget, stride)
        assert ws[0][0] == 0 and ws[-1][1] == n and all(b - a <= budget for a, b, _, _ in ws)
        owned = [t for _, _, oa, ob in ws for t in range(oa, ob)]
        assert owned == list(range(n))  # every token once, in order
        assert all(a <= oa and ob <= b for a, b, oa, ob in ws)
        assert all(ws[k + 1][0] == ws[k][1] - stride for k in range(len(ws) - 1) if ws[k + 1][1] < n)


def test_first_sub_token_carries_the_tag_and_long_rows_become_windows(tokenizer):
    from spark_tuning.text.token_spans import encode

    words = ["alice", "smithsonian", "visited", "unbelievably", "paris"] * 6
    tags = [1, 2, 0, 0, 3] * 6  # B-PER I-PER O O B-LOC
    text = " ".join(words)
    spans, wins = encode(tokenizer, text, "word", 16, 4, unit_tags=tags)
    assert len(wins) > 1 and all(len(w["input_ids"]) <= 16 for w in wins)
    assert sorted(u for w in wins for u in w["units"]) == list(range(len(words)))  # each word once
    for w in wins:  # [CLS] ... [SEP], and the labelled positions are the owned first sub-tokens
        assert w["input_ids"][0] == 101 and w["input_ids"][-1] == 102
        labelled = [i for i, x in enumerate(w["labels"]) if x != -100]
        assert labelled == w["positions"] and [w["labels"][i] for i in labelled] == [tags[u] for u in w["units"]]
    _, every = encode(tokenizer, text, "word", 16, 4, label_all=True, unit_tags=tags)
    sub = [x for w in every for x in w["labels"] if x != -100]
    assert len(sub) > len(words) and 1 in sub and 2 in sub  # B- stays on first sub-tokens, I- on the rest
    assert [text[s:e] for s, e in spans[:2]] == ["alice", "smithsonian"]


def test_character_spans_tag_the_tokens_inside_them(tokenizer):
    from spark_tuning.text.token_spans import encode, entities, tag_names

    text = "Visit New York, then Paris."
    spans, (win,) = encode(tokenizer, text, "token", 64, 0, entity_spans=[(6, 14, 0), (21, 26, 0)])
    names = tag_names(["LOC"])
    tags = [win["labels"][p] for p in win["positions"]]
    assert [names[t] for t in tags] == ["O", "B-LOC", "I-LOC", "O", "O", "B-LOC", "O"]
    found = entities(text, spans, tags, np.ones(len(tags)), names)
    assert [(e["text"], e["start"], e["end"]) for e in found] == [("New York", 6, 14), ("Paris", 21, 26)]


def test_entities_and_metrics_match_seqeval():
    from seqeval.metrics import accuracy_score, classification_report
    from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

    from spark_tuning.evaluate.metrics import entity_metrics
    from spark_tuning.text.token_spans import get_entities

    rng = random.Random(3)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(0, 12))] for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in g] for g in gold]
    for seq in gold + pred:  # ill-formed runs included: I- after O, I- of another type
        assert get_entities(seq) == seqeval_entities(seq)
    m = entity_metrics(gold, pred)
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    for t in ("PER", "LOC", "ORG"):
        for k in ("precision", "recall", "f1-score", "support"):
            assert m["per_type"][t][k.replace("-score", "")] == pytest.approx(report[t][k])
    for ours, theirs in (("", "micro avg"), ("_macro", "macro avg"), ("_weighted", "weighted avg")):
        for k in ("precision", "recall", "f1"):
            assert m[k + ours] == pytest.approx(report[theirs][f"{k}-score" if k == "f1" else k]), (k, ours)
    assert m["token_accuracy"] == pytest.approx(accuracy_score(gold, pred))


def _prepare(spark, tmp_path, rows, **data):
    from spark_tuning.config import DataConfig
    from spark_tuning.data.tagged import prepare_tagged

    src = str(tmp_path / "rows.parquet")
    spark.createDataFrame(pd.DataFrame(rows)).coalesce(1).write.parquet(src)
    text = "words" if "words" in rows[0] else "text"
    label = "tags" if "tags" in rows[0] else "spans"
    return prepare_tagged(spark, DataConfig(source=src, text_column=text, label_column=label,
                                            validation_fraction=0.25, **data), seed=1)


def test_both_shapes_read_into_tag_ids_and_spans(spark, tmp_path):
    prepared, unit, freq = _prepare(spark, tmp_path / "words", make_conll(40))
    assert unit == "word" and prepared.labels.names == ("LOC", "PER")
    row = prepared.train.first()
    assert len(row["gold"]) == len(row["text"].split()) and set(row["gold"]) <= {0, 1, 2, 3, 4}
    assert freq["train"]["PER"] > 0 and freq["validation"]["LOC"] > 0
    rows = [{"text": f"{p} went to {q}", "spans": [{"start": 0, "end": len(p), "label": "PER"},
                                                  {"start": len(p) + 9, "end": len(p) + 9 + len(q), "label": "LOC"}]}
            for p, q in zip(PEOPLE * 3, PLACES * 3)] + [{"text": "nothing here", "spans": []}]
    prepared, unit, _ = _prepare(spark, tmp_path / "spans", rows, label_names=["PER", "LOC"])
    assert unit == "token" and prepared.labels.names == ("PER", "LOC")
    got = {r["text"]: list(r["gold"]) for r in prepared.train.collect() + prepared.eval.collect()}
    assert got["alice went to paris"] == [0, 5, 0, 14, 19, 1] and got["nothing here"] == []


def _span(s, e, label="PER"):
    return {"start": s, "end": e, "label": label}


@pytest.mark.parametrize("case, rows, settings, message", [
    ("tags and words of different lengths", [{"words": ["a", "b", "c"], "tags": ["O", "B-PER"]}] * 8, {},
     "8 rows have words and tags of different lengths (e.g. 3 words, 2 tags: 'a b c')"),
    ("a tag that is no BIO tag", [{"words": ["a", "b"], "tags": ["O", "PER"]}] * 8, {},
     "8 rows hold a tag that is not O, B-<type> or I-<type> (e.g. 'PER')"),
    ("a word with a space", [{"words": ["new york", "b"], "tags": ["B-LOC", "O"]}] * 8, {},
     "8 rows hold a word that is empty or holds white space (e.g. 'new york')"),
    ("a span outside the text", [{"text": "alice", "spans": [_span(0, 9)]}] * 8, {},
     "8 rows have a span outside its text or empty (e.g. {start: 0, end: 9, label: PER} in a text of 5 characters)"),
    ("overlapping spans", [{"text": "alice smith", "spans": [_span(6, 11), _span(0, 8)]}] * 8, {},
     "8 rows have overlapping spans (e.g. {start: 0, end: 8, label: PER}, {start: 6, end: 11, label: PER})"),
    ("a type outside label_names", [{"words": [f"a{i}", "b"], "tags": ["B-PER", "B-ORG"]} for i in range(8)], {"label_names": ["PER"]},
     "entity types ['ORG'] (8 entities) are not in data.label_names = ['PER']"),
    ("a type never in training", [{"words": [f"a{i}", "b"], "tags": ["B-PER", "O"]} for i in range(8)], {"label_names": ["PER", "LOC"]},
     "entity types ['LOC'] never occur in the training split"),
    ("one label per row", [{"text": f"t{i}", "tags": "PER"} for i in range(8)], {},
     "task token_classification needs a list of tags per word (with the words as a list column) or a list of "
     "character spans"),
    ("tags for a plain text", [{"text": f"t{i}", "tags": ["O"]} for i in range(8)], {},
     "needs character spans [{start, end, label}] for a text, or the words as a list column"),
])
def test_bad_tagged_rows_are_refused(spark, tmp_path, case, rows, settings, message):
    with pytest.raises(InputError) as e:
        _prepare(spark, tmp_path, rows, **settings)
    assert message in str(e.value) and "data.label_column" in str(e.value), str(e.value)


def test_token_classification_the_whole_way(spark, tmp_path, tiny_bert_dir):
    from spark_tuning import finetune
    from spark_tuning.deploy import score, serving
    from spark_tuning.deploy.serving import post_json

    os.environ["SPARK_TUNING_STATE_DIR"] = str(tmp_path / "servers")
    data = tmp_path / "conll.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_conll(200)))
    cfg = tiny_job_config(tmp_path, str(data), tiny_bert_dir, **{
        "task": "token_classification", "data.text_column": "words", "data.label_column": "tags",
        "data.max_length": 32, "data.stride": 8, "train.epochs": 10, "tracking.log_model": True,
        "deploy.registered_model_name": "tiny-ner", "deploy.verify": True})
    s = finetune.run(cfg, spark=spark)
    m = s.metrics
    assert m["unit"] == "word" and set(m["per_type"]) == {"PER", "LOC"}
    assert m["windows"]["validation"] > m["rows"]  # the long rows became several windows, none cut off
    assert m["f1"] > 0.8 and m["token_accuracy"] > 0.9, m  # word lists: a model that learns finds them
    for name in ("label_map.json", "entity_report.json", "entity_f1.png", "eval_predictions.parquet"):
        assert os.path.isfile(os.path.join(s.output_dir, name)), name
    v = s.deploy["verify"]
    assert v["ok"] and v["differences"] == [] and v["agreement"] >= 0.99, v
    preds = pd.read_parquet(os.path.join(s.output_dir, "eval_predictions.parquet"))
    longest = preds.loc[preds["text"].str.len().idxmax()]
    assert len(longest["entities"]) and max(e["end"] for e in longest["entities"]) > 150  # past the first window
    sample = preds[["row_id", "text"]].head(8)
    location = score.localize(spark, "models:/tiny-ner@candidate", s.tracking_uri, str(tmp_path / "m"))
    scored = score.score(spark.createDataFrame(sample).repartition(2), location).toPandas()
    scored = scored.set_index("row_id").loc[sample["row_id"]]
    server = serving.start("models:/tiny-ner@candidate", tracking_uri=s.tracking_uri)
    try:
        status, body = post_json(server.url + "/invocations", {"inputs": sample["text"].tolist()})
    finally:
        serving.stop(server)
    served = pd.DataFrame(body["predictions"])
    assert status == 200 and list(served.columns) == ["entities"]
    text = sample["text"].iloc[0]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in served["entities"].iloc[0])
    key = lambda es: [(e["label"], e["start"], e["end"]) for e in es]  # noqa: E731
    assert [key(x) for x in scored["prediction"]] == [key(x) for x in served["entities"]]
