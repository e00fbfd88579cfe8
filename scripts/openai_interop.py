#!/usr/bin/env python3
"""The real `openai` Python client against `ngpt serve`.

Drives /v1/completions, streamed and not, greedy and seeded, with text and token-id
prompts, and checks each answer's tokens and text equal `ngpt generate --json`'s for the
same request; then that refusals arrive as the client's typed errors (400 naming the
field, 404 for another model).

    python3 scripts/openai_interop.py --base-url http://127.0.0.1:8000 \
        --ngpt target/debug/ngpt --model tests/fixtures/nv-tiny

Exits non-zero on the first mismatch, saying what differed.
"""

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai


def generate(ngpt, model, tokens, max_new, sampling):
    """`ngpt generate --json`: (prompt tokens, tokens, text)."""
    cmd = [ngpt, "generate", model, "--engine", "plan-cpu", "--json", "--max-new-tokens", str(max_new)]
    cmd += ["--tokens", ",".join(map(str, tokens))]
    cmd += sampling
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    v = json.loads(out.strip().splitlines()[-1])
    return v["prompt_tokens"], v["tokens"], v.get("text")


def extra(obj, name):
    """A field the OpenAI schema does not have (ngpt's `token_ids`)."""
    return (obj.model_extra or {}).get(name)


def check(what, got, want):
    if got != want:
        sys.exit(f"openai_interop: {what}: got {got!r}, want {want!r}")


def wait_ready(base_url, seconds):
    """Polls /health until it answers 200 (the model is loaded and warmed up)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"openai_interop: {base_url}/health not 200 after {seconds} s")
        time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--ngpt", required=True, help="the ngpt binary, for `ngpt generate`")
    ap.add_argument("--model", required=True, help="the INPUT the server serves")
    ap.add_argument("--prompt", default="Permission is hereby granted, ")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--wait", type=float, default=120, help="seconds to wait for /health")
    a = ap.parse_args()
    wait_ready(a.base_url, a.wait)

    client = openai.OpenAI(base_url=a.base_url.rstrip("/") + "/v1", api_key=a.api_key, max_retries=0, timeout=120)
    models = client.models.list()
    ids = [m.id for m in models.data]
    check("models", len(ids), 1)
    model = ids[0]

    checked = 0
    for label, sampling, params in [
        ("greedy", [], {"temperature": 0}),
        ("seeded", ["--temperature", "0.8", "--top-k", "5", "--seed", "7"],
         {"temperature": 0.8, "seed": 7, "extra_body": {"top_k": 5, "return_token_ids": True}}),
    ]:
        params = dict(params)
        body = params.pop("extra_body", {"return_token_ids": True})
        # A text prompt: the server's tokenizer; generate gets the same ids.
        r = client.completions.create(model=model, prompt=a.prompt, max_tokens=24, extra_body=body, **params)
        prompt_ids = extra(r, "prompt_token_ids")
        want_prompt, want, want_text = generate(a.ngpt, a.model, prompt_ids, 24, sampling)
        check(f"{label}: prompt tokens", prompt_ids, want_prompt)
        choice = r.choices[0]
        check(f"{label}: tokens", extra(choice, "token_ids"), want)
        if want_text is not None:
            check(f"{label}: text", choice.text, want_text)
        check(f"{label}: finish_reason", choice.finish_reason, "length")
        check(f"{label}: usage", (r.usage.prompt_tokens, r.usage.completion_tokens), (len(want_prompt), 24))
        checked += 1

        # Token ids in, streamed out.
        stream = client.completions.create(model=model, prompt=want_prompt, max_tokens=24, stream=True,
                                           stream_options={"include_usage": True}, extra_body=body, **params)
        text, tokens, finish, usage = "", [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
                tokens += extra(c, "token_ids") or []
                finish = c.finish_reason or finish
        check(f"{label} streamed: tokens", tokens, want)
        if want_text is not None:
            check(f"{label} streamed: text", text, want_text)
        check(f"{label} streamed: finish_reason", finish, "length")
        check(f"{label} streamed: usage", usage and usage.completion_tokens, 24)
        checked += 1

    # Refusals as the client's typed errors.
    try:
        client.completions.create(model=model, prompt=a.prompt, n=2)
        sys.exit("openai_interop: n=2 was accepted")
    except openai.BadRequestError as e:
        check("n=2: param", getattr(e, "param", None), "n")
    try:
        client.completions.create(model=model + "-other", prompt=a.prompt, max_tokens=2)
        sys.exit("openai_interop: another model was accepted")
    except openai.NotFoundError as e:
        check("wrong model: status", e.status_code, 404)
    print(f"openai_interop: {checked} completions equal ngpt generate's (openai {openai.__version__}), refusals typed")


if __name__ == "__main__":
    main()
