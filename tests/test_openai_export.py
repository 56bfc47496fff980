"""`spark-tuning export-openai`: chat JSONL for Azure OpenAI fine-tuning, from the Spark data stage."""

from __future__ import annotations

import json
import os

import pytest

from lm_fixtures import chat_tokenizer, tiny_llama_dir  # noqa: F401

from spark_tuning.errors import InputError


def _config(tmp_path, source, model, *extra):
    from spark_tuning.config import load_config

    return load_config(None, [f"data.source={source}", f"model.source={model}", "task=sft",
                              f"output_dir={tmp_path / 'unused'}", *extra])


def test_classification_data_is_written_as_chat_jsonl(spark, tmp_path, reviews_jsonl, tiny_llama_dir, chat_tokenizer):
    from spark_tuning.data import openai_export

    cfg = _config(tmp_path, reviews_jsonl, tiny_llama_dir, "data.validation_fraction=0.25")
    report = openai_export.export(cfg, str(tmp_path / "jsonl"), spark=spark)
    files = report["files"]
    assert files["train"]["examples"] == 120 and files["validation"]["examples"] == 40
    for name in ("train", "validation"):
        raw = open(tmp_path / "jsonl" / f"{name}.jsonl", "rb").read()
        lines = raw.decode("utf-8").splitlines()
        assert len(lines) == files[name]["examples"]
        counts = []
        for line in lines:
            chat = json.loads(line)
            assert list(chat) == ["messages"]
            roles = [m["role"] for m in chat["messages"]]
            assert roles == ["user", "assistant"]
            assert chat["messages"][1]["content"] in ("positive", "negative")
            assert "Answer with one word" in chat["messages"][0]["content"]
            counts.append(sum(len(chat_tokenizer(m["content"], add_special_tokens=False)["input_ids"])
                              for m in chat["messages"]))
        assert counts == files[name]["tokens_per_example"]
        assert files[name]["tokens"] == sum(counts)
    saved = json.load(open(tmp_path / "jsonl" / "token_counts.json"))
    assert saved["total_tokens"] == files["train"]["tokens"] + files["validation"]["tokens"]
    with pytest.raises(InputError, match="--overwrite"):
        openai_export.export(cfg, str(tmp_path / "jsonl"), spark=spark)


def test_fewer_than_ten_examples_and_bad_roles_are_refused(spark, tmp_path, tiny_llama_dir):
    from spark_tuning.data import openai_export

    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8)))
    with pytest.raises(InputError, match="at least 10"):
        openai_export.export(_config(tmp_path, str(few), tiny_llama_dir), str(tmp_path / "few-out"), spark=spark)
    assert not os.path.exists(tmp_path / "few-out")

    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(12)]
    rows[5]["messages"][0]["role"] = "tool"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"row 5 has the unknown role .*tool"):
        openai_export.export(_config(tmp_path, str(bad), tiny_llama_dir), str(tmp_path / "bad-out"), spark=spark)
