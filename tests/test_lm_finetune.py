"""LLM fine-tuning end to end through the real TorchDistributor (2 CPU processes, gloo): LoRA SFT of a
tiny Llama on synthetic reviews cast as instruction data, and causal-LM training of a tiny GPT-2; both
models logged as MLflow generation models and checked in a fresh process or behind a real server."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_job_config
from lm_fixtures import chat_tokenizer, plain_tokenizer, tiny_gpt2_dir, tiny_llama_dir  # noqa: F401


@pytest.fixture(scope="module")
def sft_run(spark, tmp_path_factory, reviews_jsonl, tiny_llama_dir):
    from spark_tuning import finetune

    tmp = tmp_path_factory.mktemp("sft")
    cfg = tiny_job_config(tmp, reviews_jsonl, tiny_llama_dir, **{
        "task": "sft", "lora.enabled": "true", "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0,
        "train.epochs": 3, "train.learning_rate": 2e-2, "train.log_every_steps": 2, "data.max_length": 96,
        "train.gradient_checkpointing": "true", "train.grad_accum_steps": 2, "train.eval_batch_size": 16,
        "train.sample_prompts": "[the film was great, awful boring plot]", "train.sample_max_new_tokens": 4,
        "tracking.log_model": "true", "deploy.registered_model_name": "tiny-sft",
    })
    return cfg, finetune.run(cfg, spark=spark)


def test_lora_sft_lowers_the_response_loss(sft_run):
    _, s = sft_run
    m = s.metrics
    assert s.result["world_size"] == 2
    assert m["eval_loss"] < m["eval_loss_before"] - 0.1, m
    assert m["eval_perplexity"] == pytest.approx(np.exp(m["eval_loss"]), rel=1e-6)
    assert 0 <= m["accuracy"] <= 1 and "f1" in m and "accuracy_before" in m
    # Only the adapters train: a small share of the parameters.
    assert 0 < m["trainable_parameters"] < 0.2 * m["parameters"]
    assert m["peak_rss_mb"] > 0 and m["train_tokens_per_second"] > 0


def test_adapter_and_merged_model_are_saved_and_agree(sft_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, s = sft_run
    out = s.output_dir
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(cfg.model.source)
    adapted = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["the film was great and the cast superb"], return_tensors="pt")
    with torch.inference_mode():
        a, b = merged(**ids).logits, adapted(**ids).logits
        plain = AutoModelForCausalLM.from_pretrained(cfg.model.source).eval()(**ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-3)  # the fine-tune changed the model
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["adapter_bytes"] < metrics["model_bytes"]


def test_samples_logged_to_mlflow_as_a_table(sft_run):
    from mlflow import MlflowClient

    _, s = sft_run
    client = MlflowClient(s.tracking_uri)
    run = client.get_run(s.run_id)
    assert run.info.status == "FINISHED"
    assert "eval_perplexity" in run.data.metrics and "final_eval_loss_before" in run.data.metrics
    tables = [a.path for a in client.list_artifacts(s.run_id, "samples")]
    assert len(tables) >= 2  # before training and after each epoch
    path = client.download_artifacts(s.run_id, tables[-1])
    table = json.load(open(path))
    assert table["columns"] == ["step", "prompt", "generated"] and len(table["data"]) == 2


def test_logged_generation_model_answers_like_the_saved_model(sft_run):
    """The run's merged model, logged as an MLflow pyfunc model and registered, loads with
    mlflow.pyfunc.load_model in a fresh process and answers what the saved model answers in-process: the
    training code's own greedy generations, and the label by the run's evaluation rule."""
    import mlflow
    import pandas as pd
    import torch
    from mlflow import MlflowClient
    from mlflow.models import Model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spark_tuning.model.sources import resolve_model
    from spark_tuning.tasks import sft

    cfg, s = sft_run
    record = json.load(open(os.path.join(s.output_dir, "mlflow_model.json")))
    assert record["serving_uri"] == "models:/tiny-sft@candidate" and record["version"] == "1"
    mlflow.set_tracking_uri(s.tracking_uri)
    local = mlflow.artifacts.download_artifacts(record["model_uri"])
    meta = Model.load(local)
    assert meta.saved_input_example_info is not None and meta.signature.inputs.input_names() == ["text"]
    assert [c.name for c in meta.signature.outputs.inputs] == [
        "generated_text", "label", "label_id", "probability", "probabilities"]
    names = {os.path.basename(f) for _, _, fs in os.walk(local) for f in fs}
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert "adapter_model.safetensors" not in names  # the merged model is served; the adapter is logged apart
    assert [a.path for a in MlflowClient(s.tracking_uri).list_artifacts(s.run_id, "adapter")]
    served_cfg = meta.flavors["python_function"]["config"]
    assert served_cfg["task"] == "sft" and served_cfg["max_new_tokens"] == cfg.train.sample_max_new_tokens

    # The second prompt is longer than data.max_length leaves room for: both sides cut it the same way.
    prompts = ["the film was great", "awful boring plot and a tedious ending " * 4]
    script = (
        "import json,sys,mlflow,pandas as pd\n"
        f"mlflow.set_tracking_uri({s.tracking_uri!r})\n"
        "m = mlflow.pyfunc.load_model('models:/tiny-sft@candidate')\n"
        "print(m.predict(pd.DataFrame({'text': json.load(sys.stdin)})).to_json(orient='records'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the logged code, not this checkout's
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(prompts), text=True,
                          capture_output=True, env=env, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = pd.DataFrame(json.loads(proc.stdout.strip().splitlines()[-1]))

    model = AutoModelForCausalLM.from_pretrained(s.output_dir).eval()
    tok = AutoTokenizer.from_pretrained(s.output_dir)
    lm = {"chat_template": True, "sft_classification": True}
    ask = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sample_prompts=prompts))
    expected = sft.TASK.generate_samples(model, tok, ask, lm, "cpu")
    assert list(served["generated_text"]) == [e["generated"] for e in expected]
    labels = served_cfg["label_names"]
    firsts = sft.label_first_tokens(resolve_model(cfg.model), cfg, labels, True)
    assert sorted(labels) == ["negative", "positive"] and served_cfg["label_first_tokens"] == firsts
    for prompt, (_, row) in zip(prompts, served.iterrows()):
        ids = torch.tensor([sft.TASK.prompt_ids(tok, prompt, cfg, lm)])
        with torch.inference_mode():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1, firsts], dim=-1).numpy()
        assert row["label"] == labels[int(probs.argmax())] and row["label_id"] == int(probs.argmax())
        np.testing.assert_allclose(row["probabilities"], probs, atol=1e-5)


@pytest.fixture(scope="module")
def causal_run(spark, tmp_path_factory, reviews_jsonl, tiny_gpt2_dir):
    from spark_tuning import finetune

    tmp = tmp_path_factory.mktemp("causal")
    cfg = tiny_job_config(tmp, reviews_jsonl, tiny_gpt2_dir, **{
        "task": "causal_lm", "data.block_size": 32, "train.epochs": 2, "train.learning_rate": 3e-3,
        "train.log_every_steps": 2, "train.batch_size": 4, "train.sample_max_new_tokens": 6,
        "tracking.log_model": "true", "deploy.register": "false",
    })
    return cfg, finetune.run(cfg, spark=spark)


def test_causal_lm_with_packing_trains_a_gpt2(causal_run):
    _, s = causal_run
    m = s.metrics
    assert m["eval_loss"] < m["eval_loss_before"] - 0.3, m
    assert m["train_padding_share"] == 0  # packed blocks: no padding at all
    assert m["trainable_parameters"] == m["parameters"]  # full fine-tuning
    assert os.path.isfile(os.path.join(s.output_dir, "model.safetensors"))
    assert not os.path.exists(os.path.join(s.output_dir, "adapter"))


def test_served_causal_lm_generates_and_verify_and_score_refuse_it(causal_run, spark, tmp_path):
    """The logged causal LM behind a real scoring server: generated text only, equal to the saved model's
    greedy continuation; `verify` and `score` (which compare and write labels) refuse it with a clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spark_tuning.deploy import score
    from spark_tuning.deploy import serving
    from spark_tuning.deploy import verify
    from spark_tuning.errors import InputError
    from spark_tuning.tasks import causal_lm

    cfg, s = causal_run
    assert s.deploy["serving_uri"] == s.deploy["model_uri"] and s.deploy["version"] is None  # not registered
    data = tmp_path / "held_out.jsonl"
    data.write_text(json.dumps({"text": "the film was", "label": 0}) + "\n")
    server = serving.start(s.deploy["model_uri"], tracking_uri=s.tracking_uri, state_dir=str(tmp_path / "state"))
    try:
        status, body = serving.post_json(server.invocations_url, {"inputs": ["the film was", "awful boring"]})
        with pytest.raises(InputError, match="text-generation model"):
            verify.verify(server.url, str(data))
    finally:
        serving.stop(server)
    assert status == 200 and [sorted(p) for p in body["predictions"]] == [["generated_text"]] * 2
    model = AutoModelForCausalLM.from_pretrained(s.output_dir).eval()
    tok = AutoTokenizer.from_pretrained(s.output_dir)
    ask = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sample_prompts=["the film was", "awful boring"]))
    expected = causal_lm.TASK.generate_samples(model, tok, ask, {}, "cpu")
    assert [p["generated_text"] for p in body["predictions"]] == [e["generated"] for e in expected]
    with pytest.raises(InputError, match="not labels or a number"):
        score.localize(spark, s.deploy["model_uri"], s.tracking_uri, str(tmp_path / "m"))


