"""spark-tuning: fine-tune Hugging Face models on text that lives in Spark.

DESIGN (read this first)

The job is `finetune.run`, named steps top to bottom:

  preflight     config, output folder, model and resources checked on the driver, before Spark works
  start_spark   the one SparkSession (cluster/spark.py)
  stage         the task reads, checks, splits and tokenizes in Spark, and stages Parquet (data/, text/, loader/)
  tracked_run   the MLflow run (track/): params, rank 0's events, FAILED if anything below raises
  train         TorchDistributor runs train/loop.train_fn on every rank (cluster/launch.py)
  write_outputs metrics.json, the task's files and the model, into a hidden folder moved into place at the end
  deploy        package, register, serve, verify, score (deploy/)

`profile.run` (`spark-tuning profile`) is the same preflight and data stage up to whole token lengths
(`Task.profile_rows`, nothing staged), then a report (train/budget.py's estimates); every job prints the
same summary from its staged rows (`finetune.start_profile`).

`RunFolders` owns the output, partial and staging folders and removes what must go in `finally`.

Subpackages, one per stage; each imports only from the stages below it and from the top-level modules
(config, errors, paths, secrets), never from finetune or cli:

  cluster/   SparkSession, TorchDistributor launch and resource checks, per-rank logs and failure reports
  data/      read sources; pure DataFrame -> DataFrame transforms: clean, labels, split, sample; chat export
  text/      the tokenizer pandas UDF, the Rust encoder, chat rendering and packing for the LM tasks
  loader/    staging as Parquet, one rank's shard, batch plans and collation; backends.py alone knows both
             backends (Parquet, petastorm), and petastorm.py imports only the public staging code
  model/     model sources (local, hub, GGUF), building with the task's head, LoRA, export for saving
  train/     the rank's loop (loop.py: named steps around state.TrainState), precision, optimizer and
             schedule, checkpoints, MFU, feeding batches; distributed.py holds all rank and world logic
  tasks/     one file per task, behind the `Task` interface (tasks/base.py)
  evaluate/  metrics and plots
  track/     MLflow, rank 0's events relay, the watchdog that marks a killed run FAILED
  deploy/    packaging (serving_model.py is logged as code and imports nothing from the package), serving,
             verify, score, export, cleanup

The Task interface (tasks/base.py) is everything that differs between tasks: the config problems and model
checks it adds, its data stage (columns read and checked, tokenization, staging -> `Staged`), the head
(`load_model`), `collate` and `loss`, evaluation on the ranks, the metrics and files it writes, and what the
served model needs (`serving_config`, `generates_text`, `verifiable`). The job, the loop, packaging and
serving ask the task; nothing outside tasks/ branches on a task's name (tests/test_structure.py checks this,
and that there is no import cycle and no function over 80 lines).

Where new things go:
  a new task      tasks/<name>.py with a TASK object (found by tasks.all_tasks) and its tests; the served
                  model's answer for it in deploy/serving_model.py (self-contained, so it keeps its own table)
  a new loader    loader/<name>.py reading into a staging.Shard; its `kind` in loader/backends.py
  a model source  model/sources.py (resolve_model, where a source becomes a local folder)
The config reaches the ranks as a typed `train.payload.TrainPayload` (to_dict / from_dict), never as
a dict of string keys.
"""

__version__ = "0.1.0"
