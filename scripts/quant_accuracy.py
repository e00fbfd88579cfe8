#!/usr/bin/env python3
"""What weight-only quantization costs in accuracy: a markdown table for BENCHMARKS.md.

For each model (nv-tiny, nous-tiny) and weight format (f32; int8 and int4, with and without
--quant-renorm, lm_head int8 / int4 / float), compiles the checkpoint with ngpt, then
measures against the float64 reference on the fixture's prompt: relative logit error
(||out - ref||_F / ||ref||_F over [T, vocab]) and top-1 agreement, through the IR
(`ngpt logits DIR --engine ir --precision f32`), tract (where its MatMulNBits takes every
matrix: bits 4 only) and onnxruntime (CPU, one prefill); and the perplexity of
tests/fixtures/text/Apache-2.0.txt through the IR (`ngpt perplexity`; the other engines
equal the IR on the same weights within 1e-6 relative, so their perplexities agree).

Example:
  python3 scripts/quant_accuracy.py --ngpt target/release/ngpt --out /tmp/qacc
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_interop import Model  # noqa: E402

TEXT = "tests/fixtures/text/Apache-2.0.txt"
MODELS = [
    ("nv-tiny", "tests/fixtures/nv-tiny/ckpt.pt", "tests/fixtures/nv-tiny/prompt.json"),
    (
        "nous-tiny",
        "tests/fixtures/nous-tiny/model.safetensors",
        "tests/fixtures/nous-tiny/prompt.json",
    ),
]
# (label, compile flags)
FORMATS = [
    ("f32", []),
    ("int8", ["--onnx-dtype", "int8"]),
    ("int8 renorm", ["--onnx-dtype", "int8", "--quant-renorm"]),
    ("int8, lm_head float", ["--onnx-dtype", "int8", "--quant-lm-head", "float"]),
    ("int4 (lm_head int8)", ["--onnx-dtype", "int4"]),
    ("int4 renorm (lm_head int8)", ["--onnx-dtype", "int4", "--quant-renorm"]),
    ("int4, lm_head int4", ["--onnx-dtype", "int4", "--quant-lm-head", "int4"]),
    (
        "int4 renorm, lm_head int4",
        ["--onnx-dtype", "int4", "--quant-renorm", "--quant-lm-head", "int4"],
    ),
    ("int4, lm_head float", ["--onnx-dtype", "int4", "--quant-lm-head", "float"]),
    (
        "int4 renorm, lm_head float",
        ["--onnx-dtype", "int4", "--quant-renorm", "--quant-lm-head", "float"],
    ),
]


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def rel(out, ref):
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def agree(out, ref):
    return int((out.argmax(-1) == ref.argmax(-1)).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ngpt", default="target/release/ngpt")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    print("| model | weights | engine | rel. logit error | top-1 | perplexity |")
    print("|---|---|---|---:|---:|---:|")
    for name, src, prompt in MODELS:
        toks = json.load(open(prompt))["tokens"]
        t = ",".join(map(str, toks))
        ref_path = os.path.join(a.out, f"{name}-ref.npy")
        sh(a.ngpt, "logits", src, "--tokens", t, "-o", ref_path, "--precision", "f64")
        ref = np.load(ref_path).astype(np.float64)
        for label, flags in FORMATS:
            d = os.path.join(a.out, f"{name}-{label}".replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""))
            sh(a.ngpt, "compile", src, "-o", d, "--force", *flags)
            ppl = json.loads(
                sh(a.ngpt, "perplexity", d, "--text", TEXT, "--engine", "ir", "--precision", "f32", "--json")
            )["perplexity"]
            rows = []
            ir_path = os.path.join(d, "ir.npy")
            sh(a.ngpt, "logits", d, "--engine", "ir", "--precision", "f32", "--tokens", t, "-o", ir_path)
            rows.append(("ir", np.load(ir_path).astype(np.float64)))
            tract_path = os.path.join(d, "tract.npy")
            try:
                sh(a.ngpt, "logits", d, "--engine", "tract", "--tokens", t, "-o", tract_path)
                rows.append(("tract", np.load(tract_path).astype(np.float64)))
            except subprocess.CalledProcessError as e:
                why = e.stderr.strip().splitlines()[-1] if e.stderr else "failed"
                rows.append(("tract", why))
            m = Model(os.path.join(d, "model.onnx"))
            n = len(toks)
            logits, _ = m.run([toks], [[1] * n], [list(range(n))], m.empty(1))
            rows.append(("onnxruntime", logits[0].astype(np.float64)))
            for engine, out in rows:
                if isinstance(out, str):
                    print(f"| {name} | {label} | {engine} | skipped: bits 8 (tract's MatMulNBits takes 4) | | |")
                    continue
                shown = f"{ppl:.4f}" if engine == "ir" else "(as ir)"
                print(
                    f"| {name} | {label} | {engine} | {rel(out, ref):.3e} | "
                    f"{agree(out, ref)}/{len(toks)} | {shown} |"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
