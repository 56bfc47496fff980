"""Benchmark 9, data.truncation: accuracy of head vs head_tail on IMDB at max_length 128 and 256, the same
examples, the same steps.

    PYTHONPATH=. .venv/bin/python bench/bench_truncation.py [--quick]     # bench/run.sh --truncation

all-MiniLM-L6-v2 fine-tuned by the job's own train_fn (1 process, fp32, the shipped batching) on the same
IMDB training reviews, each seen once, then scored on the same held-out reviews; the only difference between
the two runs at a max_length is which tokens of a long review they see: its first max_length (head) or its
first max_length // 4 and its last ones (head_tail, spark_tuning/text/truncation.py, as the Spark stage and
the served model cut). Differences are paired (the same rows), with a 95% interval.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

import _common as C
import _shard
from _recipes import run_ours
from bench_accuracy import paired_difference, wilson


def cut_ids(tok, texts: list[str], max_length: int, mode: str) -> list[list[int]]:
    from spark_tuning.text import truncation

    if mode == "head":
        return tok(texts, truncation=True, max_length=max_length)["input_ids"]
    plain, specials = truncation.transformers_encoder(tok)
    return truncation.encode(plain, texts, max_length, mode, None, specials)


def main() -> None:
    args = C.mode_args(__doc__.splitlines()[0])
    n_train, n_eval, batch = (128, 64, 16) if args.quick else (1024, 500, 16)
    lengths = (128,) if args.quick else (128, 256)
    tmp = tempfile.mkdtemp(prefix="bench-truncation-")
    df, _, tok = _shard.tokenized(n_train + n_eval, 16, seed=3)
    texts, labels = df["text"].tolist(), [int(x) for x in df["label"]]
    whole = [len(x) for x in tok(texts, truncation=False, verbose=False)["input_ids"]]
    records = []
    try:
        for max_length in lengths:
            for mode in ("head", "head_tail"):
                ids = cut_ids(tok, texts, max_length, mode)
                train_ref = _shard.stage(os.path.join(tmp, f"{mode}{max_length}", "train"), ids[:n_train], labels[:n_train])
                eval_ref = _shard.stage(os.path.join(tmp, f"{mode}{max_length}", "eval"), ids[n_train:], labels[n_train:])
                with C.measured({"max_length": max_length, "truncation": mode}) as rec:
                    rec.update(run_ours(tmp, C.minilm_dir(), train_ref, eval_ref, batch, max_length, precision="fp32"))
                rec["truncated_share"] = float(np.mean([n > max_length for n in whole[:n_train]]))
                records.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if not k.startswith("eval_")}, default=str), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows, lines = [], []
    for max_length in lengths:
        head, both = (next(r for r in records if r["max_length"] == max_length and r["truncation"] == m)
                      for m in ("head", "head_tail"))
        if head["eval_row_ids"] != both["eval_row_ids"] or head["eval_labels"] != both["eval_labels"]:
            raise SystemExit("the two runs were scored on other rows")
        truth = np.asarray(head["eval_labels"])
        right = {id(r): (np.asarray(r["eval_preds"]) == truth).astype(int) for r in (head, both)}
        for r in (head, both):
            ok = right[id(r)]
            lo, hi = wilson(int(ok.sum()), len(ok))
            rows.append({"max_length": max_length, "truncation": r["truncation"],
                         "accuracy": f"{ok.mean():.3f} [{lo:.3f}, {hi:.3f}]",
                         "training reviews cut": f"{r['truncated_share']:.0%}", "steps": r["steps"],
                         "train s": r["train_s"], "load avg": r["load_before"]})
        diff, dlo, dhi = paired_difference(right[id(both)], right[id(head)])
        lines.append(f"- max_length {max_length}: head_tail {diff:+.3f} accuracy against head (95% interval "
                     f"{dlo:+.3f} to {dhi:+.3f}), {head['truncated_share']:.0%} of the training reviews longer than it.")
    body = ("\n".join(lines) + "\n\n"
            f"all-MiniLM-L6-v2, the same {n_train} IMDB training reviews seen once ({records[0]['steps']} steps of "
            f"{batch}), fp32, 1 process, AdamW lr 5e-5, seed 0; scored on the same {n_eval} held-out reviews. head_tail "
            "keeps max_length // 4 tokens from the start and the rest from the end. Accuracy with its 95% Wilson "
            "interval; the differences are paired.\n\n"
            + C.table(rows, ["max_length", "truncation", "accuracy", "training reviews cut", "steps", "train s",
                             "load avg"]))
    C.write_section("9_truncation", "9. Truncation: head vs head_tail", body, records)
    if not args.quick:  # kept for run.sh runs without --truncation
        shutil.copy(os.path.join(C.OUT, "9_truncation.md"), os.path.join(C.HERE, "truncation.md"))


if __name__ == "__main__":
    main()
