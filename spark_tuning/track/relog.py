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
    """Log the finished model in `output_dir`; returns {run_id, tracking_uri, model_uri, version, new_run,
    already}."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from spark_tuning import finetune
    from spark_tuning.config import ConfigError, load_config
    from spark_tuning.deploy.packaging import read_record
    from spark_tuning.paths import OWNER_MARKER, local_path, remove_tree, run_folder, write_owner_marker
    from spark_tuning.tasks import get_task
    from spark_tuning.track import tracking

    out = local_path(output_dir)
    with finetune.output_lock(out):  # not while a run is replacing the folder
        if finetune.output_state(out) != "model":
            raise InputError(f"--output-dir {output_dir}: not a finished spark-tuning model (no {OWNER_MARKER} "
                             "listing its files, or files added since): log-model logs only a folder the job published")
        with open(os.path.join(out, OWNER_MARKER)) as f:
            marker = json.load(f)
        if "precision" not in marker:
            raise InputError(f"--output-dir {output_dir}: its {OWNER_MARKER} predates log-model (no precision and "
                             "task extras recorded): rerun the job with --overwrite to log it")
        try:
            cfg = load_config(os.path.join(out, "config.yaml"))
        except ConfigError as e:
            raise InputError(f"--output-dir {output_dir}: its config.yaml no longer loads: {e}") from None
        cfg.output_dir = out
        # The store the run was made in (recorded when it was published), unless told otherwise.
        cfg.tracking.tracking_uri = tracking_uri or marker.get("tracking_uri") or cfg.tracking.tracking_uri
        tracking.check_reachable(cfg)
        uri = tracking.tracking_uri(cfg)
        client = MlflowClient(uri)
        run_id, new_run = marker.get("run_id"), False
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage != "active":
                raise LookupError("deleted")
        except (MlflowException, LookupError) as e:
            if isinstance(e, MlflowException) and e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            ref = tracking.start_run(cfg, tags={"spark_tuning.trained_in_run": str(run_id)})
            log.warning("MLflow run %s is not in %s (or was deleted): logging into a new run, %s", run_id, uri,
                        ref.run_id)
            run_id, new_run, run = ref.run_id, True, None
        record = read_record(out)
        logged = record is not None and record.run_id == run_id
        if run is not None and run.info.status == "FINISHED" and (logged or not cfg.tracking.log_model):
            return {"run_id": run_id, "tracking_uri": uri, "new_run": False, "already": True,
                    "model_uri": record.model_uri if record else None, "version": record.version if record else None}
        ref = tracking.RunRef(uri, run_id, "")
        if new_run:
            tracking.log_params(ref, cfg.to_dict())
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        record = finetune.log_outputs(cfg, get_task(cfg.task), ref, out, metrics, marker["precision"],
                                      marker.get("extras") or {})
        write_owner_marker(out, run_id=run_id, tracking_uri=uri)
        client.set_tag(run_id, LOGGED_LATER_TAG, "true")
        client.set_terminated(run_id, "FINISHED")
        # The run's state, kept when logging failed (a retry would resume from it): no longer needed.
        interrupted = finetune.interrupted_run(out)
        if interrupted and interrupted.get("run_id") == marker.get("run_id"):
            remove_tree(run_folder(out), *finetune.sources_of(cfg))
    return {"run_id": run_id, "tracking_uri": uri, "new_run": new_run, "already": False,
            "model_uri": record.model_uri if record else None, "version": record.version if record else None}
