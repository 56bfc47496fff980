"""Token classification's text side: units, windows, sub-token alignment and entity decoding.

Self-contained (the standard library, NumPy and a `tokenizers.Tokenizer`): the served model imports it as
well (packaging logs this file as code beside deploy/serving_model.py), so training, the run's evaluation
and the endpoint cut texts, align labels and build entities the same way.

Units are what a tag belongs to: "word" (whitespace-separated words: the CoNLL shape, where the text is
the words joined by single spaces) or "token" (every sub-word token that holds a character other than
white space: rows given as a text with character spans). A unit's first token carries its tag; the rest
get -100 (no loss), or, with `label_all`, the tag too (B-X becomes I-X after the first token).

Rows longer than one window are cut into windows of at most `max_length` tokens (with the tokenizer's own
special tokens around each) that overlap by `stride` tokens. Each token is *owned* by exactly one window
(the overlap is split in the middle) and is labelled, predicted and scored there only, so no token counts
twice and each window sees context on both sides of what it owns.

Tags: "O", then "B-<type>", "I-<type>" per entity type, in that order (`tag_names`). Entities are read off a
unit sequence with seqeval's rules (`get_entities`: its default mode, for B/I/O tags; tests check it against
seqeval itself): an I- after O or after another type starts an entity, as seqeval counts it.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

IGNORE = -100
WORD = re.compile(r"\S+")


def tag_names(types: Sequence[str]) -> list[str]:
    """["O", "B-T1", "I-T1", "B-T2", ...]: tag id 1 + 2k is B- of type k, 2 + 2k its I-."""
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first unit, last unit) of every entity in one tag sequence, by seqeval's rules for B/I/O
    tags (seqeval.metrics.sequence_labeling.get_entities, default mode)."""
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        ends = (prev_tag in ("B", "I") and tag in ("B", "O")) or (prev_tag != "O" and prev_type != type_)
        starts = tag == "B" or (prev_tag == "O" and tag == "I") or (tag != "O" and prev_type != type_)
        if ends:
            chunks.append((prev_type, begin, i - 1))
        if starts:
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def unit_spans(text: str, unit: str, token_offsets: Optional[Sequence[tuple[int, int]]] = None) -> list[tuple[int, int]]:
    """Character spans of the units: words, or (unit "token") each token's span without its white space
    (tokens that hold only white space are no unit)."""
    if unit == "word":
        return [m.span() for m in WORD.finditer(text)]
    out = []
    for s, e in token_offsets or ():
        piece = text[s:e]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            out.append((s + lead, s + lead + len(stripped)))
    return out


