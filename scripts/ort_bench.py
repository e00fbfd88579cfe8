#!/usr/bin/env python3
"""Time onnxruntime on an ngpt model.onnx the way `ngpt bench` times ngpt: prefill a prompt,
then decode greedily with the KV cache (present fed back as past), median of several runs.

  python3 scripts/ort_bench.py out/small/model.onnx --prompt-len 128 --gen-len 64 [--cuda]

The last line of stdout is one JSON object (prefill_tokens_per_s, decode_tokens_per_s,
ttft_ms). Needs numpy and onnxruntime (onnxruntime-gpu for --cuda).
"""

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort


def one_run(s, names, heads, head_dim, layers_inputs, prompt, gen, batch):
    past = {n: np.zeros((batch, heads, 0, head_dim), np.float32) for n in layers_inputs}
    ids = np.array([prompt] * batch, np.int64)
    t0 = time.perf_counter()
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((batch, len(prompt)), np.int64),
        "position_ids": np.tile(np.arange(len(prompt), dtype=np.int64), (batch, 1)),
        **past,
    }
    out = dict(zip(names, s.run(names, feed)))
    prefill = time.perf_counter() - t0
    nxt = out["logits"][:, -1].argmax(-1)
    ttft = time.perf_counter() - t0
    past = {k.replace("present.", "past_key_values."): v
            for k, v in out.items() if k.startswith("present.")}
    t1 = time.perf_counter()
    for i in range(gen):
        n = len(prompt) + i
        feed = {
            "input_ids": nxt[:, None].astype(np.int64),
            "attention_mask": np.ones((batch, n + 1), np.int64),
            "position_ids": np.full((batch, 1), n, np.int64),
            **past,
        }
        out = dict(zip(names, s.run(names, feed)))
        nxt = out["logits"][:, -1].argmax(-1)
        past = {k.replace("present.", "past_key_values."): v
                for k, v in out.items() if k.startswith("present.")}
    return prefill, ttft, time.perf_counter() - t1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cuda", action="store_true", help="CUDAExecutionProvider")
    a = ap.parse_args()

    providers = ["CUDAExecutionProvider"] if a.cuda else ["CPUExecutionProvider"]
    t0 = time.perf_counter()
    s = ort.InferenceSession(a.model, providers=providers)
    load = time.perf_counter() - t0
    if a.cuda and "CUDAExecutionProvider" not in s.get_providers():
        raise SystemExit("onnxruntime: CUDAExecutionProvider is not available here")
    inputs = {i.name: i for i in s.get_inputs()}
    _, heads, _, head_dim = inputs["past_key_values.0.key"].shape
    vocab = s.get_outputs()[0].shape[-1]
    layer_inputs = [n for n in inputs if n.startswith("past_key_values.")]
    names = [o.name for o in s.get_outputs()]
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, vocab, a.prompt_len)]
    one_run(s, names, heads, head_dim, layer_inputs, prompt, 2, a.batch)  # warm-up
    runs = [one_run(s, names, heads, head_dim, layer_inputs, prompt, a.gen_len, a.batch)
            for _ in range(a.runs)]
    prefill = statistics.median(r[0] for r in runs)
    ttft = statistics.median(r[1] for r in runs)
    decode = statistics.median(r[2] for r in runs)
    result = {
        "engine": "onnxruntime-" + ("cuda" if a.cuda else "cpu"),
        "onnxruntime": ort.__version__,
        "load_s": load,
        "prefill_tokens_per_s": a.batch * a.prompt_len / prefill,
        "decode_tokens_per_s": a.batch * a.gen_len / decode,
        "ttft_ms": ttft * 1e3,
    }
    print(f"onnxruntime {ort.__version__} ({providers[0]}): load {load:.2f} s, "
          f"prefill {result['prefill_tokens_per_s']:.1f} tokens/s, "
          f"decode {result['decode_tokens_per_s']:.1f} tokens/s, first token {ttft * 1e3:.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
