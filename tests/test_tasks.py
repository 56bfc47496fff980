"""The Task interface: tasks are found by file, the config accepts exactly those, the served model's signature
and verify's comparison come from the task."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spark_tuning import tasks
from spark_tuning.config import load_config
from spark_tuning.errors import InputError


def test_the_three_tasks_are_found_and_an_unknown_one_is_named():
    assert list(tasks.all_tasks()) == ["classification", "causal_lm", "multilabel_classification", "regression", "sft", "token_classification"]
    with pytest.raises(InputError) as e:
        load_config(None, ["task=clasification"])
    assert "task = 'clasification' is not one of classification, causal_lm, multilabel_classification, regression, sft, token_classification (did you mean 'classification'?)" \
        in str(e.value)


def test_a_new_task_is_one_new_file(tmp_path, monkeypatch):
    """A module with a TASK object dropped beside the others is a task the config accepts."""
    (tmp_path / "toy_task.py").write_text(
        "from spark_tuning.tasks.classification import Classification\n\n"
        "class Toy(Classification):\n    name = 'toy'\n\n\nTASK = Toy()\n")
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path)])
    tasks.all_tasks.cache_clear()
    try:
        assert tasks.get_task("toy").name == "toy"
        assert load_config(None, ["task=toy"]).task == "toy"
    finally:
        monkeypatch.undo()
        tasks.all_tasks.cache_clear()
    assert "toy" not in tasks.all_tasks()


def test_the_signature_is_the_tasks_answer():
    from spark_tuning.deploy.packaging import signature

    def outputs(task, serving):
        return [c.name for c in signature(tasks.get_task(task).output_columns(serving)).outputs]

    labels = ["label", "label_id", "probability", "probabilities"]
    assert outputs("classification", {}) == labels
    assert outputs("causal_lm", {}) == ["generated_text"]
    assert outputs("sft", {}) == ["generated_text"]
    assert outputs("sft", {"label_names": ["neg", "pos"]}) == ["generated_text", *labels]
    kinds = {c.name: str(c.type) for c in signature(tasks.get_task("classification").output_columns({})).outputs}
    assert kinds["probabilities"] == "Array(double)" and kinds["label_id"] == "DataType.long"


def test_verify_asks_the_task_what_to_compare():
    """The label tasks' comparison: a flipped label is a difference, a flip inside the tolerance on the
    run's own near tie is not, and the served metrics are recomputed from the answers."""
    from spark_tuning.deploy.verify import HeldOut

    rows = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 1], "prediction": [0, 1, 0], "row_id": [7, 8, 9],
                         "probabilities": [[0.9, 0.1], [0.2, 0.8], [0.501, 0.499]]})
    held = HeldOut(rows, ["neg", "pos"], {"accuracy": 2 / 3, "precision": 1.0, "recall": 0.5, "f1": 2 / 3},
                   "classification")
    task = tasks.get_task(held.task)
    same = pd.DataFrame({"label_id": [0, 1, 1], "probabilities": [[0.9, 0.1], [0.2, 0.8], [0.499, 0.501]]})
    a = task.compare_served(same, held, atol=3e-2)
    assert a.differences == [] and a.near_ties == 1 and a.agreement == pytest.approx(2 / 3)
    assert a.metrics["accuracy"] == 1.0  # recomputed from what was served, not copied from the run
    flipped = pd.DataFrame({"label_id": [1, 1, 0], "probabilities": [[0.4, 0.6], [0.2, 0.8], [0.501, 0.499]]})
    b = task.compare_served(flipped, held, atol=3e-2)
    assert [d["row_id"] for d in b.differences] == [7]
    assert b.max_probability_diff == pytest.approx(0.5)
    assert np.isclose(b.metrics["accuracy"], 1 / 3)


@pytest.mark.parametrize("name, id2label, labels", [
    ("regression", {0: "value"}, [0.5, -1.0]),
    ("multilabel_classification", {0: "a", 1: "b", 2: "c"}, [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
    ("token_classification", {0: "O", 1: "B-PER", 2: "I-PER"}, "per token"),
])
def test_new_heads_train_with_lora(tiny_bert_dir, name, id2label, labels):
    """LoRA on the new tasks' heads: adapters and the head train, the body stays frozen, the loss falls."""
    import torch

    from spark_tuning.model.build import build_model
    from spark_tuning.model.sources import ModelSource, load_tokenizer

    cfg = load_config(None, [f"task={name}", f"model.source={tiny_bert_dir}", "lora.enabled=true",
                             "lora.target_modules=[query,value]"])
    src = ModelSource(location=tiny_bert_dir, is_local=True)
    tok = load_tokenizer(src, cfg.model)
    task = tasks.get_task(name)
    model = build_model(task, cfg, src, tok, id2label)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert not any("embeddings" in n for n in trainable)
    enc = tok(["one text", "another text here"], padding=True, return_tensors="pt")
    if labels == "per token":  # a tag per real token, -100 on padding
        labels = torch.where(enc["attention_mask"] > 0, torch.arange(enc["input_ids"].shape[1]) % 3, -100)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.as_tensor(labels)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = task.loss(model, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
