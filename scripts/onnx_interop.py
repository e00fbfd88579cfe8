#!/usr/bin/env python3
"""Run an ngpt-exported model.onnx with onnxruntime (CPU) and compare with reference logits.

What a user of the export does: load model.onnx, prefill a prompt with an empty KV cache,
then decode token by token feeding `present.*` back as `past_key_values.*`. The logits of
every position are compared with a [T, vocab] float32 .npy written by `ngpt logits`
(relative Frobenius error, top-1 agreement per position). Also checked: one prefill of the
whole prompt, and a ragged batch of two rows (the second left-padded, masked by
attention_mask). With the `onnx` package installed, onnx.checker (full_check) runs first.

Exit status: 0 when every relative error is within --tol, 1 otherwise, 2 on usage errors.

With --flip-tol (models whose GEMMs quantize their activations to int8, MatMulNBits
accuracy_level 4) the check is per position instead: two implementations that quantize the
same activations the same way still differ by f32 rounding, and where an activation lies
within that rounding of a half-integer step one of them rounds it up and the other down,
which moves that position's logits by far more than rounding (measured: 6.4e-4 at one
position of 64 on a Zen 4 CPU, where onnxruntime's multi-row AVX-512 kernels sum in another
order than its one-row ones). Every position must be within --tol except at most one in
sixteen (at least one), and those within --flip-tol; a systematic difference (int8
activations on one side only: 2.5e-3 at every position) still fails.

Example:
  ngpt compile tests/fixtures/nv-tiny/ckpt.pt -o out/nv-tiny
  ngpt logits out/nv-tiny --tokens 45,64,77,1,2 -o out/ref.npy
  python3 scripts/onnx_interop.py out/nv-tiny out/ref.npy --tokens 45,64,77,1,2
"""

import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort


def rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def top1(out, ref):
    return int((np.argmax(out, -1) == np.argmax(ref, -1)).sum())


