"""`spark-tuning <command>`: each subcommand is a thin call into the package.

Exit codes: 0 success, 2 bad input (config, data, model, paths), 1 a failure while running.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from spark_tuning.errors import InputError, JobFailed


def examples_names() -> list[str]:
    from spark_tuning.data import examples

    return list(examples.EXAMPLES)


def _make_example(args: argparse.Namespace) -> int:
    from spark_tuning.data import examples

    path = examples.write_example(args.name, args.imdb, args.out, args.rows, overwrite=args.overwrite)
    column, _, what = examples.EXAMPLES[args.name]
    print(f"wrote {path}: {args.rows} rows of IMDB reviews with `{column}` ({what}; spark_tuning/data/examples.py "
          "says how)")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from spark_tuning import finetune
    from spark_tuning.config import load_config

    from spark_tuning.tasks import get_task

    cfg = load_config(args.config, args.set)
    summary = finetune.run(cfg, overwrite=args.overwrite, resume=args.resume, fresh=args.fresh)
    print(render_summary(summary, get_task(cfg.task)))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from spark_tuning import profile
    from spark_tuning.config import load_config

    cfg = load_config(args.config, args.set)
    report = profile.run(cfg, args.out)
    print(profile.render(report))
    from spark_tuning.track.tracking import ui_command

    where = f"; files in {args.out}" if args.out else ""
    print(f"MLflow run {report['mlflow']['run_id']} ({ui_command(report['mlflow']['tracking_uri'])}){where}")
    return 0


def _log_model(args: argparse.Namespace) -> int:
    from spark_tuning.track import relog
    from spark_tuning.track.tracking import ui_command

    done = relog.log_model(args.output_dir, args.tracking_uri)
    where = "a new run, " if done["new_run"] else "run "
    print(f"{'already logged' if done['already'] else 'logged'} {args.output_dir} into {where}{done['run_id']} "
          f"({ui_command(done['tracking_uri'])})"
          + (f"; model {done['model_uri']}, version {done['version']}" if done["model_uri"] else ""))
    return 0


def _export_openai(args: argparse.Namespace) -> int:
    from spark_tuning.data import openai_export
    from spark_tuning.config import load_config

    cfg = load_config(args.config, args.set)
    report = openai_export.export(cfg, args.out, overwrite=args.overwrite)
    print(openai_export.render_report(report))
    return 0


# ----------------------------------------------------------------------------------------------------
# Deploy and verify: promote, serve, verify, score, cleanup, export-serving-config


def _promote(args: argparse.Namespace) -> int:
    from spark_tuning.deploy.packaging import set_alias

    set_alias(args.name, args.version, args.alias, args.tracking_uri, args.registry_uri)
    print(f"models:/{args.name}@{args.alias} -> version {args.version}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from spark_tuning.deploy import serving

    if args.stop:
        stopped = serving.stop_recorded(args.state_dir, args.port or None)
        for server, was_running in stopped:
            print(f"stopped {server.url} ({server.model_uri})" if was_running else
                  f"dropped the stale record of {server.url} ({server.model_uri}): pid {server.pid} is gone or now "
                  "belongs to another process (other start time or command line), which was not signalled")
        if not stopped:
            print("no recorded model server to stop")
        return 0
    if not args.model_uri:
        raise InputError("serve needs --model-uri (e.g. models:/quickstart@candidate), or --stop")
    server = serving.start(args.model_uri, args.host, args.port, args.tracking_uri, args.state_dir,
                           workers=args.workers, allow_remote=args.allow_remote, max_rows=args.max_rows_per_request,
                           max_bytes=args.max_request_mb * 1024 * 1024)
    print(f"serving {args.model_uri} at {server.url}  (POST {server.invocations_url}; log {server.log_path})",
          flush=True)
    if args.detach:
        print("stop it with: spark-tuning serve --stop" + (f" --port {server.port}" if args.port else ""))
        return 0
    print("press Ctrl-C to stop", flush=True)
    serving.serve_forever(server)
    print("stopped")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import json

    from spark_tuning.deploy import verify

    report = verify.verify(args.endpoint, args.data, args.batch_size, args.atol, args.text_column, args.label_column)
    print(verify.render(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.ok else 1


def _score(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from spark_tuning.deploy import score
    from spark_tuning.config import SparkConfig
    from spark_tuning.cluster.spark import get_spark

    spark = get_spark(SparkConfig(master=args.master, app_name="spark-tuning-score"))
    with tempfile.TemporaryDirectory(prefix="spark-tuning-model-") as download:
        location = score.localize(spark, args.model_uri, args.tracking_uri, download)
        t = time.perf_counter()
        rows_in = score.read_input(spark, args.input)
        df = score.score(rows_in, location, args.text_column, args.text_pair_column)
        score.write_output(df, args.output, args.overwrite)
        clipped = score.clipped_rows(rows_in, location, args.text_column)
        seconds = time.perf_counter() - t
    rows = spark.read.parquet(args.output).count() if "/" in args.output else spark.table(args.output).count()
    print(f"scored {rows} rows in {seconds:.1f}s ({rows / seconds:.1f} rows/s, model load included) -> {args.output}")
    if clipped:
        print(f"{clipped} text(s) over the model's limit (deploy.max_text_chars) were clipped to their first and "
              "last halves before scoring, as training clips what it cannot use")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    from spark_tuning.deploy import cleanup

    items = cleanup.find(args.output_dir, args.keep_last_checkpoint, args.state_dir)
    freed = cleanup.remove(items) if args.yes and not args.dry_run else None
    print(cleanup.render(items, freed))
    if freed is None and items:
        print("nothing removed: run again with --yes to remove these")
    return 0


def _export(args: argparse.Namespace) -> int:
    from spark_tuning.deploy import export

    target = export.resolve(args.model_uri, args.tracking_uri, args.endpoint_name)
    for path in export.write(target, args.out, args.tracking_uri, copy_model=not args.no_model_copy):
        print(f"wrote {path}")
    return 0


def _add_deploy_commands(sub) -> None:
    import os

    def tracking(p):
        p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                       help="MLflow tracking store, e.g. sqlite:///outputs/mlflow.db (default: $MLFLOW_TRACKING_URI)")

    p = sub.add_parser("promote", help="point a registry alias (e.g. champion) at a model version")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--version", required=True, help="model version to point the alias at")
    p.add_argument("--alias", required=True, help="e.g. champion")
    p.add_argument("--registry-uri", default=None, help="e.g. databricks-uc (default: the tracking store)")
    tracking(p)
    p.set_defaults(func=_promote)

    p = sub.add_parser("serve", help="serve a logged model over HTTP on 127.0.0.1 (MLflow's scoring server)")
    p.add_argument("--model-uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a folder")
    p.add_argument("--host", default="127.0.0.1", help="another address than loopback needs --allow-remote")
    p.add_argument("--allow-remote", action="store_true",
                   help="serve on a non-loopback --host although the endpoint has no authentication")
    p.add_argument("--max-rows-per-request", type=int, default=1000, help="larger requests get HTTP 400")
    p.add_argument("--max-request-mb", type=int, default=16, help="larger request bodies get HTTP 400")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--detach", action="store_true", help="return once the server answers; stop it with --stop")
    p.add_argument("--stop", action="store_true", help="stop the recorded server(s) (all, or the one on --port)")
    p.add_argument("--state-dir", default=None, help="where server state files live (default: "
                   "$SPARK_TUNING_STATE_DIR or ~/.cache/spark-tuning/servers)")
    tracking(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("verify", help="check a served model against the run's offline predictions and metrics")
    p.add_argument("--endpoint", required=True, help="the server's URL, e.g. http://127.0.0.1:5000")
    p.add_argument("--data", required=True, help="a run's output folder, its eval_predictions.parquet, "
                   "or a Parquet/JSONL/CSV file with text (and label)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per request")
    p.add_argument("--atol", type=float, default=None,
                   help="allowed probability difference per row (default: from the precisions of the run and of "
                        "a server on this machine: 1e-5 for fp32 on CPUs on both sides, up to 3e-2 with bf16)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--json-out", help="also write the report as JSON here")
    p.set_defaults(func=_verify)

    p = sub.add_parser("score", help="batch-score a table or files in Spark with a logged model")
    p.add_argument("--model-uri", required=True)
    p.add_argument("--input", required=True, help="a table name or a Parquet/JSONL/CSV/Delta path")
    p.add_argument("--output", required=True, help="a path (written as Parquet) or a table name")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column", default="text_pair", help="the second text, for a model trained on pairs")
    p.add_argument("--master", default=None, help="Spark master (default: spark-submit's, else local[*])")
    p.add_argument("--overwrite", action="store_true")
    tracking(p)
    p.set_defaults(func=_score)

    p = sub.add_parser("cleanup", help="remove staging data, caches, checkpoints and stopped servers' files")
    p.add_argument("--output-dir", required=True, help="the run's output folder")
    p.add_argument("--yes", action="store_true", help="remove what is listed (without it, cleanup only lists)")
    p.add_argument("--dry-run", action="store_true", help="list only (the default without --yes)")
    p.add_argument("--keep-last-checkpoint", action="store_true")
    p.add_argument("--state-dir", default=None, help="model servers' state folder (see serve --state-dir)")
    p.set_defaults(func=_cleanup)

    p = sub.add_parser("export-serving-config",
                       help="write Databricks Model Serving and Azure ML online endpoint files for a model")
    p.add_argument("--model-uri", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--out", required=True, help="an empty or new folder")
    p.add_argument("--endpoint-name", default=None)
    p.add_argument("--no-model-copy", action="store_true", help="do not copy the MLflow model for Azure ML")
    tracking(p)
    p.set_defaults(func=_export)


def render_summary(s, task) -> str:
    """The table the job prints: the task's figures (`Task.summary_rows`), then training and deploy."""
    return _table(task.summary_rows(s.metrics) + _common_rows(s) + _deploy_rows(s))


