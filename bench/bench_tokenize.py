"""Benchmark 1, tokenization: spark-tuning's Spark stage vs the lab's `datasets.map` vs the raw tokenizer.

    PYTHONPATH=. /work/main/.venv/bin/python bench/bench_tokenize.py [--quick]

The same IMDB reviews through: (a) spark_tuning.text.tokenize (an iterator Arrow UDF running the tokenizer's
Rust backend without transformers, local[*], one task per core, no padding), (b) the lab's recipe,
`Dataset.map(tok(..., padding="max_length", truncation=True), batched=True)` in one process, (c) the fast tokenizer's own batch encode in one process (its Rust thread
pool on, as in a notebook): the limit. Alternatives are interleaved within each size. "Useful tokens" are
the non-pad tokens; the lab recipe also materialises the padding (rows x max_length).
"""

from __future__ import annotations

import os
import time

import _common as C

MAX_LENGTH = 512


def run_spark(spark, texts, first_only: bool) -> tuple[float, int]:
    from spark_tuning.config import ModelConfig
    from spark_tuning.model.sources import resolve_model
    from spark_tuning.text.tokenize import tokenize

    cfg = ModelConfig(source=C.minilm_dir())
    src = resolve_model(cfg)
    cores = spark.sparkContext.defaultParallelism
    df = spark.createDataFrame(texts.to_frame("text")).repartition(cores).cache()
    df.count()  # the input is in memory before the clock starts: only the tokenize stage is timed
    try:
        out = tokenize(df, src, cfg, MAX_LENGTH)
        t = time.perf_counter()
        if first_only:
            out.select("length").limit(1).collect()
            return time.perf_counter() - t, 0
        from pyspark.sql import functions as F

        tokens = out.agg(F.sum("length")).collect()[0][0]
        return time.perf_counter() - t, int(tokens)
    finally:
        df.unpersist()


def run_datasets(tok, texts) -> tuple[float, int, int]:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    ds = Dataset.from_dict({"text": texts.tolist()})
    t = time.perf_counter()
    out = ds.map(lambda b: tok(b["text"], padding="max_length", truncation=True, max_length=MAX_LENGTH), batched=True)
    seconds = time.perf_counter() - t
    import pyarrow.compute as pc

    masks = pc.list_flatten(out.data.column("attention_mask"))
    return seconds, int(pc.sum(masks).as_py()), len(masks)


def run_raw(tok, texts, batch: int = 1000) -> tuple[float, float, int]:
    t = time.perf_counter()
    first, tokens = None, 0
    items = texts.tolist()
    for i in range(0, len(items), batch):
        ids = tok(items[i:i + batch], truncation=True, max_length=MAX_LENGTH)["input_ids"]
        tokens += sum(map(len, ids))
        first = first or time.perf_counter() - t
    return time.perf_counter() - t, first, tokens


def main() -> None:
    args = C.mode_args(__doc__.splitlines()[0])
    sizes = [1000] if args.quick else [5000, 25000]
    from transformers import AutoTokenizer

    from spark_tuning.config import SparkConfig
    from spark_tuning.cluster.spark import get_spark

    spark = get_spark(SparkConfig(master="local[*]", app_name="bench-tokenize", conf={
        "spark.ui.enabled": "false", "spark.driver.memory": "3g", "spark.sql.shuffle.partitions": "2"}))
    spark.sparkContext.setLogLevel("ERROR")
    # Spark's Python workers were started with TOKENIZERS_PARALLELISM=false (one task per core already);
    # the single-process alternatives get the tokenizer's own thread pool, as in the lab's notebook.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tok = AutoTokenizer.from_pretrained(C.minilm_dir())
    records = []
    try:
        for n in sizes:
            texts = C.imdb_rows(n)["text"]
            with C.measured({"rows": n, "what": "spark first row"}) as rec:
                rec["first_row_s"] = run_spark(spark, texts, first_only=True)[0]
            records.append(rec)
            order = ["spark", "datasets", "raw"] if n != sizes[-1] or len(sizes) == 1 else ["raw", "datasets", "spark"]
            for what in order:
                with C.measured({"rows": n, "what": what}) as rec:
                    if what == "spark":
                        rec["stage_s"], rec["tokens"] = run_spark(spark, texts, first_only=False)
                    elif what == "datasets":
                        rec["stage_s"], rec["tokens"], rec["materialised"] = run_datasets(tok, texts)
                        rec["first_row_s"] = rec["stage_s"]  # map is eager: the first row comes with the last
                    else:
                        rec["stage_s"], rec["first_row_s"], rec["tokens"] = run_raw(tok, texts)
                rec["rows_per_s"] = n / rec["stage_s"]
                rec["tokens_per_s"] = rec["tokens"] / rec["stage_s"]
                records.append(rec)
                print(rec, flush=True)
    finally:
        spark.stop()

    rows = []
    for n in sizes:
        by = {r["what"]: r for r in records if r["rows"] == n}
        sp, ds, raw = by["spark"], by["datasets"], by["raw"]
        sp["first_row_s"] = by["spark first row"]["first_row_s"]
        for name, r in (("Spark Arrow UDF, Rust tokenizer (local[*])", sp), ("lab: datasets.map, padding=max_length", ds),
                        ("raw fast tokenizer, 1 process", raw)):
            rows.append({"reviews": n, "stage": name, "x datasets.map": r["rows_per_s"] / ds["rows_per_s"],
                         "x raw": r["rows_per_s"] / raw["rows_per_s"], "rows/s": r["rows_per_s"],
                         "useful tokens/s": r["tokens_per_s"], "first row out s": r["first_row_s"],
                         "wall s": r["stage_s"], "load avg": r["load_before"],
                         "busy others": f"{r['cpu_busy_others']:.0%}"})
    top = [r for r in rows if r["reviews"] == sizes[-1]]
    sp = next(r for r in top if r["stage"].startswith("Spark"))
    verdict = (f"At {sizes[-1]} reviews the Spark stage runs at **{sp['x datasets.map']:.2f}x** `datasets.map` "
               f"(target >= 1.5x: {'met' if sp['x datasets.map'] >= 1.5 else 'NOT met'}) and **{sp['x raw']:.2f}x** the raw "
               f"tokenizer (target >= 0.5x: {'met' if sp['x raw'] >= 0.5 else 'NOT met'}).")
    body = (verdict + f"\n\nmax_length {MAX_LENGTH}, all-MiniLM-L6-v2's WordPiece tokenizer, IMDB train reviews. "
            "The Spark timing covers the tokenize stage on cached input (a sum over `length` forces it); "
            "its first-row time is a cold `limit(1)` job (task launch + tokenizer load). `datasets.map` is eager, "
            "so its first row comes with its last.\n\n"
            + C.table(rows, ["reviews", "stage", "x datasets.map", "x raw", "rows/s", "useful tokens/s",
                             "first row out s", "wall s", "load avg", "busy others"]))
    C.write_section("1_tokenize", "1. Tokenization", body, records)


if __name__ == "__main__":
    main()
