"""The rank's training loop: one picklable function that TorchDistributor runs on every rank.

`train_fn(payload)` gets plain data only (a `TrainPayload` as a dict: the config, where the staged data
lives, where to save) and imports what it needs inside, so it pickles by reference and captures no
SparkSession. Every rank trains on its own share of the data; DDP averages gradients. Rank 0 alone logs
and saves. Every rank returns rank 0's (small) result, because TorchDistributor may hand back any rank's.

The steps, top to bottom: setup_rank -> build (model, shards, schedule, optimizer) -> restore (a checkpoint's
TrainState) -> probe_peak -> train: per epoch train_epoch (micro_step, optimizer step, log_window,
checkpoints) then evaluate and checkpoint -> save the model -> result. The task (tasks/) supplies the head,
the evaluation and the before-training evaluation; nothing here knows which task runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

log = logging.getLogger("spark_tuning.train")


@dataclass
class Schedule:
    """Batches per epoch (the same on every rank: DDP steps together) and optimizer steps."""

    micro_per_epoch: list[int]
    total_steps: int
    warmup: int


@dataclass
class Window:
    """One logging window's running sums. The loss stays on the device until a log step: reading it
    every micro-step would wait for the GPU to finish that step before the next batch could be queued."""

    loss: Any = 0.0
    micro: int = 0
    tokens: int = 0
    padded: int = 0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class Rank:
    """What one rank trains with, set up once by `build`; progress lives in TrainState."""

    cfg: Any
    task: Any
    ctx: Any
    payload: Any  # TrainPayload
    src: Any
    tokenizer: Any
    precision: str
    tf32: bool
    tracker: Any
    model: Any = None
    ddp_model: Any = None
    train_shard: Any = None
    eval_shard: Any = None
    read_seconds: float = 0.0
    schedule: Optional[Schedule] = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    peak: float = 0.0
    flops_per_token: int = 0
    rss_start_mb: float = 0.0  # host memory before the model is built (interpreter, torch, transformers)
    read_weights: bool = True  # False: this rank read no pretrained weights (fsdp: its shards came from rank 0)
    parameters: tuple = (0, 0)  # (all, trainable), counted before saving (a LoRA merge removes the adapters)
    window: Window = field(default_factory=Window)
    clock: dict = field(default_factory=lambda: {"data": 0.0, "train": 0.0})

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in self.payload.id2label.items()}

    def plan_epoch(self, epoch: int, n_batches: Optional[int] = None) -> list:
        from spark_tuning.loader.batches import plan_train_batches

        tc = self.cfg.train
        return plan_train_batches(self.train_shard, tc.batch_size, self.cfg.seed, epoch, tc.group_by_length,
                                  max_tokens=tc.max_tokens_per_batch, n_batches=n_batches)


def out_of_memory_message(ctx, cfg, batch_shape: tuple[int, int], step: int, memory: dict) -> str:
    """What a rank that ran out of GPU memory tells the user: who, with how much, and what to change."""
    t = cfg.train
    ideas = []
    if t.max_tokens_per_batch:
        ideas.append(f"lower train.max_tokens_per_batch (now {t.max_tokens_per_batch})")
    else:
        ideas.append(f"lower train.batch_size (now {t.batch_size}; raise train.grad_accum_steps to keep the "
                     "global batch) or set train.max_tokens_per_batch")
    if not t.gradient_checkpointing:
        ideas.append("set train.gradient_checkpointing: true (activations recomputed: ~30% slower, far less memory)")
    if not cfg.lora.enabled:
        ideas.append("set lora.enabled: true (a frozen base needs no gradients or optimizer state)")
    gib = 2 ** 30
    return (f"rank {ctx.rank} ran out of memory on {ctx.device} ({memory.get('name', ctx.device)}, "
            f"{memory.get('total', 0) / gib:.1f} GiB; {memory.get('allocated', 0) / gib:.1f} GiB held by tensors, "
            f"peak {memory.get('peak', 0) / gib:.1f} GiB) at step {step + 1}, on a batch of {batch_shape[0]} rows x "
            f"{batch_shape[1]} tokens: " + "; or ".join(ideas))


def device_memory(device: str) -> dict:
    import torch

    if not device.startswith("cuda"):
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "total": props.total_memory, "allocated": torch.cuda.memory_allocated(device),
            "peak": torch.cuda.max_memory_allocated(device)}


@contextlib.contextmanager
def paused(run: Rank):
    """Leave the time spent inside (evaluation, checkpoints) out of the window's tokens/s and MFU."""
    t = time.perf_counter()
    try:
        yield
    finally:
        run.window.t0 += time.perf_counter() - t


