"""Nothing is lost: spark-tuning replaces only what it wrote, and no command deletes a folder that is, or
holds, the working directory, the home folder, the filesystem root, the checkout, a data or a model source.
Each deleting or replacing code path is driven into its refusal here (the job's own refusals are in the
bad-input catalogue)."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from spark_tuning.errors import InputError
from spark_tuning.paths import OWNER_MARKER, foreign_names, publish, removal_problem, remove_tree, write_owner_marker

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_protected_folders_and_the_folders_holding_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "d.parquet"
    data.parent.mkdir()
    data.write_text("x")
    assert "the working directory" in removal_problem(str(tmp_path))
    assert "holds the working directory" in removal_problem(str(tmp_path.parent))
    assert "is the filesystem root" in removal_problem("/")
    assert "the home folder" in removal_problem(os.path.expanduser("~"))
    assert "is the spark-tuning checkout" in removal_problem(CHECKOUT)
    assert "holds the source" in removal_problem(str(tmp_path / "data"), str(data))
    assert removal_problem(str(tmp_path / "data"), "package:spark_tuning/resources") is None
    assert removal_problem(str(tmp_path / "out")) is None
    with pytest.raises(InputError, match="never deletes or replaces"):
        remove_tree(str(tmp_path))
    assert tmp_path.exists()


def test_publish_replaces_only_a_folder_it_wrote_and_keeps_the_old_until_the_new_is_in(tmp_path):
    final, new = tmp_path / "model", tmp_path / ".model.partial"
    final.mkdir()
    (final / "config.json").write_text("old")
    write_owner_marker(str(final))
    new.mkdir()
    (new / "config.json").write_text("new")
    publish(str(new), str(final), overwrite=True)
    assert (final / "config.json").read_text() == "new" and not new.exists()
    assert sorted(os.listdir(tmp_path)) == ["model"]  # the old copy was removed after the rename

    # Someone's file added to it: refused with or without --overwrite, and both folders kept.
    write_owner_marker(str(final))
    (final / "thesis.txt").write_text("mine")
    new.mkdir()
    with pytest.raises(InputError, match=r"did not write \(thesis.txt\)"):
        publish(str(new), str(final), overwrite=True)
    assert (final / "thesis.txt").read_text() == "mine" and new.exists()
    assert foreign_names(str(final)) == ["thesis.txt"]
    # A model folder without the marker (someone's HF download): all of it is foreign.
    other = tmp_path / "hf"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert foreign_names(str(other)) == ["config.json"]
    assert OWNER_MARKER not in foreign_names(str(final))


def test_score_overwrite_replaces_only_sparks_own_parquet_output(spark, tmp_path):
    from spark_tuning.deploy.score import write_output

    df = spark.createDataFrame(pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}))
    target = str(tmp_path / "scored")
    write_output(df, target, overwrite=False)
    write_output(df, target, overwrite=True)  # Spark's own output: replaced
    assert spark.read.parquet(target).count() == 2
    (tmp_path / "scored" / "notes.md").write_text("mine")
    with pytest.raises(InputError, match=r"did not write \(notes.md\)"):
        write_output(df, target, overwrite=True)
    assert (tmp_path / "scored" / "notes.md").exists()
    with pytest.raises(InputError, match="is the (working directory|spark-tuning checkout)"):
        write_output(df, os.getcwd() + "/", overwrite=True)


def test_export_openai_and_make_example_refuse_what_they_would_lose(spark, tmp_path, reviews_jsonl, tiny_bert_dir):
    from spark_tuning.config import load_config
    from spark_tuning.data import examples, openai_export

    cfg = load_config(None, [f"data.source={reviews_jsonl}", f"model.source={tiny_bert_dir}",
                             f"output_dir={tmp_path / 'unused'}"])
    out = tmp_path / "export"
    out.mkdir()
    (out / "thesis.txt").write_text("mine")
    with pytest.raises(InputError, match=r"did not write \(thesis.txt\)"):
        openai_export.export(cfg, str(out), overwrite=True, spark=spark)
    assert (out / "thesis.txt").read_text() == "mine"
    with pytest.raises(InputError, match="holds the source"):
        openai_export.export(cfg, os.path.dirname(reviews_jsonl), overwrite=True, spark=spark)
    imdb = tmp_path / "imdb.parquet"
    pd.DataFrame({"text": ["x"], "label": [0]}).to_parquet(imdb)
    with pytest.raises(InputError, match="the IMDB source itself"):
        examples.write_example("imdb_scores", str(imdb), str(imdb), rows=1, overwrite=True)
    assert pd.read_parquet(imdb).shape == (1, 2)


def test_cleanup_never_lists_a_protected_folder(tmp_path, monkeypatch):
    from spark_tuning.deploy import cleanup

    out = tmp_path / "out" / "model"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    monkeypatch.chdir(out / "checkpoints" / "step-00000002")  # someone works inside a checkpoint folder
    items = cleanup.find(str(out), state_dir=str(tmp_path / "servers"))
    assert all(removal_problem(i.path) is None for i in items)
    assert str(out / "checkpoints" / "step-00000002") not in [i.path for i in items]


def test_a_checkpoint_of_the_same_step_is_replaced_rename_first(tmp_path, monkeypatch):
    """Saving a step that exists (a resumed run): the old one is renamed aside, the new one renamed in, then
    the old one removed. Killed between the two renames, the old one is found again: never no checkpoint."""
    from spark_tuning.train import checkpoint

    root = str(tmp_path / "checkpoints")
    first = checkpoint.finish(root, checkpoint.begin(root, 3), 3, {"n": 1}, {"step": 3, "v": "old"}, keep_last=1)
    real, calls = os.rename, []

    def killed_after_first(a, b):
        calls.append(os.path.basename(a))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies before the new one is in
        real(a, b)

    monkeypatch.setattr(os, "rename", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.finish(root, checkpoint.begin(root, 3), 3, {"n": 2}, {"step": 3, "v": "new"}, keep_last=1)
    monkeypatch.setattr(os, "rename", real)
    assert calls[0] == "step-00000003" and calls[1].startswith(".tmp-")  # aside first, then in
    assert checkpoint.latest(root) == first and checkpoint.load_state(first)["v"] == "old"
    again = checkpoint.finish(root, checkpoint.begin(root, 3), 3, {"n": 2}, {"step": 3, "v": "new"}, keep_last=1)
    assert checkpoint.load_state(again)["v"] == "new" and os.listdir(root) == ["step-00000003"]
