"""LM data in Spark: packing, SFT rendering and prompt masking, and the bad-input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm_fixtures import chat_tokenizer, plain_tokenizer, tiny_gpt2_dir, tiny_llama_dir  # noqa: F401

from spark_tuning.errors import InputError


def _blocks(df):
    return [list(r["input_ids"]) for r in df.collect()], [list(r["labels"]) for r in df.collect()]


def test_packing_keeps_every_token_in_order_within_a_partition(spark):
    from spark_tuning.text.lm_data import pack

    rng = np.random.default_rng(0)
    rows = [[int(x) for x in rng.integers(3, 400, size=rng.integers(1, 40))] for _ in range(60)]
    flat = [t for r in rows for t in r]
    one = spark.createDataFrame([(r,) for r in rows], "input_ids array<int>").coalesce(1)
    ids, labels = _blocks(pack(one, 16))
    assert all(len(b) == 16 for b in ids)  # no padding anywhere: every block is full
    assert labels == ids  # causal LM: labels are the inputs
    n = len(flat) // 16
    assert [t for b in ids for t in b] == flat[:n * 16]  # every token kept, in order
    assert len(flat) - n * 16 < 16  # only the partition's last partial block is dropped

    # Several partitions: each packs its own rows; each drops fewer than block_size tokens.
    many = spark.createDataFrame([(r,) for r in rows], "input_ids array<int>").repartition(3)
    per_part = many.rdd.mapPartitions(lambda it: [sum(len(r["input_ids"]) for r in it)]).collect()
    packed = pack(many, 16)
    kept = sum(len(b) for b in _blocks(packed)[0])
    assert kept == sum(t // 16 * 16 for t in per_part)
    assert len(flat) - kept < 16 * len(per_part)
    kept_counts = np.bincount([t for b in _blocks(packed)[0] for t in b], minlength=400)
    assert (kept_counts <= np.bincount(flat, minlength=400)).all()


def test_texts_are_joined_with_eos_before_packing(spark, tiny_gpt2_dir):
    from spark_tuning.config import ModelConfig
    from spark_tuning.text.lm_data import pack, tokenize_texts
    from spark_tuning.model.sources import load_tokenizer, resolve_model

    cfg = ModelConfig(source=tiny_gpt2_dir)
    src = resolve_model(cfg)
    tok = load_tokenizer(src, cfg)
    texts = ["the film was great", "awful plot", "the cast and the music"]
    df = spark.createDataFrame([(t,) for t in texts], "text string").coalesce(1)
    ids = tokenize_texts(df, src, cfg)
    expected = [t for x in texts for t in tok(x)["input_ids"] + [tok.eos_token_id]]
    assert [t for r in ids.collect() for t in r["input_ids"]] == expected
    blocks, _ = _blocks(pack(ids, 4))
    assert [t for b in blocks for t in b] == expected[:len(expected) // 4 * 4]


@pytest.mark.parametrize("with_template", [True, False])
def test_prompt_tokens_and_only_prompt_tokens_get_label_minus_100(chat_tokenizer, with_template):
    from spark_tuning.text.lm_data import IGNORE, encode_chat, render

    chat = [{"role": "system", "content": "Judge reviews."}, {"role": "user", "content": "the plot was boring"},
            {"role": "assistant", "content": "negative"}]
    ids, labels = encode_chat(chat_tokenizer, chat, with_template, 512)
    prompt, response = render(chat_tokenizer, chat, with_template)
    n_prompt = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and IGNORE not in labels[n_prompt:]
    assert chat_tokenizer.decode(ids[n_prompt:]).startswith("negative")
    assert chat_tokenizer.decode(ids[:n_prompt]) == prompt
    # The pad/EOS id (2, as in SmolLM2) inside the response keeps its label: labels never come from pad ids.
    assert chat_tokenizer.eos_token_id in labels[n_prompt:]


def test_long_prompts_are_cut_in_the_middle_and_the_answer_survives(chat_tokenizer):
    from spark_tuning.text.lm_data import IGNORE, encode_chat, render

    review = "the film was great " * 200 + "THE END"
    chat = [{"role": "user", "content": review}, {"role": "assistant", "content": "positive"}]
    ids, labels = encode_chat(chat_tokenizer, chat, True, 64)
    assert len(ids) == 64
    text = chat_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system")  # the head survives
    assert "<|im_start|>assistant\npositive<|im_end|>" in text  # the answer and its header survive
    prompt, _ = render(chat_tokenizer, chat, True)
    assert text.split("<|im_end|>\n<|im_start|>assistant")[0].endswith("END")  # the review's end survives
    assert sum(1 for l in labels if l != IGNORE) == len(chat_tokenizer("positive<|im_end|>\n", add_special_tokens=False)["input_ids"])


def test_chats_tokenized_in_spark_mask_the_prompt(spark, tmp_path, tiny_llama_dir, chat_tokenizer):
    from spark_tuning.config import DataConfig, ModelConfig
    from spark_tuning.text.lm_data import encode_chat, to_chats, tokenize_chats
    from spark_tuning.model.sources import resolve_model

    rows = [{"prompt": f"review {i}: the film was great", "response": "positive"} for i in range(5)]
    path = tmp_path / "pr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chats = to_chats(spark.read.json(str(path)), DataConfig(), "prompt_response")
    cfg = ModelConfig(source=tiny_llama_dir)
    out = tokenize_chats(chats, resolve_model(cfg), cfg, 128, True).collect()
    assert len(out) == 5
    for row, raw in zip(out, rows):
        ids, labels = encode_chat(chat_tokenizer, [{"role": "user", "content": raw["prompt"]},
                                                   {"role": "assistant", "content": raw["response"]}], True, 128)
        assert list(row["input_ids"]) == ids and list(row["labels"]) == labels and row["length"] == len(ids)


def _bad_chats(spark, tmp_path, rows):
    from spark_tuning.config import DataConfig
    from spark_tuning.text.lm_data import find_bad_chats, to_chats

    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    find_bad_chats(to_chats(spark.read.json(str(path)), DataConfig(), "messages"), "data.messages_column = 'messages'")


def _ok(i):
    return {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("bad, message", [
    ({"messages": "just a string"}, r"row 2 is not a list of \{role, content\} objects"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"row 2 has the unknown role .*narrator"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
     r"row 2 has an empty response"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"row 2 does not end with an assistant message"),
])
def test_bad_chats_are_refused_naming_the_row(spark, tmp_path, bad, message):
    rows = [_ok(0), _ok(1), bad, _ok(3)]
    with pytest.raises(InputError, match=message):
        _bad_chats(spark, tmp_path, rows)
    _bad_chats(spark, tmp_path, [_ok(i) for i in range(4)])  # good chats pass


def test_chat_template_required_from_a_tokenizer_without_one(plain_tokenizer, chat_tokenizer):
    from spark_tuning.text.lm_data import use_chat_template

    with pytest.raises(InputError, match="data.chat_template = require.*has no chat template"):
        use_chat_template(plain_tokenizer, "require", "tiny-gpt2")
    assert use_chat_template(plain_tokenizer, "auto", "tiny-gpt2") is False
    assert use_chat_template(chat_tokenizer, "auto", "tiny-llama") is True
    assert use_chat_template(chat_tokenizer, "none", "tiny-llama") is False


def test_block_size_above_context_and_unknown_lora_targets_are_refused(tiny_gpt2_dir, tiny_llama_dir):
    from spark_tuning.config import load_config
    from spark_tuning.model.llm import prepare
    from spark_tuning.model.sources import resolve_model
    from spark_tuning.tasks import get_task

    def check_settings(cfg, src, cache=str(tiny_gpt2_dir) + "-cache"):
        return prepare(cfg, src, cache, get_task(cfg.task))[1]

    cfg = load_config(None, ["task=causal_lm", f"model.source={tiny_gpt2_dir}", "data.block_size=256"])
    src = resolve_model(cfg.model)
    with pytest.raises(InputError, match=r"data.block_size = 256 is above the context length .*128"):
        check_settings(cfg, src)

    cfg = load_config(None, ["task=sft", f"model.source={tiny_llama_dir}", "lora.enabled=true",
                             "lora.target_modules=[q_proj, query]"])
    src = resolve_model(cfg.model)
    with pytest.raises(InputError, match=r"\['query'\] match no layer.*'k_proj'.*'q_proj'"):
        check_settings(cfg, src)
    ok = load_config(None, ["task=sft", f"model.source={tiny_llama_dir}", "lora.enabled=true"])
    assert check_settings(ok, src)["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
