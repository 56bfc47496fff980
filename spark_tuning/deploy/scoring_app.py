"""The model server: MLflow's own scoring app (`mlflow.pyfunc.scoring_server`, the one `mlflow models serve`
runs) behind a guard. A JSON request body that does not parse gets 400 and a short message that does not
repeat the body (MLflow's parser error echoes it, which puts whatever a client sent, secrets included, into
the response and the server log).

    python -m spark_tuning.deploy.scoring_app MODEL_URI HOST PORT WORKERS      # what serving.start runs

The model is downloaded once (models:/ and runs:/ URIs) into a temporary folder that is removed when the
server stops; each uvicorn worker loads it from there, as MLflow's server does.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

EXAMPLE = '{"inputs": ["a review"]}'
# Limits per request (serving.start sets them from --max-rows-per-request / deploy.max_rows_per_request):
# a request is answered row after row, so an unbounded one holds the server as long as it likes.
MAX_ROWS_ENV, MAX_BYTES_ENV = "SPARK_TUNING_MAX_ROWS_PER_REQUEST", "SPARK_TUNING_MAX_REQUEST_BYTES"
DEFAULT_MAX_ROWS, DEFAULT_MAX_BYTES = 1000, 16 * 1024 * 1024


class JsonGuard:
    """ASGI middleware: POST /invocations with a JSON content type must carry parseable UTF-8 JSON."""

    def __init__(self, app, max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = DEFAULT_MAX_BYTES):
        self.app, self.max_rows, self.max_bytes = app, max_rows, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/invocations":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        mime = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if mime != "application/json":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await respond(send, 400, f"the request body is larger than the limit of {self.max_bytes} "
                                                "bytes: send fewer or shorter texts per request")
        try:
            doc = parse(body)
        except ValueError as e:  # not UTF-8, or not JSON: where it stopped, never what it holds
            return await respond(send, 400, f"{e}: send a JSON object such as {EXAMPLE}")
        problem = self.rows_problem(doc)
        if problem:
            return await respond(send, 400, problem)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def rows_problem(self, doc):
        """More rows than the limit, in any of MLflow's request shapes (None when within it)."""
        if not isinstance(doc, dict):
            return None
        rows = [doc.get("inputs"), doc.get("instances"), doc.get("dataframe_records"),
                (doc.get("dataframe_split") or {}).get("data") if isinstance(doc.get("dataframe_split"), dict) else None]
        n = max((len(r) for r in rows if isinstance(r, list)), default=0)
        if n > self.max_rows:
            return (f"the request holds {n} rows, more than the limit of {self.max_rows} per request: send them in "
                    f"batches of {self.max_rows} or fewer")
        return None


def parse(body: bytes):
    """The JSON document in `body`; a ValueError saying where it stops parsing (never what it holds)."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"the request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


async def respond(send, status: int, text: str) -> None:
    payload = json.dumps({"error_code": "BAD_REQUEST", "message": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def create_app():
    """uvicorn's app factory, in every worker: MLflow's app for the downloaded model, guarded."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
    return JsonGuard(scoring_server.init(model), int(os.environ.get(MAX_ROWS_ENV, DEFAULT_MAX_ROWS)),
                     int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)))


def local_model(model_uri: str, into: str) -> str:
    if os.path.isdir(model_uri):
        return os.path.abspath(model_uri)
    from mlflow.artifacts import download_artifacts

    return download_artifacts(artifact_uri=model_uri, dst_path=into)


def main(argv: list[str]) -> int:
    import uvicorn
    from mlflow.pyfunc import scoring_server

    model_uri, host, port, workers = argv[0], argv[1], int(argv[2]), int(argv[3])
    work = tempfile.mkdtemp(prefix="spark-tuning-served-model-")
    try:
        os.environ[scoring_server._SERVER_MODEL_PATH] = local_model(model_uri, work)
        uvicorn.run("spark_tuning.deploy.scoring_app:create_app", factory=True, host=host, port=port,
                    workers=workers, log_level="info")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
