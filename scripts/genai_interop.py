#!/usr/bin/env python3
"""Run compiled ngpt directories with onnxruntime-genai's own generation loop.

`ngpt compile` writes genai_config.json (onnxruntime-genai's generic `decoder` model type)
beside model.onnx and copies the tokenizer files found beside the checkpoint, so a user runs
the directory as it is:

    import onnxruntime_genai as og
    model = og.Model("out/nv-tiny")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64)
    generator = og.Generator(model, params)

Checks (each exits 1 on a mismatch, 2 on usage errors):

  greedy DIR --greedy-json F     og.Model loads DIR; greedy generation from F's
                                 prompt_tokens gives F's greedy_tokens exactly.
  logits DIR --greedy-json F --ref R [--tol T]
                                 the same generation; before each step the logits og
                                 holds are within T (relative Frobenius) of R's row for
                                 that position (R: `ngpt logits` of prompt + greedy
                                 tokens), and their argmax is the greedy token.
  tokenizer --ngpt BIN --work W --text FILE
                                 trains a byte-level BPE tokenizer.json (the `tokenizers`
                                 package) on FILE, writes an `ngpt init --vocab N`
                                 checkpoint of its vocabulary size beside it, compiles
                                 it, and requires og.Tokenizer to encode a prompt to the
                                 ids ngpt's own tokenizer path gives (`ngpt generate
                                 --json`'s prompt_tokens), and og's greedy tokens and
                                 text to equal `ngpt generate`'s.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime_genai as og


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def generate(model, prompt, n, on_logits=None):
    """Greedy tokens after `prompt`, n of them; on_logits(step, row) sees the logits each
    token was chosen from."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        if on_logits is not None:
            # After a step, og's `logits` output is the forward the token was chosen from
            # (the prompt's for the first token, then the previous token's).
            logits = np.asarray(gen.get_output("logits"), dtype=np.float64)
            on_logits(len(out), logits[0, -1])
        out.append(int(gen.get_next_tokens()[0]))
    return out


def check_greedy(args):
    g = json.load(open(args.greedy_json))
    model = og.Model(args.dir)
    got = generate(model, g["prompt_tokens"], len(g["greedy_tokens"]))
    if got != g["greedy_tokens"]:
        fail(f"{args.dir}: og greedy tokens {got} differ from {g['greedy_tokens']}")
    print(f"ok: {args.dir}: og.Generator greedy, {len(got)} tokens equal to {args.greedy_json}")


def check_logits(args):
    g = json.load(open(args.greedy_json))
    prompt, want = g["prompt_tokens"], g["greedy_tokens"]
    ref = np.load(args.ref).astype(np.float64)
    if ref.shape[0] < len(prompt) + len(want) - 1:
        fail(f"{args.ref}: {ref.shape[0]} rows, need {len(prompt) + len(want) - 1}")
    worst = [0.0]

    def on_logits(step, row):
        r = ref[len(prompt) - 1 + step]
        err = float(np.linalg.norm(row - r) / np.linalg.norm(r))
        worst[0] = max(worst[0], err)
        if not np.isfinite(err) or err > args.tol:
            fail(f"{args.dir}: step {step}: relative error {err:.3e} > {args.tol}")
        if int(np.argmax(row)) != want[step]:
            fail(f"{args.dir}: step {step}: argmax {int(np.argmax(row))} != greedy {want[step]}")

    got = generate(og.Model(args.dir), prompt, len(want), on_logits)
    if got != want:
        fail(f"{args.dir}: og greedy tokens {got} differ from {want}")
    print(
        f"ok: {args.dir}: {len(want)} steps, worst relative error {worst[0]:.3e} "
        f"(tol {args.tol}), top-1 on the greedy path"
    )


def check_tokenizer(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    ckpt = os.path.join(args.work, "bpe-ckpt")
    out = os.path.join(args.work, "bpe-compiled")
    os.makedirs(ckpt, exist_ok=True)
    text = open(args.text, encoding="utf-8").read()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The alphabet is the text's own (ASCII), so every token decodes to whole characters
    # and both decoders see the same text for a random model's output.
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=[])
    tok.train_from_iterator([text], trainer)
    n = tok.get_vocab_size()
    run = lambda *a: subprocess.run([args.ngpt, *a], check=True, capture_output=True, text=True)
    run("init", ckpt, "--vocab", str(n), "--seed", "3")
    tok.save(os.path.join(ckpt, "tokenizer.json"))
    # og.Tokenizer reads tokenizer_config.json for the tokenizer's class.
    with open(os.path.join(ckpt, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 2048}, f)
    run("compile", ckpt, "-o", out, "--force")
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    for name in ("tokenizer.json", "tokenizer_config.json", "genai_config.json"):
        if name not in manifest["files"] or not os.path.isfile(os.path.join(out, name)):
            fail(f"{out}: {name} missing from the directory or its manifest")
    prompt = "Licensed under the Apache License, Version 2.0"
    model = og.Model(out)
    ids = [int(i) for i in og.Tokenizer(model).encode(prompt)]
    n_new = 24
    j = json.loads(
        run("generate", out, "--prompt", prompt, "--max-new-tokens", str(n_new), "--json")
        .stdout.strip()
        .splitlines()[-1]
    )
    if ids != j["prompt_tokens"]:
        fail(f"og.Tokenizer encodes {prompt!r} to {ids}, ngpt to {j['prompt_tokens']}")
    got = generate(model, ids, n_new)
    if got != j["tokens"]:
        fail(f"og greedy tokens {got} differ from ngpt generate's {j['tokens']}")
    text_og = og.Tokenizer(model).decode(np.array(got, dtype=np.int32))
    if text_og != j["text"]:
        fail(f"og text {text_og!r} differs from ngpt generate's {j['text']!r}")
    print(
        f"ok: {out}: BPE tokenizer of {n} tokens: og.Tokenizer ids equal ngpt's "
        f"({len(ids)} tokens), {n_new} greedy tokens and their text equal `ngpt generate`'s"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="check", required=True)
    g = sub.add_parser("greedy")
    g.add_argument("dir")
    g.add_argument("--greedy-json", required=True)
    l = sub.add_parser("logits")
    l.add_argument("dir")
    l.add_argument("--greedy-json", required=True)
    l.add_argument("--ref", required=True)
    l.add_argument("--tol", type=float, default=1e-2)
    t = sub.add_parser("tokenizer")
    t.add_argument("--ngpt", required=True)
    t.add_argument("--work", required=True)
    t.add_argument("--text", required=True)
    args = p.parse_args()
    if hasattr(og, "disable_telemetry_events"):
        og.disable_telemetry_events()
    {"greedy": check_greedy, "logits": check_logits, "tokenizer": check_tokenizer}[args.check](args)


if __name__ == "__main__":
    main()
