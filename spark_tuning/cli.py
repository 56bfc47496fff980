"""`spark-tuning <command>`: each subcommand is a thin call into the package.

Exit codes: 0 success, 2 bad input (config, data, model, paths), 1 a failure while running.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from spark_tuning.errors import InputError, JobFailed


def _finetune(args: argparse.Namespace) -> int:
    from spark_tuning import finetune
    from spark_tuning.config import load_config

    cfg = load_config(args.config, args.set)
    summary = finetune.run(cfg, overwrite=args.overwrite)
    print(render_summary(summary))
    return 0


def _export_openai(args: argparse.Namespace) -> int:
    from spark_tuning import openai_export
    from spark_tuning.config import load_config

    cfg = load_config(args.config, args.set)
    report = openai_export.export(cfg, args.out, overwrite=args.overwrite)
    print(openai_export.render_report(report))
    return 0


def _lm_rows(m: dict) -> list[tuple[str, str]]:
    """causal_lm / sft: before -> after figures of the response (or all) tokens."""
    rows = [("eval loss (before -> after)", f"{m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}"),
            ("perplexity (before -> after)", f"{m['eval_perplexity_before']:.2f} -> {m['eval_perplexity']:.2f}")]
    for key in ("accuracy", "precision", "recall", "f1"):
        if key in m:
            rows.append((f"label {key} (before -> after)", f"{m[key + '_before']:.4f} -> {m[key]:.4f}"))
    rows.append(("trainable parameters", f"{m['trainable_parameters']:,} of {m['parameters']:,} "
                                         f"({m['trainable_percent']:.2f}%)"))
    if m.get("adapter_bytes"):
        rows.append(("adapter size", f"{m['adapter_bytes'] / 2**20:.1f} MiB "
                                     f"({100 * m['adapter_share_of_model']:.2f}% of the merged model)"))
    if m.get("peak_rss_mb"):
        rows.append(("peak memory (RSS, one process)", f"{m['peak_rss_mb']:.0f} MiB"))
    return rows


def render_summary(s) -> str:
    m = s.metrics
    if m.get("task_metrics") == "lm":
        return _table(_lm_rows(m) + _common_rows(s))
    rows = [
        ("accuracy", f"{m['accuracy']:.4f}"),
        (f"precision ({m['average']})", f"{m['precision']:.4f}"),
        (f"recall ({m['average']})", f"{m['recall']:.4f}"),
        (f"f1 ({m['average']})", f"{m['f1']:.4f}"),
        ("eval loss", f"{m['eval_loss']:.4f}"),
        ("validation rows", str(m["num_examples"])),
    ]
    return _table(rows + _common_rows(s))


def _common_rows(s) -> list[tuple[str, str]]:
    from spark_tuning.tracking import ui_command

    m = s.metrics
    return [
        ("training steps", str(m["train_steps"])),
        ("train tokens/s", f"{m['train_tokens_per_second']:.0f} ({m['train_precision']}, {s.result['world_size']} processes)"),
        ("padding share", f"{100 * m['train_padding_share']:.1f}%"),
        ("wall time", f"{s.timings.get('total', 0):.0f}s (" + ", ".join(
            f"{k} {v:.0f}s" for k, v in s.timings.items() if k != "total") + ")"),
        ("output folder", s.output_dir),
        ("MLflow run id", s.run_id),
        ("MLflow UI", ui_command(s.tracking_uri)),
    ]


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (max(len(v) for _, v in rows) + 2) + "+"
    body = [f"| {k.ljust(width)} | {v.ljust(len(line) - width - 7)} |" for k, v in rows]
    return "\n".join([line, *body, line])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spark-tuning", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="run the fine-tuning job")
    ft.add_argument("--config", help="YAML config (default: the built-in quickstart defaults)")
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.learning_rate=3e-5 (repeatable)")
    ft.add_argument("--overwrite", action="store_true", help="replace an output folder that already holds files")
    ft.set_defaults(func=_finetune)
    ex = sub.add_parser("export-openai", help="write the prepared SFT data as chat JSONL for Azure OpenAI fine-tuning")
    ex.add_argument("--config", help="YAML config of an sft (or classification) job")
    ex.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    ex.add_argument("--out", required=True, help="folder for train.jsonl, validation.jsonl, token_counts.json")
    ex.add_argument("--overwrite", action="store_true", help="replace a folder that already holds files")
    ex.set_defaults(func=_export_openai)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "urllib3", "mlflow", "alembic", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, JobFailed) as e:
        print(f"\nspark-tuning: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nspark-tuning: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
