"""The worker side of Spark tokenization: the model tokenizer's Rust backend, rebuilt from its JSON, and
its ids as flat Arrow arrays. Spark tasks import only this module (numpy, pyarrow, tokenizers): not
transformers, not pandas, nothing else of spark_tuning but text/truncation.py (standard library only), so a
fresh Python worker starts in a blink.
The driver side, which takes the backend from transformers and checks it, is spark_tuning.text.tokenize.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from spark_tuning.text import truncation  # standard library only


@dataclass(frozen=True)
class RustEncoder:
    """Everything a Spark task needs to tokenize like the model's AutoTokenizer, as plain data."""

    backend_json: str  # the Rust tokenizer, as transformers configured it
    max_length: Optional[int]  # truncate to this many ids (special tokens included); None: no truncation
    truncation_side: str = "right"
    split_special_tokens: bool = False
    # Cut long texts where a word ends near max_length x CUT_CHARS_PER_TOKEN characters before tokenizing
    # (see `encode`). The driver turns it off for a tokenizer whose probes come out different with it.
    cut_at_spaces: bool = True
    # data.truncation other than head: the text's own ids cut by truncation.cut, inside `specials` (the ids
    # the tokenizer adds before and after a sequence, truncation.frame).
    truncation: str = "head"
    head_tokens: Optional[int] = None
    specials: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    def load(self):
        """The Rust tokenizer, built once per Python worker (workers are reused across tasks)."""
        return _rust_tokenizer(self.backend_json, self.max_length, self.truncation_side, self.split_special_tokens)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `texts`, truncated to max_length, as (offsets, values) like `encode_flat`.

        Truncation throws away everything past max_length tokens, but the tokenizer still reads the whole
        text: a 10,000-character review costs four times a 2,500-character one for the same 512 ids. So,
        with right-side truncation, a text longer than max_length x CUT_CHARS_PER_TOKEN characters is
        first cut where a word ends, at a space near that point. Pre-tokenizers (WordPiece's, byte-level
        BPE's, Metaspace) split at spaces, so the words before the cut give the same ids as in the whole
        text; only the last word or two can come out otherwise (an added token that spans a space, a
        regex that takes punctuation together with the new lines after it). So the cut text's ids count
        only when it overflows max_length by CUT_MARGIN_TOKENS or more; any other cut text is tokenized
        again, whole. The driver checks all this on its probe texts before it trusts it
        (spark_tuning.text.tokenize.rust_encoder). Every text is first capped at max_length x
        MAX_CHARS_PER_TOKEN characters, on the side truncation keeps."""
        if self.max_length is not None and self.truncation != "head":
            whole = _rust_tokenizer(self.backend_json, None, self.truncation_side, self.split_special_tokens)
            ids = truncation.encode(lambda batch: [e.ids for e in whole.encode_batch(batch, add_special_tokens=False)],
                                    texts, self.max_length, self.truncation, self.head_tokens,
                                    tuple(list(s) for s in self.specials))
            return flatten(ids)
        tok = self.load()
        if self.max_length is None:
            return encode_flat(tok, texts)
        texts = [_keep(t, self.max_length * MAX_CHARS_PER_TOKEN, self.truncation_side) for t in texts]
        if not self.cut_at_spaces or self.truncation_side != "right":
            return encode_flat(tok, texts)
        window = self.max_length * CUT_CHARS_PER_TOKEN
        cut = {}
        for i, t in enumerate(texts):
            if len(t) > window:
                c = _cut_at_space(t, window)
                if c is not None:
                    cut[i] = c
        encodings = _encode(tok, [cut.get(i, t) for i, t in enumerate(texts)])
        ids = [e.ids for e in encodings]
        specials = tok.num_special_tokens_to_add(False)  # added again to every overflowing piece
        redo = [i for i in cut
                if sum(len(o.ids) - specials for o in encodings[i].overflowing) < CUT_MARGIN_TOKENS]
        for i, again in zip(redo, _ids(tok, [texts[i] for i in redo])):
            ids[i] = again
        return flatten(ids)


    def encode_pairs(self, texts: Sequence[str], pairs: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token type ids of (text, pair) rows as the tokenizer's pair input, truncated to
        max_length with the longer of the two cut first (longest_first). Each text is first capped at
        max_length x MAX_CHARS_PER_TOKEN characters; no cut at spaces."""
        tok = self.load()
        cap = (self.max_length or 1 << 30) * MAX_CHARS_PER_TOKEN
        rows = [(_keep(a, cap, self.truncation_side), _keep(b, cap, self.truncation_side)) for a, b in zip(texts, pairs)]
        encodings = tok.encode_batch(rows)
        return [e.ids for e in encodings], [e.type_ids for e in encodings]


# A text keeps at most this many characters per allowed token before tokenizing: real tokens are far
# shorter, so nothing that would survive truncation is lost, and a 1 MB text costs no more than a review.
MAX_CHARS_PER_TOKEN = 64
# The first, tighter cut: English needs ~4-5 characters per WordPiece/BPE token (IMDB reviews of 512+
# tokens reach their 512th token by character 2,650 at most); texts that need more are redone.
CUT_CHARS_PER_TOKEN = 6
# How far past max_length a cut text's tokens must reach for its first max_length to be trusted.
CUT_MARGIN_TOKENS = 16


def _keep(text: str, chars: int, side: str) -> str:
    """At most `chars` characters of `text`, from the side that truncation keeps."""
    if len(text) <= chars:
        return text
    return text[:chars] if side == "right" else text[-chars:]


def _cut_at_space(text: str, chars: int) -> Optional[str]:
    """`text` up to its last space within its first `chars` characters (and past half of them), without
    the whitespace before that space: it ends where a word ends. None when there is no such space."""
    k = text.rfind(" ", chars // 2, chars)
    return text[:k].rstrip() if k > 0 else None


@functools.lru_cache(maxsize=4)
def _rust_tokenizer(backend_json: str, max_length: Optional[int], side: str, split_special: bool):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(backend_json)
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:  # what transformers sets for truncation=True, max_length=n
        tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=side)
    tok.encode_special_tokens = split_special
    return tok


def encode_flat(tok, texts: Sequence[str], append: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` as (offsets, values), both int32: row i is values[offsets[i]:offsets[i+1]].
    `append` (e.g. EOS) is added after every row. The ids never become one Python list per row beyond the
    tokenizer's own output."""
    return flatten(_ids(tok, texts), append)


def _encode(tok, texts: Sequence[str]) -> list:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips char offsets (tokenizers>=0.21)
    return encode(list(texts))


def _ids(tok, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in _encode(tok, texts)]


def flatten(ids: list[list[int]], append: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (offsets, values), both int32, with `append` after every row."""
    extra = len(append)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + extra
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if not extra:
        values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    else:
        tail = list(append)
        values = np.fromiter(itertools.chain.from_iterable(x + tail for x in ids), dtype=np.int32,
                             count=int(offsets[-1]))
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("one batch holds more than 2**31 token ids: "
                         "lower spark.sql.execution.arrow.maxRecordsPerBatch")
    return offsets.astype(np.int32), values


def arrow_ids(offsets: np.ndarray, values: np.ndarray):
    """(offsets, values) -> a pyarrow list<int32> array, without copying the values."""
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values, type=pa.int32()))
