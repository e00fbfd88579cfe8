#!/usr/bin/env python3
"""Writes measured parity errors into tests/fixtures/baselines.json.

Usage: baselines.py RECORDED.tsv [tests/fixtures/baselines.json]
RECORDED.tsv holds `key<TAB>relative error` lines, as the tests append them with
NGPT_BASELINE_RECORD set (see tests/it/common/baseline.rs). Each key's baseline becomes
the largest value recorded for it, rounded up to two significant digits; keys not in the
file keep their baseline; the comment and the rule are kept.
"""
import json
import math
import sys


def round_up(x):
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return float(f"{math.ceil(x / scale - 1e-9) * scale:.2g}")


def main():
    recorded, fixture = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/baselines.json")
    measured = {}
    for line in open(recorded):
        key, value = line.rstrip("\n").split("\t")
        measured[key] = max(measured.get(key, 0.0), float(value))
    doc = json.load(open(fixture))
    base = doc.setdefault("baselines", {})
    for key, value in measured.items():
        base[key] = round_up(value)
    doc["baselines"] = dict(sorted(base.items()))
    with open(fixture, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
