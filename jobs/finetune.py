"""Entry point for spark-submit: `spark-submit jobs/finetune.py --config conf/x.yaml [--set k=v ...]`."""

import os
import sys

from spark_tuning.cli import main


def _config_here(argv: list[str]) -> list[str]:
    """A config sent with --files lands in the driver's working folder: where the path given does not
    exist (the driver runs elsewhere, e.g. --deploy-mode cluster), use that copy."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--config" and not os.path.exists(out[i + 1]) and os.path.exists(os.path.basename(out[i + 1])):
            out[i + 1] = os.path.basename(out[i + 1])
    return out


if __name__ == "__main__":
    sys.exit(main(["finetune", *_config_here(sys.argv[1:])]))
