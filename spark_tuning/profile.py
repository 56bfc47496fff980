"""`spark-tuning profile`: know before you train.

    spark-tuning profile --config conf/imdb_minilm.yaml [--set KEY=VALUE ...] [--out FOLDER]

Runs the job's own data stage up to tokenization (the task's `profile_rows`: read, check, clean, split,
sample, and token lengths of whole rows; nothing staged, no training process, no GPU), then reports: rows
per split and why rows were dropped; the labels; token-length percentiles and a histogram; the share of
rows truncated at max_length and at other lengths; padding with random batches, length buckets and a
token budget; packing (causal_lm); steps and tokens; parameters, FLOPs, memory per process; and time on
this machine and on named GPUs, each with its assumptions (train/budget.py). Warnings say where a choice
is poor. The report goes to stdout, to an MLflow run of its own, and with --out to a folder.

The job prints and logs the same summary (`summarize`) at its start, from the rows it staged: there the
lengths are those after truncation, and the steps are planned exactly as the ranks will plan them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from spark_tuning.config import Config
from spark_tuning.loader.staging import Shard
from spark_tuning.train import budget

log = logging.getLogger("spark_tuning")

MAX_COLLECTED_ROWS = 2_000_000  # lengths brought to the driver; larger splits are sampled (seeded)
OTHER_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)
PERCENTILES = (50, 90, 95, 99)
WARN_TRUNCATED = 0.20
WARN_PADDING = 0.20
WARN_PACKING = 0.80
FILES = ("profile.md", "profile.json", "token_lengths.png")


# ----------------------------------------------------------------------------------------------------
# The command


def run(cfg: Config, out: Optional[str] = None, spark=None) -> dict:
    """Profile `cfg`'s data and model; returns the report (also printed by the CLI, logged to MLflow, and
    written to `out` when given: a new or empty folder)."""
    from spark_tuning.secrets import shared_with_workers

    with shared_with_workers() as secrets:  # the hub token, resolved here, reaches the tokenizing UDFs
        return _run(cfg, out, spark, secrets)


def _run(cfg: Config, out: Optional[str], spark, secrets) -> dict:
    from spark_tuning.cluster.spark import get_spark
    from spark_tuning.model import llm
    from spark_tuning.model.sources import check_reachable, load_tokenizer, resolve_model
    from spark_tuning.paths import output_root
    from spark_tuning.tasks import get_task

    if out:
        check_out_folder(out)
    task = get_task(cfg.task)
    src = resolve_model(cfg.model)
    check_reachable(src, cfg.model)
    load_tokenizer(src, cfg.model)
    src, info = llm.prepare(cfg, src, os.path.join(output_root(cfg.output_dir), ".models"), task)
    spark = spark or get_spark(cfg.spark)
    secrets.add_spark(spark)
    profiled = task.profile_rows(spark, cfg, src, info)
    try:
        f = profiled.figures  # the data stage counted the rows already: no second pass of the tokenizer to count
        train = collect_lengths(profiled.train, f.get("train_rows"), seed=cfg.seed)
        evaluation = collect_lengths(profiled.eval, f.get("eval_rows"), seed=cfg.seed)
    finally:
        profiled.release()
    rows = training_rows(cfg, task, train, profiled.cut_at, profiled.figures)
    n = cfg.distributed.num_processes
    shards = [Shard.of_lengths(rows[r::n]) for r in range(n)]  # the job hashes rows into files: near this
    report = summarize(cfg, task, info, shards, evaluation, profiled.figures, profiled.labels, profiled.cut_at,
                       whole=True, lengths=train)
    folder = out or tempfile.mkdtemp(prefix="spark-tuning-profile-")
    try:
        log_profile_run(cfg, report, train, folder)
    finally:
        if not out:
            shutil.rmtree(folder, ignore_errors=True)
    return report


def check_out_folder(out: str) -> None:
    from spark_tuning.errors import InputError

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"--out {out} is not an empty folder: give a new or empty folder for the report")


def collect_lengths(df, rows: Optional[int], seed: int) -> np.ndarray:
    """The `length` column on the driver; a seeded sample of about MAX_COLLECTED_ROWS when the split's `rows`
    (the rows the data stage counted; token classification windows are a few more) are more."""
    n = rows or 0
    if n > MAX_COLLECTED_ROWS:
        df = df.sample(fraction=min(1.0, 1.05 * MAX_COLLECTED_ROWS / n), seed=seed).limit(MAX_COLLECTED_ROWS)
    pdf = df.select("length").toPandas()
    return pdf["length"].to_numpy().astype(np.int64)


def training_rows(cfg: Config, task, lengths: np.ndarray, cut_at: Optional[int], figures: dict) -> np.ndarray:
    """The rows training batches: whole rows cut at `cut_at`, or (causal_lm) the packed blocks."""
    if task.length_key == "block_size":
        return np.full(int(figures.get("train_blocks", 0)), cfg.data.block_size, dtype=np.int64)
    return np.minimum(lengths, cut_at) if cut_at else lengths


# ----------------------------------------------------------------------------------------------------
# The report (pure: lengths and figures in, a dict out)


def summarize(cfg: Config, task, info: dict, shards: list, eval_lengths: np.ndarray, figures: dict,
              labels: dict, cut_at: Optional[int], whole: bool, lengths: np.ndarray,
              peak_gflops: Optional[float] = None) -> dict:
    """The profile of a run. `shards`: each rank's training rows (loader.staging.Shard, by length);
    `lengths`: the training rows' token lengths, whole (`whole`, the profile command) or as staged, cut at
    `cut_at` (the job); `eval_lengths`: the validation rows'; `figures`: the data stage's."""
    tc, d = cfg.train, cfg.distributed
    report: dict[str, Any] = {"config": {"task": cfg.task, "model": cfg.model.source, "processes": d.num_processes,
                                         "strategy": d.strategy, "use_gpu": d.use_gpu, "precision": tc.precision},
                              "lengths_whole": whole, "warnings": []}
    report["rows"] = {k: v for k, v in figures.items() if k in ("train_rows", "eval_rows", "rows_dropped")
                      or k.endswith(("_blocks", "_windows", "_tokens", "_packing_efficiency"))}
    report["labels"] = labels
    report["lengths"] = length_figures(lengths, cut_at, whole, info.get("context_length"))
    data_warnings(report, cfg, task, figures, cut_at, whole)
    plan = batching_section(report, cfg, shards, eval_lengths, cut_at, whole)
    compute_section(report, cfg, task, info, plan, peak_gflops)
    return report


def data_warnings(report: dict, cfg: Config, task, figures: dict, cut_at: Optional[int], whole: bool) -> None:
    L, warn = report["lengths"], report["warnings"].append
    if cut_at and L["truncated_share"] > WARN_TRUNCATED:
        what = "longer than" if whole else "at"
        fix = f"raise data.{task.length_key}" + (f" (p95 is {L['p95']})" if whole else "")
        if task.chooses_truncation and cfg.data.truncation == "head":
            fix += " or set data.truncation: head_tail (keeps the end, where reviews put their verdict)"
        warn(f"{L['truncated_share']:.0%} of the training rows are {what} data.{task.length_key} = {cut_at} and "
             f"lose tokens: {fix}")
    pack = figures.get("train_packing_efficiency")
    if pack is not None and pack < WARN_PACKING:
        warn(f"packing keeps {pack:.0%} of the training tokens (each partition drops its last partial block of "
             f"data.block_size = {cfg.data.block_size}): lower data.block_size or use fewer, larger partitions")


def batching_section(report: dict, cfg: Config, shards: list, eval_lengths: np.ndarray, cut_at: Optional[int],
                     whole: bool) -> dict:
    """Padding and steps for each way of cutting batches (report["batching"], report["steps"]); returns the
    configured way's plan figures, which decide the rest."""
    from spark_tuning.loader.batches import plan_figures

    tc, d = cfg.train, cfg.distributed
    longest = int(max((s.lengths.max() for s in shards if len(s)), default=1))
    budget_tokens = tc.max_tokens_per_batch or tc.batch_size * longest
    ways = {"random batches": (False, None), "length buckets": (True, None),
            f"max_tokens_per_batch = {budget_tokens}": (tc.group_by_length, budget_tokens)}
    chosen = (f"max_tokens_per_batch = {budget_tokens}" if tc.max_tokens_per_batch else
              "length buckets" if tc.group_by_length else "random batches")
    # Every epoch of the configured way (its step count); epoch 0 of the others (padding, steps per epoch).
    batching = {name: plan_figures(shards, tc, cfg.seed, group, tokens, None if name == chosen else 1)
                for name, (group, tokens) in ways.items()}
    report["batching"] = {"chosen": chosen, "ways": batching}
    plan = batching[chosen]
    if plan["padding_share"] > WARN_PADDING:
        best = min(batching, key=lambda k: batching[k]["padding_share"])
        report["warnings"].append(
            f"padding is {plan['padding_share']:.0%} of the tokens computed with {chosen}: {best} pads "
            f"{batching[best]['padding_share']:.0%} (train.group_by_length: true, or train.max_tokens_per_batch)")
    uncapped = sum(-(-m // tc.grad_accum_steps) for m in plan["micro_batches_per_epoch"])
    done = plan["total_steps"] / max(1, uncapped)  # the share of all epochs that max_steps lets run
    evaluations = max(1, round(tc.epochs * done)) + (plan["total_steps"] // tc.eval_every_steps
                                                    if tc.eval_every_steps else 0)
    eval_tokens = float(np.minimum(eval_lengths, cut_at).sum() if cut_at else eval_lengths.sum())
    report["steps"] = {"steps_per_epoch": plan["steps_per_epoch"], "total_steps": plan["total_steps"],
                       "exact": not whole, "global_batch_rows": None if tc.max_tokens_per_batch else
                       tc.batch_size * d.num_processes * tc.grad_accum_steps,
                       "training_tokens": int(plan["useful_tokens_per_epoch"] * tc.epochs * done),
                       "computed_tokens": int(plan["computed_tokens_per_epoch"] * tc.epochs * done),
                       "evaluations": evaluations, "eval_tokens_per_evaluation": int(eval_tokens)}
    return plan


def compute_section(report: dict, cfg: Config, task, info: dict, plan: dict, peak_gflops: Optional[float]) -> None:
    """Parameters, FLOPs, memory per process and time (report["model"], ["compute"], ["time"]), and the
    warnings of a run that does not fit."""
    from spark_tuning.train.precision import resolve_precision

    tc, d, s, warn = cfg.train, cfg.distributed, report["steps"], report["warnings"].append
    shape = budget.ModelShape(
        parameters=info.get("parameters", 0), trainable=info.get("trainable_parameters", 0),
        non_embedding=info.get("non_embedding_parameters", 0), hidden=info.get("hidden_size", 0),
        layers=info.get("num_layers", 0), vocab=info.get("vocab_size", 0),
        largest_block=info.get("largest_block_parameters", 0), lm_head=task.auto_model == "AutoModelForCausalLM")
    train_flops = budget.training_flops(shape, s["computed_tokens"])
    eval_flops = 2.0 * shape.non_embedding * s["eval_tokens_per_evaluation"] * s["evaluations"]  # forward only
    micro = plan["largest_batch_tokens"]
    cpu_precision = resolve_precision(tc.precision, "cpu")
    gpu_precision = "bf16" if tc.precision == "auto" else tc.precision
    memory = {where: budget.memory_per_process(shape, p, d.strategy, d.num_processes, cfg.lora.enabled,
                                               tc.gradient_checkpointing, micro, device)
              for where, p, device in (("cpu", cpu_precision, "cpu"), ("gpu", gpu_precision, "cuda"))}
    report["model"] = {"parameters": shape.parameters, "trainable_parameters": shape.trainable,
                       "non_embedding_parameters": shape.non_embedding, "hidden_size": shape.hidden,
                       "layers": shape.layers, "vocab_size": shape.vocab, "lora": cfg.lora.enabled}
    report["compute"] = {"training_flops": train_flops, "eval_flops": eval_flops,
                         "largest_micro_batch_tokens": micro, "memory_gb_per_process": memory}
    peak = peak_gflops if peak_gflops is not None else measured_peak(cpu_precision)
    host = budget.host_memory_gb()
    fits_here = host is None or d.num_processes * memory["cpu"]["total"] <= host
    report["time"] = {
        "this_machine": {"precision": cpu_precision, "matmul_peak_gflops": round(peak, 1), "mfu": budget.CPU_MFU,
                         "seconds": round(budget.seconds(train_flops + eval_flops, peak, budget.CPU_MFU), 1),
                         "available_memory_gb": round(host, 1) if host else None, "fits": fits_here},
        "gpus": budget.gpu_estimates(shape, train_flops + eval_flops, gpu_precision, d.num_processes,
                                     memory["gpu"]["total"]),
        "gpu_mfu_assumed": budget.GPU_MFU}
    smaller = ("train.gradient_checkpointing: true, lora.enabled: true, or distributed.strategy: fsdp")
    if not d.use_gpu and not fits_here:
        warn(f"{d.num_processes} processes x {memory['cpu']['total']:.1f} GB do not fit the {host:.1f} GB this machine "
             f"has free: fewer processes, a lower train.batch_size or train.max_tokens_per_batch, {smaller}")
    tight = [g["gpu"] for g in report["time"]["gpus"] if not g["fits"]]
    if d.use_gpu and tight:
        warn(f"{memory['gpu']['total']:.1f} GB per process does not fit {', '.join(tight)} (planning on "
             f"{budget.GPU_HEADROOM:.0%} of its memory): a lower train.batch_size or train.max_tokens_per_batch, {smaller}")


def length_figures(lengths: np.ndarray, cut_at: Optional[int], whole: bool, context: Optional[int]) -> dict:
    """Percentiles, mean and the truncated share at cut_at and at other lengths. Lengths cut at `cut_at`
    (not `whole`) tell the share at shorter lengths exactly, and at cut_at an upper bound (a row of
    exactly cut_at tokens looks cut)."""
    if not len(lengths):
        return {"rows": 0, "truncated_share": 0.0, "truncated_at": {}}
    out: dict[str, Any] = {"rows": int(len(lengths)), "mean": round(float(lengths.mean()), 1),
                           "mean_as_trained": round(float((np.minimum(lengths, cut_at) if cut_at else lengths).mean()), 2),
                           **{f"p{p}": int(np.percentile(lengths, p)) for p in PERCENTILES},
                           "max": int(lengths.max()), "cut_at": cut_at}
    top = max(context or 0, cut_at or 0, 512)
    marks = sorted({x for x in (*OTHER_LENGTHS, cut_at) if x and x <= top and (whole or x <= (cut_at or x))})
    out["truncated_at"] = {int(x): round(float((lengths > x).mean() if whole or x != cut_at else (lengths >= x).mean()), 4)
                           for x in marks}
    out["truncated_share"] = out["truncated_at"].get(cut_at, 0.0) if cut_at else 0.0
    return out


def measured_peak(precision: str) -> float:
    """This machine's matmul peak in `precision` (GFLOP/s, all its cores), as the training loop measures it."""
    import torch

    from spark_tuning.train.mfu import matmul_peak

    return matmul_peak({"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32), seconds=1.0)


# ----------------------------------------------------------------------------------------------------
# Output: text, files, MLflow


def render(report: dict) -> str:
    """The report as Markdown (stdout, profile.md, the job's log)."""
    c, L, s, t = report["config"], report["lengths"], report["steps"], report["time"]
    lines = [f"# Profile: {c['task']} on {c['model']}", ""]
    rows = report["rows"]
    lines.append(f"- rows: {rows.get('train_rows')} training, {rows.get('eval_rows')} validation"
                 + "".join(f"; {k.replace('_', ' ')} {v}" for k, v in rows.items()
                           if k not in ("train_rows", "eval_rows", "rows_dropped")))
    for what, d in (rows.get("rows_dropped") or {}).items():
        lines.append(f"- {what}: {d['rows_read']} rows read, dropped {d['null_or_empty_text']} with null or empty "
                     f"text and {d['no_label']} without a label")
    for split, counts in (report.get("labels") or {}).items():
        shown = ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:12])
        lines.append(f"- labels ({split}): {shown}" + (" ..." if len(counts) > 12 else ""))
    if L.get("rows"):
        kind = "whole rows" if report["lengths_whole"] else f"as staged, cut at {L['cut_at']}"
        lines.append(f"- tokens per row ({kind}): mean {L['mean']}, p50 {L['p50']}, p90 {L['p90']}, p95 {L['p95']}, "
                     f"p99 {L['p99']}, max {L['max']}; mean as trained {L['mean_as_trained']}")
        lines.append("- rows truncated at: " + ", ".join(
            f"{k}: {v:.1%}" + (" (configured)" if k == L["cut_at"] else "") for k, v in L["truncated_at"].items()))
    lines += ["", "| batching | padding | steps/epoch | tokens computed/epoch |", "|---|---|---|---|"]
    for name, b in report["batching"]["ways"].items():
        mark = " (configured)" if name == report["batching"]["chosen"] else ""
        lines.append(f"| {name}{mark} | {b['padding_share']:.1%} | {b['steps_per_epoch']} | {b['computed_tokens_per_epoch']} |")
    m, comp = report["model"], report["compute"]
    lines += ["", f"- steps: {s['steps_per_epoch']} per epoch, {s['total_steps']} in total "
              + ("(planned as the ranks plan them)" if s["exact"] else
                 "(estimated: rows split evenly over the processes; the job prints the exact count)"),
              f"- training tokens: {s['training_tokens']:,} useful, {s['computed_tokens']:,} computed; "
              f"{s['evaluations']} evaluation{'s' if s['evaluations'] != 1 else ''} of "
              f"{s['eval_tokens_per_evaluation']:,} tokens",
              f"- model: {m['parameters']:,} parameters, {m['trainable_parameters']:,} trainable"
              + (" (LoRA)" if m["lora"] else "") + f", {m['non_embedding_parameters']:,} outside embeddings",
              f"- FLOPs: {comp['training_flops']:.3g} training (6 x {m['non_embedding_parameters']:,} x computed tokens), "
              f"{comp['eval_flops']:.3g} evaluation (2 x N x tokens)",
              ""]
    lines += ["| memory per process, GB | weights | gradients | optimizer | fsdp blocks | activations | runtime | total |",
              "|---|---|---|---|---|---|---|---|"]
    for where, mem in comp["memory_gb_per_process"].items():
        lines.append(f"| {where} | " + " | ".join(f"{mem[k]:.2f}" for k in
                     ("weights", "gradients", "optimizer", "fsdp_gathered_blocks", "activations", "runtime", "total")) + " |")
    here = t["this_machine"]
    lines += ["", f"(largest micro-batch: {comp['largest_micro_batch_tokens']:,} tokens; activations by the "
              "estimate in spark_tuning/train/budget.py)", "",
              "| where | precision | peak | MFU | time | GPU-hours | fits |", "|---|---|---|---|---|---|---|",
              f"| this machine, {c['processes']} processes | {here['precision']} | {here['matmul_peak_gflops']:.0f} "
              f"GFLOP/s measured | {here['mfu']:.0%} (bench) | {budget.human_seconds(here['seconds'])} | - | "
              f"{'yes' if here['fits'] else 'NO'} |"]
    for g in t["gpus"]:
        lines.append(f"| {g['gpus']} x {g['gpu']} | {g['precision']} | {g['peak_tflops']:g} TFLOP/s datasheet | "
                     f"{t['gpu_mfu_assumed']:.0%} (assumed) | {budget.human_seconds(g['hours'] * 3600)} | "
                     f"{g['gpu_hours']:.3g} | {'yes' if g['fits'] else 'NO'} ({g['memory_gb']} GB) |")
    lines += ["", "Warnings:" if report["warnings"] else "No warnings."]
    lines += [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def metrics_of(report: dict) -> dict[str, float]:
    """The report's headline numbers as MLflow metrics (profile_*)."""
    L, s, comp, t = report["lengths"], report["steps"], report["compute"], report["time"]
    out = {f"profile_tokens_{k}": L[k] for k in ("mean", *(f"p{p}" for p in PERCENTILES), "max") if k in L}
    out.update({f"profile_truncated_share_at_{k}": v for k, v in L.get("truncated_at", {}).items()})
    out.update({f"profile_padding_share_{name.split(' =')[0].replace(' ', '_')}": b["padding_share"]
                for name, b in report["batching"]["ways"].items()})
    out.update(profile_steps_per_epoch=s["steps_per_epoch"], profile_total_steps=s["total_steps"],
               profile_training_tokens=s["training_tokens"], profile_training_flops=comp["training_flops"],
               profile_memory_gb_per_process_cpu=comp["memory_gb_per_process"]["cpu"]["total"],
               profile_memory_gb_per_process_gpu=comp["memory_gb_per_process"]["gpu"]["total"],
               profile_seconds_this_machine=t["this_machine"]["seconds"], profile_warnings=len(report["warnings"]))
    out.update({f"profile_hours_{g['gpu'].replace(' ', '_')}": g["hours"] for g in t["gpus"]})
    return out


def write_files(report: dict, lengths: np.ndarray, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "profile.md"), "w") as f:
        f.write(render(report))
    with open(os.path.join(folder, "profile.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    plot_lengths(lengths, report["lengths"].get("cut_at"), os.path.join(folder, "token_lengths.png"),
                 "whole rows" if report["lengths_whole"] else "as staged")


def plot_lengths(lengths: np.ndarray, cut_at: Optional[int], path: str, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    if len(lengths):
        ax.hist(lengths, bins=min(80, max(10, len(np.unique(lengths)))), color="#4c72b0")
    if cut_at:
        share = float((lengths > cut_at).mean()) if len(lengths) else 0.0
        ax.axvline(cut_at, color="#c44e52", linestyle="--", label=f"cut at {cut_at}: {share:.0%} of rows longer")
        ax.legend()
    ax.set_xlabel(f"tokens per training row ({what})")
    ax.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_profile_run(cfg: Config, report: dict, lengths: np.ndarray, folder: str) -> None:
    """An MLflow run of its own (`<run name>-profile`, tag spark_tuning.kind = profile): the config, the
    headline metrics and the report's files (written into `folder` first, with the run's id in them)."""
    from spark_tuning.track import tracking

    ref = tracking.start_run(cfg, run_name=f"{cfg.resolved_run_name}-profile", tags={"spark_tuning.kind": "profile"})
    report["mlflow"] = {"run_id": ref.run_id, "tracking_uri": ref.tracking_uri}
    try:
        write_files(report, lengths, folder)
        tracking.log_params(ref, cfg.to_dict())
        tracking.log_metrics(ref, metrics_of(report))
        for name in FILES:
            tracking.log_artifact(ref, os.path.join(folder, name), "profile")
    except BaseException:
        tracking.end_run(ref, "FAILED")
        raise
    tracking.end_run(ref, "FINISHED")
