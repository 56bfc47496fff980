"""The job's deploy steps, called from finetune.run: package + register, and the optional served check.

`package` logs the model folder as an MLflow pyfunc model into the run (any task), registers it, sets the
alias, and writes mlflow_model.json (where the model went) into the folder. `serve_and_verify`
(deploy.verify; classification only) serves the registered model on 127.0.0.1, checks it against the run's
offline predictions and metrics, logs the result into the run, and always stops the server.
"""

from __future__ import annotations

import logging
from typing import Optional, TYPE_CHECKING

from spark_tuning.deploy.packaging import ModelRecord

if TYPE_CHECKING:  # annotations only: config is a leaf that tasks/ sit above
    from spark_tuning.config import Config

log = logging.getLogger("spark_tuning.deploy")


def package(cfg: Config, run_ref, folder: str, precision: str, extras: Optional[dict] = None) -> ModelRecord:
    from spark_tuning.deploy import packaging

    record = packaging.log_model(cfg, run_ref.run_id, run_ref.tracking_uri, folder, precision, extras)
    packaging.write_record(folder, record)
    return record


def serve_and_verify(cfg: Config, record: ModelRecord, out_dir: str):
    from mlflow import MlflowClient

    from spark_tuning.deploy import serving
    from spark_tuning.deploy import verify
    from spark_tuning.track import tracking

    server = serving.start(record.serving_uri, port=cfg.deploy.port, tracking_uri=record.tracking_uri,
                           max_rows=max(cfg.deploy.max_rows_per_request, cfg.deploy.batch_size))
    try:
        report = verify.verify(server.url, out_dir, cfg.deploy.batch_size)
    finally:
        serving.stop(server)
    log.info("served model check (%s):\n%s", record.serving_uri, verify.render(report))
    ref = tracking.RunRef(record.tracking_uri, record.run_id, "")
    values = {"verify_agreement": report.agreement, "verify_rows_per_second": report.rows_per_second,
              **{f"verify_latency_{k}_ms": v for k, v in report.latency_ms.items()}}
    tracking.log_metrics(ref, {k: v for k, v in values.items() if v is not None})
    MlflowClient(record.tracking_uri).set_tag(record.run_id, "spark_tuning.verified", str(report.ok).lower())
    if not report.ok:
        log.warning("the served model does NOT reproduce the run's predictions: %d row(s) differ",
                    len(report.differences))
    return report
