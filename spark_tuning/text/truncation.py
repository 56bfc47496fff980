"""Which tokens of a long text a model sees (`data.truncation`): its head (the default, as tokenizers cut),
its tail, or its head and its tail with the middle dropped (`head_tail`, `data.head_tokens` from the head).
Reviews, tickets and reports often put their verdict at the end; head + tail keeps both the opening and the
conclusion, the better choice for classification of long documents (Sun et al., 2019, "How to Fine-Tune BERT
for Text Classification?": head 128 + tail 382 of 512 tokens beat head alone on IMDB).

Training (Spark tokenization), evaluation, serving and score all cut through `cut` and `frame` here. The
file is self-contained (no imports beyond the standard library): it is logged with the served model, as
text/token_spans.py is, so the scoring server cuts exactly as training did.

A text is tokenized without its special tokens and without truncation; its ids are cut to the budget
(max_length minus the special tokens the tokenizer adds around one sequence); the special tokens are then
put back around them as the tokenizer itself would (`frame`: what the tokenizer adds before and after a
sequence, read off one probe text).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

MODES = ("head", "tail", "head_tail")
# Before tokenizing, a text keeps at most this many characters per allowed token at each end it uses:
# far more than any token needs, so nothing that survives the cut is lost, and a 1 MB text costs no more
# than a long review (as rust_tokenizer.MAX_CHARS_PER_TOKEN for head).
MAX_CHARS_PER_TOKEN = 64
_PROBE = "probe"


def default_head_tokens(max_length: int) -> int:
    """head_tail without data.head_tokens: a quarter of max_length from the head (128 of 512, as Sun et al.)."""
    return max(1, max_length // 4)


def frame(encode: Callable[[str, bool], Sequence[int]]) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after one sequence: `encode(text, add_special_tokens)` on a
    probe with and without them. Raises ValueError where the plain ids are not a contiguous part of the
    full ones (a post-processor that rewrites the text's own ids: no cut can reproduce it)."""
    plain, full = list(encode(_PROBE, False)), list(encode(_PROBE, True))
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise ValueError("the tokenizer's special tokens do not sit around the text's own ids: "
                     "only data.truncation: head works with it")


def clip_chars(text: str, max_length: int, mode: str) -> str:
    """At most max_length x MAX_CHARS_PER_TOKEN characters from each end the mode keeps."""
    chars = max_length * MAX_CHARS_PER_TOKEN
    if len(text) <= chars or (mode == "head_tail" and len(text) <= 2 * chars):
        return text
    if mode == "head":
        return text[:chars]
    if mode == "tail":
        return text[-chars:]
    return text[:chars] + " " + text[-chars:]  # the join lies in the middle, which head_tail drops


def cut(ids: Sequence[int], budget: int, mode: str, head_tokens: Optional[int] = None) -> list[int]:
    """At most `budget` of a text's own ids (no special tokens): its first ones (head), its last ones (tail),
    or `head_tokens` first ones and the rest of the budget from its end (head_tail)."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    if mode == "head":
        return ids[:budget]
    if mode == "tail":
        return ids[len(ids) - budget:]
    head = min(head_tokens if head_tokens is not None else default_head_tokens(budget), budget)
    return ids[:head] + ids[len(ids) - (budget - head):]


def encode(encode_plain: Callable[[list[str]], list[Sequence[int]]], texts: Sequence[str], max_length: int,
           mode: str, head_tokens: Optional[int], specials: tuple[list[int], list[int]]) -> list[list[int]]:
    """Every text's ids as the model sees them: `encode_plain(texts)` (ids without special tokens, no
    truncation), cut to max_length with `mode`, inside the tokenizer's special tokens (`specials`, from `frame`)."""
    prefix, suffix = specials
    budget = max_length - len(prefix) - len(suffix)
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for text beside {len(prefix) + len(suffix)} "
                         "special tokens")
    plain = encode_plain([clip_chars(t, max_length, mode) for t in texts])
    return [prefix + cut(ids, budget, mode, head_tokens) + suffix for ids in plain]


def transformers_encoder(tokenizer) -> tuple[Callable, tuple[list[int], list[int]]]:
    """`encode`'s first and last arguments for a transformers tokenizer."""
    def one(text: str, special: bool) -> list[int]:
        return tokenizer(text, add_special_tokens=special, truncation=False)["input_ids"]

    def plain(texts: list[str]) -> list[list[int]]:
        return tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    return plain, frame(one)
