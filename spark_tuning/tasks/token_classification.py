"""Token classification (named entities): text -> entities with character offsets, a tag head per token.

Rows are words with BIO / IOB2 tags (the CoNLL shape) or a text with character spans (data/tagged.py
checks either). Spark tokenizes each row into windows of at most data.max_length tokens that overlap by
data.stride (text/tagging.py, text/token_spans.py): nothing is cut off. A unit's first sub-token carries its
tag (data.label_all_subtokens: every sub-token, B- turned into I- after the first); the head is transformers'
token-classification head with its cross-entropy over the labelled tokens. Evaluation joins each validation
row's windows back together and scores units (words, or tokens for span rows): entity-level precision,
recall and F1 per type and overall by seqeval's definition (exact type and boundaries; micro, macro and
weighted), and token accuracy. The served model answers each text's entities: label, start, end (character
offsets), text and score (the mean probability of its units), decoded as the evaluation decodes them.
"""

from __future__ import annotations

import json
import os

import numpy as np

from spark_tuning.tasks.base import Staged
from spark_tuning.tasks.classification import PREDICTIONS, TextRowsTask

METRICS = ("precision", "recall", "f1", "token_accuracy")
REPORT = "entity_report.json"


def predict_tokens(model, shard, plan, pad_id: int, device: str, precision: str) -> dict:
    """Every window of `shard`: its row id and the tag probabilities of its labelled tokens (in order);
    the loss summed over labelled tokens, and their count."""
    import torch

    from spark_tuning.loader.batches import iterate
    from spark_tuning.train.feed import to_device
    from spark_tuning.train.precision import autocast

    model.eval()
    row_ids, probs, loss_sum, tokens = [], [], 0.0, 0
    with torch.inference_mode(), autocast(precision, device):
        for index, batch in iterate(shard, plan, pad_id):
            out = model(**to_device(batch, device))
            mask = batch["labels"] != -100
            if mask.any():
                loss_sum += float(out.loss) * int(mask.sum())
                tokens += int(mask.sum())
            p = torch.softmax(out.logits.float(), dim=-1).cpu().numpy()
            for r, i in enumerate(index):
                row_ids.append(int(shard.row_ids[i]))
                probs.append(p[r][mask[r]])
    return {"row_ids": row_ids, "probs": probs, "loss_sum": loss_sum, "tokens": tokens}


