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
import time
from typing import Any

import numpy as np

log = logging.getLogger("spark_tuning.train")


def resolve_precision(precision: str, device: str) -> str:
    """'auto' means bf16 only where the hardware multiplies bf16 natively. On CPUs without bf16 units
    (AVX2 only) bf16 matmuls are emulated and run ~50x slower than fp32, so auto picks fp32 there."""
    import torch

    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


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


def to_device(batch: dict[str, np.ndarray], device: str) -> dict:
    import torch

    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


def predict(model, shard, plan, pad_id: int, device: str, precision: str) -> dict[str, np.ndarray]:
    """Logits for every row of `shard`, batched by `plan`; returns row ids, predictions, probabilities."""
    import torch

    from spark_tuning.loader import iterate

    model.eval()
    row_ids, probs, loss_sum = [], [], 0.0
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
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


def _resume(path, model, optimizer, scheduler, ctx) -> dict:
    """Load a checkpoint into the model and optimizer (before DDP wraps the model); {} when starting fresh."""
    if not path:
        return {}
    import torch

    from spark_tuning import checkpoint

    state = checkpoint.load_state(path)
    if state["world_size"] != ctx.world_size:
        raise RuntimeError(f"checkpoint {path} was written by {state['world_size']} processes, not {ctx.world_size}")
    checkpoint.load_weights(path, model)
    training = checkpoint.load_training_state(path)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    torch.set_rng_state(training["rng"][ctx.rank])
    if ctx.is_rank_zero:
        log.info("resumed from %s: step %d, epoch %d, %d batches of that epoch already done",
                 path, state["step"], state["epoch"], state["micro"])
    return state


