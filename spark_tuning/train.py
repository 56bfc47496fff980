"""The training loop: one picklable function that TorchDistributor runs on every rank.

`train_fn(payload)` gets plain data only (the config as a dict, where the staged data lives, the MLflow
run id) and imports what it needs inside, so it pickles by reference and captures no SparkSession. Every
rank trains on its own share of the data; DDP averages gradients. Rank 0 alone logs and saves. Every rank
returns rank 0's (small) result, because TorchDistributor may hand back any rank's value.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from typing import Any, Iterable, Iterator

import numpy as np

log = logging.getLogger("spark_tuning.train")


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights (the usual AdamW recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, device: str):
    """AdamW with the fused kernel (one pass over each parameter instead of several: the step takes a
    quarter of the time on CPU, ~2% of a MiniLM step) where torch has it for the device; else foreach."""
    import torch

    try:
        return torch.optim.AdamW(groups, lr=lr, fused=device.split(":")[0] in ("cpu", "cuda"))
    except (RuntimeError, TypeError):  # a torch or device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr)


def linear_schedule(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def to_device(batch: dict, device: str) -> dict:
    """Host batch -> device. On CUDA from pinned memory and non-blocking: the copy overlaps the work
    already queued on the GPU (`pinned` below pins in the prefetch thread, off the training thread)."""
    import torch

    cuda = device.startswith("cuda")
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
        out[k] = t.to(device, non_blocking=cuda and t.is_pinned())
    return out


def pinned(batch: dict[str, np.ndarray], device: str) -> dict:
    """Tensors of `batch`, in page-locked memory where the copy goes to a GPU."""
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    return {k: t.pin_memory() for k, t in tensors.items()} if device.startswith("cuda") else tensors


def ahead(items: Iterable, depth: int = 2) -> Iterator:
    """Yield from `items`, producing up to `depth` items ahead in a thread: the next batch is collated
    (and pinned) while the current one trains. An error in the thread is raised here; leaving early
    stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            put((e, None))

    thread = threading.Thread(target=work, name="spark-tuning-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            error, item = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()


def train_batches(shard, plan, pad_id: int, device: str) -> Iterator:
    """(index, host batch, tensors to copy) of each planned batch, collated ahead in a thread."""
    from spark_tuning.loader import iterate

    return ahead((index, batch, pinned(batch, device)) for index, batch in iterate(shard, plan, pad_id))


def predict(model, shard, plan, pad_id: int, device: str, precision: str) -> dict[str, np.ndarray]:
    """Logits for every row of `shard`, batched by `plan`; returns row ids, predictions, probabilities."""
    import torch

    from spark_tuning.loader import iterate
    from spark_tuning.precision import autocast

    model.eval()
    row_ids, probs, loss_sum = [], [], 0.0
    with torch.inference_mode(), autocast(precision, device):
        for index, batch in iterate(shard, plan, pad_id):
            out = model(**to_device(batch, device))
            loss_sum += float(out.loss) * len(index)
            probs.append(torch.softmax(out.logits.float(), dim=-1).cpu().numpy())
            row_ids.append(shard.row_ids[index])
    if not probs:
        return {"row_ids": np.zeros(0, np.int64), "probs": np.zeros((0, 0)), "labels": np.zeros(0, np.int64),
                "loss_sum": 0.0}
    ids = np.concatenate(row_ids)
    labels = shard.labels[np.concatenate(plan)]
    return {"row_ids": ids, "probs": np.concatenate(probs), "labels": labels, "loss_sum": loss_sum}


def _resume(path, model, optimizer, scheduler, scaler, ctx) -> dict:
    """Load a checkpoint into the model, optimizer, loss scaler and RNGs (before DDP wraps the model); {}
    when starting fresh. Optimizer states load onto the CPU first and go to the parameters' device."""
    if not path:
        return {}
    from spark_tuning import checkpoint

    state = checkpoint.load_state(path)
    if state["world_size"] != ctx.world_size:
        raise RuntimeError(f"checkpoint {path} was written by {state['world_size']} processes, not {ctx.world_size}")
    checkpoint.load_weights(path, model)
    training = checkpoint.load_training_state(path)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    if training.get("scaler"):
        scaler.load_state_dict(training["scaler"])
    set_rng_state(training["rng"][ctx.rank], ctx.device)
    if ctx.is_rank_zero:
        log.info("resumed from %s: step %d, epoch %d, %d batches of that epoch already done",
                 path, state["step"], state["epoch"], state["micro"])
    return state


def rng_state(device: str) -> dict:
    """This rank's random state: the CPU generator, and the GPU's (dropout masks on a GPU come from it)."""
    import torch

    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def set_rng_state(state, device: str) -> None:
    import torch

    if isinstance(state, torch.Tensor):  # a checkpoint written before GPU states were kept
        state = {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


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


def _timed(batches, clock: dict[str, float]):
    """Yield from `batches`, adding the time spent waiting for each one to clock["data"]: the loader's
    share of a training step, comparable between loader backends. Closing this closes `batches`."""
    it = iter(batches)
    try:
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            clock["data"] += time.perf_counter() - t
            yield item
    finally:
        if hasattr(it, "close"):
            it.close()


def optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm: float) -> None:
    """One optimizer step. With fp16 the gradients are unscaled before clipping (the norm is of the true
    gradients), and a step whose gradients overflowed is skipped by the scaler, which lowers its scale."""
    import torch

    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _paused(window: dict):
    """Leave the time spent inside (evaluation, checkpoints) out of the window's tokens/s and MFU."""
    t = time.perf_counter()
    try:
        yield
    finally:
        window["t0"] += time.perf_counter() - t


def _quiet_libraries(rank_zero: bool) -> None:
    """One rank's load report is enough; progress bars garble interleaved logs."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not rank_zero:
        transformers.utils.logging.set_verbosity_error()


def train_fn(payload: dict[str, Any]) -> dict[str, Any]:
    """Runs on every rank. Sets up logging (a file per rank, for failure reports) around `_train`."""
    from spark_tuning.faults import FAILED, FINISHED, exit_without_teardown, start_rank_log
    from spark_tuning.secrets import install_log_scrubbing

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


def _train(payload: dict[str, Any]) -> dict[str, Any]:
    import torch

    from spark_tuning import checkpoint, distributed
    from spark_tuning.config import config_from_dict
    from spark_tuning.faults import rank_only, teardown_skipped
    from spark_tuning.evaluate import classification_metrics
    from spark_tuning import lm_train, lora, precision as numerics
    from spark_tuning.loader import plan_eval_batches, plan_train_batches, read_shard_as
    from spark_tuning.mfu import matmul_peak, mfu, training_flops_per_token
    from spark_tuning.model import ModelSource, count_parameters, load_tokenizer
    from spark_tuning.tracking import RankZeroLogger

    cfg = config_from_dict(payload["config"])
    tc = cfg.train
    ctx = distributed.init(cfg.distributed.use_gpu, cfg.distributed.timeout_minutes)
    _quiet_libraries(ctx.is_rank_zero)
    try:
        torch.set_num_threads(distributed.threads_per_process(ctx))
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        tracker = RankZeroLogger(payload.get("events"), ctx.is_rank_zero)  # the driver relays it to MLflow
        precision = numerics.resolve_precision(tc.precision, ctx.device)
        tf32 = numerics.enable_tf32(ctx.device)
        warning = numerics.emulated_warning(precision, ctx.device)
        if warning and ctx.is_rank_zero:
            log.warning("%s", warning)
        if ctx.device_type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)

        # Model, built straight onto this rank's device (no full copy in host memory per rank). Every
        # rank builds it from the same seed; DDP also broadcasts rank 0's weights.
        src = ModelSource(**payload["model_source"])
        tokenizer = load_tokenizer(src, cfg.model)
        id2label = {int(k): v for k, v in payload["id2label"].items()}
        # The model for the task (classification head or causal LM), with LoRA / checkpointing if set.
        model = lm_train.build_model(cfg, src, tokenizer, id2label, ctx.device,
                                     numerics.weights_dtype(precision, frozen_base=cfg.lora.enabled))
        lm = payload.get("lm") or {}
        total_params, trainable = count_parameters(model)

        # Data: each rank reads only its own row groups of the staged data (loader.kind picks the reader).
        t_read = time.perf_counter()
        train_shard = read_shard_as(cfg.loader.kind, payload["train_ref"], ctx.rank, ctx.world_size)
        eval_shard = read_shard_as(cfg.loader.kind, payload["eval_ref"], ctx.rank, ctx.world_size)
        read_seconds = time.perf_counter() - t_read

        def plan_epoch(epoch: int, n_batches=None) -> list:
            return plan_train_batches(train_shard, tc.batch_size, cfg.seed, epoch, tc.group_by_length,
                                      max_tokens=tc.max_tokens_per_batch, n_batches=n_batches)

        # DDP: every rank runs the same number of batches in an epoch; ranks with fewer stretch their plan.
        micro_per_epoch = distributed.maximum([len(plan_epoch(e)) for e in range(tc.epochs)], ctx)
        steps_per_epoch = [math.ceil(n / tc.grad_accum_steps) for n in micro_per_epoch]
        total_steps = sum(steps_per_epoch)
        rank_only.info("rank %d: %d training rows, %d validation rows, %d-%d batches per epoch (read in %.1fs)",
                       ctx.rank, len(train_shard), len(eval_shard), min(micro_per_epoch), max(micro_per_epoch),
                       read_seconds)
        if tc.max_steps:
            total_steps = min(total_steps, tc.max_steps)
        warmup = int(tc.warmup_ratio * total_steps)

        optimizer = adamw(param_groups(model, tc.weight_decay), tc.learning_rate, ctx.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total_steps))
        scaler = numerics.grad_scaler(precision, ctx.device)  # fp16 only; passes through otherwise

        # Resume: same weights, optimizer, schedule and RNG as when the checkpoint was written; the
        # batches of the interrupted epoch that were already seen are skipped (plans are seeded).
        resume = _resume(payload.get("resume_from"), model, optimizer, scheduler, scaler, ctx)
        ddp_model = distributed.wrap(model, ctx)
        if tc.compile:
            # Only the training forward/backward is compiled; evaluation, checkpoints and saving use `model`.
            # dynamic=True: batch widths change every step, which would otherwise recompile once more.
            ddp_model = torch.compile(ddp_model, dynamic=True)

        # MFU: rank 0 measures one process's matmul peak in the precision used, while the other ranks wait
        # (DDP's set-up above has just lined them up), so that no rank's work slows the probe.
        flops_per_token = training_flops_per_token(model)
        # With TF32 on, an fp32 probe measures the TF32 tensor-core path that fp32 training takes.
        probe = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        peak = distributed.broadcast(matmul_peak(probe, ctx.device, seconds=0.25) if ctx.is_rank_zero else None, ctx)
        peak_precision = "tf32" if tf32 and precision == "fp32" else precision
        tracker.params({"mfu.peak_gflops_per_process": round(peak, 2), "mfu.peak_precision": peak_precision,
                        "mfu.flops_per_token": flops_per_token,
                        "mfu.formula": "6 x non-embedding parameters (all, trainable or not) x useful tokens/s "
                                       "/ (matmul peak per process x processes); attention FLOPs not counted"})
        tracker.metrics({"matmul_peak_gflops": peak}, 0)
        if ctx.is_rank_zero:
            log.info("training %s: %d parameters (%d trainable, %.1f%%), %d processes, precision %s%s, "
                     "%d steps (%d in the first epoch), warm-up %d", src.location, total_params, trainable,
                     100 * trainable / total_params, ctx.world_size, precision, " (TF32 matmuls)" if tf32 else "",
                     total_steps, steps_per_epoch[0], warmup)
            log.info("spark_tuning code from %s, device %s", __file__, ctx.device)

        history: list[dict] = resume.get("history", [])
        epochs: list[dict] = resume.get("epochs", [])
        step = resume.get("step", 0)
        start_epoch, skip = resume.get("epoch", 0), resume.get("micro", 0)
        ckpt = payload.get("checkpoint")  # {"dir", "every_steps", "keep_last"} or None

        def save_checkpoint(epoch: int, micro: int) -> None:
            # Every rank hands over its RNG states (dropout masks differ per rank); rank 0 writes.
            rng = distributed.gather(rng_state(ctx.device), ctx)
            if ctx.is_rank_zero:
                state = {"step": step, "epoch": epoch, "micro": micro, "history": history, "epochs": epochs,
                         "totals": totals, "world_size": ctx.world_size}
                path = checkpoint.save(ckpt["dir"], step, model, optimizer, scheduler, rng, state, ckpt["keep_last"],
                                       scaler=scaler.state_dict() if scaler.is_enabled() else None)
                log.info("checkpoint written: %s", path)

        def evaluate_now(epoch_done: int, train_seconds: float) -> dict:
            """Every rank predicts its share of the validation rows; every rank gets the whole picture."""
            local = predict(model, eval_shard, plan_eval_batches(eval_shard, tc.eval_batch_size),
                            tokenizer.pad_token_id, ctx.device, precision)
            parts = distributed.gather(local, ctx)
            row_ids = np.concatenate([p["row_ids"] for p in parts])
            probs = np.concatenate([p["probs"] for p in parts if len(p["probs"])])
            labels = np.concatenate([p["labels"] for p in parts])
            preds = probs.argmax(axis=1)
            metrics = classification_metrics(preds, labels, list(id2label.values()))
            eval_loss = sum(p["loss_sum"] for p in parts) / max(1, len(labels))
            epoch_rec = {"epoch": epoch_done, "step": step, "eval_loss": eval_loss, "eval_accuracy": metrics["accuracy"],
                         "eval_f1": metrics["f1"], "epoch_train_seconds": train_seconds}
            epochs.append(epoch_rec)
            tracker.metrics({k: v for k, v in epoch_rec.items() if k not in ("step", "epoch")}, step)
            if ctx.is_rank_zero:
                log.info("epoch %d: eval loss %.4f accuracy %.4f f1 %.4f", epoch_done, eval_loss,
                         metrics["accuracy"], metrics["f1"])
            order = np.argsort(row_ids)
            return {"row_ids": row_ids[order].tolist(), "preds": preds[order].tolist(),
                    "labels": labels[order].tolist(), "probs": probs[order].round(6).tolist()}
        window = {"loss": 0.0, "micro": 0, "tokens": 0, "padded": 0, "t0": time.perf_counter()}
        totals = resume.get("totals", {"tokens": 0, "padded": 0, "seconds": 0.0})
        clock = {"data": 0.0, "train": 0.0}
        eval_out: dict = {}
        if cfg.task != "classification" and tc.eval_before_training and not resume:
            # causal_lm / sft: the untrained model's loss, so that the run reports before and after.
            with _paused(window):
                rec, eval_out = lm_train.evaluate(model, eval_shard, cfg, lm, tokenizer, ctx, precision, 0, 0,
                                                  tracker)
            epochs.append(rec)
        for epoch in range(start_epoch, tc.epochs):
            if step >= total_steps:
                break
            ddp_model.train()
            plan = plan_epoch(epoch, micro_per_epoch[epoch])
            if epoch == start_epoch and skip:
                plan_skipped, plan = plan[:skip], plan[skip:]
            else:
                plan_skipped = []
            t_epoch = time.perf_counter()
            batches = _timed(train_batches(train_shard, plan, tokenizer.pad_token_id, ctx.device), clock)
            for micro, (index, batch, tensors) in enumerate(batches, start=len(plan_skipped)):
                sync = (micro + 1) % tc.grad_accum_steps == 0 or micro + 1 == len(plan) + len(plan_skipped)
                try:
                    # Skip the gradient all-reduce on accumulation micro-steps: it is only needed on the last.
                    with (contextlib.nullcontext() if sync or not ctx.is_distributed else ddp_model.no_sync()):
                        with numerics.autocast(precision, ctx.device):
                            loss = ddp_model(**to_device(tensors, ctx.device)).loss
                        scaler.scale(loss / tc.grad_accum_steps).backward()
                    if sync:
                        optimizer_step(model, optimizer, scheduler, scaler, tc.max_grad_norm)
                except torch.cuda.OutOfMemoryError as e:
                    raise RuntimeError(out_of_memory_message(ctx, cfg, batch["input_ids"].shape, step,
                                                             device_memory(ctx.device))) from e
                # The loss stays on the device until a log step: reading it here would wait for the GPU
                # to finish this step before the next batch could be queued.
                window["loss"] = window["loss"] + loss.detach().float()
                window["micro"] += 1
                window["tokens"] += int(batch["attention_mask"].sum())
                window["padded"] += int(batch["attention_mask"].size)
                if not sync:
                    continue
                step += 1
                if step % tc.log_every_steps == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window["t0"]
                    own_loss = float(window["loss"]) / window["micro"]
                    # Every rank's own progress, into its own log file: the last lines shown if it dies.
                    rank_only.info("rank %d: step %d/%d, own loss %.4f", ctx.rank, step, total_steps, own_loss)
                    loss_avg, tokens, padded = distributed.total([own_loss, window["tokens"], window["padded"]], ctx)
                    loss_avg /= ctx.world_size
                    rec = {"step": step, "epoch": epoch + (micro + 1) / micro_per_epoch[epoch],
                           "train_loss": loss_avg, "learning_rate": scheduler.get_last_lr()[0],
                           "tokens_per_second": tokens / elapsed, "padding_share": 1 - tokens / max(1, padded),
                           "mfu": mfu(tokens / elapsed, flops_per_token, peak, ctx.world_size)}
                    history.append(rec)
                    totals["tokens"] += tokens
                    totals["padded"] += padded
                    totals["seconds"] += elapsed
                    tracker.metrics({k: v for k, v in rec.items() if k != "step"}, step)
                    if ctx.is_rank_zero:
                        log.info("step %d/%d epoch %.2f loss %.4f lr %.2e %.0f tok/s padding %.0f%% MFU %.1f%%",
                                 step, total_steps, rec["epoch"], loss_avg, rec["learning_rate"],
                                 rec["tokens_per_second"], 100 * rec["padding_share"], 100 * rec["mfu"])
                    window = {"loss": 0.0, "micro": 0, "tokens": 0, "padded": 0, "t0": time.perf_counter()}
                if ckpt and ckpt["every_steps"] and step % ckpt["every_steps"] == 0 and step < total_steps:
                    with _paused(window):
                        save_checkpoint(epoch, micro + 1)
                if step >= total_steps:
                    break
            batches.close()  # stops the prefetch thread when the epoch ended early (max_steps)
            train_seconds = time.perf_counter() - t_epoch
            clock["train"] += train_seconds

            with _paused(window):
                if cfg.task != "classification":
                    rec, eval_out = lm_train.evaluate(model, eval_shard, cfg, lm, tokenizer, ctx, precision,
                                                      epoch + 1, step, tracker)
                    epochs.append({**rec, "epoch_train_seconds": train_seconds})
                else:
                    eval_out = evaluate_now(epoch + 1, train_seconds)
                if ckpt:
                    save_checkpoint(epoch + 1, 0)

        if not eval_out:  # resumed from the last checkpoint of a finished training: evaluate once more
            if epochs and epochs[-1]["step"] == step:
                epochs.pop()
            if cfg.task == "classification":
                eval_out = evaluate_now(tc.epochs, 0.0)
            else:
                rec, eval_out = lm_train.evaluate(model, eval_shard, cfg, lm, tokenizer, ctx, precision,
                                                  tc.epochs, step, tracker)
                epochs.append(rec)
        if ctx.is_rank_zero:
            # Weights in fp32 safetensors, with the tokenizer and the label names in config.json. LoRA:
            # the adapter alone in adapter/, and the merged model beside it.
            lora.save(lm_train.export_model(model, cfg, src, tokenizer, id2label), tokenizer, payload["model_dir"])
        result = {
            "history": history,
            "epochs": epochs,
            "eval": eval_out,
            "steps": step,
            "precision": precision,
            "device": ctx.device_type,
            "tf32": tf32,
            "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
            "world_size": ctx.world_size,
            "parameters": total_params,
            "trainable_parameters": trainable,
            "train_tokens": totals["tokens"],
            "tokens_per_second": totals["tokens"] / max(1e-9, totals["seconds"]),
            "padding_share": 1 - totals["tokens"] / max(1, totals["padded"]),
            "mfu": mfu(totals["tokens"] / max(1e-9, totals["seconds"]), flops_per_token, peak, ctx.world_size),
            "matmul_peak_gflops": peak,
            "flops_per_token": flops_per_token,
            "train_seconds": totals["seconds"],
            # Loader overhead: reading this rank's shard once, and waiting for batches during training.
            "shard_read_seconds": read_seconds,
            "data_wait_seconds": clock["data"],
            "data_wait_share": clock["data"] / max(1e-9, clock["train"]),
            "peak_gpu_memory_bytes": device_memory(ctx.device).get("peak"),
            "peak_rss_mb": max(distributed.gather(lm_train.peak_rss_mb(), ctx)),
        }
        return distributed.broadcast(result if ctx.is_rank_zero else None, ctx)
    finally:
        # A torchrun process ends with os._exit right after this: the process group goes with it. Destroying
        # it here would drop the group's registry reference while DDP's reducer holds the last one, and the
        # reducer's release (when this frame's locals go) would then join gloo's worker thread with the GIL
        # held while that thread waits for the GIL to free its last work's tensors: a deadlock seen here
        # under load, one rank in ~10 hanging after "FINISHED" on the other.
        if not teardown_skipped():
            distributed.shutdown(ctx)