def _quiet_libraries(rank_zero: bool) -> None:
    """One rank's load report is enough; progress bars garble interleaved logs."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not rank_zero:
        transformers.utils.logging.set_verbosity_error()


def train_fn(payload: dict[str, Any]) -> dict[str, Any]:
    """Runs on every rank. Sets up logging (a file per rank, for failure reports) around `_train`."""
    from spark_tuning.cluster.faults import FAILED, FINISHED, exit_without_teardown, start_rank_log
    from spark_tuning.secrets import install_excepthook, install_log_scrubbing

    install_excepthook()  # before exit_without_teardown's hook, which then chains to it (exit code kept)
    exit_without_teardown()  # first: before torch is imported (see there)

    # Each line names its rank: when a process dies, its own last lines can be picked out of the mix.
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    start_rank_log(payload.get("log_dir"), int(rank))
    install_log_scrubbing()
    try:
        result = _train(payload)
    except BaseException as e:
        log.exception("%s: %s", FAILED, e)
        raise
    log.info("%s", FINISHED)
    return result


def _train(raw: dict[str, Any]) -> dict[str, Any]:
    from spark_tuning.cluster.faults import teardown_skipped
    from spark_tuning.config import config_from_dict
    from spark_tuning.tasks import get_task
    from spark_tuning.train import distributed
    from spark_tuning.train.payload import TrainPayload
    from spark_tuning.train.state import restore

    payload = TrainPayload.from_dict(raw)
    cfg = config_from_dict(payload.config)
    run = setup_rank(cfg, get_task(cfg.task), payload)
    try:
        build(run)
        # Resume: same weights, optimizer, schedule and RNG as when the checkpoint was written; the
        # batches of the interrupted epoch that were already seen are skipped (plans are seeded).
        state = restore(payload.resume_from, run.model, run.optimizer, run.scheduler, run.scaler, run.ctx.rank,
                        run.ctx.world_size, run.ctx.device)
        memory_note(run, "model built and restored")
        wrap(run)
        probe_peak(run)
        eval_out = train(run, state)
        memory_note(run, "training done")
        save_model(run)
        memory_note(run, "model saved")
        return distributed.broadcast(result(run, state, eval_out), run.ctx)  # (every rank gathers in it)
    finally:
        # A torchrun process ends with os._exit right after this: the process group goes with it. Destroying
        # it here would drop the group's registry reference while DDP's reducer holds the last one, and the
        # reducer's release (when this frame's locals go) would then join gloo's worker thread with the GIL
        # held while that thread waits for the GIL to free its last work's tensors: a deadlock seen here
        # under load, one rank in ~10 hanging after "FINISHED" on the other.
        if not teardown_skipped():
            distributed.shutdown(run.ctx)


def memory_note(run: Rank, stage: str) -> None:
    """Each rank's host memory (now, and the peak so far) into its own log: where a rank's peak came from."""
    from spark_tuning.cluster.faults import rank_only
    from spark_tuning.model.build import peak_rss_mb, rss_mb

    rank_only.info("rank %d: %s: host memory %.0f MB (peak %.0f MB, %.0f MB at start)", run.ctx.rank, stage, rss_mb(),
                   peak_rss_mb(), run.rss_start_mb)


def setup_rank(cfg, task, payload) -> Rank:
    """Join the group, pick threads, seeds, precision (and TF32), and the tracker of rank 0's events."""
    import torch

    from spark_tuning.model.build import return_large_frees_to_os, rss_mb
    from spark_tuning.model.sources import ModelSource, load_tokenizer
    from spark_tuning.track.tracking import RankZeroLogger
    from spark_tuning.train import distributed, precision as numerics

    return_large_frees_to_os()  # before the first tensor: host memory freed is host memory back
    ctx = distributed.init(cfg.distributed.use_gpu, cfg.distributed.timeout_minutes,
                           strategy=cfg.distributed.strategy)
    _quiet_libraries(ctx.is_rank_zero)
    torch.set_num_threads(distributed.threads_per_process(ctx))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    precision = numerics.resolve_precision(cfg.train.precision, ctx.device)
    if ctx.sharded and precision == "fp16":  # `auto` on a V100 / T4
        raise RuntimeError(f"train.precision {cfg.train.precision!r} means fp16 on {ctx.device}, and fp16 loss scaling "
                           "over sharded gradients is not supported: set train.precision: fp32, or "
                           "distributed.strategy: ddp")
    warning = numerics.emulated_warning(precision, ctx.device)
    if warning and ctx.is_rank_zero:
        log.warning("%s", warning)
    if ctx.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    src = ModelSource(**payload.model_source)
    return Rank(cfg, task, ctx, payload, src, load_tokenizer(src, cfg.model), precision,
                numerics.enable_tf32(ctx.device), RankZeroLogger(payload.events, ctx.is_rank_zero),
                rss_start_mb=rss_mb())


