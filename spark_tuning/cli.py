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
    summary = finetune.run(cfg, overwrite=args.overwrite, resume=args.resume)
    print(render_summary(summary))
    return 0


def render_summary(s) -> str:
    from spark_tuning.tracking import ui_command

    m = s.metrics
    rows = [
        ("accuracy", f"{m['accuracy']:.4f}"),
        (f"precision ({m['average']})", f"{m['precision']:.4f}"),
        (f"recall ({m['average']})", f"{m['recall']:.4f}"),
        (f"f1 ({m['average']})", f"{m['f1']:.4f}"),
        ("eval loss", f"{m['eval_loss']:.4f}"),
        ("validation rows", str(m["num_examples"])),
        ("training steps", str(m["train_steps"])),
        ("train tokens/s", f"{m['train_tokens_per_second']:.0f} ({m['train_precision']}, {s.result['world_size']} processes)"),
        ("padding share", f"{100 * m['train_padding_share']:.1f}%"),
        ("wall time", f"{s.timings.get('total', 0):.0f}s (" + ", ".join(
            f"{k} {v:.0f}s" for k, v in s.timings.items() if k != "total") + ")"),
        ("output folder", s.output_dir),
        ("MLflow run id", s.run_id),
        ("MLflow UI", ui_command(s.tracking_uri)),
    ]
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
    ft.add_argument("--resume", action="store_true",
                    help="continue the interrupted run in output_dir from its newest complete checkpoint "
                         "(done automatically when the config is the same)")
    ft.set_defaults(func=_finetune)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from spark_tuning.secrets import install_log_scrubbing

    install_log_scrubbing()
    for noisy in ("py4j", "urllib3", "mlflow", "alembic", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, JobFailed) as e:
        from spark_tuning.secrets import scrub

        print(f"\nspark-tuning: error: {scrub(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nspark-tuning: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
