"""The only place a SparkSession is built."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from pyspark.sql import SparkSession

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import SparkConfig


def get_spark(cfg: SparkConfig) -> SparkSession:
    # Python workers must run this interpreter (the one with torch and transformers), not the system one.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.app_name)
    # spark-submit --master wins; otherwise the config's master, else all local cores.
    from pyspark import SparkConf

    # Under spark-submit, --master reaches Python only through the JVM's system properties, which a
    # SparkConf sees once the gateway to that (already running) JVM is up; before, it is an empty dict.
    # Elsewhere the JVM must not start yet: getOrCreate starts it with the builder's settings.
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        from pyspark import SparkContext

        SparkContext._ensure_initialized()
    submitted = SparkConf().get("spark.master", None)  # set by spark-submit --master
    if cfg.master and submitted and submitted != cfg.master:
        # The command line wins over the file: `spark-submit.sh x.yaml --master spark://...` must not
        # quietly run on the config's local[*].
        import logging

        logging.getLogger("spark_tuning").warning(
            "spark.master = %r in the config is overridden by spark-submit's --master %s", cfg.master, submitted)
    elif cfg.master:
        builder = builder.master(cfg.master)
    elif not submitted:
        builder = builder.master("local[*]")
    defaults = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.executorEnv.TOKENIZERS_PARALLELISM": "false",
        # Arrow batches of 1,000 rows instead of 10,000 for the tokenizer UDFs: the JVM and the Python
        # worker overlap better, and the tokenize stage ran ~15% faster on IMDB (bench/bench_tokenize.py).
        "spark.sql.execution.arrow.maxRecordsPerBatch": "1000",
        "spark.ui.showConsoleProgress": "false",  # progress bars garble the job's log lines
        "spark.executorEnv.PYSPARK_PYTHON": os.environ["PYSPARK_PYTHON"],
        # A barrier stage that cannot get its slots fails fast instead of retrying for ten minutes.
        "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "3",
        "spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "5s",
    }
    from spark_tuning.secrets import resolve_conf

    for key, value in {**defaults, **resolve_conf(cfg.conf)}.items():  # env:/secret: references resolved here
        builder = builder.config(key, value)
    return builder.getOrCreate()
