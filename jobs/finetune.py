"""Entry point for spark-submit: `spark-submit jobs/finetune.py --config conf/x.yaml [--set k=v ...]`."""

import sys

from spark_tuning.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