def _deploy_rows(s) -> list[tuple[str, str]]:
    rows = []
    d = getattr(s, "deploy", None) or {}
    if d.get("serving_uri"):
        rows.append(("MLflow model", d["serving_uri"]))
    if d.get("verify"):
        v = d["verify"]
        rows.append(("served model check", f"{100 * (v['agreement'] or 0):.1f}% agreement, p50 "
                     f"{v['latency_ms'].get('p50', 0):.0f} ms, {v['rows_per_second']:.0f} rows/s"
                     + ("" if v["ok"] else " MISMATCH")))
    return rows


def _common_rows(s) -> list[tuple[str, str]]:
    from spark_tuning.track.tracking import ui_command

    m = s.metrics
    return [
        ("training steps", str(m["train_steps"])),
        ("train tokens/s", f"{m['train_tokens_per_second']:.0f} ({m['train_precision']}, {s.result['world_size']} processes)"),
        ("padding share", f"{100 * m['train_padding_share']:.1f}%"),
        ("MFU", f"{100 * m['train_mfu']:.1f}% of a measured {m['train_matmul_peak_gflops']:.0f} GFLOP/s matmul "
                "peak per process"),
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
    ft.add_argument("--overwrite", action="store_true",
                    help="replace the model in output_dir once the new one is complete (an interrupted run of the "
                         "same config is still continued)")
    again = ft.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted run of output_dir from its newest complete checkpoint, or fail "
                            "(done without it whenever the config is the same)")
    again.add_argument("--fresh", action="store_true",
                       help="discard an interrupted run of output_dir (its checkpoints) and train from the start")
    ft.set_defaults(func=_finetune)
    lg = sub.add_parser("log-model", help="log a finished model into MLflow after the tracking store failed at the "
                        "end of its run (the job's error says when)")
    lg.add_argument("--output-dir", required=True, help="the run's output folder (its published model)")
    lg.add_argument("--tracking-uri", default=None, help="default: the tracking URI of the run's config.yaml")
    lg.set_defaults(func=_log_model)
    pr = sub.add_parser("profile", help="know before you train: the data, truncation, padding, steps, memory and time "
                        "of a config, without training (its own MLflow run)")
    pr.add_argument("--config", help="YAML config (default: the built-in quickstart defaults)")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    pr.add_argument("--out", help="also write profile.md, profile.json and token_lengths.png here (a new or empty folder)")
    pr.set_defaults(func=_profile)
    ex = sub.add_parser("export-openai", help="write the prepared SFT data as chat JSONL for Azure OpenAI fine-tuning")
    ex.add_argument("--config", help="YAML config of an sft (or classification) job")
    ex.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    ex.add_argument("--out", required=True, help="folder for train.jsonl, validation.jsonl, token_counts.json")
    ex.add_argument("--overwrite", action="store_true", help="replace a folder that already holds files")
    ex.set_defaults(func=_export_openai)
    mk = sub.add_parser("make-example", help="build an example data set on real text for a task (README: More tasks)")
    mk.add_argument("name", choices=sorted(examples_names()),
                    help="imdb_scores: a number per review (regression); imdb_tags: aspect tags (multilabel); "
                         "imdb_entities: words with BIO tags (token_classification); imdb_pairs: two reviews, "
                         "same or different sentiment (classification of text pairs)")
    mk.add_argument("--imdb", default="../shared/data/imdb/train.parquet", help="the shared IMDB copy")
    mk.add_argument("--out", required=True, help="the Parquet file to write")
    mk.add_argument("--rows", type=int, default=3000)
    mk.add_argument("--overwrite", action="store_true", help="replace an existing file")
    mk.set_defaults(func=_make_example)
    _add_deploy_commands(sub)
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