def build(run: Rank) -> None:
    """The model (straight onto this rank's device: no full copy in host memory per rank; every rank from
    the same seed, and DDP broadcasts rank 0's weights too; fsdp: rank 0's weights, each rank its shard),
    this rank's data shards, the schedule, the optimizer."""
    import torch

    from spark_tuning.cluster.faults import rank_only
    from spark_tuning.loader.backends import read_shard_as
    from spark_tuning.loader.batches import optimizer_steps
    from spark_tuning.model.build import build_model
    from spark_tuning.train import distributed, precision as numerics
    from spark_tuning.train.optim import adamw, linear_schedule, param_groups

    cfg, ctx, tc = run.cfg, run.ctx, run.cfg.train
    # fsdp over several processes: rank 0 alone reads the pretrained weights, the others build the model on
    # the meta device and get their shards from rank 0 (CPU offload keeps its shards off the device: there
    # every rank loads, as DDP does).
    from_rank0 = ctx.sharded and ctx.world_size > 1 and not cfg.distributed.fsdp.cpu_offload
    run.model = build_model(run.task, cfg, run.src, run.tokenizer, run.id2label,
                            "meta" if from_rank0 and not ctx.is_rank_zero else ctx.device,
                            numerics.weights_dtype(run.precision, frozen_base=cfg.lora.enabled))
    if ctx.sharded:  # before the optimizer: it must hold the shards, not the whole parameters
        from spark_tuning.train.fsdp import load_from_rank0, shard

        full = run.model.state_dict() if from_rank0 and ctx.is_rank_zero else None  # the weights, not a copy
        run.model = shard(run.model, cfg.distributed.fsdp, run.precision, ctx.device)
        if from_rank0:
            load_from_rank0(run.model, full, ctx.device, ctx.rank)
            run.read_weights = ctx.is_rank_zero
        del full
    t = time.perf_counter()  # each rank reads only its own row groups (loader.kind picks the reader)
    run.train_shard = read_shard_as(cfg.loader.kind, run.payload.train_ref, ctx.rank, ctx.world_size)
    run.eval_shard = read_shard_as(cfg.loader.kind, run.payload.eval_ref, ctx.rank, ctx.world_size)
    run.read_seconds = time.perf_counter() - t
    # DDP: every rank runs the same number of batches in an epoch; ranks with fewer stretch their plan.
    micro = distributed.maximum([len(run.plan_epoch(e)) for e in range(tc.epochs)], ctx)
    total = optimizer_steps(micro, tc.grad_accum_steps, tc.max_steps)  # as the driver's summary counted them
    run.schedule = Schedule(micro, total, int(tc.warmup_ratio * total))
    rank_only.info("rank %d: %d training rows, %d validation rows, %d-%d batches per epoch (read in %.1fs)",
                   ctx.rank, len(run.train_shard), len(run.eval_shard), min(micro), max(micro), run.read_seconds)
    run.optimizer = adamw(param_groups(run.model, tc.weight_decay), tc.learning_rate, ctx.device)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, linear_schedule(run.schedule.warmup, total))
    run.scaler = numerics.grad_scaler(run.precision, ctx.device)  # fp16 only; passes through otherwise


