#!/usr/bin/env python3
"""Load test of a running `ngpt serve`: N concurrent clients, each sending a fixed number of
streamed completions of a given prompt length and max_tokens, one after the other.

Reports aggregate generated tokens per second of wall time, time to first token p50/p99,
inter-token latency p50/p99 and failed requests. Standard library only; talks to the one
server given and stops by itself (every request has a timeout).

    python3 scripts/serve_bench.py --base-url http://127.0.0.1:8000 \
        --clients 16 --requests 4 --prompt-len 16 --max-tokens 128

Prompts are token ids drawn from 0..--vocab-size with a fixed seed (per client and
request), so runs are comparable; generation ignores EOS so every request makes
--max-tokens tokens.
"""

import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def one_request(url, body, timeout, api_key):
    """Streams one completion: (first-token time, per-token times, tokens) or raises."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
        times = []
        done = False
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            v = json.loads(data)
            if "error" in v:
                raise RuntimeError(v["error"].get("message"))
            now = time.perf_counter()
            for c in v.get("choices", []):
                times += [now - t0] * len(c.get("token_ids") or [])
        if not done:
            raise RuntimeError("the stream ended without [DONE]")
        return times
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=64, help="prompt ids are drawn below it")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request")
    ap.add_argument("--api-key")
    ap.add_argument("--json", action="store_true", help="print one JSON object too")
    a = ap.parse_args()

    ttft, itl, failures = [], [], []
    generated = [0]
    lock = threading.Lock()

    def client(ci):
        for ri in range(a.requests):
            rng = random.Random(ci * 1_000_003 + ri)
            body = {
                "prompt": [rng.randrange(a.vocab_size) for _ in range(a.prompt_len)],
                "max_tokens": a.max_tokens,
                "temperature": a.temperature,
                "seed": ci * 1000 + ri,
                "ignore_eos": True,
                "stream": True,
                "return_token_ids": True,
            }
            try:
                times = one_request(a.base_url, body, a.timeout, a.api_key)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    failures.append(f"client {ci} request {ri}: {e}")
                continue
            with lock:
                generated[0] += len(times)
                if times:
                    ttft.append(times[0])
                    itl.extend(b - a_ for a_, b in zip(times, times[1:]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    result = {
        "clients": a.clients,
        "requests": a.clients * a.requests,
        "prompt_len": a.prompt_len,
        "max_tokens": a.max_tokens,
        "wall_s": wall,
        "generated_tokens": generated[0],
        "tokens_per_s": generated[0] / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "failed": len(failures),
    }
    print(
        f"{a.clients} clients x {a.requests} requests, prompt {a.prompt_len}, {a.max_tokens} new tokens: "
        f"{result['tokens_per_s']:.1f} generated tokens/s ({generated[0]} in {wall:.2f} s); "
        f"TTFT p50 {result['ttft_p50_s'] * 1e3:.1f} ms p99 {result['ttft_p99_s'] * 1e3:.1f} ms; "
        f"ITL p50 {result['itl_p50_s'] * 1e3:.2f} ms p99 {result['itl_p99_s'] * 1e3:.2f} ms; "
        f"failed {len(failures)}"
    )
    for f in failures[:5]:
        print(f"  {f}", file=sys.stderr)
    if a.json:
        print(json.dumps(result))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
