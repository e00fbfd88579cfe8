#!/usr/bin/env python3
"""Decode speed of several compiled directories, measured in alternating rounds.

On a shared or noisy machine one directory measured after another drifts with the machine;
here every round runs `ngpt bench DIR --runs 1 --json` once for each directory in turn, and
each directory's ratio to the first one is taken round by round, so a slow minute slows
both sides of a ratio. Prints each directory's median tokens/s and per-round runs, then the
median of the per-round ratios to the first directory.

    python3 scripts/bench_rounds.py --rounds 7 /tmp/b05c /tmp/qc-int8 /tmp/qc-int4
"""
import argparse
import json
import statistics
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="compiled directories; ratios are to the first")
    ap.add_argument("--ngpt", default="target/release/ngpt", help="the ngpt binary")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine", default="plan-cpu")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--metric", default="decode_tokens_per_s",
                    help="a key of `ngpt bench --json` (prefill_tokens_per_s, ...)")
    a = ap.parse_args()
    got = {d: [] for d in a.dirs}
    for _ in range(a.rounds):
        for d in a.dirs:
            cmd = [a.ngpt, "bench", d, "--engine", a.engine, "--prompt-len", str(a.prompt_len),
                   "--gen-len", str(a.gen_len), "--batch", str(a.batch), "--runs", "1", "--json"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
            got[d].append(json.loads(out.stdout.strip().splitlines()[-1])[a.metric])
    base = a.dirs[0]
    for d in a.dirs:
        runs = " ".join(f"{v:.1f}" for v in got[d])
        print(f"{d}: {a.metric} median {statistics.median(got[d]):.1f} (runs {runs})")
    for d in a.dirs[1:]:
        r = [x / y for x, y in zip(got[d], got[base])]
        print(f"{d} / {base}: median of rounds {statistics.median(r):.2f} "
              f"({' '.join(f'{v:.2f}' for v in r)})")


if __name__ == "__main__":
    main()
