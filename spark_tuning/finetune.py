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
    deploy: dict[str, Any] = field(default_factory=dict)  # logged model URI, registry version, verify report


def derived_figures(cfg: Config, train_rows: Optional[int] = None, mean_length: Optional[float] = None) -> dict:
    """The numbers a user wants before a long run: global batch, steps, tokens per step."""
    t, n = cfg.train, cfg.distributed.num_processes
    if t.max_tokens_per_batch:
        # Rows per batch depend on the lengths: the step count is known once the ranks plan their batches.
        out: dict[str, Any] = {"max_tokens_per_step": t.max_tokens_per_batch * n * t.grad_accum_steps}
        if train_rows is not None:
            out["train_rows"] = train_rows
        if train_rows is not None and mean_length is not None:
            out["mean_tokens_per_row"] = round(mean_length, 1)
            # Padding only adds batches: this is the fewest steps an epoch can take.
            out["steps_per_epoch_at_least"] = math.ceil(train_rows * mean_length / out["max_tokens_per_step"])
        return out
    out = {"global_batch_size": t.batch_size * n * t.grad_accum_steps}
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


RUN_MARKER = "run.json"  # written into output_dir while a run is in progress: its config and MLflow run


@dataclass
class Plan:
    """What preflight decided about the output folder."""

    resume_from: Optional[str] = None  # the checkpoint to continue from
    earlier_run: Optional[dict] = None  # the interrupted run's marker (its MLflow run id)
    clear_first: bool = False  # an interrupted run's leftovers, to be removed before starting afresh


def output_state(out: str) -> str:
    """'empty', 'model' (a finished run), 'interrupted' (checkpoints of a run that did not finish) or 'other'."""
    if not holds_output(out):
        return "empty"
    names = set(os.listdir(out))
    if "metrics.json" in names or "config.json" in names:
        return "model"
    if RUN_MARKER in names and names <= {RUN_MARKER, "checkpoints"}:
        return "interrupted"
    return "other"


def plan_output(cfg: Config, overwrite: bool, resume: bool) -> Plan:
    """Never lose work: refuse to touch a finished model without --overwrite; continue an interrupted run
    of the same config from its newest complete checkpoint; refuse one of another config."""
    from spark_tuning.train import checkpoint
    from spark_tuning.config import training_differences

    out = local_path(cfg.output_dir)
    state = output_state(out)
    if state == "model" and not overwrite:
        raise InputError(
            f"output_dir {out} already holds a model: pass --overwrite to replace it, or set another output_dir"
        )
    if state == "other" and not overwrite:
        raise InputError(
            f"output_dir {out} already holds files that spark-tuning did not write ({sorted(os.listdir(out))[:5]}): "
            "pass --overwrite to replace them, or set another output_dir"
        )
    if state != "interrupted":
        if resume:
            raise InputError(f"--resume: output_dir {out} holds no interrupted run to continue: drop --resume")
        return Plan()
    with open(os.path.join(out, RUN_MARKER)) as f:
        earlier = json.load(f)
    latest = checkpoint.latest(checkpoint.checkpoint_dir(out))
    if overwrite:
        return Plan(earlier_run=earlier, clear_first=True)
    if latest is None:
        log.warning("output_dir %s holds an interrupted run without a complete checkpoint: starting afresh", out)
        return Plan(earlier_run=earlier, clear_first=True)
    changed = training_differences(earlier["config"], cfg.to_dict())
    if changed:
        raise InputError(
            f"output_dir {out} holds an interrupted run with another config ({'; '.join(changed)}): rerun with "
            "the same config to resume it, pass --overwrite to start over, or set another output_dir"
        )
    log.info("resuming the interrupted run in %s from %s", out, latest)
    return Plan(resume_from=latest, earlier_run=earlier)


