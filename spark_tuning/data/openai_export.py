"""`spark-tuning export-openai`: the prepared SFT data as chat-format JSONL for Azure OpenAI fine-tuning.

The same Spark data stage as `task: sft` (chat columns, prompt/response columns, or classification data
cast as prompt = review, response = label name) writes `train.jsonl` and `validation.jsonl`: UTF-8, one
`{"messages": [{"role": ..., "content": ...}, ...]}` object per line, roles system/user/assistant, each
chat ending with the assistant's answer. Nothing is uploaded and no service is called.

Token counts are measured with the configured model's tokenizer (Azure bills with its own tokenizer, so
treat them as an estimate) and written to `token_counts.json`, per example and in total.

Azure OpenAI fine-tunes only its own base models (GPT-4o, GPT-4.1, GPT-35-Turbo families and the like):
a GPT-2 or Llama fine-tune made by `spark-tuning finetune` cannot be uploaded there; it is deployed
through MLflow-based serving instead (the merged model folder is a plain Hugging Face model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Iterable, Optional, TYPE_CHECKING

from spark_tuning.errors import InputError

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import Config

log = logging.getLogger("spark_tuning")

MIN_EXAMPLES = 10  # Azure OpenAI refuses training files with fewer examples
ROLES = ("system", "user", "assistant")


def chat_lines(df) -> Any:
    """`messages` -> one JSON line per row, `{"messages": [...]}` (a pure transform)."""
    from pyspark.sql import functions as F

    return df.select(F.to_json(F.struct(F.col("messages"))).alias("line"))


def check_chat(chat: dict, where: str) -> None:
    """The format Azure OpenAI accepts, checked again on the exact object written."""
    msgs = chat.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: 'messages' is not a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise InputError(f"{where}: message {i} is not a {{role, content}} object: {str(m)[:100]}")
        if m["role"] not in ROLES:
            raise InputError(f"{where}: message {i} has the role {m['role']!r}; Azure OpenAI takes {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise InputError(f"{where}: message {i} ({m['role']}) has no text")
    if msgs[-1]["role"] != "assistant":
        raise InputError(f"{where}: the last message must be the assistant's answer, found {msgs[-1]['role']!r}")


def count_tokens(tokenizer, chat: dict) -> int:
    return sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in chat["messages"])


def export(cfg: Config, out_dir: str, overwrite: bool = False, spark=None) -> dict:
    """Run the SFT data stage in Spark and write the JSONL files into `out_dir`. Returns the report."""
    from spark_tuning.text import lm_data
    from spark_tuning.model.sources import check_reachable, load_tokenizer, resolve_model
    from spark_tuning.paths import check_removable, holds_output, local_path, new_sibling, publish, write_owner_marker
    from spark_tuning.cluster.spark import get_spark

    out = local_path(out_dir)
    check_removable(out, f"--out {out_dir}", cfg.data.source, cfg.data.eval_source or "", cfg.model.source)
    if holds_output(out) and not overwrite:
        raise InputError(f"{out} already holds files: pass --overwrite to replace them, or choose another --out")
    src = resolve_model(cfg.model)
    check_reachable(src, cfg.model)
    tokenizer = load_tokenizer(src, cfg.model)
    sft = dataclasses.replace(cfg, task="sft")
    spark = spark or get_spark(cfg.spark)
    prepared = lm_data.prepare_chats(spark, sft)
    tmp = new_sibling(out, "partial")
    os.makedirs(tmp)
    try:
        report: dict[str, Any] = {"tokenizer": src.location, "files": {}}
        for name, df in (("train", prepared.train), ("validation", prepared.eval)):
            lines = [r["line"] for r in chat_lines(df).toLocalIterator()]
            counts = _write(os.path.join(tmp, f"{name}.jsonl"), lines, tokenizer, name)
            report["files"][name] = {"file": f"{name}.jsonl", "examples": len(counts), "tokens": sum(counts),
                                     "tokens_per_example": counts}
        if report["files"]["train"]["examples"] < MIN_EXAMPLES:
            raise InputError(
                f"only {report['files']['train']['examples']} training examples: Azure OpenAI fine-tuning needs "
                f"at least {MIN_EXAMPLES}; add data or lower data.validation_fraction"
            )
        report["total_tokens"] = sum(f["tokens"] for f in report["files"].values())
        with open(os.path.join(tmp, "token_counts.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        write_owner_marker(tmp)
        publish(tmp, out, overwrite, cfg.data.source, cfg.data.eval_source or "", cfg.model.source)
        report["output_dir"] = out
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        prepared.train.unpersist()
        prepared.eval.unpersist()


def _write(path: str, lines: Iterable[str], tokenizer, name: str) -> list[int]:
    counts = []
    with open(path, "w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            chat = json.loads(line)
            check_chat(chat, f"{name} example {i}")
            counts.append(count_tokens(tokenizer, chat))
            f.write(json.dumps(chat, ensure_ascii=False) + "\n")
    return counts


def render_report(report: dict, limit: Optional[int] = 5) -> str:
    lines = [f"wrote {report['output_dir']} (token counts with the tokenizer of {report['tokenizer']}):"]
    for name, f in report["files"].items():
        per = f["tokens_per_example"]
        shown = ", ".join(map(str, per[:limit])) + (", ..." if len(per) > (limit or 0) else "")
        lines.append(f"  {f['file']}: {f['examples']} examples, {f['tokens']} tokens (per example: {shown})")
    lines.append(f"  total: {report['total_tokens']} tokens")
    lines.append("Azure OpenAI fine-tunes only its own base models; serve GPT-2 / Llama fine-tunes with MLflow.")
    return "\n".join(lines)