def plain_tokenizer(tokenizer_json: str):
    """A `tokenizers.Tokenizer` from its JSON (a fast tokenizer's `backend_tokenizer.to_str()`), with the
    padding and truncation a tokenizer.json may carry switched off: windows do the cutting here."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    tok.no_truncation()
    return tok


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after one text ([CLS] / [SEP], <s>, none)."""
    plain = tokenizer.encode("x", add_special_tokens=False).ids
    full = tokenizer.encode("x", add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise ValueError("the tokenizer's special tokens do not wrap the text: it cannot be windowed")


def windows(n: int, budget: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(start, end, own_start, own_end) of each window over `n` content tokens: at most `budget` tokens
    each, overlapping by `stride`; the overlaps are split in the middle between the two windows."""
    if n <= budget:
        return [(0, n, 0, n)]
    step = budget - stride
    spans = []
    a = 0
    while True:
        b = min(n, a + budget)
        spans.append((a, b))
        if b == n:
            break
        a += step
    cuts = [0] + [(spans[k + 1][0] + spans[k][1]) // 2 for k in range(len(spans) - 1)] + [n]
    return [(a, b, cuts[k], cuts[k + 1]) for k, (a, b) in enumerate(spans)]


def token_units(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], length: int) -> np.ndarray:
    """For each token, the unit that holds its first character other than white space (-1: none)."""
    char_unit = np.full(length + 1, -1, dtype=np.int64)
    for i, (s, e) in enumerate(spans):
        char_unit[s:e] = i
    out = np.full(len(offsets), -1, dtype=np.int64)
    for t, (s, e) in enumerate(offsets):
        hits = char_unit[s:e]
        hits = hits[hits >= 0]
        if len(hits):
            out[t] = hits[0]
    return out


def span_tags(spans: Sequence[tuple[int, int]], entities: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Unit tag ids from character spans (start, end, type id): units inside an entity get B- (the first)
    or I- of its type; the rest O. A unit belongs to an entity when its span overlaps it."""
    tags = np.zeros(len(spans), dtype=np.int64)
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    ends = np.array([e for _, e in spans], dtype=np.int64)
    for s, e, k in entities:
        inside = np.flatnonzero((starts < e) & (ends > s))
        if len(inside):
            tags[inside] = 2 + 2 * k
            tags[inside[0]] = 1 + 2 * k
    return tags


def encode(tokenizer, text: str, unit: str, max_length: int, stride: int, label_all: bool = False,
           unit_tags: Optional[Sequence[int]] = None,
           entity_spans: Optional[Sequence[tuple[int, int, int]]] = None) -> tuple[list[tuple[int, int]], list[dict]]:
    """One text -> its unit spans (`tokenizer`: a `plain_tokenizer`), and its windows: input_ids (special tokens included), labels (the tag of
    each owned unit's first token, with `label_all` of every owned token of a unit; -100 elsewhere; all
    -100 without gold), `units` (the unit of each owned first token, in order) and `positions` (where those
    tokens are in input_ids). Gold: `unit_tags` (a tag
    id per unit), or `entity_spans` ((start, end, type id) per entity, tagged onto the units by span_tags)."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    spans = unit_spans(text, unit, offsets)
    owner = token_units(offsets, spans, len(text))
    first = np.zeros(len(ids), dtype=bool)
    seen = set()
    for t, u in enumerate(owner.tolist()):
        if u >= 0 and u not in seen:
            first[t] = True
            seen.add(u)
    if entity_spans is not None:
        unit_tags = span_tags(spans, entity_spans)
    tags = np.asarray(unit_tags if unit_tags is not None else [], dtype=np.int64)
    prefix, suffix = special_tokens(tokenizer)
    out = []
    for a, b, own_a, own_b in windows(len(ids), max_length - len(prefix) - len(suffix), stride):
        labels = [IGNORE] * len(prefix)
        units, positions = [], []
        for t in range(a, b):
            u = int(owner[t])
            owned = own_a <= t < own_b and u >= 0
            if owned and first[t]:
                units.append(u)
                positions.append(len(prefix) + t - a)
            if not owned or len(tags) == 0 or not (first[t] or label_all):
                labels.append(IGNORE)
                continue
            tag = int(tags[u])
            labels.append(tag + 1 if not first[t] and tag % 2 == 1 else tag)  # B-X inside a word: I-X
        out.append({"input_ids": prefix + list(ids[a:b]) + suffix, "labels": labels + [IGNORE] * len(suffix),
                    "units": units, "positions": positions})
    return spans, out


def entities(text: str, spans: Sequence[tuple[int, int]], tags: Sequence[int], scores: Sequence[float],
             names: Sequence[str]) -> list[dict]:
    """Entities of one text from its units' predicted tag ids and their probabilities: label (the type),
    start and end (character offsets into `text`), the text itself and score (the mean probability of the
    entity's units)."""
    out = []
    for label, first, last in get_entities([names[int(t)] for t in tags]):
        start, end = spans[first][0], spans[last][1]
        out.append({"label": label, "start": int(start), "end": int(end), "text": text[start:end],
                    "score": float(np.mean(scores[first:last + 1]))})
    return out


def unit_predictions(n_units: int, windows_units: Sequence[Sequence[int]],
                     windows_probs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted tag id and its probability per unit, from each window's owned units and their tag
    probabilities (rows in the same order); a unit no window holds (no token) is O with probability 1."""
    tags, scores = np.zeros(n_units, dtype=np.int64), np.ones(n_units, dtype=np.float64)
    for units, probs in zip(windows_units, windows_probs):
        if len(units):
            probs = np.asarray(probs)
            tags[list(units)] = probs.argmax(axis=1)
            scores[list(units)] = probs.max(axis=1)
    return tags, scores