def preflight(cfg: Config, overwrite: bool, resume: bool = False):
    """Everything that can be checked before Spark starts. Returns the model source and the output plan."""
    from spark_tuning.cluster.launch import check_resources
    from spark_tuning.model.sources import check_reachable, load_tokenizer, max_positions, resolve_model

    plan = plan_output(cfg, overwrite, resume)
    out = local_path(cfg.output_dir)
    probe = output_root(cfg.output_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise InputError(f"output_dir {out} cannot be written ({probe} is not a writable folder): "
                         "choose another output_dir")
    if cfg.loader.kind == "petastorm":
        from spark_tuning.loader.petastorm import check_available

        check_available()  # pyarrow < 15 and petastorm importable, or a clear InputError
    src = resolve_model(cfg.model)
    check_reachable(src, cfg.model)
    load_tokenizer(src, cfg.model)  # a missing or broken tokenizer fails here, not in a Spark task
    positions = max_positions(src, cfg.model)
    if positions and cfg.data.max_length > positions:
        raise InputError(f"data.max_length = {cfg.data.max_length} is more than the {positions} positions model "
                         f"{src.location} takes: set data.max_length to at most {positions}")
    check_resources(cfg.distributed)
    return src, plan


def run(cfg: Config, overwrite: bool = False, spark=None, resume: bool = False) -> Summary:
    from spark_tuning import lm_job
    from spark_tuning.track import tracking
    from spark_tuning.track import watchdog
    from spark_tuning.evaluate import metrics as evaluate
    from spark_tuning.train import checkpoint
    from spark_tuning.data import dataset
    from spark_tuning.cluster.launch import check_cluster, check_resources, run_distributed
    from spark_tuning.loader.staging import check_training_shards
    from spark_tuning.loader.backends import stage_as
    from spark_tuning.cluster.spark import get_spark
    from spark_tuning.text.tokenize import tokenize
    from spark_tuning.train.loop import train_fn

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    log.info("resolved config:\n%s", to_yaml(cfg))
    log.info("derived: %s", derived_figures(cfg))
    if cfg.model.trust_remote_code:
        log.warning("model.trust_remote_code is ON: the model's own Python code will run")
    src, plan = preflight(cfg, overwrite, resume)
    lm_info: dict = {}
    if lm_job.needed(cfg, src):  # LM tasks, LoRA, GGUF models: more checks before Spark starts
        src, lm_info = lm_job.preflight(cfg, src, os.path.join(output_root(cfg.output_dir), ".models"))

    spark = spark or get_spark(cfg.spark)
    check_resources(cfg.distributed, spark)
    check_cluster(cfg, spark)
    timings["spark_start"] = time.perf_counter() - t0

    out_dir = local_path(cfg.output_dir)
    root = output_root(cfg.output_dir)
    staging = cfg.loader.staging_dir or os.path.join(root, ".staging")
    staging = new_sibling(os.path.join(staging, "run"), "data")
    partial = new_sibling(out_dir, "partial")
    run_ref = None
    prepared = None
    deployed: dict[str, Any] = {}
    try:
        # 1. Data in Spark: read, check, clean, split, sample, tokenize, stage as Parquet.
        t = time.perf_counter()
        lm_payload, id2label = None, {}
        if cfg.task == "classification":
            prepared = dataset.prepare(spark, cfg.data, cfg.seed)
            n_files = 2 * cfg.distributed.num_processes
            kind, max_len = cfg.loader.kind, cfg.data.max_length
            train_ref = stage_as(kind, tokenize(prepared.train, src, cfg.model, max_len).drop("text"),
                                 os.path.join(staging, "train"), n_files, max_len)
            eval_ref = stage_as(kind, tokenize(prepared.eval, src, cfg.model, max_len),
                                os.path.join(staging, "eval"), n_files, max_len)
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
        check_training_shards(train_ref, cfg.distributed.num_processes)
        timings["data"] = time.perf_counter() - t
        figures["precision"] = _expected_precision(cfg)
        log.info("data ready in %.1fs: %s", timings["data"], json.dumps(figures))

        # 2. Tracking: the driver owns the run; rank 0 logs into it by id.
        run_ref = tracking.start_run(cfg)
        watchdog.start(run_ref.tracking_uri, run_ref.run_id)  # marks the run FAILED if this process is killed
        tracking.log_params(run_ref, {**cfg.to_dict(), "derived": figures})
        if plan.earlier_run:
            tracking.close_stale_run(plan.earlier_run)  # a killed driver could not mark it FAILED
        if plan.resume_from:
            tracking.set_tag(run_ref, "spark_tuning.resumed_from", plan.resume_from)
        _mark_run_in_progress(out_dir, cfg, run_ref, clear_first=plan.clear_first)

        # 3. Train on every rank.
        t = time.perf_counter()
        os.makedirs(partial)
        log_dir = os.path.join(staging, "logs")  # rank logs (failure reports) and rank 0's events
        os.makedirs(log_dir, exist_ok=True)
        payload = {
            "config": cfg.to_dict(),
            "model_source": {"location": src.location, "is_local": src.is_local, "gguf_file": src.gguf_file},
            "id2label": {str(k): v for k, v in id2label.items()},
            "lm": lm_payload,
            "train_ref": vars(train_ref),
            "eval_ref": vars(eval_ref),
            "events": os.path.join(log_dir, "rank0-events.jsonl"),  # for tracking.relay
            "model_dir": partial,
            "resume_from": plan.resume_from,
            "log_dir": log_dir,
            "checkpoint": {"dir": checkpoint.checkpoint_dir(out_dir), "every_steps": cfg.checkpoint.every_steps,
                           "keep_last": cfg.checkpoint.keep_last} if cfg.checkpoint.enabled else None,
        }
        with tracking.relay(run_ref, payload["events"]):
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
                           train_padding_share=result["padding_share"], train_precision=result["precision"],
                           train_device=result["device"], train_tf32=result["tf32"],
                           train_mfu=result["mfu"], train_matmul_peak_gflops=result["matmul_peak_gflops"],
                           train_data_wait_share=result["data_wait_share"])
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
        # --- deploy (issue 6): MLflow pyfunc model + registry; optionally serve and verify it --------
        record = None
        if cfg.tracking.log_model:
            from spark_tuning.deploy import steps as deploy

            record = deploy.package(cfg, run_ref, partial, result["precision"], lm_payload)
            if os.path.isdir(os.path.join(partial, "adapter")):  # LoRA: the small adapter, for reuse
                tracking.log_artifacts(run_ref, os.path.join(partial, "adapter"), "adapter")
        if cfg.checkpoint.keep_after_success and checkpoint.latest(checkpoint.checkpoint_dir(out_dir)):
            last = checkpoint.latest(checkpoint.checkpoint_dir(out_dir))
            os.makedirs(checkpoint.checkpoint_dir(partial))
            os.rename(last, os.path.join(checkpoint.checkpoint_dir(partial), os.path.basename(last)))
        # Our own interrupted-run folder (run.json + checkpoints) is replaced by the finished one.
        publish(partial, out_dir, overwrite or output_state(out_dir) == "interrupted")
        timings["logging"] = time.perf_counter() - t
        if record is not None and cfg.deploy.verify:
            t = time.perf_counter()
            deployed["verify"] = deploy.serve_and_verify(cfg, record, out_dir).to_dict()
            timings["verify"] = time.perf_counter() - t
        if record is not None:
            deployed.update(model_uri=record.model_uri, serving_uri=record.serving_uri, version=record.version)
        # --- end deploy --------------------------------------------------------------------------------
        timings["total"] = time.perf_counter() - t0
        tracking.log_metrics(run_ref, {f"time_{k}_seconds": v for k, v in timings.items()})
        tracking.end_run(run_ref, "FINISHED")
        return Summary(out_dir, run_ref.run_id, run_ref.tracking_uri, metrics, result, timings, deployed)
    except BaseException:
        if run_ref is not None:
            try:
                tracking.end_run(run_ref, "FAILED")
            except Exception:  # noqa: BLE001 - report the original error, not this one
                log.exception("could not mark MLflow run %s as FAILED", run_ref.run_id)
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        # A run that failed before its first checkpoint leaves nothing to resume: leave no folder either.
        if output_state(out_dir) == "interrupted" and not checkpoint.latest(checkpoint.checkpoint_dir(out_dir)):
            shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        if prepared is not None:
            prepared.train.unpersist()
            prepared.eval.unpersist()


