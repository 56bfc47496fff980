"""Tiny decoder models for the LM tests, built offline in a second: a byte-level BPE tokenizer trained on
the synthetic reviews (with and without a ChatML chat template, like SmolLM2's), and 2-layer Llama / GPT-2
models with random weights. Import the fixtures into a test module to use them."""

from __future__ import annotations

import pytest

from conftest import make_reviews

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["text"] for r in make_reviews(400)] + [
        "Is the sentiment of this movie review positive or negative? Answer with one word.",
        "system user assistant You are a helpful assistant positive negative", "hello world 0123456789 .,!?:",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if chat:  # like SmolLM2: pad == eos == <|im_end|>, no BOS added
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                       bos_token="<|im_start|>")
        fast.chat_template = CHATML
    else:  # like GPT-2: no pad token, no chat template
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    return fast


def save_llama(folder: str, tok, layers: int = 2) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def save_gpt2(folder: str, tok) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_tokenizer():
    return train_tokenizer(chat=True)


@pytest.fixture(scope="session")
def plain_tokenizer():
    return train_tokenizer(chat=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, chat_tokenizer):
    return save_llama(str(tmp_path_factory.mktemp("tiny-llama")), chat_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, plain_tokenizer):
    return save_gpt2(str(tmp_path_factory.mktemp("tiny-gpt2")), plain_tokenizer)