def wrap(run: Rank) -> None:
    import torch

    from spark_tuning.train import distributed

    run.ddp_model = distributed.wrap(run.model, run.ctx)
    if run.cfg.train.compile:
        # Only the training forward/backward is compiled; evaluation, checkpoints and saving use `model`.
        # dynamic=True: batch widths change every step, which would otherwise recompile once more.
        run.ddp_model = torch.compile(run.ddp_model, dynamic=True)


def probe_peak(run: Rank) -> None:
    """MFU: rank 0 measures one process's matmul peak in the precision used (with TF32 on, an fp32 probe
    measures the TF32 path fp32 training takes) while the others wait (DDP's set-up has just lined them
    up), so that no rank's work slows the probe."""
    import torch

    from spark_tuning.model.sources import count_parameters
    from spark_tuning.train import distributed
    from spark_tuning.train.mfu import matmul_peak, training_flops_per_token

    ctx = run.ctx
    run.flops_per_token = training_flops_per_token(run.model)
    probe = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.precision, torch.float32)
    run.peak = distributed.broadcast(matmul_peak(probe, ctx.device, seconds=0.25) if ctx.is_rank_zero else None, ctx)
    run.tracker.params({"mfu.peak_gflops_per_process": round(run.peak, 2),
                        "mfu.peak_precision": "tf32" if run.tf32 and run.precision == "fp32" else run.precision,
                        "mfu.flops_per_token": run.flops_per_token,
                        "mfu.formula": "6 x non-embedding parameters (all, trainable or not) x useful tokens/s "
                                       "/ (matmul peak per process x processes); attention FLOPs not counted"})
    run.tracker.metrics({"matmul_peak_gflops": run.peak}, 0)
    run.parameters = count_parameters(run.model)
    if ctx.is_rank_zero:
        (total, trainable), s = run.parameters, run.schedule
        log.info("training %s (%s): %d parameters (%d trainable, %.1f%%), %d processes, precision %s%s, "
                 "%d steps (%d batches in the first epoch), warm-up %d", run.src.location, run.task.name, total,
                 trainable, 100 * trainable / total, ctx.world_size, run.precision,
                 " (TF32 matmuls)" if run.tf32 else "", s.total_steps, s.micro_per_epoch[0], s.warmup)
        log.info("spark_tuning code from %s, device %s", __file__, ctx.device)


def train(run: Rank, state) -> dict:
    """Every epoch, then an evaluation and a checkpoint (and evaluations every train.eval_every_steps); until
    early stopping says so. Returns the last evaluation's per-row output: the best model's with keep_best."""
    tc, eval_out = run.cfg.train, {}
    if run.task.eval_before_training and tc.eval_before_training and not state.resumed:
        eval_out = evaluate(run, state, 0)  # the untrained model, so that the run reports before and after
    start_epoch, skip = state.epoch, state.micro
    for epoch in range(start_epoch, tc.epochs):
        if state.step >= run.schedule.total_steps or state.stopped:
            break
        seconds, inner = train_epoch(run, state, epoch, skip if epoch == start_epoch else 0)
        if state.stopped and inner:  # stopped by an evaluation inside the epoch: its output stands
            eval_out = inner
            break
        eval_out = evaluate(run, state, epoch + 1, seconds)
        judge(run, state, state.epochs[-1])
        checkpoint(run, state, epoch + 1, 0)
    if not eval_out:  # resumed from the last checkpoint of a finished training: evaluate once more
        if state.epochs and state.epochs[-1]["step"] == state.step:
            state.epochs.pop()
        eval_out = evaluate(run, state, tc.epochs, 0.0)
    if tc.keep_best and state.best_step is not None and state.best_step != state.step:
        eval_out = restore_best(run, state)
    return eval_out


