#!/usr/bin/env python3
"""Greedy generation with an ngpt-exported model.onnx in onnxruntime, using the KV cache.

  ngpt compile tests/fixtures/nv-tiny/ckpt.pt -o out/nv-tiny
  python3 examples/onnx_generate.py out/nv-tiny/model.onnx \
      --vocab tests/fixtures/nv-tiny/vocab.json --prompt "Permission is hereby gra" --new 40

Needs numpy and onnxruntime (pip install numpy onnxruntime).
"""

import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--vocab", help="vocab.json with a `chars` string (char-level models)")
    ap.add_argument("--prompt", default=None, help="text (needs --vocab)")
    ap.add_argument("--tokens", default="0", help="comma-separated ids, without --prompt")
    ap.add_argument("--new", type=int, default=40)
    a = ap.parse_args()

    chars = json.load(open(a.vocab))["chars"] if a.vocab else None
    ids = [chars.index(c) for c in a.prompt] if a.prompt else [int(t) for t in a.tokens.split(",")]

    t0 = time.perf_counter()
    s = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t0
    times = []
    inputs = {i.name: i for i in s.get_inputs()}
    _, heads, _, head_dim = inputs["past_key_values.0.key"].shape
    past = {n: np.zeros((1, heads, 0, head_dim), np.float32)
            for n in inputs if n.startswith("past_key_values.")}
    names = [o.name for o in s.get_outputs()]
    out_ids, new = [], ids  # prefill the whole prompt, then one token per call
    for _ in range(a.new):
        n = next(iter(past.values())).shape[2]  # tokens already in the cache
        feed = {
            "input_ids": np.array([new], np.int64),
            "attention_mask": np.ones((1, n + len(new)), np.int64),
            "position_ids": np.arange(n, n + len(new), dtype=np.int64)[None],
            **past,
        }
        t0 = time.perf_counter()
        out = dict(zip(names, s.run(names, feed)))
        times.append(time.perf_counter() - t0)
        nxt = int(out["logits"][0, -1].argmax())
        out_ids.append(nxt)
        new = [nxt]
        past = {k.replace("present.", "past_key_values."): v
                for k, v in out.items() if k.startswith("present.")}
    decode = len(times) - 1
    rate = f", decode {decode / sum(times[1:]):.1f} tokens/s" if decode else ""
    print(f"onnxruntime {ort.__version__}: load {load:.2f} s, prefill {len(ids)} tokens "
          f"{times[0] * 1e3:.1f} ms{rate}")
    if chars:
        print(repr("".join(chars[i] for i in ids)), "+", repr("".join(chars[i] for i in out_ids)))
    else:
        print(ids, "+", out_ids)


if __name__ == "__main__":
    main()
