"""The fine-tuning job, top to bottom: config -> Spark data -> staged Parquet -> TorchDistributor -> metrics
-> MLflow -> output folder.

Cheap checks run first (config, output folder, model, processes) so that bad input fails in seconds.
Outputs are written to a hidden folder beside `output_dir` and moved into place only when complete; a run's
state while it trains (run.json, checkpoints) lives in another one beside it, `.NAME.run`, so that a finished
model is never mixed with the next run's checkpoints. The staging folder and any partial output are removed
whatever happens, and a failed run is marked FAILED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from spark_tuning.config import Config, to_yaml
from spark_tuning.errors import InputError
from spark_tuning.paths import (OWNER_MARKER, check_removable, foreign_names, holds_output, local_path, lock_file,
                                new_sibling, output_root, publish, removal_problem, remove_tree, run_folder,
                                write_owner_marker)
from spark_tuning.track import tracking

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


RUN_MARKER = "run.json"  # in the run folder (paths.run_folder) while a run trains: its config and MLflow run


@dataclass
class Plan:
    """What preflight decided about the output folder and the run folder beside it."""

    resume_from: Optional[str] = None  # the checkpoint to continue from
    earlier_run: Optional[dict] = None  # the interrupted run's marker (its MLflow run id)
    clear_first: bool = False  # an interrupted run's leftovers, to be removed before starting afresh


def output_state(out: str) -> str:
    """'empty', 'model' (a finished run of spark-tuning's: its marker lists every name in the folder) or
    'other' (anything else: a folder of someone's files, a model spark-tuning did not write, a model with
    files added to it)."""
    if not holds_output(out):
        return "empty"
    if OWNER_MARKER in os.listdir(out) and not foreign_names(out):
        return "model"
    return "other"


def interrupted_run(out: str) -> Optional[dict]:
    """The marker of the run that trained for `out` and did not finish (its run folder), or None."""
    try:
        with open(os.path.join(run_folder(out), RUN_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "config" in marker else None


def move_legacy_run(out: str) -> None:
    """Versions before the run folder kept run.json and checkpoints/ inside output_dir (even inside a
    finished model's folder): move them beside it, where this version looks for them."""
    listed: set = set()
    try:
        with open(os.path.join(out, OWNER_MARKER)) as f:
            listed = set(json.load(f)["names"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not os.path.isfile(os.path.join(out, RUN_MARKER)) or RUN_MARKER in listed or os.path.exists(run_folder(out)):
        return
    os.makedirs(run_folder(out))
    for name in (RUN_MARKER, "checkpoints"):
        if os.path.exists(os.path.join(out, name)) and name not in listed:
            os.rename(os.path.join(out, name), os.path.join(run_folder(out), name))
    if not os.listdir(out):
        os.rmdir(out)
    log.info("moved the interrupted run inside %s (an older version's layout) to %s", out, run_folder(out))


def sources_of(cfg: Config) -> tuple[str, ...]:
    """The run's local data and model sources: no command deletes a folder that is or holds one."""
    return tuple(s for s in (cfg.data.source, cfg.data.eval_source, cfg.model.source) if s)


def plan_output(cfg: Config, overwrite: bool, resume: bool, fresh: bool = False) -> Plan:
    """Never lose work. A finished model in output_dir is replaced only with --overwrite, and only at the
    end, once the new one is complete. An interrupted run of the same config (its run folder beside
    output_dir) is continued from its newest complete checkpoint, with or without --overwrite (a retried
    scheduled job passes it every time); --fresh discards it. One of another config is refused, or with
    --overwrite discarded with a warning."""
    from spark_tuning.train import checkpoint
    from spark_tuning.config import training_differences

    out = local_path(cfg.output_dir)
    check_removable(out, f"output_dir = {cfg.output_dir!r}", *sources_of(cfg))
    move_legacy_run(out)
    state = output_state(out)
    if state == "model" and not overwrite:
        raise InputError(
            f"output_dir {out} already holds a model: pass --overwrite to replace it, or set another output_dir"
        )
    if state == "other":
        foreign = foreign_names(out)
        raise InputError(
            f"output_dir {out} holds files that spark-tuning did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}): spark-tuning never replaces or deletes them, with or without "
            "--overwrite; set another output_dir, or move them away"
        )
    run = run_folder(out)
    earlier = interrupted_run(out)
    if earlier is None and os.path.exists(run):
        log.warning("%s holds no readable %s (cut short?): its contents are not resumed and are replaced", run,
                    RUN_MARKER)
    if earlier is None:
        if resume:
            raise InputError(f"--resume: there is no interrupted run of output_dir {out} to continue (no {run}): "
                             "drop --resume")
        return Plan(clear_first=os.path.exists(run))
    if fresh:
        log.warning("--fresh: discarding the interrupted run in %s and starting over", run)
        return Plan(earlier_run=earlier, clear_first=True)
    latest = checkpoint.latest(checkpoint.checkpoint_dir(run))
    if latest is None:
        if resume:
            raise InputError(f"--resume: the interrupted run in {run} has no complete checkpoint to continue from: "
                             "drop --resume to start afresh")
        log.warning("the interrupted run in %s has no complete checkpoint: starting afresh", run)
        return Plan(earlier_run=earlier, clear_first=True)
    from spark_tuning.train.fsdp import has_sharded

    changed = training_differences(earlier["config"], cfg.to_dict())
    if cfg.distributed.strategy == "fsdp" and not has_sharded(latest):
        changed.append(f"checkpoint {latest} was written by distributed.strategy: ddp (whole weights), which an "
                       "fsdp run does not resume")
    if changed and overwrite and not resume:
        log.warning("output_dir %s: the interrupted run in %s cannot be continued by this config (%s): --overwrite "
                    "discards it and starts over", out, run, "; ".join(changed))
        return Plan(earlier_run=earlier, clear_first=True)
    if changed:
        raise InputError(
            f"output_dir {out} has an interrupted run ({run}) that this config cannot continue ({'; '.join(changed)}): "
            "rerun with its config to resume it, pass --fresh (or --overwrite) to discard it and start over, or "
            "set another output_dir"
        )
    log.info("resuming the interrupted run of %s from %s%s", out, latest,
             " (--overwrite: the finished model is replaced once this run is complete)" if state == "model" else "")
    return Plan(resume_from=latest, earlier_run=earlier)


def preflight(cfg: Config, overwrite: bool, resume: bool, task, fresh: bool = False):
    """Everything that can be checked before Spark starts: the output folder, the model (GGUF made
    trainable, the task's and LoRA's settings against it), the processes. Returns the model source to
    train from, the output plan, and what was resolved about the model."""
    from spark_tuning.cluster.launch import check_resources
    from spark_tuning.model import llm
    from spark_tuning.model.sources import check_reachable, load_tokenizer, max_positions, resolve_model

    plan = plan_output(cfg, overwrite, resume, fresh)
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
    tracking.check_reachable(cfg)  # a tracking server that does not answer: a clear error in seconds
    if cfg.distributed.strategy == "fsdp" and cfg.distributed.num_processes < 2:
        raise InputError("distributed.strategy = 'fsdp' with distributed.num_processes = 1: one process has nothing "
                         "to shard the model over; set distributed.num_processes to 2 or more (one per GPU), or "
                         "distributed.strategy: ddp")
    src, info = llm.prepare(cfg, src, os.path.join(output_root(cfg.output_dir), ".models"), task)
    return src, plan, info


class RunFolders:
    """The folders one run writes, and their cleanup in one place (a context manager):
    - `out`: output_dir, where the finished model is published;
    - `run`: the run folder beside it (run.json and checkpoints/ while the run trains, removed once the
      model is published);
    - `partial`: a hidden sibling that the outputs are written into, then moved into place whole;
    - `staging`: the tokenized data (and the rank logs), under the staging root.
    On exit, whatever happened: the partial and staging folders are removed, a run that failed before its
    first checkpoint leaves no run folder, and cached DataFrames (`hold`) are unpersisted."""

    def __init__(self, cfg: Config):
        self.out = local_path(cfg.output_dir)
        self.run = run_folder(self.out)
        self.staging = new_sibling(os.path.join(cfg.staging_root, "run"), "data")
        self.partial = new_sibling(self.out, "partial")
        self.logs = os.path.join(self.staging, "logs")  # rank logs (failure reports) and rank 0's events
        self.profile = os.path.join(self.staging, "profile")  # the start-of-job profile's files
        self._held: list = []

    def hold(self, staged):
        self._held.append(staged)
        return staged

    def __enter__(self) -> "RunFolders":
        from spark_tuning.deploy.cleanup import write_staging_marker

        write_staging_marker(self.staging, self.partial, self.out)  # cleanup leaves a live run's folders alone
        return self

    def __exit__(self, *exc) -> None:
        from spark_tuning.train import checkpoint

        shutil.rmtree(self.partial, ignore_errors=True)
        if os.path.isdir(self.run) and not checkpoint.latest(checkpoint.checkpoint_dir(self.run)) \
                and removal_problem(self.run) is None:
            shutil.rmtree(self.run, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        for staged in self._held:
            staged.release()


def run(cfg: Config, overwrite: bool = False, spark=None, resume: bool = False, fresh: bool = False) -> Summary:
    """The job, as named steps: preflight, Spark, stage, tracking, train, outputs, deploy."""
    from spark_tuning.tasks import get_task

    t0, timings = time.perf_counter(), {}
    log.info("resolved config:\n%s", to_yaml(cfg))
    log.info("derived: %s", derived_figures(cfg))
    if cfg.model.trust_remote_code:
        log.warning("model.trust_remote_code is ON: the model's own Python code will run")
    task = get_task(cfg.task)
    from spark_tuning.secrets import shared_with_workers

    # One run per output folder, from preflight to publish; secrets resolved here, once, for every process.
    with output_lock(local_path(cfg.output_dir)), shared_with_workers() as secrets:
        return _run(cfg, overwrite, spark, resume, fresh, task, t0, timings, secrets)


def _run(cfg: Config, overwrite: bool, spark, resume: bool, fresh: bool, task, t0: float, timings: dict,
         secrets) -> Summary:
    src, plan, info = preflight(cfg, overwrite, resume, task, fresh)
    spark = start_spark(cfg, spark)
    secrets.add_spark(spark)  # before the data stage builds its UDFs: they carry the context's environment
    timings["spark_start"] = time.perf_counter() - t0
    with RunFolders(cfg) as folders:
        t = time.perf_counter()
        staged = folders.hold(stage(spark, cfg, task, src, info, folders))
        plan = check_same_data(plan, staged.fingerprint, overwrite, folders.out)
        timings["data"] = time.perf_counter() - t
        with tracked_run(cfg, plan, staged.figures, folders, staged.profile, staged.fingerprint) as run_ref:
            t = time.perf_counter()
            result = train(cfg, src, staged, plan, folders, run_ref)
            timings["training"] = time.perf_counter() - t
            t = time.perf_counter()
            metrics = write_outputs(cfg, task, staged, result, folders.partial)
            timings["evaluation"] = time.perf_counter() - t
            deployed = deploy(cfg, task, staged, result, metrics, folders, run_ref, overwrite, timings)
            timings["total"] = time.perf_counter() - t0
            tracking.log_metrics(run_ref, {f"time_{k}_seconds": v for k, v in timings.items()})
        return Summary(folders.out, run_ref.run_id, run_ref.tracking_uri, metrics, result, timings, deployed)


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[Optional[str]]:
    """An exclusive lock beside output_dir (`.NAME.lock`: pid, process start time, command line, start): a
    second run on the same folder is refused, naming the first; a lock whose process is gone (or is another
    process now) is taken over with a warning. Where the parent cannot be made, no lock: preflight then says
    why the folder cannot be written."""
    from spark_tuning.deploy.serving import this_process

    path = lock_file(out)
    mine = json.dumps({**this_process(), "started": time.time()})
    parent = os.path.dirname(path)
    made = not os.path.isdir(parent)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError:
        yield None
        return
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None:
                continue  # taken over (removed) or vanished: try again
            raise InputError(
                f"output_dir {out} is in use by another run: pid {holder['pid']}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))} (lock {path}): "
                "wait for it to finish, or set another output_dir") from None
        except OSError:
            yield None
            return
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        try:
            yield path
        finally:
            try:
                os.remove(path)
                if made:
                    os.rmdir(parent)  # a refused run leaves no folder behind (only an empty one goes)
            except OSError:
                pass
        return
    raise InputError(f"output_dir {out}: its lock {path} could not be taken: remove it if no run is using the folder")


def _lock_holder(path: str) -> Optional[dict]:
    """The live run holding the lock at `path`, or None after taking over (removing) a stale lock."""
    from spark_tuning.deploy.serving import same_process

    try:
        with open(path) as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    if same_process(holder):
        return holder
    log.warning("output_dir lock %s was left by a run that is gone (pid %s): taking it over", path, holder.get("pid"))
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    return None


def start_spark(cfg: Config, spark=None):
    """The session (the caller's, or one built from cfg.spark), checked against the config's processes."""
    from spark_tuning.cluster.launch import check_cluster, check_resources
    from spark_tuning.cluster.spark import get_spark

    spark = spark or get_spark(cfg.spark)
    check_resources(cfg.distributed, spark)
    check_cluster(cfg, spark)
    return spark


def stage(spark, cfg: Config, task, src, info: dict, folders: RunFolders):
    """Spark: read, check, clean, split, sample, tokenize and stage as Parquet (the task's data stage)."""
    from spark_tuning.loader.staging import check_training_shards

    staged = task.stage(spark, cfg, src, info, folders.staging)
    check_training_shards(staged.train_ref, cfg.distributed.num_processes)
    staged.profile, lengths = start_profile(cfg, task, info, staged)
    staged.fingerprint = data_fingerprint(lengths, staged.train_ref.num_rows, staged.eval_ref.num_rows)
    from spark_tuning.profile import render, write_files

    write_files(staged.profile, lengths, folders.profile)  # logged into the MLflow run by tracked_run
    steps = staged.profile["steps"]
    derived = derived_figures(cfg, staged.train_ref.num_rows, staged.figures.get("mean_tokens_per_row"))
    derived.pop("steps_per_epoch_at_least", None)
    # One step count: the one the ranks will run (planned here from the staged rows as each rank plans them).
    derived.update(steps_per_epoch=steps["steps_per_epoch"], total_steps=steps["total_steps"])
    staged.figures = {**derived, **staged.figures, "precision": _expected_precision(cfg)}
    log.info("data ready: %s", json.dumps(staged.figures, default=str))
    log.info("profile of this run (spark-tuning profile measures the rows whole, before truncation):\n%s",
             render(staged.profile))
    return staged


def data_fingerprint(lengths: np.ndarray, train_rows: int, eval_rows: int) -> str:
    """What a resumed run checks its data against: the staged rows' counts and their token lengths as a
    multiset (new or changed rows change them; the order, and so the number of processes, does not: a
    sharded checkpoint may resume onto another number)."""
    import hashlib

    digest = hashlib.sha256(np.sort(np.asarray(lengths, dtype=np.int64)).tobytes())
    digest.update(f"{train_rows}/{eval_rows}".encode())
    return digest.hexdigest()[:32]


def check_same_data(plan: Plan, fingerprint: str, overwrite: bool, out: str) -> Plan:
    """A checkpoint continues only the data it was trained on: the interrupted run's staged rows must be
    this run's (e.g. the table has had new rows since), else the resume is refused, or under --overwrite
    given up for a fresh start."""
    earlier = (plan.earlier_run or {}).get("data")
    if not plan.resume_from or earlier is None or earlier == fingerprint:
        return plan
    if overwrite:
        log.warning("output_dir %s: the interrupted run trained on other data (its staged rows differ from this "
                    "run's): --overwrite starts over instead of resuming from %s", out, plan.resume_from)
        return Plan(earlier_run=plan.earlier_run, clear_first=True)
    raise InputError(f"output_dir {out}: the interrupted run in {run_folder(out)} trained on other data than this run "
                     "reads (its staged rows' count or token lengths differ: the source has changed since): pass "
                     "--fresh (or --overwrite) to start over on this data, or set another output_dir")


def start_profile(cfg: Config, task, info: dict, staged) -> tuple[dict, np.ndarray]:
    """The profile's summary from the staged rows (and their lengths): lengths as cut, steps planned
    exactly as the ranks plan them (the Parquet loader; petastorm's readers share rows their own way, so
    there the split is even)."""
    from spark_tuning.loader.staging import Shard, rank_lengths
    from spark_tuning.profile import summarize

    n = cfg.distributed.num_processes
    if cfg.loader.kind == "parquet":
        shards = rank_lengths(staged.train_ref, n)
    else:
        whole = rank_lengths(staged.train_ref, 1)[0].lengths
        shards = [Shard.of_lengths(whole[r::n]) for r in range(n)]
    lengths = np.concatenate([s.lengths for s in shards])
    eval_lengths = rank_lengths(staged.eval_ref, 1)[0].lengths
    cut_at = cfg.data.max_length if task.truncates else None
    report = summarize(cfg, task, info, shards, eval_lengths, staged.figures, {}, cut_at, whole=False, lengths=lengths)
    report["steps"]["exact"] = cfg.loader.kind == "parquet"
    return report, lengths


@contextlib.contextmanager
def tracked_run(cfg: Config, plan: Plan, figures: dict, folders: RunFolders,
                report: Optional[dict] = None, fingerprint: Optional[str] = None) -> Iterator[Any]:
    """The MLflow run: the driver owns it, rank 0 logs into it by id. FINISHED when the body returns,
    FAILED when it raises (and, through the watchdog, when this process is killed). `report`: the
    start-of-job profile, logged as profile_* metrics and files under profile/."""
    from spark_tuning.track import watchdog

    run_ref = tracking.start_run(cfg)
    try:
        watchdog.start(run_ref.tracking_uri, run_ref.run_id)
        tracking.log_params(run_ref, {**cfg.to_dict(), "derived": figures})
        if report:
            from spark_tuning import profile

            tracking.log_metrics(run_ref, profile.metrics_of(report))
            tracking.log_artifacts(run_ref, folders.profile, "profile")
        if plan.earlier_run:
            tracking.close_stale_run(plan.earlier_run)  # a killed driver could not mark it FAILED
        if plan.resume_from:
            tracking.set_tag(run_ref, "spark_tuning.resumed_from", plan.resume_from)
        _mark_run_in_progress(folders.run, cfg, run_ref, plan.clear_first, fingerprint)
        yield run_ref
    except BaseException:
        try:
            tracking.end_run(run_ref, "FAILED")
        except Exception:  # noqa: BLE001 - report the original error, not this one
            log.exception("could not mark MLflow run %s as FAILED", run_ref.run_id)
        raise
    tracking.end_run(run_ref, "FINISHED")


def train(cfg: Config, src, staged, plan: Plan, folders: RunFolders, run_ref) -> dict:
    """Every rank trains (TorchDistributor); rank 0's events reach MLflow through the relay."""
    from spark_tuning.cluster.launch import run_distributed
    from spark_tuning.train import checkpoint
    from spark_tuning.train.loop import train_fn
    from spark_tuning.train.payload import TrainPayload

    os.makedirs(folders.partial)
    os.makedirs(folders.logs, exist_ok=True)
    ckpt = cfg.checkpoint
    payload = TrainPayload(
        config=cfg.to_dict(), train_ref=vars(staged.train_ref), eval_ref=vars(staged.eval_ref),
        model_source={"location": src.location, "is_local": src.is_local, "gguf_file": src.gguf_file},
        model_dir=folders.partial, id2label={str(k): v for k, v in staged.id2label.items()},
        task_extras=staged.extras, events=os.path.join(folders.logs, "rank0-events.jsonl"), log_dir=folders.logs,
        resume_from=plan.resume_from,
        checkpoint={"dir": checkpoint.checkpoint_dir(folders.run), "every_steps": ckpt.every_steps,
                    "keep_last": ckpt.keep_last} if ckpt.enabled else None)
    with tracking.relay(run_ref, payload.events):
        return run_distributed(train_fn, payload.to_dict(), cfg.distributed)


def training_figures(result: dict) -> dict:
    """What every task reports of its training: steps, speed, padding, precision, MFU, loader wait."""
    return {"train_steps": result["steps"], "train_tokens_per_second": result["tokens_per_second"],
            "train_padding_share": result["padding_share"], "train_precision": result["precision"],
            "train_device": result["device"], "train_tf32": result["tf32"], "train_mfu": result["mfu"],
            "train_matmul_peak_gflops": result["matmul_peak_gflops"], "train_data_wait_share": result["data_wait_share"],
            # train.early_stopping / keep_best: the best evaluation's step and value, and whether training stopped early
            **({"best_step": result["best_step"], "best_value": result["best_value"],
                "best_metric": result["best_metric"], "stopped_early": result["stopped_early"]}
               if result.get("best_step") is not None else {})}


def write_outputs(cfg: Config, task, staged, result: dict, folder: str) -> dict:
    """metrics.json, config.yaml and the training curves, plus the task's own files; returns the metrics."""
    from spark_tuning.evaluate.metrics import plot_curves

    metrics = {**task.metrics(result, staged), **training_figures(result)}
    task.write_outputs(folder, cfg, metrics, result, staged)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({**metrics, **task.metrics_file_extras(result)}, f, indent=2)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    if result["history"]:
        plot_curves(result["history"], os.path.join(folder, "training_curves.png"))
    return metrics


def deploy(cfg: Config, task, staged, result: dict, metrics: dict, folders: RunFolders, run_ref, overwrite: bool,
           timings: dict) -> dict:
    """Publish the folder first (nothing after training can lose the model), then log the outputs and the
    MLflow model (registered, aliased), and optionally serve the model and check it against the offline
    predictions."""
    from spark_tuning.deploy import steps
    from spark_tuning.errors import JobFailed
    from spark_tuning.train import checkpoint

    t, partial, out = time.perf_counter(), folders.partial, folders.out
    # The marker lists what this run wrote: a later --overwrite replaces the folder only while it holds nothing
    # else; with it go what logging the model needs, for log-model.
    inputs = logging_inputs(run_ref, result["precision"], staged.extras)
    write_owner_marker(partial, **inputs)
    publish(partial, out, overwrite, *sources_of(cfg))
    try:
        record = log_outputs(cfg, task, run_ref, out, metrics, **inputs)
    except Exception as e:  # noqa: BLE001 - the tracking store's errors; the model is safe, say so
        from spark_tuning.errors import error_line

        raise JobFailed(
            f"the trained model is saved in {out} (published before logging), but logging it to MLflow run "
            f"{run_ref.run_id} failed: {error_line(e)}. Nothing is lost: the folder loads with from_pretrained as "
            f"it is; once the tracking store answers, log it into that run with: spark-tuning log-model "
            f"--output-dir {out} (a rerun of the same command with --overwrite resumes from the final checkpoint "
            "and logs it too)") from e
    # Logged: the run's state has served its purpose. Kept until now, so that a retry after a logging failure
    # resumes from the final checkpoint instead of training again.
    last = checkpoint.latest(checkpoint.checkpoint_dir(folders.run))
    if cfg.checkpoint.keep_after_success and last:
        os.makedirs(checkpoint.checkpoint_dir(out), exist_ok=True)
        os.rename(last, os.path.join(checkpoint.checkpoint_dir(out), os.path.basename(last)))
        write_owner_marker(out)  # the kept checkpoint is the run's own
    remove_tree(folders.run, *sources_of(cfg))
    timings["logging"] = time.perf_counter() - t
    deployed: dict[str, Any] = {}
    if record is not None and cfg.deploy.verify:
        t = time.perf_counter()
        deployed["verify"] = steps.serve_and_verify(cfg, record, out).to_dict()
        timings["verify"] = time.perf_counter() - t
    if record is not None:
        deployed.update(model_uri=record.model_uri, serving_uri=record.serving_uri, version=record.version)
    return deployed


def logging_inputs(run_ref, precision: str, extras: dict) -> dict:
    """What logging the model needs beyond the folder's files (its run, where that lives, the precision it
    trained in, the task's extras), kept in its marker for `log-model`."""
    def plain(value):
        return value.tolist() if hasattr(value, "tolist") else str(value)

    return {"run_id": run_ref.run_id, "tracking_uri": run_ref.tracking_uri, "precision": precision,
            "extras": json.loads(json.dumps(extras, default=plain))}


def log_outputs(cfg: Config, task, run_ref, out: str, metrics: dict, precision: str, extras: dict, **_):
    """Log a published output folder into the MLflow run: final_* metrics, its files, and (tracking.log_model)
    the MLflow model, registered and aliased. The job's last logging step, and `spark-tuning log-model`'s
    after the tracking store failed there. Returns the model's record, or None."""
    from spark_tuning.deploy import steps

    tracking.log_metrics(run_ref, {f"final_{k}": v for k, v in metrics.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name in ("metrics.json", "config.yaml", "training_curves.png", *task.logged_files):
        if os.path.exists(os.path.join(out, name)):
            tracking.log_artifact(run_ref, os.path.join(out, name))
    if not cfg.tracking.log_model:
        return None
    record = steps.package(cfg, run_ref, out, precision, extras)
    write_owner_marker(out, run_id=run_ref.run_id)  # mlflow_model.json, the record it wrote, is the run's own
    if os.path.isdir(os.path.join(out, "adapter")):  # LoRA: the small adapter, for reuse
        tracking.log_artifacts(run_ref, os.path.join(out, "adapter"), "adapter")
    return record


def _expected_precision(cfg: Config) -> str:
    """The precision the ranks will pick, where the driver can tell (it may have no GPU of its own)."""
    from spark_tuning.cluster.launch import visible_gpus
    from spark_tuning.train.precision import resolve_precision

    if cfg.distributed.use_gpu and not visible_gpus():
        return f"{cfg.train.precision} (chosen by each training GPU)"
    return resolve_precision(cfg.train.precision, "cuda:0" if cfg.distributed.use_gpu else "cpu")


def _mark_run_in_progress(run_dir: str, cfg: Config, run_ref, clear_first: bool, fingerprint: Optional[str]) -> None:
    """Create the run folder with run.json: which config, data and MLflow run its checkpoints belong to."""
    if clear_first:
        remove_tree(run_dir, *sources_of(cfg))  # an interrupted run's own run.json and checkpoints
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, f".{RUN_MARKER}.tmp")
    with open(tmp, "w") as f:
        json.dump({"config": cfg.to_dict(), "data": fingerprint, "run_id": run_ref.run_id,
                   "tracking_uri": run_ref.tracking_uri}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(run_dir, RUN_MARKER))