def judge(run: Rank, state, rec: dict) -> bool:
    """After an evaluation during training: whether it is the best so far by train.early_stopping.metric (then
    state.best_* is this step's), and whether patience ran out (state.stopped). Rank 0 decides for every rank,
    so that all stop at the same step."""
    from spark_tuning.config import lower_is_better, metric_key
    from spark_tuning.train import distributed

    tc = run.cfg.train
    es = tc.early_stopping
    if (es.patience is None and not tc.keep_best) or state.step == 0:
        return False
    key = metric_key(es.metric)
    if key not in rec:
        raise RuntimeError(f"train.early_stopping.metric = {es.metric!r}: this evaluation logged no {key} (it logged "
                           f"{', '.join(k for k in rec if k.startswith('eval_'))}); name one of those")
    value = float(rec[key])
    gain = (state.best_value - value if lower_is_better(es.metric, es.mode) else value - state.best_value) \
        if state.best_value is not None else float("inf")
    better = distributed.broadcast(gain > es.min_delta, run.ctx)
    if better:
        state.best_step, state.best_value, state.bad_evals = state.step, value, 0
    else:
        state.bad_evals += 1
    state.stopped = es.patience is not None and state.bad_evals >= es.patience
    if run.ctx.is_rank_zero:
        log.info("%s %.4g at step %d: %s (best %.4g at step %d)%s", key, value, state.step,
                 "the best so far" if better else f"{state.bad_evals} evaluation(s) without improvement",
                 state.best_value, state.best_step,
                 f"; early stopping: no improvement over {es.min_delta} in {es.patience} evaluations" if state.stopped else "")
    return better


def restore_best(run: Rank, state) -> dict:
    """train.keep_best: the best evaluation's weights back from its checkpoint, evaluated again (the run's final
    metrics and predictions are then the best model's)."""
    from spark_tuning.train.checkpoint import step_folder
    from spark_tuning.train.state import load_weights_only

    path = step_folder(run.payload.checkpoint["dir"], state.best_step)
    if not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise RuntimeError(f"train.keep_best: the best model's checkpoint (step {state.best_step}) is not in {path} "
                           "any more: was the checkpoints folder cleaned while the run was interrupted? Rerun with "
                           "train.keep_best: false to keep the last model")
    if run.ctx.is_rank_zero:
        log.info("train.keep_best: the final model is step %d's (%s %.4g), from %s", state.best_step,
                 run.cfg.train.early_stopping.metric, state.best_value, path)
    load_weights_only(path, run.model, run.optimizer)
    out = evaluate(run, state, state.epochs[-1]["epoch"] if state.epochs else 0)
    state.epochs[-1]["best_model_from_step"] = state.best_step
    return out


def train_epoch(run: Rank, state, epoch: int, skip: int) -> tuple[float, dict]:
    """One epoch's batches from `skip` on (a resumed epoch skips those already seen); its seconds, and the
    output of its last evaluation inside the epoch (train.eval_every_steps; {} when none ran)."""
    from spark_tuning.train.feed import timed, train_batches

    tc, s, every = run.cfg.train, run.schedule, (run.payload.checkpoint or {}).get("every_steps")
    eval_out: dict = {}
    run.ddp_model.train()
    plan = run.plan_epoch(epoch, s.micro_per_epoch[epoch])
    t = time.perf_counter()
    batches = timed(train_batches(run.train_shard, plan[skip:], run.tokenizer.pad_token_id, run.ctx.device,
                                  run.task.collate), run.clock)
    for micro, (_, batch, tensors) in enumerate(batches, start=skip):
        sync = (micro + 1) % tc.grad_accum_steps == 0 or micro + 1 == len(plan)
        loss = micro_step(run, batch, tensors, sync, state.step)
        w = run.window
        w.loss, w.micro = w.loss + loss.detach().float(), w.micro + 1
        w.tokens += int(batch["attention_mask"].sum())
        w.padded += int(batch["attention_mask"].size)
        if not sync:
            continue
        state.step += 1
        if state.step % tc.log_every_steps == 0 or state.step == s.total_steps:
            log_window(run, state, epoch + (micro + 1) / s.micro_per_epoch[epoch])
        best = False
        if tc.eval_every_steps and state.step % tc.eval_every_steps == 0 and state.step < s.total_steps \
                and micro + 1 < len(plan):  # (the epoch's end evaluates anyway)
            eval_out = evaluate(run, state, epoch + (micro + 1) / s.micro_per_epoch[epoch])
            run.ddp_model.train()
            best = judge(run, state, state.epochs[-1])
        due = every and state.step % every == 0 and state.step < s.total_steps
        if due or (best and tc.keep_best) or state.stopped:
            checkpoint(run, state, epoch, micro + 1)
        if state.step >= s.total_steps or state.stopped:
            break
    batches.close()  # stops the prefetch thread when the epoch ended early (max_steps)
    seconds = time.perf_counter() - t
    run.clock["train"] += seconds
    return seconds, eval_out


