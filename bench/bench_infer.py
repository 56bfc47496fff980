"""Benchmark 5, inference: validation / batch-scoring rows per second with and without length-sorted batches.

    PYTHONPATH=. /work/main/.venv/bin/python bench/bench_infer.py [--quick]

all-MiniLM-L6-v2 (with a new classification head) scores the same IMDB reviews through
`spark_tuning.tasks.classification.predict`, the function validation uses, once with `loader.plan_eval_batches` (sorted
by length, each batch padded to its own longest row) and once with the same batches in random order
(what scoring rows as they come gives). Interleaved, repeated; the predictions must agree.
"""

from __future__ import annotations

import numpy as np

import _common as C
import _shard


def main() -> None:
    args = C.mode_args(__doc__.splitlines()[0])
    import torch

    from spark_tuning.config import ModelConfig
    from spark_tuning.loader.batches import plan_eval_batches
    from spark_tuning.model.sources import build_classifier, resolve_model
    from spark_tuning.tasks.classification import predict

    n, batch, rounds, max_length = (96, 32, 1, 512) if args.quick else (192, 32, 2, 512)
    df, ids, tok = _shard.tokenized(n, max_length, seed=1)
    shard = _shard.shard(ids, df["label"].tolist())
    cfg = ModelConfig(source=C.minilm_dir(), attention_dropout=0.0)
    torch.manual_seed(0)
    model = build_classifier(resolve_model(cfg), cfg, {0: "neg", 1: "pos"}, tok.pad_token_id)
    sorted_plan = plan_eval_batches(shard, batch)
    order = np.random.default_rng(0).permutation(n)
    random_plan = [order[i:i + batch] for i in range(0, n, batch)]

    records, preds = [], {}
    for r in range(rounds):
        for what in (("sorted", "random") if r % 2 == 0 else ("random", "sorted")):
            plan = sorted_plan if what == "sorted" else random_plan
            with C.measured({"round": r, "what": what}) as rec:
                out = predict(model, shard, plan, tok.pad_token_id, "cpu", "fp32")
            width = sum(int(shard.lengths[b].max()) * len(b) for b in plan)
            rec.update(rows_per_s=n / rec["seconds"], padding_share=1 - shard.lengths.sum() / width)
            preds[what] = out["probs"][np.argsort(out["row_ids"])].argmax(1)
            records.append(rec)
            print(rec, flush=True)
    agree = float((preds["sorted"] == preds["random"]).mean())
    best = {w: max(r["rows_per_s"] for r in records if r["what"] == w) for w in ("sorted", "random")}
    rows = [{"batching": w, "x random": best[w] / best["random"], "rows/s (best round)": best[w],
             "padding share": f"{next(r for r in records if r['what'] == w)['padding_share']:.0%}",
             "rounds s": ", ".join(f"{r['seconds']:.1f}" for r in records if r["what"] == w),
             "load avg": next(r for r in records if r["what"] == w)["load_before"]} for w in ("sorted", "random")]
    body = (f"Length-sorted batches score **{best['sorted'] / best['random']:.2f}x** the rows per second of random "
            f"batches. {n} IMDB reviews, max_length {max_length}, batch {batch}, fp32, "
            f"{torch.get_num_threads()} threads; predictions agree on {agree:.0%} of rows.\n\n"
            + C.table(rows, ["batching", "x random", "rows/s (best round)", "padding share", "rounds s", "load avg"]))
    C.write_section("5_infer", "5. Inference (validation / batch scoring)", body, records)


if __name__ == "__main__":
    main()