@pytest.mark.parametrize("which", ["causal", "sft"])
def test_profile_sees_the_rows_the_lm_job_staged(which, causal_run, sft_run, spark, tmp_path):
    """`spark-tuning profile` runs the job's own LM data stage: the same tokens and blocks (causal_lm) and the
    same chats, whose whole lengths cut at max_length average what the job staged (sft)."""
    from mlflow import MlflowClient

    from spark_tuning import profile

    cfg, s = causal_run if which == "causal" else sft_run
    params = MlflowClient(s.tracking_uri).get_run(s.run_id).data.params
    report = profile.run(dataclasses.replace(cfg, output_dir=str(tmp_path / "elsewhere" / "model")), spark=spark)
    rows = report["rows"]
    assert rows["train_rows"] == int(params["derived.train_rows"]) and rows["eval_rows"] == int(params["derived.eval_rows"])
    if which == "causal":
        assert rows["train_tokens"] == int(params["derived.train_tokens"])
        assert rows["train_blocks"] == int(params["derived.train_blocks"])
        assert rows["train_packing_efficiency"] == pytest.approx(rows["train_blocks"] * 32 / rows["train_tokens"], abs=1e-4)
        assert report["batching"]["ways"]["random batches"]["padding_share"] == 0  # blocks are all full
    else:
        assert report["lengths"]["max"] > 0 and report["model"]["lora"]
        # Whole lengths, cut at max_length as training cuts them: the mean the job staged.
        assert report["lengths"]["mean_as_trained"] == pytest.approx(float(params["derived.mean_tokens_per_row"]), abs=0.06)

