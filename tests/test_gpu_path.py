"""The GPU path, checked on CPUs: collectives on a group that serves no CPU tensors (as NCCL), the precision
choice per GPU generation, checkpoints written on a GPU loaded on a CPU, the fp16 loss scaler, the prefetch
thread, the out-of-memory advice, the served model's device and the verify tolerance, and the GPU check's
own CPU legs (bench/gpu_check.py --cpu: the job's train_fn under torchrun, without Spark or MLflow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from spark_tuning.train import distributed
from spark_tuning.train.precision import choose_precision, probability_tolerance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two ranks: the package's collectives on a default group of backend "cuda:gloo", which,
    like NCCL, has no backend for CPU tensors ("No backend type associated with device type cpu")."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test")
    ctx = distributed.init(use_gpu=False, timeout_minutes=1, backend="cuda:gloo")
    try:
        out = {
            "mean": distributed.mean([1.0 + rank, 10.0], ctx),
            "total": distributed.total([1.0 + rank], ctx),
            "maximum": distributed.maximum([rank, 5 - rank], ctx),
            "gather": distributed.gather({"rank": rank}, ctx),
            "broadcast": distributed.broadcast(f"from {rank}", ctx),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        distributed.shutdown(ctx)


def test_collectives_work_on_a_group_that_serves_no_cpu_tensors(tmp_path):
    """Bug 1 of the GPU path: mean/total/maximum built CPU tensors and all-reduced them on the NCCL group,
    so every run on 2+ GPUs failed before its first step. They now run on a gloo group of their own."""
    import torch.multiprocessing as mp

    mp.start_processes(_collectives_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        assert got["mean"] == [1.5, 10.0]
        assert got["total"] == [3.0]
        assert got["maximum"] == [1, 5]
        assert got["gather"] == [{"rank": 0}, {"rank": 1}]
        assert got["broadcast"] == "from 0"


@pytest.mark.parametrize("capability, expected", [
    ((9, 0), "bf16"),  # H100, H200
    ((8, 6), "bf16"),  # A10G, RTX 30xx
    ((8, 0), "bf16"),  # A100
    ((7, 5), "fp16"),  # T4: bf16 only emulated, which is_bf16_supported() counts as support
    ((7, 0), "fp16"),  # V100
    ((6, 0), "fp32"),  # P100: no tensor cores
])
def test_auto_precision_follows_the_gpu_generation(capability, expected):
    assert choose_precision("auto", "cuda", cuda_capability=capability) == expected


def test_auto_precision_on_cpus_and_explicit_choices():
    assert choose_precision("auto", "cpu", cpu_native_bf16=True) == "bf16"
    assert choose_precision("auto", "cpu", cpu_native_bf16=False) == "fp32"
    for asked in ("fp32", "bf16", "fp16"):
        assert choose_precision(asked, "cuda", cuda_capability=(7, 5)) == asked


def test_a_checkpoint_written_on_a_gpu_loads_on_a_cpu_host(tmp_path):
    """Tensors saved on cuda:N come back on cuda:N unless map_location says otherwise: a CPU host could not
    load a GPU run's checkpoint, and every local rank put its copy on GPU 0. The file here is tagged
    cuda:0 the way torch tags tensors saved from a GPU."""
    import torch
    import torch.serialization as ser

    from spark_tuning.train import checkpoint
    from spark_tuning.train.state import rng_state

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def tag_as_gpu(obj):
        return "cuda:0" if obj.device.type == "cpu" else None

    ser.register_package(0, tag_as_gpu, lambda obj, location: None)
    try:
        path = checkpoint.save(str(tmp_path), 3, model, optimizer, scheduler, [rng_state("cpu")],
                               {"step": 3}, keep_last=1, scaler={"scale": 1024.0})
    finally:
        ser._package_registry[:] = [p for p in ser._package_registry if p[1] is not tag_as_gpu]
    with pytest.raises(RuntimeError, match="CUDA"):  # what loading without map_location does on a CPU host
        torch.load(os.path.join(path, checkpoint.TRAINING_STATE), weights_only=True)
    state = checkpoint.load_training_state(path)
    assert state["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    assert state["scaler"] == {"scale": 1024.0}
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 2).parameters(), lr=0.1)
    fresh.load_state_dict(state["optimizer"])


def test_rng_states_round_trip_and_old_checkpoints_still_resume():
    import torch

    from spark_tuning.train.state import rng_state, set_rng_state

    torch.manual_seed(5)
    saved = rng_state("cpu")
    expected = torch.rand(3)
    set_rng_state(saved, "cpu")
    assert torch.equal(torch.rand(3), expected)
    set_rng_state(saved["cpu"], "cpu")  # a checkpoint from before GPU states were kept: the CPU state alone
    assert torch.equal(torch.rand(3), expected)


def test_fp16_gradients_are_unscaled_before_clipping():
    """With a loss scale of 1024, clipping the scaled gradients would shrink the step 1024-fold."""
    import torch

    from spark_tuning.train.optim import optimizer_step

    model = torch.nn.Linear(8, 1, bias=False)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = (model(torch.full((4, 8), 3.0)) ** 2).mean()
    scaler.scale(loss).backward()
    optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=0.5)
    step = (model.weight.detach() - before).norm().item()
    assert step == pytest.approx(0.5, rel=1e-4)  # lr x the clipped norm of the true gradient
    assert model.weight.grad is None  # zeroed for the next step


def test_fp16_training_on_cpu_uses_the_loss_scaler(tmp_path, tiny_bert_dir):
    """train_fn end to end in one process with train.precision: fp16 (CPU autocast + GradScaler)."""
    import torch

    from spark_tuning.config import load_config
    from spark_tuning.loader.staging import write_staged
    from spark_tuning.train.loop import train_fn

    rng = np.random.default_rng(0)
    ids = [list(rng.integers(1000, 2000, size=int(rng.integers(5, 20)))) for _ in range(64)]
    labels = [int(x[0] % 2) for x in ids]
    train = write_staged(str(tmp_path / "train"), ids[:48], labels[:48])
    evalr = write_staged(str(tmp_path / "eval"), ids[48:], labels[48:])
    cfg = load_config(None, ["data.source=unused", f"model.source={tiny_bert_dir}", "train.precision=fp16",
                             "train.epochs=1", "train.batch_size=8", "train.log_every_steps=2",
                             "distributed.num_processes=1"])
    result = train_fn({"config": cfg.to_dict(), "id2label": {"0": "a", "1": "b"},
                       "model_source": {"location": tiny_bert_dir, "is_local": True, "gguf_file": None},
                       "train_ref": vars(train), "eval_ref": vars(evalr), "events": None, "resume_from": None,
                       "model_dir": str(tmp_path / "model"), "log_dir": None, "checkpoint": None})
    assert result["precision"] == "fp16" and result["device"] == "cpu" and result["tf32"] is False
    assert result["loss_scale"] is not None and result["loss_scale"] > 1
    assert all(np.isfinite(h["train_loss"]) for h in result["history"]) and result["steps"] == 6
    from safetensors import safe_open

    with safe_open(os.path.join(tmp_path, "model", "model.safetensors"), "pt") as f:  # fp32 master weights saved
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_prefetch_keeps_order_raises_errors_and_stops_early():
    from spark_tuning.train.feed import ahead

    assert list(ahead(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("collate failed")

    with pytest.raises(ValueError, match="collate failed"):
        list(ahead(broken()))
    produced = []

    def counting():
        for i in range(1000):
            produced.append(i)
            yield i

    it = ahead(counting(), depth=2)
    assert next(it) == 0
    it.close()
    import time

    time.sleep(0.3)
    assert len(produced) < 10  # the thread stopped instead of running through the whole epoch


def test_out_of_memory_advice_names_the_rank_the_memory_and_what_to_change():
    from spark_tuning.config import load_config
    from spark_tuning.train.loop import out_of_memory_message

    ctx = distributed.Context(rank=3, local_rank=1, world_size=4, local_world_size=2, device="cuda:1")
    cfg = load_config(None, ["train.batch_size=32"])
    msg = out_of_memory_message(ctx, cfg, (32, 512), 10, {"name": "NVIDIA A10G", "total": 24 * 2 ** 30,
                                                          "allocated": 23 * 2 ** 30, "peak": 23.5 * 2 ** 30})
    for part in ("rank 3", "cuda:1", "NVIDIA A10G", "24.0 GiB", "peak 23.5 GiB", "step 11", "32 rows x 512 tokens",
                 "train.batch_size (now 32", "train.max_tokens_per_batch", "train.gradient_checkpointing: true",
                 "lora.enabled: true"):
        assert part in msg, part
    cfg = load_config(None, ["train.max_tokens_per_batch=4096", "train.gradient_checkpointing=true",
                             "lora.enabled=true"])
    msg = out_of_memory_message(ctx, cfg, (8, 512), 0, {})
    assert "lower train.max_tokens_per_batch (now 4096)" in msg
    assert "gradient_checkpointing" not in msg and "lora.enabled" not in msg  # already on: not suggested


def test_the_served_model_keeps_half_precision_only_where_the_device_has_it():
    import torch

    from spark_tuning.deploy.serving_model import serving_placement

    from spark_tuning.train.precision import cpu_native_bf16

    native = cpu_native_bf16()  # the training run's own rule for precision: auto
    assert native == (bool(torch.cpu._is_avx512_bf16_supported()) or bool(torch.cpu._is_amx_tile_supported()))
    assert serving_placement("bf16", "cpu") == ("cpu", "bf16" if native else "fp32")
    assert serving_placement("fp16", "cpu") == ("cpu", "fp32")  # fp16 on a CPU: slow, not what it trained in
    assert serving_placement("fp32", "cpu") == ("cpu", "fp32")
    if not torch.cuda.is_available():
        assert serving_placement("bf16")[0] == "cpu"  # auto: a GPU only where one is visible


def test_verify_tolerance_follows_the_precisions_and_allows_near_ties():
    from spark_tuning.deploy.verify import tolerance_for
    from spark_tuning.evaluate.agreement import compare_probabilities

    assert probability_tolerance(("fp32", "cpu"), ("fp32", "cpu")) == 1e-5
    assert probability_tolerance(("fp32", "cuda"), ("fp32", "cpu")) == 5e-3  # TF32 on the GPU
    assert probability_tolerance(("bf16", "cuda"), ("bf16", "cuda")) == 3e-2
    tol, basis = tolerance_for({"train_precision": "bf16", "train_device": "cuda"}, ("fp32", "cpu"))
    assert tol == 3e-2 and basis == "run evaluated in bf16 on cuda, served in fp32 on cpu"
    offline = np.array([[0.505, 0.495], [0.9, 0.1], [0.2, 0.8]])
    served = np.array([[0.49, 0.51], [0.1, 0.9], [0.21, 0.79]])
    diff, tie, differs = compare_probabilities(np.array([1, 1, 1]), served, np.array([0, 0, 1]), offline, 3e-2)
    assert tie.tolist() == [True, False, False]  # 0.505 vs 0.495: precision explains the flip
    assert differs.tolist() == [False, True, False]  # 0.9 -> 0.1 is a real difference
    _, _, strict = compare_probabilities(np.array([1, 1, 1]), served, np.array([0, 0, 1]), offline, 1e-5)
    assert strict.tolist() == [True, True, True]


@pytest.mark.slow
def test_gpu_check_runs_every_leg_on_cpu_without_spark_or_mlflow(tmp_path):
    """bench/gpu_check.py --cpu: the GPU check's legs with gloo and 2 processes; every check must pass."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), str(out), "--cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        report = json.load(f)
    assert report["ok"] and set(report["legs"]) == {"classify", "resume", "serve", "fsdp", "fp32_tf32", "lora_sft"}
    for leg in report["legs"].values():
        assert leg["checks"] and all(leg["checks"].values())
    assert report["legs"]["classify"]["checks"]["no pyspark or mlflow in the ranks"]
    assert report["legs"]["resume"]["figures"]["steps_compared"] >= 1
    assert report["legs"]["resume"]["figures"]["probability_abs_diff"] <= 1e-5
    assert "| classify |" in (out / "gpu_check.md").read_text()
    assert report["legs"]["fsdp"]["figures"]["processes"] == 2