def _timed(batches, clock: dict[str, float]):
    """Yield from `batches`, adding the time spent waiting for each one to clock["data"]: the loader's
    share of a training step, comparable between loader backends."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        clock["data"] += time.perf_counter() - t
        yield item


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
    from spark_tuning.faults import rank_only
    from spark_tuning.evaluate import classification_metrics
    from spark_tuning import lm_train, lora
    from spark_tuning.loader import iterate, plan_eval_batches, plan_train_batches, read_shard_as
    from spark_tuning.mfu import matmul_peak, mfu, training_flops_per_token
    from spark_tuning.model import ModelSource, count_parameters, load_tokenizer
    from spark_tuning.tracking import RankZeroLogger

    cfg = config_from_dict(payload["config"])
    tc = cfg.train
    ctx = distributed.init(cfg.distributed.use_gpu)
    _quiet_libraries(ctx.is_rank_zero)
    try:
        torch.set_num_threads(distributed.threads_per_process(ctx))
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        tracker = RankZeroLogger(payload.get("events"), ctx.is_rank_zero)  # the driver relays it to MLflow
        precision = resolve_precision(tc.precision, ctx.device)

        # Model. Every rank builds it from the same seed; DDP also broadcasts rank 0's weights.
        src = ModelSource(**payload["model_source"])
        tokenizer = load_tokenizer(src, cfg.model)
        id2label = {int(k): v for k, v in payload["id2label"].items()}
        # The model for the task (classification head or causal LM), with LoRA / checkpointing if set.
        model = lm_train.build_model(cfg, src, tokenizer, id2label).to(ctx.device)
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

        # Resume: same weights, optimizer, schedule and RNG as when the checkpoint was written; the
        # batches of the interrupted epoch that were already seen are skipped (plans are seeded).
        resume = _resume(payload.get("resume_from"), model, optimizer, scheduler, ctx)
        ddp_model = distributed.wrap(model, ctx)
        if tc.compile:
            # Only the training forward/backward is compiled; evaluation, checkpoints and saving use `model`.
            # dynamic=True: batch widths change every step, which would otherwise recompile once more.
            ddp_model = torch.compile(ddp_model, dynamic=True)

        # MFU: rank 0 measures one process's matmul peak in the precision used, while the other ranks wait
        # (DDP's set-up above has just lined them up), so that no rank's work slows the probe.
        flops_per_token = training_flops_per_token(model)
        probe = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = distributed.broadcast(matmul_peak(probe, ctx.device, seconds=0.25) if ctx.is_rank_zero else None, ctx)
        tracker.params({"mfu.peak_gflops_per_process": round(peak, 2), "mfu.peak_precision": precision,
                        "mfu.flops_per_token": flops_per_token,
                        "mfu.formula": "6 x non-embedding parameters (all, trainable or not) x useful tokens/s "
                                       "/ (matmul peak per process x processes); attention FLOPs not counted"})
        tracker.metrics({"matmul_peak_gflops": peak}, 0)
        autocast = torch.autocast(ctx.device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
        if ctx.is_rank_zero:
            log.info("training %s: %d parameters (%d trainable, %.1f%%), %d processes, precision %s, "
                     "%d steps (%d in the first epoch), warm-up %d", src.location, total_params, trainable,
                     100 * trainable / total_params, ctx.world_size, precision, total_steps, steps_per_epoch[0],
                     warmup)
            log.info("spark_tuning code from %s, device %s", __file__, ctx.device)

        history: list[dict] = resume.get("history", [])
        epochs: list[dict] = resume.get("epochs", [])
        step = resume.get("step", 0)
        start_epoch, skip = resume.get("epoch", 0), resume.get("micro", 0)
        ckpt = payload.get("checkpoint")  # {"dir", "every_steps", "keep_last"} or None

        def save_checkpoint(epoch: int, micro: int) -> None:
            # Every rank hands over its RNG state (dropout masks differ per rank); rank 0 writes.
            rng = distributed.gather(torch.get_rng_state(), ctx)
            if ctx.is_rank_zero:
                state = {"step": step, "epoch": epoch, "micro": micro, "history": history, "epochs": epochs,
                         "totals": totals, "world_size": ctx.world_size}
                path = checkpoint.save(ckpt["dir"], step, model, optimizer, scheduler, rng, state, ckpt["keep_last"])
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
            for micro, (index, batch) in enumerate(_timed(iterate(train_shard, plan, tokenizer.pad_token_id), clock),
                                                   start=len(plan_skipped)):
                sync = (micro + 1) % tc.grad_accum_steps == 0 or micro + 1 == len(plan) + len(plan_skipped)
                # Skip the gradient all-reduce on accumulation micro-steps: it is only needed on the last.
                with (contextlib.nullcontext() if sync or not ctx.is_distributed else ddp_model.no_sync()):
                    with autocast:
                        loss = ddp_model(**to_device(batch, ctx.device)).loss
                    (loss / tc.grad_accum_steps).backward()
                window["loss"] += float(loss.detach())
                window["micro"] += 1
                window["tokens"] += int(batch["attention_mask"].sum())
                window["padded"] += int(batch["attention_mask"].size)
                if not sync:
                    continue
                if tc.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % tc.log_every_steps == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window["t0"]
                    # Every rank's own progress, into its own log file: the last lines shown if it dies.
                    rank_only.info("rank %d: step %d/%d, own loss %.4f", ctx.rank, step, total_steps,
                                   window["loss"] / window["micro"])
                    loss_avg, tokens, padded = distributed.total(
                        [window["loss"] / window["micro"], window["tokens"], window["padded"]], ctx)
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
            lora.save(model, tokenizer, payload["model_dir"])
        result = {
            "history": history,
            "epochs": epochs,
            "eval": eval_out,
            "steps": step,
            "precision": precision,
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
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(ctx.device) if ctx.device.startswith("cuda") else None,
            "peak_rss_mb": max(distributed.gather(lm_train.peak_rss_mb(), ctx)),
        }
        return distributed.broadcast(result if ctx.is_rank_zero else None, ctx)
    finally:
        distributed.shutdown(ctx)
