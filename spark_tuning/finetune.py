"""The fine-tuning job, top to bottom: config -> Spark data -> staged Parquet -> TorchDistributor -> metrics
-> MLflow -> output folder.

Cheap checks run first (config, output folder, model, processes) so that bad input fails in seconds.
Outputs are written to a hidden folder beside `output_dir` and moved into place only when complete; the
staging folder and any partial output are removed whatever happens, and a failed run is marked FAILED.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from spark_tuning.config import Config, to_yaml
from spark_tuning.errors import InputError
from spark_tuning.paths import holds_output, local_path, new_sibling, output_root, publish

log = logging.getLogger("spark_tuning")


@dataclass
class Summary:
    output_dir: str
    run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    result: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def derived_figures(cfg: Config, train_rows: Optional[int] = None, mean_length: Optional[float] = None) -> dict:
    """The numbers a user wants before a long run: global batch, steps, tokens per step."""
    t, n = cfg.train, cfg.distributed.num_processes
    out: dict[str, Any] = {"global_batch_size": t.batch_size * n * t.grad_accum_steps}
    if train_rows is not None:
        micro = math.ceil(math.ceil(train_rows / n) / t.batch_size)
        per_epoch = math.ceil(micro / t.grad_accum_steps)
        total = per_epoch * t.epochs
        out.update(train_rows=train_rows, steps_per_epoch=per_epoch,
                   total_steps=min(total, t.max_steps) if t.max_steps else total)
    if mean_length is not None:
        out["mean_tokens_per_row"] = round(mean_length, 1)
        out["tokens_per_step"] = round(mean_length * out["global_batch_size"])
    return out


def preflight(cfg: Config, overwrite: bool):
    """Everything that can be checked before Spark starts. Returns the resolved model source."""
    from spark_tuning.launch import check_resources
    from spark_tuning.model import check_reachable, resolve_model

    out = local_path(cfg.output_dir)
    if holds_output(out) and not overwrite:
        kind = "a model" if os.path.isfile(os.path.join(out, "config.json")) else "files"
        raise InputError(
            f"output_dir {out} already holds {kind}: pass --overwrite to replace it, or set another output_dir"
        )
    parent = output_root(cfg.output_dir)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        raise InputError(f"output_dir {out} cannot be written ({probe} is not writable): choose another output_dir")
    src = resolve_model(cfg.model)
    check_reachable(src, cfg.model)
    check_resources(cfg.distributed)
    return src


def run(cfg: Config, overwrite: bool = False, spark=None) -> Summary:
    from spark_tuning import dataset, evaluate, lm_job, tracking
    from spark_tuning.launch import check_resources, run_distributed
    from spark_tuning.loader import stage
    from spark_tuning.spark import get_spark
    from spark_tuning.tokenize import tokenize
    from spark_tuning.train import resolve_precision, train_fn

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    log.info("resolved config:\n%s", to_yaml(cfg))
    log.info("derived: %s", derived_figures(cfg))
    if cfg.model.trust_remote_code:
        log.warning("model.trust_remote_code is ON: the model's own Python code will run")
    src = preflight(cfg, overwrite)
    lm_info: dict = {}
    if lm_job.needed(cfg, src):  # LM tasks, LoRA, GGUF models: more checks before Spark starts
        src, lm_info = lm_job.preflight(cfg, src, os.path.join(output_root(cfg.output_dir), ".models"))

    spark = spark or get_spark(cfg.spark)
    check_resources(cfg.distributed, spark)
    timings["spark_start"] = time.perf_counter() - t0

    out_dir = local_path(cfg.output_dir)
    root = output_root(cfg.output_dir)
    staging = cfg.loader.staging_dir or os.path.join(root, ".staging")
    staging = new_sibling(os.path.join(staging, "run"), "data")
    partial = new_sibling(out_dir, "partial")
    run_ref = None
    prepared = None
    try:
        # 1. Data in Spark: read, check, clean, split, sample, tokenize, stage as Parquet.
        t = time.perf_counter()
        lm_payload, id2label = None, {}
        if cfg.task == "classification":
            prepared = dataset.prepare(spark, cfg.data, cfg.seed)
            n_files = 2 * cfg.distributed.num_processes
            train_ref = stage(tokenize(prepared.train, src, cfg.model, cfg.data.max_length).drop("text"),
                              os.path.join(staging, "train"), n_files)
            eval_ref = stage(tokenize(prepared.eval, src, cfg.model, cfg.data.max_length),
                             os.path.join(staging, "eval"), n_files)
            stats = _length_stats(spark, train_ref.path, cfg.data.max_length)
            figures = derived_figures(cfg, train_ref.num_rows, stats["mean_length"])
            figures.update(eval_rows=eval_ref.num_rows, truncated_share=stats["truncated_share"],
                           classes=list(prepared.labels.names), **lm_info)
            id2label = prepared.labels.id2label
        else:  # causal_lm / sft: chats rendered and masked, or texts packed (lm_data.py)
            staged = lm_job.stage(spark, cfg, src, lm_info, staging)
            prepared, train_ref, eval_ref = staged.prepared, staged.train_ref, staged.eval_ref
            figures = {**derived_figures(cfg, train_ref.num_rows), **staged.figures}
            lm_payload, id2label = staged.payload, staged.id2label
        timings["data"] = time.perf_counter() - t
        figures["precision"] = resolve_precision(cfg.train.precision, "cuda" if cfg.distributed.use_gpu else "cpu")
        log.info("data ready in %.1fs: %s", timings["data"], json.dumps(figures))

        # 2. Tracking: the driver owns the run; rank 0 logs into it by id.
        run_ref = tracking.start_run(cfg)
        tracking.log_params(run_ref, {**cfg.to_dict(), "derived": figures})

        # 3. Train on every rank.
        t = time.perf_counter()
        os.makedirs(partial)
        payload = {
            "config": cfg.to_dict(),
            "model_source": {"location": src.location, "is_local": src.is_local, "gguf_file": src.gguf_file},
            "id2label": {str(k): v for k, v in id2label.items()},
            "lm": lm_payload,
            "train_ref": vars(train_ref),
            "eval_ref": vars(eval_ref),
            "run": vars(run_ref),
            "model_dir": partial,
        }
        result = run_distributed(train_fn, payload, cfg.distributed)
        timings["training"] = time.perf_counter() - t

        # 4. Evaluate and write everything beside the model, then move the folder into place.
        t = time.perf_counter()
        if cfg.task == "classification":
            names = list(prepared.labels.names)
            ev = result["eval"]
            metrics = evaluate.classification_metrics(ev["preds"], ev["labels"], names)
            metrics.update(eval_loss=result["epochs"][-1]["eval_loss"], train_steps=result["steps"],
                           train_tokens_per_second=result["tokens_per_second"],
                           train_padding_share=result["padding_share"], train_precision=result["precision"])
            _write_outputs(partial, cfg, metrics, result, names, eval_ref.path)
        else:
            metrics = lm_job.metrics(result)
            lm_job.write_outputs(partial, cfg, metrics, result)
        timings["evaluation"] = time.perf_counter() - t

        t = time.perf_counter()
        tracking.log_metrics(run_ref, {f"final_{k}": v for k, v in metrics.items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for name in ("metrics.json", "config.yaml", "label_map.json", "confusion_matrix.png", "training_curves.png"):
            if os.path.exists(os.path.join(partial, name)):
                tracking.log_artifact(run_ref, os.path.join(partial, name))
        if cfg.tracking.log_model:
            tracking.log_artifacts(run_ref, partial, "model")
        publish(partial, out_dir, overwrite)
        timings["logging"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        tracking.log_metrics(run_ref, {f"time_{k}_seconds": v for k, v in timings.items()})
        tracking.end_run(run_ref, "FINISHED")
        return Summary(out_dir, run_ref.run_id, run_ref.tracking_uri, metrics, result, timings)
    except BaseException:
        if run_ref is not None:
            try:
                tracking.end_run(run_ref, "FAILED")
            except Exception:  # noqa: BLE001 - report the original error, not this one
                log.exception("could not mark MLflow run %s as FAILED", run_ref.run_id)
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        if prepared is not None:
            prepared.train.unpersist()
            prepared.eval.unpersist()


def _length_stats(spark, path: str, max_length: int) -> dict[str, float]:
    from pyspark.sql import functions as F

    row = spark.read.parquet(path).agg(
        F.avg("length").alias("mean"), F.avg((F.col("length") >= max_length).cast("double")).alias("trunc")
    ).first()
    return {"mean_length": float(row["mean"] or 0), "truncated_share": round(float(row["trunc"] or 0), 4)}


def _write_outputs(folder: str, cfg: Config, metrics: dict, result: dict, names: list[str], eval_path: str) -> None:
    import pandas as pd

    from spark_tuning import evaluate

    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({**metrics, "epochs": result["epochs"]}, f, indent=2)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    with open(os.path.join(folder, "label_map.json"), "w") as f:
        json.dump({"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}, f, indent=2)
    evaluate.plot_confusion_matrix(metrics["confusion_matrix"], names, os.path.join(folder, "confusion_matrix.png"),
                                   f"{cfg.resolved_run_name}: accuracy {metrics['accuracy']:.3f}")
    if result["history"]:
        evaluate.plot_curves(result["history"], os.path.join(folder, "training_curves.png"))
    # Validation rows with their predictions: for error analysis, and for checking a served model later.
    texts = pd.read_parquet(eval_path, columns=["row_id", "text"])
    ev = result["eval"]
    preds = pd.DataFrame({"row_id": ev["row_ids"], "label": ev["labels"], "prediction": ev["preds"],
                          "probability": [max(p) for p in ev["probs"]], "probabilities": ev["probs"]})
    preds = texts.merge(preds, on="row_id").sort_values("row_id")
    preds.to_parquet(os.path.join(folder, "eval_predictions.parquet"), index=False)
