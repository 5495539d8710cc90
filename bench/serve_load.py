"""A bounded load test of `habit serve`: N chat requests from C concurrent clients.

    python bench/serve_load.py --run runs/roles                # embedded server on a free port
    python bench/serve_load.py --run runs/roles -n 64 -c 1 4 16 --max-tokens 32
    python bench/serve_load.py --url http://127.0.0.1:8000 --model roles --api-key KEY

Prints a markdown table (one row per concurrency): requests/s, generated tokens/s, p50 and p95
latency. Every request is checked (HTTP 200, one choice, a finish reason); the loop is bounded by
-n and sends traffic to the one server it names, on this machine by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROLES = ["Linux Terminal", "Travel Guide", "Chess Coach", "Poet", "Storyteller", "Lighthouse Keeper",
         "Bread Baker", "Museum Guide"]


def ask(url: str, key: str | None, model: str, role: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": role}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/chat/completions", body, headers),
                                timeout=600) as r:
        answer = json.loads(r.read())
    seconds = time.perf_counter() - start
    choice = answer["choices"][0]
    if r.status != 200 or choice["finish_reason"] not in ("stop", "length"):
        raise RuntimeError(f"bad answer: {answer}")
    return seconds, answer["usage"]["completion_tokens"]


def load(url: str, key: str | None, model: str, n: int, c: int, max_tokens: int) -> dict:
    jobs = [ROLES[i % len(ROLES)] for i in range(n)]
    start = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        done = list(pool.map(lambda role: ask(url, key, model, role, max_tokens), jobs))
    wall = time.perf_counter() - start
    latency = sorted(d for d, _ in done)
    return {"concurrency": c, "requests": n, "rps": n / wall,
            "tokens_per_s": sum(t for _, t in done) / wall,
            "p50": statistics.median(latency), "p95": latency[max(0, round(0.95 * n) - 1)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="run directory: serve it here on a free port for the test")
    where.add_argument("--url", help="an already running habit serve, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", help="model id to ask (default: the run's name)")
    parser.add_argument("--api-key", help="for --url servers started with --api-key")
    parser.add_argument("-n", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("-c", type=int, nargs="+", default=[16], help="concurrent clients (one row each)")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens per request")
    args = parser.parse_args()

    server = None
    url, model = args.url, args.model
    if args.run:
        from habit.serve import make_server

        server = make_server([args.run], port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url, model = server.url, model or server.model_ids[1]
    try:
        ask(url, args.api_key, model, ROLES[0], args.max_tokens)  # warm-up, not counted
        rows = [load(url, args.api_key, model, args.n, c, args.max_tokens) for c in args.c]
    finally:
        if server:
            server.stop()
            server.close()
    print(f"\nhabit serve, model `{model}`, max_tokens {args.max_tokens}, greedy\n")
    print("| clients | requests | requests/s | tokens/s | p50 latency | p95 latency |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['rps']:.1f} | {r['tokens_per_s']:.0f} "
              f"| {r['p50'] * 1000:.0f} ms | {r['p95'] * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