def join_windows(eval_path: str, row_ids: list[int], probs: list[np.ndarray]) -> dict[str, list]:
    """The validation rows (docs) again from their windows: per doc, the gold and predicted tag id of
    every unit and the predicted tag's probability."""
    import pyarrow.parquet as pq

    from spark_tuning.text.token_spans import unit_predictions

    table = pq.read_table(eval_path, columns=["row_id", "doc_id", "units", "labels", "unit_spans"]).to_pandas()
    by_row = dict(zip(row_ids, probs))
    docs: dict[int, dict] = {}
    for row in table.itertuples(index=False):
        doc = docs.setdefault(int(row.doc_id), {"n": len(row.unit_spans) // 2, "units": [], "probs": [], "gold": []})
        labels = np.asarray(row.labels)
        doc["units"].append(list(row.units))
        doc["gold"].append(labels[labels != -100])
        doc["probs"].append(by_row[int(row.row_id)])
    out = {"doc_ids": [], "gold": [], "pred": [], "scores": []}
    for doc_id in sorted(docs):
        d = docs[doc_id]
        gold = np.zeros(d["n"], dtype=np.int64)
        for units, tags in zip(d["units"], d["gold"]):
            gold[units] = tags
        pred, scores = unit_predictions(d["n"], d["units"], d["probs"])
        out["doc_ids"].append(doc_id)
        out["gold"].append(gold.tolist())
        out["pred"].append(pred.tolist())
        out["scores"].append(scores.tolist())
    return out


class TokenClassification(TextRowsTask):
    name = "token_classification"
    truncates = False  # long documents become several windows (data.stride)
    auto_model = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    eval_metrics = ("eval_loss", "eval_f1", "eval_precision", "eval_recall", "eval_token_accuracy")
    reads_pairs = False
    answer_columns = ("entities",)
    logged_files = ("label_map.json", REPORT, "entity_f1.png")

    def config_problems(self, cfg) -> list[str]:
        p = super().config_problems(cfg) + self.petastorm_problems(cfg)
        d = cfg.data
        if d.stride < 0 or d.stride > d.max_length // 2:
            p.append(f"data.stride = {d.stride} must be between 0 and half of data.max_length ({d.max_length // 2}): "
                     "windows overlap by that many tokens")
        return p

    def check_model(self, cfg, src, tokenizer, model_config) -> dict:
        from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

        from spark_tuning.errors import InputError
        from spark_tuning.text.tagging import backend_json
        from spark_tuning.text.token_spans import plain_tokenizer, special_tokens

        kind = getattr(model_config, "model_type", None)
        if kind not in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES:
            raise InputError(f"model.source = {src.location!r} is a {kind!r} model, which transformers has no token "
                             "classification head for: choose a model such as BERT, RoBERTa, GPT-2 or Llama")
        prefix, suffix = special_tokens(plain_tokenizer(backend_json(src, cfg.model)))
        budget = cfg.data.max_length - len(prefix) - len(suffix)
        if cfg.data.stride > budget // 2:
            raise InputError(f"data.stride = {cfg.data.stride}: a window holds {budget} tokens of text (data.max_length "
                             f"{cfg.data.max_length} minus {len(prefix) + len(suffix)} special tokens), and windows may "
                             f"overlap by half of that at most: set data.stride to at most {budget // 2}")
        return {}

    def stage(self, spark, cfg, src, info: dict, staging: str) -> Staged:
        from spark_tuning.data.tagged import prepare_tagged
        from spark_tuning.loader.backends import stage_as
        from spark_tuning.tasks.classification import length_stats
        from spark_tuning.text.tagging import backend_json, tag_windows
        from spark_tuning.text.token_spans import tag_names

        d = cfg.data
        prepared, unit, frequency = prepare_tagged(spark, d, cfg.seed)
        tokenizer_json = backend_json(src, cfg.model)
        n_files = 2 * cfg.distributed.num_processes
        train = tag_windows(prepared.train, tokenizer_json, unit, d.max_length, d.stride, d.label_all_subtokens)
        train_ref = stage_as("parquet", train.drop("text", "doc_id", "window", "units", "unit_spans"),
                             os.path.join(staging, "train"), n_files, d.max_length)
        # Validation windows label first sub-tokens only: one prediction per unit, whatever training did.
        evaluation = tag_windows(prepared.eval, tokenizer_json, unit, d.max_length, d.stride, False)
        eval_ref = stage_as("parquet", evaluation, os.path.join(staging, "eval"), n_files, d.max_length)
        stats = length_stats(spark, train_ref.path, d.max_length)
        names = tag_names(list(prepared.labels.names))
        figures = {"train_rows": prepared.counts["train_rows"], "eval_rows": prepared.counts["eval_rows"],
                   "train_windows": train_ref.num_rows, "eval_windows": eval_ref.num_rows,
                   "mean_tokens_per_window": round(stats["mean_length"], 1), "unit": unit,
                   "entity_types": list(prepared.labels.names), "entities": frequency, **info}
        extras = {"unit": unit, "stride": d.stride, "eval_path": eval_ref.path}
        return Staged(train_ref, eval_ref, figures, extras, id2label=dict(enumerate(names)),
                      frames=[prepared.train, prepared.eval])

    def profile_rows(self, spark, cfg, src, info: dict):
        """The training windows' lengths, as the job cuts documents into them (a long document becomes
        several windows: nothing is truncated), and the entities per type."""
        from spark_tuning.data.tagged import prepare_tagged
        from spark_tuning.tasks.base import Profiled
        from spark_tuning.text.tagging import backend_json, tag_windows

        d = cfg.data
        prepared, unit, frequency = prepare_tagged(spark, d, cfg.seed)
        tokenizer_json = backend_json(src, cfg.model)
        train, evaluation = (tag_windows(df, tokenizer_json, unit, d.max_length, d.stride, False).select("length")
                             for df in (prepared.train, prepared.eval))
        return Profiled(train, evaluation, dict(prepared.counts), frequency, None,
                        frames=[prepared.train, prepared.eval])

    def load_model(self, cfg, src, tokenizer, id2label: dict, device: str, dtype):
        from spark_tuning.model.sources import build_classifier

        return build_classifier(src, cfg.model, id2label, tokenizer.pad_token_id, device, dtype,
                                auto_class=self.auto_model)

    def evaluate(self, model, shard, cfg, extras: dict, tokenizer, ctx, precision: str, step: int, tracker,
                 id2label: dict) -> tuple[dict, dict]:
        """Every rank predicts its windows; every rank joins all of them into rows and scores the units."""
        from spark_tuning.evaluate.metrics import entity_metrics
        from spark_tuning.loader.batches import plan_eval_batches
        from spark_tuning.train import distributed

        local = predict_tokens(model, shard, plan_eval_batches(shard, cfg.train.eval_batch_size),
                               tokenizer.pad_token_id, ctx.device, precision)
        parts = distributed.gather(local, ctx)
        docs = join_windows(extras["eval_path"], [r for p in parts for r in p["row_ids"]],
                            [x for p in parts for x in p["probs"]])
        names = [id2label[i] for i in range(len(id2label))]
        m = entity_metrics(*self._tag_strings(docs, names))
        rec = {"step": step, "eval_loss": sum(p["loss_sum"] for p in parts) / max(1, sum(p["tokens"] for p in parts)),
               "eval_f1": m["f1"], "eval_precision": m["precision"], "eval_recall": m["recall"],
               "eval_token_accuracy": m["token_accuracy"]}
        return rec, docs

    @staticmethod
    def _tag_strings(docs: dict, names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
        return ([[names[t] for t in g] for g in docs["gold"]], [[names[t] for t in p] for p in docs["pred"]])

    def metrics(self, result: dict, staged: Staged) -> dict:
        from spark_tuning.evaluate.metrics import entity_metrics

        names = [staged.id2label[i] for i in range(len(staged.id2label))]
        m = entity_metrics(*self._tag_strings(result["eval"], names))
        m.update(task_metrics="token_classification", eval_loss=result["epochs"][-1]["eval_loss"],
                 unit=staged.extras["unit"], entity_frequency=staged.figures["entities"],
                 windows={"train": staged.figures["train_windows"], "validation": staged.figures["eval_windows"]})
        return m

    def write_outputs(self, folder: str, cfg, metrics: dict, result: dict, staged: Staged) -> None:
        import pandas as pd

        from spark_tuning.evaluate.metrics import plot_label_f1
        from spark_tuning.text.token_spans import entities

        names = [staged.id2label[i] for i in range(len(staged.id2label))]
        with open(os.path.join(folder, "label_map.json"), "w") as f:
            json.dump({"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)},
                       "entity_types": staged.figures["entity_types"], "unit": staged.extras["unit"]}, f, indent=2)
        with open(os.path.join(folder, REPORT), "w") as f:
            json.dump(metrics["per_type"], f, indent=2)
        plot_label_f1(metrics["per_type"], os.path.join(folder, "entity_f1.png"),
                      f"{cfg.resolved_run_name}: entity F1 {metrics['f1']:.3f}")
        # Each validation row with its gold and predicted entities: for error analysis and for verify.
        first = pd.read_parquet(staged.eval_ref.path, columns=["doc_id", "window", "text", "unit_spans"])
        first = first[first["window"] == 0].set_index("doc_id")
        ev, rows = result["eval"], []
        for doc_id, gold, pred, scores in zip(ev["doc_ids"], ev["gold"], ev["pred"], ev["scores"]):
            text, flat = first.at[doc_id, "text"], list(first.at[doc_id, "unit_spans"])
            spans = list(zip(flat[0::2], flat[1::2]))
            truth = [{k: e[k] for k in ("label", "start", "end", "text")}
                     for e in entities(text, spans, gold, np.ones(len(gold)), names)]
            rows.append({"row_id": doc_id, "text": text, "entities": truth,
                         "prediction": entities(text, spans, pred, scores, names)})
        pd.DataFrame(rows).to_parquet(os.path.join(folder, PREDICTIONS), index=False)

    def summary_rows(self, metrics: dict) -> list[tuple[str, str]]:
        m = metrics
        rows = [("entity F1 (micro)", f"{m['f1']:.4f}"), ("entity precision / recall", f"{m['precision']:.4f} / {m['recall']:.4f}"),
                ("entity F1 (macro)", f"{m['f1_macro']:.4f}"), ("token accuracy", f"{m['token_accuracy']:.4f}")]
        rows += [(f"  {t} F1 (support)", f"{r['f1']:.4f} ({r['support']})") for t, r in m["per_type"].items()]
        return rows + [("validation rows", str(m["rows"]))]

    def serving_config(self, cfg, extras: dict, folder: str) -> dict:
        return {"unit": extras["unit"], "stride": int(extras["stride"])}

    def output_columns(self, serving: dict) -> list[tuple[str, str]]:
        return [("entities", "entities")]

    def compare_served(self, served, held, atol: float):
        """Row by row, the same entities (type, start, end) with scores equal to atol; entity precision,
        recall and F1 recomputed from the served answers against the gold entities."""
        from spark_tuning.evaluate.agreement import Agreement
        from spark_tuning.evaluate.metrics import span_metrics

        rows, out = held.rows, Agreement()
        got = [list(x) for x in served["entities"]]
        if "entities" in rows.columns:
            out.metrics = {k: v for k, v in span_metrics([list(x) for x in rows["entities"]], got).items()
                           if k in METRICS}
        if held.offline_metrics:
            out.offline = {k: held.offline_metrics[k] for k in ("precision", "recall", "f1")}
        if "prediction" not in rows.columns:
            return out
        same, worst = [], 0.0
        for i, (mine, theirs) in enumerate(zip(got, rows["prediction"])):
            key = lambda es: [(e["label"], int(e["start"]), int(e["end"])) for e in es]  # noqa: E731
            theirs = list(theirs)
            ok = key(mine) == key(theirs)
            diff = max((abs(float(a["score"]) - float(b["score"])) for a, b in zip(mine, theirs)), default=0.0) if ok else 1.0
            worst = max(worst, diff if ok else 0.0)
            same.append(ok and diff <= atol)
            if not same[-1]:
                out.differences.append({"row": i, "row_id": int(rows["row_id"].iloc[i]) if "row_id" in rows else i,
                                        "text": str(rows["text"].iloc[i])[:80],
                                        "offline": "; ".join(f"{e['label']} {e['start']}-{e['end']}" for e in theirs)[:120],
                                        "served": "; ".join(f"{e['label']} {e['start']}-{e['end']}" for e in mine)[:120]})
        out.agreement = float(np.mean(same)) if same else None
        out.max_probability_diff = worst
        return out


TASK = TokenClassification()
