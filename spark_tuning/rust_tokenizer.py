"""The worker side of Spark tokenization: the model tokenizer's Rust backend, rebuilt from its JSON, and
its ids as flat Arrow arrays. Spark tasks import only this module (numpy, pyarrow, tokenizers): not
transformers, not pandas, nothing else of spark_tuning, so a fresh Python worker starts in a blink.
The driver side, which takes the backend from transformers and checks it, is spark_tuning.tokenize.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class RustEncoder:
    """Everything a Spark task needs to tokenize like the model's AutoTokenizer, as plain data."""

    backend_json: str  # the Rust tokenizer, as transformers configured it
    max_length: Optional[int]  # truncate to this many ids (special tokens included); None: no truncation
    truncation_side: str = "right"
    split_special_tokens: bool = False

    def load(self):
        """The Rust tokenizer, built once per Python worker (workers are reused across tasks)."""
        return _rust_tokenizer(self.backend_json, self.max_length, self.truncation_side, self.split_special_tokens)


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
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips char offsets (tokenizers>=0.21)
    ids = [e.ids for e in encode(list(texts))]
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
