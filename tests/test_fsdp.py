"""distributed.strategy: fsdp (FSDP2) on CPU: gloo, 2 processes, tiny models, the job's train_fn under torchrun
as TorchDistributor runs it (bench/gpu_check.py's helpers stage the data with pyarrow: no Spark here; the
job's own end-to-end fsdp run is in test_finetune.py).

What must hold: fsdp trains to the same losses as ddp for the same seed and batches (fp32: to float rounding
of another reduction order); a resumed fsdp run equals the uninterrupted one; an fsdp checkpoint resumes
onto 1 process (ddp); the exported model is a plain Hugging Face folder (and a LoRA adapter) that
transformers and peft load, giving the run's own predictions."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402

TIMEOUT = 300


def _texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        words = list(rng.choice(FILLER, 12)) + list(rng.choice(POSITIVE if i % 2 else NEGATIVE, 2))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(i % 2)
    return texts, labels


@pytest.fixture(scope="module")
def classify_data(tmp_path_factory, tiny_bert_dir):
    from transformers import AutoTokenizer

    from spark_tuning.loader.staging import write_staged

    work = str(tmp_path_factory.mktemp("fsdp-cls"))
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = {}
    for split, n, seed in (("train", 192, 1), ("eval", 48, 2)):
        texts, labels = _texts(n, seed)
        data[split] = vars(write_staged(os.path.join(work, split), tok(texts)["input_ids"], labels, num_files=4))
    return work, data


def _run(work, name, model_dir, data, sets, processes=2, checkpoint_every=None, resume_from=None, keep_last=5, **kw):
    ckpt = {"dir": os.path.join(work, name, "checkpoints"), "every_steps": checkpoint_every, "keep_last": keep_last}
    payload = gpu_check.leg_payload(work, name, model_dir, data, sets, True, processes, checkpoint=ckpt,
                                    resume_from=resume_from, **kw)
    return gpu_check.run_leg(work, name, payload, processes, True, TIMEOUT)


def _losses(result) -> dict[int, float]:
    return {h["step"]: h["train_loss"] for h in result["history"]}


CLS = {"data.max_length": 64, "train.batch_size": 8, "train.max_steps": 8, "train.learning_rate": 5e-3,
       "train.precision": "fp32", "train.log_every_steps": 1}


def test_block_classes_come_from_the_model_or_the_config():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from spark_tuning.train.fsdp import block_classes, blocks_problem

    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
    assert sorted(block_classes(bert)) == ["BertEmbeddings", "BertLayer"] and blocks_problem(bert, None) is None
    assert block_classes(bert, ["BertEncoder"]) == ["BertEncoder"]
    assert "names no module of BertForSequenceClassification" in blocks_problem(bert, ["LlamaDecoderLayer"])
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert "set distributed.fsdp.block_class" in blocks_problem(plain, None)


def test_fsdp_settings_that_do_not_combine_are_listed_at_once():
    from spark_tuning.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["distributed.strategy=fsdp", "train.precision=bf16", "distributed.fsdp.reduce_dtype=fp16",
                           "train.compile=true", "distributed.fsdp.block_class=[]"])
    msg = str(err.value)
    assert "reduce_dtype = 'fp16' differs from train.precision = 'bf16'" in msg
    assert "train.compile = true with distributed.strategy = 'fsdp'" in msg
    assert "block_class is an empty list" in msg
    with pytest.raises(ConfigError, match="distributed.strategy = 'zero3' is not one of ddp, fsdp"):
        load_config(None, ["distributed.strategy=zero3"])
    assert load_config(None, ["distributed.strategy=fsdp"]).distributed.fsdp.reshard_after_forward


def test_an_fsdp_run_refuses_to_resume_a_ddp_checkpoint(tmp_path):
    import json

    import torch

    from spark_tuning.config import load_config
    from spark_tuning.errors import InputError
    from spark_tuning.finetune import RUN_MARKER, plan_output
    from spark_tuning.paths import run_folder
    from spark_tuning.train import checkpoint

    out = tmp_path / "run"
    cfg = load_config(None, [f"output_dir={out}"])
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / ".run.run"  # the run folder beside output_dir
    assert run_folder(str(out)) == str(run)
    checkpoint.save(checkpoint.checkpoint_dir(str(run)), 3, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1),
                    [], {"step": 3}, keep_last=1)
    (run / RUN_MARKER).write_text(json.dumps({"config": cfg.to_dict()}))
    assert plan_output(cfg, False, True).resume_from.endswith("step-00000003")  # ddp resumes it
    fsdp = load_config(None, [f"output_dir={out}", "distributed.strategy=fsdp"])  # distributed.*: resume-neutral
    with pytest.raises(InputError, match="was written by distributed.strategy: ddp"):
        plan_output(fsdp, False, True)


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_exactly_and_onto_one_process(classify_data, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    work, data = classify_data
    ddp = _run(work, "ddp", tiny_bert_dir, data, CLS)
    fsdp = _run(work, "fsdp", tiny_bert_dir, data, {**CLS, "distributed.strategy": "fsdp"}, checkpoint_every=4)

    # The same losses as DDP, step by step (another reduction order: float rounding only).
    a, b = _losses(ddp), _losses(fsdp)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert max(abs(a[s] - b[s]) / abs(a[s]) for s in a) < 1e-4, (a, b)
    np.testing.assert_allclose(fsdp["eval"]["probs"], ddp["eval"]["probs"], atol=1e-4)
    assert len(fsdp["peak_rss_mb_per_rank"]) == 2
    # Only rank 0 read the pretrained weights; rank 1 got its shards from it (and still matched DDP).
    assert fsdp["read_weights_per_rank"] == [True, False] and ddp["read_weights_per_rank"] == [True, True]

    # The checkpoint is sharded: each rank's shards and the metadata, under the COMPLETE marker.
    step4 = os.path.join(work, "fsdp", "checkpoints", "step-00000004")
    assert os.path.isfile(os.path.join(step4, "COMPLETE"))
    shards = sorted(os.listdir(os.path.join(step4, "dcp")))
    assert ".metadata" in shards and sum(s.endswith(".distcp") for s in shards) == 2
    assert not os.path.exists(os.path.join(step4, "model.safetensors"))

    # Resumed on 2 processes: exactly the uninterrupted run from step 5 on.
    resumed = _run(work, "resumed", tiny_bert_dir, data, {**CLS, "distributed.strategy": "fsdp"}, resume_from=step4)
    r = _losses(resumed)  # steps 1-4 come back from the checkpoint's history
    assert sorted(r) == list(range(1, 9)) and all(r[s] == b[s] for s in range(1, 5))
    assert max(abs(r[s] - b[s]) / abs(b[s]) for s in r) < 1e-5, (r, b)
    np.testing.assert_allclose(resumed["eval"]["probs"], fsdp["eval"]["probs"], atol=1e-5)

    # Onto 1 process (ddp, the checkpoint resharded on load): it goes on from step 4 and finishes.
    one = _run(work, "one", tiny_bert_dir, data, CLS, processes=1, resume_from=step4)
    assert one["world_size"] == 1 and one["steps"] == 8 and sorted(_losses(one))[-4:] == [5, 6, 7, 8]
    assert all(np.isfinite(v) for v in _losses(one).values())
    assert abs(_losses(one)[5] - b[5]) / b[5] < 0.2  # the same weights: a loss near the 2-process run's

    # The exported model is a plain folder that transformers loads, giving the run's probabilities.
    model_dir = os.path.join(work, "fsdp", "model")
    assert "model.safetensors" in os.listdir(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    mine = _predict(model, data["eval"])
    np.testing.assert_allclose(mine, np.asarray(fsdp["eval"]["probs"]), atol=1e-4)
    untrained = _predict(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval(), data["eval"])
    assert np.abs(mine - untrained).max() > 1e-3  # and it trained


def _predict(model, ref) -> np.ndarray:
    import pyarrow.parquet as pq
    import torch

    table = pq.read_table(ref["path"]).to_pandas().sort_values("row_id")
    out = []
    with torch.no_grad():
        for ids in table["input_ids"]:
            logits = model(input_ids=torch.tensor([list(ids)])).logits
            out.append(torch.softmax(logits, -1)[0].numpy())
    return np.stack(out)


@pytest.mark.slow
def test_fsdp_lora_sft_on_a_decoder_matches_ddp_and_exports_the_adapter(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shape = gpu_check.shapes(cpu=True)
    shape.update(rows=128, eval_rows=32, max_length=64, processes=2)
    texts = [" ".join(_texts(1, i)[0]) for i in range(40)]
    work = str(tmp_path)
    models = gpu_check.make_models(work, shape, texts + POSITIVE + NEGATIVE)
    sft = gpu_check.stage_sft(work, models["tokenizer"], shape, texts)
    sets = {"task": "sft", "data.max_length": 64, "train.batch_size": 8, "train.max_steps": 6,
            "train.learning_rate": 2e-3, "train.precision": "fp32", "train.log_every_steps": 1,
            "train.gradient_checkpointing": True, "lora.enabled": True, "lora.r": 4, "lora.alpha": 8,
            "lora.dropout": 0.0, "data.chat_template": "none", "train.sample_prompts": ["user: great film\nassistant: "],
            "train.sample_max_new_tokens": 4}
    extra = {"lm": {"chat_template": False}, "id2label": {}}
    ddp = _run(work, "ddp", models["llama"], sft, sets, **extra)
    fsdp = _run(work, "fsdp", models["llama"], sft, {**sets, "distributed.strategy": "fsdp"}, **extra)
    a, b = _losses(ddp), _losses(fsdp)
    assert sorted(a) == sorted(b) and max(abs(a[s] - b[s]) / abs(a[s]) for s in a) < 1e-4, (a, b)
    assert fsdp["epochs"][-1]["eval_loss"] < fsdp["epochs"][0]["eval_loss"]
    assert fsdp["trainable_parameters"] == ddp["trainable_parameters"] < 0.1 * fsdp["parameters"]
    # Rank 0's generated samples came through evaluation on the gathered model.
    assert fsdp["epochs"][-1]["samples"][0]["generated"] == ddp["epochs"][-1]["samples"][0]["generated"]

    folder = os.path.join(work, "fsdp", "model")
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    base = AutoModelForCausalLM.from_pretrained(models["llama"])
    adapted = PeftModel.from_pretrained(base, os.path.join(folder, "adapter")).eval()
    ids = torch.tensor([models["tokenizer"]("user: great film\nassistant: ")["input_ids"]])
    with torch.no_grad():
        np.testing.assert_allclose(merged(ids).logits.numpy(), adapted(ids).logits.numpy(), atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(models["llama"])(ids).logits.numpy()
    assert np.abs(merged(ids).logits.detach().numpy() - plain).max() > 1e-4  # the adapter changed the model


ALLOCATOR_PROBE = """
import ctypes, sys
from spark_tuning.model.build import return_large_frees_to_os

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
libc.free(libc.malloc(8 << 20))  # glibc now serves blocks up to 8 MiB from its heap, which only grows
applied = return_large_frees_to_os() if sys.argv[1] == "on" else False
before = libc.mallinfo2().hblks
block = libc.malloc(2 << 20)
print(applied, libc.mallinfo2().hblks - before)  # mmapped blocks: 1 when the 2 MiB block got its own mapping
libc.free(block)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux) only")
def test_ranks_return_large_freed_host_blocks_to_the_os():
    """Each rank serves host blocks of 1 MiB and more from their own mappings (freed -> back to the OS):
    the heap growth that kept fsdp's CPU ranks ~1 GB larger (bench/bench_fsdp.py) cannot happen."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = {arm: subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, arm], env=env, capture_output=True,
                               text=True, check=True).stdout.split() for arm in ("off", "on")}
    assert out["off"] == ["False", "0"]  # glibc's own behaviour: the block comes from the heap
    assert out["on"] == ["True", "1"]
    user_set = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, "on"], capture_output=True, text=True,
                              env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"}, check=True).stdout.split()
    assert user_set[0] == "False"  # a user's own setting is left alone
