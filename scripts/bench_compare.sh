#!/usr/bin/env bash
# Side by side, one model, one prompt, one run: ngpt against what users would run instead.
#
#   scripts/bench_compare.sh CHECKPOINT_DIR [PROMPT_LEN [GEN_LEN [BATCH]]]
#
# CPU: ngpt plan-cpu (f32 and bf16 weights), tract on model.onnx, onnxruntime (CPU, KV cache);
# then weight-only int8 and int4 (`--dtype int8|int4`, default block 32 and lm_head): ngpt
# plan-cpu on model.plan beside onnxruntime on the same directory's model.onnx (the same
# integers and scales as com.microsoft MatMulNBits), each quantized row's ratio taken to
# ngpt's row of the same format; then int8a and int4a, the same with int8 activations
# (`--quant-activations int8`: the plan's integer GEMMs, and MatMulNBits accuracy_level 4, so
# onnxruntime runs its own int8-activation kernels on the same model.onnx).
# GPU (when nvidia-smi works): ngpt plan-cuda (bf16 plan), onnxruntime CUDA (if its
# provider loads), PyTorch as NVIDIA's model.py runs (bf16, no KV cache) and PyTorch with
# a static KV cache under torch.compile (scripts/torch_ngpt.py).
# Env: NGPT (default target/release/ngpt), PYTHON (default python3; needs numpy and
# onnxruntime, torch for the GPU rows), QUANT (default "int8 int4 int8a int4a"; empty for no
# quantized rows). Prints one table with ratios to ngpt's decode rate.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ckpt="${1:?usage: bench_compare.sh CHECKPOINT_DIR [PROMPT_LEN [GEN_LEN [BATCH]]]}"
p="${2:-128}"; g="${3:-64}"; b="${4:-1}"
NGPT="${NGPT:-$here/../target/release/ngpt}"
PYTHON="${PYTHON:-python3}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"$NGPT" compile "$ckpt" -o "$tmp/f32" --max-seq-len $((p + g + 8)) >/dev/null
gpu=0; nvidia-smi >/dev/null 2>&1 && gpu=1
"$NGPT" compile "$ckpt" -o "$tmp/bf16" --dtype bf16 --max-seq-len $((p + g + 8)) >/dev/null
QUANT="${QUANT-int8 int4 int8a int4a}"
for q in $QUANT; do
  # model.plan and model.onnx of one compile: the same quantized weights. A trailing `a`:
  # int8 activations.
  acts=(); [[ $q == *a ]] && acts=(--quant-activations int8)
  "$NGPT" compile "$ckpt" -o "$tmp/$q" --dtype "${q%a}" --onnx-dtype "${q%a}" "${acts[@]}" \
    --max-seq-len $((p + g + 8)) >/dev/null
done

rows="$tmp/rows.jsonl"; : > "$rows"
run() { # name, command...: the command's last stdout line is JSON; failures become a row
  local name="$1"; shift
  if out="$("$@" 2>"$tmp/err")"; then
    tail -n 1 <<<"$out" | "$PYTHON" -c "import json,sys; d=json.loads(sys.stdin.read()); d['name']='$name'; print(json.dumps(d))" >> "$rows"
  else
    "$PYTHON" -c "import json,sys; print(json.dumps({'name': '$name', 'error': sys.argv[1]}))" "$(tail -n 1 "$tmp/err")" >> "$rows"
  fi
}
common=(--prompt-len "$p" --gen-len "$g" --batch "$b" --json)
run "ngpt plan-cpu (f32)" "$NGPT" bench "$tmp/f32" --engine plan-cpu "${common[@]}"
run "ngpt plan-cpu (bf16 weights)" "$NGPT" bench "$tmp/bf16" --engine plan-cpu "${common[@]}"
run "tract (f32)" "$NGPT" bench "$tmp/f32" --engine tract "${common[@]}"
run "onnxruntime CPU (f32)" "$PYTHON" "$here/ort_bench.py" "$tmp/f32/model.onnx" --prompt-len "$p" --gen-len "$g" --batch "$b"
for q in $QUANT; do
  run "ngpt plan-cpu ($q)" "$NGPT" bench "$tmp/$q" --engine plan-cpu "${common[@]}"
  run "onnxruntime CPU ($q MatMulNBits)" "$PYTHON" "$here/ort_bench.py" "$tmp/$q/model.onnx" --prompt-len "$p" --gen-len "$g" --batch "$b"
done
if [[ $gpu == 1 ]]; then
  run "ngpt plan-cuda (bf16)" "$NGPT" bench "$tmp/bf16" --engine plan-cuda "${common[@]}"
  run "onnxruntime CUDA (f32)" "$PYTHON" "$here/ort_bench.py" "$tmp/f32/model.onnx" --cuda --prompt-len "$p" --gen-len "$g" --batch "$b"
  run "torch, as model.py (bf16, no cache)" "$PYTHON" "$here/torch_ngpt.py" "$ckpt" --mode nvidia --prompt-len "$p" --gen-len "$g" --batch "$b"
  run "torch.compile, static cache (bf16)" "$PYTHON" "$here/torch_ngpt.py" "$ckpt" --mode static --prompt-len "$p" --gen-len "$g" --batch "$b"
fi
"$PYTHON" - "$rows" "$p" "$g" "$b" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
p, g, b = sys.argv[2:5]
base = {}
quant = {}
def fmt_of(name):
    # "(int4a" before "(int4": the longer names first.
    return next((q for q in ("int8a", "int4a", "int8", "int4") if f"({q}" in name), None)
for r in rows:
    if r["name"].startswith("ngpt") and "decode_tokens_per_s" in r:
        fmt = fmt_of(r["name"])
        if fmt:
            quant[fmt] = r["decode_tokens_per_s"]
            continue
        # The first row of each engine (plan-cpu: its f32 row) is the reference.
        base.setdefault(r["name"].split()[1], r["decode_tokens_per_s"])
ref = base.get("plan-cuda") or base.get("plan-cpu")
# A quantized row's reference: ngpt plan-cpu on the same format.
def ref_of(name):
    fmt = fmt_of(name)
    return quant.get(fmt) if fmt else ref
print(f"prompt {p} tokens, {g} generated, batch {b}; ratio = ngpt's decode rate / this row's")
print(f"{'engine':<38} {'prefill tok/s':>14} {'decode tok/s':>13} {'first token':>12} {'load':>10} {'ngpt is':>9}")
for r in rows:
    if "error" in r:
        print(f"{r['name']:<38} failed: {r['error']}")
        continue
    rr = ref_of(r["name"])
    ratio = f"{rr / r['decode_tokens_per_s']:.2f}x" if rr else "-"
    # Load: until the engine takes a request (ngpt's load_ms, onnxruntime's session load_s).
    load_ms = r.get("load_ms", r["load_s"] * 1e3 if "load_s" in r else None)
    load = f"{load_ms:>8.1f}ms" if load_ms is not None else f"{'-':>10}"
    print(f"{r['name']:<38} {r['prefill_tokens_per_s']:>14.1f} {r['decode_tokens_per_s']:>13.1f} "
          f"{r['ttft_ms']:>10.1f}ms {load} {ratio:>9}")
bf16 = next((r["decode_tokens_per_s"] for r in rows
             if r["name"] == "ngpt plan-cpu (bf16 weights)" and "decode_tokens_per_s" in r), None)
for q, v in quant.items():
    if bf16:
        print(f"ngpt plan-cpu {q} decode / bf16 decode: {v / bf16:.2f}x")
PY
