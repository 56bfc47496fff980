"""`spark-tuning log-model --output-dir OUT`: log a published model into MLflow after the tracking store
failed at the end of its run.

The job publishes the model before it logs anything (finetune.deploy), so a store that goes away after
training costs the logging, never the model. The folder keeps what logging needs: config.yaml, metrics.json,
and in its marker (.spark-tuning.json) the MLflow run id, the precision and the task's extras. This command
logs exactly what the job would have (final_* metrics, the files, the MLflow model, registered and aliased)
into that run, or into a new run of the config's experiment when the store no longer has it, and marks the
run FINISHED.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from spark_tuning.errors import InputError

log = logging.getLogger(__name__)

LOGGED_LATER_TAG = "spark_tuning.logged_later"  # set on a run whose outputs log-model logged


def log_model(output_dir: str, tracking_uri: Optional[str] = None) -> dict:
    """Log the finished model in `output_dir`; returns {run_id, tracking_uri, model_uri, version, new_run}."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from spark_tuning import finetune
    from spark_tuning.config import ConfigError, load_config
    from spark_tuning.paths import OWNER_MARKER, local_path
    from spark_tuning.tasks import get_task
    from spark_tuning.track import tracking

    out = local_path(output_dir)
    if finetune.output_state(out) != "model":
        raise InputError(f"--output-dir {output_dir}: not a finished spark-tuning model (no {OWNER_MARKER} listing "
                         "its files, or files added since): log-model logs only a folder the job published")
    with open(os.path.join(out, OWNER_MARKER)) as f:
        marker = json.load(f)
    if "precision" not in marker:
        raise InputError(f"--output-dir {output_dir}: its {OWNER_MARKER} predates log-model (no precision and task "
                         "extras recorded): rerun the job with --overwrite to log it")
    overrides = [f"output_dir={out}", *([f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else [])]
    try:
        cfg = load_config(os.path.join(out, "config.yaml"), overrides)
    except ConfigError as e:
        raise InputError(f"--output-dir {output_dir}: its config.yaml no longer loads: {e}") from None
    tracking.check_reachable(cfg)
    uri = tracking.tracking_uri(cfg)
    task = get_task(cfg.task)
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    client = MlflowClient(uri)
    with finetune.output_lock(out):  # not while a run is replacing the folder
        run_id, new_run = marker.get("run_id"), False
        try:
            client.get_run(run_id)
        except MlflowException:
            run = tracking.start_run(cfg, tags={"spark_tuning.trained_in_run": str(run_id)})
            log.warning("MLflow run %s is not in %s: logging into a new run, %s", run_id, uri, run.run_id)
            run_id, new_run = run.run_id, True
        ref = tracking.RunRef(uri, run_id, "")
        if new_run:
            tracking.log_params(ref, cfg.to_dict())
        record = finetune.log_outputs(cfg, task, ref, out, metrics, marker["precision"], marker.get("extras") or {})
        client.set_tag(run_id, LOGGED_LATER_TAG, "true")
        client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "tracking_uri": uri, "new_run": new_run,
            "model_uri": record.model_uri if record else None, "version": record.version if record else None}
