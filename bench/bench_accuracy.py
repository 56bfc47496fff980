"""Benchmark 2b, accuracy after the same examples: the lab's recipe vs spark-tuning's efficient path, and
what each part of that path buys in speed and costs in accuracy.

    PYTHONPATH=. /work/main/.venv/bin/python bench/bench_accuracy.py [--quick]

About an hour on 2 cores (the lab recipe alone takes ~25 s a step), so bench/run.sh runs it only with
--accuracy; its section (and records) are also kept in bench/accuracy.md (.json), which run.sh copies into RESULTS.md otherwise.

all-MiniLM-L6-v2, max_length 512, the same 1,024 IMDB training reviews, each seen once (64 steps of 16),
the same optimiser settings and seed (bench/_recipes.py), through:
  - lab: HF Trainer, every row padded to 512, the model's dropouts (attention dropout 0.1);
  - spark-tuning as shipped: length buckets, dynamic padding, attention dropout 0;
  - spark-tuning keeping attention dropout (0.1): what dropping it buys and costs;
  - spark-tuning with random batches (no buckets), attention dropout 0: what bucketing buys and costs.
Every model is scored on the same 500 held-out reviews by the same function (`spark_tuning.tasks.classification.predict`,
in eval mode). Differences from the lab are paired (the same rows), with a 95% interval from the rows
on which the two disagree.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import numpy as np

import _common as C
import _shard
from _recipes import run_lab, run_ours

VARIANTS = [  # (name, what, run_ours keyword arguments)
    ("spark-tuning: buckets, attention dropout 0 (as shipped)", "ours", {}),
    ("lab: HF Trainer, padding=max_length, attention dropout 0.1", "lab", None),
    ("spark-tuning: buckets, attention dropout 0.1 kept", "ours", {"attention_dropout": None}),
    ("spark-tuning: random batches, attention dropout 0", "ours", {"group_by_length": False}),
]


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired_difference(a: np.ndarray, b: np.ndarray, z: float = 1.96) -> tuple[float, float, float]:
    """Accuracy of a minus accuracy of b on the same rows (a, b: 1 where right), with a 95% interval."""
    n = len(a)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    diff = (only_a - only_b) / n
    sd = math.sqrt(max(0.0, only_a + only_b - (only_a - only_b) ** 2 / n)) / n
    return diff, diff - z * sd, diff + z * sd


def main() -> None:
    args = C.mode_args(__doc__.splitlines()[0])
    steps, batch, n_eval = (8, 8, 64) if args.quick else (64, 16, 500)
    max_length = 512
    n_train = steps * batch
    tmp = tempfile.mkdtemp(prefix="bench-accuracy-")
    df, ids, tok = _shard.tokenized(n_train + n_eval, max_length, seed=2)
    labels = [int(x) for x in df["label"]]
    train_ref = _shard.stage(os.path.join(tmp, "train"), ids[:n_train], labels[:n_train])
    eval_ref = _shard.stage(os.path.join(tmp, "eval"), ids[n_train:], labels[n_train:])
    eval_shard = _shard.shard(ids[n_train:], labels[n_train:])
    texts = df["text"].tolist()[:n_train]
    model = C.minilm_dir()

    records = []
    try:
        for name, what, kwargs in VARIANTS:
            with C.measured({"recipe": name, "what": what}) as rec:
                if what == "lab":
                    rec.update(run_lab(tmp, model, texts, labels[:n_train], batch, max_length, eval_shard=eval_shard))
                else:
                    rec.update(run_ours(tmp, model, train_ref, eval_ref, batch, max_length, **kwargs))
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if not k.startswith("eval_")}, default=str), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lab = next(r for r in records if r["what"] == "lab")
    truth = np.asarray(lab["eval_labels"])
    right = {r["recipe"]: (np.asarray(r["eval_preds"]) == truth).astype(int) for r in records}
    for r in records:
        if r["eval_row_ids"] != lab["eval_row_ids"] or r["eval_labels"] != lab["eval_labels"]:
            raise SystemExit(f"{r['recipe']} was scored on other rows than the lab recipe")
    rows = []
    for r in records:
        ok = right[r["recipe"]]
        lo, hi = wilson(int(ok.sum()), len(ok))
        diff, dlo, dhi = paired_difference(ok, right[lab["recipe"]])
        rows.append({"recipe": r["recipe"], "accuracy": f"{ok.mean():.3f} [{lo:.3f}, {hi:.3f}]",
                     "vs lab": "" if r is lab else f"{diff:+.3f} [{dlo:+.3f}, {dhi:+.3f}]",
                     "x lab tokens/s": r["useful_tokens_per_s"] / lab["useful_tokens_per_s"],
                     "useful tokens/s": r["useful_tokens_per_s"], "padding share": f"{r['padding_share']:.0%}",
                     "train s": r["train_s"], "steps": r["steps"], "load avg": r["load_before"],
                     "busy others": f"{r['cpu_busy_others']:.0%}", "_diff": (diff, dlo, dhi)})
    shipped = rows[0]
    diff, dlo, dhi = shipped["_diff"]
    # What each ablation changes against the path as shipped, paired on the same rows.
    ablations = "".join(
        f"- {r['recipe']}: {d:+.3f} accuracy (95% interval {lo:+.3f} to {hi:+.3f}) against spark-tuning as shipped.\n"
        for r in records[2:]
        for d, lo, hi in [paired_difference(right[r["recipe"]], right[records[0]["recipe"]])])
    verdict = ("met" if diff >= 0 else "within noise (the interval holds 0)" if dhi >= 0 else "NOT met")
    body = (f"After the same {n_train} examples, spark-tuning as shipped scores **{diff:+.3f}** accuracy against the lab "
            f"recipe (95% interval {dlo:+.3f} to {dhi:+.3f}; target: equal or better: {verdict}) at "
            f"**{shipped['x lab tokens/s']:.2f}x** its useful tokens/s.\n\n"
            f"all-MiniLM-L6-v2, max_length {max_length}, {n_train} IMDB training reviews seen once ({steps} steps of "
            f"{batch}), AdamW lr 5e-5 with linear decay, no warm-up, no weight decay, clip 1.0, seed 0, 1 process; "
            f"scored on the same {len(truth)} held-out reviews ({truth.mean():.0%} positive). Accuracy with its 95% "
            "Wilson interval; `vs lab`: paired difference with its 95% interval. Throughput here is over whole "
            "epochs (every length bucket), so it is steadier than section 2's few steps.\n\n"
            + C.table(rows, ["recipe", "accuracy", "vs lab", "x lab tokens/s", "useful tokens/s", "padding share",
                             "train s", "steps", "load avg", "busy others"]) + "\n" + ablations)
    C.write_section("2b_accuracy", "2b. Accuracy after the same examples", body, records)
    if not args.quick:  # kept for run.sh runs without --accuracy
        for ext in ("md", "json"):
            shutil.copy(os.path.join(C.OUT, f"2b_accuracy.{ext}"), os.path.join(C.HERE, f"accuracy.{ext}"))


if __name__ == "__main__":
    main()