def micro_step(run: Rank, batch: dict, tensors: dict, sync: bool, step: int):
    """Forward and backward of one batch, and the optimizer step on the last of an accumulation."""
    import torch

    from spark_tuning.train import distributed, precision as numerics
    from spark_tuning.train.feed import to_device
    from spark_tuning.train.optim import optimizer_step

    ctx, tc = run.ctx, run.cfg.train
    try:
        # Skip the gradient all-reduce on accumulation micro-steps: it is only needed on the last.
        with distributed.no_sync(run.ddp_model, ctx, sync):
            with numerics.autocast(run.precision, ctx.device):
                loss = run.task.loss(run.ddp_model, to_device(tensors, ctx.device), run.cfg)
            run.scaler.scale(loss / tc.grad_accum_steps).backward()
        if sync:
            optimizer_step(run.model, run.optimizer, run.scheduler, run.scaler, tc.max_grad_norm)
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(out_of_memory_message(ctx, run.cfg, batch["input_ids"].shape, step,
                                                 device_memory(ctx.device))) from e
    return loss


def log_window(run: Rank, state, epoch: float) -> None:
    """The window's loss, speed, padding and MFU over every rank; into the history and rank 0's events."""
    from spark_tuning.cluster.faults import rank_only
    from spark_tuning.train import distributed
    from spark_tuning.train.mfu import mfu

    ctx, w, total = run.ctx, run.window, run.schedule.total_steps
    elapsed = time.perf_counter() - w.t0
    own_loss = float(w.loss) / w.micro
    # Every rank's own progress, into its own log file: the last lines shown if it dies.
    rank_only.info("rank %d: step %d/%d, own loss %.4f", ctx.rank, state.step, total, own_loss)
    loss_sum, tokens, padded = distributed.total([own_loss, w.tokens, w.padded], ctx)
    rec = {"step": state.step, "epoch": epoch, "train_loss": loss_sum / ctx.world_size,
           "learning_rate": run.scheduler.get_last_lr()[0], "tokens_per_second": tokens / elapsed,
           "padding_share": 1 - tokens / max(1, padded),
           "mfu": mfu(tokens / elapsed, run.flops_per_token, run.peak, ctx.world_size)}
    state.history.append(rec)
    state.totals["tokens"] += tokens
    state.totals["padded"] += padded
    state.totals["seconds"] += elapsed
    run.tracker.metrics({k: v for k, v in rec.items() if k != "step"}, state.step)
    if ctx.is_rank_zero:
        log.info("step %d/%d epoch %.2f loss %.4f lr %.2e %.0f tok/s padding %.0f%% MFU %.1f%%", state.step, total,
                 epoch, rec["train_loss"], rec["learning_rate"], rec["tokens_per_second"],
                 100 * rec["padding_share"], 100 * rec["mfu"])
    run.window = Window()


def evaluate(run: Rank, state, epoch: int, seconds: Optional[float] = None) -> dict:
    """The task's evaluation on every rank; its record joins state.epochs and rank 0's events."""
    from spark_tuning.train import distributed

    with paused(run), distributed.for_evaluation(run.model, run.ctx, run.cfg.distributed.fsdp.reshard_after_forward):
        rec, out = run.task.evaluate(run.model, run.eval_shard, run.cfg, run.payload.task_extras, run.tokenizer,
                                     run.ctx, run.precision, state.step, run.tracker, run.id2label)
    rec = {"epoch": epoch, **rec}
    if seconds is not None:
        rec["epoch_train_seconds"] = seconds
    state.epochs.append(rec)
    figures = {k: v for k, v in rec.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
    run.tracker.metrics(figures, state.step)
    if run.ctx.is_rank_zero:
        log.info("evaluation after epoch %.4g (step %d): %s", epoch, state.step,
                 ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in figures.items() if k.startswith("eval_")))
    return out


