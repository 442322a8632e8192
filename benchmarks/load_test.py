"""Bounded load test: many concurrent clients against a tiny server on loopback.

    .venv/bin/python benchmarks/load_test.py --clients 32 --requests-per-client 3

Each client sends its requests one after another (synchronous POST /v1/videos); a prober
polls /health every 20 ms throughout. Every request must end `completed` or `429` — none
lost, none hung (each has a deadline) — and the /health p99 is reported against 50 ms.
Writes bench-out/load_test.json. Exits non-zero if a request was lost, hung or failed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import png_bytes, start_server  # noqa: E402  (the test suite's launcher)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="wanserve-load-"))
    server = start_server(tmp, "--max-queue", str(args.max_queue))
    image = png_bytes(64, 64)
    fields = {"prompt": "load", "size": args.size, "num_frames": "5",
              "num_inference_steps": str(args.steps)}
    outcomes: list[tuple[str, float]] = []
    health: list[float] = []
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = requests.get(server.url + "/health", timeout=5).status_code == 200
            except requests.RequestException:
                ok = False
            health.append(time.perf_counter() - start if ok else float("inf"))
            time.sleep(0.02)

    def client(index: int):
        for _ in range(args.requests_per_client):
            start = time.perf_counter()
            try:
                resp = requests.post(server.url + "/v1/videos", data={**fields, "seed": index},
                                     files={"input_reference": ("r.png", image, "image/png")},
                                     timeout=args.deadline)
                body = resp.json()
                if resp.status_code == 200 and body.get("status") == "completed":
                    outcome = "completed"
                elif resp.status_code == 429:
                    outcome = "429"
                else:
                    outcome = f"error {resp.status_code}"
            except requests.Timeout:
                outcome = "hung"
            except requests.RequestException as exc:
                outcome = f"lost: {type(exc).__name__}"
            outcomes.append((outcome, time.perf_counter() - start))

    prober = threading.Thread(target=probe)
    prober.start()
    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
    finally:
        stop.set()
        prober.join()
        exit_code = server.stop()
    elapsed = time.perf_counter() - began
    counts: dict[str, int] = {}
    for outcome, _ in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    completed = [t for o, t in outcomes if o == "completed"]
    finite = [h for h in health if h != float("inf")]
    return {
        "clients": args.clients, "requests": len(outcomes), "elapsed_s": round(elapsed, 2),
        "outcomes": counts, "server_exit_code": exit_code,
        "health_probes": len(health), "health_failures": len(health) - len(finite),
        "health_p50_ms": round(1000 * statistics.median(finite), 2),
        "health_p99_ms": round(1000 * percentile(finite, 0.99), 2),
        "health_max_ms": round(1000 * max(finite), 2),
        "job_p50_s": round(statistics.median(completed), 3) if completed else None,
        "job_p99_s": round(percentile(completed, 0.99), 3) if completed else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--deadline", type=float, default=300.0, help="seconds before a request is 'hung'")
    p.add_argument("--out", default=str(REPO / "bench-out" / "load_test.json"))
    args = p.parse_args()
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    bad = {o: n for o, n in result["outcomes"].items() if o not in ("completed", "429")}
    p99_ok = result["health_p99_ms"] <= 50
    print(f"every request completed or 429: {'PASS' if not bad else f'FAIL {bad}'}; "
          f"/health p99 {result['health_p99_ms']} ms (goal <= 50): {'PASS' if p99_ok else 'MISS'}")
    return 1 if bad or result["server_exit_code"] != 0 or result["health_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