class Model:
    def __init__(self, path):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.sess.get_inputs()}
        for name in ("input_ids", "attention_mask", "position_ids"):
            if name not in inputs:
                raise SystemExit(f"error: {path}: no `{name}` input; not an ngpt export")
        self.layers = 0
        while f"past_key_values.{self.layers}.key" in inputs:
            self.layers += 1
        shape = inputs["past_key_values.0.key"].shape
        self.heads, self.head_dim = int(shape[1]), int(shape[3])
        self.outputs = [o.name for o in self.sess.get_outputs()]
        meta = self.sess.get_modelmeta().custom_metadata_map
        self.max_seq_len = int(meta.get("max_seq_len", "0")) or None

    def empty(self, batch):
        z = np.zeros((batch, self.heads, 0, self.head_dim), dtype=np.float32)
        return [z] * (2 * self.layers)

    def run(self, ids, mask, pos, past):
        feed = {
            "input_ids": np.asarray(ids, dtype=np.int64),
            "attention_mask": np.asarray(mask, dtype=np.int64),
            "position_ids": np.asarray(pos, dtype=np.int64),
        }
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = dict(zip(self.outputs, self.sess.run(self.outputs, feed)))
        present = []
        for i in range(self.layers):
            present += [out[f"present.{i}.key"], out[f"present.{i}.value"]]
        return out["logits"], present


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model.onnx, or a compiled directory holding it")
    ap.add_argument("reference", help="[T, vocab] float32 .npy from `ngpt logits`")
    ap.add_argument("--tokens", help="comma-separated token ids (the ones of the .npy)")
    ap.add_argument("--tokens-json", help="a JSON file with a `tokens` list instead")
    ap.add_argument("--prefill", type=int, default=None,
                    help="tokens in the first call (default: half the prompt)")
    ap.add_argument("--greedy-json",
                    help="a JSON file with `prompt_tokens` and `greedy_tokens` (nv-tiny's "
                         "greedy.json): greedy decoding with the cache must give those tokens")
    ap.add_argument("--tol", type=float, default=1e-5,
                    help="largest relative error accepted (1e-5 for f32 weights, 1e-2 for f16)")
    ap.add_argument("--flip-tol", type=float, default=None,
                    help="int8-activation models: per-position check, a few positions "
                         "(one in sixteen) may exceed --tol up to this (a flipped rounding)")
    args = ap.parse_args()

    path = args.model
    if os.path.isdir(path):
        path = os.path.join(path, "model.onnx")
    if not os.path.isfile(path):
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    elif args.tokens_json:
        with open(args.tokens_json) as f:
            tokens = [int(t) for t in json.load(f)["tokens"]]
    else:
        print("error: give --tokens or --tokens-json", file=sys.stderr)
        return 2
    ref = np.load(args.reference).astype(np.float64)
    t = len(tokens)
    if ref.shape[0] != t:
        print(f"error: {args.reference} has {ref.shape[0]} positions, --tokens {t}",
              file=sys.stderr)
        return 2

    try:
        import onnx  # optional
        onnx.checker.check_model(path, full_check=True)
        print(f"onnx.checker (full_check): ok, onnx {onnx.__version__}")
    except ImportError:
        print("onnx.checker: skipped (no `onnx` package)")

    m = Model(path)
    print(f"onnxruntime {ort.__version__}: {path}: {m.layers} layers, {m.heads} heads, "
          f"head_dim {m.head_dim}, max_seq_len {m.max_seq_len}")
    results = []

    # 1. One prefill of the whole prompt.
    logits, _ = m.run([tokens], [[1] * t], [list(range(t))], m.empty(1))
    results.append(("prefill", logits[0], ref))

    # 2. Prefill, then token by token with the KV cache.
    p = args.prefill if args.prefill is not None else max(1, t // 2)
    logits, past = m.run([tokens[:p]], [[1] * p], [list(range(p))], m.empty(1))
    rows = [logits[0]]
    for i in range(p, t):
        logits, past = m.run([[tokens[i]]], [[1] * (i + 1)], [[i]], past)
        rows.append(logits[0])
    results.append((f"prefill {p} + decode {t - p}", np.concatenate(rows), ref))

    # 3. A ragged batch: the whole prompt, and its first t - k tokens left-padded by k.
    k = min(3, t - 1)
    ids = [tokens, [0] * k + tokens[: t - k]]
    mask = [[1] * t, [0] * k + [1] * (t - k)]
    pos = [list(range(t)), [0] * k + list(range(t - k))]
    logits, _ = m.run(ids, mask, pos, m.empty(2))
    if not np.isfinite(logits).all():
        print("FAIL: NaN or Inf in the padded batch")
        return 1
    results.append(("batch row 0", logits[0], ref))
    results.append((f"batch row 1 (left-padded {k})", logits[1][k:], ref[: t - k]))

    failed = False
    if args.greedy_json:
        with open(args.greedy_json) as f:
            g = json.load(f)
        ids, want = [int(t) for t in g["prompt_tokens"]], [int(t) for t in g["greedy_tokens"]]
        logits, past = m.run([ids], [[1] * len(ids)], [list(range(len(ids)))], m.empty(1))
        got = [int(np.argmax(logits[0, -1]))]
        while len(got) < len(want):
            n = len(ids) + len(got) - 1
            logits, past = m.run([[got[-1]]], [[1] * (n + 1)], [[n]], past)
            got.append(int(np.argmax(logits[0, -1])))
        same = sum(a == b for a, b in zip(got, want))
        print(f"  greedy with the KV cache     {same}/{len(want)} tokens as {args.greedy_json}")
        failed = same != len(want)

    worst = 0.0
    flips_bad = False
    for label, out, want in results:
        e = rel_err(out, want)
        line = f"  {label:<28} rel err {e:.2e}, top-1 {top1(out, want)}/{len(want)}"
        if args.flip_tol is None:
            worst = max(worst, e)
            print(line)
            continue
        per = [rel_err(o, w) for o, w in zip(out, want)]
        over = [(i, v) for i, v in enumerate(per) if not v <= args.tol]
        allowed = max(1, len(per) // 16)
        if len(over) > allowed or any(not v <= args.flip_tol for _, v in over):
            flips_bad = True
        flipped = ", ".join(f"{i}: {v:.2e}" for i, v in over[:8]) or "none"
        if len(over) > 8:
            flipped += f" and {len(over) - 8} more"
        print(f"{line}; positions over {args.tol:g}: {flipped}")
    if not worst <= args.tol:
        print(f"FAIL: relative error {worst:.2e} > {args.tol:g}")
        return 1
    if flips_bad:
        print(f"FAIL: more than one position in sixteen over {args.tol:g}, or one over "
              f"--flip-tol {args.flip_tol:g}")
        return 1
    if failed:
        print("FAIL: greedy tokens differ")
        return 1
    if args.flip_tol is None:
        print(f"ok: every relative error within {args.tol:g}")
    else:
        print(f"ok: every position within {args.tol:g} but at most one in sixteen, those "
              f"within {args.flip_tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