def _expected_precision(cfg: Config) -> str:
    """The precision the ranks will pick, where the driver can tell (it may have no GPU of its own)."""
    from spark_tuning.cluster.launch import visible_gpus
    from spark_tuning.train.precision import resolve_precision

    if cfg.distributed.use_gpu and not visible_gpus():
        return f"{cfg.train.precision} (chosen by each training GPU)"
    return resolve_precision(cfg.train.precision, "cuda:0" if cfg.distributed.use_gpu else "cpu")


def _mark_run_in_progress(out_dir: str, cfg: Config, run_ref, clear_first: bool) -> None:
    """Create output_dir with run.json: which config and MLflow run its checkpoints belong to."""
    if clear_first:
        shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{RUN_MARKER}.tmp")
    with open(tmp, "w") as f:
        json.dump({"config": cfg.to_dict(), "run_id": run_ref.run_id, "tracking_uri": run_ref.tracking_uri}, f)
    os.replace(tmp, os.path.join(out_dir, RUN_MARKER))


def _length_stats(spark, path: str, max_length: int) -> dict[str, float]:
    from pyspark.sql import functions as F

    row = spark.read.parquet(path).agg(
        F.avg("length").alias("mean"), F.avg((F.col("length") >= max_length).cast("double")).alias("trunc")
    ).first()
    return {"mean_length": float(row["mean"] or 0), "truncated_share": round(float(row["trunc"] or 0), 4)}


def _write_outputs(folder: str, cfg: Config, metrics: dict, result: dict, names: list[str], eval_path: str) -> None:
    import pandas as pd

    from spark_tuning.evaluate import metrics as evaluate

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