def checkpoint(run: Rank, state, epoch: int, micro: int) -> None:
    """Every rank hands over its RNG states (dropout masks differ per rank); rank 0 writes the TrainState,
    the weights and the optimizer. Positioned at (epoch, micro): where a resume starts."""
    from spark_tuning.train import distributed
    from spark_tuning.train.state import rng_state, save, save_sharded

    ckpt = run.payload.checkpoint
    if not ckpt:
        return
    with paused(run):
        state.epoch, state.micro = epoch, micro
        rng = distributed.gather(rng_state(run.ctx.device), run.ctx)
        spare = state.best_step if run.cfg.train.keep_best else None  # the best one outlives keep_last
        if run.ctx.sharded:
            path = save_sharded(ckpt["dir"], state, run.model, run.optimizer, run.scheduler, run.scaler, rng,
                                ckpt["keep_last"], run.ctx, spare)
            if run.ctx.is_rank_zero:
                log.info("checkpoint written: %s", path)
        elif run.ctx.is_rank_zero:
            path = save(ckpt["dir"], state, run.model, run.optimizer, run.scheduler, run.scaler, rng, ckpt["keep_last"],
                        spare)
            log.info("checkpoint written: %s", path)


def save_model(run: Rank) -> None:
    """Rank 0: weights in fp32 safetensors, with the tokenizer and the label names in config.json. LoRA:
    the adapter alone in adapter/, and the merged model beside it."""
    from spark_tuning.model import lora
    from spark_tuning.model.build import export_model, rebuild_from

    if run.ctx.sharded:  # gathered once, on rank 0, into a plain model of the same shape
        from spark_tuning.train.fsdp import full_state_dict

        run.optimizer.state.clear()  # training is over (and checkpointed): room for the gathered copy
        full = full_state_dict(run.model)
        if run.ctx.is_rank_zero:
            model = rebuild_from(full, run.task, run.cfg, run.src, run.tokenizer, run.id2label)
            lora.save(model, run.tokenizer, run.payload.model_dir)
    elif run.ctx.is_rank_zero:
        model = export_model(run.model, run.task, run.cfg, run.src, run.tokenizer, run.id2label)
        lora.save(model, run.tokenizer, run.payload.model_dir)


def result(run: Rank, state, eval_out: dict) -> dict:
    from spark_tuning.model.build import peak_rss_mb
    from spark_tuning.train import distributed
    from spark_tuning.train.mfu import mfu

    t, ctx = state.totals, run.ctx
    # per rank: fsdp lowers them
    rss, start, read = zip(*distributed.gather((peak_rss_mb(), run.rss_start_mb, run.read_weights), ctx))
    total, trainable = run.parameters
    tps = t["tokens"] / max(1e-9, t["seconds"])
    return {
        "history": state.history, "epochs": state.epochs, "eval": eval_out, "steps": state.step,
        "best_step": state.best_step, "best_value": state.best_value, "stopped_early": state.stopped,
        "best_metric": run.cfg.train.early_stopping.metric,
        "precision": run.precision, "device": ctx.device_type, "tf32": run.tf32,
        "loss_scale": run.scaler.get_scale() if run.scaler.is_enabled() else None, "world_size": ctx.world_size,
        "parameters": total, "trainable_parameters": trainable, "train_tokens": t["tokens"],
        "tokens_per_second": tps, "padding_share": 1 - t["tokens"] / max(1, t["padded"]),
        "mfu": mfu(tps, run.flops_per_token, run.peak, ctx.world_size), "matmul_peak_gflops": run.peak,
        "flops_per_token": run.flops_per_token, "train_seconds": t["seconds"],
        # Loader overhead: reading this rank's shard once, and waiting for batches during training.
        "shard_read_seconds": run.read_seconds, "data_wait_seconds": run.clock["data"],
        "data_wait_share": run.clock["data"] / max(1e-9, run.clock["train"]),
        "peak_gpu_memory_bytes": device_memory(ctx.device).get("peak"),
        "peak_rss_mb": max(rss), "peak_rss_mb_per_rank": list(rss), "start_rss_mb_per_rank": list(start),
        "read_weights_per_rank": list(read),
    }
