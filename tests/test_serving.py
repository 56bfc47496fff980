"""A real scoring server on a free loopback port: verify against the run, malformed requests, batch scoring
in Spark against the endpoint, and stopping (Ctrl-C, serve --stop)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def server(packaged_run, tmp_path_factory):
    """`spark-tuning serve` in the foreground, as a user runs it; stopped with Ctrl-C by the last test."""
    from spark_tuning.deploy import serving

    cfg, summary = packaged_run
    state = str(tmp_path_factory.mktemp("servers"))
    port = serving.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "spark_tuning.cli", "serve", "--model-uri", "models:/tiny-reviews@candidate",
         "--tracking-uri", summary.tracking_uri, "--port", str(port), "--state-dir", state],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "serving" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"spark-tuning serve exited with {proc.returncode}")
    url = re.search(r"at (http://\S+)", line).group(1)
    yield {"proc": proc, "url": url, "port": port, "state": state, "summary": summary}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    for s in serving.running(state):
        serving.stop(s)


def test_serve_prints_a_loopback_url_and_records_state(server):
    from spark_tuning.deploy import serving

    assert server["url"] == f"http://127.0.0.1:{server['port']}"
    recorded = serving.running(server["state"])
    assert [s.port for s in recorded] == [server["port"]]
    assert serving.ping(server["url"])


def test_verify_agrees_with_the_run(server):
    from spark_tuning.deploy import verify

    summary = server["summary"]
    report = verify.verify(server["url"], summary.output_dir, batch_size=8)
    assert report.ok, verify.render(report)
    assert report.agreement == 1.0 and report.differences == []
    assert report.rows == summary.metrics["num_examples"] and report.requests == -(-report.rows // 8)
    for k in ("accuracy", "precision", "recall", "f1"):
        assert report.metrics[k] == summary.metrics[k] == report.offline[k]
    lat = report.latency_ms
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report.rows_per_second > 0


def test_verify_reports_each_differing_row(server, tmp_path):
    """A run whose recorded predictions were altered: verify names exactly those rows and fails."""
    from spark_tuning.cli import main

    out = server["summary"].output_dir
    rows = pd.read_parquet(os.path.join(out, "eval_predictions.parquet"))
    rows.loc[[2, 5], "prediction"] = 1 - rows.loc[[2, 5], "prediction"]
    for name in ("metrics.json", "label_map.json"):
        (tmp_path / name).write_text(open(os.path.join(out, name)).read())
    rows.to_parquet(tmp_path / "eval_predictions.parquet")
    report_path = tmp_path / "report.json"
    code = main(["verify", "--endpoint", server["url"], "--data", str(tmp_path), "--json-out", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code == 1 and not report["ok"]
    assert sorted(d["row_id"] for d in report["differences"]) == sorted(rows.loc[[2, 5], "row_id"])
    assert report["agreement"] == pytest.approx(1 - 2 / len(rows))


MALFORMED = {
    "not JSON": b"this is {not json",
    "not JSON, with a secret in it": b'{"inputs": ["a review"], "token": "hf_SECRETsecretSECRET" oops',
    "not UTF-8": b'{"inputs": ["caf\xe9"]}',
    "no input field": {"rows": [{"text": "fine"}]},
    "missing text field": {"dataframe_records": [{"review": "a fine film"}]},
    "number in inputs": {"inputs": [5]},
    "number among texts": {"inputs": ["a fine film", 7]},
    "number in records": {"dataframe_records": [{"text": 42}]},
    "null text": {"dataframe_records": [{"text": None}]},
    "empty list": {"inputs": []},
    "empty records": {"dataframe_records": []},
    "10 MB string in records": {"dataframe_records": [{"text": "word " * 2_000_000}]},
    "10 MB string in inputs": {"inputs": ["word " * 2_000_000]},
    "1001 rows": {"inputs": ["a fine film"] * 1001},  # over --max-rows-per-request (1,000)
    "17 MB body": {"inputs": ["word " * 3_500_000]},  # over --max-request-mb (16)
}
EXPECTED_MESSAGE = {"not JSON": "the request body is not valid JSON (", "1001 rows": "more than the limit of 1000",
                    "17 MB": "larger than the limit of 16777216 bytes", "not UTF-8": "not UTF-8 text",
                    "number": "must be a string", "null": "must be a string", "10 MB": "longer than the limit",
                    "missing": "no rows with a 'text' field", "empty": "no rows"}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_a_short_4xx_json_and_server_keeps_answering(server, case):
    """Every malformed request: a 4xx with a JSON error that says what is wrong, short (a 10 MB text is not
    sent back), and the server answers the next good request."""
    from spark_tuning.deploy.serving import post_json

    status, body = post_json(server["url"] + "/invocations", MALFORMED[case])
    assert 400 <= status < 500, (status, str(body)[:300])
    assert isinstance(body, dict) and body.get("error_code") and body.get("message"), str(body)[:300]
    assert len(json.dumps(body)) < 2048, str(body)[:300]
    if isinstance(MALFORMED[case], bytes):  # 400, and what was sent is not repeated back
        assert status == 400 and "SECRET" not in body["message"] and "not json" not in body["message"], body
    for words, expected in EXPECTED_MESSAGE.items():
        if case.startswith(words):
            assert expected in body["message"], body["message"]
    status, body = post_json(server["url"] + "/invocations", {"inputs": ["a wonderful film", "a dull film"]})
    assert status == 200 and [p["label"] in ("negative", "positive") for p in body["predictions"]] == [True, True]


def test_spark_batch_scoring_equals_the_endpoint(server, spark, tmp_path):
    from spark_tuning.deploy import score
    from spark_tuning.deploy.serving import post_json

    summary = server["summary"]
    rows = pd.read_parquet(os.path.join(summary.output_dir, "eval_predictions.parquet"))[["row_id", "text"]]
    sample = rows.sample(n=16, random_state=1).reset_index(drop=True)
    location = score.localize(spark, "models:/tiny-reviews@candidate", summary.tracking_uri, str(tmp_path / "m"))
    scored = score.score(spark.createDataFrame(sample).repartition(2), location).toPandas()
    scored = scored.set_index("row_id").loc[sample["row_id"]]
    status, body = post_json(server["url"] + "/invocations", {"inputs": sample["text"].tolist()})
    served = pd.DataFrame(body["predictions"])
    assert status == 200
    assert list(scored["prediction"]) == list(served["label"])
    np.testing.assert_allclose(scored["probability"], served["probability"], atol=1e-5)
    np.testing.assert_allclose(np.stack(scored["probabilities"]), np.stack(served["probabilities"]), atol=1e-5)


def test_serve_detach_then_stop(packaged_run, tmp_path):
    """`serve --detach` returns once the server answers; `serve --stop` ends its whole process group."""
    from spark_tuning.deploy import serving
    from spark_tuning.cli import main

    cfg, summary = packaged_run
    state = str(tmp_path / "state")
    assert main(["serve", "--detach", "--model-uri", "models:/tiny-reviews@candidate",
                 "--tracking-uri", summary.tracking_uri, "--state-dir", state]) == 0
    [s] = serving.running(state)
    assert serving.ping(s.url)
    assert main(["serve", "--stop", "--state-dir", state]) == 0
    assert serving.running(state) == []
    assert not serving._group_alive(s.pid) and not serving.ping(s.url, timeout=1)


def test_ctrl_c_stops_the_server(server):
    from spark_tuning.deploy import serving

    [s] = serving.running(server["state"])
    server["proc"].send_signal(signal.SIGINT)
    assert server["proc"].wait(timeout=60) == 0
    assert "stopped" in server["proc"].stdout.read()
    assert not serving._group_alive(s.pid) and not serving.ping(server["url"], timeout=1)
    assert serving.running(server["state"]) == []
