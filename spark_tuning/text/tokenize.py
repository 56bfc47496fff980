"""Tokenization in Spark, without transformers in the Spark tasks.

Rows are truncated to `max_length` and NOT padded: each keeps its own `input_ids` and `length`, and the
loader pads each batch only to its longest row.

The model's fast tokenizer (a `transformers` object) is a thin Python shell around a Rust
`tokenizers.Tokenizer`, and the shell can change that Rust object when it loads (e.g. it rewrites the
post-processor that adds BOS/EOS from `tokenizer_config.json`). The driver loads the tokenizer once, takes
the Rust backend exactly as transformers configured it (`backend_tokenizer.to_str()`), and checks on probe
texts (empty, unicode, over-long) that the backend alone gives the same ids as the full tokenizer. Spark
tasks then rebuild the backend from that JSON with the `tokenizers` package alone: ~0.1 s per task instead
of ~13 s for importing transformers and loading an AutoTokenizer, and the ids go back to Spark as Arrow
arrays (one flat int32 array plus offsets per batch, no Python list per row). A tokenizer whose backend
does not reproduce its own output (a subclass with Python-side encoding) keeps the transformers path.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Optional, Tuple, TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_tuning.model.sources import ModelSource
from spark_tuning.text import truncation
# What Spark tasks run lives in a module of its own, so that they import neither pandas nor transformers.
from spark_tuning.text.rust_tokenizer import CUT_CHARS_PER_TOKEN, MAX_CHARS_PER_TOKEN, RustEncoder, arrow_ids

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import ModelConfig

log = logging.getLogger(__name__)

TOKENS_SCHEMA = "input_ids array<int>, length int"
# Texts the driver encodes both ways before trusting the Rust backend alone: the empty text, whitespace,
# accents, CJK, emoji, special-token look-alikes; and (`probes`) long ones that meet the cut before
# tokenizing (see RustEncoder.encode), sized to pass it whatever max_length is: plain words, mixed
# whitespace and punctuation, CJK without spaces, hyphenated words, and a text of spaces whose few words
# come after the cut.
PROBES = ("", " ", "a short one", "  Leading and trailing spaces  ", "naïve café, déjà vu! ÀÉÎÕÜ",
          "東京で映画を見た。", "emoji 🙂🎬 and\ttabs\nnew lines", "[CLS] <s> </s> <|endoftext|> [SEP]",
          "UPPER lower MiXeD 12345 3.14 e-mail@example.com")
LONG_PROBES = ("a much longer review ", "Great film!  Really,\ttruly great...\n\n", "東京で映画を見た。",
               "unbelievably-long-hyphenated-words, ")


def probes(max_length: Optional[int]) -> list[str]:
    chars = 2 * CUT_CHARS_PER_TOKEN * (max_length or 512)  # twice the cut's window, within the character cap
    return [*PROBES, *(p * (chars // len(p) + 1) for p in LONG_PROBES), "few" + " " * chars + "words after a gap"]


def rust_encoder(src: ModelSource, model_cfg: ModelConfig, max_length: Optional[int], mode: str = "head",
                 head_tokens: Optional[int] = None) -> Optional[RustEncoder]:
    """The model tokenizer's Rust backend, when it alone reproduces the tokenizer's ids on the probes;
    None (with a warning) when it does not, and tokenization then runs through transformers. `mode`: the
    data.truncation of long texts (head: the tokenizer's own truncation)."""
    from spark_tuning.model.sources import load_tokenizer

    tok = load_tokenizer(src, model_cfg)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    side = getattr(tok, "truncation_side", "right")
    texts = probes(max_length)
    if mode != "head" and max_length is not None:
        plain, specials = truncation.transformers_encoder(tok)
        want = truncation.encode(plain, texts, max_length, mode, head_tokens, specials)
        enc = RustEncoder(backend.to_str(), max_length, side, bool(getattr(tok, "split_special_tokens", False)),
                          cut_at_spaces=False, truncation=mode, head_tokens=head_tokens,
                          specials=(tuple(specials[0]), tuple(specials[1])))
        offsets, values = enc.encode(texts)
        got = [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))]
        if got == want:
            return enc
        log.warning("the Rust backend of %s's tokenizer (%s) encodes the probes differently from the tokenizer "
                    "itself: tokenizing through transformers in every Spark task (slower start)", src.location,
                    type(tok).__name__)
        return None
    if max_length is None:
        want = tok(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    else:
        want = tok(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    bad = ""
    for cut in (True, False):  # the cut before tokenizing only where it changes nothing on the probes
        enc = RustEncoder(backend.to_str(), max_length, side, bool(getattr(tok, "split_special_tokens", False)),
                          cut_at_spaces=cut)
        offsets, values = enc.encode(texts)
        got = [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(texts))]
        if got == want:
            return enc
        bad = bad or next(p for p, g, w in zip(texts, got, want) if g != w)
    log.warning("the Rust backend of %s's tokenizer (%s) encodes %r differently from the tokenizer itself: "
                "tokenizing through transformers in every Spark task (slower start)", src.location,
                type(tok).__name__, bad[:40])
    return None


def _has_arrow_udf() -> bool:
    from pyspark.sql import functions

    return hasattr(functions, "arrow_udf")  # pyspark >= 4.1; the petastorm stack has 4.0


def tokenize(df: DataFrame, src: ModelSource, model_cfg: ModelConfig, max_length: int, truncation: str = "head",
             head_tokens: Optional[int] = None) -> DataFrame:
    """`text` -> `text`, `input_ids`, `length` (plus every other column of `df`), a long text cut to
    max_length by `truncation` (data.truncation: head, tail, head_tail). With a `text_pair` column: the two
    texts as the tokenizer's pair input, and `token_type_ids` where the model takes them."""
    if "text_pair" in df.columns:
        return tokenize_pairs(df, src, model_cfg, max_length)
    enc = rust_encoder(src, model_cfg, max_length, truncation, head_tokens)
    if enc is None:
        udf = _transformers_udf(src, model_cfg, max_length, truncation, head_tokens)
    elif _has_arrow_udf():
        udf = _arrow_udf(enc)
    else:
        udf = _pandas_udf(enc)
    out = df.withColumn("_tok", udf(F.col("text")))
    return out.select(*[c for c in df.columns], "_tok.input_ids", "_tok.length")


def _arrow_udf(enc: RustEncoder):
    from pyspark.sql.functions import arrow_udf

    # Spark reads the function's type hints (strings here) to pick the UDF kind: `pa` and `Iterator`
    # must be module globals.

    @arrow_udf(TOKENS_SCHEMA)
    def encode(batches: Iterator[pa.Array]) -> Iterator[pa.Array]:
        import pyarrow.compute as pc

        # Spark already runs one task per core: the tokenizer's own thread pool would oversubscribe them.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for texts in batches:
            offsets, values = enc.encode(pc.fill_null(texts, "").to_pylist())
            lengths = pa.array(np.diff(offsets), type=pa.int32())
            yield pa.StructArray.from_arrays([arrow_ids(offsets, values), lengths], names=["input_ids", "length"])

    return encode


def _pandas_udf(enc: RustEncoder):
    """The same as `_arrow_udf` for pyspark < 4.1, which has no Arrow UDFs."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(TOKENS_SCHEMA)
    def encode(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for texts in batches:
            offsets, values = enc.encode(texts.fillna("").tolist())
            yield pd.DataFrame({"input_ids": np.split(values, offsets[1:-1]), "length": np.diff(offsets)})

    return encode


def _transformers_udf(src: ModelSource, model_cfg: ModelConfig, max_length: int, mode: str = "head",
                      head_tokens: Optional[int] = None):
    """The fallback: the full transformers tokenizer, loaded in every task."""
    from pyspark.sql.functions import pandas_udf

    max_chars = max_length * MAX_CHARS_PER_TOKEN

    @pandas_udf(TOKENS_SCHEMA)
    def encode(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from spark_tuning.model.sources import load_tokenizer

        tok = load_tokenizer(src, model_cfg)  # once per task, not per batch
        keep_end = getattr(tok, "truncation_side", "right") == "left"  # left truncation keeps a text's end
        cutter = truncation.transformers_encoder(tok) if mode != "head" else None
        for texts in batches:
            if cutter is not None:
                plain, specials = cutter
                ids = truncation.encode(plain, texts.fillna("").tolist(), max_length, mode, head_tokens, specials)
            else:
                texts = texts.fillna("").str.slice(-max_chars) if keep_end else texts.fillna("").str.slice(0, max_chars)
                ids = tok(texts.tolist(), truncation=True, max_length=max_length, padding=False)["input_ids"]
            yield pd.DataFrame({
                "input_ids": [np.asarray(x, dtype=np.int32) for x in ids],
                "length": np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids)),
            })

    return encode


def tokenize_pairs(df: DataFrame, src: ModelSource, model_cfg: ModelConfig, max_length: int) -> DataFrame:
    """`text` + `text_pair` -> `input_ids`, `length` and (BERT-style models) `token_type_ids`, through the
    Rust backend where it reproduces the tokenizer on probe pairs, else through transformers."""
    from spark_tuning.model.sources import load_tokenizer
    from pyspark.sql.functions import pandas_udf

    tok = load_tokenizer(src, model_cfg)
    types = "token_type_ids" in getattr(tok, "model_input_names", ())
    schema = TOKENS_SCHEMA + (", token_type_ids array<int>" if types else "")
    enc = _pair_encoder(tok, src, model_cfg, max_length)

    @pandas_udf(schema)
    def encode(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if enc is None:
            from spark_tuning.model.sources import load_tokenizer as load

            full = load(src, model_cfg)
        for texts, pairs in batches:
            a, b = texts.fillna("").tolist(), pairs.fillna("").tolist()
            if enc is not None:
                ids, type_ids = enc.encode_pairs(a, b)
            else:
                out = full(a, b, truncation=True, max_length=max_length, padding=False, return_token_type_ids=True)
                ids, type_ids = out["input_ids"], out["token_type_ids"]
            frame = {"input_ids": [np.asarray(x, dtype=np.int32) for x in ids],
                     "length": np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))}
            if types:
                frame["token_type_ids"] = [np.asarray(x, dtype=np.int32) for x in type_ids]
            yield pd.DataFrame(frame)

    out = df.withColumn("_tok", encode(F.col("text"), F.col("text_pair")))
    return out.select(*df.columns, "_tok.*")


def _pair_encoder(tok, src: ModelSource, model_cfg: ModelConfig, max_length: int) -> Optional[RustEncoder]:
    """The Rust backend, when it gives the tokenizer's own ids and token types on probe pairs."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    texts = probes(max_length)
    pairs = texts[::-1]
    want = tok(texts, pairs, truncation=True, max_length=max_length, padding=False, return_token_type_ids=True)
    enc = RustEncoder(backend.to_str(), max_length, getattr(tok, "truncation_side", "right"),
                      bool(getattr(tok, "split_special_tokens", False)), cut_at_spaces=False)
    ids, type_ids = enc.encode_pairs(texts, pairs)
    if ids == want["input_ids"] and type_ids == want["token_type_ids"]:
        return enc
    log.warning("the Rust backend of %s's tokenizer encodes text pairs differently from the tokenizer itself: "
                "tokenizing pairs through transformers in every Spark task (slower start)", src.location)
    return None


def token_lengths(df: DataFrame, src: ModelSource, model_cfg: ModelConfig) -> DataFrame:
    """`df` plus `length`: each row's whole token count, special tokens included and nothing truncated
    (`spark-tuning profile`: how long the texts are before max_length cuts them). A `text_pair` column
    counts the pair as the tokenizer joins it. Texts are clipped at dataset.LONG_TEXT characters first, as
    the job's tokenizer clips them (no max_length needs more)."""
    from pyspark.sql.functions import pandas_udf

    from spark_tuning.data.dataset import LONG_TEXT
    from spark_tuning.model.sources import load_tokenizer

    pairs = "text_pair" in df.columns
    enc = None if pairs else rust_encoder(src, model_cfg, max_length=None)

    @pandas_udf("int")
    def count(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tok = None if enc is not None else load_tokenizer(src, model_cfg)  # once per task, not per batch
        for texts, others in batches:
            a = texts.fillna("").str.slice(0, LONG_TEXT).tolist()
            if tok is None:
                yield pd.Series(np.diff(enc.encode(a)[0]).astype(np.int32))
                continue
            b = others.fillna("").str.slice(0, LONG_TEXT).tolist()
            ids = (tok(a, b, truncation=False, verbose=False) if pairs else tok(a, truncation=False, verbose=False))["input_ids"]
            yield pd.Series(np.fromiter(map(len, ids), dtype=np.int32, count=len(ids)))

    return df.withColumn("length", count(F.col("text"), F.col("text_pair") if pairs else F.lit("")))
