"""Load test of the local model server: N concurrent clients for a bounded time, real review texts.

    python bench/serve_load.py --model-uri models:/quickstart@candidate --tracking-uri sqlite:///outputs/mlflow.db
    python bench/serve_load.py --url http://127.0.0.1:5000 --duration 20 --batch-sizes 1,8

Starts the server itself when given --model-uri (and stops it at the end, whatever happens), or uses a
running one with --url. Loopback only. Each client sends requests of `batch` texts drawn from real reviews
(../shared/data/imdb/train.parquet when present, else a run's eval_predictions.parquet via --data) back to
back; with several batch sizes, each gets its own phase and the report gives their ratios. Prints errors,
requests/s, rows/s and latency p50/p95/p99 per phase, and the machine's CPU load during each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMDB = os.path.join(ROOT, "..", "shared", "data", "imdb", "train.parquet")


def cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def load_texts(path: str | None, n: int = 2000) -> list[str]:
    import pandas as pd

    path = path or IMDB
    if os.path.isdir(path):
        path = os.path.join(path, "eval_predictions.parquet")
    texts = pd.read_parquet(path, columns=["text"])["text"].dropna().tolist()
    random.Random(0).shuffle(texts)
    return texts[:n]


def phase(url: str, texts: list[str], clients: int, duration: float, batch: int) -> dict:
    from spark_tuning.deploy.serving import post_json
    from spark_tuning.deploy.verify import percentiles

    latencies: list[float] = []
    errors: list[str] = []
    rows = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            body = {"dataframe_records": [{"text": rng.choice(texts)} for _ in range(batch)]}
            t = time.perf_counter()
            try:
                status, answer = post_json(url + "/invocations", body, timeout=120)
                ok = status == 200 and len(answer["predictions"]) == batch
                why = "" if ok else f"HTTP {status}: {str(answer)[:200]}"
            except Exception as e:  # noqa: BLE001 - every failure counts as an error
                ok, why = False, repr(e)
            elapsed = time.perf_counter() - t
            with lock:
                if ok:
                    latencies.append(elapsed)
                    rows[0] += batch
                else:
                    errors.append(why)

    busy0, total0 = cpu_times()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t0
    busy1, total1 = cpu_times()
    return {"batch": batch, "clients": clients, "seconds": round(seconds, 1), "requests": len(latencies),
            "errors": len(errors), "first_errors": errors[:3], "requests_per_second": len(latencies) / seconds,
            "rows_per_second": rows[0] / seconds, "latency_ms": percentiles(latencies),
            "cpu_busy_share": round((busy1 - busy0) / max(1, total1 - total0), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (http://127.0.0.1:PORT)")
    p.add_argument("--model-uri", help="start a server for this model instead")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--data", help="Parquet with a text column (default: shared IMDB reviews)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    p.add_argument("--batch-sizes", default="1", help="texts per request, comma-separated (one phase each)")
    p.add_argument("--json-out")
    args = p.parse_args()
    if bool(args.url) == bool(args.model_uri):
        p.error("give exactly one of --url and --model-uri")
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        p.error("loopback only: --url must be http://127.0.0.1:PORT")

    from spark_tuning.deploy import serving

    texts = load_texts(args.data)
    server = serving.start(args.model_uri, tracking_uri=args.tracking_uri) if args.model_uri else None
    url = server.url if server else args.url.rstrip("/")
    try:
        phase(url, texts, 1, 3.0, 1)  # warm-up, not reported
        results = [phase(url, texts, args.clients, args.duration, int(b)) for b in args.batch_sizes.split(",")]
    finally:
        if server:
            serving.stop(server)
    print(f"{len(texts)} distinct review texts (mean {sum(map(len, texts)) / len(texts):.0f} characters), "
          f"{args.clients} clients, {args.duration:.0f}s per phase, {os.cpu_count()} CPUs")
    print(f"{'batch':>5} {'requests':>8} {'errors':>6} {'req/s':>7} {'rows/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'p99 ms':>7} {'cpu busy':>8}")
    for r in results:
        lat = r["latency_ms"] or {"p50": 0, "p95": 0, "p99": 0}
        print(f"{r['batch']:>5} {r['requests']:>8} {r['errors']:>6} {r['requests_per_second']:>7.2f} "
              f"{r['rows_per_second']:>7.2f} {lat['p50']:>7.0f} {lat['p95']:>7.0f} {lat['p99']:>7.0f} "
              f"{100 * r['cpu_busy_share']:>7.0f}%")
        for e in r["first_errors"]:
            print(f"      error: {e}")
    if len(results) > 1:
        base = results[0]["rows_per_second"] or 1e-9
        print("rows/s relative to batch " + str(results[0]["batch"]) + ": " + ", ".join(
            f"batch {r['batch']} x{r['rows_per_second'] / base:.2f}" for r in results[1:]))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
